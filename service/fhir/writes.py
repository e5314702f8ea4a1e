"""The FHIR facade's write interactions: create, update, patch and delete, plain and conditional.

Two kinds of resource are written here:

- **Record-backed** (Patient, Condition, CarePlan): the clinic's records are the source of truth, so
  the resource an EHR writes is validated, mapped back into its record (`mappings.patient`,
  `mappings.condition`, `mappings.care_plan`), and the record is written like an intake write. What
  the store then holds, and what the response shows, is the record re-materialized: an EHR that
  changes a CarePlan changes the course, and the CarePlan follows the course.
- **Stored as sent** (every other stored type): validated (structure and the profiles it claims)
  and stored unchanged, with `meta.versionId` and `meta.lastUpdated` set by the store.

A resource the service maintains from a record (an infusion's Observations, the clinic's
Organization) cannot be written or deleted through the facade: its record owns it. Nor can the
Provenance the service writes of each record change (409): it is the service's account of what
changed; a client's own Provenance stays the client's to write.

A patch is a JSON Patch (application/json-patch+json) or a FHIRPath Patch (a Parameters
resource, application/fhir+json); either computes the new document from the current version,
which is then written as an update of that version would be.

Every write runs in one unit of work. Version checks (`If-Match`) happen inside it, with the
resource locked, and conditional creates and updates are serialized per criteria (an advisory lock
on PostgreSQL, BEGIN IMMEDIATE on SQLite) before they search, so concurrent requests cannot slip
between the check and the write or create duplicates.

This module must not search by itself (`service.fhir.search.matching_ids` does), must not commit
part of a write, and must not change what the read side serves: reads stay on the stored bytes.
"""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import fhirkit
import fhirpathpy
import jsonpatch
import jsonpointer
import orjson
from fastapi import APIRouter, Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models as fhirpath_models
from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError
from starlette.responses import Response

from mappings.care_plan import course_from_care_plan
from mappings.condition import diagnosis_from_fhir
from mappings.context import MappingContext, resource_id
from mappings.patient import patient_from_fhir
from mappings.unsupported import UnsupportedContent
from service.bootstrap import Services
from service.errors import InvalidRecord, Problem
from service.fhir.api import CONFORMANCE_TYPES, FHIR_VERSIONS, STORED_TYPES, negotiate
from service.fhir.errors import (
    FHIR_JSON,
    FhirError,
    InvalidResource,
    PreconditionFailed,
    ResourceConflict,
    ResourceGone,
    ResourceNotFound,
    UnsupportedMediaType,
)
from service.fhir.search import matching_ids, rows_answering
from service.fhir.validation import ResourceValidator
from service.json_text import dump_json, load_json
from service.records.materialize import Materializer
from service.records.models import Diagnosis, Patient, RecordModel, TreatmentCourse
from service.records.repository import RecordRepository, RecordVersion
from service.records.service import Outcome, load, repository_lookup, write_record
from service.security.audit import audit_facade_writes
from service.store.db import grouped
from service.store.resources import ResourceRepository, StoredResource, WrittenResource
from service.store.tables import search_token

WRITE_INTERACTIONS = ("create", "update", "patch", "delete")
"""CapabilityStatement `TypeRestfulInteraction` codes this module implements for stored types."""
CONDITIONAL_CREATE = True
CONDITIONAL_UPDATE = True
CONDITIONAL_DELETE = "single"
"""CapabilityStatement `ConditionalDeleteStatus`: one match is deleted, several are a 412."""
UPDATE_CREATE = True
"""An update of an id that does not exist creates it (record-backed types: the id the record
maps to)."""

RECORD_KINDS = {"Patient": "patient", "Condition": "diagnosis", "CarePlan": "course"}
"""Resource types written back into the clinic's records, and the record kind each one maps to."""
UNDELETABLE_TYPES = tuple(sorted(RECORD_KINDS))
"""Types refused a delete on principle (405): they are the clinic's records, which stay."""


def write_interactions(resource_type: str) -> tuple[str, ...]:
    """The write interactions of one stored type, for its CapabilityStatement entry."""
    if resource_type in READ_ONLY_TYPES:
        return ()
    if resource_type in UNDELETABLE_TYPES:
        return tuple(code for code in WRITE_INTERACTIONS if code != "delete")
    return WRITE_INTERACTIONS


JSON_PATCH = "application/json-patch+json"
FHIRPATH_PATCH_MEDIA = ("application/fhir+json", "application/json+fhir")
PATCH_FORMATS = (JSON_PATCH, "application/fhir+json")
"""CapabilityStatement `patchFormat`: JSON Patch, and FHIRPath Patch (a Parameters resource)."""

READ_ONLY_TYPES = ("AuditEvent",)
"""Stored types no client writes: the audit trail is the service's own record."""

ACTOR = "fhir"
"""Who record changes made through the facade are attributed to."""

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
MAX_DEPTH = 64
"""Nesting a resource may have; FHIR resources stay far below, hostile input does not."""
_SERVER_META = ("versionId", "lastUpdated")

_FIELD_PATHS: dict[str, dict[str, str]] = {
    "Patient": {
        "external_id": "Patient.identifier",
        "mrn": "Patient.identifier",
        "ehr_identifiers": "Patient.identifier",
        "name": "Patient.name",
        "birth_date": "Patient.birthDate",
        "sex": "Patient.gender",
    },
    "Condition": {
        "external_id": "Condition.identifier",
        "patient": "Condition.subject",
        "condition": "Condition.code",
        "icd10": "Condition.code",
        "recorded_on": "Condition.recordedDate",
        "status": "Condition.clinicalStatus",
    },
    "CarePlan": {
        "external_id": "CarePlan.identifier",
        "patient": "CarePlan.subject",
        "diagnosis": "CarePlan.addresses",
        "prescriber": "CarePlan.author",
        "protocol": "CarePlan.activity",
        "start_date": "CarePlan.period.start",
        "end_date": "CarePlan.period.end",
        "status": "CarePlan.status",
        "notes": "CarePlan.note",
    },
}
"""Where in a resource the record field a rule names came from, for an issue's expression."""

Params = list[tuple[str, str]]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Written:
    """A write's result: the resource as now stored, whether the write brought it into being,
    and whether it made a new version (not when the content was the current version's, or a
    conditional create found its match)."""

    stored: StoredResource
    created: bool
    changed: bool = True


@dataclass(frozen=True, slots=True)
class Deleted:
    """A delete's result: the deletion's version, or None when there was nothing to delete."""

    resource_type: str
    id: str | None
    version: int | None


# --- checks on what a client sent ---------------------------------------------------------------


def check_writable(resource_type: str) -> None:
    """404 for a type the facade does not know, 405 for the read-only conformance types and
    the CapabilityStatement."""
    if resource_type == "metadata":
        raise FhirError(
            405,
            "not-supported",
            "the CapabilityStatement at /fhir/metadata is read-only",
            headers={"Allow": "GET"},
        )
    if resource_type in CONFORMANCE_TYPES or resource_type in READ_ONLY_TYPES:
        raise FhirError(405, "not-supported", f"{resource_type} resources are read-only here")
    if resource_type not in STORED_TYPES:
        raise ResourceNotFound(f"resource type {resource_type} is not supported here")


def check_deletable(resource_type: str) -> None:
    check_writable(resource_type)
    if resource_type in UNDELETABLE_TYPES:
        raise FhirError(
            405,
            "not-supported",
            f"{resource_type} resources are the clinic's records and are not deleted through "
            "the facade",
        )


def check_id(resource_id: str) -> None:
    if not _ID.fullmatch(resource_id):
        raise FhirError(400, "invalid", f"{resource_id!r} is not a FHIR id ([A-Za-z0-9-.]{{1,64}})")


ANY_VERSION = -1
"""What `If-Match: *` names (RFC 9110 13.1.1): whichever version is current, if one is."""
_VERSION_TAG = re.compile(r'(?:W/)?(?:"([0-9]+)"|([0-9]+))')


def parse_if_match(value: str | None) -> int | None:
    """The version an If-Match header names: `W/"3"`, `"3"` or `3`; `*` is `ANY_VERSION`.

    A well-formed tag of a version that cannot exist (too many digits) is a version no resource
    is at, so its write fails its precondition (412) as any other stale tag's does.
    """
    if value is None:
        return None
    text = value.strip()
    if text == "*":
        return ANY_VERSION
    match = _VERSION_TAG.fullmatch(text)  # ASCII digits: `str.isdigit` takes any script's
    if match is None:
        raise FhirError(400, "invalid", f'If-Match {value!r} is not a version ETag like W/"3"')
    return int(match[1] or match[2])


def parse_criteria(resource_type: str, query: str) -> Params:
    """Search parameters of a conditional interaction (an If-None-Exist header or a query)."""
    text = query.strip()
    text = text.removeprefix(f"{resource_type}?").removeprefix("?")
    params = [(name, value) for name, value in parse_qsl(text, keep_blank_values=True)]
    if not params:
        raise FhirError(400, "invalid", "a conditional interaction needs search criteria")
    return params


