"""Errors of the FHIR facade, each answered as an OperationOutcome with its HTTP status.

    FhirError                 any error on /fhir, with status, issue type and location
     ├── ResourceNotFound     404 not-found: no such resource, version or type
     ├── ResourceGone         410 deleted: the resource was deleted (its history stays)
     ├── NotAcceptable        406 not-supported: a format the facade does not produce
     ├── UnsupportedMediaType 415 not-supported: a request body in a format the facade does not read
     ├── ResourceConflict     409 conflict: the write contradicts what is stored (a record owns it)
     ├── PreconditionFailed   412 conflict: If-Match is stale, or conditional criteria match many
     ├── InvalidResource      422: every issue found in a resource a write was refused for
     └── StoreUnavailable     503 transient: the database is unreachable, busy, or the
                              statement ran past DATABASE_STATEMENT_TIMEOUT_SECONDS

Errors raised elsewhere (request validation, unknown routes, unexpected failures) reaching a /fhir
URL are turned into OperationOutcomes by `service.problems`, so no /fhir response is ever a
problem document.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

FHIR_JSON = "application/fhir+json; charset=utf-8"


class FhirError(Exception):
    """An error on the FHIR facade, answered as an OperationOutcome."""

    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        expression: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.expression = expression
        self.headers = headers or {}


class ResourceNotFound(FhirError):
    def __init__(self, diagnostics: str) -> None:
        super().__init__(404, "not-found", diagnostics)


class ResourceGone(FhirError):
    def __init__(self, resource_type: str, resource_id: str, version: int) -> None:
        # The ETag names the deletion's version, as a read of a live resource names its own.
        super().__init__(
            410,
            "deleted",
            f"{resource_type}/{resource_id} was deleted",
            headers={"ETag": f'W/"{version}"'},
        )
        self.version = version


class NotAcceptable(FhirError):
    def __init__(self, diagnostics: str) -> None:
        super().__init__(406, "not-supported", diagnostics)


class UnsupportedMediaType(FhirError):
    def __init__(self, diagnostics: str) -> None:
        super().__init__(415, "not-supported", diagnostics)


class ResourceConflict(FhirError):
    def __init__(self, diagnostics: str, expression: str | None = None) -> None:
        super().__init__(409, "conflict", diagnostics, expression=expression)


class PreconditionFailed(FhirError):
    def __init__(self, diagnostics: str) -> None:
        super().__init__(412, "conflict", diagnostics)


class InvalidResource(FhirError):
    """A resource refused with several issues: `outcome()` lists them all, with their paths."""

    def __init__(self, issues: list[dict[str, Any]]) -> None:
        first = issues[0] if issues else {"code": "processing", "diagnostics": "invalid resource"}
        super().__init__(
            422,
            str(first.get("code", "processing")),
            str(first.get("diagnostics", "invalid resource")),
            expression=(first.get("expression") or [None])[0],
        )
        self.issues = issues

    def outcome(self) -> dict[str, Any]:
        return {"resourceType": "OperationOutcome", "issue": self.issues}


def operation_outcome(
    code: str, diagnostics: str, *, severity: str = "error", expression: str | None = None
) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression is not None:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def outcome_response(
    status: int,
    code: str,
    diagnostics: str,
    *,
    expression: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = operation_outcome(code, diagnostics, expression=expression)
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers)


class StoreUnavailable(FhirError):
    """The database could not answer in time (or at all); nothing was written. Try again."""

    RETRY_AFTER = "5"

    def __init__(self) -> None:
        super().__init__(
            503,
            "transient",
            "the database is unavailable or did not answer in time; nothing was changed",
            headers={"Retry-After": self.RETRY_AFTER},
        )
