"""The authorization server (SMART Backend Services) and the check of every access token.

- `ClientRegistry`: clients registered with their JWK Set (inline or by URL) and the scopes they
  may be granted (the `clients` table; `infusion-bridge clients add|list|remove`).
- `TokenService.issue`: `POST /auth/token` with `grant_type=client_credentials` and a
  `private_key_jwt` client assertion (RS384 or ES384), checked as the SMART Backend Services spec
  requires: `iss` = `sub` = a registered client id, `aud` = the token URL, `exp` at most five
  minutes ahead, a `jti` never seen before (the `client_assertions` primary key refuses a replay
  in any process), a known `kid`, an allowed algorithm. It answers an access token signed by the
  server (RS384) that lives at most five minutes and carries the granted scopes.
- `Authenticator.authenticate`: a bearer token, issued here or by a trusted external
  authorization server (issuer, JWKS URL and audience in settings), checked for signature,
  issuer, audience and expiry; the result is a `Principal`.

The token signing key comes from `AUTH_SIGNING_KEY_FILE` or, when unset, is generated once and
kept in the `signing_keys` table, so every API process signs and verifies with the same key.

Errors:

    OAuthError            an OAuth 2.0 error answer of the token endpoint (RFC 6749 5.2)
    AuthenticationFailed  a missing, malformed, forged or expired bearer token (401)

This module must not log tokens or assertions, and must not decide what a principal may do
(`service.security.access` does).
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx
import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from service.security.scopes import AUDIT_TYPE, InvalidScope, Scopes
from service.store.db import Database
from service.store.tables import client_assertions, clients, signing_keys

ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLIENT_ALGORITHMS: Final = ("RS384", "ES384")
TOKEN_ALGORITHM: Final = "RS384"
MAX_ASSERTION_SECONDS: Final = 300
MAX_TOKEN_SECONDS: Final = 300
JWKS_CACHE_SECONDS: Final = 300
CLOCK_SKEW_SECONDS: Final = 30
_CURVES: Final = {"ES384": "P-384"}

ALL_ACCESS: Final = Scopes.parse(
    f"system/*.cruds system/{AUDIT_TYPE}.cruds system/intake.cruds system/sync.cruds"
)
"""What the principal of a server with authentication disabled may do."""


class OAuthError(Exception):
    """An OAuth 2.0 error response: `error` is the RFC 6749 code."""

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status

    def as_json(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


class AuthenticationFailed(Exception):
    """A bearer token that cannot be accepted; the text goes into WWW-Authenticate."""


@dataclass(frozen=True)
class Principal:
    """Who is calling, and what the token lets them do."""

    client_id: str
    scopes: Scopes
    issuer: str
    expires_at: float | None = None


LOCAL_PRINCIPAL: Final = Principal(client_id="local", scopes=ALL_ACCESS, issuer="auth-disabled")


@dataclass(frozen=True)
class Client:
    id: str
    scope: str
    jwks: dict[str, Any] | None
    jwks_url: str | None
    created_at: datetime


@dataclass(frozen=True)
class ExternalIssuer:
    """An external authorization server whose access tokens are trusted."""

    issuer: str
    jwks_url: str
    audience: str


# --- keys -----------------------------------------------------------------------------------------


class JwksCache:
    """JWK Sets fetched by URL and kept a few minutes; an unknown kid refetches (every 10 s)."""

    def __init__(self, http: httpx.Client) -> None:
        self._http = http
        self._sets: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def get(self, url: str, *, refresh: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            cached = self._sets.get(url)
        if cached is not None:
            age = now - cached[0]
            if age < JWKS_CACHE_SECONDS and not (refresh and age > 10):
                return cached[1]
        try:
            response = self._http.get(url, timeout=5)
            response.raise_for_status()
            data = response.json()
        except (httpx.HTTPError, ValueError) as error:
            if cached is not None:
                return cached[1]
            raise LookupError(f"the JWK Set at {url} could not be fetched: {error}") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise LookupError(f"{url} does not serve a JWK Set")
        with self._lock:
            self._sets[url] = (now, data)
        return data


def find_key(jwks: Mapping[str, Any], kid: str, alg: str) -> Any:
    """The public key with this kid, usable with alg; LookupError when there is none."""
    for jwk in jwks.get("keys", []):
        if not isinstance(jwk, dict) or jwk.get("kid") != kid:
            continue
        if jwk.get("alg") not in (None, alg):
            continue
        if alg in _CURVES and jwk.get("crv") != _CURVES[alg]:
            continue
        if (alg.startswith("RS") and jwk.get("kty") != "RSA") or (
            alg.startswith("ES") and jwk.get("kty") != "EC"
        ):
            continue
        try:
            return jwt.PyJWK(jwk, algorithm=alg).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue
    raise LookupError(f"no usable {alg} key with kid {kid!r}")


def check_jwks(data: Any) -> dict[str, Any]:
    """A JWK Set a client registers: public keys only, each with a kid."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise ValueError("a JWK Set is an object with a non-empty 'keys' list")
    for jwk in data["keys"]:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
            raise ValueError("every key of the JWK Set needs a kid")
        if "d" in jwk:
            raise ValueError(f"key {jwk['kid']} is a private key: register the public key only")
        try:
            jwt.PyJWK(jwk)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as error:
            raise ValueError(f"key {jwk['kid']} is not a usable JWK: {error}") from None
    return data


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey

    @property
    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.public_key()))
        return jwk | {"kid": self.kid, "alg": TOKEN_ALGORITHM, "use": "sig"}

    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the token signing key must be an RSA private key")
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(kid=hashlib.sha256(public).hexdigest()[:32], private_key=key)


