"""The FHIR R4 facade at /fhir, read side: metadata, history, search and $validate.

read and vread, the hot path, are plain routes in `service.fhir.reads`.

Reads serve the stored bytes of each resource version as they are; nothing is re-mapped or
re-parsed on the way out. History Bundles are assembled around those bytes. The conformance
resources the service publishes (profiles/) are readable at their own URLs. The
CapabilityStatement is generated from what this module really implements.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import sqlite3
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl

import orjson
import psycopg
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from service.bootstrap import Services
from service.fhir.errors import (
    FHIR_JSON,
    FhirError,
    NotAcceptable,
    ResourceNotFound,
    StoreUnavailable,
)
from service.fhir.search import (
    Row,
    SearchError,
    SearchPage,
    SearchQuery,
    one_statement,
    page_of,
    page_statement,
    parse_search,
    query_string,
    run_search,
)
from service.fhir.search_index import date_range
from service.fhir.search_parameters import INDEXED_TYPES, definitions
from service.json_text import dump_json, load_json
from service.store.resources import ResourceRepository, VersionRow

STORED_TYPES = INDEXED_TYPES
"""Resource types the store holds (materialized from the clinic's records, and the audit trail:
AuditEvent, written by `service.security.audit`, read-only here)."""

CONFORMANCE_TYPES = ("CodeSystem", "ConceptMap", "Questionnaire", "StructureDefinition", "ValueSet")
"""Resource types of the package in profiles/, read-only."""

READ_INTERACTIONS = ("read", "vread", "history-instance", "history-type", "search-type")
"""What this module implements for stored types (CapabilityStatement interaction codes)."""
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
}
MAX_COUNT = 1000

log = logging.getLogger(__name__)


CONFORMANCE_SEARCH = ("url", "name", "version", "status")
"""Parameters a search of the published conformance resources supports (besides `_id`)."""


class ConformanceResources:
    """The package in profiles/: served by id, and listed in the CapabilityStatement."""

    def __init__(self, folder: Path) -> None:
        self.by_key: dict[tuple[str, str], bytes] = {}
        self.fields: dict[tuple[str, str], dict[str, str]] = {}
        self.profiles_by_type: dict[str, list[str]] = {}
        for path in sorted(folder.glob("*.json")):
            if path.name == "package.json":
                continue
            raw = path.read_bytes()
            resource = orjson.loads(raw)
            self.by_key[(resource["resourceType"], resource["id"])] = raw
            self.fields[(resource["resourceType"], resource["id"])] = {
                name: str(resource[name]) for name in CONFORMANCE_SEARCH if name in resource
            }
            if resource["resourceType"] == "StructureDefinition" and resource.get("kind") == (
                "resource"
            ):
                self.profiles_by_type.setdefault(resource["type"], []).append(resource["url"])

    def search(
        self, resource_type: str, query: SearchQuery, criteria: list[tuple[str, str]]
    ) -> SearchPage:
        """The package is small and fixed: searched in memory, on exact values."""
        rows = []
        for (kind, resource_id), raw in sorted(self.by_key.items()):
            if kind != resource_type:
                continue
            found = {"_id": resource_id, **self.fields[(kind, resource_id)]}
            if all(found.get(name) in value.split(",") for name, value in criteria):
                rows.append(Row(kind, resource_id, raw.decode()))
        return SearchPage(rows[: query.count], [], len(rows), None)


async def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def _conformance(request: Request) -> ConformanceResources:
    conformance: ConformanceResources = request.app.state.conformance
    return conformance


# Dependencies are `async def`: FastAPI runs a plain `def` dependency in the threadpool, a
# thread hop per dependency per request on the read path.
ServicesDep = Annotated[Services, Depends(_services)]
ConformanceDep = Annotated[ConformanceResources, Depends(_conformance)]


_PLAIN_ACCEPT = frozenset(
    ("", "*/*", "application/fhir+json", "application/json", "application/json, */*")
)
"""Accept headers answered without parsing: what clients send on almost every request."""
JSON_FORMATS = frozenset(
    (
        *("json", "application/json", "application/fhir+json", "application/json+fhir"),
        # Bulk Data output files, which a client downloads with Accept: application/fhir+ndjson
        *("ndjson", "application/ndjson", "application/fhir+ndjson", "application/x-ndjson"),
    )
)
"""`_format` values and media types that are FHIR JSON (R4 http.html#mime-type), or NDJSON."""
_ANY = frozenset(("*/*", "application/*"))
FHIR_VERSIONS = frozenset(("4.0", "4.0.1"))
"""`fhirVersion` media type parameter values this server speaks (R4 versioning.html)."""


def _media_range(text: str) -> tuple[str, dict[str, str]]:
    """A media type or range, lower-cased, and its parameters (`q`, `fhirVersion` ...)."""
    kind, *rest = text.split(";")
    parameters: dict[str, str] = {}
    for item in rest:
        name, _, value = item.partition("=")
        parameters[name.strip().lower()] = value.strip().strip('"')
    return kind.strip().lower(), parameters


def speaks_json(text: str) -> bool:
    """Whether a media type (or `_format` value) is FHIR JSON in the FHIR version served."""
    kind, parameters = _media_range(text)
    version = parameters.get("fhirversion")
    json = kind in JSON_FORMATS or kind.endswith(("/json", "+json"))
    return json and (version is None or version in FHIR_VERSIONS)


def _accepts_json(accept: str) -> bool:
    """Whether an Accept header allows FHIR JSON: a JSON type or `*/*`, at a q above 0."""
    for item in accept.split(","):
        kind, parameters = _media_range(item)
        try:
            weight = float(parameters.get("q", "1"))
        except ValueError:
            weight = 1.0  # an unreadable weight: the range as if it had none
        if weight <= 0:
            continue
        if kind in _ANY or speaks_json(item):
            return True
    return False


async def negotiate(request: Request) -> None:
    """JSON only: `_format` or Accept asking for XML (or anything but R4 JSON) is a 406.

    `_format` wins over Accept (R4 http.html#mime-type). A JSON type at `q=0`, or with a
    `fhirVersion` other than 4.0, is not acceptable.
    """
    wanted = request.query_params.get("_format")
    if wanted:  # an empty `_format` asks for nothing: Accept decides
        if speaks_json(wanted):
            return
    else:
        wanted = request.headers.get("accept") or ""
        if wanted in _PLAIN_ACCEPT or _accepts_json(wanted):
            return
    raise NotAcceptable(f"this server answers in application/fhir+json, not {wanted}")


Negotiated = Depends(negotiate)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _check_type(resource_type: str) -> None:
    if resource_type not in STORED_TYPES and resource_type not in CONFORMANCE_TYPES:
        raise ResourceNotFound(f"resource type {resource_type} is not supported here")


def _history_bundle(
    request: Request,
    rows: Sequence[VersionRow],
    next_url: str | None,
    recreated: Collection[tuple[str, int]] = (),
) -> bytes:
    """A history Bundle around the stored bytes, newest version first.

    Each entry's request and response say what made the version: a create (the first version,
    or an update after a deletion: `recreated`'s (id, version) pairs), an update or a delete.
    """
    base = _base(request)
    parts = []
    for row in rows:
        url = f"{row.resource_type}/{row.id}"
        method = "DELETE" if row.deleted else ("POST" if row.version == 1 else "PUT")
        created = row.version == 1 or (row.id, row.version) in recreated
        status = "204 No Content" if row.deleted else ("201 Created" if created else "200 OK")
        head = orjson.dumps({"fullUrl": f"{base}/{url}"})[:-1]
        tail = orjson.dumps(
            {
                "request": {"method": method, "url": url},
                "response": {
                    "status": status,
                    "etag": f'W/"{row.version}"',
                    "lastModified": row.last_updated.isoformat(),
                },
            }
        )[1:]
        resource = b"" if row.body is None else b',"resource":' + row.body.encode()
        parts.append(head + resource + b"," + tail)
    links = [{"relation": "self", "url": str(request.url)}]
    if next_url is not None:
        links.append({"relation": "next", "url": next_url})
    head = orjson.dumps({"resourceType": "Bundle", "type": "history", "link": links})
    if not parts:
        return head  # FHIR JSON has no empty arrays: an empty page has no `entry`
    return head[:-1] + b',"entry":[' + b",".join(parts) + b"]}"


def _cursor(row: VersionRow) -> str:
    raw = orjson.dumps([row.last_updated.isoformat(), row.id, row.version])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_PAGE_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _decode_cursor(token: str | None) -> tuple[datetime, str, int] | None:
    if token is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        when, resource_id, version = orjson.loads(raw)
        moment = datetime.fromisoformat(when)
        # What `_cursor` writes: an aware time, an id, a version; a forged token is no query.
        if (
            moment.tzinfo is None
            or not isinstance(resource_id, str)
            or not _PAGE_ID.fullmatch(resource_id)
            or type(version) is not int
            or not 0 < version < 2**31
        ):
            raise ValueError(token)
        return moment.astimezone(UTC), resource_id, version  # year 1 at +01:00 overflows
    except (binascii.Error, ValueError, TypeError, OverflowError, orjson.JSONDecodeError):
        raise FhirError(400, "invalid", "_page is not a page token this server issued") from None


def _instant(value: str, name: str) -> datetime:
    """A FHIR instant (date, time and offset), as `_since` is typed; a `+` that became a space in
    the URL is put back. A date alone, a time without its offset or a number is a 400: read as
    anything else it would pick versions the client did not ask for."""
    text = value.strip().replace(" ", "+")
    try:
        if "T" not in text:
            raise ValueError(text)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            raise ValueError(text)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # year 1 at +01:00 overflows in UTC
        raise FhirError(
            400, "invalid", f"{name} must be an instant with a time zone, not {value!r}", name
        ) from None


def _period(value: str, name: str) -> tuple[datetime, datetime]:
    """The inclusive UTC range a date or dateTime covers at its precision (`_at=2026-10` is the
    whole month), as a search's date parameter reads it."""
    try:
        return date_range(value.replace(" ", "+"))
    except ValueError:
        raise FhirError(
            400, "invalid", f"{name} must be a FHIR date or dateTime, not {value!r}", name
        ) from None


Count = Annotated[int, Query(alias="_count", ge=1)]
"""A history page's size; more than `MAX_COUNT` is `MAX_COUNT`: the server is not bound to
return the number asked for, only not to return more (R4 search.html#count)."""
Since = Annotated[str | None, Query(alias="_since")]
At = Annotated[str | None, Query(alias="_at")]
Page = Annotated[str | None, Query(alias="_page")]


async def _history(
    request: Request,
    services: Services,
    resource_type: str,
    resource_id: str | None,
    count: int,
    since_text: str | None,
    page: str | None,
    at_text: str | None = None,
) -> Response:
    """Type history (`resource_id` None) or instance history, newest first, a page at a time:
    `_since` the versions made at or after an instant, `_at` those current at some point of a
    date's or dateTime's range."""
    _check_type(resource_type)
    if resource_type not in STORED_TYPES:
        raise FhirError(405, "not-supported", f"{resource_type} has no history here")
    count = min(count, MAX_COUNT)
    since = None if since_text is None else _instant(since_text, "_since")
    at = None if at_text is None else _period(at_text, "_at")
    after = _decode_cursor(page)

    def read() -> tuple[list[VersionRow], set[tuple[str, int]], bool]:
        """The page of versions, those of them that followed a deletion, and whether the
        resource is known (an instance's history)."""
        with services.database.unit_of_work(write=False) as uow:
            repository = ResourceRepository(uow.connection)
            rows = repository.type_history(
                resource_type,
                resource_id=resource_id,
                since=since,
                at=at,
                before=after,
                limit=count + 1,
            )
            updates = [(row.id, row.version - 1) for row in rows if row.version > 1]
            deletions = repository.deletions(resource_type, updates) if updates else set()
            recreated = {(row_id, version + 1) for row_id, version in deletions}
            if resource_id is None or rows:
                return rows, recreated, True
            # Nothing on this page: a resource whose versions the filters left out, or none.
            return rows, recreated, repository.read(resource_type, resource_id) is not None

    rows, recreated, known = await run_in_threadpool(read)
    if not known:
        raise ResourceNotFound(f"{resource_type}/{resource_id} is not known")
    next_url = None
    if len(rows) > count:
        rows = rows[:count]
        next_url = str(request.url.include_query_params(_page=_cursor(rows[-1])))
    return Response(_history_bundle(request, rows, next_url, recreated), media_type=FHIR_JSON)


async def _fhir_json(request: Request) -> Any:
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type:
        raise FhirError(415, "not-supported", f"send application/fhir+json, not {content_type}")
    raw = await request.body()
    try:
        return load_json(raw)
    except orjson.JSONDecodeError as error:
        raise FhirError(400, "invalid", f"the body is not valid JSON: {error}") from None


VALIDATE_MODES = ("create", "update", "delete")
"""$validate's `mode` (ResourceValidationMode, R4)."""


def _validate_input(
    body: Any, query: Mapping[str, str]
) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """The resource, profile and mode of a $validate call: a resource (with `profile` and
    `mode` in the URL), or Parameters holding them (the URL's are taken for those it lacks)."""
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise FhirError(400, "invalid", "the body is not a FHIR resource")
    resource: dict[str, Any] | None = None
    profile = query.get("profile")
    mode = query.get("mode")
    if body["resourceType"] != "Parameters":
        resource = body
    else:
        parameters = body.get("parameter", [])
        for index, parameter in enumerate(parameters if isinstance(parameters, list) else ()):
            where = f"Parameters.parameter[{index}]"
            if not isinstance(parameter, dict):
                raise FhirError(400, "invalid", "a parameter is not an object", expression=where)
            name = parameter.get("name")
            if name == "resource":
                if resource is not None:
                    raise FhirError(
                        400, "invalid", "Parameters has more than one 'resource'", expression=where
                    )
                if not isinstance(parameter.get("resource"), dict):
                    raise FhirError(
                        400, "invalid", "'resource' holds no resource", expression=where
                    )
                resource = parameter["resource"]
            elif name == "profile":
                value = parameter.get("valueUri", parameter.get("valueCanonical"))
                if not isinstance(value, str):
                    raise FhirError(
                        400, "invalid", "'profile' is not a uri or canonical", expression=where
                    )
                profile = value
            elif name == "mode":
                value = parameter.get("valueCode")
                if not isinstance(value, str):
                    raise FhirError(400, "invalid", "'mode' is not a code", expression=where)
                mode = value
    if mode is not None and mode not in VALIDATE_MODES:
        raise FhirError(
            400,
            "invalid",
            f"mode {mode!r} is none of {', '.join(VALIDATE_MODES)}",
            expression="mode",
        )
    if resource is None and mode != "delete":
        raise FhirError(400, "required", "Parameters has no 'resource' parameter")
    return resource, profile, mode


def _outcome(severity: str, code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": text}],
    }


def preferences(prefer: str | None) -> dict[str, str]:
    """The preferences of a `Prefer` header (RFC 7240): token -> value, in lower case; the
    parameters after a `;` belong to their preference and are left out."""
    found: dict[str, str] = {}
    for part in (prefer or "").split(","):
        token, _, value = part.split(";", 1)[0].partition("=")
        if token.strip():
            found.setdefault(token.strip().lower(), value.strip().strip('"').lower())
    return found


def _strict(request: Request) -> bool:
    """`Prefer: handling=strict`: an unknown or unsupported parameter is an error."""
    return preferences(request.headers.get("prefer")).get("handling") == "strict"


def _subset(body: str, query: SearchQuery) -> bytes:
    """`_summary` / `_elements`: the stored resource cut down, and tagged SUBSETTED."""
    resource: dict[str, Any] = load_json(body)
    keep: set[str] | None = None
    if query.summary == "true":
        keep = set(definitions().summary_elements.get(resource["resourceType"], ()))
    elif query.elements:
        keep = set(query.elements)
    out: dict[str, Any] = {}
    for key, value in resource.items():
        if key in ("resourceType", "id", "meta"):
            out[key] = value
        elif query.summary == "data":
            if key != "text":
                out[key] = value
        elif keep is not None and _selected(key, keep):
            out[key] = value
    meta = dict(out.get("meta", {}))
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    out["meta"] = meta
    return dump_json(out)


def _selected(key: str, keep: set[str]) -> bool:
    """Whether a JSON key carries a kept element: `_birthDate` is `birthDate`, and
    `valueQuantity` is the choice element `value`."""
    name = key.removeprefix("_")
    if name in keep:
        return True
    return any(
        name.startswith(element) and len(name) > len(element) and name[len(element)].isupper()
        for element in keep
    )


def searchset_bundle(base: str, query: SearchQuery, page: SearchPage) -> bytes:
    """The searchset Bundle around the stored bytes of the page's resources (its links under
    `base`): a search's answer, alone or in a Bundle entry."""
    applied = query_string(query.applied)
    self_url = f"{base}/{query.resource_type}" + (f"?{applied}" if applied else "")
    links = [{"relation": "self", "url": self_url}]
    if page.next_cursor is not None:
        cursor = query_string([*query.applied, ("_page", page.next_cursor)])
        links.append({"relation": "next", "url": f"{base}/{query.resource_type}?{cursor}"})
    head: dict[str, Any] = {
        "resourceType": "Bundle",
        "meta": {"lastUpdated": datetime.now(UTC).isoformat()},
        "type": "searchset",
    }
    if page.total is not None:
        head["total"] = page.total
    head["link"] = links
    subsetting = query.summary in ("true", "data") or bool(query.elements)
    parts: list[bytes] = []
    for mode, rows in (("match", page.matches), ("include", page.included)):
        for row in rows:
            body = _subset(row.body, query) if subsetting else row.body.encode()
            full_url = orjson.dumps(f"{base}/{row.resource_type}/{row.id}")
            search = b'{"mode":"' + mode.encode() + b'"}'
            parts.append(
                b'{"fullUrl":' + full_url + b',"resource":' + body + b',"search":' + search + b"}"
            )
    if query.ignored:
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "warning",
                    "code": "not-supported",
                    "diagnostics": f"ignored: {why}",
                    "expression": [name],
                }
                for name, why in query.ignored
            ],
        }
        parts.append(orjson.dumps({"resource": outcome, "search": {"mode": "outcome"}}))
    if not parts:
        return orjson.dumps(head)
    return orjson.dumps(head)[:-1] + b',"entry":[' + b",".join(parts) + b"]}"


