"""Record writes on real SQLite and PostgreSQL: idempotent upserts, history, imports, races."""

from __future__ import annotations

import threading
from collections.abc import Iterable

import orjson
import pytest

from service.bootstrap import materializer
from service.config import Settings
from service.errors import InvalidRecord, VersionConflict
from service.records.repository import RecordRepository
from service.records.service import (
    LineResult,
    LineStatus,
    Outcome,
    import_ndjson,
    parse_record,
    put_record,
)
from service.store.db import Database
from tests.factory import Record, clinic

MATERIALIZER = materializer(Settings())


def put(database: Database, record: Record, **options: str) -> Outcome:
    with database.unit_of_work() as uow:
        return put_record(
            uow=uow, record=parse_record(record), materializer=MATERIALIZER, actor="test", **options
        ).outcome


def stored(database: Database, kind: str, external_id: str) -> Record | None:
    with database.unit_of_work(write=False) as uow:
        found = RecordRepository(uow.connection).get(kind, external_id)
    return None if found is None else orjson.loads(found.body)


def run_import(
    database: Database, records: Iterable[Record | bytes], batch_size: int = 500
) -> list[LineResult]:
    lines = [r if isinstance(r, bytes) else orjson.dumps(r) for r in records]
    results = [
        result
        for batch in import_ndjson(
            database=database,
            materializer=MATERIALIZER,
            lines=lines,
            actor="test",
            batch_size=batch_size,
        )
        for result in batch
    ]
    return sorted(results, key=lambda result: result.line)


def test_upsert_is_idempotent_and_keeps_history(database: Database) -> None:
    records = clinic()
    for record in records.records():
        assert put(database, record) is Outcome.created
    for record in records.records():
        assert put(database, record) is Outcome.unchanged

    changed = records.session | {"weight_kg": 70.0, "total_dose_mg": 35.0}
    assert put(database, changed) is Outcome.updated
    assert stored(database, "session", changed["external_id"]) == parse_record(changed).model_dump(
        mode="json", exclude_none=True
    )
    with database.unit_of_work(write=False) as uow:
        repository = RecordRepository(uow.connection)
        history = repository.history("session", changed["external_id"])
        current = repository.get("session", changed["external_id"])
    assert [(c.version, c.operation, c.changed_by) for c in history] == [
        (1, "create", "test"),
        (2, "update", "test"),
    ]
    assert history[0].patch is None
    assert sorted(orjson.loads(history[1].patch or "[]"), key=lambda op: op["path"]) == [
        {"op": "replace", "path": "/total_dose_mg", "value": 35.0},
        {"op": "replace", "path": "/weight_kg", "value": 70.0},
    ]
    assert current is not None
    assert current.version == 2
    assert current.patient_id == records.patient["external_id"]
    assert current.course_id == records.course["external_id"]
    assert history[1].body == current.body


def test_rejected_reference_stores_nothing(database: Database) -> None:
    records = clinic()
    with pytest.raises(InvalidRecord) as caught:
        put(database, records.diagnosis)
    assert [(p.loc, p.type) for p in caught.value.problems] == [
        (("patient",), "unresolved_reference")
    ]
    assert stored(database, "diagnosis", records.diagnosis["external_id"]) is None
    with database.unit_of_work(write=False) as uow:
        assert (
            RecordRepository(uow.connection).history("diagnosis", records.diagnosis["external_id"])
            == []
        )


def test_cross_record_rules(database: Database) -> None:
    first, second = clinic(), clinic()
    for record in first.records()[:5] + second.records()[:5]:
        put(database, record)
    # A course may not treat another patient's diagnosis, nor be prescribed by a nurse.
    wrong = first.course | {
        "diagnosis": second.diagnosis["external_id"],
        "prescriber": first.nurse["external_id"],
    }
    with pytest.raises(InvalidRecord) as caught:
        put(database, wrong)
    assert {(p.loc, p.type) for p in caught.value.problems} == {
        (("diagnosis",), "other_patient"),
        (("prescriber",), "role"),
    }
    # A session cannot precede its course.
    early = first.session | {
        "scheduled_start": "2026-10-01T09:00:00-04:00",
        "started_at": "2026-10-01T09:04:00-04:00",
        "ended_at": "2026-10-01T09:46:00-04:00",
        "vitals": [],
        "assessments": [],
        "adverse_events": [],
    }
    with pytest.raises(InvalidRecord) as before:
        put(database, early)
    assert [p.type for p in before.value.problems] == ["before_course"]
    # A record never moves to another patient.
    moved = first.diagnosis | {"patient": second.patient["external_id"]}
    with pytest.raises(InvalidRecord) as move:
        put(database, moved)
    assert [p.type for p in move.value.problems] == ["patient_change"]
    assert stored(database, "diagnosis", first.diagnosis["external_id"]) == parse_record(
        first.diagnosis
    ).model_dump(mode="json", exclude_none=True)


