"""A treatment course's standing order: the ketamine MedicationRequest its infusions fulfil.

The order states what is prescribed for every infusion of the course (ketamine, mg/kg, IV, over
how many minutes) and, in its text, the schedule; the schedule itself, week by week, is the
CarePlan's (`mappings.care_plan`). Each session's MedicationAdministration names this order as its
request.

Pure: no database, HTTP, settings or clock. It must not read sessions: the order is what was
prescribed, not what was given.
"""

from __future__ import annotations

from typing import Any

from mappings.context import (
    MappingContext,
    Profiles,
    Resource,
    coding,
    concept,
    meta,
    quantity,
    reference,
    resource_id,
)
from service.records.models import CourseStatus, Protocol, TreatmentCourse

INFUSION_METHOD = "Intravenous infusion"
"""No SNOMED CT code for "infuse" was confirmed, so the method travels as text."""

CATEGORY = "http://terminology.hl7.org/CodeSystem/medicationrequest-category"
COURSE_OF_THERAPY = "http://terminology.hl7.org/CodeSystem/medicationrequest-course-of-therapy"

STATUS: dict[CourseStatus, str] = {
    # A planned course is prescribed and booked: the order is in force, only its first infusion
    # lies ahead. `draft` would tell an EHR it still awaits sign-off, which it does not.
    CourseStatus.planned: "active",
    CourseStatus.active: "active",
    CourseStatus.on_hold: "on-hold",
    CourseStatus.completed: "completed",
    CourseStatus.stopped: "stopped",
}
"""Course status -> medicationrequest-status."""


def ketamine(context: MappingContext) -> dict[str, Any]:
    """Ketamine, the ingredient, as what is ordered: whatever concentration is drawn up."""
    return concept(*context.terminology.mapped("medication", "ketamine"), text="Ketamine")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def induction_summary(protocol: Protocol) -> str:
    """The induction series in words: "3, 2 and 3 infusions in weeks 1 to 3 (8 in all)"."""
    weekly = protocol.induction_weekly_sessions
    if len(weekly) == 1:
        return f"{_count(weekly[0], 'infusion')} in one week"
    if len(set(weekly)) == 1:
        return (
            f"{weekly[0]} infusions a week for {len(weekly)} weeks "
            f"({protocol.induction_sessions} in all)"
        )
    counts = ", ".join(str(count) for count in weekly[:-1])
    return (
        f"{counts} and {weekly[-1]} infusions in weeks 1 to {len(weekly)} "
        f"({protocol.induction_sessions} in all)"
    )


def maintenance_summary(protocol: Protocol) -> str:
    """The maintenance phase in words: "one infusion every 4 weeks"."""
    interval = protocol.maintenance_interval_weeks
    if interval is None:
        return "no maintenance phase"
    return "one infusion every week" if interval == 1 else f"one infusion every {interval} weeks"


def dose_summary(protocol: Protocol) -> str:
    """One infusion in words: "ketamine 0.5 mg/kg IV over 40 minutes"."""
    return f"ketamine {protocol.dose_mg_per_kg:g} mg/kg IV over {protocol.infusion_minutes} minutes"


def protocol_summary(protocol: Protocol) -> str:
    """The whole protocol in one sentence, for the order's and the plan's text."""
    then = (
        "; no maintenance phase"
        if protocol.maintenance_interval_weeks is None
        else f", then maintenance with {maintenance_summary(protocol)}"
    )
    dose = dose_summary(protocol)
    return f"{dose[0].upper()}{dose[1:]}: induction with {induction_summary(protocol)}{then}."


def _course_of_therapy(protocol: Protocol) -> dict[str, str]:
    # Maintenance goes on with no end date set; an induction-only protocol is a defined series.
    if protocol.maintenance_interval_weeks is None:
        return coding(COURSE_OF_THERAPY, "acute", "Short course (acute) therapy")
    return coding(COURSE_OF_THERAPY, "continuous", "Continuous long term therapy")


def medication_request(course: TreatmentCourse, *, context: MappingContext) -> Resource:
    """A TreatmentCourse as the standing ketamine order its infusions are given under."""
    protocol = course.protocol
    bounds = {"start": course.start_date.isoformat()}
    if course.end_date is not None:
        bounds["end"] = course.end_date.isoformat()
    dosage: dict[str, Any] = {
        "text": protocol_summary(protocol),
        "timing": {
            "repeat": {
                "boundsPeriod": bounds,
                "duration": protocol.infusion_minutes,
                "durationUnit": "min",
            }
        },
        "route": concept(*context.terminology.mapped("route", "iv"), text="Intravenous"),
        "method": {"text": INFUSION_METHOD},
        # Weight-based: the mg given at each infusion is on its MedicationAdministration.
        "doseAndRate": [{"doseQuantity": quantity(protocol.dose_mg_per_kg, "mg/kg")}],
    }
    return {
        "resourceType": "MedicationRequest",
        "id": resource_id("course", course.external_id, "MedicationRequest"),
        "meta": meta(Profiles.MEDICATION_REQUEST),
        "identifier": [context.identifier("course", course.external_id, "MedicationRequest")],
        "status": STATUS[course.status],
        "intent": "order",
        "category": [{"coding": [coding(CATEGORY, "outpatient", "Outpatient")]}],
        "medicationCodeableConcept": ketamine(context),
        "subject": reference("Patient", "patient", course.patient),
        # No authoredOn: the course record does not say when the order was written, and its
        # start date (in the future for a planned course) is not that; the dosage's bounds
        # carry the course's dates instead.
        "requester": reference("Practitioner", "clinician", course.prescriber),
        "reasonReference": [reference("Condition", "diagnosis", course.diagnosis)],
        # The order fulfils the course's plan; R4 links them this way round (a CarePlan
        # activity.detail.product can only name a Medication or Substance).
        "basedOn": [reference("CarePlan", "course", course.external_id, "CarePlan")],
        "courseOfTherapyType": {"coding": [_course_of_therapy(protocol)]},
        "dosageInstruction": [dosage],
    }
