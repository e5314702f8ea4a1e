"""A treatment course as the CarePlan EHRs read, and a CarePlan an EHR changed as a course again.

Forward: one CarePlan per course (intent `plan`). Its activities are the standing order (a
reference to the course's MedicationRequest), one activity per induction week and one for the
maintenance phase, each with the Timing of its infusions, a status computed from the course's
sessions and, as outcomes, the MedicationAdministrations of the sessions in it that gave ketamine.

Which sessions belong to which activity: the sessions, in order of `scheduled_start`, fill the
protocol's slots one by one whatever their status, week 1's slots first; the sessions after the
induction's slots are maintenance. A cancelled or missed infusion used its slot: the clinic does
not book a make-up session for it (re-booking moves the session's own time), so counting only
the infusions given would file maintenance infusions under an induction week. Extra sessions of an
induction-only protocol stay with its last week.

Back: `course_from_care_plan` reads a CarePlan (status, period, the schedule per phase, the
infusion length, notes) into a course. What the protocol cannot express (a Timing by weekday, a
monthly interval, another drug, another patient) raises `UnsupportedContent` (the shared error of
`mappings.unsupported`, re-exported here) with the FHIRPath of the element, never a guess.
Activity statuses and outcomes are not read back: they are computed from the sessions each time
the plan is mapped. References the course has no place for (a second condition, a co-author) are
not taken in. The dose is the standing order's, so it comes from the current course.

Pure: no database, HTTP, settings or clock. It must not look up other records: the sessions
come in as an argument, and references are built from external ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from mappings.context import (
    RXNORM,
    MappingContext,
    Profiles,
    Resource,
    meta,
    reference,
    resource_id,
)
from mappings.fhir import CarePlan
from mappings.medication_request import dose_summary, ketamine, protocol_summary
from mappings.unsupported import UnsupportedContent
from service.records.models import (
    CourseStatus,
    InfusionSession,
    Protocol,
    SessionStatus,
    TreatmentCourse,
)

__all__ = [
    "Phase",
    "UnsupportedContent",
    "activity_status",
    "care_plan",
    "course_from_care_plan",
    "phases",
]

TITLE_PREFIX = "Ketamine infusion course: "
"""The title names the protocol after this prefix, which is how a plan read back keeps it."""

CATEGORY_TEXT = "Ketamine infusion therapy"
"""No SNOMED CT care-plan category for it was confirmed, and US Core's `assess-plan` is for
narrative assessment-and-plan notes; a text category is what every EHR can show."""

ACTIVITY_TEXT = "Ketamine IV infusion"
STANDING_ORDER = "standing-order"
MAINTENANCE = "maintenance"
INDUCTION_WEEK = re.compile(r"^induction-week-[1-9][0-9]*$")
"""Element ids of the activities: how a plan read back tells an induction week from maintenance
when their timings alone could be the same (one infusion a week)."""

STATUS: dict[CourseStatus, str] = {
    # A planned course is agreed and booked: in force, with period.start ahead. EHRs list only
    # active plans as current ones; `draft` would hide it as a plan still being written.
    CourseStatus.planned: "active",
    CourseStatus.active: "active",
    CourseStatus.on_hold: "on-hold",
    CourseStatus.completed: "completed",
    CourseStatus.stopped: "revoked",
}
"""Course status -> request-status (CarePlan.status)."""

STATUS_BACK: dict[str, CourseStatus] = {
    "draft": CourseStatus.planned,
    "on-hold": CourseStatus.on_hold,
    "completed": CourseStatus.completed,
    "revoked": CourseStatus.stopped,
}
"""request-status -> course status; `active` is planned or active (see `_status`)."""

GIVEN = frozenset({SessionStatus.completed, SessionStatus.stopped_early})
"""Sessions in which ketamine was given: the outcomes of their activity."""
PENDING = frozenset({SessionStatus.scheduled, SessionStatus.in_progress})

STARTED = frozenset({"in-progress", "on-hold", "completed", "stopped"})
"""care-plan-activity-status codes of an activity that had begun."""


@dataclass(frozen=True)
class Phase:
    """One scheduled activity of a course: an induction week or the maintenance phase."""

    element_id: str
    label: str
    frequency: int
    """Infusions per period."""
    period_weeks: int
    start: date
    end: date | None
    slots: int | None
    """Infusions the phase holds (None for maintenance, which runs until the course ends)."""
    sessions: tuple[InfusionSession, ...]


def phases(course: TreatmentCourse, sessions: Sequence[InfusionSession]) -> list[Phase]:
    """The course's induction weeks and maintenance phase, each with the sessions that fill it."""
    for session in sessions:
        if session.course != course.external_id:
            raise ValueError(f"session {session.external_id} is not of course {course.external_id}")
    ordered = sorted(sessions, key=lambda s: (s.scheduled_start, s.external_id))
    protocol = course.protocol
    weekly = protocol.induction_weekly_sessions
    interval = protocol.maintenance_interval_weeks
    out: list[Phase] = []
    taken = 0
    for index, count in enumerate(weekly):
        start = course.start_date + timedelta(weeks=index)
        last = index == len(weekly) - 1
        filled = ordered[taken:] if last and interval is None else ordered[taken : taken + count]
        out.append(
            Phase(
                element_id=f"induction-week-{index + 1}",
                label=f"Induction week {index + 1} of {len(weekly)}",
                frequency=count,
                period_weeks=1,
                start=start,
                end=start + timedelta(days=6),
                slots=count,
                sessions=tuple(filled),
            )
        )
        taken += count
    if interval is not None:
        start = course.start_date + timedelta(weeks=len(weekly))
        # A course that ended before maintenance began leaves the phase's planned start only.
        end = course.end_date if course.end_date and course.end_date >= start else None
        out.append(
            Phase(
                element_id=MAINTENANCE,
                label="Maintenance",
                frequency=1,
                period_weeks=interval,
                start=start,
                end=end,
                slots=None,
                sessions=tuple(ordered[taken:]),
            )
        )
    return out


