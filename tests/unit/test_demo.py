"""The synthetic demo clinic: deterministic, valid through the intake models, plausible."""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from service.records.demo import (
    EHR_IDENTIFIER_SYSTEM,
    distribute_total,
    generate_clinic,
    npi_check_digit,
    to_ndjson,
)
from service.records.models import (
    NOT_STARTED,
    PRESCRIBING_ROLES,
    RECORD_TYPES,
    AdverseEventKind,
    Assessment,
    AssessmentTiming,
    Clinician,
    ClinicianRole,
    Condition,
    CourseStatus,
    Diagnosis,
    InfusionSession,
    Instrument,
    Patient,
    RecordModel,
    SessionStatus,
    Severity,
    TreatmentCourse,
    VitalPhase,
    npi_is_valid,
    record_adapter,
)

# A Monday in the past (the models refuse future dates). The eight months before it hold a DST
# change both ways, Memorial Day, July 4th and Labor Day; the bookings after it, Thanksgiving.
AS_OF = date(2025, 11, 17)
NEW_YORK = ZoneInfo("America/New_York")
HOLIDAYS = {
    date(2025, 5, 26),  # Memorial Day
    date(2025, 7, 4),
    date(2025, 9, 1),  # Labor Day
    date(2025, 11, 27),  # Thanksgiving
    date(2025, 12, 25),
}
RATE_SEEDS = (1, 2, 3, 7)
"""Rates are checked over several clinics so one seed's luck does not decide the test."""


@functools.cache
def clinic(seed: int = 7, patients: int = 40) -> tuple[RecordModel, ...]:
    return tuple(generate_clinic(seed=seed, patients=patients, as_of=AS_OF))


class Clinic:
    """One generated clinic, indexed the way the checks need it."""

    def __init__(self, records: Sequence[RecordModel]) -> None:
        self.records = records
        self.clinicians = {r.external_id: r for r in records if isinstance(r, Clinician)}
        self.patients = {r.external_id: r for r in records if isinstance(r, Patient)}
        self.diagnoses = {r.external_id: r for r in records if isinstance(r, Diagnosis)}
        self.courses = {r.external_id: r for r in records if isinstance(r, TreatmentCourse)}
        self.sessions = [r for r in records if isinstance(r, InfusionSession)]
        self.assessments = [r for r in records if isinstance(r, Assessment)]
        by_course: dict[str, list[InfusionSession]] = defaultdict(list)
        for session in sorted(self.sessions, key=lambda s: s.scheduled_start):
            by_course[session.course].append(session)
        self.course_sessions = dict(by_course)

    def induction(self, course: TreatmentCourse) -> list[InfusionSession]:
        return self.course_sessions[course.external_id][: course.protocol.induction_sessions]

    def baseline_phq9(self, course: TreatmentCourse) -> int:
        [baseline] = [
            a.total
            for a in self.assessments
            if a.course == course.external_id
            and a.timing is AssessmentTiming.baseline
            and a.instrument is Instrument.phq9
        ]
        return baseline

    def completed(self) -> list[InfusionSession]:
        return [s for s in self.sessions if s.status is SessionStatus.completed]


@functools.cache
def indexed(seed: int = 7, patients: int = 40) -> Clinic:
    return Clinic(clinic(seed, patients))


def local(moment: datetime) -> datetime:
    return moment.astimezone(NEW_YORK)


