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
Organization) cannot be written or deleted through the facade: its record owns it.

Every write runs in one unit of work. Version checks (`If-Match`) happen inside it, with the
resource locked, and conditional creates and updates are serialized per criteria (an advisory lock
on PostgreSQL, BEGIN IMMEDIATE on SQLite) before they search, so concurrent requests cannot slip
between the check and the write or create duplicates.

This module must not search by itself (`service.fhir.search.matching_ids` does), must not commit
part of a write, and must not change what the read side serves: reads stay on the stored bytes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import jsonpatch
import jsonpointer
import orjson
from fastapi import APIRouter, Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from sqlalchemy import Connection
from starlette.responses import Response

from mappings.care_plan import course_from_care_plan
from mappings.condition import diagnosis_from_fhir
from mappings.context import MappingContext, resource_id
from mappings.patient import patient_from_fhir
from mappings.unsupported import UnsupportedContent
from service.bootstrap import Services
from service.errors import InvalidRecord, Problem
from service.fhir.api import CONFORMANCE_TYPES, STORED_TYPES, negotiate
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
from service.fhir.search import matching_ids
from service.fhir.validation import ResourceValidator
from service.records.materialize import Materializer
from service.records.models import Diagnosis, Patient, RecordModel, TreatmentCourse
from service.records.repository import RecordRepository, RecordVersion
from service.records.service import Outcome, load, repository_lookup, write_record
from service.security.audit import audit_facade_writes
from service.store.resources import ResourceRepository, StoredResource, WrittenResource

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
    """A write's result: the resource as now stored, and whether the write brought it into being."""

    stored: StoredResource
    created: bool


@dataclass(frozen=True, slots=True)
class Deleted:
    """A delete's result: the deletion's version, or None when there was nothing to delete."""

    resource_type: str
    id: str | None
    version: int | None


# --- checks on what a client sent ---------------------------------------------------------------


def check_writable(resource_type: str) -> None:
    """404 for a type the facade does not know, 405 for the read-only conformance types."""
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


def parse_if_match(value: str | None) -> int | None:
    """The version an If-Match header names: `W/"3"`, `"3"` or `3`."""
    if value is None:
        return None
    version = value.strip().removeprefix("W/").strip('"')
    if not version.isdigit() or len(version) > 9:
        raise FhirError(400, "invalid", f'If-Match {value!r} is not a version ETag like W/"3"')
    return int(version)


def parse_criteria(resource_type: str, query: str) -> Params:
    """Search parameters of a conditional interaction (an If-None-Exist header or a query)."""
    text = query.strip()
    text = text.removeprefix(f"{resource_type}?").removeprefix("?")
    params = [(name, value) for name, value in parse_qsl(text, keep_blank_values=True)]
    if not params:
        raise FhirError(400, "invalid", "a conditional interaction needs search criteria")
    return params


def check_media_type(content_type: str | None, *, patch: bool = False) -> None:
    """A resource body is FHIR JSON (or plain JSON); a PATCH body is a JSON Patch."""
    media = (content_type or "").split(";")[0].strip().lower()
    if patch:
        if media != "application/json-patch+json":
            raise UnsupportedMediaType(
                f"PATCH takes a JSON Patch (application/json-patch+json), not {media or 'nothing'}"
            )
        return
    if media and media not in (
        "application/fhir+json",
        "application/json",
        "application/json+fhir",
    ):
        raise UnsupportedMediaType(f"send application/fhir+json, not {media}")