def activity_status(phase: Phase, course_status: CourseStatus) -> str:
    """The care-plan-activity-status of a phase, from its sessions and the course's status."""
    given = any(s.status in GIVEN for s in phase.sessions)
    pending = any(s.status in PENDING for s in phase.sessions)
    finished = phase.slots is not None and len(phase.sessions) >= phase.slots and not pending
    if course_status is CourseStatus.completed:
        return "completed" if given else "cancelled"
    if course_status is CourseStatus.stopped:
        if given:
            return "completed" if finished else "stopped"
        return "cancelled"
    if finished:
        return "completed" if given else "cancelled"
    if course_status is CourseStatus.on_hold:
        return "on-hold" if given else "not-started"
    if given or any(s.status is SessionStatus.in_progress for s in phase.sessions):
        return "in-progress"
    return "scheduled" if pending else "not-started"


def _linked(resource_type: str, kind: str, external_id: str, context: MappingContext) -> Resource:
    # The business identifier beside the literal reference lets a plan read back without its
    # course record still name the patient, diagnosis and prescriber (ids are one-way hashes).
    return {
        **reference(resource_type, kind, external_id),
        "identifier": context.identifier(kind, external_id),
    }


def _activity(phase: Phase, course: TreatmentCourse, context: MappingContext) -> Resource:
    repeat: dict[str, Any] = {"boundsPeriod": {"start": phase.start.isoformat()}}
    if phase.end is not None:
        repeat["boundsPeriod"]["end"] = phase.end.isoformat()
    repeat["duration"] = course.protocol.infusion_minutes
    repeat["durationUnit"] = "min"
    repeat["frequency"] = phase.frequency
    repeat["period"] = phase.period_weeks
    repeat["periodUnit"] = "wk"
    dose = dose_summary(course.protocol)
    if phase.slots is None:
        every = "week" if phase.period_weeks == 1 else f"{phase.period_weeks} weeks"
        description = f"{phase.label}: one infusion of {dose} every {every}"
    else:
        infusions = "one infusion" if phase.slots == 1 else f"{phase.slots} infusions"
        description = f"{phase.label}: {infusions} of {dose}"
    activity: dict[str, Any] = {"id": phase.element_id}
    outcomes = [
        reference("MedicationAdministration", "session", s.external_id, "MedicationAdministration")
        for s in phase.sessions
        if s.status in GIVEN
    ]
    if outcomes:
        activity["outcomeReference"] = outcomes
    # cpl-3: a detail and no reference. The order is linked by the standing-order activity.
    activity["detail"] = {
        "kind": "MedicationRequest",
        "code": {"text": ACTIVITY_TEXT},
        "status": activity_status(phase, course.status),
        "scheduledTiming": {"repeat": repeat},
        "productCodeableConcept": ketamine(context),
        "description": description,
    }
    return activity