class KeyRing:
    """The token signing key, loaded once (on first use, or at the app's start)."""

    def __init__(self, *, database: Database, key_file: Path | None) -> None:
        self._database = database
        self._key_file = key_file
        self._key: SigningKey | None = None
        self._lock = threading.Lock()

    def get(self) -> SigningKey:
        with self._lock:
            if self._key is None:
                self._key = load_signing_key(database=self._database, key_file=self._key_file)
            return self._key


def load_signing_key(*, database: Database, key_file: Path | None) -> SigningKey:
    """The configured key, or the one in the database (generated by the first process to ask)."""
    if key_file is not None:
        return SigningKey.from_pem(key_file.read_bytes())
    with database.unit_of_work(write=True) as uow:
        if uow.connection.dialect.name == "postgresql":
            uow.connection.exec_driver_sql("LOCK TABLE signing_keys IN EXCLUSIVE MODE")
        row = uow.connection.execute(
            select(signing_keys.c.private_pem).order_by(signing_keys.c.created_at).limit(1)
        ).first()
        if row is not None:
            return SigningKey.from_pem(row.private_pem.encode())
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        key = SigningKey.from_pem(pem)
        uow.connection.execute(
            insert(signing_keys).values(
                kid=key.kid, private_pem=pem.decode(), created_at=datetime.now(UTC)
            )
        )
        uow.commit()
        return key


# --- the client registry --------------------------------------------------------------------------


