"""SMART Backend Services test clients: key pairs, JWK Sets and signed client assertions."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class ClientKey:
    """A client's private key and the JWK Set it registers."""

    alg: str = "ES384"
    kid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    private: Any = None

    def __post_init__(self) -> None:
        if self.private is None:
            self.private = (
                ec.generate_private_key(ec.SECP384R1())
                if self.alg.startswith("ES")
                else rsa.generate_private_key(public_exponent=65537, key_size=2048)
            )

    @property
    def jwks(self) -> dict[str, Any]:
        algorithm = (
            jwt.algorithms.ECAlgorithm if self.alg.startswith("ES") else jwt.algorithms.RSAAlgorithm
        )
        jwk = orjson.loads(algorithm.to_jwk(self.private.public_key()))
        return {"keys": [jwk | {"kid": self.kid, "alg": self.alg}]}

    def assertion(self, client_id: str, audience: str, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": client_id,
            "sub": client_id,
            "aud": audience,
            "exp": now + 240,
            "iat": now,
            "jti": uuid.uuid4().hex,
        }
        headers = {"kid": overrides.pop("kid", self.kid)}
        alg = overrides.pop("alg", self.alg)
        key = overrides.pop("key", self.private)
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return jwt.encode(claims, key, algorithm=alg, headers=headers)


def token_form(assertion: str, scope: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
    }
