"""Bulk Data `$export` (system and Patient level) and `Patient/$everything` on the FHIR facade.

Bulk Data (FHIR Bulk Data Access IG v2, "Flat FHIR"): a kick-off (GET with query parameters,
or POST with a `Parameters` body) with `Prefer: respond-async` records a job in the database and
answers 202 with a status URL; any API process can answer a poll of it (202 with `X-Progress`
while the job counts its resources, then the manifest), a DELETE cancels it, and each output
file is streamed from the store in keyset pages when it is downloaded, as the snapshot at the
job's `transactionTime` (see `service.store.export`). A process that dies mid-job leaves a claim
that goes stale; the next poll takes the job over.

`_typeFilter` queries (`Type?search-query`, several per type ORed) are parsed by the facade's
own search (`service.fhir.search.parse_search`, strictly) at kick-off, so a bad one is a 400;
the job keeps them as given and each process rebuilds the same SQL condition from them. Result
parameters (`_sort`, `_include`, ...) are refused, as the IG says, and so are chains and `_has`,
which would reach resources of types the export does not return (and of which the snapshot
keeps no index). A POST to `Patient/$export` may name `patient` references: the export holds
those patients' compartments only.

`Patient/[id]/$everything` answers a searchset Bundle, a keyset page at a time, around the stored
bytes of the patient, its compartment and the practitioners and organizations they reference
(`Patient/$everything`: every patient's, as one walk of the store);
`start` and `end` narrow the compartment to the care date range (`CARE_DATES` says which date
of each type is its care date).

Routes parse and shape; the queries are in `service.store.export`. Nothing here re-serializes a
stored resource.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import orjson
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection, and_, or_
from starlette.background import BackgroundTask
from starlette.datastructures import QueryParams
from starlette.responses import Response, StreamingResponse

from service.fhir.api import STORED_TYPES, Negotiated, ServicesDep, preferences
from service.fhir.errors import (
    FHIR_JSON,
    FhirError,
    ResourceGone,
    ResourceNotFound,
    operation_outcome,
)
from service.fhir.search import RESULT_PARAMETERS, SearchError, parse_search
from service.fhir.search_index import date_range, parse_reference
from service.fhir.search_parameters import compartment_sources
from service.security.authorization import LOCAL_PRINCIPAL
from service.store.db import Database
from service.store.export import (
    COMPLETE,
    Compartment,
    Criteria,
    EverythingRow,
    ExportJob,
    ExportJobs,
    every_patients_page,
    everything_page,
    snapshot_count,
    snapshot_pages,
)
from service.store.resources import ResourceRepository

log = logging.getLogger(__name__)

NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
EXPORT_PARAMETERS = ("_outputFormat", "_since", "_type", "_typeFilter")
"""The kick-off parameters honoured, at system and Patient level, by GET and POST."""
PATIENT_EXPORT_PARAMETERS = (*EXPORT_PARAMETERS, "patient")
"""Patient level adds `patient` references (in a POST body only, as the IG has it)."""
FORMAT_PARAMETERS = ("_format", "_pretty")
"""The response-format parameters any FHIR request may carry."""
UNSUPPORTED_EXPORT_PARAMETERS = ("_elements", "_until", "includeAssociatedData", "organizeOutputBy")
EVERYTHING_PARAMETERS = ("start", "end", "_since", "_type", "_count")
CARE_DATES: dict[str, tuple[str, ...]] = {
    "AdverseEvent": ("date",),
    "CarePlan": ("date",),
    "Condition": ("onset-date", "recorded-date"),
    "Encounter": ("date",),
    "Goal": ("start-date",),
    "MedicationAdministration": ("effective-time",),
    "MedicationRequest": ("authoredon",),
    "Observation": ("date",),
    "Provenance": ("when",),
    "QuestionnaireResponse": ("authored",),
}
"""The care date of each compartment type for `$everything`'s `start`/`end`: the search
parameters (their index date rows) tried in order; the first a resource has is its care date.
A resource with none of them, and the Patient itself, is always in the range. When a record was
written is not a care date: a Provenance counts by when its activity occurred, an AuditEvent
has none."""

BULK = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition"


def _names(names: Sequence[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


_EXPORT_DOCUMENTATION = (
    "Kick-off by GET or by POST of a `Parameters` resource, with `Prefer: respond-async`. "
    f"Parameters: {{parameters}}. `_outputFormat`: {_names(OUTPUT_FORMATS)}. `_typeFilter`: "
    "`Type?search-query` with this server's search parameters of the type (no result "
    "parameters, chains or `_has`), several per type ORed. Not supported: "
    f"{_names(UNSUPPORTED_EXPORT_PARAMETERS)}."
)
SYSTEM_OPERATIONS: list[dict[str, str]] = [
    {
        "name": "export",
        "definition": f"{BULK}/export",
        "documentation": _EXPORT_DOCUMENTATION.format(parameters=_names(EXPORT_PARAMETERS)),
    }
]
"""System-level operations (CapabilityStatement `rest.operation`)."""
PATIENT_OPERATIONS: list[dict[str, str]] = [
    {
        "name": "export",
        "definition": f"{BULK}/patient-export",
        "documentation": _EXPORT_DOCUMENTATION.format(parameters=_names(PATIENT_EXPORT_PARAMETERS))
        + " `patient` (`valueReference` to a Patient) is taken in a POST body only.",
    },
    {
        "name": "everything",
        "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
        "documentation": "By GET or POST, on one patient (`Patient/[id]/$everything`) or on "
        f"every patient (`Patient/$everything`). Parameters: "
        f"{_names(EVERYTHING_PARAMETERS)}. `start`/`end` are the care date range: the "
        "patient, resources without a care date and resources whose care date overlaps the "
        "range (with what they reference). Care dates: "
        + "; ".join(f"{t} {', '.join(params)}" for t, params in CARE_DATES.items())
        + ".",
    },
]
"""Type-level operations on Patient (its `rest.resource.operation`), by their invocation names."""
OPERATIONS: list[dict[str, str]] = [
    {"name": "export", "definition": f"{BULK}/export"},
    {"name": "patient-export", "definition": f"{BULK}/patient-export"},
    {
        "name": "everything",
        "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
    },
]
"""Every operation of this module, named by OperationDefinition: `export` is system level,
`patient-export` (invoked as `Patient/$export`) and `everything` are type level on Patient."""

RETRY_AFTER_SECONDS = 2
CLAIM_LEASE = timedelta(seconds=60)
"""A job whose claim is older than this is taken to be abandoned (its process died)."""
PAGE_SIZE = 1000
EVERYTHING_COUNT = 50
MAX_COUNT = 1000


def _now() -> datetime:
    return datetime.now(UTC)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _compartment() -> Compartment:
    return compartment_sources()


def _compartment_types() -> tuple[str, ...]:
    """The stored types a Patient-level export covers: Patient and its compartment's types."""
    compartment = _compartment()
    return tuple(t for t in STORED_TYPES if t == "Patient" or compartment.get(t))