def check_media_type(content_type: str | None) -> None:
    """A resource body is FHIR JSON (or plain JSON), in UTF-8 and FHIR 4.0."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media and media not in (
        "application/fhir+json",
        "application/json",
        "application/json+fhir",
    ):
        raise UnsupportedMediaType(f"send application/fhir+json, not {media}")
    _check_media_parameters(content_type)


def _check_media_parameters(content_type: str | None) -> None:
    """FHIR bodies are UTF-8 (R4 http.html#mime-type) and this server reads FHIR 4.0 alone
    (R4 versioning.html, the `fhirVersion` parameter): a body said to be anything else is a 415,
    not read as what it is not."""
    for item in (content_type or "").split(";")[1:]:
        name, _, value = item.partition("=")
        name, value = name.strip().lower(), value.strip().strip('"')
        if name == "charset" and value.lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaType(f"FHIR bodies are UTF-8, not charset={value}")
        if name == "fhirversion" and value not in FHIR_VERSIONS:
            raise UnsupportedMediaType(
                f"this server takes FHIR 4.0 (R4) resources, not fhirVersion={value}"
            )


def check_patch_media_type(content_type: str | None) -> str:
    """The media type of a PATCH body: a JSON Patch, or a FHIRPath Patch in FHIR JSON."""
    _check_media_parameters(content_type)
    media = (content_type or "").split(";")[0].strip().lower()
    if media != JSON_PATCH and media not in FHIRPATH_PATCH_MEDIA:
        raise UnsupportedMediaType(
            f"PATCH takes a JSON Patch ({JSON_PATCH}) or a FHIRPath Patch "
            f"(application/fhir+json), not {media or 'nothing'}"
        )
    return media


def parse_patch(content_type: str | None, data: Any) -> Any:
    """A PATCH body: a JSON Patch as its list of operations, or a parsed `FhirPathPatch`."""
    if check_patch_media_type(content_type) == JSON_PATCH:
        return data
    return parse_fhirpath_patch(data)


def parse_json(raw: bytes) -> Any:
    """The decoded body: 400 for what is not JSON, too deep, or holds a NUL character."""
    if not raw.strip():
        raise FhirError(400, "invalid", "the request has no body")
    try:
        # Its numbers as written: a decimal's precision is significant (R4 datatypes.html).
        data = load_json(raw)
    except orjson.JSONDecodeError as error:
        raise FhirError(400, "invalid", f"the body is not valid JSON: {error}") from None
    if _nests_deeper_than(data, MAX_DEPTH):
        raise FhirError(400, "invalid", f"the body nests deeper than {MAX_DEPTH} levels")
    # JSON can only carry a NUL as an escape: without one anywhere, no string or key holds one.
    if b"\\u0000" in raw:
        _check_depth_and_text(data)
    return data


def _nests_deeper_than(data: Any, limit: int) -> bool:
    """Whether a value lies deeper than `limit`, the document being level 1.

    Level by level over the containers alone, without recursion: a hostile body must not
    exhaust the stack here or in the validators after us. About four times faster than
    `_check_depth_and_text`'s walk through every value, which a large transaction felt.
    """
    level = [data] if isinstance(data, dict | list) else []
    depth = 1
    while level:
        if depth >= limit and any(level):  # a container at the limit holds something below it
            return True
        below: list[Any] = []
        for container in level:
            for value in container.values() if isinstance(container, dict) else container:
                kind = type(value)
                if kind is dict or kind is list:
                    below.append(value)
        level = below
        depth += 1
    return False


def _check_depth_and_text(data: Any) -> None:
    # Iterative: a hostile body must not exhaust the stack here or in the validators after us.
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FhirError(400, "invalid", f"the body nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in key:
                    raise FhirError(400, "invalid", "the body holds a NUL character")
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str) and "\x00" in value:
            # PostgreSQL text cannot hold NUL, and FHIR strings may not contain it.
            raise FhirError(400, "invalid", "the body holds a NUL character")


def resource_body(data: Any, resource_type: str, resource_id: str | None) -> dict[str, Any]:
    """The resource a create or update sent, checked against its URL, server meta removed.

    An update's body must carry the URL's id; a create's id is ignored (the server assigns one).
    """
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        raise FhirError(400, "invalid", "the body is not a FHIR resource (no resourceType)")
    if data["resourceType"] != resource_type:
        raise FhirError(
            400,
            "invalid",
            f"the body is a {data['resourceType']}, but the URL is for {resource_type}",
            expression="resourceType",
        )
    resource = dict(data)
    if resource_id is None:
        resource.pop("id", None)
    elif "id" not in resource:
        raise FhirError(
            400, "required", "an update's resource must carry its id", f"{resource_type}.id"
        )
    elif resource["id"] != resource_id:
        raise FhirError(
            400,
            "invalid",
            f"the body's id {resource['id']!r} is not the URL's {resource_id!r}",
            expression=f"{resource_type}.id",
        )
    # The store sets the version and time; what a client read earlier says nothing now.
    _drop_server_meta(resource)
    return resource


def _drop_server_meta(resource: dict[str, Any]) -> None:
    """Take the members the store sets (versionId, lastUpdated) out of `resource`'s meta, and
    the meta itself when nothing else is left in it."""
    meta = resource.get("meta")
    if isinstance(meta, dict):
        kept = {key: value for key, value in meta.items() if key not in _SERVER_META}
        if kept:
            resource["meta"] = kept
        else:
            resource.pop("meta")


# --- the writes -----------------------------------------------------------------------------------


class FacadeWriter:
    """The write interactions on one unit of work's connection; the caller commits."""

    def __init__(
        self,
        *,
        connection: Connection,
        validator: ResourceValidator,
        materializer: Materializer,
        base: str,
        request_id: str | None,
    ) -> None:
        self.connection = connection
        self.validator = validator
        self.materializer = materializer
        self.base = base
        self.request_id = request_id
        self.resources = ResourceRepository(connection)
        self.records = RecordRepository(connection)

    @property
    def context(self) -> MappingContext:
        return self.materializer.context

    # create ---------------------------------------------------------------------------------

    def create(
        self, resource_type: str, resource: dict[str, Any], *, if_none_exist: Params | None = None
    ) -> Written:
        """Create (201), or with `if_none_exist` return the one match (200); several are a 412."""
        if if_none_exist is not None:
            self.resources.serialize(criteria_key(resource_type, if_none_exist))
            found = self.matching(resource_type, if_none_exist)
            if len(found) > 1:
                raise PreconditionFailed(
                    f"If-None-Exist matches {len(found)} {resource_type} resources"
                )
            if found:
                stored = self.resources.read(resource_type, found[0])
                if stored is not None and not stored.deleted:
                    return Written(stored, created=False, changed=False)
        if resource_type in RECORD_KINDS:
            return self._write_record_backed(resource_type, resource, None, None)
        resource = {**resource, "id": str(uuid.uuid4())}
        return self._write_as_sent(resource_type, resource, None)

    # update ---------------------------------------------------------------------------------

    def update(
        self,
        resource_type: str,
        resource_id: str,
        resource: dict[str, Any],
        *,
        if_match: int | None = None,
        must_be_new: bool = False,
    ) -> Written:
        """Update (200) or, for an id not stored yet, create (201)."""
        if resource_type in RECORD_KINDS:
            return self._write_record_backed(
                resource_type, resource, resource_id, if_match, must_be_new=must_be_new
            )
        return self._write_as_sent(resource_type, resource, if_match, must_be_new=must_be_new)

    def conditional_update(
        self,
        resource_type: str,
        criteria: Params,
        resource: dict[str, Any],
        *,
        if_match: int | None = None,
    ) -> Written:
        """Update the one match; with none create; several are a 412."""
        self.resources.serialize(criteria_key(resource_type, criteria))
        found = self.matching(resource_type, criteria)
        target, must_be_new = _conditional_target(resource_type, found, resource)
        if target is not None:
            return self.update(
                resource_type,
                target,
                {**resource, "id": target},
                if_match=if_match,
                must_be_new=must_be_new,
            )
        if if_match is not None:
            raise PreconditionFailed(f"If-Match names a version, but no {resource_type} matches")
        return self.create(resource_type, resource)

    def conditional_updates_by_identifier(
        self, updates: Sequence[IdentifierUpdate]
    ) -> list[Written] | None:
        """Conditional updates by one identifier each, as `conditional_update` would run them one
        after another, but matched in one query per type and written in one write.

        None, with nothing done but locks taken, when running them together could differ from
        running them in turn: two name the same identifier or end at the same resource, or one's
        body carries an identifier another's criteria name. Raises `UpdateFailed` for the first
        update, in order, that cannot be made. Types kept as records (Patient ...) are not
        taken here.
        """
        criteria = [(u.resource_type, u.identifier) for u in updates]
        if len(set(criteria)) != len(criteria) or any(
            key in criteria and key != own
            for own, update in zip(criteria, updates, strict=True)
            for key in _identifier_keys(update.resource_type, update.resource)
        ):
            return None
        for update in updates:
            if update.resource_type in RECORD_KINDS:
                raise ValueError(f"{update.resource_type} is record-backed")
            system, value = update.identifier
            self.resources.serialize(
                criteria_key(update.resource_type, [("identifier", f"{system}|{value}")])
            )
        matches: dict[tuple[str, tuple[str, str]], list[str]] = {}
        for resource_type in dict.fromkeys(u.resource_type for u in updates):
            pairs = [u.identifier for u in updates if u.resource_type == resource_type]
            for pair, ids in identifier_matches(self.connection, resource_type, pairs).items():
                matches[(resource_type, pair)] = ids
        planned: list[tuple[dict[str, Any], bool]] = []
        for position, update in enumerate(updates):
            found = matches.get((update.resource_type, update.identifier), [])
            try:
                target, must_be_new = _conditional_target(
                    update.resource_type, found, update.resource
                )
            except FhirError as error:
                raise UpdateFailed(position, error) from None
            resource_id = str(uuid.uuid4()) if target is None else target
            planned.append(({**update.resource, "id": resource_id}, must_be_new))
        keys = [(str(r["resourceType"]), str(r["id"])) for r, _ in planned]
        if len(set(keys)) != len(keys):
            return None
        for (_, must_be_new), key in zip(planned, keys, strict=True):
            if must_be_new:  # an id the client chose, which may not exist yet: as `lock` does
                self.resources.serialize(f"{key[0]}/{key[1]}")
        current = self.resources.lock_many(keys)
        for position, ((resource, must_be_new), key) in enumerate(zip(planned, keys, strict=True)):
            before = current.get(key)
            try:
                if must_be_new and before is not None and not before.deleted:
                    raise ResourceConflict(
                        f"{key[0]}/{key[1]} exists but does not match the criteria",
                        f"{key[0]}.id",
                    )
                if before is not None:
                    self._check_not_maintained(before)
                self._check_valid(resource)
            except FhirError as error:
                raise UpdateFailed(position, error) from None
        written = {
            w.key: w for w in self.resources.write([r for r, _ in planned], now=datetime.now(UTC))
        }
        outcomes = []
        for key in keys:
            before = current.get(key)
            # Nothing written: the content is the current version's, which `before` holds.
            stored = _stored(written[key]) if key in written else before
            assert stored is not None  # written, or current and unchanged
            outcomes.append(Written(stored, created=before is None or before.deleted))
        return outcomes

    # patch ----------------------------------------------------------------------------------

    def patch(
        self,
        resource_type: str,
        resource_id: str,
        operations: Any,
        *,
        if_match: int | None = None,
    ) -> Written:
        """Apply a patch to the current version and write the result as an update.

        `operations` is a JSON Patch (its list of operations) or a `FhirPathPatch`; either way
        the result is written exactly as an update with that version's If-Match would be.
        """
        apply: Callable[[dict[str, Any]], Any]
        if isinstance(operations, FhirPathPatch):
            apply = operations.apply
        elif isinstance(operations, list) and all(isinstance(o, dict) for o in operations):
            apply = lambda document: _apply_patch(document, operations)  # noqa: E731
        else:
            raise FhirError(400, "invalid", "a JSON Patch is an array of operation objects")
        for _attempt in range(5):
            current = self.resources.read(resource_type, resource_id)
            if current is None:
                raise ResourceNotFound(f"{resource_type}/{resource_id} is not known")
            if current.deleted:
                raise ResourceGone(resource_type, resource_id, current.version)
            if if_match is not None and not _matches(if_match, current):
                raise _stale(resource_type, resource_id, if_match, current.version)
            patched = apply(load_json(current.body))
            if not isinstance(patched, dict) or patched.get("resourceType") != resource_type:
                raise InvalidResource(
                    [_issue("processing", "the patch changes the resource's type", "resourceType")]
                )
            if patched.get("id") != resource_id:
                raise InvalidResource(
                    [_issue("processing", "the patch changes the id", f"{resource_type}.id")]
                )
            _check_depth_and_text(patched)
            resource = resource_body(patched, resource_type, resource_id)
            try:
                # The version the patch was applied to must still be current when written.
                return self.update(resource_type, resource_id, resource, if_match=current.version)
            except _Stale:
                if if_match is not None:
                    raise
                # Another writer got in between: apply the patch to the newer version.
        raise PreconditionFailed(f"{resource_type}/{resource_id} keeps changing; try again")

    # delete ---------------------------------------------------------------------------------

    def delete(
        self, resource_type: str, resource_id: str, *, if_match: int | None = None
    ) -> Deleted:
        """Delete (a new, empty version; history stays). Deleting what is not there is a no-op."""
        check_deletable(resource_type)
        before = self.resources.lock(resource_type, resource_id)
        _check_version(before, resource_type, resource_id, if_match)
        if before is None:
            return Deleted(resource_type, resource_id, None)
        if before.deleted:
            return Deleted(resource_type, resource_id, before.version)
        self._check_not_maintained(before)
        written = self.resources.delete([(resource_type, resource_id)], now=datetime.now(UTC))
        return Deleted(resource_type, resource_id, written[0].version)

    def conditional_delete(self, resource_type: str, criteria: Params) -> Deleted:
        """Delete the one match (none: nothing to do); several are a 412."""
        check_deletable(resource_type)
        self.resources.serialize(criteria_key(resource_type, criteria))
        found = self.matching(resource_type, criteria)
        if len(found) > 1:
            raise PreconditionFailed(
                f"the criteria match {len(found)} {resource_type} resources; this server deletes "
                "one at a time"
            )
        if not found:
            return Deleted(resource_type, None, None)
        return self.delete(resource_type, found[0])

    # matching -------------------------------------------------------------------------------

    def matching(self, resource_type: str, criteria: Params) -> list[str]:
        """Ids of the current resources the criteria match, by the facade's search engine."""
        return matching_ids(self.connection, resource_type, criteria, base=self.base)

    # stored as sent -------------------------------------------------------------------------

    def _write_as_sent(
        self,
        resource_type: str,
        resource: dict[str, Any],
        if_match: int | None,
        *,
        must_be_new: bool = False,
    ) -> Written:
        resource_id = str(resource["id"])
        before = self.resources.lock(resource_type, resource_id)
        _check_version(before, resource_type, resource_id, if_match)
        if must_be_new and before is not None and not before.deleted:
            raise ResourceConflict(
                f"{resource_type}/{resource_id} exists but does not match the criteria",
                f"{resource_type}.id",
            )
        if before is not None:
            self._check_not_maintained(before)
            if not before.deleted and _same_content(before, resource):
                return Written(before, created=False, changed=False)
        self._check_valid(resource)
        written = self.resources.write([resource], now=datetime.now(UTC))
        # Nothing written: the content is the current version's, which `before` holds.
        stored = _stored(written[0]) if written else before
        assert stored is not None  # written, or current and unchanged
        return Written(stored, created=before is None or before.deleted, changed=bool(written))

    def new_resource(
        self, resource_type: str, resource: dict[str, Any], resource_id: str
    ) -> dict[str, Any]:
        """A create's resource with `resource_id`, a new uuid, checked as a create checks it.

        For `create_new`: each resource of a batch of creates is checked before any is written.
        """
        if resource_type in RECORD_KINDS:
            raise ValueError(f"{resource_type} is record-backed: create it with `create`")
        resource = {**resource, "id": resource_id}
        self._check_valid(resource)
        return resource

    def create_new(self, resources: Sequence[dict[str, Any]]) -> list[Written]:
        """Store resources `new_resource` checked, in one write: 201 each.

        No lock is needed: the ids are new uuids, so no other writer can name them yet.
        """
        try:
            written = self.resources.write(resources, now=datetime.now(UTC), new=True)
        except IntegrityError:  # a uuid taken: never seen, but not a 500 either
            raise ResourceConflict("a new resource's id is taken") from None
        return [Written(_stored(w), created=True) for w in written]

    def _check_valid(self, resource: dict[str, Any]) -> None:
        data = dump_json(resource)  # once, for the structural check and the references
        issues = self.validator.issues(resource, data=data)
        if any(issue["severity"] in ("error", "fatal") for issue in issues):
            raise InvalidResource(issues)
        issues = _storability_issues(resource, data)
        if issues:
            raise InvalidResource(issues)

    def _check_not_maintained(self, stored: StoredResource) -> None:
        """A resource carrying the site's own business identifier is maintained from a record,
        and the Provenance of a record change is the service's own account of it."""
        if stored.resource_type in RECORD_KINDS:
            return
        own = self.context.identifier_system.rstrip("/") + "/"
        if stored.resource_type == "Provenance":
            kind = self._service_provenance_of(stored, own)
            if kind is not None:
                raise ResourceConflict(
                    f"Provenance/{stored.id} is the service's own record of a change to a clinic "
                    f"{kind} record; it is not changed or deleted through the facade",
                    "Provenance.entity",
                )
        for identifier in _identifiers(orjson.loads(stored.body)):
            system = identifier.get("system")
            if isinstance(system, str) and system.startswith(own):
                raise ResourceConflict(
                    f"{stored.resource_type}/{stored.id} is maintained from the clinic's "
                    f"{system.removeprefix(own)} records; change the record through the intake API",
                    f"{stored.resource_type}.identifier",
                )

    def _service_provenance_of(self, stored: StoredResource, own: str) -> str | None:
        """The record kind a Provenance the service wrote is of, or None for a client's.

        The service's Provenance of a record change names that record as its source entity
        (in the site's identifier system) and has the id derived from the record's kind,
        external id and version (`mappings.provenance`): a client's Provenance, created with a
        new uuid or an id of its choosing, does not have such an id.
        """
        if not stored.body:
            return None
        body = orjson.loads(stored.body)
        entities = body.get("entity") if isinstance(body, dict) else None
        for entity in entities if isinstance(entities, list) else []:
            what = entity.get("what") if isinstance(entity, dict) else None
            identifier = what.get("identifier") if isinstance(what, dict) else None
            if not isinstance(identifier, dict):
                continue
            system, value = identifier.get("system"), identifier.get("value")
            if not (isinstance(system, str) and system.startswith(own) and isinstance(value, str)):
                continue
            kind, external_id = system.removeprefix(own), value.split("/")[0]
            record = self.records.get(kind, external_id)
            if record is None:
                continue
            versions = range(1, record.version + 1)
            if any(
                resource_id("provenance", kind, external_id, str(version)) == stored.id
                for version in versions
            ):
                return kind
        return None

    # record-backed --------------------------------------------------------------------------

    def _write_record_backed(
        self,
        resource_type: str,
        resource: dict[str, Any],
        resource_id: str | None,
        if_match: int | None,
        *,
        must_be_new: bool = False,
    ) -> Written:
        kind = RECORD_KINDS[resource_type]
        self._check_valid(resource)
        current_key: tuple[str, str] | None = None
        if resource_id is not None:
            existing = self.resources.read(resource_type, resource_id)
            if existing is not None:
                current_key = self._record_key(kind, existing)
        # Record row first, resource row second: the order intake writes take them in.
        current = self.records.get(*current_key, for_update=True) if current_key else None
        record = self._to_record(resource_type, resource, load(current) if current else None)
        if current is None:
            current = self.records.get(kind, record.external_id, for_update=True)
            if current is not None:
                # The record the resource names exists: map again onto it (a CarePlan's dose,
                # for one, comes from the course as it is).
                record = self._to_record(resource_type, resource, load(current))
        target = derived_id(resource_type, record.external_id)
        if resource_id is not None and target != resource_id:
            raise FhirError(
                400,
                "invalid",
                f"this {resource_type} belongs to the clinic's {kind} {record.external_id}, whose "
                f"{resource_type} id is {target}, not {resource_id}",
                expression=f"{resource_type}.identifier",
            )
        before = self.resources.lock(resource_type, target)
        _check_version(before, resource_type, target, if_match)
        if must_be_new and before is not None and not before.deleted:
            raise ResourceConflict(
                f"{resource_type}/{target} exists but does not match the criteria",
                f"{resource_type}.id",
            )
        try:
            result = write_record(
                repository=self.records,
                record=record,
                lookup=repository_lookup(self.records),
                actor=ACTOR,
                request_id=self.request_id,
            )
            if result.outcome is not Outcome.unchanged:
                self.materializer.apply(
                    self.connection,
                    [RecordVersion(record, result.stored, result.previous)],
                    now=result.stored.updated_at,
                )
        except InvalidRecord as invalid:
            raise InvalidResource(_record_issues(resource_type, invalid.problems)) from None
        stored = self.resources.read(resource_type, target)
        if stored is None or stored.deleted:
            raise ResourceConflict(
                f"the clinic's {kind} {record.external_id} does not yield a {resource_type}"
            )
        return Written(
            stored,
            created=before is None or before.deleted,
            changed=before is None or before.deleted or before.version != stored.version,
        )

    def _record_key(self, kind: str, stored: StoredResource) -> tuple[str, str] | None:
        """The record a stored resource was materialized from, by its business identifier."""
        system = self.context.system(kind)
        for identifier in _identifiers(orjson.loads(stored.body)):
            value = identifier.get("value")
            if identifier.get("system") == system and isinstance(value, str) and value:
                return kind, value.split("/")[0]
        return None

    def _to_record(
        self, resource_type: str, resource: dict[str, Any], current: RecordModel | None
    ) -> RecordModel:
        """The record the resource says, through the reverse mapping; 422 for what it cannot."""
        context = self.context
        try:
            if resource_type == "Patient":
                return patient_from_fhir(
                    resource,
                    current=current if isinstance(current, Patient) else None,
                    context=context,
                )
            if resource_type == "Condition":
                return diagnosis_from_fhir(
                    resource,
                    current=current if isinstance(current, Diagnosis) else None,
                    patient=self._subject_patient(resource),
                    context=context,
                )
            return course_from_care_plan(
                resource,
                current=current if isinstance(current, TreatmentCourse) else None,
                context=context,
            )
        except UnsupportedContent as error:
            raise InvalidResource([_issue("not-supported", error.message, error.path)]) from None
        except (ValueError, TypeError) as error:
            raise InvalidResource(
                [
                    _issue(
                        "not-supported",
                        f"the clinic's records cannot hold it: {error}",
                        resource_type,
                    )
                ]
            ) from None

    def _subject_patient(self, resource: dict[str, Any]) -> str | None:
        """The external id of the patient a Condition's subject names, if it is one of ours."""
        subject = resource.get("subject")
        if not isinstance(subject, dict):
            return None
        identifier = subject.get("identifier")
        if isinstance(identifier, dict) and identifier.get("system") == self.context.system(
            "patient"
        ):
            value = identifier.get("value")
            return value if isinstance(value, str) else None
        reference = subject.get("reference")
        if not isinstance(reference, str):
            return None
        parts = reference.split("/_history/")[0].split("/")
        if len(parts) < 2 or parts[-2] != "Patient" or not _ID.fullmatch(parts[-1]):
            return None
        if len(parts) > 2 and "/".join(parts[:-2]) != self.base:
            return None  # another server's Patient
        stored = self.resources.read("Patient", parts[-1])
        if stored is None or stored.deleted:
            return None
        key = self._record_key("patient", stored)
        return key[1] if key else None


def run_write(
    *,
    services: Services,
    base: str,
    request_id: str | None,
    action: Callable[[FacadeWriter], T],
) -> T:
    """Run one write interaction in its own unit of work, committed when it succeeds."""
    with services.database.unit_of_work(write=True) as uow:
        writer = FacadeWriter(
            connection=uow.connection,
            validator=services.validator,
            materializer=services.materializer,
            base=base,
            request_id=request_id,
        )
        result = action(writer)
        audit_facade_writes(uow.connection, [result])  # with the change, in its transaction
        uow.commit()
    return result


@dataclass(frozen=True, slots=True)
class IdentifierUpdate:
    """A conditional update whose criteria are one identifier: `Type?identifier=system|value`."""

    resource_type: str
    identifier: tuple[str, str]
    resource: dict[str, Any]


class UpdateFailed(Exception):
    """One of several updates made together could not be made."""

    def __init__(self, position: int, error: FhirError) -> None:
        super().__init__(error.diagnostics)
        self.position = position
        self.error = error


def identifier_criteria(criteria: str) -> tuple[str, str] | None:
    """(system, value) of criteria that are one `identifier=system|value` and nothing else."""
    params = parse_qsl(criteria, keep_blank_values=True)
    if len(params) != 1 or params[0][0] != "identifier":
        return None
    system, bar, value = params[0][1].partition("|")
    if not bar or not system or not value or "," in params[0][1] or "\\" in params[0][1]:
        return None
    return system, value


def identifier_matches(
    connection: Connection, resource_type: str, identifiers: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], list[str]]:
    """The ids of the current resources of each identifier (system, value), in id order, two at
    most: what `matching_ids` finds for `identifier=system|value`, for many in one query."""
    found: dict[tuple[str, str], list[str]] = {}
    t = search_token
    # One statement per system (an EHR's feed has one or two): its values are looked up in the
    # lookup index, where SQLite would read every identifier row for a list of pairs.
    for system, values in grouped(sorted(set(identifiers))).items():
        for start in range(0, len(values), 500):
            query = (
                select(t.c.code, t.c.resource_id)
                .where(
                    t.c.resource_type == resource_type,
                    rows_answering(t, resource_type, "identifier"),
                    t.c.system == system,
                    t.c.code.in_(values[start : start + 500]),
                )
                .distinct()
                .order_by(t.c.code, t.c.resource_id)
            )
            for code, found_id in connection.execute(query):
                ids = found.setdefault((system, code), [])
                if len(ids) < 2:
                    ids.append(found_id)
    return found


