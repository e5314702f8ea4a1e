"""A treatment course's aim as a FHIR Goal: response and remission on the PHQ-9.

Response is a PHQ-9 at least 50% below the patient's baseline; remission is a PHQ-9 below 5. Only
remission has a fixed target value (the baseline is a score, not part of the course), so the
target carries remission and the description states both.

Pure: no database, HTTP, settings or clock. It must not judge whether the goal was achieved:
that takes the scores, which are Observations of their own.
"""

from __future__ import annotations

from typing import Any

from mappings.context import (
    UCUM,
    MappingContext,
    Profiles,
    Resource,
    concept,
    meta,
    reference,
    resource_id,
)
from service.records.models import CourseStatus, Instrument, TreatmentCourse

REMISSION_BELOW = 5
"""Remission: a PHQ-9 total below this."""

DESCRIPTION = "Response (PHQ-9 at least 50% below baseline) and remission (PHQ-9 below 5)"

LIFECYCLE: dict[CourseStatus, str] = {
    # Agreed with the patient and booked, not yet pursued: `planned`, not merely `proposed`.
    CourseStatus.planned: "planned",
    CourseStatus.active: "active",
    CourseStatus.on_hold: "on-hold",
    # goal-status `completed` means "no longer being sought", whether or not it was reached.
    CourseStatus.completed: "completed",
    CourseStatus.stopped: "cancelled",
}
"""Course status -> goal-status (Goal.lifecycleStatus)."""


def goal(course: TreatmentCourse, *, context: MappingContext) -> Resource:
    """A TreatmentCourse as the response-and-remission Goal its CarePlan pursues."""
    measure = context.terminology.mapped("instrument-total", Instrument.phq9.value)
    target: dict[str, Any] = {
        "measure": concept(*measure, text="PHQ-9 total score"),
        "detailQuantity": {
            "value": REMISSION_BELOW,
            "comparator": "<",
            "unit": "{score}",
            "system": UCUM,
            "code": "{score}",
        },
    }
    return {
        "resourceType": "Goal",
        "id": resource_id("course", course.external_id, "Goal"),
        "meta": meta(Profiles.GOAL),
        "identifier": [context.identifier("course", course.external_id, "Goal")],
        "lifecycleStatus": LIFECYCLE[course.status],
        "description": {"text": DESCRIPTION},
        "subject": reference("Patient", "patient", course.patient),
        "startDate": course.start_date.isoformat(),
        "target": [target],
        "expressedBy": reference("Practitioner", "clinician", course.prescriber),
        "addresses": [reference("Condition", "diagnosis", course.diagnosis)],
    }