def _referenced_types() -> tuple[str, ...]:
    """Stored types in no Patient compartment ($everything adds those its resources reference)."""
    compartment_types = _compartment_types()
    return tuple(t for t in STORED_TYPES if t not in compartment_types)


# --- parameters ---------------------------------------------------------------------------------


def parse_instant(value: str, name: str) -> datetime:
    """A FHIR instant (date, time and offset); a `+` that became a space in the URL is put back."""
    text = value.strip().replace(" ", "+")
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None or "T" not in text:
            raise ValueError(text)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # year 1 at +01:00 overflows in UTC
        raise FhirError(
            400, "invalid", f"{name} must be an instant with a time zone, not {value!r}", name
        ) from None


def parse_types(value: str | None, *, allowed: Sequence[str], name: str = "_type") -> list[str]:
    """The resource types of a comma list, each checked against `allowed`.

    Without a list, every allowed type but the audit trail: AuditEvents are exported only when
    named (and to a client with the audit scope).
    """
    if value is None:
        return [t for t in allowed if t != "AuditEvent"]
    wanted = list(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
    if not wanted:
        raise FhirError(400, "invalid", f"{name} names no resource type", name)
    unknown = [t for t in wanted if t not in allowed]
    if unknown:
        raise FhirError(
            400,
            "not-supported",
            f"{name}: {', '.join(unknown)} cannot be exported here (supported: "
            f"{', '.join(allowed)})",
            name,
        )
    return wanted


def _prefers_async(prefer: str | None) -> bool:
    return "respond-async" in preferences(prefer)


def _handling(prefer: str | None) -> str | None:
    """`Prefer: handling=strict|lenient`, or None when the client did not say."""
    return preferences(prefer).get("handling")


def parameters_of_body(raw: bytes, content_type: str, *, operation: str) -> list[tuple[str, str]]:
    """The (name, value) parameters of an operation's POST body, as query-style strings.

    A `Parameters` resource (a `value[x]` that is a string, number or code, or a
    `valueReference`'s reference) or a form. The access check reads a body with this function
    too, so it sees the parameters the operation does.
    """
    if not raw.strip():
        return []
    if content_type.startswith("application/x-www-form-urlencoded"):
        return QueryParams(raw.decode("latin-1")).multi_items()
    if content_type and "json" not in content_type:
        raise FhirError(415, "not-supported", f"send application/fhir+json, not {content_type}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise FhirError(400, "invalid", f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise FhirError(400, "invalid", f"the body of {operation} must be a Parameters resource")
    parameters = body.get("parameter", [])
    if not isinstance(parameters, list):
        raise FhirError(400, "invalid", "Parameters.parameter must be a list")
    out: list[tuple[str, str]] = []
    for parameter in parameters:
        if not isinstance(parameter, dict) or not isinstance(parameter.get("name"), str):
            raise FhirError(400, "invalid", "a parameter has no name")
        name = parameter["name"]
        values = [v for k, v in parameter.items() if k.startswith("value")]
        value = values[0] if len(values) == 1 else None
        if isinstance(value, dict) and "valueReference" in parameter:
            value = value.get("reference")
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise FhirError(400, "invalid", f"parameter {name} has no simple value", name)
        out.append((name, str(value)))
    return out


def _single(pairs: Sequence[tuple[str, str]], name: str) -> str | None:
    values = [value for key, value in pairs if key == name]
    if len(values) > 1:
        raise FhirError(400, "invalid", f"{name} is given more than once", name)
    return values[0] if values else None


def _joined(pairs: Sequence[tuple[str, str]], name: str) -> str | None:
    """A comma-list parameter: repeats count as one comma list (as the IG says)."""
    values = [value for key, value in pairs if key == name]
    return ",".join(values) if values else None


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """A checked kick-off: what the job will export."""

    types: list[str]
    since: datetime | None
    type_filters: dict[str, tuple[str, ...]]
    patients: list[str]


# A `_typeFilter` value is a comma list of queries, each URL-encoded by the client and decoded
# once with the rest of the URL: a comma inside a query (a search OR) is then only told from a
# separator by what follows it, the next query's `Type?`.
_NEXT_QUERY = re.compile(r",\s*(?=[A-Z][A-Za-z]*\?)")


def _query_pairs(query: str, where: str) -> list[tuple[str, str]]:
    """The parameters of one `_typeFilter` query (already decoded once; a `+` stays a `+`)."""
    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if not name:
            raise FhirError(400, "invalid", f"_typeFilter {where}: a parameter has no name")
        pairs.append((unquote(name), unquote(value)))
    return pairs


def type_criteria(resource_type: str, queries: Sequence[str], *, base: str) -> Criteria:
    """The SQL condition of a type's `_typeFilter` queries (any of them), by the facade's search.

    Strict: an unknown parameter, modifier or value is a SearchError (400), not a match of all.
    """
    alternatives = []
    for query in queries:
        where = f"{resource_type}?{query}"
        pairs = _query_pairs(query, where)
        for name, _value in pairs:
            if name in RESULT_PARAMETERS or name.split(":", 1)[0] in RESULT_PARAMETERS:
                raise FhirError(
                    400,
                    "invalid",
                    f"_typeFilter {where}: {name} is a search result parameter, which "
                    "_typeFilter does not take",
                    "_typeFilter",
                )
            if name.startswith("_has:") or "." in name:
                raise FhirError(
                    400,
                    "not-supported",
                    f"_typeFilter {where}: chained and _has parameters are not supported here",
                    "_typeFilter",
                )
        try:
            parsed = parse_search(resource_type, pairs, base=base, strict=True, filters_only=True)
        except SearchError as error:
            raise FhirError(
                400, error.code, f"_typeFilter {where}: {error.diagnostics}", "_typeFilter"
            ) from None
        if not parsed.conditions:
            raise FhirError(
                400, "invalid", f"_typeFilter {where} has no search criteria", "_typeFilter"
            )
        alternatives.append(and_(*parsed.conditions))
    return or_(*alternatives)


def parse_type_filters(
    values: Sequence[str], *, types: Sequence[str], base: str
) -> dict[str, tuple[str, ...]]:
    """Type -> its `_typeFilter` queries, each checked (by building its condition)."""
    filters: dict[str, list[str]] = {}
    for value in values:
        for item in _NEXT_QUERY.split(value):
            resource_type, mark, query = item.strip().partition("?")
            if not mark or not resource_type:
                raise FhirError(
                    400, "invalid", f"_typeFilter {item!r} is not Type?search-query", "_typeFilter"
                )
            if resource_type not in types:
                raise FhirError(
                    400,
                    "not-supported",
                    f"_typeFilter {item}: {resource_type} is not a type this export returns "
                    f"({', '.join(types)})",
                    "_typeFilter",
                )
            filters.setdefault(resource_type, []).append(query)
    checked = {t: tuple(dict.fromkeys(queries)) for t, queries in filters.items()}
    for resource_type, queries in checked.items():
        type_criteria(resource_type, queries, base=base)
    return checked


def _patient_ids(references: Sequence[str], *, base: str) -> list[str]:
    ids = []
    for reference in references:
        text = reference.strip().removeprefix(base + "/")
        resource_type, resource_id, url = parse_reference(text)
        if resource_type != "Patient" or resource_id is None or url is not None:
            raise FhirError(
                400, "invalid", f"patient {reference!r} is not a Patient reference", "patient"
            )
        ids.append(resource_id)
    return list(dict.fromkeys(ids))


def export_request(
    pairs: Sequence[tuple[str, str]],
    *,
    level: str,
    base: str,
    post: bool,
    handling: str | None = None,
) -> ExportRequest:
    """Check the kick-off parameters (query and POST body alike).

    A parameter of the IG this server does not support is a 400, unless the client sent
    `Prefer: handling=lenient`: then it is left out (export.md: "the server MAY process the
    request instead of returning an error"). A parameter the IG does not define is left out,
    unless the client sent `Prefer: handling=strict`: then it is a 400 too.
    """
    names = {name for name, _ in pairs}
    if handling == "strict":
        known = {*PATIENT_EXPORT_PARAMETERS, *UNSUPPORTED_EXPORT_PARAMETERS, *FORMAT_PARAMETERS}
        for name in sorted(names - known):
            raise FhirError(
                400, "not-supported", f"$export has no parameter {name} (handling=strict)", name
            )
    for name in UNSUPPORTED_EXPORT_PARAMETERS:
        if name in names and handling != "lenient":
            raise FhirError(400, "not-supported", f"$export does not support {name}", name)
    pairs = [(name, value) for name, value in pairs if name not in UNSUPPORTED_EXPORT_PARAMETERS]
    output_format = _single(pairs, "_outputFormat")
    # Clients often leave the `+` of application/fhir+ndjson unescaped, so it arrives a space.
    if output_format is not None and output_format.replace(" ", "+") not in OUTPUT_FORMATS:
        raise FhirError(
            400,
            "not-supported",
            f"_outputFormat {output_format} is not supported: use one of "
            f"{', '.join(OUTPUT_FORMATS)}",
            "_outputFormat",
        )
    allowed = _compartment_types() if level == "patient" else STORED_TYPES
    type_text = _joined(pairs, "_type")
    if handling == "lenient" and type_text is not None:
        # Types this export does not return are left out; if none is left, the error says so.
        wanted = [t.strip() for t in type_text.split(",") if t.strip() in allowed]
        type_text = ",".join(wanted) if wanted else type_text
    types = parse_types(type_text, allowed=allowed)
    since_text = _single(pairs, "_since")
    since = None if since_text is None else parse_instant(since_text, "_since")
    filter_values = [value for name, value in pairs if name == "_typeFilter"]
    type_filters = parse_type_filters(filter_values, types=types, base=base)
    references = [value for name, value in pairs if name == "patient"]
    if references and level != "patient":
        raise FhirError(400, "not-supported", "patient applies to Patient/$export only", "patient")
    if references and not post:
        raise FhirError(
            400,
            "not-supported",
            "patient is taken in the Parameters body of a POST kick-off only",
            "patient",
        )
    patients = _patient_ids(references, base=base)
    return ExportRequest(types=types, since=since, type_filters=type_filters, patients=patients)


def _job_base(job: ExportJob) -> str:
    """The FHIR base of the job's kick-off (its filters' references are read against it)."""
    return job.request.split("?", 1)[0].removesuffix("/$export").removesuffix("/Patient")


def _criteria(job: ExportJob, resource_type: str) -> Criteria | None:
    queries = job.type_filters.get(resource_type)
    return None if not queries else type_criteria(resource_type, queries, base=_job_base(job))


# --- Bulk Data export: service functions ---------------------------------------------------------


def kick_off(
    *,
    database: Database,
    level: str,
    request_url: str,
    base: str,
    pairs: Sequence[tuple[str, str]],
    prefer: str | None,
    post: bool = False,
    client_id: str | None = None,
) -> ExportJob:
    """Check a kick-off request and record its job, its snapshot instant now, as `client_id`'s."""
    if not _prefers_async(prefer):
        raise FhirError(400, "invalid", "$export needs the header 'Prefer: respond-async'")
    wanted = export_request(pairs, level=level, base=base, post=post, handling=_handling(prefer))
    with database.unit_of_work(write=True) as uow:
        repository = ResourceRepository(uow.connection)
        for patient_id in wanted.patients:
            patient = repository.read("Patient", patient_id)
            if patient is None or patient.deleted:
                raise FhirError(
                    400, "not-found", f"patient Patient/{patient_id} is not known", "patient"
                )
        job = ExportJobs(uow.connection).create(
            job_id=str(uuid.uuid4()),
            level=level,
            request=request_url,
            types=wanted.types,
            since=wanted.since,
            now=_now(),
            type_filters=wanted.type_filters,
            patients=wanted.patients,
            client_id=client_id,
        )
        uow.commit()
    return job


def run_job(*, database: Database, job_id: str) -> None:
    """Count each type's snapshot and complete the job (a cancelled job is left alone)."""
    try:
        with database.unit_of_work(write=False) as uow:
            job = ExportJobs(uow.connection).get(job_id)
        if job is None or job.status == COMPLETE:
            return
        counts: dict[str, int] = {}
        for done, resource_type in enumerate(job.types, start=1):
            with database.unit_of_work(write=False) as uow:
                counts[resource_type] = snapshot_count(
                    connection=uow.connection,
                    job=job,
                    resource_type=resource_type,
                    compartment=_compartment(),
                    criteria=_criteria(job, resource_type),
                )
            with database.unit_of_work(write=True) as uow:
                progress = f"counted {done} of {len(job.types)} resource types"
                ExportJobs(uow.connection).report_progress(job_id, progress=progress, now=_now())
                uow.commit()
        with database.unit_of_work(write=True) as uow:
            ExportJobs(uow.connection).complete(job_id, counts=counts, now=_now())
            uow.commit()
    except Exception:
        # Its claim goes stale and a later poll takes the job over.
        log.exception("export job %s failed; it will be retried", job_id)


def _own_job(connection: Connection, job_id: str, client_id: str) -> ExportJob | None:
    """The job if `client_id` started it: another client's job is, to it, no job at all."""
    job = ExportJobs(connection).get(job_id)
    return job if job is not None and job.belongs_to(client_id) else None


def job_status(*, database: Database, job_id: str, client_id: str) -> tuple[ExportJob, bool]:
    """The job, and whether the caller must run it (its claim was stale and is now the caller's)."""
    with database.unit_of_work(write=False) as uow:
        job = _own_job(uow.connection, job_id, client_id)
    if job is None:
        raise ResourceNotFound(f"there is no export job {job_id}")
    if job.status == COMPLETE:
        return job, False
    now = _now()
    with database.unit_of_work(write=True) as uow:
        claimed = ExportJobs(uow.connection).claim(job_id, now=now, stale_before=now - CLAIM_LEASE)
        uow.commit()
    return job, claimed


def cancel(*, database: Database, job_id: str, client_id: str) -> None:
    with database.unit_of_work(write=True) as uow:
        deleted = _own_job(uow.connection, job_id, client_id) is not None
        deleted = deleted and ExportJobs(uow.connection).delete(job_id)
        uow.commit()
    if not deleted:
        raise ResourceNotFound(f"there is no export job {job_id}")


def completed_job(
    *, database: Database, job_id: str, resource_type: str, client_id: str
) -> ExportJob:
    """The complete job whose output includes `resource_type`."""
    with database.unit_of_work(write=False) as uow:
        job = _own_job(uow.connection, job_id, client_id)
    if job is None or job.status != COMPLETE or resource_type not in job.types:
        raise ResourceNotFound(f"export job {job_id} has no file of {resource_type}")
    return job


def manifest(job: ExportJob, *, base: str, requires_access_token: bool) -> dict[str, Any]:
    """The complete-status body the Bulk Data IG defines; types with no resources get no file.

    `requires_access_token`: whether the files are downloaded with the kick-off's bearer token,
    as they are whenever the facade asks for one (a file is its job's client's alone)."""
    counts = job.counts or {}
    return {
        "transactionTime": job.transaction_time.isoformat(),
        "request": job.request,
        "requiresAccessToken": requires_access_token,
        "output": [
            {"type": t, "url": f"{base}/$export-output/{job.id}/{t}.ndjson", "count": counts[t]}
            for t in job.types
            if counts.get(t)
        ],
        "error": [],
    }


def ndjson_chunks(
    *, database: Database, job: ExportJob, resource_type: str, page_size: int = PAGE_SIZE
) -> Iterator[bytes]:
    """The file's bytes, one chunk per keyset page: stored bodies, one per line."""
    for page in snapshot_pages(
        database=database,
        job=job,
        resource_type=resource_type,
        compartment=_compartment(),
        criteria=_criteria(job, resource_type),
        page_size=page_size,
    ):
        yield ("\n".join(page) + "\n").encode()


# --- Patient/$everything ------------------------------------------------------------------------


def _page_token(row: EverythingRow) -> str:
    raw = orjson.dumps([row.resource_type, row.id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str | None) -> tuple[str, str] | None:
    if token is None:
        return None
    try:
        resource_type, resource_id = orjson.loads(
            base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        )
        if not isinstance(resource_type, str) or not isinstance(resource_id, str):
            raise ValueError(token)
        return resource_type, resource_id
    except (binascii.Error, ValueError, TypeError, orjson.JSONDecodeError):
        raise FhirError(400, "invalid", "_page is not a page token this server issued") from None


def _care_bound(value: str, name: str) -> tuple[datetime, datetime]:
    try:
        return date_range(value)
    except ValueError:
        raise FhirError(
            400, "invalid", f"{name} must be a FHIR date (or dateTime), not {value!r}", name
        ) from None


def everything_parameters(params: Mapping[str, str]) -> dict[str, Any]:
    """`start`, `end`, `_count`, `_since`, `_type` and `_page` of a $everything call, checked."""
    count_text = params.get("_count")
    count = EVERYTHING_COUNT
    if count_text is not None:
        digits = count_text.strip()
        if not re.fullmatch(r"[0-9]+", digits) or not digits.strip("0"):
            raise FhirError(400, "invalid", "_count must be a positive integer", "_count")
        # A page larger than the server serves is a page as large as it serves (search.html).
        count = MAX_COUNT if len(digits) > 9 else min(int(digits), MAX_COUNT)
    since_text = params.get("_since")
    type_text = params.get("_type")
    # The range is inclusive at the bounds' precision: end=2026-10 runs to October's last instant.
    start = None if "start" not in params else _care_bound(params["start"], "start")[0]
    end = None if "end" not in params else _care_bound(params["end"], "end")[1]
    if start is not None and end is not None and start > end:
        raise FhirError(400, "invalid", "start is after end", "start")
    return {
        "count": count,
        "since": None if since_text is None else parse_instant(since_text, "_since"),
        "types": parse_types(type_text, allowed=STORED_TYPES),
        "after": _decode_page_token(params.get("_page")),
        "care_range": (start, end),
    }


def everything(
    *,
    database: Database,
    patient_id: str | None,
    count: int,
    since: datetime | None,
    types: Sequence[str] | None,
    after: tuple[str, str] | None,
    care_range: tuple[datetime | None, datetime | None] = (None, None),
) -> tuple[list[EverythingRow], bool]:
    """One page of the patient's everything (every patient's without one), and whether there
    is more."""
    if patient_id is None:
        with database.unit_of_work(write=False) as uow:
            rows = every_patients_page(
                connection=uow.connection,
                compartment=_compartment(),
                referenced_types=_referenced_types(),
                types=types,
                since=since,
                after=after,
                limit=count + 1,
                care_range=care_range,
                care_dates=CARE_DATES,
            )
        return rows[:count], len(rows) > count
    with database.unit_of_work(write=False) as uow:
        patient = ResourceRepository(uow.connection).read("Patient", patient_id)
        if patient is None:
            raise ResourceNotFound(f"Patient/{patient_id} is not known")
        if patient.deleted:
            raise ResourceGone("Patient", patient_id, patient.version)
        rows = everything_page(
            connection=uow.connection,
            patient_id=patient_id,
            compartment=_compartment(),
            referenced_types=_referenced_types(),
            types=types,
            since=since,
            after=after,
            limit=count + 1,
            care_range=care_range,
            care_dates=CARE_DATES,
        )
    return rows[:count], len(rows) > count


def searchset_bundle(
    rows: Sequence[EverythingRow], *, base: str, self_url: str, next_url: str | None
) -> bytes:
    """A searchset Bundle spliced around the stored bytes (never re-serialized)."""
    compartment_types = _compartment_types()
    parts = []
    for row in rows:
        mode = "match" if row.resource_type in compartment_types else "include"
        head = orjson.dumps({"fullUrl": f"{base}/{row.resource_type}/{row.id}"})[:-1]
        tail = orjson.dumps({"search": {"mode": mode}})[1:]
        parts.append(head + b',"resource":' + row.body.encode() + b"," + tail)
    links = [{"relation": "self", "url": self_url}]
    if next_url is not None:
        links.append({"relation": "next", "url": next_url})
    bundle = orjson.dumps({"resourceType": "Bundle", "type": "searchset", "link": links})
    if not parts:
        return bundle  # FHIR JSON has no empty arrays: no entry at all
    return bundle[:-1] + b',"entry":[' + b",".join(parts) + b"]}"


async def _parameters_body(request: Request, *, operation: str) -> list[tuple[str, str]]:
    """The parameters of an operation's POST body."""
    raw = await request.body()
    content_type = request.headers.get("content-type", "")
    return parameters_of_body(raw, content_type, operation=operation)


# --- routes -------------------------------------------------------------------------------------


def _client_id(request: Request) -> str:
    """Who is asking, as the access middleware authenticated them ("local" with auth off)."""
    principal = request.scope.get("state", {}).get("principal")
    return str(getattr(principal, "client_id", LOCAL_PRINCIPAL.client_id))


def build_export_router() -> APIRouter:
    router = APIRouter(prefix="/fhir", tags=["fhir"], dependencies=[Negotiated])

    async def _kick_off(request: Request, services: ServicesDep, level: str) -> Response:
        pairs = request.query_params.multi_items()
        post = request.method == "POST"
        if post:
            pairs += await _parameters_body(request, operation="$export")
        job = await run_in_threadpool(
            lambda: kick_off(
                database=services.database,
                level=level,
                request_url=str(request.url),
                base=_base(request),
                pairs=pairs,
                prefer=request.headers.get("prefer"),
                post=post,
                client_id=_client_id(request),
            )
        )
        outcome = operation_outcome(
            "informational", f"export job {job.id} accepted", severity="information"
        )
        return Response(
            orjson.dumps(outcome),
            status_code=202,
            media_type=FHIR_JSON,
            headers={"Content-Location": f"{_base(request)}/$export-status/{job.id}"},
            background=BackgroundTask(run_job, database=services.database, job_id=job.id),
        )

    def _kick_off_at(level: str) -> Callable[..., Awaitable[Response]]:
        async def kick_off_route(request: Request, services: ServicesDep) -> Response:
            return await _kick_off(request, services, level)

        return kick_off_route

    # One route per method: a route of two methods would give both one OpenAPI operationId.
    for method in ("GET", "POST"):
        for path, level, summary in (
            ("/$export", "system", "Bulk Data export of the whole store"),
            (
                "/Patient/$export",
                "patient",
                "Bulk Data export of every Patient compartment (or of the patients named)",
            ),
        ):
            router.add_api_route(
                path,
                _kick_off_at(level),
                methods=[method],
                name=f"{level}_export_{method.lower()}",
                summary=summary,
                response_class=Response,
            )

    @router.get(
        "/$export-status/{job_id}", summary="Bulk Data export status", response_class=Response
    )
    async def export_status(request: Request, job_id: str, services: ServicesDep) -> Response:
        client_id = _client_id(request)
        job, claimed = await run_in_threadpool(
            lambda: job_status(database=services.database, job_id=job_id, client_id=client_id)
        )
        if job.status == COMPLETE:
            body = manifest(
                job,
                base=_base(request),
                requires_access_token=not services.settings.auth_disabled,
            )
            return Response(orjson.dumps(body), media_type="application/json")
        background = (
            BackgroundTask(run_job, database=services.database, job_id=job.id) if claimed else None
        )
        return Response(
            status_code=202,
            headers={
                "X-Progress": job.progress or "in progress",
                "Retry-After": str(RETRY_AFTER_SECONDS),
            },
            background=background,
        )

    @router.delete(
        "/$export-status/{job_id}", summary="Cancel a Bulk Data export", response_class=Response
    )
    async def export_cancel(request: Request, job_id: str, services: ServicesDep) -> Response:
        client_id = _client_id(request)
        await run_in_threadpool(
            lambda: cancel(database=services.database, job_id=job_id, client_id=client_id)
        )
        outcome = operation_outcome(
            "informational", f"export job {job_id} cancelled", severity="information"
        )
        return Response(orjson.dumps(outcome), status_code=202, media_type=FHIR_JSON)

    @router.get(
        "/$export-output/{job_id}/{file_name}",
        summary="A Bulk Data export file (NDJSON, streamed)",
        response_class=StreamingResponse,
    )
    async def export_output(
        request: Request, job_id: str, file_name: str, services: ServicesDep
    ) -> Response:
        resource_type = file_name.removesuffix(".ndjson")
        client_id = _client_id(request)
        job = await run_in_threadpool(
            lambda: completed_job(
                database=services.database,
                job_id=job_id,
                resource_type=resource_type,
                client_id=client_id,
            )
        )
        # A sync iterator: Starlette pulls each page in the threadpool, one page in memory.
        chunks = ndjson_chunks(database=services.database, job=job, resource_type=resource_type)
        return StreamingResponse(chunks, media_type=NDJSON)

    async def _everything(
        request: Request, patient_id: str | None, services: ServicesDep, params: Mapping[str, str]
    ) -> Response:
        parsed = everything_parameters(params)
        rows, more = await run_in_threadpool(
            lambda: everything(database=services.database, patient_id=patient_id, **parsed)
        )
        base = _base(request)
        own = f"{base}/Patient/$everything"
        if patient_id is not None:
            own = f"{base}/Patient/{patient_id}/$everything"
        kept = {k: v for k, v in params.items() if k in EVERYTHING_PARAMETERS}
        self_query = dict(kept) | ({"_page": params["_page"]} if "_page" in params else {})
        self_url = f"{own}?{QueryParams(self_query)}" if self_query else own
        next_url = None
        if more:
            next_url = f"{own}?{QueryParams(kept | {'_page': _page_token(rows[-1])})}"
        body = searchset_bundle(rows, base=base, self_url=self_url, next_url=next_url)
        return Response(body, media_type=FHIR_JSON)

    @router.get(
        "/Patient/$everything",
        summary="Every patient and everything in their compartments",
        response_class=Response,
    )
    async def every_patient_get(request: Request, services: ServicesDep) -> Response:
        return await _everything(request, None, services, dict(request.query_params))

    @router.post(
        "/Patient/$everything",
        summary="Every patient and everything in their compartments",
        response_class=Response,
    )
    async def every_patient_post(request: Request, services: ServicesDep) -> Response:
        body = await _parameters_body(request, operation="$everything")
        params = dict(request.query_params) | dict(body)
        return await _everything(request, None, services, params)

    @router.get(
        "/Patient/{patient_id}/$everything",
        summary="The patient and everything in its compartment",
        response_class=Response,
    )
    async def everything_get(request: Request, patient_id: str, services: ServicesDep) -> Response:
        return await _everything(request, patient_id, services, dict(request.query_params))

    @router.post(
        "/Patient/{patient_id}/$everything",
        summary="The patient and everything in its compartment",
        response_class=Response,
    )
    async def everything_post(request: Request, patient_id: str, services: ServicesDep) -> Response:
        body = await _parameters_body(request, operation="$everything")
        params = dict(request.query_params) | dict(body)
        return await _everything(request, patient_id, services, params)

    return router
