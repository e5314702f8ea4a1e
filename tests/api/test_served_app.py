"""The app as `infusion-bridge serve` runs it in each worker process."""

from __future__ import annotations

import gc
import warnings

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from fastapi.testclient import TestClient

from service.app import create_app, served_app
from service.bootstrap import bootstrap
from service.config import Settings


def test_the_served_app_keeps_what_startup_loaded_out_of_the_collector(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("AUTH_DISABLED", "true")
    gc.unfreeze()
    try:
        with TestClient(served_app()) as http:
            assert gc.get_freeze_count() > 0
            assert http.get("/fhir/metadata").status_code == 200
    finally:
        gc.unfreeze()


def test_an_app_built_for_a_caller_leaves_the_collector_alone(database_url: str) -> None:
    gc.unfreeze()
    services = bootstrap(Settings(database_url=database_url, auth_disabled=True))
    with TestClient(create_app(services)):
        assert gc.get_freeze_count() == 0
