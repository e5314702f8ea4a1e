"""When the database is unreachable, locked or too slow: a 503 that says so, and nothing written.

A write blocked behind another transaction's lock waits at most DATABASE_STATEMENT_TIMEOUT_SECONDS
(PostgreSQL's statement_timeout, SQLite's busy timeout), then is answered 503 with Retry-After and
rolled back; an unreachable database is a 503 as well, never a 500.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from service.app import create_app
from service.bootstrap import bootstrap
from service.config import Settings
from service.store.db import Database
from service.store.tables import resources
from tests.fhir_check import r4_errors

FHIR = {"Content-Type": "application/fhir+json"}
UNAVAILABLE = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "transient",
            "diagnostics": "the database is unavailable or did not answer in time; "
            "nothing was changed",
        }
    ],
}


def goal(marker: str) -> dict[str, Any]:
    return {
        "resourceType": "Goal",
        "lifecycleStatus": "proposed",
        "description": {"text": marker},
        "subject": {"display": "someone"},
    }


@contextmanager
def write_lock_held(database_url: str) -> Iterator[None]:
    """Another session holds the lock every write needs, until the block ends."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        assert url.database is not None
        holder = sqlite3.connect(url.database, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    options = url.query.get("options")
    conninfo = url.set(drivername="postgresql", query={}).render_as_string(hide_password=False)
    with psycopg.connect(conninfo, options=str(options or "")) as holder:
        holder.execute("LOCK TABLE resources IN ACCESS EXCLUSIVE MODE")
        yield
        holder.rollback()


def count_goals(database_url: str, marker: str) -> int:
    database = Database(database_url)
    try:
        with database.engine.connect() as connection:
            return int(
                connection.execute(
                    select(func.count())
                    .select_from(resources)
                    .where(resources.c.resource_type == "Goal", resources.c.body.contains(marker))
                ).scalar_one()
            )
    finally:
        database.dispose()


def test_a_write_stuck_behind_a_lock_is_a_503_and_writes_nothing(database_url: str) -> None:
    settings = Settings(
        database_url=database_url, auth_disabled=True, database_statement_timeout_seconds=0.3
    )
    marker = f"blocked-{uuid.uuid4().hex[:8]}"
    with TestClient(create_app(bootstrap(settings))) as http, write_lock_held(database_url):
        answer = http.post("/fhir/Goal", json=goal(marker), headers=FHIR)
        intake = http.put(
            f"/api/v1/patients/P-{uuid.uuid4().hex[:8]}",
            json={"external_id": "x", "given_name": "A", "family_name": "B"},
        )
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "5"
    assert answer.json() == UNAVAILABLE
    assert r4_errors(answer.json()) == []
    assert intake.status_code in (422, 503)  # a malformed record may be refused first
    assert count_goals(database_url, marker) == 0
    with TestClient(create_app(bootstrap(settings))) as http:
        again = http.post("/fhir/Goal", json=goal(marker), headers=FHIR)
    assert again.status_code == 201
    assert count_goals(database_url, marker) == 1


@pytest.mark.parametrize("path", ["/fhir/Goal/some-id", "/fhir/Goal?lifecycle-status=proposed"])
def test_an_unreachable_database_is_a_503_outcome(path: str) -> None:
    settings = Settings(
        database_url="postgresql+psycopg://nobody@127.0.0.1:9/none?connect_timeout=1",
        auth_disabled=True,
        database_statement_timeout_seconds=1,
    )
    with TestClient(create_app(bootstrap(settings))) as http:
        answer = http.get(path)
        problem = http.get("/api/v1/patients/P-1")
    assert answer.status_code == 503, answer.text
    assert answer.json() == UNAVAILABLE
    assert answer.headers["retry-after"] == "5"
    assert problem.status_code == 503
    assert problem.headers["content-type"].startswith("application/problem+json")
    assert problem.headers["retry-after"] == "5"
