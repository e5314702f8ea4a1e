"""API clients over the ASGI app, on each test database.

`client` runs with authentication off (as a developer's loopback server may); `secure` builds the
app as production runs it, with `secure.token(scope)` giving a bearer token for a client
registered with those scopes through the real token endpoint.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from fastapi.testclient import TestClient

from service.app import create_app
from service.bootstrap import Services, bootstrap
from service.config import Settings
from tests.smart import ClientKey, token_form

TOKEN_URL = "http://testserver/auth/token"


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    services = bootstrap(
        Settings(database_url=database_url, import_batch_size=3, auth_disabled=True)
    )
    with TestClient(create_app(services)) as test_client:
        yield test_client


@dataclass
class SecureApi:
    """The app with authentication on, and a way to get tokens for fresh clients."""

    http: TestClient
    services: Services
    key: ClientKey = field(default_factory=ClientKey)

    def register(self, scope: str, *, key: ClientKey | None = None) -> str:
        client_id = f"client-{uuid.uuid4().hex[:10]}"
        self.services.security.clients.add(
            client_id=client_id, scope=scope, jwks=(key or self.key).jwks
        )
        return client_id

    def token(self, scope: str) -> str:
        client_id = self.register(scope)
        answer = self.http.post(
            "/auth/token", data=token_form(self.key.assertion(client_id, TOKEN_URL), scope)
        )
        assert answer.status_code == 200, answer.text
        return str(answer.json()["access_token"])

    def headers(self, scope: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(scope)}"}


def secure_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "import_batch_size": 3,
        "auth_disabled": False,
    }
    return Settings(**(values | overrides))  # type: ignore[arg-type]


@pytest.fixture
def secure(database_url: str) -> Iterator[SecureApi]:
    services = bootstrap(secure_settings(database_url))
    with TestClient(create_app(services)) as test_client:
        yield SecureApi(http=test_client, services=services)
