"""Shared fixtures: real databases (SQLite files and a PostgreSQL schema per run).

PostgreSQL comes from TEST_DATABASE_URL (default: the local `test` database). When it cannot be
reached its tests are skipped with the reason, except under CI=true, where that is a failure.
Each run migrates a schema of its own and drops it afterwards; tests use random external ids, so
they never depend on one another's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from service.store.db import Database

DEFAULT_TEST_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

# Apps and servers the tests build run with authentication off (as on a developer's loopback),
# unless a test asks for it: the security tests build theirs with `auth_disabled=False`.
os.environ.setdefault("AUTH_DISABLED", "true")


def postgres_base_url() -> str:
    return os.environ.get("TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)


def with_schema(url: str, schema: str) -> str:
    """The URL with its connections' search_path set to `schema`."""
    return (
        make_url(url)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A migrated PostgreSQL schema for this test run, dropped at the end."""
    base = postgres_base_url()
    engine = create_engine(base)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:
        engine.dispose()
        reason = f"PostgreSQL at {make_url(base).render_as_string()} is unreachable: {error}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    schema = f"ib_test_{uuid.uuid4().hex[:12]}"
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = with_schema(base, schema)
    database = Database(url)
    database.migrate()
    database.dispose()
    try:
        yield url
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture
def empty_postgres_url(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL schema of its own with no tables yet, dropped afterwards."""
    engine = create_engine(postgres_base_url())
    schema = f"ib_test_{uuid.uuid4().hex[:12]}"
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield with_schema(postgres_base_url(), schema)
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database of its own with no schema yet, on each store, to migrate step by step."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("empty_postgres_url")
    return url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("sqlite") / "records.db"
    url = f"sqlite:///{path}"
    database = Database(url)
    database.migrate()
    database.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each storage and API test runs once on SQLite and once on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    yield db
    db.dispose()


def new_id(prefix: str) -> str:
    """A random external id, so tests never collide."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def r4_examples() -> Path:
    """The official R4 package hl7.fhir.r4.examples@4.0.1 (`make test` fetches it with npm)."""
    folder = Path(os.environ.get("FHIR_R4_EXAMPLES", ".cache/hl7.fhir.r4.examples-4.0.1/package"))
    if not (folder / "package.json").is_file():
        reason = f"the official R4 examples are not at {folder}: run `make test` (it uses npm)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return folder
