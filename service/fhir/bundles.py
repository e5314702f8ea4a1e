"""Batch and transaction Bundles at `POST /fhir`, over the same writes as single requests.

A transaction runs every entry in one unit of work, in the spec's order (DELETE, POST, PUT and
PATCH, then GET), after giving each created resource its id so `urn:uuid:` references between
entries can be rewritten to `Type/id` first (a conditional create that finds its match points
those references at the match), and after resolving conditional references
(`Patient?identifier=...`) to the one resource they match. Any entry failing rolls back all of
them; the OperationOutcome names the entry. No two entries of a transaction may write the same
resource (http.html#trules: "if any resource identities (including resolved identities from
conditional update/delete) overlap in steps 1-3, then the transaction SHALL fail"). An entry's
identities are the `Type/id` its URL names; for a conditional one, the one resource its criteria
match in the store as it was before the transaction (the spec orders the steps, not the entries
within one, so what an entry resolves to may not depend on which of them ran first); and the
resource it comes to write, delete or answer with (a conditional create that found its match)
as the entries run, which is how one that resolves to what another entry wrote is found. The
400 names both entries and the resource. A PATCH entry carries a FHIRPath Patch (its
Parameters resource) or a JSON Patch (a Binary). A GET entry reads (`Type/id`,
`Type/id/_history/n`) or searches (`Type?params`: the searchset Bundle a search sent alone
answers); in a transaction it sees the transaction's own writes. A batch runs each entry in a
unit of work of its own and reports each result.

This module must not write any other way than `service.fhir.writes.FacadeWriter` does, so an
entry behaves exactly as the same request sent alone; nor search any other way than
`service.fhir.search` does (a conditional reference is matched as a conditional create's
criteria are).
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from fastapi import APIRouter, Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import DBAPIError
from starlette.responses import Response
from starlette.types import Scope

from service.bootstrap import Services
from service.fhir.api import (
    CONFORMANCE_TYPES,
    STORED_TYPES,
    _strict,
    negotiate,
    searchset_bundle,
)
from service.fhir.errors import (
    FHIR_JSON,
    FhirError,
    InvalidResource,
    ResourceGone,
    ResourceNotFound,
)
from service.fhir.reads import version_number
from service.fhir.search import parse_search, run_search
from service.fhir.writes import (
    RECORD_KINDS,
    Deleted,
    FacadeWriter,
    IdentifierUpdate,
    UpdateFailed,
    Written,
    check_deletable,
    check_id,
    check_media_type,
    check_writable,
    criteria_key,
    derived_id,
    identifier_criteria,
    identifier_matches,
    parse_criteria,
    parse_fhirpath_patch,
    parse_if_match,
    parse_json,
    resource_body,
    run_write,
)
from service.json_text import dump_json, dump_json_noting, load_json
from service.security.access import authorize, authorize_entries, requirement
from service.security.audit import audit_facade_writes

MAX_ENTRIES = 10000
_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
"""Transaction processing order (FHIR R4 http.html#trules)."""
_RETRIES = 3
"""Attempts of a transaction that PostgreSQL aborted as a deadlock victim."""
_CONDITIONAL_REFERENCE = re.compile(r"([A-Z][A-Za-z]{1,63})\?(.+)", re.DOTALL)
"""`Type?criteria`: a reference to the one resource the criteria match (http.html#trules)."""
# References found in a resource's compact JSON (orjson writes no whitespace) by a regex over
# its bytes rather than by a walk through every element: each transaction entry is looked
# through twice for conditional references and once to point references at fullUrls, which
# walks cost more than the entry's validation did. `"reference":"` with unescaped quotes can
# only be a key and the start of its string value, at any depth, as the walks found them.
_REFERENCE_VALUE = re.compile(rb'"reference":"([^"\\]*(?:\\.[^"\\]*)*)"')
_CONDITIONAL_VALUE = re.compile(rb'"reference":"[A-Z][A-Za-z]{1,63}\?')
_PLACEHOLDER_VALUE = re.compile(rb'"reference":"urn:uuid:')
_NARRATIVE_LINK = re.compile(
    r"""((?:href|src)\s*=\s*)(["'])(urn:(?:uuid|oid):[^"'\s]+)\2""", re.IGNORECASE
)
"""An `href` or `src` attribute in a narrative naming a urn (a fullUrl of the Bundle, maybe)."""


class EntryFailed(FhirError):
    """One entry of a transaction failed: the whole transaction is refused with its outcome."""

    def __init__(
        self, index: int, method: str, url: str, error: FhirError, full_url: str | None = None
    ) -> None:
        issues = (
            error.issues
            if isinstance(error, InvalidResource)
            else [
                {
                    "severity": "error",
                    "code": error.code,
                    "diagnostics": error.diagnostics,
                    **({"expression": [error.expression]} if error.expression else {}),
                }
            ]
        )
        where = f"Bundle.entry[{index}]"
        named = f", fullUrl {full_url}" if full_url else ""
        self.issues = [
            {
                **issue,
                "diagnostics": f"entry {index} ({method} {url}{named}): "
                + str(issue.get("diagnostics", "")),
                "expression": [where, *issue.get("expression", [])],
            }
            for issue in issues
        ]
        super().__init__(error.status, error.code, self.issues[0]["diagnostics"], where)

    @classmethod
    def of(cls, entry: Entry, error: FhirError) -> EntryFailed:
        """The entry's failure, named by its index, request and fullUrl."""
        return cls(entry.index, entry.method, entry.url, error, entry.full_url)

    def outcome(self) -> dict[str, Any]:
        return {"resourceType": "OperationOutcome", "issue": self.issues}


@dataclass
class Entry:
    """One entry as parsed: what to do, to what, and later what came of it."""

    index: int
    method: str
    url: str
    resource_type: str
    resource_id: str | None
    path: tuple[str, ...]
    """The URL's path segments: `Type`, `Type/id`, `Type/id/_history/n`, ..."""
    query: str | None
    resource: dict[str, Any] | None
    full_url: str | None
    if_match: int | None
    if_none_exist: str | None
    if_none_match: str | None = None
    if_modified_since: datetime | None = None
    planned_id: str | None = None
    response: dict[str, Any] = field(default_factory=dict)
    body: bytes | None = None
    searches: list[tuple[str, str]] = field(default_factory=list)
    """(FHIRPath, reference) of each conditional reference in the resource as sent: found once
    for the scope check and the resolution both."""
    failure: FhirError | None = None
    """What makes the entry fail before it runs (a malformed `request.ifMatch`): a batch answers
    the entry with it and runs the others, a transaction fails as a whole."""


def parse_bundle(data: Any) -> tuple[str, list[Entry]]:
    """The Bundle's type and its entries, each checked as its own request would be."""
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise FhirError(400, "invalid", "POST to the base takes a batch or transaction Bundle")
    kind = data.get("type")
    if kind not in ("batch", "transaction"):
        raise FhirError(
            400, "invalid", f"Bundle.type must be batch or transaction, not {kind!r}", "Bundle.type"
        )
    raw_entries = data.get("entry", [])
    if not isinstance(raw_entries, list):
        raise FhirError(400, "invalid", "Bundle.entry must be a list of entries", "Bundle.entry")
    if len(raw_entries) > MAX_ENTRIES:
        raise FhirError(
            400,
            "too-costly",
            f"Bundle.entry has {len(raw_entries)} entries; this server takes at most "
            f"{MAX_ENTRIES} in one Bundle",
            "Bundle.entry",
        )
    entries = []
    for index, raw in enumerate(raw_entries):
        entries.append(_parse_entry(index, raw))
    for entry in entries:
        if kind == "transaction" and entry.failure is not None:
            failure = entry.failure
            raise FhirError(
                failure.status,
                failure.code,
                f"entry {entry.index} ({entry.method} {entry.url}): {failure.diagnostics}",
                failure.expression,
            )
    _check_full_urls_unique(entries)
    return str(kind), entries


def _check_full_urls_unique(entries: list[Entry]) -> None:
    """Bundle invariant bdl-7: a fullUrl names one entry, unless their meta.versionIds differ.

    Two entries with one fullUrl would make every reference to it ambiguous.
    """
    seen: dict[tuple[str, Any], int] = {}
    for entry in entries:
        if entry.full_url is None:
            continue
        meta = (entry.resource or {}).get("meta")
        version = meta.get("versionId") if isinstance(meta, dict) else None
        first = seen.setdefault((entry.full_url, version), entry.index)
        if first != entry.index:
            raise FhirError(
                400,
                "invalid",
                f"entries {first} and {entry.index} have the same fullUrl {entry.full_url!r} "
                "(bdl-7: a fullUrl must be unique in a Bundle)",
                f"Bundle.entry[{entry.index}].fullUrl",
            )


def _parse_entry(index: int, raw: Any) -> Entry:
    where = f"Bundle.entry[{index}]"
    request = raw.get("request") if isinstance(raw, dict) else None
    if not isinstance(request, dict):
        raise FhirError(400, "required", f"entry {index} has no request", f"{where}.request")
    method = request.get("method")
    url = request.get("url")
    if not isinstance(method, str) or method not in _ORDER or not isinstance(url, str) or not url:
        raise FhirError(
            400, "invalid", f"entry {index} needs a request method and url", f"{where}.request"
        )
    for name in _REQUEST_STRINGS:
        if name in request and not isinstance(request[name], str):
            raise FhirError(
                400,
                "invalid",
                f"entry {index}: request.{name} must be a string",
                f"{where}.request",
            )
    split = urlsplit(url)
    path = split.path.strip("/")
    if "/fhir/" in f"/{path}":
        path = f"/{path}".split("/fhir/", 1)[1]
    parts = path.split("/") if path else []
    if not parts:
        raise FhirError(400, "invalid", f"entry {index}: {url!r} names no resource type")
    _check_path(index, str(method), url, parts, split.query)
    resource = raw.get("resource")
    if resource is not None and not isinstance(resource, dict):
        raise FhirError(400, "invalid", f"entry {index}: the resource is not an object")
    full_url = raw.get("fullUrl")
    if full_url is not None and not isinstance(full_url, str):
        raise FhirError(
            400, "invalid", f"entry {index}: fullUrl must be a string", f"{where}.fullUrl"
        )
    since = request.get("ifModifiedSince")
    # A malformed ETag fails this entry alone (http.html#batch: each entry of a batch succeeds
    # or fails on its own); a transaction fails as a whole (`parse_bundle`).
    if_match: int | None = None
    failure: FhirError | None = None
    try:
        if_match = parse_if_match(request.get("ifMatch")) if request.get("ifMatch") else None
    except FhirError as error:
        failure = FhirError(400, error.code, error.diagnostics, f"{where}.request.ifMatch")
    return Entry(
        searches=_conditional_references(resource),
        index=index,
        method=str(method),
        url=url,
        resource_type=parts[0],
        resource_id=parts[1] if len(parts) > 1 else None,
        path=tuple(parts),
        query=split.query or None,
        resource=resource,
        full_url=full_url,
        if_match=if_match,
        if_none_exist=request.get("ifNoneExist"),
        if_none_match=request.get("ifNoneMatch") or None,
        if_modified_since=None if not since else _parse_since(index, since),
        failure=failure,
    )


_REQUEST_STRINGS = ("ifMatch", "ifNoneExist", "ifNoneMatch", "ifModifiedSince")
"""Bundle.entry.request elements that are FHIR strings (or an instant), when present."""


def _check_path(index: int, method: str, url: str, parts: list[str], query: str) -> None:
    """The URL has the shape the entry's interaction takes, as the same request sent alone
    would need: a create `Type`, an update, patch or delete `Type/id` or `Type?criteria`.

    Anything past `Type/id` (`Type/id/_history/n`, `Type/id/$op`) would otherwise be taken for
    `Type/id` itself: a DELETE of a version would delete the resource."""
    problem = None
    if method == "POST" and len(parts) != 1:
        problem = "a POST entry creates: its url is the resource type alone"
    elif method in ("PUT", "PATCH", "DELETE") and len(parts) > 2:
        problem = f"a {method} entry names Type/id or Type?criteria"
    elif method in ("PUT", "PATCH", "DELETE") and len(parts) == 2 and query:
        problem = f"a {method} entry names Type/id or Type?criteria, not both"
    if problem is not None:
        raise FhirError(
            400,
            "not-supported",
            f"entry {index}: {url!r}: {problem}",
            f"Bundle.entry[{index}].request.url",
        )


def _parse_since(index: int, value: str) -> datetime:
    """Bundle.entry.request.ifModifiedSince: an instant (an HTTP date is taken too)."""
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        try:
            parsed = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            raise FhirError(
                400,
                "invalid",
                f"entry {index}: ifModifiedSince {value!r} is not an instant",
                f"Bundle.entry[{index}].request.ifModifiedSince",
            ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# --- running entries ------------------------------------------------------------------------------


def _patch_operations(entry: Entry) -> Any:
    """A PATCH entry's patch: a FHIRPath Patch travels as its Parameters resource, a JSON
    Patch as a Binary (application/json-patch+json)."""
    resource = entry.resource or {}
    if resource.get("resourceType") == "Parameters":
        return parse_fhirpath_patch(resource)
    if resource.get("resourceType") != "Binary" or "json-patch" not in str(
        resource.get("contentType", "")
    ):
        raise FhirError(
            415,
            "not-supported",
            "a PATCH entry carries a Parameters resource (a FHIRPath Patch) or a Binary of "
            "contentType application/json-patch+json",
        )
    try:
        raw = base64.b64decode(str(resource.get("data", "")), validate=True)
    except (binascii.Error, ValueError):
        raise FhirError(400, "invalid", "the Binary's data is not base64") from None
    return parse_json(raw)


def _run_entry(
    writer: FacadeWriter, entry: Entry, *, strict: bool = False
) -> Written | Deleted | None:
    """Run one entry on the writer; None for a GET, whose response is already in the entry.

    `strict`: the Bundle came with `Prefer: handling=strict`, so a search entry's unknown or
    unsupported parameter is an error rather than left out and reported."""
    resource_type = entry.resource_type
    if entry.method in ("GET", "HEAD"):
        _get(writer, entry, strict=strict)
        if entry.method == "HEAD":
            entry.body = None  # what GET answers, without the body
        return None
    if entry.method == "DELETE":
        check_deletable(resource_type)
        if entry.resource_id is not None:
            check_id(entry.resource_id)
            return writer.delete(resource_type, entry.resource_id, if_match=entry.if_match)
        return writer.conditional_delete(
            resource_type, parse_criteria(resource_type, entry.query or "")
        )
    check_writable(resource_type)
    if entry.method == "PATCH":
        if entry.resource_id is None:
            raise FhirError(400, "invalid", "a PATCH entry names one resource by id")
        check_id(entry.resource_id)
        return writer.patch(
            resource_type, entry.resource_id, _patch_operations(entry), if_match=entry.if_match
        )
    if entry.method == "POST":
        resource = resource_body(entry.resource, resource_type, None)
        if entry.planned_id is not None and resource_type not in RECORD_KINDS:
            return writer.update(
                resource_type,
                entry.planned_id,
                resource | {"id": entry.planned_id},
                must_be_new=True,
            )
        criteria = (
            None
            if entry.if_none_exist is None
            else parse_criteria(resource_type, entry.if_none_exist)
        )
        return writer.create(resource_type, resource, if_none_exist=criteria)
    # PUT
    if entry.resource_id is not None:
        check_id(entry.resource_id)
        resource = resource_body(entry.resource, resource_type, entry.resource_id)
        return writer.update(resource_type, entry.resource_id, resource, if_match=entry.if_match)
    given = (entry.resource or {}).get("id")
    resource = resource_body(
        entry.resource, resource_type, given if isinstance(given, str) else None
    )
    criteria = parse_criteria(resource_type, entry.query or "")
    return writer.conditional_update(resource_type, criteria, resource, if_match=entry.if_match)


def _get(writer: FacadeWriter, entry: Entry, *, strict: bool) -> None:
    """A GET entry: a search (`Type`, `Type?params`), a read (`Type/id`) or a vread
    (`Type/id/_history/n`), answered into the entry."""
    path = entry.path
    if len(path) == 1:
        _search(writer, entry, strict=strict)
        return
    resource_type, resource_id = path[0], path[1]
    vread = len(path) == 4 and path[2] == "_history"
    # `_format` and `_pretty` ask for what every answer here is (JSON): nothing to apply.
    params = [name for name, _ in parse_qsl(entry.query or "", keep_blank_values=True)]
    if (
        any(name not in ("_format", "_pretty") for name in params)
        or not (len(path) == 2 or vread)
        or resource_id.startswith(("_", "$"))
    ):
        raise FhirError(
            400,
            "not-supported",
            "a GET entry here searches (Type?params), reads (Type/id) or reads a version "
            "(Type/id/_history/n)",
        )
    if vread:
        _vread(writer, entry, path[3])
        return
    stored = writer.resources.read(resource_type, resource_id)
    if stored is None:
        raise FhirError(404, "not-found", f"{resource_type}/{resource_id} is not known")
    if stored.deleted:
        raise FhirError(410, "deleted", f"{resource_type}/{resource_id} was deleted")
    entry.response = {
        "status": "200 OK",
        "etag": f'W/"{stored.version}"',
        "lastModified": stored.last_updated.isoformat(),
    }
    if _not_modified(entry, stored.version, stored.last_updated):
        entry.response["status"] = "304 Not Modified"
        return
    entry.body = stored.body.encode()


def _not_modified(entry: Entry, version: int, last_updated: datetime) -> bool:
    """A conditional read: the entry's ifNoneMatch names this version, or the resource has not
    changed since its ifModifiedSince (Bundle.entry.request, as the headers of a read)."""
    if entry.if_none_match is not None:
        tags = {tag.strip().removeprefix("W/").strip('"') for tag in entry.if_none_match.split(",")}
        return "*" in tags or str(version) in tags
    if entry.if_modified_since is not None:
        since = entry.if_modified_since
        if since.microsecond:
            return last_updated <= since
        # Whole seconds (an HTTP date's): a version written within that second is not newer.
        return last_updated.replace(microsecond=0) <= since
    return False


def _vread(writer: FacadeWriter, entry: Entry, version: str) -> None:
    resource_type, resource_id = entry.path[0], entry.path[1]
    number = version_number(version)  # ASCII digits: `str.isdigit` takes `²`, `int` does not
    found = None if number is None else writer.resources.version(resource_type, resource_id, number)
    if found is None:
        raise ResourceNotFound(f"{resource_type}/{resource_id} has no version {version}")
    if found.deleted or found.body is None:
        raise ResourceGone(resource_type, resource_id, found.version)
    entry.response = {
        "status": "200 OK",
        "etag": f'W/"{found.version}"',
        "lastModified": found.last_updated.isoformat(),
    }
    if _not_modified(entry, found.version, found.last_updated):
        entry.response["status"] = "304 Not Modified"
        return
    entry.body = found.body.encode()


def _search(writer: FacadeWriter, entry: Entry, *, strict: bool) -> None:
    """A search entry: the searchset Bundle the same search sent alone answers (links, paging,
    includes, `_summary`, `_elements`, the OperationOutcome of what was left out), over what
    the entry's unit of work sees (in a transaction, its own writes)."""
    resource_type = entry.resource_type
    if resource_type in CONFORMANCE_TYPES:
        raise FhirError(
            400,
            "not-supported",
            f"{resource_type} is searched by a request of its own, not in a Bundle entry",
        )
    if resource_type not in STORED_TYPES:
        raise ResourceNotFound(f"resource type {resource_type} is not supported here")
    params = parse_qsl(entry.query or "", keep_blank_values=True)
    query = parse_search(resource_type, params, base=writer.base, strict=strict)
    page = run_search(writer.connection, query)
    entry.response = {"status": "200 OK"}
    entry.body = searchset_bundle(writer.base, query, page)


def _conditional_references(value: Any) -> list[tuple[str, str]]:
    """(FHIRPath, reference) of each conditional reference (`Type?criteria`) in a resource."""
    if value is None or not _CONDITIONAL_VALUE.search(dump_json(value)):
        return []  # the common case, found without building every element's path
    return _conditional_references_at(value, "")


def _conditional_references_at(value: Any, where: str) -> list[tuple[str, str]]:
    if isinstance(value, list):
        found = []
        for index, item in enumerate(value):
            found += _conditional_references_at(item, f"{where}[{index}]")
        return found
    if not isinstance(value, dict):
        return []
    if not where:
        where = str(value.get("resourceType", "Resource"))
    found = []
    for key, item in value.items():
        if key == "reference":
            if isinstance(item, str) and _CONDITIONAL_REFERENCE.fullmatch(item):
                found.append((where, item))
        elif isinstance(item, dict | list):
            found += _conditional_references_at(item, f"{where}.{key}")
    return found


def _resolve_references(writer: FacadeWriter, entry: Entry, resolved: dict[str, str]) -> None:
    """Add the entry's conditional references to `resolved`, each as `Type/id` of its one match.

    Each search holds its criteria's lock (as a conditional create's does) to the end of the
    unit of work, so what it matched cannot change before the entry's write commits.
    """
    for where, reference in entry.searches:
        if reference in resolved:
            continue
        match = _CONDITIONAL_REFERENCE.fullmatch(reference)
        assert match is not None
        target_type, text = match.group(1), match.group(2)
        if target_type not in STORED_TYPES:
            raise FhirError(
                400,
                "not-supported",
                f"the conditional reference {reference!r}: {target_type} is not stored here",
                where,
            )
        try:
            criteria = parse_criteria(target_type, text)
            writer.resources.serialize(criteria_key(target_type, criteria))
            found = writer.matching(target_type, criteria)
        except FhirError as error:
            raise FhirError(
                error.status,
                error.code,
                f"the conditional reference {reference!r}: {error.diagnostics}",
                where,
            ) from None
        if len(found) != 1:
            # 412 for none as for several, as HAPI answers: the reference's precondition (one
            # match) failed; a 404 would say the Bundle's own URL was not found.
            raise FhirError(
                412,
                "multiple-matches" if found else "not-found",
                f"the conditional reference {reference!r} matches "
                + (f"more than one {target_type}" if found else f"no {target_type}"),
                where,
            )
        resolved[reference] = f"{target_type}/{found[0]}"


def _record(entry: Entry, base: str, outcome: Written | Deleted | None) -> None:
    if isinstance(outcome, Written):
        stored = outcome.stored
        entry.response = {
            "status": "201 Created" if outcome.created else "200 OK",
            "location": f"{base}/{stored.resource_type}/{stored.id}/_history/{stored.version}",
            "etag": f'W/"{stored.version}"',
            "lastModified": stored.last_updated.isoformat(),
        }
        entry.body = stored.body.encode()
    elif isinstance(outcome, Deleted):
        entry.response = {"status": "204 No Content"}
        if outcome.version is not None:
            entry.response["etag"] = f'W/"{outcome.version}"'


def _planned_id(writer: FacadeWriter, entry: Entry) -> str | None:
    """The id a POST entry's resource will get, so references to its fullUrl can name it."""
    resource = entry.resource or {}
    if entry.resource_type not in RECORD_KINDS:
        return str(uuid.uuid4())
    kind = RECORD_KINDS[entry.resource_type]
    system = writer.context.system(kind)
    for identifier in resource.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") == system:
            value = str(identifier.get("value", "")).split("/")[0]
            if value:
                return derived_id(entry.resource_type, value)
    return None


def _rewrite(resource: dict[str, Any], targets: dict[str, str]) -> dict[str, Any]:
    """A copy of `resource` with every reference to a fullUrl of the Bundle pointed at its
    resource."""
    return _rewriter(targets)(resource)


def _rewriter(targets: dict[str, str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """`_rewrite` for many resources with the same targets, prepared once."""
    # Looked up by the reference's bytes as written (a fullUrl rarely holds an escape), each
    # target written as the JSON string it is: no decoding or encoding per reference.
    written = {
        orjson.dumps(full_url)[1:-1]: b'"reference":' + orjson.dumps(target)
        for full_url, target in targets.items()
    }

    def point(match: re.Match[bytes]) -> bytes:
        raw = match.group(1)
        if b"\\" in raw:  # the same string with its escapes as orjson writes them
            raw = orjson.dumps(orjson.loads(b'"' + raw + b'"'))[1:-1]
        return written.get(raw) or match.group(0)

    def rewrite(resource: dict[str, Any]) -> dict[str, Any]:
        data, inexact = dump_json_noting(resource)
        copied: dict[str, Any] = load_json(
            _REFERENCE_VALUE.sub(point, data) if written else data, inexact=inexact
        )
        return copied

    return rewrite


def run_transaction(writer: FacadeWriter, entries: list[Entry], *, strict: bool = False) -> None:
    """Every entry on one writer (one unit of work), in the spec's order; raises EntryFailed."""
    # The entry each resource identity belongs to: first those URLs name and those conditional
    # entries match before the transaction, so an overlap between them fails before anything
    # runs; then each entry's outcome, so one found only by running (a match among what this
    # transaction wrote, a record's derived id) fails when it is found.
    claims: dict[tuple[str, str], Entry] = {}

    def claim(entry: Entry, identity: tuple[str, str] | None) -> None:
        if identity is not None and claims.setdefault(identity, entry) is not entry:
            raise _overlap(entry, claims[identity], identity)

    ordered = sorted(entries, key=lambda e: (_ORDER[e.method], e.index))
    for entry in ordered:
        claim(entry, _named_identity(entry))
    matched: dict[int, str] = {}
    for entry, identity in _conditional_identities(writer, ordered):
        claim(entry, identity)
        matched[entry.index] = identity[1]
    referenced = {reference for entry in entries for reference in _references(entry.resource)}
    targets: dict[str, str] = {}
    for entry in entries:
        try:
            # Conditional references are matched against the store as it was before this
            # transaction, as HAPI FHIR does: not against what its own creates will add (the
            # spec leaves this open; a create planned here has no searchable content yet).
            if entry.resource is not None:
                _resolve_references(writer, entry, targets)
            if entry.method == "POST" and entry.resource is not None:
                found: list[str] = []
                if entry.if_none_exist is not None:
                    criteria = parse_criteria(entry.resource_type, entry.if_none_exist)
                    # Held to the end of the transaction: the match cannot change under us.
                    writer.resources.serialize(criteria_key(entry.resource_type, criteria))
                    found = writer.matching(entry.resource_type, criteria)
                    if len(found) == 1:
                        claim(entry, (entry.resource_type, found[0]))
                entry.planned_id = found[0] if len(found) == 1 else _planned_id(writer, entry)
                if entry.full_url and entry.planned_id:
                    targets[entry.full_url] = f"{entry.resource_type}/{entry.planned_id}"
            elif entry.method in ("PUT", "PATCH") and entry.resource_id and entry.full_url:
                targets[entry.full_url] = f"{entry.resource_type}/{entry.resource_id}"
            elif (
                entry.method == "PUT"
                and entry.full_url is not None
                and entry.full_url in referenced
                and entry.resource is not None
            ):
                # A conditional update other entries refer to by its fullUrl: they name the
                # resource it matches, or the one it creates, with an id chosen here.
                target_id = _conditional_update_target(writer, entry, matched.get(entry.index))
                if target_id is not None:
                    targets[entry.full_url] = f"{entry.resource_type}/{target_id}"
        except EntryFailed:
            raise  # an overlap, which names its entries already
        except FhirError as error:
            raise EntryFailed.of(entry, error) from None
    rewriters: dict[str | None, Callable[[dict[str, Any]], dict[str, Any]]] = {}
    links = _link_rewriter(targets)
    for entry in entries:
        if entry.resource is None:
            continue
        # A relative reference (`Type/id`) in an entry whose fullUrl is a RESTful URL names
        # the entry at that base, if there is one (bundle.html#references).
        base = _restful_base(entry.full_url)
        if base not in rewriters:
            rewriters[base] = _rewriter(targets | _relative_targets(targets, base))
        entry.resource = rewriters[base](entry.resource)  # a copy: the rewrite builds anew
        if links is not None:
            entry.resource = links(entry.resource)
        _check_placeholders_resolved(entry)
    outcomes: list[Written | Deleted | None] = []

    def done(entry: Entry, outcome: Written | Deleted | None) -> None:
        identity = _identity(outcome)
        claim(entry, identity)
        pointed = targets.get(entry.full_url) if entry.full_url is not None else None
        if pointed is not None and identity is not None and pointed != "/".join(identity):
            # References to its fullUrl were pointed at a resource it did not come to write.
            error = FhirError(
                409,
                "conflict",
                f"references to its fullUrl {entry.full_url} were pointed at {pointed}, but it "
                f"wrote {'/'.join(identity)}",
            )
            raise EntryFailed.of(entry, error)
        _record(entry, writer.base, outcome)
        outcomes.append(outcome)

    # Plain creates, checked and waiting to be written together: before any other entry runs,
    # they are written, so every entry sees the store as if each had been written in turn.
    pending: list[tuple[Entry, dict[str, Any]]] = []

    def write_pending() -> None:
        if not pending:
            return
        try:
            written = writer.create_new([resource for _, resource in pending])
        except FhirError as error:
            entry = pending[0][0]
            raise EntryFailed.of(entry, error) from None
        for (entry, _), outcome in zip(pending, written, strict=True):
            done(entry, outcome)  # a new id: claimed for what a later entry may resolve to
        pending.clear()

    # Conditional updates by identifier, checked and waiting to be matched and written
    # together (the form an EHR's feed takes): one query and one write for a run of them.
    updates: list[tuple[Entry, IdentifierUpdate]] = []

    def write_updates() -> None:
        if not updates:
            return
        run = list(updates)
        updates.clear()
        try:
            written = writer.conditional_updates_by_identifier([update for _, update in run])
        except UpdateFailed as failed:
            entry = run[failed.position][0]
            raise EntryFailed.of(entry, failed.error) from None
        except FhirError as error:
            entry = run[0][0]
            raise EntryFailed.of(entry, error) from None
        if written is None:
            # They depend on one another, so only running them in turn says where each goes:
            # two that end at the same resource then fail as overlapping; the rest (say, one
            # whose body carries the identifier an earlier one's criteria name) are made as
            # they are in turn.
            for entry, _ in run:
                try:
                    outcome = _run_entry(writer, entry, strict=strict)
                except FhirError as error:
                    raise EntryFailed.of(entry, error) from None
                done(entry, outcome)
            return
        for (entry, _), written_one in zip(run, written, strict=True):
            done(entry, written_one)

    for entry in ordered:
        try:
            update = _identifier_update(entry)
        except FhirError as error:
            write_updates()  # an earlier entry's failure is the one to report
            raise EntryFailed.of(entry, error) from None
        if update is not None:
            write_pending()
            updates.append((entry, update))
            continue
        write_updates()
        try:
            if _plain_create(entry):
                assert entry.planned_id is not None
                check_writable(entry.resource_type)
                resource = resource_body(entry.resource, entry.resource_type, None)
                resource = writer.new_resource(entry.resource_type, resource, entry.planned_id)
                pending.append((entry, resource))
                continue
        except FhirError as error:
            raise EntryFailed.of(entry, error) from None
        write_pending()
        try:
            if entry.method == "POST" and entry.if_none_exist is not None:
                criteria = parse_criteria(entry.resource_type, entry.if_none_exist)
                resource = resource_body(entry.resource, entry.resource_type, None)
                outcome: Written | Deleted | None
                if _plain_create(entry, conditional=True) and not writer.matching(
                    entry.resource_type, criteria
                ):
                    # No match (under the lock taken above): created with the id references
                    # to its fullUrl were pointed at.
                    assert entry.planned_id is not None
                    outcome = writer.update(
                        entry.resource_type,
                        entry.planned_id,
                        resource | {"id": entry.planned_id},
                        must_be_new=True,
                    )
                else:
                    outcome = writer.create(entry.resource_type, resource, if_none_exist=criteria)
            else:
                outcome = _run_entry(writer, entry, strict=strict)
        except FhirError as error:
            raise EntryFailed.of(entry, error) from None
        done(entry, outcome)
    write_pending()
    write_updates()
    audit_facade_writes(writer.connection, outcomes, subtype="transaction")


_RESTFUL = re.compile(r"(.+)/([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})")
"""A RESTful fullUrl: `[base]/Type/id`."""


def _link_rewriter(
    targets: dict[str, str],
) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """What points the links to a `urn:uuid:` or `urn:oid:` fullUrl that are no Reference at
    its resource: a `url` element (Attachment.url) that is the fullUrl, and the narrative's
    `href` and `src` attributes (http.html#trules: "Servers SHALL replace all matching links in
    the bundle, whether they are found in the resource ids, resource references, elements of
    type uri, url, oid, uuid, and <a href="" & <img src="" in the narrative"). None when no
    entry has such a fullUrl."""
    placeholders = {
        full_url: target
        for full_url, target in targets.items()
        if full_url.startswith(("urn:uuid:", "urn:oid:"))
    }
    if not placeholders:
        return None

    def attributes(match: re.Match[str]) -> str:
        target = placeholders.get(match.group(3))
        if target is None:
            return match.group(0)
        return f"{match.group(1)}{match.group(2)}{target}{match.group(2)}"

    def point(value: Any, key: str | None) -> Any:
        if isinstance(value, dict):
            return {k: point(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [point(item, key) for item in value]
        if isinstance(value, str):
            if key == "url" and value in placeholders:
                return placeholders[value]
            if key == "div":
                return _NARRATIVE_LINK.sub(attributes, value)
        return value

    def rewrite(resource: dict[str, Any]) -> dict[str, Any]:
        data = dump_json(resource)
        if b'"url":"urn:' not in data and not (b'"div":' in data and b"urn:" in data):
            return resource  # the common case: no such link, nothing to walk
        pointed: dict[str, Any] = point(resource, None)
        return pointed

    return rewrite


def _restful_base(full_url: str | None) -> str | None:
    """The `[base]` of a RESTful fullUrl (`[base]/Type/id`); None for a urn or no fullUrl."""
    if full_url is None or not full_url.startswith(("http://", "https://")):
        return None
    match = _RESTFUL.fullmatch(full_url)
    return None if match is None else match.group(1)


def _relative_targets(targets: dict[str, str], base: str | None) -> dict[str, str]:
    """The targets of RESTful fullUrls at `base` by their relative form `Type/id`."""
    if base is None:
        return {}
    prefix = base + "/"
    return {
        full_url.removeprefix(prefix): target
        for full_url, target in targets.items()
        if full_url.startswith(prefix) and _RESTFUL.fullmatch(full_url)
    }


def _references(resource: dict[str, Any] | None) -> set[str]:
    """Every Reference.reference in a resource, at any depth (contained resources and
    extensions included)."""
    if resource is None:
        return set()
    found = set()
    for raw in _REFERENCE_VALUE.findall(dump_json(resource)):
        found.add(orjson.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode())
    return found


def _check_placeholders_resolved(entry: Entry) -> None:
    """A `urn:uuid:` reference left after the rewrite names no entry of the transaction: it
    would be stored pointing nowhere, so the transaction fails."""
    if entry.resource is None or not _PLACEHOLDER_VALUE.search(dump_json(entry.resource)):
        return
    dangling = sorted(r for r in _references(entry.resource) if r.startswith("urn:uuid:"))
    error = FhirError(
        400,
        "invalid",
        f"the reference {dangling[0]!r} names no entry of this transaction (no entry has it "
        "as its fullUrl)",
    )
    raise EntryFailed.of(entry, error)


def _conditional_update_target(writer: FacadeWriter, entry: Entry, match: str | None) -> str | None:
    """The id a conditional update will write: the one resource its criteria match, else the
    id its body gives or one planned here (given to its body); None when it cannot be known
    before it runs (a record-backed type whose id the record decides, not derivable)."""
    if match is not None:
        return match
    assert entry.resource is not None
    given = entry.resource.get("id")
    if isinstance(given, str):
        return given
    if entry.resource_type in RECORD_KINDS:
        return _planned_id(writer, entry)
    planned = str(uuid.uuid4())
    entry.resource = entry.resource | {"id": planned}
    return planned


def _named_identity(entry: Entry) -> tuple[str, str] | None:
    """The resource a DELETE, PUT or PATCH entry names by its URL (`Type/id`)."""
    if entry.method in ("DELETE", "PUT", "PATCH") and entry.resource_id is not None:
        return entry.resource_type, entry.resource_id
    return None


def _conditional_identities(
    writer: FacadeWriter, entries: list[Entry]
) -> list[tuple[Entry, tuple[str, str]]]:
    """Each conditional update or delete with the one resource its criteria match before the
    transaction runs: by identifier, one query per type; by other criteria, one search each.

    An entry whose criteria cannot be matched (not parsed, a type not stored here, several
    matches) is left out: it fails with its own error when it runs.
    """
    conditional = [
        entry
        for entry in entries
        if entry.method in ("PUT", "DELETE")
        and entry.resource_id is None
        and entry.resource_type in STORED_TYPES
        and entry.resource_type not in CONFORMANCE_TYPES
    ]
    by_identifier: dict[str, list[tuple[Entry, tuple[str, str]]]] = {}
    found: list[tuple[Entry, list[str]]] = []
    for entry in conditional:
        identifier = identifier_criteria(entry.query or "")
        if identifier is not None:
            by_identifier.setdefault(entry.resource_type, []).append((entry, identifier))
            continue
        try:
            criteria = parse_criteria(entry.resource_type, entry.query or "")
            found.append((entry, writer.matching(entry.resource_type, criteria)))
        except FhirError:
            continue
    for resource_type, wanted in by_identifier.items():
        matches = identifier_matches(
            writer.connection, resource_type, [identifier for _, identifier in wanted]
        )
        found += [(entry, matches.get(identifier, [])) for entry, identifier in wanted]
    resolved = [(entry, (entry.resource_type, ids[0])) for entry, ids in found if len(ids) == 1]
    return sorted(resolved, key=lambda pair: (_ORDER[pair[0].method], pair[0].index))


def _identity(outcome: Written | Deleted | None) -> tuple[str, str] | None:
    """The resource an entry wrote, deleted or (a conditional create's match) answered with."""
    if isinstance(outcome, Written):
        return outcome.stored.resource_type, outcome.stored.id
    if isinstance(outcome, Deleted) and outcome.id is not None:
        return outcome.resource_type, outcome.id
    return None


def _described(entry: Entry) -> str:
    full_url = f", fullUrl {entry.full_url}" if entry.full_url else ""
    return f"entry {entry.index} ({entry.method} {entry.url}{full_url})"


def _overlap(entry: Entry, other: Entry, identity: tuple[str, str]) -> EntryFailed:
    """`entry` resolves to the resource `other` already holds: the transaction fails."""
    own = f" (fullUrl {entry.full_url})" if entry.full_url else ""
    error = FhirError(
        400,
        "invalid",
        f"it{own} and {_described(other)} both resolve to {identity[0]}/{identity[1]}: a "
        "transaction may name a resource only once, a conditional entry by the resource it "
        "resolves to (FHIR R4 http.html#trules)",
        f"Bundle.entry[{other.index}]",
    )
    return EntryFailed.of(entry, error)


def _identifier_update(entry: Entry) -> IdentifierUpdate | None:
    """The entry as a conditional update by one identifier, checked as `_run_entry` checks a
    conditional PUT; None for any other entry (an If-Match, a record-backed type ...)."""
    if (
        entry.method != "PUT"
        or entry.resource_id is not None
        or entry.if_match is not None
        or entry.resource_type in RECORD_KINDS
        or entry.resource is None
    ):
        return None
    identifier = identifier_criteria(entry.query or "")
    if identifier is None or entry.resource_type not in STORED_TYPES:
        return None
    check_writable(entry.resource_type)
    given = entry.resource.get("id")
    resource = resource_body(
        entry.resource, entry.resource_type, given if isinstance(given, str) else None
    )
    return IdentifierUpdate(entry.resource_type, identifier, resource)


def _plain_create(entry: Entry, *, conditional: bool = False) -> bool:
    """A POST of a stored-as-sent type whose new id is planned: nothing to look up or lock
    (`conditional`: or a conditional create of one, once it is known to match nothing)."""
    return (
        entry.method == "POST"
        and (conditional or entry.if_none_exist is None)
        and entry.planned_id is not None
        and entry.resource_type not in RECORD_KINDS
    )


def _batch_entry(writer: FacadeWriter, entry: Entry, *, strict: bool) -> Written | Deleted | None:
    """One batch entry, its conditional references resolved in its own unit of work."""
    if entry.resource is not None:
        resolved: dict[str, str] = {}
        _resolve_references(writer, entry, resolved)
        if resolved:
            entry.resource = _rewrite(entry.resource, resolved)
    return _run_entry(writer, entry, strict=strict)


def _check_independent(entry: Entry, local: dict[str, int]) -> None:
    """A batch entry's resource refers to no other entry of the batch by its fullUrl."""
    if entry.resource is None or not local:
        return
    base = _restful_base(entry.full_url)
    for reference in sorted(_references(entry.resource)):
        full_url = reference if base is None or "://" in reference else f"{base}/{reference}"
        other = local.get(full_url, local.get(reference))
        if other is not None and other != entry.index:
            raise FhirError(
                400,
                "invalid",
                f"the reference {reference!r} names entry {other} of this batch; batch entries "
                "are independent and may not refer to each other (send a transaction)",
            )


def run_batch(
    *,
    services: Services,
    base: str,
    request_id: str | None,
    entries: list[Entry],
    strict: bool = False,
) -> None:
    """Each entry in a unit of work of its own; a failed entry reports its OperationOutcome."""
    # What other entries create, or name only within this Bundle, is no resource a batch
    # entry may refer to (http.html#brules: such references are non-conformant).
    local = {
        entry.full_url: entry.index
        for entry in entries
        if entry.full_url is not None
        and (entry.method == "POST" or not entry.full_url.startswith(("http://", "https://")))
    }
    for entry in sorted(entries, key=lambda e: (_ORDER[e.method], e.index)):
        try:
            if entry.failure is not None:
                raise entry.failure
            _check_independent(entry, local)
            outcome = run_write(
                services=services,
                base=base,
                request_id=request_id,
                action=lambda writer, entry=entry: _batch_entry(  # type: ignore[misc]
                    writer, entry, strict=strict
                ),
            )
        except FhirError as error:
            failed = EntryFailed.of(entry, error)
            entry.response = {
                "status": f"{error.status}",
                "outcome": failed.outcome(),
            }
            entry.body = None
            continue
        _record(entry, base, outcome)


def transaction(
    *,
    services: Services,
    base: str,
    request_id: str | None,
    entries: list[Entry],
    strict: bool = False,
) -> None:
    """Run a transaction, again if PostgreSQL chose it as a deadlock victim."""
    sent = [entry.resource for entry in entries]  # rewriting builds copies: these stay as sent
    for attempt in range(_RETRIES):
        try:
            run_write(
                services=services,
                base=base,
                request_id=request_id,
                action=lambda writer: run_transaction(writer, entries, strict=strict),
            )
            return
        except DBAPIError as error:
            code = getattr(error.orig, "sqlstate", None)
            if code not in ("40P01", "40001") or attempt == _RETRIES - 1:
                raise
            # Again from the Bundle as sent: ids are planned and references resolved anew.
            for entry, resource in zip(entries, sent, strict=True):
                entry.response, entry.body, entry.resource = {}, None, resource


def response_bundle(kind: str, entries: list[Entry]) -> bytes:
    """The batch-response or transaction-response, entries in the request's order."""
    parts = []
    for entry in entries:
        head = {"response": entry.response}
        item = orjson.dumps(head)
        if entry.body is not None:
            item = item[:-1] + b',"resource":' + entry.body + b"}"
        parts.append(item)
    start = orjson.dumps({"resourceType": "Bundle", "type": f"{kind}-response"})
    if not parts:
        return start  # FHIR JSON has no empty arrays: no entry at all
    return start[:-1] + b',"entry":[' + b",".join(parts) + b"]}"


_RETURN = re.compile(r'return\s*=\s*"?(minimal|representation|OperationOutcome)"?', re.IGNORECASE)


def apply_return_preference(entries: list[Entry], prefer: str | None) -> None:
    """`Prefer: return=` for the entries that wrote (a read's or search's answer is its body):
    `minimal` leaves their resources out, `OperationOutcome` gives each, in place of its
    resource, an OperationOutcome in `response.outcome` (http.html#transaction-response)."""
    match = _RETURN.search(prefer or "")
    preference = "representation" if match is None else match.group(1).lower()
    if preference == "representation":
        return
    for entry in entries:
        if entry.method in ("GET", "HEAD") or "outcome" in entry.response:
            continue
        if preference == "operationoutcome":
            location = entry.response.get("location")
            status = entry.response.get("status", "")
            entry.response["outcome"] = {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "information",
                        "code": "informational",
                        "diagnostics": f"entry {entry.index} ({entry.method} {entry.url}): "
                        + (f"{status}, {location}" if location else status),
                    }
                ],
            }
        entry.body = None


# --- HTTP -----------------------------------------------------------------------------------------


async def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(_services)]


def _entry_check(entry: Entry) -> tuple[int, str, str, bool]:
    return entry.index, entry.method, entry.resource_type, bool(entry.query or entry.if_none_exist)


def _get_checks(entry: Entry) -> list[tuple[str, str]]:
    """What a GET entry needs, decided as the access middleware decides it for the same request
    sent alone: `s` to search (and read on what `_include` / `_revinclude` reach), `r` to read."""
    params = parse_qsl(entry.query or "", keep_blank_values=True)
    try:
        need = requirement("GET", "/fhir/" + "/".join(entry.path), params, {})
    except Exception:  # as in the middleware: a URL no rule understands is left to the handling
        return []
    return [] if need is None else need.checks


def authorize_bundle(scope: Scope, entries: list[Entry]) -> None:
    """Each entry needs the scope its interaction would need alone, and a conditional reference
    `s` on the type it searches; raises Forbidden naming the first entry that lacks one."""
    for entry in entries:
        where = f"entry {entry.index} ({entry.method} {entry.resource_type})"
        checks = _get_checks(entry) if entry.method in ("GET", "HEAD") else []
        if checks:
            authorize(scope, checks, where)
        else:
            authorize_entries(scope, [_entry_check(entry)])
        searched = [
            (str(match.group(1)), "s")
            for _, reference in entry.searches
            if (match := _CONDITIONAL_REFERENCE.fullmatch(reference))
        ]
        if searched:
            authorize(scope, searched, where)


def build_bundle_router() -> APIRouter:
    router = APIRouter(prefix="/fhir", tags=["fhir"], dependencies=[Depends(negotiate)])

    @router.post("", summary="Batch or transaction Bundle", response_class=Response)
    async def bundle(
        request: Request,
        services: ServicesDep,
        prefer: Annotated[str | None, Header(alias="Prefer")] = None,
    ) -> Response:
        check_media_type(request.headers.get("content-type"))
        kind, entries = parse_bundle(parse_json(await request.body()))
        authorize_bundle(request.scope, entries)
        base = str(request.base_url).rstrip("/") + "/fhir"
        request_id = getattr(request.state, "request_id", None)
        run: Callable[..., None] = transaction if kind == "transaction" else run_batch
        strict = _strict(request)
        try:
            await run_in_threadpool(
                lambda: run(
                    services=services,
                    base=base,
                    request_id=None if request_id is None else str(request_id),
                    entries=entries,
                    strict=strict,
                )
            )
        except EntryFailed as failed:
            return Response(
                orjson.dumps(failed.outcome()), status_code=failed.status, media_type=FHIR_JSON
            )
        apply_return_preference(entries, prefer)
        return Response(response_bundle(kind, entries), media_type=FHIR_JSON)

    return router
