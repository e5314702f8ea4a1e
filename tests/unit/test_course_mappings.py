"""A TreatmentCourse as CarePlan, MedicationRequest and Goal; CarePlans from EHRs as courses."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fhirpathpy import evaluate
from fhirpathpy.models import models
from hypothesis import given, settings
from hypothesis import strategies as st

from mappings.care_plan import (
    UnsupportedContent,
    activity_status,
    care_plan,
    course_from_care_plan,
    phases,
)
from mappings.context import MappingContext, resource_id
from mappings.goal import goal
from mappings.medication_request import medication_request
from service.records.demo import generate_clinic
from service.records.models import (
    CourseStatus,
    InfusionSession,
    Protocol,
    RecordModel,
    SessionStatus,
    TreatmentCourse,
)
from service.records.service import parse_record
from tests.factory import clinic
from tests.fhir_check import assert_conformant, assert_valid_r4
from tests.golden import assert_golden

CONTEXT = MappingContext()
TZ = ZoneInfo("America/New_York")
R4 = models["r4"]


# ---------------------------------------------------------------------------------------------
# Records


def course_record(**changes: Any) -> TreatmentCourse:
    """The intake contract's example course with fixed ids (golden files need them)."""
    body = clinic().course | {
        "external_id": "TC-55",
        "patient": "P-1001",
        "diagnosis": "D-1",
        "prescriber": "C-7",
    }
    record = parse_record(body | changes)
    assert isinstance(record, TreatmentCourse)
    return record


def session_record(
    external_id: str, day: date, status: SessionStatus, *, course: str = "TC-55"
) -> InfusionSession:
    """A session of `course` at 09:00 clinic time, with what its status requires."""
    start = datetime.combine(day, time(9), TZ)
    body: dict[str, Any] = {
        "kind": "session",
        "external_id": external_id,
        "course": course,
        "scheduled_start": start.isoformat(),
        "status": status.value,
    }
    if status in (SessionStatus.completed, SessionStatus.stopped_early, SessionStatus.in_progress):
        body |= {
            "started_at": (start + timedelta(minutes=4)).isoformat(),
            "weight_kg": 68.0,
            "dose_mg_per_kg": 0.5,
            "administered_by": "C-9",
            "supervised_by": "C-7",
        }
    if status is SessionStatus.completed:
        body |= {"ended_at": (start + timedelta(minutes=46)).isoformat(), "total_dose_mg": 34.0}
    if status is SessionStatus.stopped_early:
        body |= {
            "ended_at": (start + timedelta(minutes=29)).isoformat(),
            "total_dose_mg": 20.0,
            "status_reason": "Distressing dissociation; infusion stopped at minute 25.",
        }
    record = parse_record(body)
    assert isinstance(record, InfusionSession)
    return record


def halfway_sessions() -> list[InfusionSession]:
    """TC-55 on the morning of 2026-10-15: week 1 done, week 2's second infusion running."""
    s = SessionStatus
    plan = [
        ("S-901", date(2026, 10, 5), s.completed),
        ("S-902", date(2026, 10, 7), s.no_show),
        ("S-903", date(2026, 10, 9), s.stopped_early),
        ("S-904", date(2026, 10, 13), s.completed),
        ("S-905", date(2026, 10, 15), s.in_progress),
        ("S-906", date(2026, 10, 19), s.scheduled),
        ("S-907", date(2026, 10, 21), s.scheduled),
        ("S-908", date(2026, 10, 23), s.scheduled),
        ("S-909", date(2026, 11, 16), s.scheduled),
    ]
    # Out of order on purpose: the plan orders sessions by their scheduled start.
    return [session_record(*entry) for entry in reversed(plan)]


def halfway_course() -> TreatmentCourse:
    return course_record(
        notes=["Baseline PHQ-9 19. Patient prefers morning slots; driver arranged."]
    )