def care_plan(
    course: TreatmentCourse, *, sessions: Sequence[InfusionSession], context: MappingContext
) -> Resource:
    """A TreatmentCourse as the CarePlan an EHR reads: its schedule, progress and outcomes."""
    course_id = course.external_id
    period = {"start": course.start_date.isoformat()}
    if course.end_date is not None:
        period["end"] = course.end_date.isoformat()
    standing_order = {
        "id": STANDING_ORDER,
        "reference": {
            **reference("MedicationRequest", "course", course_id, "MedicationRequest"),
            "display": f"Standing order: {dose_summary(course.protocol)}",
        },
    }
    resource: dict[str, Any] = {
        "resourceType": "CarePlan",
        "id": resource_id("course", course_id, "CarePlan"),
        "meta": meta(Profiles.CARE_PLAN),
        "identifier": [context.identifier("course", course_id, "CarePlan")],
        "status": STATUS[course.status],
        "intent": "plan",
        "category": [{"text": CATEGORY_TEXT}],
        "title": f"{TITLE_PREFIX}{course.protocol.name}",
        "description": protocol_summary(course.protocol),
        "subject": _linked("Patient", "patient", course.patient, context),
        "period": period,
        "author": _linked("Practitioner", "clinician", course.prescriber, context),
        "addresses": [_linked("Condition", "diagnosis", course.diagnosis, context)],
        "goal": [reference("Goal", "course", course_id, "Goal")],
        "activity": [
            standing_order,
            *(_activity(phase, course, context) for phase in phases(course, sessions)),
        ],
    }
    if course.notes:
        resource["note"] = [{"text": note} for note in course.notes]
    return resource


# ---------------------------------------------------------------------------------------------
# Back: a CarePlan from an EHR as the course it plans


@dataclass(frozen=True)
class _Scheduled:
    """What one activity's Timing says, with the path it was read from."""

    path: str
    element_id: str | None
    frequency: int
    weeks: int
    span_days: int | None
    """Days from the first to the last day of its bounds (None when not bounded both ways)."""
    minutes: int | None


def _fhirpath(location: Sequence[int | str]) -> str:
    return "CarePlan" + "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in location
    )


def _parse(resource: dict[str, Any]) -> CarePlan:
    try:
        return CarePlan.model_validate(resource)
    except ValidationError as error:
        first = error.errors()[0]
        raise UnsupportedContent(
            _fhirpath(first["loc"]), f"not a valid CarePlan: {first['msg']}"
        ) from None
    except (ValueError, TypeError) as error:
        raise UnsupportedContent("CarePlan", f"not a valid CarePlan: {error}") from None


def _is_reference_to(ref: Any, resource_type: str, own_system: str) -> bool:
    if ref is None:
        return False
    literal = ref.reference or ""
    return bool(
        ref.type == resource_type
        or literal.startswith(f"{resource_type}/")
        or f"/{resource_type}/" in literal
        or (ref.identifier is not None and ref.identifier.system == own_system)
    )


def _own_id(ref: Any, system: str) -> str | None:
    """The external id a reference names through the service's identifier, if it does."""
    identifier = ref.identifier if ref is not None else None
    if identifier is not None and identifier.system == system and identifier.value:
        return str(identifier.value)
    return None


def _course_id(model: CarePlan, current: TreatmentCourse | None, context: MappingContext) -> str:
    system = context.system("course")
    suffix = "/CarePlan"
    for index, identifier in enumerate(model.identifier or []):
        value = identifier.value or ""
        if identifier.system != system or not value.endswith(suffix):
            continue
        found = value[: -len(suffix)]
        if current is not None and found != current.external_id:
            raise UnsupportedContent(
                f"CarePlan.identifier[{index}]",
                f"the plan of course {found}, not of course {current.external_id}",
            )
        return found
    if current is not None:
        return current.external_id
    raise UnsupportedContent(
        "CarePlan.identifier", f"no identifier in {system} names the course it plans"
    )


def _patient(model: CarePlan, current: TreatmentCourse | None, context: MappingContext) -> str:
    system = context.system("patient")
    if not _is_reference_to(model.subject, "Patient", system):
        raise UnsupportedContent("CarePlan.subject", "the subject is not a Patient")
    found = _own_id(model.subject, system)
    if current is not None:
        if found is not None and found != current.patient:
            raise UnsupportedContent(
                "CarePlan.subject", "the plan names another patient than the course's"
            )
        return current.patient
    if found is None:
        raise UnsupportedContent("CarePlan.subject", f"no identifier in {system}")
    return found


