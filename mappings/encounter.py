"""Infusion sessions as ambulatory FHIR Encounters: the visit every session resource belongs to.

Pure: no database, HTTP, settings or clock; everything comes from the session, its course and the
`MappingContext`. An Encounter is emitted for every session status, including sessions that never
started, so an EHR sees the planned, cancelled and missed visits too. It must not carry what belongs
to the other session resources: the dose is on the MedicationAdministration, the readings on the
vital-sign Observations.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mappings.context import (
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
from service.records.models import InfusionSession, SessionStatus, TreatmentCourse

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
REASON_CANCELLED = "http://hl7.org/fhir/StructureDefinition/encounter-reasonCancelled"
"""Core R4 extension on Encounter: why a planned encounter was cancelled."""

STATUS: dict[SessionStatus, str] = {
    SessionStatus.scheduled: "planned",
    SessionStatus.in_progress: "in-progress",
    SessionStatus.completed: "finished",
    SessionStatus.stopped_early: "finished",
    SessionStatus.cancelled: "cancelled",
    # R4 encounter-status has no no-show (Appointment has); the reason says it was missed.
    SessionStatus.no_show: "cancelled",
}

# The nurse who runs the infusion is its primary performer; the supervising clinician is
# responsible for the patient during the visit, which is what v3 "attender" means. Both codes are
# in R4's encounter-participant-type value set (SPRF would understate the nurse's part).
_ADMINISTERED_BY = coding(PARTICIPATION_TYPE, "PPRF", "primary performer")
_SUPERVISED_BY = coding(PARTICIPATION_TYPE, "ATND", "attender")

_FINISHED = (SessionStatus.completed, SessionStatus.stopped_early)


def encounter_reference(session: InfusionSession) -> dict[str, str]:
    """The reference every other resource of the session uses for its Encounter."""
    return reference("Encounter", "session", session.external_id, "Encounter")


def encounter(
    session: InfusionSession, *, course: TreatmentCourse, context: MappingContext
) -> Resource:
    """An InfusionSession as the ambulatory Encounter of the clinic visit."""
    resource: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": resource_id("session", session.external_id, "Encounter"),
        "meta": meta(Profiles.ENCOUNTER),
    }
    reason = cancellation_reason(session)
    if reason is not None:
        resource["extension"] = [{"url": REASON_CANCELLED, "valueCodeableConcept": reason}]
    resource |= {
        "identifier": [context.identifier("session", session.external_id, "Encounter")],
        "status": STATUS[session.status],
        "class": coding(ACT_CODE, "AMB", "ambulatory"),
        "type": [concept(text="Ketamine infusion")],
        "subject": reference("Patient", "patient", course.patient),
    }
    participants = _participants(session)
    if participants:
        resource["participant"] = participants
    resource |= {
        "period": _period(session),
        "reasonReference": [reference("Condition", "diagnosis", course.diagnosis)],
        "serviceProvider": context.organization_reference,
    }
    return resource


def cancellation_reason(session: InfusionSession) -> dict[str, Any] | None:
    """Why a session did not take place, as text that keeps cancelled apart from missed.

    Both map to the same FHIR statuses (Encounter cancelled, MedicationAdministration not-done),
    so the text leads with which of the two it was; the clinic's own reason follows.
    """
    if session.status is SessionStatus.cancelled:
        label = "Cancelled"
    elif session.status is SessionStatus.no_show:
        label = "Did not attend"
    else:
        return None
    text = f"{label}: {session.status_reason}" if session.status_reason else label
    return concept(text=text)


def _participants(session: InfusionSession) -> list[dict[str, Any]]:
    staff = (
        (session.administered_by, _ADMINISTERED_BY),
        (session.supervised_by, _SUPERVISED_BY),
    )
    return [
        {"type": [concept(role)], "individual": reference("Practitioner", "clinician", who)}
        for who, role in staff
        if who is not None
    ]


def _activity_times(session: InfusionSession) -> list[datetime]:
    """When something of the session was recorded: the visit spans more than the infusion."""
    times = [v.taken_at for v in session.vitals]
    times += [a.administered_at for a in session.assessments]
    times += [e.onset_at for e in session.adverse_events]
    return times


def _period(session: InfusionSession) -> dict[str, str]:
    """The visit: from the earliest recorded activity to the latest, once it is over.

    Pre-infusion vitals and scores come before `started_at` and recovery vitals after
    `ended_at`; a period of the infusion alone would leave them outside their own Encounter.
    A session that has not started (or never will) starts at its scheduled time, or at its
    first pre-infusion reading if that came earlier, and has no end.
    """
    activity = _activity_times(session)
    first = session.started_at or session.scheduled_start
    start = min([first, *activity])
    period = {"start": instant(start)}
    if session.status in _FINISHED and session.ended_at is not None:
        period["end"] = instant(max([session.ended_at, *activity]))
    return period