def stopped_course() -> tuple[TreatmentCourse, list[InfusionSession]]:
    """An induction-only course stopped in its second week."""
    course = course_record(
        protocol={
            "name": "induction-only-6x3wk",
            "induction_weekly_sessions": [2, 2, 2],
            "maintenance_interval_weeks": None,
            "dose_mg_per_kg": 0.5,
            "infusion_minutes": 45,
        },
        status="stopped",
        end_date="2026-10-16",
        notes=["Discontinued after 3 infusions: self-pay cost."],
    )
    sessions = [
        session_record("S-801", date(2026, 10, 5), SessionStatus.completed),
        session_record("S-802", date(2026, 10, 8), SessionStatus.completed),
        session_record("S-803", date(2026, 10, 13), SessionStatus.completed),
    ]
    return course, sessions


@cache
def demo_records() -> tuple[RecordModel, ...]:
    return tuple(generate_clinic(seed=7, patients=12, as_of=date(2026, 11, 23)))


def demo_courses() -> Iterator[tuple[TreatmentCourse, list[InfusionSession]]]:
    records = demo_records()
    for course in records:
        if isinstance(course, TreatmentCourse):
            sessions = [
                s
                for s in records
                if isinstance(s, InfusionSession) and s.course == course.external_id
            ]
            yield course, sessions


