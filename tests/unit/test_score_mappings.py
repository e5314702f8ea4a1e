"""Scores (in-session and standalone) -> survey Observations and QuestionnaireResponses."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from mappings.context import CANONICAL, LOINC, MappingContext, resource_id
from mappings.scores import BANDS, assessment_scores, band, session_scores
from service.records.models import (
    INSTRUMENT_ITEMS,
    Assessment,
    InfusionSession,
    Instrument,
    TreatmentCourse,
)
from service.records.service import parse_record
from tests.factory import clinic
from tests.fhir_check import assert_conformant
from tests.golden import assert_golden
from tests.unit.test_course_mappings import demo_records

CONTEXT = MappingContext()
SCORE_BAND = "http://infusion-bridge.org/fhir/CodeSystem/score-band"
RATING_SCALE = "http://infusion-bridge.org/fhir/CodeSystem/rating-scale"


def course() -> TreatmentCourse:
    record = parse_record(
        clinic().course
        | {"external_id": "TC-55", "patient": "P-1001", "diagnosis": "D-1", "prescriber": "C-7"}
    )
    assert isinstance(record, TreatmentCourse)
    return record


def session() -> InfusionSession:
    """The intake example's session, scored before and after the infusion (ended 09:46)."""
    body = clinic().session | {
        "external_id": "S-901",
        "course": "TC-55",
        "administered_by": "C-9",
        "supervised_by": "C-7",
    }
    body["assessments"] += [
        {
            "instrument": "cadss",
            "timing": "post_infusion",
            "administered_at": "2026-10-05T09:55:00-04:00",
            "items": [1, 2, 1, 0, 0, 1, 0, 2, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0],
            "total": 12,
        },
        {
            "instrument": "madrs",
            "timing": "post_infusion",
            "administered_at": "2026-10-05T10:05:00-04:00",
            "total": 22,
        },
    ]
    record = parse_record(body)
    assert isinstance(record, InfusionSession)
    return record


def assessment(**changes: Any) -> Assessment:
    body = clinic().assessment | {"external_id": "A-77", "patient": "P-1001", "course": "TC-55"}
    record = parse_record(body | changes)
    assert isinstance(record, Assessment)
    return record


def by_type(resources: list[dict[str, Any]], resource_type: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["resourceType"] == resource_type]


def test_session_scores_golden(r4_examples: Path) -> None:
    resources = session_scores(session(), course=course(), context=CONTEXT)
    for resource in resources:
        assert_conformant(resource, r4_examples)
    assert_golden("score-session", resources)
    observations = by_type(resources, "Observation")
    assert [o["valueInteger"] for o in observations] == [14, 12, 22]
    # Items for the PHQ-9 and CADSS, only a total for the MADRS: no response to invent.
    assert len(by_type(resources, "QuestionnaireResponse")) == 2
    assert "derivedFrom" not in observations[2]
    encounter = f"Encounter/{resource_id('session', 'S-901', 'Encounter')}"
    assert all(r["encounter"]["reference"] == encounter for r in resources)
    plan = f"CarePlan/{resource_id('course', 'TC-55', 'CarePlan')}"
    assert all(r["basedOn"] == [{"reference": plan}] for r in resources)


def test_standalone_assessment_golden(r4_examples: Path) -> None:
    resources = assessment_scores(assessment(), context=CONTEXT)
    for resource in resources:
        assert_conformant(resource, r4_examples)
    assert_golden("score-assessment", resources)
    response, observation = resources  # the response first: the Observation refers to it
    assert observation["id"] == resource_id("assessment", "A-77", "Observation")
    assert response["id"] == resource_id("assessment", "A-77", "QuestionnaireResponse")
    assert observation["derivedFrom"] == [{"reference": f"QuestionnaireResponse/{response['id']}"}]
    assert "encounter" not in observation
    assert observation["interpretation"][0]["coding"][0]["code"] == "mild"


def test_a_total_without_items_and_without_a_course(r4_examples: Path) -> None:
    record = assessment(course=None, instrument="gad7", timing="baseline", items=None, total=15)
    resources = assessment_scores(record, context=CONTEXT)
    assert len(resources) == 1
    observation = resources[0]
    assert_conformant(observation, r4_examples)
    assert "basedOn" not in observation
    assert "derivedFrom" not in observation
    assert observation["identifier"] == [CONTEXT.identifier("assessment", "A-77", "Observation")]
    assert observation["note"][0]["text"].startswith("Baseline")


