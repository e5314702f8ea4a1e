"""EHR stand-ins served over real sockets for the delivery tests.

- `RestrictedEhr`: a small in-memory FHIR server shaped like the published Epic and Oracle Health
  R4 APIs: MedicationAdministration and CarePlan are read/search only, no conditional
  interactions or transactions, Observations are create-only and must name an Encounter the EHR
  knows, DocumentReference takes creates. With `smart=True` every FHIR request needs a token from
  its SMART Backend Services token endpoint, which checks the client's signed assertion.
- `FaultProxy`: forwards to an upstream FHIR server, injecting the next faults in its queue:
  5xx, 429 with Retry-After, a timeout, a dropped connection (before or after the upstream took
  the request), or a slow answer.
- `serve_in_thread`: runs an ASGI app under uvicorn on a free port.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.e2e.conftest import free_port

FHIR = "application/fhir+json"


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", interface="asgi3"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _outcome(status: int, text: str, code: str = "processing") -> JSONResponse:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }
    return JSONResponse(body, status_code=status, media_type=FHIR)


def _bundle(resources: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(resources),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
        },
        media_type=FHIR,
    )


READ_SEARCH = [{"code": "read"}, {"code": "search-type"}]


class RestrictedEhr:
    """See the module docstring. `store[type][id]` holds what arrived; `creates` counts POSTs."""

    def __init__(
        self,
        *,
        smart: bool = False,
        public_key: Any = None,
        client_id: str = "",
        writable: frozenset[str] = frozenset({"Observation", "DocumentReference"}),
        updatable: frozenset[str] = frozenset(),
    ) -> None:
        self.writable = writable
        self.updatable = updatable
        self.store: dict[str, dict[str, dict[str, Any]]] = {}
        self.creates: dict[str, int] = {}
        self.updates: dict[str, int] = {}
        self.smart = smart
        self.public_key = public_key
        self.client_id = client_id
        self.tokens: set[str] = set()
        self.token_requests = 0
        self.seen_jti: set[str] = set()
        self.base = ""
        self.lock = threading.Lock()
        self.app = Starlette(
            routes=[
                Route("/.well-known/smart-configuration", self.smart_configuration),
                Route("/token", self.token, methods=["POST"]),
                Route("/metadata", self.metadata),
                Route("/{type}", self.search_or_create, methods=["GET", "POST", "PUT"]),
                Route("/{type}/{id}", self.read, methods=["GET", "PUT", "DELETE"]),
            ]
        )

    def add(self, resource: dict[str, Any]) -> dict[str, Any]:
        """An EHR-side resource (a Patient, an Encounter) that exists before delivery."""
        with self.lock:
            resource = {**resource, "id": resource.get("id") or uuid.uuid4().hex[:16]}
            resource["meta"] = {"versionId": "1", "lastUpdated": _now()}
            self.store.setdefault(resource["resourceType"], {})[resource["id"]] = resource
            return resource

    def change(self, resource_type: str, resource_id: str, **changes: Any) -> dict[str, Any]:
        """An edit made in the EHR: a new version with a new lastUpdated."""
        with self.lock:
            current = self.store[resource_type][resource_id]
            version = int(current["meta"]["versionId"]) + 1
            time.sleep(0.002)
            changed = {
                **current,
                **changes,
                "meta": {"versionId": str(version), "lastUpdated": _now()},
            }
            self.store[resource_type][resource_id] = changed
            return changed

    def of(self, resource_type: str) -> list[dict[str, Any]]:
        return list(self.store.get(resource_type, {}).values())

    async def smart_configuration(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "token_endpoint": f"{self.base}/token",
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            }
        )

    async def token(self, request: Request) -> JSONResponse:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        self.token_requests += 1
        if form.get("grant_type") != "client_credentials" or form.get("client_assertion_type") != (
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        ):
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        try:
            claims = jwt.decode(
                str(form.get("client_assertion")),
                self.public_key,
                algorithms=["RS384", "ES384"],
                audience=f"{self.base}/token",
                issuer=self.client_id,
                options={"require": ["exp", "jti", "iss", "sub", "aud"]},
            )
        except jwt.PyJWTError as error:
            return JSONResponse({"error": "invalid_client", "detail": str(error)}, 401)
        if claims["sub"] != self.client_id or claims["jti"] in self.seen_jti:
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        self.seen_jti.add(claims["jti"])
        token = uuid.uuid4().hex
        self.tokens.add(token)
        return JSONResponse(
            {"access_token": token, "token_type": "bearer", "expires_in": 300, "scope": "x"}
        )

    def _authorized(self, request: Request) -> bool:
        if not self.smart:
            return True
        header = request.headers.get("authorization", "")
        return header.startswith("Bearer ") and header[7:] in self.tokens

    async def metadata(self, request: Request) -> JSONResponse:
        names = ["Patient", "Encounter", "MedicationAdministration", "CarePlan"]
        names += ["Observation", "DocumentReference"]
        resources: list[dict[str, Any]] = []
        for name in names:
            codes = list(READ_SEARCH)
            if name in self.writable:
                codes.append({"code": "create"})
            if name in self.updatable:
                codes.append({"code": "update"})
            resources.append({"type": name, "interaction": codes})
        for resource in resources:
            resource["searchParam"] = [{"name": "identifier", "type": "token"}]
        return JSONResponse(
            {
                "resourceType": "CapabilityStatement",
                "status": "active",
                "kind": "instance",
                "fhirVersion": "4.0.1",
                "format": ["json"],
                "rest": [{"mode": "server", "resource": resources}],
            },
            media_type=FHIR,
        )

    async def search_or_create(self, request: Request) -> Response:
        if not self._authorized(request):
            return _outcome(401, "a bearer token is needed", "login")
        resource_type = request.path_params["type"]
        if request.method == "PUT":
            return _outcome(405, "no conditional update here", "not-supported")
        if request.method == "GET":
            found = self.of(resource_type)
            for name, value in request.query_params.multi_items():
                if name == "identifier":
                    system, _, code = value.partition("|")
                    found = [
                        r
                        for r in found
                        if any(
                            i.get("system") == system and i.get("value") == code
                            for i in r.get("identifier", [])
                        )
                    ]
                elif name == "patient":
                    found = [
                        r
                        for r in found
                        if (r.get("subject") or {}).get("reference") == value
                        or (r.get("subject") or {}).get("reference") == f"Patient/{value}"
                    ]
                elif name == "_lastUpdated" and value.startswith("ge"):
                    found = [r for r in found if r["meta"]["lastUpdated"] >= value[2:]]
                elif name == "date":
                    found = [
                        r
                        for r in found
                        if str((r.get("period") or {}).get("start", "")).startswith(value)
                    ]
            return _bundle(found)
        if resource_type not in self.writable:
            return _outcome(405, f"{resource_type} is read-only here", "not-supported")
        resource = orjson.loads(await request.body())
        if (
            resource_type == "Observation"
            and "vital-signs" in orjson.dumps(resource.get("category")).decode()
        ):
            encounter = (resource.get("encounter") or {}).get("reference", "")
            if encounter.removeprefix("Encounter/") not in self.store.get("Encounter", {}):
                return _outcome(422, "vital signs are filed against an existing encounter")
        with self.lock:
            stored = {**resource, "id": uuid.uuid4().hex[:16]}
            stored["meta"] = {"versionId": "1", "lastUpdated": _now()}
            self.store.setdefault(resource_type, {})[stored["id"]] = stored
            self.creates[resource_type] = self.creates.get(resource_type, 0) + 1
        return JSONResponse(
            stored,
            status_code=201,
            media_type=FHIR,
            headers={"Location": f"{self.base}/{resource_type}/{stored['id']}/_history/1"},
        )

    async def read(self, request: Request) -> Response:
        if not self._authorized(request):
            return _outcome(401, "a bearer token is needed", "login")
        resource_type, resource_id = request.path_params["type"], request.path_params["id"]
        if request.method == "PUT" and resource_type in self.updatable:
            if resource_id not in self.store.get(resource_type, {}):
                return _outcome(404, "update of an unknown id", "not-found")
            body = orjson.loads(await request.body())
            changed = self.change(resource_type, resource_id, **body)
            self.updates[resource_type] = self.updates.get(resource_type, 0) + 1
            return JSONResponse(
                changed, media_type=FHIR, headers={"ETag": f'W/"{changed["meta"]["versionId"]}"'}
            )
        if request.method != "GET":
            return _outcome(405, "read-only", "not-supported")
        found = self.store.get(request.path_params["type"], {}).get(request.path_params["id"])
        if found is None:
            return _outcome(404, "not found", "not-found")
        return JSONResponse(found, media_type=FHIR)


class FaultProxy:
    """Forwards to `upstream`; `faults` is a queue of what to do to the next requests.

    A fault is "500", "503", "429:<seconds>" (Retry-After), "timeout:<seconds>" (wait, then
    answer 504), "drop" (close without an answer), "drop-after" (forward, then drop the answer),
    "slow:<seconds>" (wait, then forward). Requests whose path contains `only` (if given) are
    the only ones faults apply to.
    """

    def __init__(self, upstream: str, *, only: str | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults: deque[str] = deque()
        self.only = only
        self.requests = 0
        self.injected: list[str] = []
        self.app = self._asgi

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        self.requests += 1
        fault = None
        path = scope["path"]
        if self.faults and (
            self.only is None or self.only in path + "?" + scope["query_string"].decode()
        ):
            fault = self.faults.popleft()
            self.injected.append(fault)
        if fault is not None:
            name, _, arg = fault.partition(":")
            if name in ("500", "502", "503"):
                await _send(send, int(name), b'{"resourceType":"OperationOutcome","issue":[]}')
                return
            if name == "429":
                await _send(send, 429, b"", {"retry-after": arg or "1"})
                return
            if name == "timeout":
                await asyncio.sleep(float(arg or 5))
                await _send(send, 504, b"")
                return
            if name == "drop":
                raise ConnectionAbortedError("fault: dropped")
            if name == "slow":
                await asyncio.sleep(float(arg or 0.5))
        query = scope["query_string"].decode()
        # POST [base] arrives as "/": the upstream's base has no trailing slash.
        url = self.upstream + (path if path != "/" else "") + (f"?{query}" if query else "")
        headers = {
            k.decode(): v.decode()
            for k, v in scope["headers"]
            if k.decode().lower() not in ("host", "content-length")
        }
        async with httpx.AsyncClient(timeout=60) as client:
            answer = await client.request(scope["method"], url, content=body, headers=headers)
        if fault == "drop-after":
            raise ConnectionAbortedError("fault: answer dropped")
        out = {
            k: v
            for k, v in answer.headers.items()
            if k.lower()
            not in ("content-length", "transfer-encoding", "content-encoding", "connection")
        }
        await _send(send, answer.status_code, answer.content, out)


_HOP_BY_HOP = ("content-length", "transfer-encoding", "content-encoding", "connection")


async def _send(send: Any, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    raw = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    raw.append((b"content-length", str(len(body)).encode()))
    if body:
        raw.append((b"content-type", FHIR.encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
