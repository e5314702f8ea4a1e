"""The record models' rules: each broken rule is rejected at the field path that broke it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from service.errors import InvalidRecord
from service.records.models import Protocol, TreatmentCourse, npi_is_valid
from service.records.service import canonical_json, check_dates, parse_record
from tests.factory import Record, clinic

Mutation = Callable[[Record], None]


def _set(path: str, value: Any) -> Mutation:
    """Set a dotted path (list indexes as numbers) to `value`; `...` deletes it."""

    def mutate(record: Record) -> None:
        *parents, last = path.split(".")
        target: Any = record
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        key: Any = int(last) if last.isdigit() else last
        if value is ...:
            del target[key]
        else:
            target[key] = value

    return mutate


def _many(*mutations: Mutation) -> Mutation:
    def mutate(record: Record) -> None:
        for mutation in mutations:
            mutation(record)

    return mutate


def _not_started(record: Record) -> None:
    for field in ("started_at", "ended_at", "total_dose_mg", "rate_mg_per_hour"):
        del record[field]
    record["status"] = "scheduled"
    record["vitals"] = record["vitals"][:1]
    record["adverse_events"] = []


# (record kind in the factory, mutation, expected path, expected error type)
REJECTED: list[tuple[str, Mutation, str, str]] = [
    ("patient", _set("nickname", "Ana"), "nickname", "extra_forbidden"),
    ("patient", _set("sex", "f"), "sex", "enum"),
    ("patient", _set("birth_date", "1850-01-01"), "birth_date", "date_too_early"),
    ("patient", _set("name.given", []), "name.given", "too_short"),
    ("patient", _set("external_id", "has space"), "external_id", "string_pattern_mismatch"),
    (
        "patient",
        _set("ehr_identifiers.0.system", "not a uri"),
        "ehr_identifiers[0].system",
        "string_pattern_mismatch",
    ),
    ("patient", _set("mrn", ...), "mrn", "missing"),
    ("clinician", _set("npi", "1234567890"), "npi", "npi_check_digit"),
    ("clinician", _set("npi", "12345"), "npi", "string_pattern_mismatch"),
    ("clinician", _set("role", "surgeon"), "role", "enum"),
    ("diagnosis", _set("icd10", "F43.10"), "icd10", "icd10_condition"),
    ("diagnosis", _set("icd10", "depression"), "icd10", "icd10_format"),
    ("diagnosis", _set("condition", "insomnia"), "condition", "enum"),
    ("course", _set("protocol.dose_mg_per_kg", 1.5), "protocol.dose_mg_per_kg", "less_than_equal"),
    (
        "course",
        _set("protocol.induction_weekly_sessions", [3, 9]),
        "protocol.induction_weekly_sessions[1]",
        "less_than_equal",
    ),
    (
        "course",
        _set("protocol.infusion_minutes", 2),
        "protocol.infusion_minutes",
        "greater_than_equal",
    ),
    ("course", _set("end_date", "2026-01-01"), "end_date", "end_before_start"),
    ("course", _set("status", "paused"), "status", "enum"),
    ("session", _set("dose_mg_per_kg", 0.01), "dose_mg_per_kg", "greater_than_equal"),
    ("session", _set("dose_mg_per_kg", 1.2), "dose_mg_per_kg", "less_than_equal"),
    ("session", _set("total_dose_mg", 50.0), "total_dose_mg", "dose_mismatch"),
    ("session", _set("ended_at", "2026-10-05T09:03:00-04:00"), "ended_at", "end_before_start"),
    ("session", _set("ended_at", "2026-10-05T09:06:00-04:00"), "ended_at", "duration"),
    ("session", _set("ended_at", "2026-10-05T13:00:00-04:00"), "ended_at", "duration"),
    ("session", _set("started_at", "2026-10-05T09:04:00"), "started_at", "timezone_aware"),
    ("session", _set("started_at", ...), "started_at", "missing"),
    ("session", _set("weight_kg", ...), "weight_kg", "missing"),
    ("session", _set("route", "im"), "route", "literal_error"),
    ("session", _set("site", "neck"), "site", "enum"),
    ("session", _set("status", "stopped_early"), "status_reason", "missing"),
    ("session", _set("product.expires", "2026-09-30"), "product.expires", "product_expired"),
    ("session", _set("vitals.0.systolic", 300), "vitals[0].systolic", "less_than_equal"),
    ("session", _set("vitals.0.spo2", 101), "vitals[0].spo2", "less_than_equal"),
    ("session", _set("vitals.0.heart_rate", 5), "vitals[0].heart_rate", "greater_than_equal"),
    ("session", _set("vitals.0.diastolic", 130), "vitals[0].diastolic", "blood_pressure_order"),
    ("session", _set("vitals.0.diastolic", ...), "vitals[0].diastolic", "blood_pressure_pair"),
    ("session", _set("vitals.0.phase", "post"), "vitals[0].taken_at", "phase_time"),
    (
        "session",
        _set("vitals.1.taken_at", "2026-10-05T09:50:00-04:00"),
        "vitals[1].taken_at",
        "phase_time",
    ),
    (
        "session",
        _set("vitals.1", {"taken_at": "2026-10-05T09:30:00-04:00", "phase": "during"}),
        "vitals[1]",
        "no_measurement",
    ),
    (
        "session",
        _set("assessments.0.items", [2, 2, 1, 3, 2, 1, 2, 1]),
        "assessments[0].items",
        "item_count",
    ),
    (
        "session",
        _set("assessments.0.items", [2, 2, 1, 4, 2, 1, 2, 1, 0]),
        "assessments[0].items[3]",
        "item_range",
    ),
    ("session", _set("assessments.0.total", 15), "assessments[0].total", "total_mismatch"),
    (
        "session",
        _set("assessments.0.timing", "follow_up"),
        "assessments[0].timing",
        "literal_error",
    ),
    (
        "session",
        _set("assessments.0.administered_at", "2026-10-05T09:10:00-04:00"),
        "assessments[0].administered_at",
        "phase_time",
    ),
    (
        "session",
        _set("adverse_events.0.onset_at", "2026-10-05T08:00:00-04:00"),
        "adverse_events[0].onset_at",
        "phase_time",
    ),
    (
        "session",
        _set("adverse_events.0.resolved_at", "2026-10-05T09:00:00-04:00"),
        "adverse_events[0].resolved_at",
        "resolved_before_onset",
    ),
    ("session", _set("adverse_events.0.kind", "other"), "adverse_events[0].description", "missing"),
    ("session", _set("adverse_events.0.severity", "fatal"), "adverse_events[0].severity", "enum"),
    ("session", _many(_not_started, _set("total_dose_mg", 30.0)), "total_dose_mg", "not_given"),
    (
        "session",
        _many(_not_started, _set("vitals.0.phase", "during")),
        "vitals[0].phase",
        "not_given",
    ),
    ("session", _many(_set("status", "in_progress")), "ended_at", "not_ended"),
    (
        "session",
        _set("vitals.1.taken_at", "2026-10-05T13:02:00+00:00"),
        "vitals[1]",
        "duplicate",
    ),
    (
        "session",
        lambda record: record["adverse_events"].append(
            record["adverse_events"][0] | {"severity": "moderate"}
        ),
        "adverse_events[1]",
        "duplicate",
    ),
    ("assessment", _set("items", [1] * 7), "items", "item_count"),
    (
        "assessment",
        _many(_set("instrument", "gad7"), _set("items", [1, 1, 1, 1, 1, 1, 4]), _set("total", 10)),
        "items[6]",
        "item_range",
    ),
    (
        "assessment",
        _many(_set("instrument", "madrs"), _set("items", ...), _set("total", 61)),
        "total",
        "total_range",
    ),
    ("assessment", _set("timing", "mid_infusion"), "timing", "enum"),
]


@pytest.mark.parametrize(("kind", "mutate", "path", "error_type"), REJECTED)
def test_rule_is_enforced_at_its_field_path(
    kind: str, mutate: Mutation, path: str, error_type: str
) -> None:
    record = copy.deepcopy(getattr(clinic(), "prescriber" if kind == "clinician" else kind))
    mutate(record)
    with pytest.raises(InvalidRecord) as caught:
        parse_record(record)
    found = [(p.as_json()["path"], p.type) for p in caught.value.problems]
    assert (path, error_type) in found, found


@pytest.mark.parametrize(
    ("instrument", "count", "highest"),
    [("phq9", 9, 3), ("gad7", 7, 3), ("pcl5", 20, 4), ("madrs", 10, 6), ("cadss", 23, 4)],
)
def test_each_instrument_accepts_its_full_range(instrument: str, count: int, highest: int) -> None:
    record = clinic().assessment | {"instrument": instrument}
    for items in ([0] * count, [highest] * count):
        parsed = parse_record(record | {"items": items, "total": sum(items)})
        assert parsed.model_dump()["total"] == sum(items)
    with pytest.raises(InvalidRecord):
        parse_record(record | {"items": [highest + 1] * count, "total": (highest + 1) * count})


def test_the_contract_examples_are_valid() -> None:
    for record in clinic().records():
        assert parse_record(record).external_id == record["external_id"]


def test_a_session_not_given_needs_no_dose() -> None:
    record = copy.deepcopy(clinic().session)
    _not_started(record)
    for status in ("scheduled", "cancelled", "no_show"):
        assert parse_record(record | {"status": status}).model_dump()["status"] == status


def test_stopped_early_may_give_part_of_the_dose() -> None:
    record = clinic().session | {
        "status": "stopped_early",
        "status_reason": "blood pressure 182/104",
        "ended_at": "2026-10-05T09:30:00-04:00",
        "total_dose_mg": 20.0,
        "vitals": [],
        "adverse_events": [],
    }
    assert parse_record(record).model_dump()["total_dose_mg"] == 20.0
    with pytest.raises(InvalidRecord):
        parse_record(record | {"total_dose_mg": 60.0})


def test_the_default_protocol_is_three_two_three_then_every_four_weeks() -> None:
    course = clinic().course
    del course["protocol"]
    parsed = parse_record(course)
    assert isinstance(parsed, TreatmentCourse)
    assert parsed.protocol == Protocol(
        name="standard-iv",
        induction_weekly_sessions=[3, 2, 3],
        maintenance_interval_weeks=4,
        dose_mg_per_kg=0.5,
        infusion_minutes=40,
    )
    assert parsed.protocol.induction_sessions == 8


def test_a_protocol_without_maintenance_survives_storage() -> None:
    course = clinic().course
    course["protocol"] = {"induction_weekly_sessions": [3, 3], "maintenance_interval_weeks": None}
    stored = canonical_json(parse_record(course))
    reparsed = parse_record(__import__("orjson").loads(stored))
    assert isinstance(reparsed, TreatmentCourse)
    assert reparsed.protocol.maintenance_interval_weeks is None


def test_kind_is_required_and_must_be_known() -> None:
    record = clinic().patient
    del record["kind"]
    with pytest.raises(InvalidRecord) as missing:
        parse_record(record)
    assert [p.as_json()["path"] for p in missing.value.problems] == ["kind"]
    with pytest.raises(InvalidRecord) as unknown:
        parse_record(record | {"kind": "invoice"})
    assert unknown.value.problems[0].type == "enum"


def test_url_kind_and_id_fill_in_and_must_agree() -> None:
    record = clinic().patient
    external_id = record.pop("external_id")
    del record["kind"]
    parsed = parse_record(record, kind="patient", external_id=external_id)
    assert parsed.external_id == external_id
    with pytest.raises(InvalidRecord) as mismatch:
        parse_record(record | {"external_id": "P-other"}, kind="patient", external_id=external_id)
    assert mismatch.value.problems[0].type == "mismatch"
    with pytest.raises(InvalidRecord):
        parse_record(record | {"kind": "clinician"}, kind="patient", external_id=external_id)


def test_all_problems_of_fields_are_reported_together() -> None:
    record = clinic().patient | {"sex": "x", "birth_date": "not a date", "extra": 1}
    with pytest.raises(InvalidRecord) as caught:
        parse_record(record)
    assert {p.as_json()["path"] for p in caught.value.problems} == {"sex", "birth_date", "extra"}


@pytest.mark.parametrize(
    ("npi", "valid"),
    [("1234567893", True), ("1234567890", False), ("1245319599", True), ("1245319598", False)],
)
def test_npi_check_digit(npi: str, valid: bool) -> None:
    assert npi_is_valid(npi) is valid


def test_dates_in_the_future_are_rejected_against_the_given_clock() -> None:
    records = clinic()
    now = datetime(2026, 11, 2, 12, tzinfo=UTC)
    assert check_dates(parse_record(records.assessment), now) == []
    late = datetime(2026, 10, 30, tzinfo=UTC)
    found = [
        (p.loc, p.type)
        for record in (
            records.patient | {"birth_date": "2026-11-01"},
            records.diagnosis,
            records.assessment,
        )
        for p in check_dates(parse_record(record), datetime(2026, 8, 30, tzinfo=UTC))
    ]
    assert found == [
        (("birth_date",), "date_in_future"),
        (("recorded_on",), "date_in_future"),
        (("administered_at",), "date_in_future"),
    ]
    assert check_dates(parse_record(records.patient), late) == []


def test_icd10_codes_are_stored_in_upper_case() -> None:
    diagnosis = parse_record(clinic().diagnosis | {"icd10": "f33.2"})
    assert diagnosis.model_dump()["icd10"] == "F33.2"
