"""FHIR read and vread (`GET /fhir/{type}/{id}`, `.../_history/{vid}`): the facade's hot path.

Two Starlette routes with raw ASGI endpoints: no dependency resolution, no request models, no
threadpool hop. Each request is one point read on a `ResourceReader` (the driver, not
SQLAlchemy) and answers the stored bytes with `ETag`, `Last-Modified` and `Content-Location`,
or 304 to a conditional read. A `FhirError` is answered with the OperationOutcome the app's
handler gives every other /fhir error (`fhir_error_response`); anything unexpected goes up to
the app's 500 handler. `FastReads`, the innermost middleware (after the request id and access
control), answers them ahead of FastAPI's exception middleware and routing; the same routes sit
in the router for whatever it leaves (see `FastReads`).

Nothing here caches a resource: every request reads the database (several API processes may
serve one PostgreSQL database). Conformance resources (profiles/) are served from memory; they
change only with a release.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

import psycopg
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.fhir.api import (
    CONFORMANCE_TYPES,
    STORED_TYPES,
    ConformanceResources,
    _check_type,
    negotiate,
)
from service.fhir.errors import (
    FHIR_JSON,
    FhirError,
    ResourceGone,
    ResourceNotFound,
    StoreUnavailable,
)
from service.problems import fhir_error_response
from service.store.reads import ResourceReader
from service.store.resources import StoredResource

log = logging.getLogger(__name__)


class _NameConvertor(Convertor[str]):
    """A path segment that can be a resource type or id: not `_history`, `$export`, ..."""

    regex = "[^/_$][^/]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("fhir_name", _NameConvertor())


_VERSION_ID = re.compile(r"[0-9]{1,9}")
"""A version id this store can have issued: ASCII digits (`str.isdigit` takes any script's, and
superscripts `int` refuses), and few enough to be a version number."""


def version_number(version_id: str) -> int | None:
    """The version a vread's `_history/{vid}` names, or None when no stored version has that id."""
    return int(version_id) if _VERSION_ID.fullmatch(version_id) else None


def not_modified(request: Request, stored: StoredResource) -> bool:
    """Conditional read: If-None-Match names this version, or If-Modified-Since is not older."""
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        wanted = {tag.strip().removeprefix("W/").strip('"') for tag in if_none_match.split(",")}
        return "*" in wanted or str(stored.version) in wanted
    if_modified_since = request.headers.get("if-modified-since")
    if if_modified_since is not None:
        try:
            since = parsedate_to_datetime(if_modified_since)
        except (TypeError, ValueError):
            return False  # an unreadable date is ignored, as RFC 9110 says
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        if since > datetime.now(UTC):
            return False  # a date later than now is invalid, so ignored (RFC 2616 14.25)
        # HTTP dates have whole seconds: compare at that precision.
        return stored.last_updated.replace(microsecond=0) <= since
    return False


def resource_response(request: Request, stored: StoredResource) -> Response:
    """The stored bytes of a version with its validators, or 304 when the client has them."""
    headers = {
        "ETag": f'W/"{stored.version}"',
        "Last-Modified": format_datetime(stored.last_updated, usegmt=True),
        "Content-Location": f"{stored.resource_type}/{stored.id}/_history/{stored.version}",
    }
    if not_modified(request, stored):
        return Response(status_code=304, headers=headers)
    return Response(stored.body, media_type=FHIR_JSON, headers=headers)


class _ReadEndpoint:
    """read (or vread) as a raw ASGI endpoint: it answers its own errors as OperationOutcomes."""

    def __init__(
        self, *, reader: ResourceReader, conformance: ConformanceResources, vread: bool
    ) -> None:
        self._reader = reader
        self._conformance = conformance
        self._vread = vread

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        try:
            await negotiate(request)
            params = scope["path_params"]
            if self._vread:
                response = await self._version(
                    request, params["resource_type"], params["resource_id"], params["version_id"]
                )
            else:
                response = await self._current(
                    request, params["resource_type"], params["resource_id"]
                )
        except FhirError as error:
            response = fhir_error_response(error)
        except (psycopg.OperationalError, sqlite3.OperationalError) as error:
            log.warning("database unavailable on read: %s", type(error).__name__)
            response = fhir_error_response(StoreUnavailable())
        await response(scope, receive, send)

    async def _current(self, request: Request, resource_type: str, resource_id: str) -> Response:
        _check_type(resource_type)
        if resource_type in CONFORMANCE_TYPES:
            raw = self._conformance.by_key.get((resource_type, resource_id))
            if raw is None:
                raise ResourceNotFound(f"{resource_type}/{resource_id} is not known")
            return Response(raw, media_type=FHIR_JSON)
        stored = await self._reader.current(resource_type, resource_id)
        if stored is None:
            raise ResourceNotFound(f"{resource_type}/{resource_id} is not known")
        if stored.deleted:
            raise ResourceGone(resource_type, resource_id, stored.version)
        return resource_response(request, stored)

    async def _version(
        self, request: Request, resource_type: str, resource_id: str, version_id: str
    ) -> Response:
        _check_type(resource_type)
        version = version_number(version_id)
        if resource_type not in STORED_TYPES or version is None:
            raise ResourceNotFound(f"{resource_type}/{resource_id}/_history/{version_id}")
        row = await self._reader.version(resource_type, resource_id, version)
        if row is None:
            raise ResourceNotFound(f"{resource_type}/{resource_id} has no version {version_id}")
        if row.body is None:
            raise ResourceGone(resource_type, resource_id, row.version)
        stored = StoredResource(
            row.resource_type, row.id, row.version, row.last_updated, False, row.body
        )
        return resource_response(request, stored)


def build_read_routes(*, reader: ResourceReader, conformance: ConformanceResources) -> list[Route]:
    """read and vread as Starlette routes, for the router where the FastAPI routes were.

    GET only: Starlette would add HEAD, which the facade answers with a 405 like every route.
    """
    return _routes(reader=reader, conformance=conformance, segment="")


def _routes(
    *, reader: ResourceReader, conformance: ConformanceResources, segment: str
) -> list[Route]:
    routes = []
    for path, vread, name in (
        (f"/fhir/{{resource_type{segment}}}/{{resource_id{segment}}}", False, "fhir_read"),
        (
            f"/fhir/{{resource_type{segment}}}/{{resource_id{segment}}}/_history/{{version_id}}",
            True,
            "fhir_vread",
        ),
    ):
        endpoint = _ReadEndpoint(reader=reader, conformance=conformance, vread=vread)
        route = Route(path, endpoint, methods=["GET"], name=name, include_in_schema=False)
        route.methods = {"GET"}
        routes.append(route)
    return routes


class FastReads:
    """ASGI middleware answering GET read and vread before FastAPI's own middleware and routing.

    Install it last (innermost): every read still gets its X-Request-ID and access control
    first. It answers only paths no other route can take: types and ids not starting with `_` or `$`
    (`_history`, `$export`, `$export-status/...` are other routes'). Everything else goes on to
    the router, where `build_read_routes` sit in the FastAPI routes' old place, so other methods
    (405 with `Allow: GET`), trailing slashes (a redirect) and odd ids (`Patient/_x`, 404) are
    answered as they always were.
    """

    def __init__(
        self, app: ASGIApp, *, reader: ResourceReader, conformance: ConformanceResources
    ) -> None:
        self.app = app
        self._routes = _routes(reader=reader, conformance=conformance, segment=":fhir_name")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            for route in self._routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)
                    await route.handle(scope, receive, send)
                    return
        await self.app(scope, receive, send)
