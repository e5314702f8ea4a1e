"""A session's vital signs as Observations that follow the core R4 vital-signs profiles exactly.

Pure: no database, HTTP, settings or clock. Each measurement present in a Vitals entry becomes one
Observation claiming its specific core profile (bp, heartrate, resprate, oxygensat, bodytemp), plus
one body-weight Observation for the weight the dose was calculated from, when it was measured at
the visit. The LOINC codes, category
and UCUM units here are the ones those profiles fix, so they are code, not terminology data.

Must not: invent a value the record does not hold (no dataAbsentReason placeholders for
measurements that were simply not taken: those Observations are not emitted), or drop the phase
(pre, during, post) of a reading: it travels in `note`, which the profiles leave open (0..*).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mappings.context import (
    LOINC,
    MappingContext,
    Profiles,
    Resource,
    coding,
    concept,
    instant,
    meta,
    quantity,
    reference,
    resource_id,
)
from mappings.encounter import encounter_reference
from service.records.models import InfusionSession, TreatmentCourse, VitalPhase, Vitals

OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_VITAL_SIGNS = concept(coding(OBSERVATION_CATEGORY, "vital-signs", "Vital Signs"))

PHASE_NOTE: dict[VitalPhase, str] = {
    VitalPhase.pre: "Pre-infusion",
    VitalPhase.during: "During infusion",
    VitalPhase.post: "Post-infusion",
}
"""The note that keeps each reading's place in the session: R4 vital signs have no phase element."""


@dataclass(frozen=True)
class _Measure:
    """One single-valued vital sign: its id role, profile, code and UCUM unit."""

    role: str
    """The `measure` of the resource id (mappings/README.md)."""
    profile: str
    codings: tuple[dict[str, str], ...]
    text: str
    unit: str
    """The human-readable unit."""
    ucum: str
    """The UCUM code the profile fixes."""


