"""Lookups of many keys at once use SQLite's indexes: none reads a whole table.

SQLite answers a row-value IN list (`(resource_type, id) IN (VALUES ...)`) by scanning the
table, which at a million resources makes every batch write, index removal, identifier match
and `_include` cost a full pass. Each statement these run is explained here, with the
parameters it ran with.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, event, select

from service.fhir.search import parse_search, run_search
from service.fhir.writes import identifier_matches
from service.records.repository import RecordRepository
from service.store.db import Database, pairs_in
from service.store.resources import ResourceRepository, SearchIndexWriter
from service.store.tables import record_resources

KEYS = [("Patient", "p1"), ("Observation", "o1"), ("Observation", "o2"), ("Encounter", "e1")]


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    built = Database(f"sqlite:///{tmp_path / 'plans.db'}")
    built.migrate()
    yield built
    built.dispose()


def _plans(database: Database, run: Callable[[Connection], Any]) -> list[tuple[str, str]]:
    """Every step of the plans of what `run` executed (SELECTs and DELETEs), with its
    statement."""
    executed: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "DELETE", "WITH")):
            executed.append((statement, parameters))

    event.listen(database.engine, "before_cursor_execute", seen)
    try:
        with database.unit_of_work() as uow:
            run(uow.connection)
    finally:
        event.remove(database.engine, "before_cursor_execute", seen)
    assert executed, "nothing ran"
    path = database.engine.url.database
    assert path is not None
    with sqlite3.connect(path) as plain:
        return [
            (detail, statement)
            for statement, parameters in executed
            for *_, detail in plain.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
        ]


def _scans(database: Database, run: Callable[[Connection], Any]) -> list[str]:
    """Every full-table SCAN in the plans of what `run` executed."""
    return [
        f"{step} in {statement}"
        for step, statement in _plans(database, run)
        if step.startswith("SCAN") and "CONSTANT ROW" not in step
    ]


def test_current_versions_locks_and_index_removal_look_each_key_up(database: Database) -> None:
    assert _scans(database, lambda c: ResourceRepository(c)._current(KEYS)) == []
    assert _scans(database, lambda c: ResourceRepository(c).lock_many(KEYS)) == []
    assert _scans(database, lambda c: SearchIndexWriter(c).remove(KEYS)) == []


def test_identifiers_of_several_systems_are_looked_up_in_the_index(database: Database) -> None:
    wanted = [("urn:a", "1"), ("urn:a", "2"), ("urn:b", "1")]
    assert _scans(database, lambda c: identifier_matches(c, "Observation", wanted)) == []


def test_records_by_kind_and_id_are_looked_up_in_the_key(database: Database) -> None:
    keys = {("patient", "P-1"), ("session", "S-1"), ("session", "S-2")}
    assert _scans(database, lambda c: RecordRepository(c).get_many(keys)) == []


@pytest.mark.parametrize(
    ("resource_type", "params"),
    [
        ("Patient", [("_id", "p1,p2"), ("_revinclude", "Observation:subject")]),
        ("Observation", [("_id", "o1,o2"), ("_include", "Observation:subject")]),
    ],
)
def test_includes_look_their_targets_up(
    database: Database, resource_type: str, params: list[tuple[str, str]]
) -> None:
    with database.unit_of_work() as uow:
        ResourceRepository(uow.connection).write(
            [
                {"resourceType": "Patient", "id": "p1", "gender": "female"},
                {"resourceType": "Patient", "id": "p2", "gender": "male"},
                {
                    "resourceType": "Observation",
                    "id": "o1",
                    "status": "final",
                    "code": {"text": "x"},
                    "subject": {"reference": "Patient/p1"},
                },
                {
                    "resourceType": "Observation",
                    "id": "o2",
                    "status": "final",
                    "code": {"text": "x"},
                    "subject": {"reference": "Patient/p2"},
                },
            ],
            now=datetime.now(UTC),
        )
        uow.commit()
    query = parse_search(resource_type, params, base="http://testserver/fhir", strict=True)
    page = _scans(database, lambda c: run_search(c, query))
    assert [scan for scan in page if "search_" in scan or "resources" in scan] == []


def test_the_record_a_resource_came_from_is_looked_up_by_the_resource(database: Database) -> None:
    links = record_resources
    query = select(links.c.record_kind, links.c.record_id).where(
        pairs_in(links.c.resource_type, links.c.resource_id, KEYS)
    )
    assert _scans(database, lambda c: c.execute(query).all()) == []


def test_a_patients_observations_by_code_and_date_read_the_index_tables_indexes_alone(
    database: Database,
) -> None:
    """The typical clinical search: every index table it reads (the references included, whose
    URL says whether the target is this server's) is read through a covering index."""
    query = parse_search(
        "Observation",
        [("patient", "p1"), ("code", "http://loinc.org|8867-4"), ("date", "ge2026-01-01")],
        base="http://testserver/fhir",
        strict=True,
    )
    plans = _plans(database, lambda c: run_search(c, query))
    steps = [step for step, _ in plans if "search_" in step]
    assert steps
    assert [step for step in steps if "COVERING INDEX" not in step] == []