def parse_json(raw: bytes) -> Any:
    """The decoded body: 400 for what is not JSON, too deep, or holds a NUL character."""
    if not raw.strip():
        raise FhirError(400, "invalid", "the request has no body")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise FhirError(400, "invalid", f"the body is not valid JSON: {error}") from None
    _check_depth_and_text(data)
    return data


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
    meta = resource.get("meta")
    if isinstance(meta, dict):
        # The store sets the version and time; what a client read earlier says nothing now.
        kept = {key: value for key, value in meta.items() if key not in _SERVER_META}
        if kept:
            resource["meta"] = kept
        else:
            resource.pop("meta")
    return resource


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
                    return Written(stored, created=False)
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
            return self.update(
                resource_type, found[0], {**resource, "id": found[0]}, if_match=if_match
            )
        if given is not None:
            # No match, an id given: create it with that id, unless that id exists (and so
            # did not match the criteria).
            return self.update(resource_type, given, resource, if_match=if_match, must_be_new=True)
        if if_match is not None:
            raise PreconditionFailed(f"If-Match names a version, but no {resource_type} matches")
        return self.create(resource_type, resource)

    # patch ----------------------------------------------------------------------------------

    def patch(
        self,
        resource_type: str,
        resource_id: str,
        operations: Any,
        *,
        if_match: int | None = None,
    ) -> Written:
        """Apply a JSON Patch to the current version and write the result as an update."""
        if not isinstance(operations, list) or not all(isinstance(o, dict) for o in operations):
            raise FhirError(400, "invalid", "a JSON Patch is an array of operation objects")
        for _attempt in range(5):
            current = self.resources.read(resource_type, resource_id)
            if current is None:
                raise ResourceNotFound(f"{resource_type}/{resource_id} is not known")
            if current.deleted:
                raise ResourceGone(resource_type, resource_id, current.version)
            if if_match is not None and if_match != current.version:
                raise _stale(resource_type, resource_id, if_match, current.version)
            patched = _apply_patch(orjson.loads(current.body), operations)
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
        self._check_valid(resource)
        written = self.resources.write([resource], now=datetime.now(UTC))
        # Nothing written: the content is the current version's, which `before` holds.
        stored = _stored(written[0]) if written else before
        assert stored is not None  # written, or current and unchanged
        return Written(stored, created=before is None or before.deleted)

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
        now = datetime.now(UTC)
        written = self.resources.write(resources, now=now)
        if len(written) != len(resources) or any(w.version != 1 for w in written):
            raise ResourceConflict("a new resource's id is taken")
        return [Written(_stored(w), created=True) for w in written]

    def _check_valid(self, resource: dict[str, Any]) -> None:
        issues = self.validator.issues(resource)
        if any(issue["severity"] in ("error", "fatal") for issue in issues):
            raise InvalidResource(issues)
        issues = _storability_issues(resource)
        if issues:
            raise InvalidResource(issues)

    def _check_not_maintained(self, stored: StoredResource) -> None:
        """A resource carrying the site's own business identifier is maintained from a record."""
        if stored.resource_type in RECORD_KINDS:
            return
        own = self.context.identifier_system.rstrip("/") + "/"
        for identifier in _identifiers(orjson.loads(stored.body)):
            system = identifier.get("system")
            if isinstance(system, str) and system.startswith(own):
                raise ResourceConflict(
                    f"{stored.resource_type}/{stored.id} is maintained from the clinic's "
                    f"{system.removeprefix(own)} records; change the record through the intake API",
                    f"{stored.resource_type}.identifier",
                )

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
        return Written(stored, created=before is None or before.deleted)

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
    return _Stale(f"{resource_type}/{resource_id}: If-Match asked for version {expected}, it {now}")


def _check_version(
    before: StoredResource | None, resource_type: str, resource_id: str, if_match: int | None
) -> None:
    if if_match is not None and (before is None or before.version != if_match):
        raise _stale(
            resource_type, resource_id, if_match, None if before is None else before.version
        )


def _apply_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> Any:
    try:
        return jsonpatch.apply_patch(document, operations)
    except jsonpatch.InvalidJsonPatch as error:
        raise FhirError(400, "invalid", f"not a valid JSON Patch: {error}") from None
    except jsonpatch.JsonPatchTestFailed as error:
        raise InvalidResource([_issue("processing", f"a test operation failed: {error}")]) from None
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as error:
        raise InvalidResource(
            [_issue("processing", f"the patch does not apply: {error}")]
        ) from None
    except (TypeError, ValueError, KeyError, IndexError) as error:
        raise InvalidResource(
            [_issue("processing", f"the patch does not apply: {error}")]
        ) from None


_RELATIVE = re.compile(r"(?P<type>[A-Z][A-Za-z]+)/(?P<id>[^/]*)(?:/_history/[^/]*)?")


def _storability_issues(resource: dict[str, Any]) -> list[dict[str, Any]]:
    """What a structurally valid resource holds that the store cannot keep.

    Long values are kept: the search index holds their first characters (see
    `service.fhir.search_index.MAX_TEXT`).
    """
    if not _has_bad_reference(resource):
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


def _has_bad_reference(resource: dict[str, Any]) -> bool:
    """Whether a relative reference anywhere in the resource has an id that is not a FHIR id."""
    stack: list[Any] = [resource]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            reference = value.get("reference")
            if isinstance(reference, str):
                match = _RELATIVE.fullmatch(reference)
                if match is not None and not _ID.fullmatch(match["id"]):
                    return True
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
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
        what = "created" if result.created else "updated"
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

    @router.patch("/{resource_type}/{resource_id}", summary="JSON Patch")
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
        check_media_type(request.headers.get("content-type"), patch=True)
        operations = parse_json(await request.body())
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