def _linked_id(
    refs: Sequence[Any], path: str, kind: str, fallback: str | None, context: MappingContext
) -> str:
    """The one record of `kind` the references name by the service's identifier, or `fallback`."""
    system = context.system(kind)
    found: str | None = None
    for index, ref in enumerate(refs):
        named = _own_id(ref, system)
        if named is not None and found is not None and named != found:
            raise UnsupportedContent(f"{path}[{index}]", f"a course has one {kind}")
        found = named or found
    if found is not None:
        return found
    if fallback is not None:
        return fallback
    raise UnsupportedContent(path, f"no reference with an identifier in {system}")


def _as_date(value: date) -> date:
    # A dateTime counts as the day it names in its own offset.
    return value.date() if isinstance(value, datetime) else value


def _day(value: Any, path: str) -> date:
    if isinstance(value, date):
        return _as_date(value)
    raise UnsupportedContent(path, "a full date is needed")


def _status(model: CarePlan, current: TreatmentCourse | None) -> CourseStatus:
    code = str(model.status)
    if code in STATUS_BACK:
        return STATUS_BACK[code]
    if code != "active":
        raise UnsupportedContent("CarePlan.status", f"{code!r} has no course status")
    # `active` is both planned and active: infusions having begun is the clinic's to say, so a
    # known course keeps its own; otherwise the activities tell whether any had begun.
    if current is not None and current.status in (CourseStatus.planned, CourseStatus.active):
        return current.status
    begun = any(
        activity.detail is not None and str(activity.detail.status) in STARTED
        for activity in model.activity or []
    )
    return CourseStatus.active if begun else CourseStatus.planned


def _whole(value: Decimal | int | float, path: str, what: str) -> int:
    number = Decimal(str(value))
    if number != number.to_integral_value():
        raise UnsupportedContent(path, f"{what} must be a whole number")
    return int(number)


_UNSUPPORTED_REPEAT = (
    "boundsDuration",
    "boundsRange",
    "count",
    "countMax",
    "durationMax",
    "frequencyMax",
    "periodMax",
    "dayOfWeek",
    "timeOfDay",
    "when",
    "offset",
)
"""Timing.repeat elements the protocol has no place for: a plan using them says more than a
course can keep."""


def _scheduled(activity: Any, path: str, context: MappingContext) -> _Scheduled:
    detail = activity.detail
    if detail.kind is not None and detail.kind != "MedicationRequest":
        raise UnsupportedContent(f"{path}.kind", "a course schedules medication (infusions) only")
    if detail.doNotPerform:
        raise UnsupportedContent(f"{path}.doNotPerform", "a course has no do-not-perform activity")
    if detail.productReference is not None:
        raise UnsupportedContent(f"{path}.product", "the course's product is ketamine, by code")
    product = detail.productCodeableConcept
    if product is not None:
        codes = {(c.system, c.code) for c in product.coding or []}
        ours = {
            (c["system"], c["code"]) for c in context.terminology.mapped("medication", "ketamine")
        }
        if any(system == RXNORM for system, _ in codes) and not codes & ours:
            raise UnsupportedContent(f"{path}.product", "the course's product is ketamine")
    timing = detail.scheduledTiming
    if timing is None:
        raise UnsupportedContent(f"{path}.scheduled", "an infusion activity needs a Timing")
    where = f"{path}.scheduled"
    if timing.event:
        raise UnsupportedContent(f"{where}.event", "the protocol has no fixed dates")
    repeat = timing.repeat
    if repeat is None:
        raise UnsupportedContent(f"{where}.repeat", "an infusion activity needs a repeat")
    where = f"{where}.repeat"
    for name in _UNSUPPORTED_REPEAT:
        if getattr(repeat, name) not in (None, []):
            raise UnsupportedContent(f"{where}.{name}", "the protocol cannot express it")
    frequency = int(repeat.frequency) if repeat.frequency is not None else 1
    if repeat.period is None:
        raise UnsupportedContent(f"{where}.period", "an infusion activity repeats every period")
    period = _whole(repeat.period, f"{where}.period", "the period")
    if repeat.periodUnit == "wk":
        weeks = period
    elif repeat.periodUnit == "d" and period % 7 == 0:
        weeks = period // 7
    else:
        raise UnsupportedContent(f"{where}.periodUnit", "the protocol counts in whole weeks")
    minutes: int | None = None
    if repeat.duration is not None:
        factor = {"min": 1, "h": 60}.get(str(repeat.durationUnit))
        if factor is None:
            raise UnsupportedContent(f"{where}.durationUnit", "an infusion lasts minutes")
        minutes = _whole(repeat.duration * factor, f"{where}.duration", "the infusion length")
    bounds = repeat.boundsPeriod
    start = bounds.start if bounds is not None else None
    end = bounds.end if bounds is not None else None
    span = None
    if isinstance(start, date) and isinstance(end, date):
        span = (_as_date(end) - _as_date(start)).days
    return _Scheduled(path, activity.id, frequency, weeks, span, minutes)


