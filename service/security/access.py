"""Access control on every request: authentication, scopes, limits and the audit of what was done.

`AccessMiddleware` is plain ASGI (it sits in front of the FHIR read hot path). Per request it:

1. lets the open endpoints through (`/healthz`, `/readyz`, `/fhir/metadata`, SMART discovery,
   `/auth/token`, the OpenAPI description and docs);
2. refuses a body over `MAX_BODY_BYTES` (413) or one that arrives slower than the request
   timeout (408), reading it before the handler does;
3. authenticates the bearer token (401 with `WWW-Authenticate: Bearer ...` when it is missing or
   bad) and applies the client's rate limit (429 with `Retry-After`);
4. authorizes what the method and URL are (`requirement`): read, vread and instance history need
   `r`, search and type history `s`, create `c`, update and patch `u`, delete `d` (conditional
   ones `s` as well), `_include`/`_revinclude`/`_has`/chains read on the types they reach,
   `$export` and `$everything` `r` on every type they return; the intake API
   `system/intake.read|write`, the sync admin API `system/sync.read|write`. A missing scope is a
   403 (an OperationOutcome on /fhir, a problem document elsewhere). Bundle entries are checked one
   by one by the Bundle handler (`authorize_entries`);
5. puts the `Principal` in `scope["state"]["principal"]` and the audit context in
   `service.security.audit.REQUEST_AUDIT`;
6. answers a GET that has not started its response within the request timeout with 503: a
   response that starts after the deadline is refused as it starts, whatever the timer did;
7. writes the AuditEvent of the request unless its handler wrote one with its change, before
   the response goes out (a failed audit write answers 500 and sends none of the data); a
   successful read or search with `AUDIT_READS=async` is queued for the group commit that
   follows instead (`AuditWriter`), unless the queue is full; and logs
   one access line: request id, client, interaction, resource type, status. Never the URL's query
   or ids: they can name patients.

The per-client rate limit is kept per process (documented: with N processes a client gets up to N
times the rate).

Errors raised here for handlers:

    FhirError(403)  Forbidden: the principal lacks a scope (`authorize`, `authorize_entries`)
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import parse_qsl

import orjson
from fastapi.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.fhir.errors import FHIR_JSON, FhirError, operation_outcome
from service.fhir.search_parameters import definitions
from service.security.audit import (
    AUDIT_TYPE,
    FAILED,
    REFUSED,
    REQUEST_AUDIT,
    SUCCESS,
    AuditRecord,
    AuditWriter,
    RequestAudit,
)
from service.security.authorization import (
    LOCAL_PRINCIPAL,
    AuthenticationFailed,
    Authenticator,
    Principal,
)
from service.security.scopes import scope_name

log = logging.getLogger("service.access")

OPEN_PATHS: Final = frozenset(
    {
        "/healthz",
        "/readyz",
        "/fhir/metadata",
        "/fhir/.well-known/smart-configuration",
        "/.well-known/smart-configuration",
        "/auth/token",
        "/auth/jwks",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
    }
)
DISCOVERY_PATHS: Final = frozenset(
    {"/fhir/.well-known/smart-configuration", "/.well-known/smart-configuration"}
)
BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
PROBLEM_JSON: Final = "application/problem+json"


@dataclass(frozen=True)
class Limits:
    """Request limits the middleware enforces (from Settings)."""

    max_body_bytes: int = 32 * 1024 * 1024
    request_timeout_seconds: float = 60.0
    rate_per_minute: int = 6000
    burst: int = 600


@dataclass
class Requirement:
    """What one request needs, and how it is audited."""

    subtype: str
    checks: list[tuple[str, str]] = field(default_factory=list)
    """(type, letters): at least one of the letters on the type (or API area)."""
    resource_type: str | None = None
    patients: list[str] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)
    query: str | None = None
    write: bool = False
    buffer: bool = False
    """Hold the response body to find its patient (a read of one resource)."""
    audit: bool = True

    def need(self, resource_type: str, letters: str) -> None:
        self.checks.append((resource_type, letters))


# --- what a request needs -----------------------------------------------------------------------


def _stored_types() -> tuple[str, ...]:
    from service.fhir.api import STORED_TYPES

    return STORED_TYPES


def _conformance_types() -> tuple[str, ...]:
    from service.fhir.api import CONFORMANCE_TYPES

    return CONFORMANCE_TYPES


def _compartment_types() -> list[str]:
    compartment = definitions().patient_compartment
    return [t for t in _stored_types() if t == "Patient" or compartment.get(t)]


def _type_list(value: str | None, default: Sequence[str]) -> list[str]:
    if value is None:
        return [t for t in default if t != AUDIT_TYPE]
    return [t.strip() for t in value.split(",") if t.strip()]


def requirement(
    method: str, path: str, params: Sequence[tuple[str, str]], headers: dict[str, str]
) -> Requirement | None:
    """What a request needs; None for an open endpoint."""
    if path in OPEN_PATHS:
        return None
    if path == "/fhir" or path.startswith("/fhir/"):
        return _fhir_requirement(method, path, params, headers)
    if path.startswith("/api/v1/sync"):
        write = method not in ("GET", "HEAD")
        need = Requirement(subtype="sync", write=write, resource_type="sync")
        need.need("sync", "cud" if write else "rs")
        return need
    if path.startswith("/api/v1"):
        write = method not in ("GET", "HEAD")
        need = Requirement(
            subtype="import" if path == "/api/v1/import" else "intake",
            write=write,
            resource_type="intake",
        )
        need.need("intake", "cu" if write else "rs")
        return need
    return Requirement(subtype="other", audit=False)


def _fhir_requirement(
    method: str, path: str, params: Sequence[tuple[str, str]], headers: dict[str, str]
) -> Requirement:
    parts = [p for p in path.removeprefix("/fhir").split("/") if p]
    get = method in ("GET", "HEAD")
    query = dict(params)
    if not parts:
        if method == "POST":
            return Requirement(subtype="transaction", write=True)  # entries: authorize_entries
        return Requirement(subtype="search-system", audit=False)
    head = parts[0]
    if head == "$export" and len(parts) == 1:
        need = Requirement(subtype="$export")
        _export_needs(need, params, _stored_types())
        return need
    if head == "$export-status":
        return Requirement(subtype="$export-status", audit=False)
    if head == "$export-output" and len(parts) == 3:
        need = Requirement(subtype="$export-output", resource_type=parts[2].removesuffix(".ndjson"))
        need.need(parts[2].removesuffix(".ndjson"), "r")
        return need
    resource_type = head
    need = Requirement(subtype="other", resource_type=resource_type)
    if resource_type in _conformance_types():
        need.subtype = "read" if len(parts) == 2 else "search-type"
        need.audit = False
        return need
    if resource_type not in _stored_types():
        need.audit = False
        return need
    if resource_type == AUDIT_TYPE:
        need.audit = False  # reading the audit trail is not audited again
    conditional = "if-none-exist" in headers
    if len(parts) == 1:
        if get:
            need.subtype, need.query = "search-type", _query_text(params)
            need.need(resource_type, "s")
            _search_needs(need, resource_type, params)
        elif method == "POST":
            need.subtype, need.write = "create", True
            need.need(resource_type, "c")
            if conditional:
                need.need(resource_type, "s")
        elif method in ("PUT", "DELETE"):
            need.subtype, need.write = ("update" if method == "PUT" else "delete"), True
            need.need(resource_type, "u" if method == "PUT" else "d")
            need.need(resource_type, "s")
        return need
    second = parts[1]
    if second == "_search" and len(parts) == 2:
        need.subtype = "search-type"
        need.need(resource_type, "s")
        return need  # the body's parameters: checked by `search_body_needs`
    if second == "_history" and len(parts) == 2:
        need.subtype = "history-type"
        need.need(resource_type, "s")
        return need
    if second == "$validate":
        need.subtype, need.audit = "operation", False
        need.need(resource_type, "cruds")
        return need
    if second == "$export" and resource_type == "Patient":
        need.subtype = "$export"
        _export_needs(need, params, _compartment_types())
        return need
    if second == "$everything" and resource_type == "Patient" and len(parts) == 2:
        need.subtype = "$everything"  # every patient's
        _everything_needs(need, query)
        return need
    resource_id = second
    if resource_type == "Patient":
        need.patients.append(resource_id)
    need.entities.append(f"{resource_type}/{resource_id}")
    if len(parts) == 2:
        if get:
            need.subtype, need.buffer = "read", True
            need.need(resource_type, "r")
        elif method in ("PUT", "PATCH"):
            need.subtype, need.write = ("update" if method == "PUT" else "patch"), True
            need.need(resource_type, "u")
        elif method == "DELETE":
            need.subtype, need.write = "delete", True
            need.need(resource_type, "d")
        return need
    third = parts[2]
    if third == "_history" and len(parts) == 3:
        need.subtype = "history-instance"
        need.need(resource_type, "r")
    elif third == "_history" and len(parts) == 4:
        need.subtype, need.buffer = "vread", True
        need.entities[-1] += f"/_history/{parts[3]}"
        need.need(resource_type, "r")
    elif third == "$everything" and resource_type == "Patient":
        need.subtype = "$everything"
        _everything_needs(need, query)
    elif third == "$validate" and len(parts) == 3:  # as at the type's level: nothing stored
        need.subtype, need.audit = "operation", False
        need.need(resource_type, "cruds")
    else:
        need.need(resource_type, "cruds")
    return need


def _export_needs(
    need: Requirement, params: Sequence[tuple[str, str]], default: Sequence[str]
) -> None:
    """Read on every type a kick-off exports: each `_type` given (repeats are one comma list,
    as the export reads them), or the default; the patients a POST names, for the audit."""
    given = [value for name, value in params if name == "_type"]
    for t in _type_list(",".join(given) if given else None, default):
        need.need(t, "r")
    for name, value in params:
        if name == "patient" and value.strip().startswith("Patient/"):
            need.patients.append(value.strip().removeprefix("Patient/"))


def _everything_needs(need: Requirement, query: dict[str, str]) -> None:
    """Read on every type `$everything` returns: its `_type`, or all it can (but the audit)."""
    default = _compartment_types() + [t for t in _stored_types() if t not in _compartment_types()]
    for t in _type_list(query.get("_type"), default):
        need.need(t, "r")


def _operation_body_params(
    body: bytes, headers: dict[str, str], operation: str
) -> list[tuple[str, str]]:
    """The parameters of a POST `$export` or `$everything` body, read as the operation reads
    them; none when it cannot read them either (it refuses the request)."""
    from service.fhir.export import parameters_of_body

    try:
        return parameters_of_body(body, headers.get("content-type", ""), operation=operation)
    except FhirError:
        return []


def _query_text(params: Sequence[tuple[str, str]]) -> str:
    return "&".join(f"{k}={v}" for k, v in params)


def _search_needs(need: Requirement, resource_type: str, params: Iterable[tuple[str, str]]) -> None:
    """Read on what includes, reverse includes, `_has` and chains reach; the patient searched."""
    catalogue = definitions()
    for name, value in params:
        base_name = name.split(":", 1)[0]
        if base_name in ("_include", "_revinclude"):
            iterate = value.endswith((":iterate", ":recurse")) or name.endswith(":iterate")
            parts = value.removesuffix(":iterate").removesuffix(":recurse").split(":")
            source = parts[0]
            if source == "*" or (len(parts) > 1 and parts[1] == "*"):
                for t in _stored_types():
                    need.need(t, "r")
                continue
            if base_name == "_revinclude" or iterate:
                need.need(source, "r")
            if base_name == "_include" and len(parts) >= 2:
                if len(parts) >= 3:
                    need.need(parts[2], "r")
                else:
                    parameter = catalogue.parameter(source, parts[1])
                    for t in parameter.targets if parameter else _stored_types():
                        if t in _stored_types():
                            need.need(t, "r")
        elif name.startswith("_has:"):
            pieces = name.split(":")
            if len(pieces) >= 2:
                need.need(pieces[1], "s")
        elif "." in name and not name.startswith("_"):
            code = name.partition(".")[0]
            code, _, target = code.partition(":")
            if target:
                need.need(target, "s")
            else:
                parameter = catalogue.parameter(resource_type, code)
                for t in parameter.targets if parameter else ():
                    if t in _stored_types():
                        need.need(t, "s")
        elif base_name in ("patient", "subject") and resource_type != "Patient":
            for item in value.split(","):
                patient = item.rsplit("/", 1)[-1]
                if item.startswith("Patient/") or base_name == "patient":
                    need.patients.append(patient)
        elif base_name == "_id" and resource_type == "Patient":
            need.patients.extend(value.split(","))


def missing_scopes(principal: Principal, checks: Iterable[tuple[str, str]]) -> list[str]:
    """The scopes the principal lacks for these checks (one name per check that fails)."""
    missing = []
    for resource_type, letters in checks:
        if not any(principal.scopes.allows(resource_type, letter) for letter in letters):
            name = scope_name(resource_type, letters if len(letters) < 5 else "*")
            if name not in missing:
                missing.append(name)
    return missing


class Forbidden(FhirError):
    """The principal lacks a scope (403)."""

    def __init__(self, missing: Sequence[str], where: str | None = None) -> None:
        text = f"this needs the scope {' and '.join(missing)}"
        super().__init__(403, "forbidden", f"{where}: {text}" if where else text)


def principal_of(scope: Scope) -> Principal:
    principal = scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):
        raise FhirError(401, "login", "the request was not authenticated")
    return principal


def authorize(scope: Scope, checks: Iterable[tuple[str, str]], where: str | None = None) -> None:
    """Raise Forbidden unless the request's principal has scopes for every check."""
    missing = missing_scopes(principal_of(scope), checks)
    if missing:
        raise Forbidden(missing, where)


