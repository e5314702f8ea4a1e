"""The intake API under /api/v1: upsert, read, list and import the clinic's records.

Routes parse the request, call one service function, and shape the response. A record is served
as the canonical JSON stored for it (the same body a client may PUT back); its version travels in
the ETag header.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from email.utils import format_datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from service.bootstrap import Services
from service.errors import InvalidRecord, Problem
from service.records.models import EXTERNAL_ID_PATTERN, PLURALS, RECORD_TYPES, RecordModel
from service.records.repository import RecordRepository, StoredRecord
from service.records.service import (
    ImportSummary,
    LineResult,
    Outcome,
    get_record,
    import_ndjson,
    parse_record,
    put_record,
)
from service.store.db import Database

NDJSON = "application/x-ndjson"
_EXTERNAL_ID = re.compile(EXTERNAL_ID_PATTERN)
MAX_PAGE = 1000


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
ExternalIdPath = Annotated[
    str,
    Path(
        pattern=_EXTERNAL_ID.pattern,
        description="The clinic system's own id of the record.",
    ),
]
PageLimit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Records per page.")]
Cursor = Annotated[str | None, Query(description="`next_cursor` of the previous page.")]


def _record_response(stored: StoredRecord, *, status: int = 200, **headers: str) -> Response:
    return Response(
        stored.body,
        status_code=status,
        media_type="application/json",
        headers={
            "ETag": f'"{stored.version}"',
            "Last-Modified": format_datetime(stored.updated_at, usegmt=True),
            **headers,
        },
    )


def _version_wanted(if_match: str | None) -> str | None:
    """The version an If-Match header asks for: `"3"`, `W/"3"` and `3` all mean version 3."""
    if if_match is None:
        return None
    return if_match.strip().removeprefix("W/").strip('"')


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise InvalidRecord([Problem((), "missing", "the request has no body: send the record")])
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidRecord([Problem((), "json_invalid", f"not valid JSON: {error}")]) from None


def _encode_cursor(external_id: str) -> str:
    return base64.urlsafe_b64encode(external_id.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> str | None:
    if cursor is None:
        return None
    try:
        after = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        after = ""
    if not _EXTERNAL_ID.match(after) or _encode_cursor(after) != cursor:
        raise InvalidRecord(
            [Problem(("query", "cursor"), "cursor_invalid", "not a cursor this API issued")]
        )
    return after


def _schema_ref(model: type[RecordModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    }


def _page(request: Request, items: list[StoredRecord], limit: int) -> Response:
    """A page of records, assembled from the stored bodies without re-parsing them."""
    next_cursor = _encode_cursor(items[-1].external_id) if len(items) == limit else None
    tail: dict[str, Any] = {"next_cursor": next_cursor}
    if next_cursor is not None:
        tail["next"] = str(request.url.include_query_params(cursor=next_cursor))
    content = b'{"items":[' + ",".join(item.body for item in items).encode() + b"],"
    content += orjson.dumps(tail)[1:]
    return Response(content, media_type="application/json")


def _add_kind_routes(router: APIRouter, kind: str) -> None:
    plural = PLURALS[kind]
    model = RECORD_TYPES[kind]

    async def put(
        request: Request,
        external_id: ExternalIdPath,
        services: ServicesDep,
        if_match: Annotated[str | None, Header(description="Expected current version.")] = None,
    ) -> Response:
        record = parse_record(await _json_body(request), kind=kind, external_id=external_id)
        request_id = str(request.state.request_id)

        def write() -> Any:
            with services.database.unit_of_work(write=True) as uow:
                return put_record(
                    uow=uow,
                    record=record,
                    materializer=services.materializer,
                    actor="api",
                    request_id=request_id,
                    if_match=_version_wanted(if_match),
                )

        result = await run_in_threadpool(write)
        created = result.outcome is Outcome.created
        headers = {"X-Record-Outcome": result.outcome.value}
        if created:
            headers["Location"] = str(request.url)
        return _record_response(result.stored, status=201 if created else 200, **headers)

    async def get(external_id: ExternalIdPath, services: ServicesDep) -> Response:
        def read() -> StoredRecord:
            with services.database.unit_of_work(write=False) as uow:
                return get_record(uow=uow, kind=kind, external_id=external_id)

        return _record_response(await run_in_threadpool(read))

    async def history(external_id: ExternalIdPath, services: ServicesDep) -> Response:
        def read() -> list[dict[str, Any]]:
            with services.database.unit_of_work(write=False) as uow:
                get_record(uow=uow, kind=kind, external_id=external_id)
                changes = RecordRepository(uow.connection).history(kind, external_id)
            return [
                {
                    "version": change.version,
                    "operation": change.operation,
                    "changed_at": change.changed_at.isoformat(),
                    "changed_by": change.changed_by,
                    "request_id": change.request_id,
                    "patch": orjson.loads(change.patch) if change.patch else None,
                }
                for change in changes
            ]

        return Response(
            orjson.dumps({"items": await run_in_threadpool(read)}), media_type="application/json"
        )

    async def list_records(
        request: Request,
        services: ServicesDep,
        patient: Annotated[
            str | None, Query(description="Only records filed under this patient's external id.")
        ] = None,
        course: Annotated[
            str | None, Query(description="Only records filed under this course's external id.")
        ] = None,
        limit: PageLimit = 50,
        cursor: Cursor = None,
    ) -> Response:
        after = _decode_cursor(cursor)

        def read() -> list[StoredRecord]:
            with services.database.unit_of_work(write=False) as uow:
                return RecordRepository(uow.connection).page(
                    kind, patient_id=patient, course_id=course, after=after, limit=limit
                )

        return _page(request, await run_in_threadpool(read), limit)

    noun = model.__name__
    router.add_api_route(
        f"/{plural}/{{external_id}}",
        put,
        methods=["PUT"],
        summary=f"Create or update a {kind}",
        description=(
            f"Idempotent upsert of the {kind} with this external id. 201 when created, 200 when "
            "updated or unchanged (X-Record-Outcome says which); the body is the stored record "
            "and ETag its version. `kind` and `external_id` may be left out of the body."
        ),
        openapi_extra=_schema_ref(model),
        tags=[plural],
        response_class=Response,
        responses={
            200: {"description": f"The stored {noun}"},
            201: {"description": f"The {noun} was created"},
            412: {"description": "If-Match names another version"},
            422: {"description": "The record is invalid; `errors` lists each field path"},
        },
    )
    router.add_api_route(
        f"/{plural}/{{external_id}}",
        get,
        methods=["GET"],
        summary=f"Read a {kind}",
        tags=[plural],
        response_class=Response,
        responses={200: {"description": f"The stored {noun}"}, 404: {"description": "Not found"}},
    )
    router.add_api_route(
        f"/{plural}/{{external_id}}/history",
        history,
        methods=["GET"],
        summary=f"Every version of a {kind}: who changed it, when, and what changed",
        tags=[plural],
        response_class=Response,
    )
    router.add_api_route(
        f"/{plural}",
        list_records,
        methods=["GET"],
        summary=f"List {plural}, by external id, a page at a time",
        tags=[plural],
        response_class=Response,
    )


async def import_records(request: Request, services: ServicesDep) -> Response:
    """Bulk intake: NDJSON records of any kinds, one per line, each accepted or rejected alone.

    The answer reports every line. With `Accept: application/x-ndjson` the report streams: each
    line's result is sent once its batch is committed, so a received result is a durable one.
    """
    raw = await request.body()
    lines = raw.splitlines()
    if not any(line.strip() for line in lines):
        raise InvalidRecord([Problem((), "missing", "the import has no records: send NDJSON")])
    request_id = str(request.state.request_id)
    database: Database = services.database
    batch_size = services.settings.import_batch_size

    def batches() -> Iterator[list[LineResult]]:
        return import_ndjson(
            database=database,
            materializer=services.materializer,
            lines=lines,
            actor="api-import",
            request_id=request_id,
            batch_size=batch_size,
        )

    if NDJSON in request.headers.get("accept", ""):

        def stream() -> Iterator[bytes]:
            summary = ImportSummary()
            for batch in batches():
                for result in batch:
                    summary.add(result)
                    yield orjson.dumps(result.as_json()) + b"\n"
            yield orjson.dumps({"summary": summary.as_json()}) + b"\n"

        return StreamingResponse(stream(), media_type=NDJSON)

    def run() -> tuple[ImportSummary, list[LineResult]]:
        summary, results = ImportSummary(), []
        for batch in batches():
            for result in batch:
                summary.add(result)
                results.append(result)
        return summary, sorted(results, key=lambda result: result.line)

    summary, results = await run_in_threadpool(run)
    return Response(
        orjson.dumps(
            {"summary": summary.as_json(), "lines": [result.as_json() for result in results]}
        ),
        media_type="application/json",
    )


def build_router() -> APIRouter:
    router = APIRouter(prefix="/api/v1")
    for kind in RECORD_TYPES:
        _add_kind_routes(router, kind)
    router.add_api_route(
        "/import",
        import_records,
        methods=["POST"],
        summary="Import NDJSON records (any mix of kinds) with a report per line",
        tags=["import"],
        response_class=Response,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {NDJSON: {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    return router