def _identifier_keys(
    resource_type: str, resource: dict[str, Any]
) -> list[tuple[str, tuple[str, str]]]:
    return [
        (resource_type, (identifier["system"], identifier["value"]))
        for identifier in _identifiers(resource)
        if isinstance(identifier.get("system"), str) and isinstance(identifier.get("value"), str)
    ]


def _conditional_target(
    resource_type: str, found: list[str], resource: dict[str, Any]
) -> tuple[str | None, bool]:
    """Where a conditional update of `resource` goes, given the ids its criteria matched: the
    id to update (and whether it must be new: a client's id that matched nothing), or None for
    a create."""
    if len(found) > 1:
        raise PreconditionFailed(
            f"the criteria match {len(found)} {resource_type} resources: be more selective"
        )
    given = resource.get("id")
    if given is not None and (not isinstance(given, str) or not _ID.fullmatch(given)):
        raise FhirError(400, "invalid", "the body's id is not a FHIR id", f"{resource_type}.id")
    if found:
        if given is not None and given != found[0]:
            raise FhirError(
                400,
                "invalid",
                f"the criteria match {resource_type}/{found[0]}, but the body's id is {given}",
                expression=f"{resource_type}.id",
            )
        return found[0], False
    # No match, an id given: create it with that id, unless that id exists (and so did not
    # match the criteria).
    return (given, True) if given is not None else (None, False)