def _schedule(
    model: CarePlan, course_id: str, context: MappingContext
) -> tuple[list[_Scheduled], _Scheduled | None, int | None]:
    """The induction weeks, the maintenance phase and the infusion length the activities say."""
    order = f"MedicationRequest/{resource_id('course', course_id, 'MedicationRequest')}"
    timed: list[_Scheduled] = []
    for index, activity in enumerate(model.activity or []):
        path = f"CarePlan.activity[{index}]"
        if activity.reference is not None and activity.detail is not None:
            raise UnsupportedContent(path, "cpl-3: an activity has a reference or a detail")
        if activity.reference is not None:
            literal = activity.reference.reference or ""
            if literal != order and not literal.endswith(f"/{order}"):
                raise UnsupportedContent(
                    f"{path}.reference", "a course's only referenced activity is its order"
                )
            continue
        if activity.detail is None:
            raise UnsupportedContent(path, "an activity without a detail says nothing to keep")
        timed.append(_scheduled(activity, f"{path}.detail", context))
    maintenance: _Scheduled | None = None
    induction: list[_Scheduled] = []
    for position, entry in enumerate(timed):
        if _is_maintenance(entry, last=position == len(timed) - 1):
            if maintenance is not None:
                raise UnsupportedContent(entry.path, "a course has one maintenance phase")
            maintenance = entry
        else:
            induction.append(entry)
    minutes: int | None = None
    for entry in timed:
        if entry.minutes is not None and minutes is not None and entry.minutes != minutes:
            raise UnsupportedContent(
                f"{entry.path}.scheduled.repeat.duration", "every infusion lasts the same time"
            )
        minutes = entry.minutes if entry.minutes is not None else minutes
    return induction, maintenance, minutes


def _is_maintenance(entry: _Scheduled, *, last: bool) -> bool:
    if entry.element_id == MAINTENANCE:
        return True
    if entry.element_id is not None and INDUCTION_WEEK.match(entry.element_id):
        return False
    # A plan without the service's element ids: maintenance is the last activity, once per
    # period and not closed within a week.
    open_ended = entry.span_days is None or entry.span_days > 6
    return last and entry.frequency == 1 and (entry.weeks > 1 or open_ended)


def _induction_weeks(entry: _Scheduled) -> int:
    """How many induction weeks one activity stands for: its bounds in whole weeks."""
    if entry.span_days is None:
        # The service's own week activities are one week each, bounded or not.
        if entry.element_id is not None and INDUCTION_WEEK.match(entry.element_id):
            return 1
        raise UnsupportedContent(
            f"{entry.path}.scheduled.repeat.bounds", "an induction activity needs dated bounds"
        )
    if entry.span_days < 0 or (entry.span_days + 1) % 7:
        raise UnsupportedContent(
            f"{entry.path}.scheduled.repeat.bounds", "an induction activity spans whole weeks"
        )
    return (entry.span_days + 1) // 7


