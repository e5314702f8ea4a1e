"""A FHIR R4 client for one EHR destination, on httpx, with its authentication.

Every failure ends in one of the domain errors below, which the worker turns into a retry, a
dead letter or a reconciliation:

    DeliveryError
     ├── TransientFailure       network error, timeout, 408, 429 (retry_after), 5xx: try again
     ├── PermanentFailure       400, 422, other 4xx: dead letter, with the EHR's OperationOutcome
     │    └── PatientNotMatched the EHR has no Patient with our patient's identifier
     └── VersionConflict        409, 412: re-read and reconcile

Log lines name destinations, resource types, ids and status codes; never resource content.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Generator
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from service.json_text import dump_json
from service.sync.destinations import BearerAuth, Destination, SmartBackendAuth

log = logging.getLogger("service.sync.client")

FHIR_JSON = "application/fhir+json"
Resource = dict[str, Any]


class DeliveryError(Exception):
    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class TransientFailure(DeliveryError):
    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class PermanentFailure(DeliveryError):
    def __init__(
        self, message: str, *, status: int | None = None, outcome: Resource | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.outcome = outcome


class PatientNotMatched(PermanentFailure):
    pass


class VersionConflict(DeliveryError):
    pass


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (now if now is not None else time.time()))


def _outcome(response: httpx.Response) -> Resource | None:
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict) and data.get("resourceType") == "OperationOutcome":
        return data
    return None


def check(response: httpx.Response) -> httpx.Response:
    """The response if it succeeded; otherwise the domain error its status means."""
    status = response.status_code
    if 300 <= status < 400:
        # A redirect means a wrong base URL (or a trailing slash): a person has to fix it.
        raise PermanentFailure(f"{response.request.method} answered {status}", status=status)
    if status < 400:
        return response
    what = f"{response.request.method} {response.request.url.path} answered {status}"
    if status in (408, 429) or status >= 500:
        delay = retry_after_seconds(response.headers.get("retry-after"))
        raise TransientFailure(what, status=status, retry_after=delay)
    if status in (409, 412):
        raise VersionConflict(what, status=status)
    raise PermanentFailure(what, status=status, outcome=_outcome(response))


class SmartBackendServices(httpx.Auth):
    """SMART Backend Services: an access token from `client_credentials` with a signed assertion.

    The token endpoint comes from the config or the EHR's `.well-known/smart-configuration`;
    the token is cached until `refresh_margin` seconds before it expires, and fetched again
    once when the EHR answers 401.
    """

    requires_response_body = False

    def __init__(
        self,
        config: SmartBackendAuth,
        *,
        base_url: str,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        refresh_margin: float = 30.0,
        timeout: float = 30.0,
    ) -> None:
        self._config = config
        self._base_url = base_url
        self._http = httpx.Client(transport=transport, timeout=timeout)
        self._clock = clock
        self._margin = refresh_margin
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self._token_url = str(config.token_url) if config.token_url else None
        key = load_pem_private_key(config.private_key.read_bytes(), password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            self._algorithm = "RS384"
        elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
            self._algorithm = "ES384"
        else:
            raise ValueError("a SMART Backend Services key is RSA (RS384) or EC P-384 (ES384)")
        self._key = key

    @property
    def token_url(self) -> str:
        if self._token_url is None:
            response = check(
                self._http.get(
                    f"{self._base_url}/.well-known/smart-configuration",
                    headers={"Accept": "application/json"},
                )
            )
            endpoint = response.json().get("token_endpoint")
            if not isinstance(endpoint, str) or not endpoint:
                raise PermanentFailure("the SMART configuration names no token_endpoint")
            self._token_url = endpoint
        return self._token_url

    def assertion(self) -> str:
        now = int(self._clock())
        claims = {
            "iss": self._config.client_id,
            "sub": self._config.client_id,
            "aud": self.token_url,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "exp": now + 300,
        }
        headers = {"typ": "JWT"} | ({"kid": self._config.key_id} if self._config.key_id else {})
        return jwt.encode(claims, self._key, algorithm=self._algorithm, headers=headers)

    def token(self, *, force: bool = False) -> str:
        with self._lock:
            if not force and self._token is not None and self._clock() < self._expires_at:
                return self._token
            response = self._http.post(
                self.token_url,
                data={
                    "grant_type": "client_credentials",
                    "scope": self._config.scope,
                    "client_assertion_type": (
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
                    ),
                    "client_assertion": self.assertion(),
                },
                headers={"Accept": "application/json"},
            )
            if response.status_code in (400, 401, 403):
                raise PermanentFailure(
                    f"the token endpoint refused the client ({response.status_code})",
                    status=response.status_code,
                )
            body = check(response).json()
            token = body.get("access_token")
            if not isinstance(token, str):
                raise PermanentFailure("the token endpoint answered no access_token")
            lifetime = float(body.get("expires_in", 300))
            self._token = token
            self._expires_at = self._clock() + max(0.0, lifetime - self._margin)
            log.info("token obtained", extra={"expires_in": lifetime})
            return token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self.token(force=True)}"
            yield request

    def close(self) -> None:
        self._http.close()


class _Bearer(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


class _RateLimit:
    """At most `per_second` requests a second, spread evenly (shared by the worker's threads)."""

    def __init__(self, per_second: float | None) -> None:
        self._interval = 1.0 / per_second if per_second else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            time.sleep(start - now)


class EhrClient:
    """FHIR interactions with one destination; every failure is a `DeliveryError`."""

    def __init__(
        self, destination: Destination, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.destination = destination
        self.base = destination.base
        auth: httpx.Auth | None = None
        if isinstance(destination.auth, BearerAuth):
            auth = _Bearer(destination.auth.token)
        elif isinstance(destination.auth, SmartBackendAuth):
            auth = SmartBackendServices(
                destination.auth,
                base_url=self.base,
                transport=transport,
                timeout=destination.timeout_seconds,
            )
        self._auth = auth
        self._rate = _RateLimit(destination.rate_limit_per_second)
        self._http = httpx.Client(
            base_url=self.base + "/",
            transport=transport,
            auth=auth,
            timeout=destination.timeout_seconds,
            headers={"Accept": FHIR_JSON},
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
        )

    def close(self) -> None:
        self._http.close()
        if isinstance(self._auth, SmartBackendServices):
            self._auth.close()

    def request(
        self,
        method: str,
        url: str,
        *,
        params: list[tuple[str, str]] | None = None,
        body: Resource | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        self._rate.wait()
        send_headers = dict(headers or {})
        content = None
        if body is not None:
            content = dump_json(body)
            send_headers["Content-Type"] = FHIR_JSON
        try:
            response = self._http.request(
                method,
                url.lstrip("/") or self.base,
                params=httpx.QueryParams([(k, v) for k, v in params]) if params else None,
                content=content,
                headers=send_headers,
            )
        except httpx.TimeoutException as error:
            raise TransientFailure(f"{method} {url}: timed out ({type(error).__name__})") from None
        except httpx.TransportError as error:
            raise TransientFailure(f"{method} {url}: {type(error).__name__}") from None
        log.debug(
            "ehr request",
            extra={
                "destination": self.destination.name,
                "method": method,
                "status": response.status_code,
            },
        )
        return check(response)

    @staticmethod
    def _json(response: httpx.Response) -> Resource:
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise TransientFailure("the EHR answered something that is not JSON") from None
        if not isinstance(data, dict):
            raise TransientFailure("the EHR answered JSON that is not a resource")
        return data

    def capabilities(self) -> Resource:
        return self._json(self.request("GET", "metadata"))

    def read(self, resource_type: str, resource_id: str) -> Resource | None:
        try:
            return self._json(self.request("GET", f"{resource_type}/{resource_id}"))
        except PermanentFailure as error:
            if error.status in (404, 410):
                return None
            raise

    def search(self, resource_type: str, params: list[tuple[str, str]]) -> list[Resource]:
        """Every match, following `next` links (search mode `match` only)."""
        found: list[Resource] = []
        bundle = self._json(self.request("GET", resource_type, params=params))
        for _page in range(1000):
            for entry in bundle.get("entry", []):
                resource = entry.get("resource")
                mode = (entry.get("search") or {}).get("mode", "match")
                if isinstance(resource, dict) and mode == "match":
                    found.append(resource)
            following = [
                link["url"] for link in bundle.get("link", []) if link.get("relation") == "next"
            ]
            if not following:
                break
            bundle = self._json(self.request("GET", following[0]))
        return found

    def create(self, resource: Resource) -> httpx.Response:
        return self.request("POST", resource["resourceType"], body=resource)

    def update(self, resource: Resource) -> httpx.Response:
        return self.request("PUT", f"{resource['resourceType']}/{resource['id']}", body=resource)

    def conditional_update(self, resource: Resource, identifier: dict[str, str]) -> httpx.Response:
        return self.request(
            "PUT",
            resource["resourceType"],
            params=[("identifier", f"{identifier['system']}|{identifier['value']}")],
            body=resource,
        )

    def delete(self, resource_type: str, resource_id: str) -> None:
        try:
            self.request("DELETE", f"{resource_type}/{resource_id}")
        except PermanentFailure as error:
            if error.status not in (404, 410):
                raise

    def transaction(self, bundle: Resource) -> Resource:
        return self._json(self.request("POST", "", body=bundle))


def location_id(response: httpx.Response, body: Resource | None = None) -> tuple[str, str | None]:
    """(id, versionId) of what a create or update answered: Location, ETag, or the body."""
    return parse_location(response.headers.get("location"), body, response.headers.get("etag"))


def parse_location(
    location: str | None, body: Resource | None = None, etag: str | None = None
) -> tuple[str, str | None]:
    version = etag.removeprefix("W/").strip('"') if etag else None
    if location:
        parts = location.split("/_history/")
        resource_id = parts[0].rstrip("/").split("/")[-1]
        if len(parts) > 1:
            version = version or parts[1].strip("/")
        return resource_id, version
    if body and isinstance(body.get("id"), str):
        meta = body.get("meta") or {}
        return body["id"], version or meta.get("versionId")
    raise TransientFailure("the EHR's answer names no resource id")
