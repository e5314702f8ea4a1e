"""Record writes materialize FHIR resources in the same transaction, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import date
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from mappings.context import resource_id
from service.bootstrap import materializer
from service.config import Settings
from service.errors import InvalidRecord
from service.records.demo import generate_clinic, to_ndjson
from service.records.service import LineStatus, import_ndjson, parse_record, put_record
from service.store.db import Database
from service.store.resources import ResourceRepository
from service.store.tables import outbox, resource_versions
from tests.factory import Record, clinic
from tests.fhir_check import r4_errors

MATERIALIZER = materializer(Settings())


def put(database: Database, record: Record) -> None:
    with database.unit_of_work() as uow:
        put_record(uow=uow, record=parse_record(record), materializer=MATERIALIZER, actor="test")


def read(database: Database, resource_type: str, *role: str) -> dict[str, Any] | None:
    with database.unit_of_work(write=False) as uow:
        stored = ResourceRepository(uow.connection).read(resource_type, resource_id(*role))
    if stored is None or stored.deleted:
        return None
    body: dict[str, Any] = orjson.loads(stored.body)
    return body


def counts(database: Database) -> tuple[int, int]:
    with database.unit_of_work(write=False) as uow:
        # AuditEvents are versions too, never delivered: the audit trail stays here.
        versions = uow.connection.execute(
            select(func.count())
            .select_from(resource_versions)
            .where(resource_versions.c.resource_type != "AuditEvent")
        )
        queued = uow.connection.execute(select(func.count()).select_from(outbox))
        return int(versions.scalar_one()), int(queued.scalar_one())


def test_each_record_write_stores_its_resources_and_an_outbox_row_per_version(
    database: Database,
) -> None:
    records = clinic()
    for record in records.records():
        put(database, record)
    session_id = records.session["external_id"]
    administration = read(
        database, "MedicationAdministration", "session", session_id, "MedicationAdministration"
    )
    assert administration is not None
    assert administration["meta"]["versionId"] == "1"
    assert administration["meta"]["lastUpdated"]
    assert administration["subject"]["reference"] == "Patient/" + resource_id(
        "patient", records.patient["external_id"]
    )
    care_plan = read(database, "CarePlan", "course", records.course["external_id"], "CarePlan")
    assert care_plan is not None
    assert care_plan["meta"]["versionId"] == "2", "the session's write re-mapped its CarePlan"
    outcome_references = [
        ref["reference"]
        for activity in care_plan.get("activity", [])
        for ref in activity.get("outcomeReference", [])
    ]
    assert f"MedicationAdministration/{administration['id']}" in outcome_references
    provenance = read(database, "Provenance", "provenance", "session", session_id, "1")
    assert provenance is not None
    targets = {t["reference"] for t in provenance["target"]}
    assert f"MedicationAdministration/{administration['id']}/_history/1" in targets
    versions, queued = counts(database)
    assert queued >= versions > 0


def test_resending_records_writes_no_new_versions(database: Database) -> None:
    records = clinic()
    for record in records.records():
        put(database, record)
    before = counts(database)
    for record in records.records():
        put(database, record)
    assert counts(database) == before


def test_a_changed_record_versions_only_what_changed_and_deletes_what_it_no_longer_yields(
    database: Database,
) -> None:
    records = clinic()
    for record in records.records():
        put(database, record)
    session = records.session
    encounter_before = read(database, "Encounter", "session", session["external_id"], "Encounter")
    during = session["vitals"][1]
    bp_role = ("session", session["external_id"], "vitals", "2026-10-05T09:44:00-04:00", "bp")
    assert read(database, "Observation", *bp_role) is not None
    put(database, session | {"vitals": session["vitals"][:1], "total_dose_mg": 33.0})
    assert read(database, "Observation", *bp_role) is None, "the removed vitals were deleted"
    assert read(database, "Encounter", "session", session["external_id"], "Encounter") == (
        encounter_before
    )
    administration = read(
        database,
        "MedicationAdministration",
        "session",
        session["external_id"],
        "MedicationAdministration",
    )
    assert administration is not None
    assert administration["meta"]["versionId"] == "2"
    assert administration["dosage"]["dose"]["value"] == 33.0
    with database.unit_of_work(write=False) as uow:
        history = ResourceRepository(uow.connection).history("Observation", resource_id(*bp_role))
    assert [(version, deleted) for version, deleted, _ in history] == [(1, False), (2, True)]
    provenance = read(database, "Provenance", "provenance", "session", session["external_id"], "2")
    assert provenance is not None
    targets = {t["reference"] for t in provenance["target"]}
    assert f"Observation/{resource_id(*bp_role)}/_history/2" in targets
    assert during["systolic"] == 141


def test_the_demo_clinic_materializes_valid_r4(database: Database) -> None:
    clinic_records = generate_clinic(seed=3, patients=4, as_of=date(2026, 11, 23))
    results = [
        result
        for batch in import_ndjson(
            database=database,
            materializer=MATERIALIZER,
            lines=list(to_ndjson(clinic_records)),
            actor="test",
            batch_size=40,
        )
        for result in batch
    ]
    assert {r.status for r in results} <= {LineStatus.created, LineStatus.updated}
    with database.unit_of_work(write=False) as uow:
        bodies = uow.connection.execute(
            select(resource_versions.c.body).where(resource_versions.c.body.is_not(None))
        ).scalars()
        errors = [error for body in bodies for error in r4_errors(orjson.loads(body))]
    assert errors == []


def test_a_resource_that_would_not_validate_rejects_the_record(database: Database) -> None:
    def refuse_careplans(resource: dict[str, Any]) -> list[str]:
        return ["CarePlan.status: refused"] if resource["resourceType"] == "CarePlan" else []

    strict = type(MATERIALIZER)(context=MATERIALIZER.context, validate=refuse_careplans)
    records = clinic()
    for record in records.records()[:4]:
        put(database, record)
    with database.unit_of_work() as uow, pytest.raises(InvalidRecord) as caught:
        put_record(uow=uow, record=parse_record(records.course), materializer=strict, actor="test")
    assert caught.value.problems[0].type == "fhir_invalid"
    assert (
        read(
            database,
            "MedicationRequest",
            "course",
            records.course["external_id"],
            "MedicationRequest",
        )
        is None
    )


def test_an_import_line_whose_resources_would_not_validate_is_rejected_alone(
    database: Database,
) -> None:
    def refuse_careplans(resource: dict[str, Any]) -> list[str]:
        return ["CarePlan.status: refused"] if resource["resourceType"] == "CarePlan" else []

    strict = type(MATERIALIZER)(context=MATERIALIZER.context, validate=refuse_careplans)
    records = clinic()
    lines = [orjson.dumps(record) for record in records.records()]
    results = {
        result.line: result
        for batch in import_ndjson(
            database=database, materializer=strict, lines=lines, actor="test"
        )
        for result in batch
    }
    statuses = {n: r.status for n, r in results.items()}
    assert statuses == {
        1: LineStatus.created,
        2: LineStatus.created,
        3: LineStatus.created,
        4: LineStatus.created,
        5: LineStatus.rejected,
        6: LineStatus.rejected,
        7: LineStatus.created,
    }
    assert results[5].problems[0].type == "fhir_invalid"
    assert "line 5 was rejected" in results[6].problems[0].message
    assert read(database, "Patient", "patient", records.patient["external_id"]) is not None
    assert (
        read(
            database,
            "MedicationRequest",
            "course",
            records.course["external_id"],
            "MedicationRequest",
        )
        is None
    )


def test_a_session_moved_to_another_course_leaves_the_first_plan(database: Database) -> None:
    records = clinic()
    for record in records.records():
        put(database, record)
    second_course = records.course | {"external_id": records.course["external_id"] + "-2"}
    put(database, second_course)
    administration = "MedicationAdministration/" + resource_id(
        "session", records.session["external_id"], "MedicationAdministration"
    )

    def outcomes(course_id: str) -> list[str]:
        plan = read(database, "CarePlan", "course", course_id, "CarePlan")
        assert plan is not None
        return [
            ref["reference"]
            for activity in plan.get("activity", [])
            for ref in activity.get("outcomeReference", [])
        ]

    assert administration in outcomes(records.course["external_id"])
    put(database, records.session | {"course": second_course["external_id"]})
    assert administration not in outcomes(records.course["external_id"])
    assert administration in outcomes(second_course["external_id"])