# The first coding of each is the code its core profile fixes.
HEART_RATE = _Measure(
    "heart-rate",
    Profiles.HEART_RATE,
    (coding(LOINC, "8867-4", "Heart rate"),),
    "Heart rate",
    "beats/minute",
    "/min",
)
RESPIRATORY_RATE = _Measure(
    "resp-rate",
    Profiles.RESPIRATORY_RATE,
    (coding(LOINC, "9279-1", "Respiratory rate"),),
    "Respiratory rate",
    "breaths/minute",
    "/min",
)
OXYGEN_SATURATION = _Measure(
    "spo2",
    Profiles.OXYGEN_SATURATION,
    # The profile fixes 2708-6; 59408-5 says how it was measured (a pulse oximeter).
    (
        coding(LOINC, "2708-6", "Oxygen saturation in Arterial blood"),
        coding(LOINC, "59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),
    ),
    "Oxygen saturation",
    "%",
    "%",
)
BODY_TEMPERATURE = _Measure(
    "temperature",
    Profiles.BODY_TEMPERATURE,
    (coding(LOINC, "8310-5", "Body temperature"),),
    "Body temperature",
    "Cel",
    "Cel",
)
BODY_WEIGHT = _Measure(
    "weight",
    Profiles.BODY_WEIGHT,
    (coding(LOINC, "29463-7", "Body weight"),),
    "Body weight",
    "kg",
    "kg",
)
BLOOD_PRESSURE = coding(LOINC, "85354-9", "Blood pressure panel with all children optional")
SYSTOLIC = coding(LOINC, "8480-6", "Systolic blood pressure")
DIASTOLIC = coding(LOINC, "8462-4", "Diastolic blood pressure")


def body_weight_reference(session: InfusionSession) -> dict[str, str] | None:
    """The reference to the body-weight Observation the dose was calculated from, if emitted."""
    if session.weight_kg is None or weighed_at(session) is None:
        return None
    return reference("Observation", "session", session.external_id, "weight")


def weighed_at(session: InfusionSession) -> datetime | None:
    """When the session's weight counts as measured, or None when it was not measured at a visit.

    The record has no weighing time. Once the infusion started, the weight is the one its dose
    was calculated from: the start. A session that never started but has pre-infusion readings
    saw the patient in the chair: the first reading. Otherwise the weight is a planning figure
    (a scheduled or missed visit) and a final Observation dated at a visit that has not happened
    would be false, so there is none.
    """
    if session.started_at is not None:
        return session.started_at
    return min((v.taken_at for v in session.vitals), default=None)


def vital_signs(
    session: InfusionSession, *, course: TreatmentCourse, context: MappingContext
) -> list[Resource]:
    """An InfusionSession's weight and vital signs as core-profile vital-sign Observations."""
    out: list[Resource] = []
    taken = weighed_at(session)
    if session.weight_kg is not None and taken is not None:
        out.append(_body_weight(session, session.weight_kg, taken, course=course, context=context))
    for vitals in session.vitals:
        out += _readings(session, vitals, course=course, context=context)
    return out


def _body_weight(
    session: InfusionSession,
    weight_kg: float,
    taken: datetime,
    *,
    course: TreatmentCourse,
    context: MappingContext,
) -> Resource:
    """The session's weight as a body-weight Observation, dated by `weighed_at`."""
    return _observation(
        ("session", session.external_id, "weight"),
        BODY_WEIGHT.profile,
        concept(*BODY_WEIGHT.codings, text=BODY_WEIGHT.text),
        {"valueQuantity": quantity(weight_kg, BODY_WEIGHT.unit, BODY_WEIGHT.ucum)},
        taken=taken,
        note=None,
        session=session,
        course=course,
        context=context,
    )


def _readings(
    session: InfusionSession,
    vitals: Vitals,
    *,
    course: TreatmentCourse,
    context: MappingContext,
) -> list[Resource]:
    """One Vitals entry as one Observation per measurement it holds, in a fixed order."""
    found: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
    if vitals.systolic is not None and vitals.diastolic is not None:
        # The bp profile: the panel code, no value of its own, systolic and diastolic components.
        components = [
            {"code": concept(SYSTOLIC, text="Systolic"), "valueQuantity": _mmhg(vitals.systolic)},
            {
                "code": concept(DIASTOLIC, text="Diastolic"),
                "valueQuantity": _mmhg(vitals.diastolic),
            },
        ]
        panel = concept(BLOOD_PRESSURE, text="Blood pressure")
        found.append(("bp", Profiles.BLOOD_PRESSURE, panel, {"component": components}))
    single = (
        (HEART_RATE, vitals.heart_rate),
        (RESPIRATORY_RATE, vitals.resp_rate),
        (OXYGEN_SATURATION, vitals.spo2),
        (BODY_TEMPERATURE, vitals.temperature_c),
    )
    for measure, value in single:
        if value is not None:
            code = concept(*measure.codings, text=measure.text)
            result = {"valueQuantity": quantity(value, measure.unit, measure.ucum)}
            found.append((measure.role, measure.profile, code, result))
    return [
        _observation(
            ("session", session.external_id, "vitals", vitals.taken_at.isoformat(), role),
            profile,
            code,
            result,
            taken=vitals.taken_at,
            note=PHASE_NOTE[vitals.phase],
            session=session,
            course=course,
            context=context,
        )
        for role, profile, code, result in found
    ]


def _mmhg(value: int) -> dict[str, Any]:
    return quantity(value, "mmHg", "mm[Hg]")


def _observation(
    ids: tuple[str, ...],
    profile: str,
    code: dict[str, Any],
    result: dict[str, Any],
    *,
    taken: datetime,
    note: str | None,
    session: InfusionSession,
    course: TreatmentCourse,
    context: MappingContext,
) -> Resource:
    """A vital-sign Observation; `result` holds either `valueQuantity` or `component`."""
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": resource_id(*ids),
        "meta": meta(profile),
        "identifier": [context.identifier(*ids)],
        "status": "final",
        "category": [_VITAL_SIGNS],
        "code": code,
        "subject": reference("Patient", "patient", course.patient),
        "encounter": encounter_reference(session),
        # The record's own offset is kept: the clinic's local time is what a clinician reads.
        "effectiveDateTime": instant(taken),
    }
    # Element order of the specification: value[x], note, then component.
    if "valueQuantity" in result:
        observation["valueQuantity"] = result["valueQuantity"]
    if note is not None:
        observation["note"] = [{"text": note}]
    if "component" in result:
        observation["component"] = result["component"]
    return observation