def test_if_match_guards_updates(database: Database) -> None:
    patient = clinic().patient
    with pytest.raises(VersionConflict):
        put(database, patient, if_match="1")
    put(database, patient)
    assert put(database, patient | {"sex": "other"}, if_match="1") is Outcome.updated
    with pytest.raises(VersionConflict) as stale:
        put(database, patient | {"sex": "unknown"}, if_match="1")
    assert stale.value.current == 2
    assert stored(database, "patient", patient["external_id"])["sex"] == "other"  # type: ignore[index]


def test_import_resolves_references_within_the_file_in_any_order(database: Database) -> None:
    records = clinic().records()
    results = run_import(database, list(reversed(records)), batch_size=2)
    assert [r.status for r in results] == [LineStatus.created] * len(records)
    again = run_import(database, records)
    assert [r.status for r in again] == [LineStatus.unchanged] * len(records)


def test_import_rejects_lines_alone_and_explains_dependent_rejections(database: Database) -> None:
    records = clinic()
    bad_course = records.course | {"protocol": {"dose_mg_per_kg": 3}}
    lines: list[Record | bytes] = [
        records.patient,
        records.prescriber,
        records.nurse,
        records.diagnosis,
        bad_course,
        records.session,
        b"{not json",
        b"",
        records.assessment,
        {"kind": "invoice", "external_id": "X-1"},
    ]
    results = {r.line: r for r in run_import(database, lines)}
    assert set(results) == {1, 2, 3, 4, 5, 6, 7, 9, 10}  # the blank line 8 is no record
    assert {n for n, r in results.items() if r.status is LineStatus.rejected} == {5, 6, 7, 10}
    assert results[5].problems[0].loc == ("protocol", "dose_mg_per_kg")
    assert results[6].problems[0].type == "unresolved_reference"
    assert "line 5 was rejected" in results[6].problems[0].message
    assert results[7].problems[0].type == "json_invalid"
    assert results[10].problems[0].loc == ("kind",)
    assert stored(database, "course", records.course["external_id"]) is None
    assert stored(database, "session", records.session["external_id"]) is None
    assert stored(database, "assessment", records.assessment["external_id"]) is not None


def test_concurrent_first_writes_of_one_record_create_it_once(database: Database) -> None:
    patient = clinic().patient
    variants = [patient | {"mrn": f"CLN-{n}"} for n in range(8)]
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(variants))

    def write(record: Record) -> None:
        barrier.wait()
        try:
            outcomes.append(put(database, record))
        except BaseException as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(v,)) for v in variants]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert outcomes.count(Outcome.created) == 1
    with database.unit_of_work(write=False) as uow:
        history = RecordRepository(uow.connection).history("patient", patient["external_id"])
    assert [c.version for c in history] == list(range(1, len(history) + 1))
    assert len(history) == 1 + outcomes.count(Outcome.updated)


def test_a_record_twice_in_one_import_becomes_two_versions(database: Database) -> None:
    patient = clinic().patient
    results = run_import(database, [patient, patient | {"mrn": "CLN-second"}, patient])
    assert [(r.status, r.version) for r in results] == [
        (LineStatus.created, 1),
        (LineStatus.updated, 2),
        (LineStatus.updated, 3),
    ]
    assert stored(database, "patient", patient["external_id"]) == parse_record(patient).model_dump(
        mode="json", exclude_none=True
    )


def test_concurrent_imports_of_the_same_records_create_each_once(database: Database) -> None:
    records = [record for _ in range(20) for record in clinic().records()]
    reports: list[list[LineResult]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def load() -> None:
        barrier.wait()
        try:
            reports.append(run_import(database, records, batch_size=50))
        except BaseException as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for line in range(len(records)):
        statuses = sorted(report[line].status for report in reports)
        assert statuses == [LineStatus.created, LineStatus.unchanged, LineStatus.unchanged]
    with database.unit_of_work(write=False) as uow:
        repository = RecordRepository(uow.connection)
        for record in records[:7]:
            history = repository.history(record["kind"], record["external_id"])
            assert [change.version for change in history] == [1]