def _same_content(stored: StoredResource, resource: dict[str, Any]) -> bool:
    """Whether a resource a client sent is the stored version's content, whatever the order of
    its members: a resource read back and sent again (its id now second, its meta stripped of
    the version) is no new version. The store compares the JSON as written, in its order."""
    current = load_json(stored.body)  # its numbers as stored: 1.50 is not 1.5
    _drop_server_meta(current)
    sort = orjson.OPT_SORT_KEYS
    return dump_json(current, option=sort) == dump_json(resource, option=sort)


def _stored(written: WrittenResource) -> StoredResource:
    assert written.body is not None  # a write, not a deletion
    return StoredResource(
        written.resource_type,
        written.id,
        written.version,
        written.last_updated,
        written.deleted,
        written.body,
    )


def criteria_key(resource_type: str, criteria: Params) -> str:
    """The name conditional writes with the same criteria serialize on (order does not matter)."""
    return f"conditional:{resource_type}?{urlencode(sorted(criteria))}"


class _Stale(PreconditionFailed):
    """If-Match (or the version a patch was applied to) is no longer current."""


def _stale(resource_type: str, resource_id: str, expected: int, current: int | None) -> _Stale:
    now = "does not exist" if current is None else f"is at version {current}"
    if expected == ANY_VERSION:
        now = "does not exist" if current is None else f"was deleted at version {current}"
        return _Stale(
            f"{resource_type}/{resource_id}: If-Match * asked for a current version, {now}"
        )
    return _Stale(f"{resource_type}/{resource_id}: If-Match asked for version {expected}, it {now}")