def activities(resource: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {activity["id"]: activity for activity in resource["activity"]}


def administration(session_id: str) -> dict[str, str]:
    ref = resource_id("session", session_id, "MedicationAdministration")
    return {"reference": f"MedicationAdministration/{ref}"}


# ---------------------------------------------------------------------------------------------
# Forward


def test_care_plan_halfway_through_induction_golden(r4_examples: Path) -> None:
    resource = care_plan(halfway_course(), sessions=halfway_sessions(), context=CONTEXT)
    assert_conformant(resource, r4_examples)
    assert_golden("course-care-plan", resource)
    assert resource["id"] == resource_id("course", "TC-55", "CarePlan")


def test_activity_statuses_and_outcomes_halfway_through_induction() -> None:
    resource = care_plan(halfway_course(), sessions=halfway_sessions(), context=CONTEXT)
    found = {
        key: (activity["detail"]["status"], activity.get("outcomeReference", []))
        for key, activity in activities(resource).items()
        if "detail" in activity
    }
    assert found == {
        # The missed infusion used its slot; the one stopped early gave ketamine.
        "induction-week-1": ("completed", [administration("S-901"), administration("S-903")]),
        # The running infusion is no outcome yet.
        "induction-week-2": ("in-progress", [administration("S-904")]),
        "induction-week-3": ("scheduled", []),
        "maintenance": ("scheduled", []),
    }
    assert resource["status"] == "active"


def test_each_phase_is_bounded_and_timed() -> None:
    resource = care_plan(halfway_course(), sessions=[], context=CONTEXT)
    repeats = {
        key: activity["detail"]["scheduledTiming"]["repeat"]
        for key, activity in activities(resource).items()
        if "detail" in activity
    }
    assert repeats["induction-week-2"] == {
        "boundsPeriod": {"start": "2026-10-12", "end": "2026-10-18"},
        "duration": 40,
        "durationUnit": "min",
        "frequency": 2,
        "period": 1,
        "periodUnit": "wk",
    }
    assert repeats["maintenance"]["boundsPeriod"] == {"start": "2026-10-26"}
    assert (repeats["maintenance"]["frequency"], repeats["maintenance"]["period"]) == (1, 4)
    standing = activities(resource)["standing-order"]
    assert standing["reference"]["reference"] == (
        f"MedicationRequest/{resource_id('course', 'TC-55', 'MedicationRequest')}"
    )


def test_stopped_course_golden(r4_examples: Path) -> None:
    course, sessions = stopped_course()
    resource = care_plan(course, sessions=sessions, context=CONTEXT)
    assert_conformant(resource, r4_examples)
    assert_golden("course-care-plan-stopped", resource)
    statuses = [a["detail"]["status"] for a in resource["activity"] if "detail" in a]
    assert statuses == ["completed", "stopped", "cancelled"]
    assert resource["status"] == "revoked"
    order = medication_request(course, context=CONTEXT)
    assert_conformant(order, r4_examples)
    assert order["status"] == "stopped"
    assert order["courseOfTherapyType"]["coding"][0]["code"] == "acute"


def test_medication_request_golden(r4_examples: Path) -> None:
    resource = medication_request(halfway_course(), context=CONTEXT)
    assert_conformant(resource, r4_examples)
    assert_golden("course-medication-request", resource)
    assert resource["id"] == resource_id("course", "TC-55", "MedicationRequest")


def test_goal_golden(r4_examples: Path) -> None:
    resource = goal(halfway_course(), context=CONTEXT)
    assert_conformant(resource, r4_examples)
    assert_golden("course-goal", resource)
    assert resource["id"] == resource_id("course", "TC-55", "Goal")


@pytest.mark.parametrize(
    ("status", "plan", "order", "aim"),
    [
        ("planned", "active", "active", "planned"),
        ("active", "active", "active", "active"),
        ("on_hold", "on-hold", "on-hold", "on-hold"),
        ("completed", "completed", "completed", "completed"),
        ("stopped", "revoked", "stopped", "cancelled"),
    ],
)
def test_course_status_in_each_resource(status: str, plan: str, order: str, aim: str) -> None:
    course = course_record(status=status)
    assert care_plan(course, sessions=[], context=CONTEXT)["status"] == plan
    assert medication_request(course, context=CONTEXT)["status"] == order
    assert goal(course, context=CONTEXT)["lifecycleStatus"] == aim


S = SessionStatus


@pytest.mark.parametrize(
    ("course_status", "sessions", "expected"),
    [
        (CourseStatus.planned, [], "not-started"),
        (CourseStatus.planned, [S.scheduled, S.scheduled, S.scheduled], "scheduled"),
        (CourseStatus.active, [S.completed, S.scheduled], "in-progress"),
        (CourseStatus.active, [S.completed, S.cancelled, S.completed], "completed"),
        (CourseStatus.active, [S.cancelled, S.no_show, S.cancelled], "cancelled"),
        (CourseStatus.on_hold, [S.completed], "on-hold"),
        (CourseStatus.on_hold, [], "not-started"),
        (CourseStatus.stopped, [S.completed], "stopped"),
        (CourseStatus.stopped, [S.completed, S.completed, S.stopped_early], "completed"),
        (CourseStatus.stopped, [], "cancelled"),
        (CourseStatus.completed, [S.completed, S.completed], "completed"),
        (CourseStatus.completed, [], "cancelled"),
    ],
)
def test_induction_week_status(
    course_status: CourseStatus, sessions: list[SessionStatus], expected: str
) -> None:
    course = course_record(status=course_status.value, protocol={"induction_weekly_sessions": [3]})
    records = [
        session_record(f"S-{n}", date(2026, 10, 5 + 2 * n), status)
        for n, status in enumerate(sessions)
    ]
    week = phases(course, records)[0]
    assert activity_status(week, course_status) == expected


def test_maintenance_runs_until_the_course_ends() -> None:
    course = course_record(protocol={"induction_weekly_sessions": [1]})
    given = [
        session_record("S-1", date(2026, 10, 5), S.completed),
        session_record("S-2", date(2026, 11, 2), S.completed),
    ]
    maintenance = phases(course, given)[-1]
    assert [s.external_id for s in maintenance.sessions] == ["S-2"]
    assert activity_status(maintenance, CourseStatus.active) == "in-progress"
    assert activity_status(maintenance, CourseStatus.completed) == "completed"
    assert activity_status(maintenance, CourseStatus.stopped) == "stopped"


def test_sessions_of_another_course_are_refused() -> None:
    other = session_record("S-1", date(2026, 10, 5), S.scheduled, course="TC-99")
    with pytest.raises(ValueError, match="S-1 is not of course TC-55"):
        care_plan(course_record(), sessions=[other], context=CONTEXT)


def test_every_demo_course_maps_to_conformant_resources(r4_examples: Path) -> None:
    count = 0
    for course, sessions in demo_courses():
        plan = care_plan(course, sessions=sessions, context=CONTEXT)
        for resource in (
            plan,
            medication_request(course, context=CONTEXT),
            goal(course, context=CONTEXT),
        ):
            assert_conformant(resource, r4_examples)
        # cpl-3 by name, whatever the package's definitions say: a reference or a detail.
        assert evaluate(plan, "CarePlan.activity.all(detail.empty() or reference.empty())") == [
            True
        ]
        count += 1
    assert count == 12


def test_cancelled_infusions_keep_their_slot_in_demo_courses() -> None:
    # Every induction week's sessions fall in its dates, give or take a holiday's shift;
    # counting only given infusions would file maintenance infusions under week 3.
    records = generate_clinic(seed=7, patients=40, as_of=date(2026, 11, 23))
    sessions_of: dict[str, list[InfusionSession]] = {}
    for record in records:
        if isinstance(record, InfusionSession):
            sessions_of.setdefault(record.course, []).append(record)
    cancelled_in_induction = 0
    for course in records:
        if not isinstance(course, TreatmentCourse):
            continue
        for phase in phases(course, sessions_of.get(course.external_id, [])):
            if phase.slots is None or phase.end is None:
                continue
            for session in phase.sessions:
                day = session.scheduled_start.date()
                assert phase.start - timedelta(days=1) <= day <= phase.end + timedelta(days=1)
                cancelled_in_induction += session.status is S.cancelled
    assert cancelled_in_induction > 0


# ---------------------------------------------------------------------------------------------
# Back


def test_every_demo_course_round_trips() -> None:
    for course, sessions in demo_courses():
        resource = care_plan(course, sessions=sessions, context=CONTEXT)
        assert course_from_care_plan(resource, current=course, context=CONTEXT) == course
        # Without the record, the service's identifiers on the plan name everything else, and
        # every demo course has the default dose the plan does not carry.
        assert course_from_care_plan(resource, current=None, context=CONTEXT) == course


def test_an_ehr_putting_the_plan_on_hold_with_a_new_interval_shows_up() -> None:
    course = halfway_course()
    resource = care_plan(course, sessions=halfway_sessions(), context=CONTEXT)
    resource["status"] = "on-hold"
    activities(resource)["maintenance"]["detail"]["scheduledTiming"]["repeat"]["period"] = 6
    back = course_from_care_plan(resource, current=course, context=CONTEXT)
    protocol = course.protocol.model_copy(update={"maintenance_interval_weeks": 6})
    assert back == course.model_copy(update={"status": CourseStatus.on_hold, "protocol": protocol})


def test_an_ehr_plan_without_element_ids_and_in_days_reads_by_its_timing() -> None:
    course = halfway_course()
    resource = care_plan(course, sessions=halfway_sessions(), context=CONTEXT)
    for activity in resource["activity"]:
        activity.pop("id")
        if "detail" in activity:
            activity["detail"]["scheduledTiming"]["repeat"] |= {
                "duration": 0.75,
                "durationUnit": "h",
            }
    maintenance = resource["activity"][-1]["detail"]["scheduledTiming"]["repeat"]
    maintenance |= {"period": 42, "periodUnit": "d"}
    resource["activity"][0]["reference"]["reference"] = (
        "https://ib.example.org/fhir/" + resource["activity"][0]["reference"]["reference"]
    )
    back = course_from_care_plan(resource, current=course, context=CONTEXT)
    assert back.protocol.induction_weekly_sessions == [3, 2, 3]
    assert back.protocol.maintenance_interval_weeks == 6
    assert back.protocol.infusion_minutes == 45


def test_an_ehr_ending_the_plan_with_a_note_and_no_maintenance_shows_up() -> None:
    course = halfway_course()
    resource = care_plan(course, sessions=halfway_sessions(), context=CONTEXT)
    resource["status"] = "completed"
    resource["period"]["end"] = "2026-10-23T17:00:00-04:00"
    resource["note"].append({"text": "Maintenance to continue at the hospital's clinic."})
    resource["activity"] = [a for a in resource["activity"] if a["id"] != "maintenance"]
    resource["addresses"][0]["identifier"]["value"] = "D-2"
    back = course_from_care_plan(resource, current=course, context=CONTEXT)
    assert back.status is CourseStatus.completed
    assert back.end_date == date(2026, 10, 23)
    assert back.notes[-1] == "Maintenance to continue at the hospital's clinic."
    assert back.protocol.maintenance_interval_weeks is None
    assert back.diagnosis == "D-2"


def test_an_ehr_induction_activity_over_several_weeks_counts_each_week() -> None:
    course = halfway_course()
    resource = care_plan(course, sessions=[], context=CONTEXT)
    first = resource["activity"][1]
    first.pop("id")
    first["detail"]["scheduledTiming"]["repeat"]["boundsPeriod"]["end"] = "2026-10-18"
    back = course_from_care_plan(resource, current=course, context=CONTEXT)
    assert back.protocol.induction_weekly_sessions == [3, 3, 2, 3]
    first["detail"]["scheduledTiming"]["repeat"]["boundsPeriod"]["end"] = "2026-10-15"
    with pytest.raises(UnsupportedContent) as caught:
        course_from_care_plan(resource, current=course, context=CONTEXT)
    assert caught.value.path == "CarePlan.activity[1].detail.scheduled.repeat.bounds"
    del first["detail"]["scheduledTiming"]["repeat"]["boundsPeriod"]
    with pytest.raises(UnsupportedContent) as caught:
        course_from_care_plan(resource, current=course, context=CONTEXT)
    assert caught.value.path == "CarePlan.activity[1].detail.scheduled.repeat.bounds"


def test_a_planned_course_stays_planned_and_an_active_one_active() -> None:
    for status in ("planned", "active"):
        course = course_record(status=status)
        resource = care_plan(course, sessions=[], context=CONTEXT)
        assert resource["status"] == "active"
        assert course_from_care_plan(resource, current=course, context=CONTEXT) == course
    # An EHR resuming a held course whose infusions had begun: active again.
    held = course_record(status="on_hold")
    resource = care_plan(held, sessions=halfway_sessions(), context=CONTEXT)
    resource["status"] = "active"
    back = course_from_care_plan(resource, current=held, context=CONTEXT)
    assert back.status is CourseStatus.active


def _set(path: str, value: Any) -> Any:
    """A change to a CarePlan at a simple dotted path (list indices as numbers)."""

    def change(resource: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = resource
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is None:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value

    return change


WEEK_1 = "activity.1.detail"
REPEAT_1 = f"{WEEK_1}.scheduledTiming.repeat"
MAINTENANCE_REPEAT = "activity.4.detail.scheduledTiming.repeat"


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (_set("subject", {"reference": "Group/g1"}), "CarePlan.subject"),
        (_set("intent", "proposal"), "CarePlan.intent"),
        (_set("status", "entered-in-error"), "CarePlan.status"),
        (_set("status", None), "CarePlan.status"),
        (_set("identifier.0.value", "TC-56/CarePlan"), "CarePlan.identifier[0]"),
        (_set("period.end", "2026-01-01"), "CarePlan.period.end"),
        (_set("period", None), "CarePlan.period.start"),
        (_set(f"{MAINTENANCE_REPEAT}.periodUnit", "mo"), "CarePlan.activity[4].detail"),
        (_set(f"{MAINTENANCE_REPEAT}.frequency", 2), "CarePlan.activity[4].detail"),
        (_set(f"{REPEAT_1}.dayOfWeek", ["mon", "wed", "fri"]), "CarePlan.activity[1].detail"),
        (_set(f"{REPEAT_1}.frequency", 8), "CarePlan.activity[1].detail"),
        (_set(f"{REPEAT_1}.period", 1.5), "CarePlan.activity[1].detail"),
        (_set(f"{REPEAT_1}.durationUnit", "d"), "CarePlan.activity[1].detail"),
        (_set(f"{MAINTENANCE_REPEAT}.duration", 60), "CarePlan.activity[4].detail"),
        (_set(f"{WEEK_1}.scheduledTiming", None), "CarePlan.activity[1].detail"),
        (_set(f"{WEEK_1}.kind", "ServiceRequest"), "CarePlan.activity[1].detail.kind"),
        (
            _set(f"{WEEK_1}.productCodeableConcept.coding.0.code", "2201623"),
            "CarePlan.activity[1].detail.product",
        ),
        (_set("activity.0.detail", {"status": "completed"}), "CarePlan.activity[0]"),
        (
            _set("activity.0.reference", {"reference": "ServiceRequest/x"}),
            "CarePlan.activity[0].reference",
        ),
        (_set("activity", [{"progress": [{"text": "seen"}]}]), "CarePlan.activity[0]"),
        (_set("activity", None), "CarePlan.activity"),
        (_set("note", [{"text": "x" * 2001}]), "CarePlan.note[0].text"),
        (_set("title", "Ketamine infusion course: " + "x" * 201), "CarePlan.title"),
    ],
)
def test_what_a_course_cannot_hold_is_unsupported_with_its_path(change: Any, path: str) -> None:
    course = halfway_course()
    resource = care_plan(course, sessions=halfway_sessions(), context=CONTEXT)
    change(resource)
    with pytest.raises(UnsupportedContent) as caught:
        course_from_care_plan(resource, current=course, context=CONTEXT)
    assert caught.value.path.startswith(path), caught.value
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (_set("identifier", None), "CarePlan.identifier"),
        (_set("subject.identifier", None), "CarePlan.subject"),
        (_set("addresses", None), "CarePlan.addresses"),
        (_set("author", None), "CarePlan.author"),
        (_set("title", "Ketamine"), "CarePlan.title"),
    ],
)
def test_without_the_course_record_the_plan_must_name_its_records(change: Any, path: str) -> None:
    resource = care_plan(halfway_course(), sessions=[], context=CONTEXT)
    change(resource)
    with pytest.raises(UnsupportedContent) as caught:
        course_from_care_plan(resource, current=None, context=CONTEXT)
    assert caught.value.path == path