def test_the_response_carries_every_item_in_order() -> None:
    resources = session_scores(session(), course=course(), context=CONTEXT)
    responses = by_type(resources, "QuestionnaireResponse")
    phq9, cadss = responses
    assert phq9["id"] == resource_id(
        "session", "S-901", "score", "phq9", "pre_infusion", "QuestionnaireResponse"
    )
    assert phq9["identifier"] == CONTEXT.identifier(
        "session", "S-901", "score", "phq9", "pre_infusion", "QuestionnaireResponse"
    )
    assert phq9["questionnaire"] == f"{CANONICAL}/Questionnaire/phq9"
    assert [item["linkId"] for item in phq9["item"]] == [str(n) for n in range(1, 10)]
    assert [item["answer"][0]["valueInteger"] for item in phq9["item"]] == [
        2, 2, 1, 3, 2, 1, 2, 1, 0
    ]  # fmt: skip
    assert len(cadss["item"]) == INSTRUMENT_ITEMS[Instrument.cadss][0]
    assert phq9["authored"] == "2026-10-05T08:50:00-04:00"


@pytest.mark.parametrize(
    ("instrument", "total", "expected"),
    [
        ("phq9", 0, "minimal"),
        ("phq9", 4, "minimal"),
        ("phq9", 5, "mild"),
        ("phq9", 9, "mild"),
        ("phq9", 10, "moderate"),
        ("phq9", 14, "moderate"),
        ("phq9", 15, "moderately-severe"),
        ("phq9", 19, "moderately-severe"),
        ("phq9", 20, "severe"),
        ("phq9", 27, "severe"),
        ("gad7", 4, "minimal"),
        ("gad7", 5, "mild"),
        ("gad7", 9, "mild"),
        ("gad7", 10, "moderate"),
        ("gad7", 14, "moderate"),
        ("gad7", 15, "severe"),
        ("gad7", 21, "severe"),
        ("pcl5", 0, "below-threshold"),
        ("pcl5", 32, "below-threshold"),
        ("pcl5", 33, "probable-ptsd"),
        ("pcl5", 80, "probable-ptsd"),
        ("madrs", 6, "normal"),
        ("madrs", 7, "mild"),
        ("madrs", 19, "mild"),
        ("madrs", 20, "moderate"),
        ("madrs", 34, "moderate"),
        ("madrs", 35, "severe"),
        ("madrs", 60, "severe"),
        ("cadss", 0, None),
        ("cadss", 92, None),
    ],
)
def test_bands_at_their_edges(instrument: str, total: int, expected: str | None) -> None:
    record = assessment(instrument=instrument, items=None, total=total)
    observation = assessment_scores(record, context=CONTEXT)[0]
    if expected is None:
        assert "interpretation" not in observation
        return
    (interpretation,) = observation["interpretation"]
    assert interpretation["coding"] == [CONTEXT.terminology.own("score-band", expected)]
    assert interpretation["coding"][0]["system"] == SCORE_BAND
    found = band(Instrument(instrument), total)
    assert found is not None
    assert interpretation["text"].endswith(f"{found[0]}-{found[1]})")


@pytest.mark.parametrize("instrument", list(Instrument))
def test_bands_cover_each_scale_without_gaps(instrument: Instrument) -> None:
    bands = BANDS[instrument]
    if not bands:
        return
    count, highest = INSTRUMENT_ITEMS[instrument]
    assert bands[0][0] == 0
    assert bands[-1][1] == count * highest
    for (_, high, _), (low, _, _) in itertools.pairwise(bands):
        assert low == high + 1
    for _, _, code in bands:
        CONTEXT.terminology.own("score-band", code)


@pytest.mark.parametrize(
    ("instrument", "system", "code"),
    [
        ("phq9", LOINC, "44261-6"),
        ("gad7", LOINC, "70274-6"),
        ("pcl5", LOINC, "101698-9"),
        ("madrs", RATING_SCALE, "madrs-total"),
        ("cadss", RATING_SCALE, "cadss-total"),
    ],
)
def test_score_codes(instrument: str, system: str, code: str) -> None:
    record = assessment(instrument=instrument, items=None, total=0)
    observation = assessment_scores(record, context=CONTEXT)[0]
    assert [(c["system"], c["code"]) for c in observation["code"]["coding"]] == [(system, code)]
    assert observation["category"][0]["coding"][0]["code"] == "survey"


def test_a_session_of_another_course_is_refused() -> None:
    other = course().model_copy(update={"external_id": "TC-99"})
    with pytest.raises(ValueError, match="TC-99"):
        session_scores(session(), course=other, context=CONTEXT)


def test_every_demo_score_is_conformant(r4_examples: Path) -> None:
    records = demo_records()
    courses = {r.external_id: r for r in records if isinstance(r, TreatmentCourse)}
    ids: set[str] = set()
    count = 0
    for record in records:
        if isinstance(record, InfusionSession):
            resources = session_scores(record, course=courses[record.course], context=CONTEXT)
        elif isinstance(record, Assessment):
            resources = assessment_scores(record, context=CONTEXT)
        else:
            continue
        for resource in resources:
            assert_conformant(resource, r4_examples)
            ids.add(resource["id"])
            count += 1
    assert count > 500
    assert len(ids) == count
