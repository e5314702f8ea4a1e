"""An intake API client over the ASGI app, on each test database."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from fastapi.testclient import TestClient

from service.app import create_app
from service.bootstrap import bootstrap
from service.config import Settings


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    services = bootstrap(Settings(database_url=database_url, import_batch_size=3))
    with TestClient(create_app(services)) as test_client:
        yield test_client