def test_the_plan_of_another_patient_is_refused() -> None:
    course = halfway_course()
    resource = care_plan(course, sessions=[], context=CONTEXT)
    resource["subject"]["identifier"]["value"] = "P-2002"
    with pytest.raises(UnsupportedContent) as caught:
        course_from_care_plan(resource, current=course, context=CONTEXT)
    assert caught.value.path == "CarePlan.subject"


def test_official_care_plan_examples_reverse_map_or_say_what_is_unsupported(
    r4_examples: Path,
) -> None:
    examples = [
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(r4_examples.glob("CarePlan-*.json"))
    ]
    assert len(examples) == 11
    unsupported: list[UnsupportedContent] = []
    for current in (None, halfway_course()):
        for example in examples:
            try:
                back = course_from_care_plan(
                    copy.deepcopy(example), current=current, context=CONTEXT
                )
            except UnsupportedContent as error:
                unsupported.append(error)
            else:
                assert isinstance(back, TreatmentCourse)
    assert all(error.path.startswith("CarePlan") and error.message for error in unsupported)


# ---------------------------------------------------------------------------------------------
# Any protocol round-trips

_TEXT = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Zs")) | st.just(" ")


@st.composite
def courses(draw: st.DrawFn) -> TreatmentCourse:
    start = draw(st.dates(min_value=date(2020, 1, 1), max_value=date(2030, 12, 31)))
    length = draw(st.none() | st.integers(min_value=0, max_value=400))
    protocol = Protocol(
        name=draw(st.text(_TEXT, min_size=1, max_size=40).filter(str.strip)),
        induction_weekly_sessions=draw(
            st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=6)
        ),
        maintenance_interval_weeks=draw(st.none() | st.integers(min_value=1, max_value=12)),
        dose_mg_per_kg=draw(st.sampled_from([0.05, 0.3, 0.5, 0.75, 1.0])),
        infusion_minutes=draw(st.integers(min_value=5, max_value=180)),
    )
    return TreatmentCourse(
        external_id="TC-1",
        patient="P-1",
        diagnosis="D-1",
        prescriber="C-1",
        protocol=protocol,
        start_date=start,
        end_date=None if length is None else start + timedelta(days=length),
        status=draw(st.sampled_from(list(CourseStatus))),
        notes=draw(st.lists(st.text(_TEXT, min_size=1, max_size=60).filter(str.strip), max_size=3)),
    )


@settings(max_examples=150, deadline=None)
@given(courses())
def test_any_protocol_round_trips(course: TreatmentCourse) -> None:
    resource = care_plan(course, sessions=[], context=CONTEXT)
    assert_valid_r4(resource)
    assert course_from_care_plan(resource, current=course, context=CONTEXT) == course
    # Without the record: the default dose (the standing order carries the dose), and a plan
    # with nothing begun reads as planned.
    alone = course_from_care_plan(resource, current=None, context=CONTEXT)
    default_dose = course.protocol.model_copy(update={"dose_mg_per_kg": Protocol().dose_mg_per_kg})
    status = CourseStatus.planned if course.status is CourseStatus.active else course.status
    assert alone == course.model_copy(update={"protocol": default_dose, "status": status})
