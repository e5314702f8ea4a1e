"""Properties of the mappings over generated records: every valid record maps to valid FHIR."""

from __future__ import annotations

from datetime import date, timedelta
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mappings.bundle import map_records
from mappings.context import MappingContext
from service.bootstrap import resource_validator
from service.config import Settings
from service.fhir.validation import ResourceValidator
from service.records.demo import generate_clinic
from service.records.models import InfusionSession
from service.records.service import parse_record
from tests.fhir_check import r4_errors

CONTEXT = MappingContext()


@cache
def validator() -> ResourceValidator:
    return resource_validator(Settings())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=10_000),
    patients=st.integers(min_value=1, max_value=3),
    days=st.integers(min_value=-400, max_value=400),
)
def test_any_generated_clinic_maps_to_resources_that_validate(
    seed: int, patients: int, days: int
) -> None:
    as_of = date(2026, 6, 1) + timedelta(days=days)
    records = generate_clinic(seed=seed, patients=patients, as_of=as_of)
    resources = list(map_records(records, context=CONTEXT))
    ids = [(r["resourceType"], r["id"]) for r in resources]
    assert len(ids) == len(set(ids))
    for resource in resources:
        assert r4_errors(resource) == []
        assert validator().errors(resource) == [], resource["resourceType"]


@settings(max_examples=40, deadline=None)
@given(
    weight=st.floats(min_value=20, max_value=350, allow_nan=False),
    dose=st.floats(min_value=0.05, max_value=1.0, allow_nan=False),
    minutes=st.integers(min_value=25, max_value=180),  # at most 350 mg: under the 1000 mg/h cap
    site=st.sampled_from(
        ["left_forearm", "right_forearm", "left_hand", "right_hand", "left_antecubital"]
    ),
    concentration=st.sampled_from([10, 50, 100, 12.5]),
)
def test_any_valid_dose_maps_to_a_valid_administration(
    weight: float, dose: float, minutes: int, site: str, concentration: float
) -> None:
    records = generate_clinic(seed=1, patients=1, as_of=date(2026, 11, 23))
    course = next(r for r in records if r.kind == "course")
    session = next(r for r in records if isinstance(r, InfusionSession) and r.status == "completed")
    assert session.started_at is not None
    total = round(weight * dose, 1)
    changed = session.model_dump(mode="json", exclude_none=True) | {
        "weight_kg": weight,
        "dose_mg_per_kg": dose,
        "total_dose_mg": max(total, 0.1),
        "rate_mg_per_hour": round(max(total, 0.1) / minutes * 60, 3),
        "ended_at": (session.started_at + timedelta(minutes=minutes)).isoformat(),
        "site": site,
        "product": {"concentration_mg_per_ml": concentration},
        "vitals": [],
        "assessments": [],
        "adverse_events": [],
    }
    record = parse_record(changed)
    for resource in map_records([course, record], context=CONTEXT):
        assert r4_errors(resource) == []
        assert validator().errors(resource) == [], resource["resourceType"]