def minutes_between(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds() / 60


def end_of_induction_outcomes(seeds: Sequence[int]) -> list[tuple[int, int]]:
    """(baseline, last induction PHQ-9) for every course whose induction is over."""
    outcomes = []
    for seed in seeds:
        data = indexed(seed)
        for course in data.courses.values():
            induction = data.induction(course)
            if (
                course.status is CourseStatus.stopped
                or induction[-1].scheduled_start.date() >= AS_OF
            ):
                continue
            scores = [
                a.total
                for session in induction
                for a in session.assessments
                if a.instrument is Instrument.phq9
            ]
            outcomes.append((data.baseline_phq9(course), scores[-1]))
    return outcomes


# -- determinism and purity -----------------------------------------------------------------


def test_same_arguments_give_identical_records() -> None:
    first = generate_clinic(seed=11, patients=12, as_of=AS_OF)
    second = generate_clinic(seed=11, patients=12, as_of=AS_OF)
    assert [r.model_dump(mode="json") for r in first] == [r.model_dump(mode="json") for r in second]
    assert list(to_ndjson(first)) == list(to_ndjson(second))


def test_different_seeds_give_different_clinics() -> None:
    first = [r.model_dump(mode="json") for r in clinic(7)]
    second = [r.model_dump(mode="json") for r in clinic(1)]
    assert first != second
    assert {p.name.family for p in indexed(7).patients.values()} != {
        p.name.family for p in indexed(1).patients.values()
    }


def test_the_global_random_generator_is_neither_used_nor_advanced() -> None:
    random.seed(1)
    state = random.getstate()
    first = generate_clinic(seed=3, patients=6, as_of=AS_OF)
    assert random.getstate() == state
    random.seed(2)
    second = generate_clinic(seed=3, patients=6, as_of=AS_OF)
    assert [r.model_dump() for r in first] == [r.model_dump() for r in second]


def test_as_of_moves_the_whole_clinic() -> None:
    later = generate_clinic(seed=7, patients=40, as_of=AS_OF + timedelta(days=28))
    starts = sorted(r.start_date for r in later if isinstance(r, TreatmentCourse))
    assert starts[-1] > AS_OF + timedelta(days=28)
    assert starts[0] > AS_OF - timedelta(days=260)


# -- validity -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [7, 1])
def test_every_record_round_trips_through_the_intake_adapter(seed: int) -> None:
    for record in clinic(seed):
        dumped = record.model_dump(mode="json", exclude_none=True)
        again = record_adapter.validate_python(json.loads(json.dumps(dumped)))
        assert type(again) is type(record)
        assert again.model_dump(mode="json", exclude_none=True) == dumped


def test_ndjson_export_is_one_importable_line_per_record() -> None:
    records = clinic()
    lines = list(to_ndjson(records))
    assert len(lines) == len(records)
    for line, record in zip(lines, records, strict=True):
        assert line.endswith(b"\n")
        assert line.count(b"\n") == 1
        assert json.loads(line) == record.model_dump(mode="json", exclude_none=True)
        assert record_adapter.validate_json(line) == record


def test_records_come_in_dependency_order() -> None:
    order = ["clinician", "patient", "diagnosis", "course", "session", "assessment"]
    assert set(order) == set(RECORD_TYPES)
    positions = [order.index(record.kind) for record in clinic()]
    assert positions == sorted(positions)


def test_external_ids_are_unique_and_in_the_clinic_formats() -> None:
    formats = {
        "clinician": r"C-\d{3}",
        "patient": r"P-\d{4}",
        "diagnosis": r"D-\d{4}",
        "course": r"TC-\d{4}",
        "session": r"S-\d{5}",
        "assessment": r"A-\d{5}",
    }
    seen = Counter((record.kind, record.external_id) for record in clinic())
    assert max(seen.values()) == 1
    for kind, external_id in seen:
        assert re.fullmatch(formats[kind], external_id), external_id


def test_session_ids_follow_the_clinic_calendar() -> None:
    sessions = indexed().sessions
    assert [s.external_id for s in sessions] == [
        s.external_id for s in sorted(sessions, key=lambda s: s.scheduled_start)
    ]


def test_references_resolve_to_generated_records_of_the_same_patient() -> None:
    data = indexed()
    for diagnosis in data.diagnoses.values():
        assert diagnosis.patient in data.patients
    for course in data.courses.values():
        assert course.patient in data.patients
        assert data.diagnoses[course.diagnosis].patient == course.patient
        prescriber = data.clinicians[course.prescriber]
        assert prescriber.role in {ClinicianRole.psychiatrist, ClinicianRole.anesthesiologist}
        assert data.diagnoses[course.diagnosis].recorded_on < course.start_date
    for session in data.sessions:
        assert session.course in data.courses
        if session.administered_by is not None:
            assert data.clinicians[session.administered_by].role is ClinicianRole.nurse
        if session.supervised_by is not None:
            assert data.clinicians[session.supervised_by].role in PRESCRIBING_ROLES
    for assessment in data.assessments:
        assert assessment.patient in data.patients
        assert assessment.course is not None
        assert data.courses[assessment.course].patient == assessment.patient


# -- people ---------------------------------------------------------------------------------


def test_staff_has_the_roles_a_clinic_needs_and_valid_npis() -> None:
    clinicians = indexed().clinicians.values()
    roles = Counter(c.role for c in clinicians)
    assert roles[ClinicianRole.psychiatrist] == 2
    assert roles[ClinicianRole.anesthesiologist] == 1
    assert roles[ClinicianRole.nurse_anesthetist] + roles[ClinicianRole.physician_assistant] == 1
    assert 3 <= roles[ClinicianRole.nurse] <= 4
    for clinician in clinicians:
        if clinician.role is not ClinicianRole.nurse:
            assert clinician.npi is not None
            assert npi_is_valid(clinician.npi)
    names = [(c.name.given[0], c.name.family) for c in clinicians]
    assert len(set(names)) == len(names)


def test_npi_check_digit_matches_the_published_example() -> None:
    assert npi_check_digit("123456789") == "3"  # CMS's example NPI is 1234567893
    for base in ("100000000", "198765432", "254310987"):
        assert npi_is_valid(base + npi_check_digit(base))
        wrong = str((int(npi_check_digit(base)) + 1) % 10)
        assert not npi_is_valid(base + wrong)


def test_patients_are_adults_of_mixed_sex_with_clinic_and_ehr_identifiers() -> None:
    patients = list(indexed().patients.values())
    assert len(patients) == 40
    ages = [(AS_OF - p.birth_date).days / 365.25 for p in patients]
    assert min(ages) > 18
    assert max(ages) < 76
    assert 30 < statistics.mean(ages) < 55
    sexes = Counter(p.sex.value for p in patients)
    assert sexes["female"] >= 5
    assert sexes["male"] >= 5
    pooled = Counter(p.sex.value for seed in RATE_SEEDS for p in indexed(seed).patients.values())
    assert 0.4 <= pooled["female"] / pooled.total() <= 0.7
    assert len({p.mrn for p in patients}) == 40
    for patient in patients:
        assert re.fullmatch(r"CLN-\d{6}", patient.mrn)
        [identifier] = patient.ehr_identifiers
        assert identifier.system == EHR_IDENTIFIER_SYSTEM
        assert re.fullmatch(r"E\d+", identifier.value)


def test_diagnoses_cover_every_indication_in_clinic_proportions() -> None:
    diagnoses = list(indexed().diagnoses.values())
    conditions = Counter(d.condition for d in diagnoses)
    assert set(conditions) == set(Condition)
    assert 0.35 <= conditions[Condition.mdd_recurrent] / len(diagnoses) <= 0.55
    assert conditions.most_common(1)[0][0] is Condition.mdd_recurrent
    depressive = [
        d
        for d in diagnoses
        if d.condition
        in {Condition.mdd_recurrent, Condition.mdd_single, Condition.bipolar_depression}
    ]
    assert sum(d.treatment_resistant for d in depressive) / len(depressive) >= 0.7
    for diagnosis in diagnoses:
        assert diagnosis.icd10 is not None
        assert diagnosis.recorded_on < AS_OF


# -- courses --------------------------------------------------------------------------------


def test_most_courses_use_the_default_protocol_and_some_another() -> None:
    courses = list(indexed().courses.values())
    default = [c for c in courses if c.protocol.name == "standard-iv"]
    for course in default:
        assert course.protocol.induction_weekly_sessions == [3, 2, 3]
        assert course.protocol.maintenance_interval_weeks == 4
        assert course.protocol.dose_mg_per_kg == 0.5
        assert course.protocol.infusion_minutes == 40
    share = 1 - len(default) / len(courses)
    assert 0.05 <= share <= 0.3
    pooled = [c.protocol for seed in RATE_SEEDS for c in indexed(seed).courses.values()]
    assert any(p.maintenance_interval_weeks is None for p in pooled)
    assert any(p.induction_weekly_sessions == [3, 3] for p in pooled)


def test_course_statuses_match_their_sessions() -> None:
    data = indexed()
    statuses = Counter(c.status for c in data.courses.values())
    assert statuses[CourseStatus.active] >= 10
    assert statuses[CourseStatus.completed] >= 3
    assert 1 <= statuses[CourseStatus.stopped] <= 2
    assert statuses[CourseStatus.planned] >= 1
    for course in data.courses.values():
        sessions = data.course_sessions[course.external_id]
        upcoming = [s for s in sessions if s.scheduled_start.date() >= AS_OF]
        assert sessions[0].scheduled_start.date() == course.start_date
        if course.status is CourseStatus.planned:
            assert course.start_date > AS_OF
            assert all(s.status is SessionStatus.scheduled for s in sessions)
        else:
            assert course.start_date < AS_OF
            assert course.start_date >= AS_OF - timedelta(days=250)
        if course.status in (CourseStatus.completed, CourseStatus.stopped):
            assert course.end_date is not None
            assert course.end_date < AS_OF
            assert all(s.scheduled_start.date() <= course.end_date for s in sessions)
        else:
            assert course.end_date is None
        if course.status in (CourseStatus.stopped, CourseStatus.on_hold):
            assert course.notes
            assert not upcoming
        if course.status is CourseStatus.active:
            assert upcoming, course.external_id


def test_stopped_and_completed_courses_are_explained_in_notes() -> None:
    courses = [c for seed in RATE_SEEDS for c in indexed(seed).courses.values()]
    for course in courses:
        if course.status is CourseStatus.stopped:
            assert course.notes[0].startswith("Discontinued")
    titrated = [c for c in courses if any("dose raised" in note for note in c.notes)]
    assert titrated


# -- sessions -------------------------------------------------------------------------------


def test_history_before_as_of_and_only_bookings_after() -> None:
    for session in indexed().sessions:
        if session.scheduled_start.date() < AS_OF:
            assert session.status is not SessionStatus.scheduled
        else:
            assert session.status is SessionStatus.scheduled
            assert session.model_dump(exclude_none=True, exclude={"route"}).keys() == {
                "kind",
                "external_id",
                "course",
                "scheduled_start",
                "status",
                "vitals",
                "assessments",
                "adverse_events",
            }
            assert not (session.vitals)
            assert not (session.assessments)
            assert not (session.adverse_events)


def test_sessions_keep_clinic_days_hours_and_time_zone() -> None:
    for session in indexed().sessions:
        start = session.scheduled_start
        assert start.utcoffset() == NEW_YORK.utcoffset(start.replace(tzinfo=None))
        assert start.weekday() < 5
        assert 8 <= start.hour < 15
        assert (start.month, start.day) not in {(1, 1), (7, 4), (12, 25)}
    offsets = {s.scheduled_start.utcoffset() for s in indexed().sessions}
    assert offsets == {timedelta(hours=-4), timedelta(hours=-5)}  # both sides of the DST change


def test_default_induction_follows_the_weekly_pattern() -> None:
    """Mon/Wed/Fri, Tue/Thu, Mon/Wed/Fri, unless a holiday moved a session to the next day."""
    data = indexed()
    courses = [
        c
        for c in data.courses.values()
        if c.protocol.induction_weekly_sessions == [3, 2, 3] and len(data.induction(c)) == 8
    ]
    assert len(courses) >= 20
    exact = 0
    for course in courses:
        monday = course.start_date - timedelta(days=course.start_date.weekday())
        expected = [monday + timedelta(days=offset) for offset in (0, 2, 4, 8, 10, 14, 16, 18)]
        actual = [s.scheduled_start.date() for s in data.induction(course)]
        if actual == expected:
            exact += 1
        else:
            assert HOLIDAYS & set(expected), (course.external_id, actual)
    assert exact / len(courses) >= 0.6


def test_maintenance_follows_the_protocol_interval() -> None:
    data = indexed()
    gaps = []
    for course in data.courses.values():
        interval = course.protocol.maintenance_interval_weeks
        sessions = data.course_sessions[course.external_id]
        maintenance = sessions[course.protocol.induction_sessions :]
        if interval is None or len(maintenance) < 2:
            continue
        for first, second in itertools.pairwise(maintenance):
            gaps.append(((second.scheduled_start - first.scheduled_start).days, interval))
    assert gaps
    for days, interval in gaps:
        assert interval * 7 - 6 <= days <= interval * 7 + 6


def test_session_outcomes_before_as_of_come_at_realistic_rates() -> None:
    past = [
        s for seed in RATE_SEEDS for s in indexed(seed).sessions if s.scheduled_start.date() < AS_OF
    ]
    statuses = Counter(s.status for s in past)
    assert statuses[SessionStatus.completed] / len(past) >= 0.88
    assert 0.01 <= statuses[SessionStatus.cancelled] / len(past) <= 0.06
    assert 0.005 <= statuses[SessionStatus.no_show] / len(past) <= 0.04
    assert 0.005 <= statuses[SessionStatus.stopped_early] / len(past) <= 0.045


def test_sessions_without_an_infusion_carry_only_what_happened() -> None:
    sessions = [s for seed in RATE_SEEDS for s in indexed(seed).sessions]
    cancelled = [s for s in sessions if s.status is SessionStatus.cancelled]
    assert any(s.vitals for s in cancelled)  # turned away for blood pressure
    for session in sessions:
        if session.status in NOT_STARTED - {SessionStatus.scheduled}:
            assert session.status_reason
            assert session.total_dose_mg is None
            assert session.product is None
            for vitals in session.vitals:
                assert vitals.phase is VitalPhase.pre
                assert vitals.systolic is not None
                assert vitals.systolic > 160


def test_completed_sessions_are_dosed_and_timed_like_the_protocol() -> None:
    data = indexed()
    for course in data.courses.values():
        protocol = course.protocol
        sessions = data.course_sessions[course.external_id]
        weights = [s.weight_kg for s in sessions if s.weight_kg is not None]
        if weights:
            assert max(weights) - min(weights) <= 2.0  # stable, +-1 kg
        for index, session in enumerate(sessions):
            if session.status is not SessionStatus.completed:
                continue
            assert session.started_at is not None
            assert session.ended_at is not None
            assert session.weight_kg is not None
            assert session.dose_mg_per_kg is not None
            assert 0 < minutes_between(session.scheduled_start, session.started_at) <= 15
            duration = minutes_between(session.started_at, session.ended_at)
            assert protocol.infusion_minutes <= duration <= protocol.infusion_minutes + 5
            if index < protocol.induction_sessions:
                assert session.dose_mg_per_kg == protocol.dose_mg_per_kg
            else:
                assert protocol.dose_mg_per_kg <= session.dose_mg_per_kg <= 0.75
            total = round(session.weight_kg * session.dose_mg_per_kg, 1)
            assert session.total_dose_mg == total
            assert session.rate_mg_per_hour == round(total / protocol.infusion_minutes * 60, 1)
            assert session.product is not None
            assert session.product.expires is not None
            assert session.product.concentration_mg_per_ml in (50, 100)
            assert session.product.lot is not None
            assert re.fullmatch(r"K\d{5}", session.product.lot)
            assert session.product.expires > session.started_at.date()
            assert session.site is not None


def test_titrated_doses_go_to_non_responders_after_induction() -> None:
    for seed in RATE_SEEDS:
        data = indexed(seed)
        for course in data.courses.values():
            sessions = data.course_sessions[course.external_id]
            raised = [
                s
                for s in sessions
                if s.dose_mg_per_kg is not None
                and s.dose_mg_per_kg > course.protocol.dose_mg_per_kg
            ]
            if not raised:
                continue
            assert all(s.dose_mg_per_kg in (0.6, 0.65, 0.7, 0.75) for s in raised)
            assert sessions.index(raised[0]) >= course.protocol.induction_sessions
            induction = data.induction(course)
            last = [
                a.total for s in induction for a in s.assessments if a.instrument is Instrument.phq9
            ]
            assert last[-1] > data.baseline_phq9(course) / 2


def test_stopped_early_sessions_gave_part_of_the_dose() -> None:
    stopped = [
        s
        for seed in RATE_SEEDS
        for s in indexed(seed).sessions
        if s.status is SessionStatus.stopped_early
    ]
    assert stopped
    for session in stopped:
        assert session.status_reason
        assert "stopped at minute" in session.status_reason
        assert session.weight_kg is not None
        assert session.dose_mg_per_kg is not None
        assert session.total_dose_mg is not None
        assert session.total_dose_mg < session.weight_kg * session.dose_mg_per_kg
        assert any(e.action.value == "stopped" for e in session.adverse_events)


# -- vitals ---------------------------------------------------------------------------------


def test_vitals_are_taken_before_every_10_to_15_minutes_during_and_after() -> None:
    for session in indexed().completed():
        assert session.started_at is not None
        assert session.ended_at is not None
        phases = [v.phase for v in session.vitals]
        assert phases[0] is VitalPhase.pre
        assert phases[-1] is VitalPhase.post
        assert phases.count(VitalPhase.pre) == 1
        assert phases.count(VitalPhase.post) == 1
        pre, *during, post = session.vitals
        assert 0 < minutes_between(pre.taken_at, session.started_at) <= 10
        assert 15 <= minutes_between(session.ended_at, post.taken_at) <= 30
        assert len(during) >= 3
        marks = [minutes_between(session.started_at, v.taken_at) for v in during]
        assert 8 <= marks[0] <= 12
        assert all(10 <= b - a <= 15 for a, b in itertools.pairwise(marks))
        for vitals in session.vitals:
            assert vitals.systolic is not None
            assert vitals.diastolic is not None
            assert vitals.diastolic < vitals.systolic
            assert vitals.spo2 is not None
            assert 95 <= vitals.spo2 <= 100
            assert vitals.resp_rate is not None
            assert 12 <= vitals.resp_rate <= 18


def test_blood_pressure_rises_during_the_infusion_and_peaks_near_minute_40() -> None:
    peak_minutes, rises, diastolic_rises = [], [], []
    for session in indexed().completed():
        assert session.started_at is not None
        pre, *during, post = session.vitals
        top = max(during, key=lambda v: v.systolic or 0)
        peak_minutes.append(minutes_between(session.started_at, top.taken_at))
        assert top.systolic is not None
        assert pre.systolic is not None
        assert top.diastolic is not None
        assert pre.diastolic is not None
        rises.append(top.systolic - pre.systolic)
        diastolic_rises.append(top.diastolic - pre.diastolic)
        assert post.systolic is not None
        assert post.systolic < top.systolic
    assert statistics.mean(peak_minutes) >= 30
    assert 10 <= statistics.mean(rises) <= 30
    assert 4 <= statistics.mean(diastolic_rises) <= 18


def test_hypertension_is_charted_exactly_when_systolic_passed_160() -> None:
    for seed in RATE_SEEDS:
        for session in indexed(seed).sessions:
            if session.status in NOT_STARTED:
                continue
            during = [v.systolic or 0 for v in session.vitals if v.phase is VitalPhase.during]
            charted = any(e.kind is AdverseEventKind.hypertension for e in session.adverse_events)
            assert charted == (max(during) > 160), session.external_id


# -- scores ---------------------------------------------------------------------------------


def test_phq9_response_and_remission_rates_are_realistic() -> None:
    for seeds in ((7,), RATE_SEEDS):
        outcomes = end_of_induction_outcomes(seeds)
        assert len(outcomes) >= 25
        response = sum(last <= baseline / 2 for baseline, last in outcomes) / len(outcomes)
        remission = sum(last < 5 for _, last in outcomes) / len(outcomes)
        assert 0.55 <= response <= 0.85
        assert response < 1
        assert 0.2 <= remission <= 0.45


def test_phq9_falls_mostly_monotonically_through_induction() -> None:
    data = indexed()
    rises = steps = 0
    for course in data.courses.values():
        scores = [
            a.total
            for s in data.induction(course)
            for a in s.assessments
            if a.instrument is Instrument.phq9
        ]
        baseline = data.baseline_phq9(course) if scores else 0
        assert all(score <= baseline + 3 for score in scores)
        for before, after in itertools.pairwise(scores):
            steps += 1
            rises += after > before + 2
    assert steps
    assert rises / steps < 0.05


def test_baselines_precede_the_course_and_follow_ups_come_later() -> None:
    data = indexed()
    for assessment in data.assessments:
        course = data.courses[assessment.course or ""]
        day = local(assessment.administered_at).date()
        assert day < AS_OF
        if assessment.timing is AssessmentTiming.baseline:
            assert course.start_date - timedelta(days=14) <= day < course.start_date
            if assessment.instrument is Instrument.phq9:
                diagnosis = data.diagnoses[course.diagnosis]
                if diagnosis.condition in {Condition.mdd_recurrent, Condition.mdd_single}:
                    assert 15 <= assessment.total <= 25
        else:
            assert assessment.timing is AssessmentTiming.follow_up
            assert day > course.start_date
    timings = Counter(a.timing for a in data.assessments)
    assert timings[AssessmentTiming.baseline] >= 37
    assert timings[AssessmentTiming.follow_up] >= 40


def test_in_session_instruments_fit_the_indication() -> None:
    data = indexed()
    for course in data.courses.values():
        condition = data.diagnoses[course.diagnosis].condition
        given = [s for s in data.course_sessions[course.external_id] if s.status not in NOT_STARTED]
        for index, session in enumerate(given):
            instruments = {a.instrument: a for a in session.assessments}
            assert instruments[Instrument.phq9].timing is AssessmentTiming.pre_infusion
            if condition in {Condition.gad, Condition.panic_disorder, Condition.ptsd}:
                assert Instrument.gad7 in instruments
            if condition is not Condition.ptsd:
                assert Instrument.pcl5 not in instruments
            if index < 3:
                assert instruments[Instrument.cadss].timing is AssessmentTiming.post_infusion
            else:
                assert Instrument.cadss not in instruments
        if condition is Condition.ptsd and len(given) >= 8:
            assert any(a.instrument is Instrument.pcl5 for s in given for a in s.assessments)


def test_dissociation_scores_are_highest_at_the_first_infusion() -> None:
    by_position: dict[int, list[int]] = defaultdict(list)
    for seed in RATE_SEEDS:
        data = indexed(seed)
        for sessions in data.course_sessions.values():
            given = [s for s in sessions if s.status not in NOT_STARTED]
            for index, session in enumerate(given[:3]):
                by_position[index].extend(
                    a.total for a in session.assessments if a.instrument is Instrument.cadss
                )
    means = [statistics.mean(by_position[index]) for index in range(3)]
    assert means[0] > means[1] > means[2]
    assert 8 <= means[0] <= 35


def test_distribute_total_spreads_a_total_within_item_ranges() -> None:
    rng = random.Random(0)
    for total in (0, 1, 13, 27):
        items = distribute_total(rng, total, [1.0] * 9, 3)
        assert sum(items) == total
        assert all(0 <= item <= 3 for item in items)
    assert distribute_total(rng, 92, [1.0] * 23, 4) == [4] * 23


# -- adverse events -------------------------------------------------------------------------

EVENT_BANDS = {
    AdverseEventKind.dissociation: (0.18, 0.38),
    AdverseEventKind.hypertension: (0.025, 0.08),
    AdverseEventKind.nausea: (0.04, 0.13),
    AdverseEventKind.vomiting: (0.005, 0.04),
    AdverseEventKind.dizziness: (0.04, 0.13),
    AdverseEventKind.sedation: (0.02, 0.09),
    AdverseEventKind.headache: (0.015, 0.08),
    AdverseEventKind.anxiety: (0.008, 0.06),
}


@pytest.mark.parametrize(("kind", "band"), EVENT_BANDS.items(), ids=lambda v: str(v))
def test_adverse_events_occur_at_published_rates(
    kind: AdverseEventKind, band: tuple[float, float]
) -> None:
    completed = [s for seed in RATE_SEEDS for s in indexed(seed).completed()]
    with_kind = sum(any(e.kind is kind for e in s.adverse_events) for s in completed)
    low, high = band
    assert low <= with_kind / len(completed) <= high


def test_adverse_events_are_mostly_mild_transient_and_never_serious() -> None:
    sessions = [s for seed in RATE_SEEDS for s in indexed(seed).sessions]
    events = [(s, e) for s in sessions for e in s.adverse_events]
    severities = Counter(e.severity for _, e in events)
    assert severities[Severity.mild] / len(events) >= 0.7
    assert severities[Severity.severe] / len(events) <= 0.02
    assert not any(e.serious for _, e in events)
    for session, event in events:
        assert session.started_at is not None
        assert session.ended_at is not None
        assert event.resolved_at is not None
        assert event.resolved_at > event.onset_at
        assert event.onset_at <= session.ended_at + timedelta(minutes=30)
        assert minutes_between(event.onset_at, event.resolved_at) <= 150
        if event.kind is AdverseEventKind.dissociation:
            assert minutes_between(event.onset_at, event.resolved_at) <= 65
    onsets = [[e.onset_at for e in s.adverse_events] for s in sessions]
    assert all(times == sorted(times) for times in onsets)


# -- sizes and speed ------------------------------------------------------------------------


def test_forty_patients_make_several_hundred_sessions() -> None:
    data = indexed()
    assert len(data.patients) == len(data.diagnoses) == len(data.courses) == 40
    assert 250 <= len(data.sessions) <= 700
    assert len(data.completed()) >= 200


def test_a_small_clinic_still_works() -> None:
    records = generate_clinic(seed=7, patients=5, as_of=AS_OF)
    small = Clinic(records)
    assert len(small.patients) == len(small.courses) == 5
    assert small.sessions
    assert small.assessments
    for record in records:
        record_adapter.validate_json(record.model_dump_json())


def test_zero_patients_is_staff_only_and_negative_is_refused() -> None:
    records = generate_clinic(seed=7, patients=0, as_of=AS_OF)
    assert records
    assert all(isinstance(r, Clinician) for r in records)
    with pytest.raises(ValueError, match="patients"):
        generate_clinic(seed=7, patients=-1, as_of=AS_OF)


def test_today_works_as_the_cli_uses_it() -> None:
    today = date.today()
    records = generate_clinic(seed=5, patients=10, as_of=today)
    for record in records:
        if isinstance(record, Assessment):
            assert local(record.administered_at).date() < today


def test_generation_is_fast() -> None:
    began = time.perf_counter()
    generate_clinic(seed=99, patients=40, as_of=AS_OF)
    assert time.perf_counter() - began < 3.0