def _matches(if_match: int, current: StoredResource | None) -> bool:
    """Whether If-Match holds: it names the current version, or is `*` and one is current."""
    if current is None:
        return False
    if if_match == ANY_VERSION:
        return not current.deleted
    return current.version == if_match


def _check_version(
    before: StoredResource | None, resource_type: str, resource_id: str, if_match: int | None
) -> None:
    if if_match is not None and not _matches(if_match, before):
        raise _stale(
            resource_type, resource_id, if_match, None if before is None else before.version
        )


_MISSING_IN = re.compile(r"( not found) in .*", re.DOTALL)


def _apply_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> Any:
    try:
        return jsonpatch.apply_patch(document, operations)
    except jsonpatch.InvalidJsonPatch as error:
        raise FhirError(400, "invalid", f"not a valid JSON Patch: {error}") from None
    except jsonpatch.JsonPatchTestFailed as error:
        # jsonpointer names a missing member with the whole object it looked in: the resource's
        # content, which is not the outcome's to repeat.
        why = _MISSING_IN.sub(r"\1", str(error))
        raise InvalidResource([_issue("processing", f"a test operation failed: {why}")]) from None
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as error:
        raise InvalidResource(
            [_issue("processing", f"the patch does not apply: {error}")]
        ) from None
    except (TypeError, ValueError, KeyError, IndexError) as error:
        raise InvalidResource(
            [_issue("processing", f"the patch does not apply: {error}")]
        ) from None


# --- FHIRPath Patch ---------------------------------------------------------------------------
#
# A Parameters resource of `operation`s (https://hl7.org/fhir/R4/fhirpatch.html). Paths are
# evaluated with fhirpathpy on the document as the operations before left it; what they select
# is found again in the JSON (a complex element by identity, a primitive by the element path
# fhirpathpy reports), so the operation changes that place and nothing else.

PATCH_OPERATIONS = ("add", "insert", "delete", "replace", "move")
_PATCH_PARTS: dict[str, frozenset[str]] = {
    "add": frozenset({"type", "path", "name", "value"}),
    "insert": frozenset({"type", "path", "value", "index"}),
    "delete": frozenset({"type", "path"}),
    "replace": frozenset({"type", "path", "value"}),
    "move": frozenset({"type", "path", "source", "destination"}),
}
"""The parts each operation type takes, all required."""
_R4_MODEL: dict[str, Any] = fhirpath_models["r4"]
_CHOICE_TYPES: dict[str, list[str]] = _R4_MODEL["choiceTypePaths"]
_PATH_TYPES: dict[str, str | None] = _R4_MODEL["path2Type"]
_DEFINED_ELSEWHERE: dict[str, str] = _R4_MODEL["pathsDefinedElsewhere"]
_STEP = re.compile(r"(?P<key>[A-Za-z0-9]+)(?:\[(?P<index>\d+)\])?")
_NOT_A_TYPE = ("BackboneElement", "Element", "Resource")
_EXTENSION_CALL = re.compile(r"\bextension\(\s*('(?:[^'\\]|\\.)*')\s*\)")
"""`extension('url')`, which fhirpathpy answers with values it cannot say the place of; it is
`extension.where(url = 'url')`, whose values it can."""


@dataclass(frozen=True, slots=True)
class PatchValue:
    """An operation's value: the JSON of its `value[x]` (with the datatype the x names), or a
    complex value its `part`s build (no datatype)."""

    data: Any
    datatype: str | None

    def fresh(self) -> Any:
        """The value to put in a document: its own copy, which later operations may change."""
        return copy.deepcopy(self.data)


@dataclass(frozen=True, slots=True)
class PatchOperation:
    """One `operation` parameter of a FHIRPath Patch, as parsed."""

    index: int
    type: str
    path: str
    name: str | None = None
    value: PatchValue | None = None
    position: int | None = None
    source: int | None = None
    destination: int | None = None

    @property
    def label(self) -> str:
        return f"operation {self.index} ({self.type} {self.path})"

    def refused(self, diagnostics: str) -> InvalidResource:
        """422: the operation does not apply to this resource."""
        return InvalidResource(
            [
                _issue(
                    "processing",
                    f"{self.label}: {diagnostics}",
                    f"Parameters.parameter[{self.index}]",
                )
            ]
        )


@dataclass(frozen=True, slots=True)
class FhirPathPatch:
    """A FHIRPath Patch: its operations, applied in order."""

    operations: tuple[PatchOperation, ...]

    def apply(self, document: dict[str, Any]) -> dict[str, Any]:
        """`document` with every operation applied (changed in place); 422 for one that
        does not apply."""
        for operation in self.operations:
            _apply_operation(document, operation)
        return document


def parse_fhirpath_patch(data: Any) -> FhirPathPatch:
    """The operations of a FHIRPath Patch Parameters resource; 400 for what is malformed."""
    if not isinstance(data, dict) or data.get("resourceType") != "Parameters":
        raise FhirError(
            400, "invalid", "a FHIRPath Patch (application/fhir+json) is a Parameters resource"
        )
    parameters = data.get("parameter", [])
    if not isinstance(parameters, list):
        raise FhirError(400, "invalid", "Parameters.parameter is a list", "Parameters.parameter")
    return FhirPathPatch(
        tuple(_parse_operation(index, item) for index, item in enumerate(parameters))
    )


