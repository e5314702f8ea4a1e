"""Side effects seen during or after an infusion as FHIR R4 AdverseEvents, one per record entry.

Pure: no database, HTTP, settings or clock. The event is coded from terminology data (standard
codes where the site's ConceptMap has one, always the service's own code), the ketamine
administration is the suspect entity, and severity, seriousness and outcome use R4's own codes.

Must not: claim what the record does not say. There is no category (R4's adverse-event-category
codes are product and device problems, none of which a side effect is), no causality assessment
and no recorder. R4 AdverseEvent has no element for when an event resolved or what was done
about it, and no `note`: both go in the R5 `AdverseEvent.note` carried by HL7's cross-version
extension for R4, as text a clinician reads.
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
from mappings.encounter import encounter_reference
from mappings.medication_administration import administration_reference
from service.records.models import (
    AdverseEvent,
    AdverseEventAction,
    InfusionSession,
    SessionStatus,
    TreatmentCourse,
)

SERIOUSNESS = "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness"
SEVERITY = "http://terminology.hl7.org/CodeSystem/adverse-event-severity"
OUTCOME = "http://terminology.hl7.org/CodeSystem/adverse-event-outcome"
NOTE = "http://hl7.org/fhir/5.0/StructureDefinition/extension-AdverseEvent.note"
"""R5 AdverseEvent.note (Annotation) for use in R4, from HL7's xver-r5.r4 extension package."""

# R4's seriousness codes are capitalised (the official example uses "Non-serious").
_SERIOUS = coding(SERIOUSNESS, "Serious", "Serious")
_NOT_SERIOUS = coding(SERIOUSNESS, "Non-serious", "Non-serious")
_RESOLVED = coding(OUTCOME, "resolved", "Resolved")
_ONGOING = coding(OUTCOME, "ongoing", "Ongoing")

ACTION_TEXT: dict[AdverseEventAction, str] = {
    AdverseEventAction.none: "No action taken",
    AdverseEventAction.rate_reduced: "Infusion rate reduced",
    AdverseEventAction.paused: "Infusion paused",
    AdverseEventAction.stopped: "Infusion stopped",
    AdverseEventAction.medication_given: "Medication given",
}


def adverse_events(
    session: InfusionSession, *, course: TreatmentCourse, context: MappingContext
) -> list[Resource]:
    """An InfusionSession's adverse events as AdverseEvents suspecting its ketamine dose."""
    return [
        _adverse_event(session, event, course=course, context=context)
        for event in session.adverse_events
    ]


def _adverse_event(
    session: InfusionSession,
    event: AdverseEvent,
    *,
    course: TreatmentCourse,
    context: MappingContext,
) -> Resource:
    """One recorded side effect as an actual AdverseEvent of the session's Encounter."""
    role = ("adverse-event", event.kind.value, event.onset_at.isoformat())
    own = context.terminology.own("adverse-event-kind", event.kind.value)
    codings = (*context.terminology.mapped("adverse-event", event.kind.value), own)
    resource: dict[str, Any] = {
        "resourceType": "AdverseEvent",
        "id": resource_id("session", session.external_id, *role),
        "meta": meta(Profiles.ADVERSE_EVENT),
        "extension": [{"url": NOTE, "valueAnnotation": {"text": _note(event)}}],
        # R4 AdverseEvent.identifier is a single Identifier, not a list.
        "identifier": context.identifier("session", session.external_id, *role),
        "actuality": "actual",
        "event": concept(*codings, text=event.description or own["display"]),
        "subject": reference("Patient", "patient", course.patient),
        "encounter": encounter_reference(session),
        "date": instant(event.onset_at),
        # The patient is watched throughout the infusion and recovery: seen when it began.
        "detected": instant(event.onset_at),
        "seriousness": concept(_SERIOUS if event.serious else _NOT_SERIOUS),
        "severity": concept(coding(SEVERITY, event.severity.value, event.severity.value.title())),
        "outcome": concept(_RESOLVED if event.resolved_at is not None else _ONGOING),
    }
    # The model allows adverse events only once the infusion started, so the administration
    # exists; the check keeps a reference from ever pointing at a resource not emitted.
    if session.status is not SessionStatus.scheduled:
        resource["suspectEntity"] = [{"instance": administration_reference(session)}]
    return resource


def _note(event: AdverseEvent) -> str:
    """What was done and when it resolved, e.g. "Infusion rate reduced. Resolved at ..."."""
    text = f"{ACTION_TEXT[event.action]}."
    if event.resolved_at is not None:
        minutes = _minutes(event.onset_at, event.resolved_at)
        text += f" Resolved at {instant(event.resolved_at)} ({minutes} min after onset)."
    else:
        text += " Not recorded as resolved."
    return text


def _minutes(start: datetime, end: datetime) -> int:
    return round((end - start).total_seconds() / 60)
