"""Rating-scale scores as FHIR: a survey Observation per total, a QuestionnaireResponse per form.

Each score is an Observation in the `survey` category whose value is the total (LOINC where the
scale has a code, the service's rating-scale CodeSystem otherwise), interpreted in the scale's
severity band; when the item answers were recorded they are a QuestionnaireResponse the
Observation is derived from (US Core's screening-assessment pattern). Scores taken during an
infusion visit belong to its Encounter; every score of a course is based on the course's CarePlan.

Pure: no database, HTTP, settings or clock. It must not compare scores with one another (response
and remission are judged against the Goal by whoever reads the series), and it must not invent
item answers when only a total was recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mappings.context import (
    CANONICAL,
    MappingContext,
    Profiles,
    Resource,
    coding,
    concept,
    instant,
    meta,
    reference,
    resource_id,
)
from service.records.models import (
    Assessment,
    AssessmentTiming,
    InfusionSession,
    Instrument,
    TreatmentCourse,
)

OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

Band = tuple[int, int, str]
"""Lowest and highest total of a band, and its code in the score-band CodeSystem."""

BANDS: dict[Instrument, tuple[Band, ...]] = {
    Instrument.phq9: (
        (0, 4, "minimal"),
        (5, 9, "mild"),
        (10, 14, "moderate"),
        (15, 19, "moderately-severe"),
        (20, 27, "severe"),
    ),
    Instrument.gad7: ((0, 4, "minimal"), (5, 9, "mild"), (10, 14, "moderate"), (15, 21, "severe")),
    # 33 is the PCL-5 cut-off for a provisional PTSD diagnosis.
    Instrument.pcl5: ((0, 32, "below-threshold"), (33, 80, "probable-ptsd")),
    Instrument.madrs: ((0, 6, "normal"), (7, 19, "mild"), (20, 34, "moderate"), (35, 60, "severe")),
    # CADSS measures dissociation during an infusion; it has no accepted severity bands.
    Instrument.cadss: (),
}
"""Severity bands of each scale's total, covering 0 to the scale's maximum without gaps."""

TIMING_NOTE: dict[AssessmentTiming, str] = {
    AssessmentTiming.baseline: "Baseline: scored before the course's first infusion.",
    AssessmentTiming.pre_infusion: "Pre-infusion: scored at the visit, before the infusion.",
    AssessmentTiming.post_infusion: "Post-infusion: scored at the visit, after the infusion.",
    AssessmentTiming.follow_up: "Follow-up: scored outside an infusion visit.",
}
"""When in the course a score was taken. R4 has no element or standard code for it, so it is
stated in a note; the encounter and the time against the infusion's period show it as well."""


def band(instrument: Instrument, total: int) -> Band | None:
    """The severity band a total falls in (None for a scale without bands)."""
    for low, high, code in BANDS[instrument]:
        if low <= total <= high:
            return low, high, code
    if BANDS[instrument]:
        raise ValueError(f"{total} is outside the {instrument.value} bands")
    return None


def _interpretation(
    instrument: Instrument, total: int, *, context: MappingContext
) -> list[dict[str, Any]]:
    found = band(instrument, total)
    if found is None:
        return []
    low, high, code = found
    banded = context.terminology.own("score-band", code)
    name = context.terminology.own("instrument", instrument.value)["display"]
    return [concept(banded, text=f"{banded['display']} ({name} {low}-{high})")]


def _code(instrument: Instrument, *, context: MappingContext) -> dict[str, Any]:
    name = context.terminology.own("instrument", instrument.value)["display"]
    return concept(
        *context.terminology.mapped("instrument-total", instrument.value),
        text=f"{name} total score",
    )


@dataclass(frozen=True)
class _Score:
    """One total as the mapping needs it, whether scored at a visit or on its own."""

    kind: str
    external_id: str
    role: tuple[str, ...]
    """The score's part of the record, before the resource type (README's id roles)."""
    instrument: Instrument
    timing: AssessmentTiming
    administered_at: datetime
    items: Sequence[int] | None
    total: int
    patient: str
    course: str | None
    session: str | None

    def id(self, resource_type: str) -> str:
        return resource_id(self.kind, self.external_id, *self.role, resource_type)

    def identifier(self, resource_type: str, context: MappingContext) -> dict[str, str]:
        return context.identifier(self.kind, self.external_id, *self.role, resource_type)

    def links(self) -> dict[str, Any]:
        """basedOn, subject and encounter, which both resources share."""
        out: dict[str, Any] = {}
        if self.course is not None:
            out["basedOn"] = [reference("CarePlan", "course", self.course, "CarePlan")]
        out["subject"] = reference("Patient", "patient", self.patient)
        if self.session is not None:
            out["encounter"] = reference("Encounter", "session", self.session, "Encounter")
        return out