def _parse_operation(index: int, parameter: Any) -> PatchOperation:
    where = f"Parameters.parameter[{index}]"

    def malformed(diagnostics: str) -> FhirError:
        return FhirError(400, "invalid", f"operation {index}: {diagnostics}", where)

    if not isinstance(parameter, dict) or parameter.get("name") != "operation":
        raise malformed("each parameter of a FHIRPath Patch is named operation")
    parts: dict[str, dict[str, Any]] = {}
    for part in parameter.get("part") or []:
        name = part.get("name") if isinstance(part, dict) else None
        if not isinstance(name, str):
            raise malformed("each part has a name")
        if name in parts:
            raise malformed(f"the part {name} is given twice")
        parts[name] = part
    kind = parts.get("type", {}).get("valueCode")
    if kind not in PATCH_OPERATIONS:
        raise malformed(f"the type part is a valueCode, one of {' | '.join(PATCH_OPERATIONS)}")
    wanted = _PATCH_PARTS[kind]
    missing = sorted(wanted - parts.keys())
    if missing:
        raise malformed(f"{kind} needs the part {', '.join(missing)}")
    extra = sorted(parts.keys() - wanted)
    if extra:
        raise malformed(f"{kind} takes no part {', '.join(extra)}")
    path = parts["path"].get("valueString")
    if not isinstance(path, str) or not path.strip():
        raise malformed("the path part is a valueString holding a FHIRPath expression")
    if "resolve(" in path.replace(" ", ""):
        raise malformed("the path may not resolve() references: a patch changes one resource")

    def string(name: str) -> str | None:
        if name not in parts:
            return None
        value = parts[name].get("valueString")
        if not isinstance(value, str) or not value:
            raise malformed(f"the {name} part is a valueString")
        return value

    def integer(name: str) -> int | None:
        if name not in parts:
            return None
        value = parts[name].get("valueInteger")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise malformed(f"the {name} part is a valueInteger of 0 or more")
        return value

    name = string("name")
    if name is not None and not re.fullmatch(r"[a-z][A-Za-z0-9]*", name):
        raise malformed(f"{name!r} is not an element name")
    return PatchOperation(
        index=index,
        type=kind,
        path=path,
        name=name,
        value=_patch_value(parts["value"], malformed) if "value" in parts else None,
        position=integer("index"),
        source=integer("source"),
        destination=integer("destination"),
    )


def _patch_value(part: dict[str, Any], malformed: Callable[[str], FhirError]) -> PatchValue:
    """A part's value: its one `value[x]`, its `resource`, or the complex value of its parts."""
    typed = [key for key in part if key.startswith("value") and key[5:6].isupper()]
    given = len(typed) + ("resource" in part) + ("part" in part)
    if given != 1:
        raise malformed(
            f"the part {part.get('name')} has one value[x], or a resource, or parts that make "
            "a complex value"
        )
    if typed:
        return PatchValue(part[typed[0]], typed[0][5:])
    if "resource" in part:
        return PatchValue(part["resource"], None)
    parts = part["part"]
    if not isinstance(parts, list) or not parts:
        raise malformed(f"the parts of {part.get('name')} are a list of named parts")
    value: dict[str, Any] = {}
    for child in parts:
        name = child.get("name") if isinstance(child, dict) else None
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][A-Za-z0-9]*", name):
            raise malformed(f"a part of {part.get('name')} has no element name")
        data = _patch_value(child, malformed).data
        if name in value:
            # A name given again is a repeating element: its values in order.
            previous = value[name]
            value[name] = [*previous, data] if isinstance(previous, list) else [previous, data]
        else:
            value[name] = data
    return PatchValue(value, None)


# where an operation acts -------------------------------------------------------------------------

Step = tuple[str, int | None]
"""One step from a resource's root: an element's JSON key and, in a list, the item's index."""


@dataclass(frozen=True, slots=True)
class _Place:
    """An element of the document: the object holding it, its key, its index in a list."""

    parent: dict[str, Any]
    key: str
    index: int | None
    steps: tuple[Step, ...]

    @property
    def value(self) -> Any:
        held = self.parent[self.key]
        return held if self.index is None else held[self.index]


_ROOT = "the resource itself"


def _select(document: dict[str, Any], operation: PatchOperation) -> list[_Place | str]:
    """The distinct elements the operation's path selects (`_ROOT` for the resource)."""
    try:
        found = fhirpathpy.evaluate(
            document,
            _EXTENSION_CALL.sub(r"extension.where(url = \1)", operation.path),
            {"resource": document, "rootResource": document},
            _R4_MODEL,
            {"returnRawData": True},
        )
    except Exception:  # fhirpathpy raises plain Exceptions for what it cannot parse or run
        raise FhirError(
            400,
            "invalid",
            f"operation {operation.index}: {operation.path!r} is not a FHIRPath expression "
            "this server can evaluate",
            f"Parameters.parameter[{operation.index}]",
        ) from None
    places: dict[tuple[int, str, int | None], _Place | str] = {}
    objects = _objects(document)
    for node in found:
        data = node.data if isinstance(node, ResourceNode) else node
        if data is None:
            continue  # a placeholder of a primitive list's extensions (`_given: [null, {...}]`)
        place = _locate(document, objects, node)
        if place is None:
            raise operation.refused(
                "the path selects a value that is not an element of the resource"
            )
        key = (
            (0, "", None) if isinstance(place, str) else (id(place.parent), place.key, place.index)
        )
        places[key] = place
    return list(places.values())


def _objects(document: dict[str, Any]) -> dict[int, _Place | str]:
    """Where every object of the document is, by its identity."""
    out: dict[int, _Place | str] = {id(document): _ROOT}
    stack: list[tuple[dict[str, Any], tuple[Step, ...]]] = [(document, ())]
    while stack:
        parent, steps = stack.pop()
        for key, value in parent.items():
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for index, item in items:
                if isinstance(item, dict):
                    at = (*steps, (key, index))
                    out[id(item)] = _Place(parent, key, index, at)
                    stack.append((item, at))
    return out


def _locate(
    document: dict[str, Any], objects: dict[int, _Place | str], node: Any
) -> _Place | str | None:
    """The element a node fhirpathpy returned is, or None when it is no element of ours."""
    data = node.data if isinstance(node, ResourceNode) else node  # `%resource` is bare
    if isinstance(data, dict):
        place = objects.get(id(data))
        if isinstance(place, _Place) and place.key.startswith("_"):
            # A primitive's id and extensions: the element is the primitive they belong to.
            steps = (*place.steps[:-1], (place.key[1:], place.index))
            return _Place(place.parent, place.key[1:], place.index, steps)
        return place
    if not isinstance(node, ResourceNode):
        return None  # a literal or a computed value
    return _locate_primitive(document, node)


def _locate_primitive(document: dict[str, Any], node: ResourceNode) -> _Place | None:
    """A primitive, found again by the element path fhirpathpy built on its way down."""
    data = node.data
    if not isinstance(node.propName, str):
        return None
    names = node.propName.split(".")
    if names[0] != document.get("resourceType"):
        return None
    current: Any = document
    steps: list[Step] = []
    place: _Place | None = None
    for name in names[1:]:
        match = _STEP.fullmatch(name)
        if match is None or not isinstance(current, dict):
            return None
        key = _json_key(current, match["key"])
        if key is None:
            return None
        index = None if match["index"] is None else int(match["index"])
        held = current[key]
        if (index is None) == isinstance(held, list):
            return None
        if index is not None and index >= len(held):
            return None
        steps.append((key, index))
        place = _Place(current, key, index, tuple(steps))
        current = place.value
    if place is None or current != data or type(current) is not type(data):
        return None
    return place


def _json_key(parent: dict[str, Any], name: str) -> str | None:
    """The key an element name has in an object: itself, or a choice element's `name[Type]`."""
    if name in parent:
        return name
    choices = [
        key for key in parent if key.startswith(name) and key[len(name) : len(name) + 1].isupper()
    ]
    return choices[0] if len(choices) == 1 else None


def _type_path(document: dict[str, Any], steps: Sequence[Step]) -> str:
    """The definition path of the element at `steps` (`Observation.component`, `HumanName`),
    as the FHIRPath model of R4 names it."""
    current = str(document.get("resourceType"))
    value: Any = document
    for key, index in steps:
        value = value[key] if index is None else value[key][index]
        if isinstance(value, dict) and isinstance(value.get("resourceType"), str):
            current = value["resourceType"]  # a contained resource
            continue
        base = _choice_base(current, key)
        path = f"{current}.{base or key}"
        path = _DEFINED_ELSEWHERE.get(path, path)
        declared = _PATH_TYPES.get(f"{current}.{key}") or _PATH_TYPES.get(path)
        plain_type = (
            declared is not None
            and declared[:1].isupper()
            and "." not in declared
            and declared not in _NOT_A_TYPE
        )
        current = declared if plain_type and declared is not None else path
    return current


def _choice_base(type_path: str, key: str) -> str | None:
    """The name of the choice element a key is one type of (`value` for `valueQuantity`)."""
    for cut in range(1, len(key)):
        if key[cut].isupper() and key[cut:] in _CHOICE_TYPES.get(f"{type_path}.{key[:cut]}", ()):
            return key[:cut]
    return None


def _fhirkit_path(document: dict[str, Any], steps: Sequence[Step]) -> str:
    return str(document.get("resourceType")) + "".join(
        f".{key}" if index is None else f".{key}[{index}]" for key, index in steps
    )


# applying one operation --------------------------------------------------------------------------


def _apply_operation(document: dict[str, Any], operation: PatchOperation) -> None:
    places = _select(document, operation)
    if operation.type == "delete":
        if places:  # deleting what is not there changes nothing
            _remove(_one(places, operation), operation)
        return
    if not places:
        raise operation.refused("the path selects nothing")
    if operation.type == "add":
        _add(document, _one(places, operation), operation)
    elif operation.type == "replace":
        _replace(document, _one(places, operation), operation)
    elif operation.type == "insert":
        _insert(document, places, operation)
    else:
        _move(places, operation)