async def _search(
    request: Request, services: Services, resource_type: str, params: list[tuple[str, str]]
) -> Response:
    _check_type(resource_type)
    if resource_type in CONFORMANCE_TYPES:
        return _conformance_search(request, resource_type, params)
    base = _base(request)
    query = parse_search(resource_type, params, base=base, strict=_strict(request))
    if one_statement(query):
        page = page_of(query, await _page_rows(services, query))
    else:

        def read() -> SearchPage:
            with services.database.unit_of_work(write=False) as uow:
                return run_search(uow.connection, query)

        page = await run_in_threadpool(read)
    return Response(searchset_bundle(base, query, page), media_type=FHIR_JSON)


async def _page_rows(services: Services, query: SearchQuery) -> list[tuple[Any, ...]]:
    """A search that is one statement, on the read path's connections (`services.reader`): no
    unit of work, no thread hop on PostgreSQL, the statement compiled once per shape."""
    dialect = services.database.engine.dialect
    if dialect.server_version_info is None:
        # Compiled for the dialect the engine has once it has connected (it learns the server
        # then), as the unit of work's statements are: that first connection is made here.
        await run_in_threadpool(services.database.ping)
    try:
        return await services.reader.select(
            page_statement(query), dialect, prepare=query.fixed_plan
        )
    except (psycopg.OperationalError, sqlite3.OperationalError) as error:
        log.warning("database unavailable on search: %s", type(error).__name__)
        raise StoreUnavailable() from None