def _protocol(
    model: CarePlan, course_id: str, current: TreatmentCourse | None, context: MappingContext
) -> Protocol:
    induction, maintenance, minutes = _schedule(model, course_id, context)
    if not induction:
        raise UnsupportedContent("CarePlan.activity", "no induction week")
    weekly: list[int] = []
    for entry in induction:
        repeat = f"{entry.path}.scheduled.repeat"
        if entry.weeks != 1:
            raise UnsupportedContent(f"{repeat}.period", "an induction week repeats weekly")
        if not 1 <= entry.frequency <= 7:
            raise UnsupportedContent(f"{repeat}.frequency", "1 to 7 infusions a week")
        weekly += [entry.frequency] * _induction_weeks(entry)
    if len(weekly) > 12:
        raise UnsupportedContent("CarePlan.activity", "an induction lasts at most 12 weeks")
    interval: int | None = None
    if maintenance is not None:
        repeat = f"{maintenance.path}.scheduled.repeat"
        if maintenance.frequency != 1:
            raise UnsupportedContent(f"{repeat}.frequency", "maintenance is one infusion a time")
        if not 1 <= maintenance.weeks <= 52:
            raise UnsupportedContent(f"{repeat}.period", "maintenance every 1 to 52 weeks")
        interval = maintenance.weeks
    if minutes is not None and not 5 <= minutes <= 180:
        timed = [*induction, *([maintenance] if maintenance else [])]
        where = next(entry.path for entry in timed if entry.minutes is not None)
        raise UnsupportedContent(f"{where}.scheduled.repeat.duration", "5 to 180 minutes")
    # The dose is the standing order's, not the plan's: a known course keeps its own; a course
    # known only from its plan gets the protocol default, as a course record without one does.
    default = current.protocol if current is not None else Protocol()
    title = (model.title or "").strip()
    name = title[len(TITLE_PREFIX) :].strip() if title.startswith(TITLE_PREFIX) else ""
    if not name:
        if current is None:
            raise UnsupportedContent("CarePlan.title", f"no protocol name after {TITLE_PREFIX!r}")
        name = current.protocol.name
    try:
        return Protocol(
            name=name,
            induction_weekly_sessions=weekly,
            maintenance_interval_weeks=interval,
            dose_mg_per_kg=default.dose_mg_per_kg,
            infusion_minutes=minutes if minutes is not None else default.infusion_minutes,
        )
    except ValidationError as error:
        raise UnsupportedContent("CarePlan.title", str(error.errors()[0]["msg"])) from None


def course_from_care_plan(
    resource: dict[str, Any], *, current: TreatmentCourse | None, context: MappingContext
) -> TreatmentCourse:
    """A CarePlan (as an EHR changed it) as the TreatmentCourse it plans.

    The diagnosis and prescriber are the ones the plan's references name by the service's
    identifiers, else `current`'s; the patient cannot change. The dose is `current`'s (the
    standing order carries it). Raises `UnsupportedContent` for what a course cannot hold.
    """
    model = _parse(resource)
    if model.intent not in ("plan", "order"):
        raise UnsupportedContent("CarePlan.intent", f"{model.intent!r} is not a plan or order")
    course_id = _course_id(model, current, context)
    patient = _patient(model, current, context)
    status = _status(model, current)
    diagnosis = _linked_id(
        model.addresses or [],
        "CarePlan.addresses",
        "diagnosis",
        current.diagnosis if current else None,
        context,
    )
    prescriber = _linked_id(
        [model.author] if model.author else [],
        "CarePlan.author",
        "clinician",
        current.prescriber if current else None,
        context,
    )
    if model.period is None or model.period.start is None:
        raise UnsupportedContent("CarePlan.period.start", "a course has a start date")
    start = _day(model.period.start, "CarePlan.period.start")
    end = _day(model.period.end, "CarePlan.period.end") if model.period.end else None
    if end is not None and end < start:
        raise UnsupportedContent("CarePlan.period.end", "the plan ends before it starts")
    notes = [str(note.text) for note in model.note or []]
    if len(notes) > 50:
        raise UnsupportedContent("CarePlan.note", "a course keeps at most 50 notes")
    for index, note in enumerate(notes):
        if not note.strip() or len(note) > 2000:
            raise UnsupportedContent(f"CarePlan.note[{index}].text", "a note has 1-2000 characters")
    protocol = _protocol(model, course_id, current, context)
    try:
        return TreatmentCourse(
            external_id=course_id,
            patient=patient,
            diagnosis=diagnosis,
            prescriber=prescriber,
            protocol=protocol,
            start_date=start,
            end_date=end,
            status=status,
            notes=notes,
        )
    except ValidationError as error:
        first = error.errors()[0]
        path = {
            "external_id": "CarePlan.identifier",
            "patient": "CarePlan.subject",
            "diagnosis": "CarePlan.addresses",
            "prescriber": "CarePlan.author",
        }.get(str(first["loc"][0]) if first["loc"] else "", "CarePlan")
        raise UnsupportedContent(path, str(first["msg"])) from None