def _add(document: dict[str, Any], target: _Place | str, operation: PatchOperation) -> None:
    """`name` added to the element the path selects: appended to its list, or a new value."""
    value, name = operation.value, operation.name
    assert value is not None
    assert name is not None
    container = document if isinstance(target, str) else target.value
    steps: tuple[Step, ...] = () if isinstance(target, str) else target.steps
    if not isinstance(container, dict):
        raise operation.refused("the path selects a primitive, which has no elements to add to")
    key = _typed_key(document, steps, name, value, operation, existing=False)
    held = container.get(key)
    if isinstance(held, list):
        _list_insert(container, key, len(held), value.fresh())
        _expect_arrays(document, (*steps, (key, len(held) - 1)))
        return
    type_path = _type_path(document, steps)
    element = _choice_base(type_path, key) or key  # `value` for valueQuantity: one of them only
    if any(k == key or _choice_base(type_path, k) == element for k in container):
        raise operation.refused(
            f"{element} is already there: add appends to a list, replace changes a value"
        )
    container[key] = value.fresh()
    _expect_arrays(document, (*steps, (key, None)))


def _replace(document: dict[str, Any], target: _Place | str, operation: PatchOperation) -> None:
    """The element the path selects, replaced by the value (a choice element may change type)."""
    value = operation.value
    assert value is not None
    if isinstance(target, str):
        raise operation.refused("the resource itself is replaced with an update (PUT)")
    parent, index = target.parent, target.index
    key = _typed_key(document, target.steps[:-1], target.key, value, operation, existing=True)
    if index is None:
        parent.pop(target.key)
        parent.pop(f"_{target.key}", None)  # the element is replaced, its extensions with it
        parent[key] = value.fresh()
    else:
        parent[key][index] = value.fresh()
        extras = _companion(parent, key)
        if isinstance(extras, list) and index < len(extras):
            extras[index] = None
        _tidy(parent, key)
    _expect_arrays(document, (*target.steps[:-1], (key, index)))


def _insert(
    document: dict[str, Any], places: list[_Place | str], operation: PatchOperation
) -> None:
    """The value inserted into the list the path selects, at `index`."""
    value, position = operation.value, operation.position
    assert value is not None
    assert position is not None
    parent, key, steps = _one_list(places, operation)
    if position > len(parent[key]):
        raise operation.refused(f"index {position} is past the end of a list of {len(parent[key])}")
    _list_insert(parent, key, position, value.fresh())
    _expect_arrays(document, (*steps, (key, position)))


def _move(places: list[_Place | str], operation: PatchOperation) -> None:
    """The item at `source` of the list the path selects, moved to `destination`."""
    source, destination = operation.source, operation.destination
    assert source is not None
    assert destination is not None
    parent, key, _steps = _one_list(places, operation)
    length = len(parent[key])
    for name, position in (("source", source), ("destination", destination)):
        if position >= length:
            raise operation.refused(f"{name} {position} is not in a list of {length}")
    items = parent[key]
    items.insert(destination, items.pop(source))
    extras = _companion(parent, key)
    if isinstance(extras, list):
        extras.extend([None] * (length - len(extras)))
        extras.insert(destination, extras.pop(source))
    _tidy(parent, key)


def _one(places: list[_Place | str], operation: PatchOperation) -> _Place | str:
    if len(places) > 1:
        raise operation.refused(
            f"the path selects {len(places)} elements; {operation.type} acts on exactly one"
        )
    return places[0]


def _one_list(
    places: list[_Place | str], operation: PatchOperation
) -> tuple[dict[str, Any], str, tuple[Step, ...]]:
    """The list the items a path selects are in (an insert's or a move's path), with the steps
    to the object holding it."""
    first = places[0]
    if not isinstance(first, _Place) or first.index is None:
        raise operation.refused("the path selects no list")
    for place in places:
        if not (
            isinstance(place, _Place) and (place.parent, place.key) == (first.parent, first.key)
        ):
            raise operation.refused("the path selects items of more than one list")
    return first.parent, first.key, first.steps[:-1]


def _typed_key(
    document: dict[str, Any],
    parent_steps: Sequence[Step],
    key: str,
    value: PatchValue,
    operation: PatchOperation,
    *,
    existing: bool,
) -> str:
    """The JSON key the value goes under: a choice element's carries the value's datatype."""
    type_path = _type_path(document, parent_steps)
    name = _choice_base(type_path, key) if existing else key
    if name is None:
        return key
    choices = _CHOICE_TYPES.get(f"{type_path}.{name}")
    if choices is None:
        return key
    if value.datatype is None:
        if existing:
            return key  # a complex value in the type the element has now
        raise operation.refused(f"{name} is a choice of types: give the value as value[x]")
    if value.datatype not in choices:
        raise operation.refused(f"{name} cannot be of type {value.datatype}")
    return name + value.datatype


def _companion(parent: dict[str, Any], key: str) -> Any:
    """The `_key` a primitive's id and extensions are kept under, if any."""
    return parent.get(f"_{key}")


def _remove(place: _Place | str, operation: PatchOperation) -> None:
    if isinstance(place, str):
        raise operation.refused("the resource itself is deleted with a DELETE")
    parent, key, index = place.parent, place.key, place.index
    if index is None:
        parent.pop(key)
        parent.pop(f"_{key}", None)
        return
    parent[key].pop(index)
    extras = _companion(parent, key)
    if isinstance(extras, list) and index < len(extras):
        extras.pop(index)
    _tidy(parent, key)


def _list_insert(parent: dict[str, Any], key: str, index: int, data: Any) -> None:
    parent[key].insert(index, data)
    extras = _companion(parent, key)
    if isinstance(extras, list):
        extras.insert(min(index, len(extras)), None)
    _tidy(parent, key)


def _tidy(parent: dict[str, Any], key: str) -> None:
    """No empty list, and no list of extensions left that holds none."""
    extras = _companion(parent, key)
    if isinstance(extras, list) and all(item is None for item in extras):
        parent.pop(f"_{key}")
    if parent.get(key) == []:
        parent.pop(key)
        parent.pop(f"_{key}", None)


def _expect_arrays(document: dict[str, Any], steps: Sequence[Step]) -> None:
    """Make lists of what the patch put at `steps` where R4 has a repeating element.

    A FHIRPath Patch value does not say whether an element repeats (an added `name`, a
    `coding` built from parts): fhirkit, which knows R4's cardinalities, does.
    """
    where = _fhirkit_path(document, steps)
    for _round in range(MAX_DEPTH):
        paths = sorted(
            {
                issue.path
                for issue in fhirkit.validate(dump_json(document))
                if issue.message.startswith("expected an array")
                and (issue.path == where or issue.path.startswith((f"{where}.", f"{where}[")))
            },
            key=len,
            reverse=True,  # the deepest first: wrapping one leaves the paths above it as they are
        )
        wrapped = [_wrap(document, path) for path in paths]
        if not any(wrapped):
            return


def _wrap(document: dict[str, Any], path: str) -> bool:
    """Put the single value at a fhirkit path into a list; False when there is none."""
    current: Any = document
    names = path.split(".")[1:]
    for position, name in enumerate(names):
        match = _STEP.fullmatch(name)
        if match is None or not isinstance(current, dict) or match["key"] not in current:
            return False
        if position == len(names) - 1 and match["index"] is None:
            current[match["key"]] = [current[match["key"]]]
            extras = _companion(current, match["key"])
            if isinstance(extras, dict):
                current[f"_{match['key']}"] = [extras]
            return True
        current = current[match["key"]]
        if match["index"] is not None:
            if not isinstance(current, list) or int(match["index"]) >= len(current):
                return False
            current = current[int(match["index"])]
    return False


_RELATIVE = re.compile(r"(?P<type>[A-Z][A-Za-z]+)/(?P<id>[^/]*)(?:/_history/[^/]*)?")


def _storability_issues(
    resource: dict[str, Any], data: bytes | None = None
) -> list[dict[str, Any]]:
    """What a structurally valid resource holds that the store cannot keep (`data`: its JSON
    as orjson wrote it, when the caller has it).

    Long values are kept: the search index holds their first characters (see
    `service.fhir.search_index.MAX_TEXT`).
    """
    if not _has_bad_reference(resource, data):
        return []  # the common case, found without building every element's path
    resource_type = str(resource["resourceType"])
    issues = []
    # A relative reference names a resource by its id: one that cannot be an id is no reference.
    stack: list[tuple[Any, str]] = [(resource, resource_type)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            reference = value.get("reference")
            if isinstance(reference, str):
                match = _RELATIVE.fullmatch(reference)
                if match is not None and not _ID.fullmatch(match["id"]):
                    issues.append(
                        _issue("value", "the reference's id is not a FHIR id", f"{path}.reference")
                    )
            stack.extend((item, f"{path}.{key}") for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{index}]") for index, item in enumerate(value))
    return issues


# Reference values found in the compact JSON (orjson writes no whitespace) by a regex over its
# bytes, not by a walk through every element: this runs on every write. `"reference":"` with
# unescaped quotes can only be a key and the start of its string value, at any depth.
_REFERENCE_VALUE = re.compile(rb'"reference":"([^"\\]*(?:\\.[^"\\]*)*)"')
_GOOD_RELATIVE = re.compile(rb"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(?:/_history/[^/\\]*)?")
"""A relative reference with a FHIR id, as its bytes: what almost every reference is."""


def _has_bad_reference(resource: dict[str, Any], data: bytes | None = None) -> bool:
    """Whether a relative reference anywhere in the resource has an id that is not a FHIR id.

    `data`: the resource as orjson wrote it, when the caller has it.
    """
    for raw in _REFERENCE_VALUE.findall(dump_json(resource) if data is None else data):
        if _GOOD_RELATIVE.fullmatch(raw):
            continue
        reference = orjson.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode()
        found = _RELATIVE.fullmatch(reference)
        if found is not None and not _ID.fullmatch(found["id"]):
            return True
    return False


def _identifiers(resource: Any) -> list[dict[str, Any]]:
    value = resource.get("identifier") if isinstance(resource, dict) else None
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, dict)]