_ENTRY_LETTERS: Final = {
    "GET": "r",
    "HEAD": "r",
    "POST": "c",
    "PUT": "u",
    "PATCH": "u",
    "DELETE": "d",
}


def authorize_entries(scope: Scope, entries: Iterable[tuple[int, str, str, bool]]) -> None:
    """Check each Bundle entry (index, method, resource type, conditional) as its own request."""
    for index, method, resource_type, conditional in entries:
        checks = [(resource_type, _ENTRY_LETTERS.get(method, "cruds"))]
        if conditional:
            checks.append((resource_type, "s"))
        authorize(scope, checks, f"entry {index} ({method} {resource_type})")


# --- the rate limit -----------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per key (client id), in this process."""

    def __init__(self, *, per_minute: int, burst: int, clock: Callable[[], float] = time.monotonic):
        self._rate = per_minute / 60.0
        self._burst = float(max(burst, 1))
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        if self._rate <= 0:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > 100_000:
            self._buckets.clear()
        return (1 - tokens) / self._rate


# --- the middleware -----------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


class AccessMiddleware:
    """Authentication, authorization, limits and audit for every HTTP request (plain ASGI)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticator: Authenticator | None,
        audit: AuditWriter | None,
        limits: Limits,
        audit_reads: Literal["async", "sync", "off"] = "sync",
        discovery: Callable[[str], dict[str, Any]] | None = None,
        public_base_url: str | None = None,
    ) -> None:
        self.app = app
        self.discovery = discovery
        """SMART discovery, answered here: the FHIR read path would take `.well-known` for a
        resource type."""
        self.public_base_url = public_base_url
        self.authenticator = authenticator
        """None: authentication is disabled (loopback only) and every request acts as `local`."""
        self.audit = audit
        self.limits = limits
        self.audit_reads = audit_reads
        self.rate = RateLimiter(per_minute=limits.rate_per_minute, burst=limits.burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method: str = scope["method"]
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        state = scope.setdefault("state", {})
        request_id = str(state.get("request_id", ""))
        peer = scope.get("client")
        address = str(peer[0]) if peer else None
        fhir = path == "/fhir" or path.startswith("/fhir/")
        if path in DISCOVERY_PATHS and method == "GET" and self.discovery is not None:
            base = self.public_base_url or str(Request(scope).base_url)
            document = self.discovery(base.rstrip("/"))
            await Response(orjson.dumps(document), media_type="application/json")(
                scope, receive, send
            )
            return

        if "\x00" in path or b"%00" in scope.get("query_string", b""):
            # No FHIR value, id or record key may hold one (and PostgreSQL text cannot): said
            # here, the same on either store, rather than by whichever query meets it first.
            await self._error(
                scope,
                receive,
                send,
                400,
                "the URL holds a NUL character (%00)",
                fhir,
                code="invalid",
            )
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            await self._error(scope, receive, send, 413, "the request body is too large", fhir)
            return
        params = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        try:
            need = requirement(method, path, params, headers)
        except Exception:  # a URL no rule understands is left to the app's routing
            need = Requirement(subtype="other", audit=False)

        if method in BODY_METHODS:
            try:
                body = await asyncio.wait_for(
                    self._read_body(receive), self.limits.request_timeout_seconds
                )
            except _BodyTooLarge:
                await self._error(scope, receive, send, 413, "the request body is too large", fhir)
                return
            except TimeoutError:
                await self._error(
                    scope, receive, send, 408, "the request body came too slowly", fhir
                )
                return
            receive = _replay(body, receive)
            if need is not None and need.subtype == "search-type" and need.resource_type:
                form = body.decode("utf-8", errors="replace")
                form_params = parse_qsl(form, keep_blank_values=True)
                _search_needs(need, need.resource_type, form_params)
                need.query = _query_text([*params, *form_params])
            elif need is not None and need.subtype in ("$export", "$everything"):
                # What they return is named in the body as well as the query.
                body_params = _operation_body_params(body, headers, need.subtype)
                if body_params:
                    need = requirement(method, path, [*params, *body_params], headers) or need

        if need is None:
            if path == "/auth/token" and address:
                wait = self.rate.take(f"address:{address}")
                if wait:
                    await self._too_many(scope, receive, send, wait, fhir)
                    return
            await self.app(scope, receive, send)
            return

        principal = await self._authenticate(scope, receive, send, headers, fhir)
        if principal is None:
            return
        # No limit for the loopback-only unauthenticated mode: it has no clients to tell apart.
        wait = (
            0.0 if principal is LOCAL_PRINCIPAL else self.rate.take(f"client:{principal.client_id}")
        )
        if wait:
            await self._too_many(scope, receive, send, wait, fhir)
            return
        state["principal"] = principal
        context = RequestAudit(
            client_id=principal.client_id, request_id=request_id, address=address
        )
        token = REQUEST_AUDIT.set(context)
        try:
            missing = missing_scopes(principal, need.checks)
            if missing:
                await self._audit(need, context, REFUSED, "missing scope " + " ".join(missing))
                await self._error(
                    scope, receive, send, 403, str(Forbidden(missing)), fhir, code="forbidden"
                )
                self._log(request_id, principal, need, 403, started)
                return
            status = await self._run(scope, receive, send, need, context, fhir)
            self._log(request_id, principal, need, status, started)
        finally:
            REQUEST_AUDIT.reset(token)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _authenticate(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], fhir: bool
    ) -> Principal | None:
        if self.authenticator is None:
            return LOCAL_PRINCIPAL
        value = headers.get("authorization", "")
        kind, _, token = value.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            await self._unauthorized(scope, receive, send, None, fhir)
            return None
        token = token.strip()
        try:
            principal = self.authenticator.verify_local(token)
            if principal is None:
                principal = await run_in_threadpool(self.authenticator.verify_external, token)
        except AuthenticationFailed as error:
            await self._unauthorized(scope, receive, send, str(error), fhir)
            return None
        except Exception:  # a malformed token must never become a 500
            await self._unauthorized(scope, receive, send, "the access token is not valid", fhir)
            return None
        return principal

    async def _run(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        need: Requirement,
        context: RequestAudit,
        fhir: bool,
    ) -> int:
        audit = need.audit and self.audit is not None and (need.write or self.audit_reads != "off")
        held: list[Message] = []
        status = 0
        started = asyncio.Event()
        passing = False
        dropping = False  # a 500 or a 503 went out instead: the rest is dropped
        loop = asyncio.get_running_loop()
        timeout = self.limits.request_timeout_seconds
        # Only a read has a deadline: a write may not be cut off once it may have committed.
        deadline = (
            loop.time() + timeout if scope["method"] in ("GET", "HEAD") and not need.write else None
        )
        overran = False

        async def guarded_send(message: Message) -> None:
            nonlocal status, passing, dropping, overran
            if dropping:
                return
            if passing:
                await send(message)
                return
            if message["type"] == "http.response.start":
                if deadline is not None and loop.time() >= deadline:
                    # Checked as the response starts, not only by the timer: a response that
                    # starts late is a 503 even when it starts before the timer's turn comes.
                    overran = dropping = True
                    started.set()
                    return
                status = int(message["status"])
                started.set()
                held.append(message)
                if not (need.buffer and status == 200):
                    sent = await self._release(held, send, need, context, status, audit, fhir)
                    passing, dropping = sent, not sent
                return
            held.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                sent = await self._release(held, send, need, context, status, audit, fhir)
                passing, dropping = sent, not sent

        task = asyncio.ensure_future(self.app(scope, receive, guarded_send))
        if deadline is not None:
            # The timer cuts off a handler that has not started its response by the deadline
            # (it may never); `guarded_send` refuses one that starts after it. A handler that
            # ends without starting one (it failed) is not waited for: its error goes on below.
            starting = asyncio.ensure_future(started.wait())
            try:
                await asyncio.wait(
                    (task, starting),
                    timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                starting.cancel()
            if overran or not (started.is_set() or task.done()):
                dropping = True  # whatever the handler sends from here on goes nowhere
                task.cancel()
                task.add_done_callback(_settled)
                await self._error(
                    scope,
                    receive,
                    send,
                    503,
                    "the request took too long",
                    fhir,
                    code="timeout",
                    headers={"Retry-After": "5"},
                )
                return 503
        try:
            await task
        except Exception:
            if audit:
                try:
                    await self._audit(need, context, FAILED, "server error")
                except Exception:
                    log.exception("audit write failed request_id=%s", context.request_id)
            raise
        return status

    async def _release(
        self,
        held: list[Message],
        send: Send,
        need: Requirement,
        context: RequestAudit,
        status: int,
        audit: bool,
        fhir: bool,
    ) -> bool:
        """Audit, then send the held messages; False when a 500 was sent in their place."""
        # A failed request's own audit, if a handler wrote one, was rolled back with its work.
        if audit and (not context.recorded or status >= 400):
            if need.buffer and status == 200:
                body = b"".join(m.get("body", b"") for m in held[1:])
                need.patients.extend(_patients_in(body))
            outcome = SUCCESS if status < 400 else REFUSED if status < 500 else FAILED
            try:
                await self._audit(need, context, outcome, None if status < 400 else str(status))
            except Exception:
                log.exception("audit write failed request_id=%s", context.request_id)
                if status >= 400:  # an error answer carries no data: it goes out as it is
                    for message in held:
                        await send(message)
                    return True
                response = _error_response(
                    500,
                    f"the request could not be audited (request id {context.request_id})",
                    fhir,
                    context.request_id,
                )
                await response({"type": "http"}, _no_body, send)
                return False
        for message in held:
            await send(message)
        return True

    async def _audit(
        self, need: Requirement, context: RequestAudit, outcome: str, description: str | None
    ) -> None:
        if self.audit is None or not need.audit:
            return
        read = not need.write and outcome == SUCCESS
        if read and self.audit_reads == "off":
            return
        await self.audit.write(
            AuditRecord(
                subtype=need.subtype,
                outcome=outcome,
                entities=need.entities,
                patients=need.patients,
                query=need.query,
                description=description,
                client_id=context.client_id,
                request_id=context.request_id,
                address=context.address,
                action="E" if need.subtype in ("transaction", "sync", "import") else None,
            ),
            wait=not (read and self.audit_reads == "async"),
        )

    async def _unauthorized(
        self, scope: Scope, receive: Receive, send: Send, reason: str | None, fhir: bool
    ) -> None:
        challenge = 'Bearer realm="infusion-bridge"'
        if reason is not None:
            challenge += f', error="invalid_token", error_description="{reason}"'
        log.warning(
            "unauthenticated request_id=%s reason=%s",
            scope.get("state", {}).get("request_id", ""),
            reason or "no bearer token",
        )
        await self._error(
            scope,
            receive,
            send,
            401,
            reason or "this needs a bearer access token (POST /auth/token)",
            fhir,
            code="login",
            headers={"WWW-Authenticate": challenge},
        )

    async def _too_many(
        self, scope: Scope, receive: Receive, send: Send, wait: float, fhir: bool
    ) -> None:
        await self._error(
            scope,
            receive,
            send,
            429,
            "too many requests: slow down",
            fhir,
            code="throttled",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    async def _error(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        text: str,
        fhir: bool,
        *,
        code: str = "too-costly",
        headers: dict[str, str] | None = None,
    ) -> None:
        if status in (408, 413):
            code = "too-costly" if status == 413 else "timeout"
        request_id = str(scope.get("state", {}).get("request_id", ""))
        response = _error_response(status, text, fhir, request_id, code=code, headers=headers)
        await response(scope, receive, send)

    def _log(
        self, request_id: str, principal: Principal, need: Requirement, status: int, start: float
    ) -> None:
        log.info(
            "request_id=%s client=%s interaction=%s type=%s status=%s ms=%.1f",
            request_id,
            principal.client_id,
            need.subtype,
            need.resource_type or "-",
            status,
            (time.perf_counter() - start) * 1000,
        )


def _settled(task: asyncio.Future[Any]) -> None:
    """Take the outcome of a handler that was answered 503: a failure after it is still logged."""
    if not task.cancelled() and task.exception() is not None:
        log.error("a handler answered 503 failed afterwards", exc_info=task.exception())


def _error_response(
    status: int,
    text: str,
    fhir: bool,
    request_id: str,
    *,
    code: str = "exception",
    headers: dict[str, str] | None = None,
) -> Response:
    if fhir:
        body = operation_outcome(code, text)
        return Response(
            orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers
        )
    titles = {
        401: "Unauthorized",
        403: "Forbidden",
        408: "Request Timeout",
        413: "Content Too Large",
    }
    titles |= {429: "Too Many Requests", 500: "Internal server error", 503: "Service Unavailable"}
    document = {
        "type": "about:blank",
        "title": titles.get(status, "Error"),
        "status": status,
        "detail": text,
        "request_id": request_id,
    }
    return Response(
        orjson.dumps(document), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


def _replay(body: bytes, original: Receive) -> Receive:
    """The body read ahead, then the server's own messages (a disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def _patients_in(body: bytes) -> list[str]:
    """The patient a resource read belongs to (itself, its subject or its patient)."""
    try:
        resource: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(resource, dict):
        return []
    if resource.get("resourceType") == "Patient" and isinstance(resource.get("id"), str):
        return [resource["id"]]
    found = []
    for element in ("subject", "patient", "beneficiary"):
        target = resource.get(element)
        if isinstance(target, dict):
            reference = str(target.get("reference", ""))
            if reference.startswith("Patient/"):
                found.append(reference.removeprefix("Patient/"))
    return found
