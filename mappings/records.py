"""Every resource a record maps to: the one entry point the store and the CLI call.

Pure. A record's resources depend only on the record and the few records passed with it: a
session needs its course (for the patient, the indication and the standing order), a course
needs its sessions (for the plan's progress).
"""

from __future__ import annotations

from collections.abc import Sequence

from mappings.adverse_event import adverse_events
from mappings.care_plan import care_plan
from mappings.condition import condition
from mappings.context import MappingContext, Resource
from mappings.encounter import encounter
from mappings.goal import goal
from mappings.medication_administration import medication_administration
from mappings.medication_request import medication_request
from mappings.patient import patient
from mappings.practitioner import practitioner
from mappings.scores import assessment_scores, session_scores
from mappings.vital_signs import vital_signs
from service.records.models import (
    Assessment,
    Clinician,
    Diagnosis,
    InfusionSession,
    Patient,
    RecordModel,
    TreatmentCourse,
)


class MissingContext(ValueError):
    """A record was mapped without a record its resources depend on."""


def resources_for(
    record: RecordModel,
    *,
    context: MappingContext,
    course: TreatmentCourse | None = None,
    sessions: Sequence[InfusionSession] = (),
) -> list[Resource]:
    """The FHIR resources a record maps to, in an order that references come before use."""
    match record:
        case Patient():
            return [patient(record, context=context)]
        case Clinician():
            return [practitioner(record, context=context)]
        case Diagnosis():
            return [condition(record, context=context)]
        case TreatmentCourse():
            return [
                medication_request(record, context=context),
                goal(record, context=context),
                care_plan(record, sessions=sessions, context=context),
            ]
        case InfusionSession():
            if course is None or course.external_id != record.course:
                raise MissingContext(f"session {record.external_id} needs course {record.course}")
            out = [encounter(record, course=course, context=context)]
            out += vital_signs(record, course=course, context=context)
            administration = medication_administration(record, course=course, context=context)
            if administration is not None:
                out.append(administration)
            out += adverse_events(record, course=course, context=context)
            out += session_scores(record, course=course, context=context)
            return out
        case Assessment():
            return assessment_scores(record, context=context)