def _conformance_search(
    request: Request, resource_type: str, params: list[tuple[str, str]]
) -> Response:
    query = SearchQuery(resource_type=resource_type)
    criteria: list[tuple[str, str]] = []
    for name, value in params:
        if name in ("_id", *CONFORMANCE_SEARCH):
            criteria.append((name, value.split("|")[0] if name == "url" else value))
            query.applied.append((name, value))
        elif name == "_count" and value.isdigit():
            query.count = min(int(value), MAX_COUNT)
            query.applied.append((name, value))
        elif name in ("_format", "_pretty"):
            continue
        elif _strict(request):
            raise SearchError(name, f"is not supported on {resource_type} here")
        else:
            query.ignored.append((name, f"{name}: is not supported on {resource_type} here"))
    conformance: ConformanceResources = request.app.state.conformance
    page = conformance.search(resource_type, query, criteria)
    return Response(searchset_bundle(_base(request), query, page), media_type=FHIR_JSON)


def build_router() -> APIRouter:
    router = APIRouter(prefix="/fhir", tags=["fhir"], dependencies=[Negotiated])

    async def _validate(
        request: Request, services: Services, resource_type: str, resource_id: str | None
    ) -> Response:
        # writes imports this module: its lists of what a type takes are looked up here.
        from service.fhir.writes import READ_ONLY_TYPES, UNDELETABLE_TYPES

        _check_type(resource_type)
        query = request.query_params
        resource: dict[str, Any] | None = None
        profile: str | None = None
        given: str | None = "delete"
        if query.get("mode") != "delete" or (await request.body()).strip():
            resource, profile, given = _validate_input(await _fhir_json(request), query)
        mode = given or ("create" if resource_id is None else "update")
        if mode == "delete":
            if resource_id is None:
                raise FhirError(
                    400, "invalid", "mode delete validates a resource by its id", expression="mode"
                )
            if resource_type in UNDELETABLE_TYPES or resource_type in READ_ONLY_TYPES:
                outcome = _outcome(
                    "error", "not-supported", f"{resource_type} resources are not deleted here"
                )
            else:
                outcome = _outcome("information", "informational", "No issues")
            return Response(orjson.dumps(outcome), media_type=FHIR_JSON)
        assert resource is not None
        if resource.get("resourceType") != resource_type:
            raise FhirError(
                400,
                "invalid",
                f"$validate on {resource_type} was given a {resource.get('resourceType')}",
                expression="resourceType",
            )
        if resource_id is not None and resource.get("id") != resource_id:
            raise FhirError(
                400,
                "invalid",
                f"the resource's id is not {resource_id!r}, the id in the URL",
                expression="id",
            )
        outcome = await run_in_threadpool(services.validator.outcome, resource, profile)
        refusal: dict[str, Any] | None = None
        if resource_type in READ_ONLY_TYPES:
            refusal = {
                "severity": "error",
                "code": "not-supported",
                "diagnostics": f"{resource_type} resources are read-only here",
            }
        elif mode == "update" and not resource.get("id"):
            refusal = {
                "severity": "error",
                "code": "required",
                "diagnostics": "an update needs the resource's id",
                "expression": [f"{resource_type}.id"],
            }
        if refusal is not None:  # in place of "No issues", beside the others
            kept = [issue for issue in outcome["issue"] if issue["severity"] != "information"]
            outcome["issue"] = [*kept, refusal]
        # 200 whatever the verdict: the operation worked; the outcome says what it found.
        return Response(orjson.dumps(outcome), media_type=FHIR_JSON)

    @router.post(
        "/{resource_type}/$validate",
        summary="Validate a resource (structure, profiles, invariants)",
        response_class=Response,
    )
    async def validate(request: Request, resource_type: str, services: ServicesDep) -> Response:
        return await _validate(request, services, resource_type, None)

    @router.post(
        "/{resource_type}/{resource_id}/$validate",
        summary="Validate a resource for an update or delete of the resource with this id",
        response_class=Response,
    )
    async def validate_instance(
        request: Request, resource_type: str, resource_id: str, services: ServicesDep
    ) -> Response:
        return await _validate(request, services, resource_type, resource_id)

    @router.get("/{resource_type}", summary="Search", response_class=Response)
    async def search(request: Request, resource_type: str) -> Response:
        # The services straight from the app, not as a dependency: one less for FastAPI to
        # resolve on the search path.
        services: Services = request.app.state.services
        params = list(request.query_params.multi_items())
        return await _search(request, services, resource_type, params)

    @router.post("/{resource_type}/_search", summary="Search (POST)", response_class=Response)
    async def search_post(request: Request, resource_type: str, services: ServicesDep) -> Response:
        content_type = request.headers.get("content-type", "")
        if content_type and not content_type.startswith("application/x-www-form-urlencoded"):
            raise FhirError(
                415, "not-supported", f"send application/x-www-form-urlencoded, not {content_type}"
            )
        body = (await request.body()).decode("utf-8", errors="replace")
        params = list(request.query_params.multi_items())
        params += parse_qsl(body, keep_blank_values=True)
        return await _search(request, services, resource_type, params)

    @router.get("/{resource_type}/_history", summary="Type history", response_class=Response)
    async def type_history(
        request: Request,
        resource_type: str,
        services: ServicesDep,
        count: Count = 50,
        since: Since = None,
        at: At = None,
        page: Page = None,
    ) -> Response:
        return await _history(request, services, resource_type, None, count, since, page, at)

    @router.get(
        "/{resource_type}/{resource_id}/_history",
        summary="Instance history",
        response_class=Response,
    )
    async def instance_history(
        request: Request,
        resource_type: str,
        resource_id: str,
        services: ServicesDep,
        count: Count = 50,
        since: Since = None,
        at: At = None,
        page: Page = None,
    ) -> Response:
        return await _history(request, services, resource_type, resource_id, count, since, page, at)

    return router
