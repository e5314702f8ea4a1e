"""Readiness says no until the database is migrated, and when it cannot be reached."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.bootstrap import bootstrap
from service.config import Settings


def test_readyz_is_503_until_migrated(tmp_path: Path) -> None:
    services = bootstrap(Settings(database_url=f"sqlite:///{tmp_path / 'fresh.db'}"))
    with TestClient(create_app(services)) as client:
        pending = client.get("/readyz")
        assert pending.status_code == 503
        assert pending.json()["migrations"] == "pending"
        services.database.migrate()
        assert client.get("/readyz").status_code == 200


def test_readyz_is_503_when_the_database_is_unreachable() -> None:
    services = bootstrap(
        Settings(database_url="postgresql+psycopg://nobody@127.0.0.1:9/none?connect_timeout=1")
    )
    with TestClient(create_app(services)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["database"] == "unreachable"
    assert client.get("/healthz").status_code == 200