def derived_id(resource_type: str, external_id: str) -> str:
    """The id the resource of a record has (the materializer's, so both always agree)."""
    if resource_type == "CarePlan":
        return resource_id("course", external_id, "CarePlan")
    return resource_id(RECORD_KINDS[resource_type], external_id)


def _issue(code: str, diagnostics: str, expression: str | None = None) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": diagnostics}
    if expression is not None:
        issue["expression"] = [expression]
    return issue


def _record_issues(resource_type: str, problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """A record's rule violations as issues, each at the resource element the field came from."""
    paths = _FIELD_PATHS.get(resource_type, {})
    issues = []
    for problem in problems:
        head = str(problem.loc[0]) if problem.loc else ""
        code = "invariant" if problem.type == "fhir_invalid" else "business-rule"
        issues.append(_issue(code, problem.message, paths.get(head, resource_type)))
    return issues or [_issue("business-rule", "the record was refused", resource_type)]


# --- HTTP -----------------------------------------------------------------------------------------


class _OutcomeRoute(APIRoute):
    """Answers a refused resource with the OperationOutcome of all its issues (the app's
    handler shows one)."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                response: Response = await handler(request)
            except InvalidResource as error:
                return Response(
                    orjson.dumps(error.outcome()), status_code=error.status, media_type=FHIR_JSON
                )
            return response

        return guarded


async def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(_services)]
IfMatch = Annotated[str | None, Header(alias="If-Match")]
IfNoneExist = Annotated[str | None, Header(alias="If-None-Exist")]
Prefer = Annotated[str | None, Header(alias="Prefer")]

_RETURN = re.compile(r'return\s*=\s*"?(minimal|representation|OperationOutcome)"?', re.IGNORECASE)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _return_preference(prefer: str | None) -> str:
    match = _RETURN.search(prefer or "")
    return "representation" if match is None else match.group(1).lower()


def _written_response(request: Request, result: Written, prefer: str | None) -> Response:
    stored = result.stored
    version_url = f"{stored.resource_type}/{stored.id}/_history/{stored.version}"
    headers = {
        "ETag": f'W/"{stored.version}"',
        "Last-Modified": format_datetime(stored.last_updated, usegmt=True),
        "Location": f"{_base(request)}/{version_url}",
    }
    status = 201 if result.created else 200
    preference = _return_preference(prefer)
    if preference == "minimal":
        return Response(status_code=status, headers=headers)
    if preference == "operationoutcome":
        what = (
            "created"
            if result.created
            else ("updated" if result.changed else "unchanged: it is the current version")
        )
        body = {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "information",
                    "code": "informational",
                    "diagnostics": f"{version_url} {what}",
                }
            ],
        }
        return Response(
            orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers
        )
    return Response(stored.body, status_code=status, media_type=FHIR_JSON, headers=headers)


def _deleted_response(result: Deleted, prefer: str | None) -> Response:
    headers = {} if result.version is None else {"ETag": f'W/"{result.version}"'}
    if _return_preference(prefer) == "operationoutcome":
        what = (
            "nothing to delete"
            if result.id is None
            else f"{result.resource_type}/{result.id} deleted"
        )
        body = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational", "diagnostics": what}],
        }
        return Response(orjson.dumps(body), media_type=FHIR_JSON, headers=headers)
    return Response(status_code=204, headers=headers)


async def _run(request: Request, services: Services, action: Callable[[FacadeWriter], T]) -> T:
    request_id = getattr(request.state, "request_id", None)
    return await run_in_threadpool(
        lambda: run_write(
            services=services,
            base=_base(request),
            request_id=None if request_id is None else str(request_id),
            action=action,
        )
    )


async def _resource_of(
    request: Request, resource_type: str, resource_id: str | None
) -> dict[str, Any]:
    check_media_type(request.headers.get("content-type"))
    return resource_body(parse_json(await request.body()), resource_type, resource_id)


def _query_criteria(request: Request, resource_type: str) -> Params:
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "_format"]
    if not params:
        raise FhirError(400, "invalid", "a conditional interaction needs search criteria")
    return parse_criteria(resource_type, urlencode(params))


def build_write_router() -> APIRouter:
    router = APIRouter(
        prefix="/fhir",
        tags=["fhir"],
        dependencies=[Depends(negotiate)],
        route_class=_OutcomeRoute,
    )

    @router.post("/{resource_type}", summary="Create (If-None-Exist: conditional create)")
    async def create(
        request: Request,
        resource_type: str,
        services: ServicesDep,
        if_none_exist: IfNoneExist = None,
        prefer: Prefer = None,
    ) -> Response:
        check_writable(resource_type)
        resource = await _resource_of(request, resource_type, None)
        criteria = None if if_none_exist is None else parse_criteria(resource_type, if_none_exist)
        result = await _run(
            request, services, lambda w: w.create(resource_type, resource, if_none_exist=criteria)
        )
        return _written_response(request, result, prefer)

    @router.put("/{resource_type}/{resource_id}", summary="Update (or create with this id)")
    async def update(
        request: Request,
        resource_type: str,
        resource_id: str,
        services: ServicesDep,
        if_match: IfMatch = None,
        prefer: Prefer = None,
    ) -> Response:
        check_writable(resource_type)
        check_id(resource_id)
        version = parse_if_match(if_match)
        resource = await _resource_of(request, resource_type, resource_id)
        result = await _run(
            request,
            services,
            lambda w: w.update(resource_type, resource_id, resource, if_match=version),
        )
        return _written_response(request, result, prefer)

    @router.put("/{resource_type}", summary="Conditional update")
    async def conditional_update(
        request: Request,
        resource_type: str,
        services: ServicesDep,
        if_match: IfMatch = None,
        prefer: Prefer = None,
    ) -> Response:
        check_writable(resource_type)
        version = parse_if_match(if_match)
        criteria = _query_criteria(request, resource_type)
        check_media_type(request.headers.get("content-type"))
        data = parse_json(await request.body())
        given = data.get("id") if isinstance(data, dict) else None
        resource = resource_body(data, resource_type, given if isinstance(given, str) else None)
        result = await _run(
            request,
            services,
            lambda w: w.conditional_update(resource_type, criteria, resource, if_match=version),
        )
        return _written_response(request, result, prefer)

    @router.patch("/{resource_type}/{resource_id}", summary="JSON Patch or FHIRPath Patch")
    async def patch(
        request: Request,
        resource_type: str,
        resource_id: str,
        services: ServicesDep,
        if_match: IfMatch = None,
        prefer: Prefer = None,
    ) -> Response:
        check_writable(resource_type)
        check_id(resource_id)
        version = parse_if_match(if_match)
        content_type = request.headers.get("content-type")
        check_patch_media_type(content_type)
        operations = parse_patch(content_type, parse_json(await request.body()))
        result = await _run(
            request,
            services,
            lambda w: w.patch(resource_type, resource_id, operations, if_match=version),
        )
        return _written_response(request, result, prefer)

    @router.delete("/{resource_type}/{resource_id}", summary="Delete (history stays)")
    async def delete(
        request: Request,
        resource_type: str,
        resource_id: str,
        services: ServicesDep,
        if_match: IfMatch = None,
        prefer: Prefer = None,
    ) -> Response:
        check_deletable(resource_type)
        check_id(resource_id)
        version = parse_if_match(if_match)
        result = await _run(
            request, services, lambda w: w.delete(resource_type, resource_id, if_match=version)
        )
        return _deleted_response(result, prefer)

    @router.delete("/{resource_type}", summary="Conditional delete (one match)")
    async def conditional_delete(
        request: Request, resource_type: str, services: ServicesDep, prefer: Prefer = None
    ) -> Response:
        check_deletable(resource_type)
        criteria = _query_criteria(request, resource_type)
        result = await _run(
            request, services, lambda w: w.conditional_delete(resource_type, criteria)
        )
        return _deleted_response(result, prefer)

    return router