def _response(score: _Score, items: Sequence[int], context: MappingContext) -> Resource:
    links = score.links()
    resource: dict[str, Any] = {
        "resourceType": "QuestionnaireResponse",
        "id": score.id("QuestionnaireResponse"),
        "meta": meta(Profiles.QUESTIONNAIRE_RESPONSE),
        # QuestionnaireResponse.identifier is 0..1 in R4: one Identifier, not a list.
        "identifier": score.identifier("QuestionnaireResponse", context),
    }
    if "basedOn" in links:
        resource["basedOn"] = links["basedOn"]
    resource["questionnaire"] = f"{CANONICAL}/Questionnaire/{score.instrument.value}"
    resource["status"] = "completed"
    resource["subject"] = links["subject"]
    if "encounter" in links:
        resource["encounter"] = links["encounter"]
    resource["authored"] = instant(score.administered_at)
    # linkIds are the items' positions in the scale, as its published Questionnaire numbers
    # them; the record keeps the scale's own order.
    resource["item"] = [
        {"linkId": str(position), "answer": [{"valueInteger": answer}]}
        for position, answer in enumerate(items, start=1)
    ]
    return resource


def _observation(score: _Score, response: Resource | None, context: MappingContext) -> Resource:
    links = score.links()
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": score.id("Observation"),
        "meta": meta(Profiles.SCORE_OBSERVATION),
        "identifier": [score.identifier("Observation", context)],
    }
    if "basedOn" in links:
        resource["basedOn"] = links["basedOn"]
    resource["status"] = "final"
    resource["category"] = [{"coding": [coding(OBSERVATION_CATEGORY, "survey", "Survey")]}]
    resource["code"] = _code(score.instrument, context=context)
    resource["subject"] = links["subject"]
    if "encounter" in links:
        resource["encounter"] = links["encounter"]
    resource["effectiveDateTime"] = instant(score.administered_at)
    resource["valueInteger"] = score.total
    interpretation = _interpretation(score.instrument, score.total, context=context)
    if interpretation:
        resource["interpretation"] = interpretation
    resource["note"] = [{"text": TIMING_NOTE[score.timing]}]
    if response is not None:
        resource["derivedFrom"] = [{"reference": f"QuestionnaireResponse/{response['id']}"}]
    return resource


def _resources(score: _Score, context: MappingContext) -> list[Resource]:
    """The score's QuestionnaireResponse (when its items were recorded), then its Observation."""
    if score.items is None:
        return [_observation(score, None, context)]
    # The response first: the Observation refers to it.
    response = _response(score, score.items, context)
    return [response, _observation(score, response, context)]


def session_scores(
    session: InfusionSession, *, course: TreatmentCourse, context: MappingContext
) -> list[Resource]:
    """The scores taken at an infusion visit as Observations (and their QuestionnaireResponses)."""
    if session.course != course.external_id:
        raise ValueError(f"session {session.external_id} is not of course {course.external_id}")
    out: list[Resource] = []
    for assessment in session.assessments:
        score = _Score(
            kind="session",
            external_id=session.external_id,
            role=("score", assessment.instrument.value, assessment.timing.value),
            instrument=assessment.instrument,
            timing=assessment.timing,
            administered_at=assessment.administered_at,
            items=assessment.items,
            total=assessment.total,
            patient=course.patient,
            course=course.external_id,
            session=session.external_id,
        )
        out += _resources(score, context)
    return out


def assessment_scores(assessment: Assessment, *, context: MappingContext) -> list[Resource]:
    """A standalone Assessment (baseline, follow-up) as its Observation and response."""
    score = _Score(
        kind="assessment",
        external_id=assessment.external_id,
        role=(),
        instrument=assessment.instrument,
        timing=assessment.timing,
        administered_at=assessment.administered_at,
        items=assessment.items,
        total=assessment.total,
        patient=assessment.patient,
        course=assessment.course,
        session=None,
    )
    return _resources(score, context)
