"""HTTP error responses: RFC 9457 problem documents on the intake API, OperationOutcomes on /fhir.

Every error the intake API returns has the same shape:

    {"type": "about:blank", "title": "Invalid record", "status": 422,
     "detail": "vitals[0].systolic: Input should be greater than or equal to 50",
     "errors": [{"path": "vitals[0].systolic", "pointer": "/vitals/0/systolic",
                 "loc": ["vitals", 0, "systolic"], "type": "greater_than_equal",
                 "message": "Input should be greater than or equal to 50"}],
     "request_id": "..."}

An unexpected failure is logged with its details and answered with a 500 that carries only the
request id: record contents never go into an error response or a log line.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any, Final

import orjson
import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import InvalidRecord, Loc, Problem, ServiceError, dotted
from service.fhir.errors import FhirError, StoreUnavailable, outcome_response

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def problem_response(
    request: Request,
    *,
    status: int,
    title: str,
    detail: str | None = None,
    problems: list[Problem] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    document: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        document["detail"] = detail
    if problems is not None:
        document["errors"] = [problem.as_json() for problem in problems]
    document["request_id"] = request_id_of(request)
    return Response(
        orjson.dumps(document), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


def request_id_of(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def _validation_problems(error: RequestValidationError) -> list[Problem]:
    problems = []
    for item in error.errors():
        loc: Loc = tuple(item.get("loc", ()))
        # FastAPI prefixes the request part; a body error's path is the record's own field path.
        if loc and loc[0] == "body":
            loc = loc[1:]
        problems.append(Problem(loc=loc, type=str(item.get("type")), message=str(item.get("msg"))))
    return problems


def _is_fhir(request: Request) -> bool:
    return request.url.path == "/fhir" or request.url.path.startswith("/fhir/")


_ISSUE_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    415: "not-supported",
    422: "processing",
}


def fhir_error_response(error: FhirError) -> Response:
    """The OperationOutcome answering a FhirError (the FHIR read path answers its own)."""
    return outcome_response(
        error.status,
        error.code,
        error.diagnostics,
        expression=error.expression,
        headers=error.headers,
    )


_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(app: Any, scope: Scope) -> list[str]:
    """The methods some route of `app` takes for the request's path, in the usual order."""
    found = []
    for method in _METHODS:
        probe = {**scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in app.router.routes):
            found.append(method)
    return found


def install_error_handlers(app: FastAPI) -> None:
    async def fhir_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, FhirError)
        return fhir_error_response(error)

    async def service_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ServiceError)
        problems = list(error.problems) if isinstance(error, InvalidRecord) else None
        return problem_response(
            request, status=error.status, title=error.title, detail=str(error), problems=problems
        )

    async def validation_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        problems = _validation_problems(error)
        detail = "; ".join(f"{dotted(p.loc) or '(request)'}: {p.message}" for p in problems)
        if _is_fhir(request):
            return outcome_response(400, "invalid", detail)
        return problem_response(
            request, status=422, title="Invalid request", detail=detail, problems=problems
        )

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        if error.status_code == 405:
            # The router names the methods of the first route that took the path; every route
            # that takes it has its say (GET and POST on a type, PUT, PATCH and DELETE too).
            allowed = allowed_methods(request.app, request.scope)
            if allowed:
                error.headers = {**(error.headers or {}), "Allow": ", ".join(allowed)}
        if _is_fhir(request):
            status = error.status_code
            text = "no such FHIR endpoint" if status == 404 else str(error.detail)
            return outcome_response(
                status,
                _ISSUE_CODES.get(status, "exception"),
                text,
                headers=dict(error.headers or {}),
            )
        return problem_response(
            request,
            status=error.status_code,
            title=str(error.detail) if error.status_code < 500 else "Server error",
            headers=dict(error.headers or {}),
        )

    async def unavailable(request: Request, error: Exception) -> Response:
        # A lost connection, a lock not granted in time, a statement cancelled by its timeout:
        # the transaction was rolled back, so the client can simply try again.
        log.warning(
            "database unavailable request_id=%s error=%s",
            request_id_of(request),
            type(getattr(error, "orig", error)).__name__,
        )
        if _is_fhir(request):
            return fhir_error_response(StoreUnavailable())
        return problem_response(
            request,
            status=503,
            title="The database is unavailable or did not answer in time",
            detail="Nothing was changed; try again.",
            headers={"Retry-After": StoreUnavailable.RETRY_AFTER},
        )

    async def unstorable(request: Request, error: Exception) -> Response:
        # A value the database cannot hold or compare (a NUL in a header's criteria, a number
        # or date beyond its range): the statement failed and its transaction was rolled back.
        log.warning(
            "value refused by the database request_id=%s error=%s",
            request_id_of(request),
            type(getattr(error, "orig", error)).__name__,
        )
        text = "a value in the request cannot be stored or searched here (out of range or a NUL)"
        if _is_fhir(request):
            return outcome_response(400, "invalid", text)
        return problem_response(request, status=422, title="Invalid request", detail=text)

    async def unexpected(request: Request, error: Exception) -> Response:
        log.exception("unhandled error request_id=%s", request_id_of(request))
        if _is_fhir(request):
            return outcome_response(
                500,
                "exception",
                f"The error was logged with request id {request_id_of(request)}.",
            )
        return problem_response(
            request,
            status=500,
            title="Internal server error",
            detail=f"The error was logged with request id {request_id_of(request)}.",
        )

    app.add_exception_handler(FhirError, fhir_error)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(OperationalError, unavailable)
    app.add_exception_handler(DataError, unstorable)
    app.add_exception_handler(psycopg.DataError, unstorable)
    app.add_exception_handler(Exception, unexpected)


class RequestIdMiddleware:
    """Gives every request an id (the caller's X-Request-ID when well-formed) and echoes it.

    Plain ASGI rather than BaseHTTPMiddleware: it sits on every request, reads included.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next(
            (
                value.decode("latin-1")
                for name, value in scope["headers"]
                if name == b"x-request-id"
            ),
            "",
        )
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