class ClientRegistry:
    """Registered clients, in the database (every process sees the same)."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def add(
        self,
        *,
        client_id: str,
        scope: str,
        jwks: dict[str, Any] | None = None,
        jwks_url: str | None = None,
    ) -> Client:
        if (jwks is None) == (jwks_url is None):
            raise ValueError("give the client's keys either inline (a JWK Set) or by URL")
        if not client_id or len(client_id) > 200 or not client_id.isprintable():
            raise ValueError("a client id is 1-200 printable characters")
        if jwks_url is not None and not jwks_url.startswith(("https://", "http://")):
            raise ValueError("the JWKS URL must be http(s)")
        try:
            granted = Scopes.parse(scope, strict=True)
        except InvalidScope as error:
            raise ValueError(str(error)) from None
        if not granted.grants:
            raise ValueError("give the client at least one scope")
        client = Client(
            id=client_id,
            scope=str(granted),
            jwks=None if jwks is None else check_jwks(jwks),
            jwks_url=jwks_url,
            created_at=datetime.now(UTC),
        )
        with self._database.unit_of_work(write=True) as uow:
            try:
                uow.connection.execute(
                    insert(clients).values(
                        id=client.id,
                        scope=client.scope,
                        jwks=None if client.jwks is None else orjson.dumps(client.jwks).decode(),
                        jwks_url=client.jwks_url,
                        created_at=client.created_at,
                    )
                )
            except IntegrityError:
                raise ValueError(f"a client {client_id!r} is registered already") from None
            uow.commit()
        return client

    def get(self, client_id: str) -> Client | None:
        with self._database.unit_of_work(write=False) as uow:
            row = uow.connection.execute(select(clients).where(clients.c.id == client_id)).first()
        return None if row is None else _client(row)

    def list(self) -> list[Client]:
        with self._database.unit_of_work(write=False) as uow:
            rows = uow.connection.execute(select(clients).order_by(clients.c.id)).all()
        return [_client(row) for row in rows]

    def remove(self, client_id: str) -> bool:
        with self._database.unit_of_work(write=True) as uow:
            removed = uow.connection.execute(delete(clients).where(clients.c.id == client_id))
            uow.commit()
        return bool(removed.rowcount)


def _client(row: Any) -> Client:
    return Client(
        id=row.id,
        scope=row.scope,
        jwks=None if row.jwks is None else orjson.loads(row.jwks),
        jwks_url=row.jwks_url,
        created_at=row.created_at,
    )


# --- the token endpoint ---------------------------------------------------------------------------


@dataclass
class TokenService:
    """Checks client assertions and issues access tokens."""

    database: Database
    registry: ClientRegistry
    jwks: JwksCache
    keys: KeyRing
    issuer: str
    lifetime_seconds: int = MAX_TOKEN_SECONDS

    def issue(self, *, form: Mapping[str, str], token_url: str) -> dict[str, Any]:
        """The token response for a client_credentials request; OAuthError otherwise."""
        if form.get("grant_type") != "client_credentials":
            raise OAuthError(
                "unsupported_grant_type", "only grant_type=client_credentials is supported"
            )
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthError("invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
        assertion = form.get("client_assertion")
        if not assertion:
            raise OAuthError("invalid_request", "client_assertion is missing")
        requested = form.get("scope", "")
        if not requested.strip():
            raise OAuthError("invalid_scope", "scope is missing")
        client = self._check_assertion(assertion, token_url)
        try:
            wanted = Scopes.parse(requested, strict=True)
        except InvalidScope as error:
            raise OAuthError("invalid_scope", str(error)) from None
        allowed = Scopes.parse(client.scope)
        granted = [
            text
            for text, grant in zip(wanted.text, wanted.grants, strict=True)
            if Scopes((text,), (grant,)).within(allowed)
        ]
        if not granted:
            raise OAuthError(
                "invalid_scope", f"none of the requested scopes is granted to {client.id}"
            )
        scope = " ".join(granted)
        return {
            "access_token": self.access_token(client_id=client.id, scope=scope),
            "token_type": "bearer",
            "expires_in": self.lifetime_seconds,
            "scope": scope,
        }

    def access_token(self, *, client_id: str, scope: str) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": client_id,
            "aud": self.issuer,
            "iat": now,
            "exp": now + self.lifetime_seconds,
            "jti": uuid.uuid4().hex,
            "scope": scope,
        }
        key = self.keys.get()
        return jwt.encode(
            claims, key.private_key, algorithm=TOKEN_ALGORITHM, headers={"kid": key.kid}
        )

    def _check_assertion(self, assertion: str, token_url: str) -> Client:
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise OAuthError("invalid_client", "client_assertion is not a JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in CLIENT_ALGORITHMS:
            raise OAuthError(
                "invalid_client", f"client_assertion alg must be {' or '.join(CLIENT_ALGORITHMS)}"
            )
        if not isinstance(kid, str) or not kid:
            raise OAuthError("invalid_client", "client_assertion header has no kid")
        client_id = unverified.get("iss")
        client = self.registry.get(client_id) if isinstance(client_id, str) else None
        if client is None:
            raise OAuthError("invalid_client", "the assertion's iss is no registered client")
        key = self._client_key(client, kid, str(alg))
        try:
            claims = jwt.decode(
                assertion,
                key,
                algorithms=[str(alg)],
                audience=token_url,
                issuer=client.id,
                leeway=CLOCK_SKEW_SECONDS,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise OAuthError("invalid_client", "client_assertion has expired") from None
        except jwt.InvalidAudienceError:
            raise OAuthError(
                "invalid_client", f"client_assertion aud must be the token URL {token_url}"
            ) from None
        except jwt.PyJWTError as error:
            raise OAuthError("invalid_client", f"client_assertion refused: {error}") from None
        if claims["sub"] != client.id:
            raise OAuthError("invalid_client", "client_assertion sub must equal iss")
        exp = claims["exp"]
        if not isinstance(exp, int | float) or exp > time.time() + MAX_ASSERTION_SECONDS:
            raise OAuthError(
                "invalid_client", "client_assertion exp is more than five minutes ahead"
            )
        jti = claims["jti"]
        if not isinstance(jti, str) or not 0 < len(jti) <= 200:
            raise OAuthError("invalid_client", "client_assertion jti must be a string")
        self._remember(client.id, jti, float(exp))
        return client

    def _client_key(self, client: Client, kid: str, alg: str) -> Any:
        try:
            if client.jwks is not None:
                return find_key(client.jwks, kid, alg)
            assert client.jwks_url is not None
            try:
                return find_key(self.jwks.get(client.jwks_url), kid, alg)
            except LookupError:
                return find_key(self.jwks.get(client.jwks_url, refresh=True), kid, alg)
        except LookupError as error:
            raise OAuthError("invalid_client", str(error)) from None

    def _remember(self, client_id: str, jti: str, exp: float) -> None:
        """Record the jti; a second use (here or in any other process) is a replay."""
        expires = datetime.fromtimestamp(exp + CLOCK_SKEW_SECONDS, UTC)
        now = datetime.now(UTC)
        with self.database.unit_of_work(write=True) as uow:
            uow.connection.execute(
                delete(client_assertions).where(client_assertions.c.expires_at < now)
            )
            try:
                uow.connection.execute(
                    insert(client_assertions).values(
                        client_id=client_id, jti=jti, expires_at=expires
                    )
                )
            except IntegrityError:
                raise OAuthError("invalid_client", "client_assertion jti was used before") from None
            uow.commit()


# --- bearer tokens --------------------------------------------------------------------------------


@dataclass
class Authenticator:
    """Checks bearer tokens: this server's own and those of trusted external issuers."""

    issuer: str
    keys: KeyRing
    jwks: JwksCache | None = None
    external: tuple[ExternalIssuer, ...] = ()
    _verified: dict[str, Principal] = field(default_factory=dict)

    def verify_local(self, token: str) -> Principal | None:
        """A token this server issued (or one already verified); None for an external one."""
        cached = self._verified.get(token)
        if cached is not None:
            if cached.expires_at is not None and cached.expires_at > time.time():
                return cached
            self._verified.pop(token, None)
            raise AuthenticationFailed("the access token has expired")
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationFailed("the access token is not a JWT") from None
        issuer = unverified.get("iss")
        if issuer != self.issuer:
            if any(e.issuer == issuer for e in self.external):
                return None
            raise AuthenticationFailed("the access token's issuer is not trusted")
        key = self.keys.get()
        if header.get("kid") != key.kid:
            raise AuthenticationFailed("the access token was not signed by this server's key")
        claims = self._decode(token, key.public_key(), [TOKEN_ALGORITHM], self.issuer)
        return self._principal(token, claims)

    def verify_external(self, token: str) -> Principal:
        """A token of a trusted external issuer (may fetch its JWK Set: call off the loop)."""
        unverified = jwt.decode(token, options={"verify_signature": False})
        issuer = next(e for e in self.external if e.issuer == unverified.get("iss"))
        header = jwt.get_unverified_header(token)
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384"):
            raise AuthenticationFailed("the access token's algorithm is not accepted")
        if not isinstance(kid, str) or self.jwks is None:
            raise AuthenticationFailed("the access token names no key")
        try:
            try:
                key = find_key(self.jwks.get(issuer.jwks_url), kid, str(alg))
            except LookupError:
                key = find_key(self.jwks.get(issuer.jwks_url, refresh=True), kid, str(alg))
        except LookupError:
            raise AuthenticationFailed("the access token's key is not known") from None
        claims = self._decode(token, key, [str(alg)], issuer.issuer, audience=issuer.audience)
        return self._principal(token, claims)

    def _decode(
        self, token: str, key: Any, algorithms: list[str], issuer: str, audience: str | None = None
    ) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=issuer,
                audience=audience or issuer,
                leeway=CLOCK_SKEW_SECONDS,
                options={"require": ["iss", "exp", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationFailed("the access token has expired") from None
        except jwt.PyJWTError:
            raise AuthenticationFailed("the access token is not valid") from None
        return claims

    def _principal(self, token: str, claims: dict[str, Any]) -> Principal:
        scope = claims.get("scope", claims.get("scp", ""))
        if isinstance(scope, list):
            scope = " ".join(str(s) for s in scope)
        client_id = claims.get("client_id") or claims.get("azp") or claims.get("sub")
        if not isinstance(client_id, str) or not client_id:
            raise AuthenticationFailed("the access token names no client")
        principal = Principal(
            client_id=client_id,
            scopes=Scopes.parse(str(scope)),
            issuer=str(claims["iss"]),
            expires_at=float(claims["exp"]) + CLOCK_SKEW_SECONDS,
        )
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[token] = principal
        return principal
