"""A synthetic ketamine infusion clinic: seeded, realistic intake records for demos and tests.

`generate_clinic` invents one clinic's staff, patients, diagnoses, treatment courses, infusion
sessions (with vitals, in-session scores and adverse events) and standalone assessments, in the
shape a clinician expects to read: induction series on the usual weekdays, blood pressure that
peaks near minute 40, PHQ-9 trajectories with responders and non-responders, side effects at
published rates. `to_ndjson` serialises records for `infusion-bridge demo --export`.

This module is pure: it uses the standard library and the record models only. Randomness comes
from `random.Random(seed)` and time from the `as_of` argument (never the clock), so the same
seed, patient count and `as_of` always give the same records. Everything before `as_of` is
history; sessions on or after it are still scheduled. Every record is built through the models,
so it passes the same validation as clinic input (which compares some dates with today, so
`as_of` must not be in the future).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Final, Literal, TypeVar
from zoneinfo import ZoneInfo

from service.records.models import (
    INSTRUMENT_ITEMS,
    AdverseEvent,
    AdverseEventAction,
    AdverseEventKind,
    Assessment,
    AssessmentTiming,
    Clinician,
    ClinicianRole,
    Condition,
    CourseStatus,
    Diagnosis,
    DiagnosisStatus,
    HumanName,
    Identifier,
    InfusionSession,
    InfusionSite,
    Instrument,
    Patient,
    Product,
    Protocol,
    RecordModel,
    SessionAssessment,
    SessionStatus,
    Severity,
    Sex,
    TreatmentCourse,
    VitalPhase,
    Vitals,
)

__all__ = [
    "CLINIC_TZ",
    "EHR_IDENTIFIER_SYSTEM",
    "distribute_total",
    "generate_clinic",
    "npi_check_digit",
    "to_ndjson",
]

T = TypeVar("T")
Numbered = TypeVar("Numbered", InfusionSession, Assessment)

CLINIC_TZ: Final = ZoneInfo("America/New_York")
"""The demo clinic's time zone; zoneinfo gives DST-correct offsets (-05:00 / -04:00)."""

EHR_IDENTIFIER_SYSTEM: Final = "urn:oid:2.16.840.1.113883.3.9999.1"

HISTORY_DAYS: Final = 240
"""Courses started within about eight months before `as_of`."""

CLINIC_SLOTS: Final = tuple(time(hour, minute) for hour in range(8, 15) for minute in (0, 30))
"""Scheduled starts 08:00-14:30, so recovery and post-infusion vitals end by 16:00."""

WEEK_PATTERNS: Final[dict[int, tuple[int, ...]]] = {
    1: (2,),
    2: (1, 3),
    3: (0, 2, 4),
    4: (0, 1, 3, 4),
    5: (0, 1, 2, 3, 4),
    6: (0, 1, 2, 3, 4, 5),
    7: (0, 1, 2, 3, 4, 5, 6),
}
"""Weekdays (Monday = 0) of an induction week with that many infusions: 3 is Mon/Wed/Fri."""

STANDARD_PROTOCOL: Final = Protocol()
ALTERNATIVE_PROTOCOLS: Final = (
    Protocol(
        name="rapid-6x2wk",
        induction_weekly_sessions=[3, 3],
        maintenance_interval_weeks=3,
        dose_mg_per_kg=0.5,
        infusion_minutes=40,
    ),
    Protocol(
        name="induction-only-6x3wk",
        induction_weekly_sessions=[2, 2, 2],
        maintenance_interval_weeks=None,
        dose_mg_per_kg=0.5,
        infusion_minutes=45,
    ),
)
ALTERNATIVE_PROTOCOL_SHARE: Final = 0.15

CONDITION_SHARES: Final[dict[Condition, float]] = {
    Condition.mdd_recurrent: 0.45,
    Condition.mdd_single: 0.10,
    Condition.ptsd: 0.14,
    Condition.gad: 0.10,
    Condition.bipolar_depression: 0.08,
    Condition.panic_disorder: 0.07,
    Condition.phobia: 0.06,
}

# Codes within models.ICD10_FAMILIES. F31.5 (depressed with psychotic features) is left out on
# purpose: active psychosis is a contraindication to ketamine, so a clinic would not treat it.
ICD10_CODES: Final[dict[Condition, tuple[tuple[str, float], ...]]] = {
    Condition.mdd_recurrent: (("F33.1", 0.45), ("F33.2", 0.55)),
    Condition.mdd_single: (("F32.1", 0.35), ("F32.2", 0.65)),
    Condition.ptsd: (("F43.10", 0.35), ("F43.12", 0.65)),
    Condition.gad: (("F41.1", 1.0),),
    Condition.bipolar_depression: (
        ("F31.30", 0.15),
        ("F31.32", 0.30),
        ("F31.4", 0.30),
        ("F31.81", 0.25),
    ),
    Condition.panic_disorder: (("F41.0", 1.0),),
    Condition.phobia: (("F40.10", 0.45), ("F40.11", 0.30), ("F40.00", 0.25)),
}

DEPRESSIVE: Final = frozenset(
    {Condition.mdd_recurrent, Condition.mdd_single, Condition.bipolar_depression}
)
ANXIETY: Final = frozenset(
    {Condition.gad, Condition.panic_disorder, Condition.ptsd, Condition.phobia}
)

Outcome = Literal["remission", "response", "none"]
OUTCOME_SHARES: Final[dict[Outcome, float]] = {"remission": 0.33, "response": 0.35, "none": 0.32}
"""End-of-induction PHQ-9 outcome: about two thirds respond, a third remit."""

# Session outcomes before as_of, per scheduled infusion.
CANCEL_RATE: Final = 0.03
NO_SHOW_RATE: Final = 0.02
STOPPED_EARLY_RATE: Final = 0.02

# Adverse events per infusion given; dissociation is drawn separately (it fades with repetition).
EVENT_RATES: Final[dict[AdverseEventKind, float]] = {
    AdverseEventKind.hypertension: 0.05,
    AdverseEventKind.nausea: 0.08,
    AdverseEventKind.dizziness: 0.08,
    AdverseEventKind.sedation: 0.05,
    AdverseEventKind.headache: 0.04,
    AdverseEventKind.anxiety: 0.03,
}
VOMITING_GIVEN_NAUSEA: Final = 0.25
"""Vomiting follows nausea: 8% x 0.25 gives the ~2% reported for IV ketamine."""

SPO2_DURING: Final = ((95, 0.1), (96, 0.15), (97, 0.25), (98, 0.25), (99, 0.15), (100, 0.1))

HYPERTENSION_SYSTOLIC: Final = 160
"""Systolic above this is charted as a hypertension adverse event (and cancels a session pre)."""

PHQ9_WEIGHTS: Final = (1.3, 1.3, 1.1, 1.3, 0.9, 1.0, 1.0, 0.6, 0.2)
"""Relative item loadings: anhedonia, mood and fatigue carry most; item 9 (self-harm) least."""
GAD7_WEIGHTS: Final = (1.2, 1.1, 1.2, 1.0, 0.8, 1.0, 0.9)

FEMALE_GIVEN: Final = (
    "Ana", "Maya", "Priya", "Grace", "Elena", "Naomi", "Rosa", "Hannah", "Leila", "Claire",
    "Imani", "Sofia", "Megan", "Keiko", "Fatima", "Lauren", "Bianca", "Tessa", "Olivia", "Renee",
    "Daniela", "Amara", "Joanna", "Mei", "Caroline", "Nadia", "Brooke", "Ingrid", "Yesenia",
    "Hope",
)  # fmt: skip
MALE_GIVEN: Final = (
    "Rui", "Marcus", "Daniel", "Tomas", "Kevin", "Andre", "Samuel", "Omar", "Ethan", "Luis",
    "Jamal", "Peter", "Hiroshi", "Caleb", "Victor", "Nathan", "Diego", "Graham", "Ravi", "Connor",
    "Malik", "Stefan", "Julian", "Wesley", "Arjun", "Felix", "Trevor", "Emeka", "Paul", "Isaac",
)  # fmt: skip
NEUTRAL_GIVEN: Final = (
    "Alex", "Jordan", "Taylor", "Casey", "Riley", "Sam", "Morgan", "Avery", "Quinn", "Rowan",
)  # fmt: skip
FAMILY_NAMES: Final = (
    "Silva", "Costa", "Reis", "Nguyen", "Okafor", "Hernandez", "Patel", "Kowalski", "Brennan",
    "Larsen", "Yamamoto", "Haddad", "Fischer", "Moreau", "Lindqvist", "Adeyemi", "Castillo",
    "Goldberg", "O'Connell", "Ramirez", "Sato", "Mendoza", "Whitaker", "Novak", "Abernathy",
    "Chen", "Delgado", "Ibrahim", "Kaur", "Marsh", "Petrov", "Quintero", "Romano", "Sorensen",
    "Tran", "Vasquez", "Webb", "Zimmerman", "Baptiste", "Holloway",
)  # fmt: skip

SITES: Final = (
    (InfusionSite.left_antecubital, 0.22),
    (InfusionSite.right_antecubital, 0.18),
    (InfusionSite.left_forearm, 0.22),
    (InfusionSite.right_forearm, 0.18),
    (InfusionSite.left_hand, 0.11),
    (InfusionSite.right_hand, 0.09),
)

CANCEL_REASONS: Final = (
    "Cancelled by the patient: upper respiratory infection.",
    "Cancelled: no driver available to take the patient home after the infusion.",
    "Cancelled: patient had eaten within 4 hours of the infusion (fasting required).",
)
BP_CANCEL_REASON: Final = (
    "Pre-infusion blood pressure {systolic}/{diastolic} mmHg on recheck, above the clinic's "
    "160/100 limit; infusion not given, patient advised to see primary care."
)
NO_SHOW_REASON: Final = "Patient did not arrive and could not be reached by phone."

STOP_REASONS: Final = (
    "Discontinued at the patient's request after {count} infusions: found the dissociative "
    "effects too distressing.",
    "Discontinued after {count} infusions: patient relocated out of state; records sent to the "
    "new provider.",
    "Discontinued after {count} infusions: self-pay cost; patient will pursue esketamine "
    "through insurance.",
)
HOLD_REASONS: Final = (
    "On hold from {day}: elective knee surgery; resume after post-operative clearance.",
    "On hold from {day}: travelling abroad for work for two months.",
    "On hold from {day}: blood pressure above target; primary care adjusting medication.",
)

EVENT_DESCRIPTIONS: Final[dict[AdverseEventKind, tuple[str, ...]]] = {
    AdverseEventKind.dissociation: (
        "Felt detached from body; mild perceptual changes.",
        "Floating sensation and time distortion.",
        "Visual distortions and derealization; settled with reassurance.",
    ),
    AdverseEventKind.hypertension: ("Systolic {systolic} mmHg at minute {minute}.",),
    AdverseEventKind.nausea: ("Nausea late in the infusion.", "Queasy on sitting up."),
    AdverseEventKind.vomiting: ("Vomited once during recovery.",),
    AdverseEventKind.dizziness: ("Lightheaded on standing after the infusion.",),
    AdverseEventKind.sedation: ("Drowsy, rousable to voice.",),
    AdverseEventKind.headache: ("Frontal headache after the infusion.",),
    AdverseEventKind.anxiety: ("Anxious at the onset of dissociative effects.",),
}
MEDICATIONS: Final[dict[AdverseEventKind, str]] = {
    AdverseEventKind.nausea: "ondansetron 4 mg IV given",
    AdverseEventKind.vomiting: "ondansetron 4 mg IV given",
    AdverseEventKind.headache: "acetaminophen 1 g PO given",
    AdverseEventKind.anxiety: "midazolam 1 mg IV given",
    AdverseEventKind.hypertension: "labetalol 5 mg IV given",
}


# ---------------------------------------------------------------------------------------------
# Small helpers


def _weighted(rng: random.Random, options: Sequence[tuple[T, float]]) -> T:
    values = [value for value, _ in options]
    weights = [weight for _, weight in options]
    return rng.choices(values, weights=weights)[0]


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _minutes(count: float) -> timedelta:
    return timedelta(minutes=count)


def _at(day: date, clock: time) -> datetime:
    """A local clinic time; zoneinfo picks the offset in force on that day."""
    return datetime.combine(day, clock, tzinfo=CLINIC_TZ)


def _month_end(day: date) -> date:
    first_of_next = (day.replace(day=28) + timedelta(days=4)).replace(day=1)
    return first_of_next - timedelta(days=1)


def _is_clinic_holiday(day: date) -> bool:
    """US holidays the clinic closes on, so no infusion lands on Christmas or Thanksgiving."""
    if (day.month, day.day) in {(1, 1), (7, 4), (12, 25)}:
        return True
    memorial_day = day.month == 5 and day.weekday() == 0 and day.day > 24
    labor_day = day.month == 9 and day.weekday() == 0 and day.day <= 7
    thanksgiving = day.month == 11 and day.weekday() == 3 and 22 <= day.day <= 28
    return memorial_day or labor_day or thanksgiving


def _open_day(day: date, taken: set[date] | None = None) -> date:
    """The first clinic day on or after `day` that is not already booked for this patient."""
    while day.weekday() >= 5 or _is_clinic_holiday(day) or (taken is not None and day in taken):
        day += timedelta(days=1)
    return day


def _open_day_before(day: date) -> date:
    while day.weekday() >= 5 or _is_clinic_holiday(day):
        day -= timedelta(days=1)
    return day


def npi_check_digit(base: str) -> str:
    """The NPI check digit for a 9-digit base: Luhn over the base prefixed with 80840.

    The check digit will sit rightmost, so doubling starts at the payload's last digit.
    """
    total = 0
    for position, char in enumerate(reversed("80840" + base)):
        digit = int(char)
        if position % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return str((10 - total % 10) % 10)


def distribute_total(
    rng: random.Random, total: int, weights: Sequence[float], highest: int
) -> list[int]:
    """Item scores summing to `total`, each 0..highest, loaded by the items' relative weights."""
    items = [0] * len(weights)
    for _ in range(_clamp(total, 0, len(weights) * highest)):
        open_items = [index for index, score in enumerate(items) if score < highest]
        index = rng.choices(open_items, weights=[weights[i] for i in open_items])[0]
        items[index] += 1
    return items


def _item_weights(instrument: Instrument) -> Sequence[float]:
    if instrument is Instrument.phq9:
        return PHQ9_WEIGHTS
    if instrument is Instrument.gad7:
        return GAD7_WEIGHTS
    return (1.0,) * INSTRUMENT_ITEMS[instrument][0]


def _items_for(rng: random.Random, instrument: Instrument, total: int) -> list[int]:
    count, highest = INSTRUMENT_ITEMS[instrument]
    return distribute_total(rng, min(total, count * highest), _item_weights(instrument), highest)


# ---------------------------------------------------------------------------------------------
# Staff


class _NamePicker:
    """Draws plausible, unique full names from mixed pools (invented, not real people)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[tuple[str, str]] = set()

    def pick(self, sex: Sex) -> HumanName:
        pool = {Sex.female: FEMALE_GIVEN, Sex.male: MALE_GIVEN}.get(
            sex, FEMALE_GIVEN + MALE_GIVEN + NEUTRAL_GIVEN
        )
        while True:
            given, family = self._rng.choice(pool), self._rng.choice(FAMILY_NAMES)
            if (given, family) not in self._used:
                break
        self._used.add((given, family))
        names = [given]
        if self._rng.random() < 0.25:  # some records carry a middle name
            middle = self._rng.choice([name for name in pool if name != given])
            names.append(middle)
        return HumanName(given=names, family=family)


@dataclass(frozen=True)
class _Staff:
    clinicians: tuple[Clinician, ...]

    def with_roles(self, *roles: ClinicianRole) -> list[Clinician]:
        return [clinician for clinician in self.clinicians if clinician.role in roles]

    @property
    def prescribers(self) -> list[Clinician]:
        return self.with_roles(ClinicianRole.psychiatrist, ClinicianRole.anesthesiologist)

    @property
    def supervisors(self) -> list[Clinician]:
        return self.with_roles(
            ClinicianRole.psychiatrist,
            ClinicianRole.anesthesiologist,
            ClinicianRole.nurse_anesthetist,
            ClinicianRole.physician_assistant,
        )

    @property
    def nurses(self) -> list[Clinician]:
        return self.with_roles(ClinicianRole.nurse)


def _make_npi(rng: random.Random) -> str:
    base = "1" + "".join(str(rng.randint(0, 9)) for _ in range(8))  # issued NPIs start with 1/2
    return base + npi_check_digit(base)


def _make_staff(rng: random.Random, names: _NamePicker) -> _Staff:
    roles = [ClinicianRole.psychiatrist, ClinicianRole.psychiatrist, ClinicianRole.anesthesiologist]
    roles.append(rng.choice([ClinicianRole.nurse_anesthetist, ClinicianRole.physician_assistant]))
    roles.extend([ClinicianRole.nurse] * rng.randint(3, 4))
    clinicians = []
    for number, role in enumerate(roles, start=1):
        # Prescribers and supervisors bill under their own NPI; the nurses are left without.
        npi = None if role is ClinicianRole.nurse else _make_npi(rng)
        sex = rng.choice([Sex.female, Sex.male])
        clinicians.append(
            Clinician(external_id=f"C-{number:03d}", npi=npi, name=names.pick(sex), role=role)
        )
    return _Staff(tuple(clinicians))


# ---------------------------------------------------------------------------------------------
# Ketamine stock


@dataclass(frozen=True)
class _Lot:
    number: str
    first_use: date
    expires: date


class _Pharmacy:
    """The clinic's ketamine lots over time: a new lot every 5-10 weeks per concentration."""

    def __init__(self, rng: random.Random, as_of: date) -> None:
        self._lots: dict[int, list[_Lot]] = {}
        numbers: set[str] = set()
        for concentration in (50, 100):
            series: list[_Lot] = []
            day = as_of - timedelta(days=HISTORY_DAYS + 90)
            while day <= as_of + timedelta(days=180):
                number = f"K{rng.randint(10000, 99999)}"
                if number in numbers:
                    continue
                numbers.add(number)
                # Shelf life of one to two years, so a lot never expires while it is in use.
                expires = _month_end(day + timedelta(days=rng.randint(330, 720)))
                series.append(_Lot(number, day, expires))
                day += timedelta(days=rng.randint(35, 70))
            self._lots[concentration] = series

    def product(self, rng: random.Random, day: date) -> Product:
        concentration = _weighted(rng, ((50, 0.7), (100, 0.3)))
        lot = [lot for lot in self._lots[concentration] if lot.first_use <= day][-1]
        return Product(concentration_mg_per_ml=concentration, lot=lot.number, expires=lot.expires)


# ---------------------------------------------------------------------------------------------
# Patients and their trajectories


@dataclass(frozen=True)
class _Body:
    """A patient's stable physiology: weight and resting vital signs."""

    weight_kg: float
    systolic: int
    diastolic: int
    heart_rate: int
    resp_rate: int


def _make_body(rng: random.Random, sex: Sex) -> _Body:
    mean, low, high = {Sex.female: (74.0, 48, 120), Sex.male: (88.0, 58, 135)}.get(
        sex, (80.0, 50, 125)
    )
    weight = min(high, max(low, rng.gauss(mean, 14.0)))
    systolic = rng.randint(110, 135)
    return _Body(
        weight_kg=round(weight, 1),
        systolic=systolic,
        diastolic=min(rng.randint(68, 86), systolic - 32),
        heart_rate=rng.randint(60, 86),
        resp_rate=rng.randint(12, 17),
    )


@dataclass(frozen=True)
class _Trajectory:
    """A score falling from baseline towards a target as infusions accumulate.

    Once induction is nearly over (`settle_at` infusions) the score stays inside `settled`,
    which is how a designated responder, remitter or non-responder stays one.
    """

    instrument: Instrument
    baseline: int
    target: int
    tau: float
    settle_at: int
    settled: tuple[int, int]
    noise: float

    def score(self, rng: random.Random, received: int, waning: int = 0) -> int:
        drop = (self.baseline - self.target) * (1.0 - math.exp(-received / self.tau))
        value = round(self.baseline - drop + waning + rng.gauss(0.0, self.noise))
        low, high = self.settled if received >= self.settle_at else (0, self.baseline + 2)
        count, highest = INSTRUMENT_ITEMS[self.instrument]
        return _clamp(value, max(0, low), min(high, count * highest))


def _phq9_trajectory(
    rng: random.Random, condition: Condition, outcome: Outcome, induction: int
) -> _Trajectory:
    # Patients treated for an anxiety indication usually carry milder comorbid depression.
    baseline = rng.randint(15, 25) if condition in DEPRESSIVE else rng.randint(12, 22)
    half = baseline // 2  # a score at or below half the baseline is a response
    if outcome == "remission":
        target, settled = rng.randint(1, 4), (0, 4)
    elif outcome == "response":
        target, settled = rng.randint(5, half), (5, half)
    else:
        target = rng.randint(math.ceil(baseline * 0.6), baseline - 1)
        settled = (half + 1, baseline + 1)
    return _Trajectory(
        Instrument.phq9,
        baseline,
        target,
        tau=max(1.0, (induction - 1) / 4),
        settle_at=max(1, induction - 3),
        settled=settled,
        noise=1.0,
    )


def _companion_trajectory(
    rng: random.Random, instrument: Instrument, baseline: int, phq9: _Trajectory
) -> _Trajectory:
    """GAD-7 or PCL-5 improving roughly in step with the PHQ-9."""
    ratio = phq9.target / phq9.baseline
    target = _clamp(round(baseline * ratio + rng.gauss(0.0, 1.5)), 0, baseline)
    noise = 1.0 if instrument is Instrument.gad7 else 3.0
    count, highest = INSTRUMENT_ITEMS[instrument]
    return _Trajectory(
        instrument, baseline, target, phq9.tau, phq9.settle_at, (0, count * highest), noise
    )


# ---------------------------------------------------------------------------------------------
# Course plans

Fate = Literal["planned", "normal", "stopped", "on_hold"]


@dataclass
class _Plan:
    """What will happen to one patient's course, decided before any session is simulated."""

    condition: Condition
    protocol: Protocol
    outcome: Outcome
    first_week: date  # Monday of the first induction week
    fate: Fate = "normal"


def _quota_mix(
    rng: random.Random, shares: Mapping[T, float], count: int, *, each_once: bool = False
) -> list[T]:
    """`count` values in the given shares (largest remainder), shuffled.

    Quotas rather than independent draws keep a 40-patient clinic's mix close to the shares,
    so the demo does not come out with half its patients non-responders by chance.
    """
    quotas = {value: share * count for value, share in shares.items()}
    counts = {value: int(quota) for value, quota in quotas.items()}
    by_remainder = sorted(quotas, key=lambda value: quotas[value] - counts[value], reverse=True)
    for value in by_remainder[: count - sum(counts.values())]:
        counts[value] += 1
    if each_once and count >= len(counts):
        for value in counts:
            if counts[value] == 0:
                counts[max(counts, key=lambda other: counts[other])] -= 1
                counts[value] = 1
    mix = [value for value, times in counts.items() for _ in range(times)]
    rng.shuffle(mix)
    return mix


def _week_monday(day: date) -> date:
    return day - timedelta(days=day.weekday())


def _make_plans(rng: random.Random, count: int, as_of: date) -> list[_Plan]:
    plans: list[_Plan] = []
    conditions = _quota_mix(rng, CONDITION_SHARES, count, each_once=True)
    outcomes = _quota_mix(rng, OUTCOME_SHARES, count)
    # Protocols are data: a fixed share of courses follows another clinic's protocol.
    alternatives = set(rng.sample(range(count), round(count * ALTERNATIVE_PROTOCOL_SHARE)))
    for index, (condition, outcome) in enumerate(zip(conditions, outcomes, strict=True)):
        protocol = rng.choice(ALTERNATIVE_PROTOCOLS) if index in alternatives else STANDARD_PROTOCOL
        start = as_of - timedelta(days=rng.randint(1, HISTORY_DAYS))
        plans.append(_Plan(condition, protocol, outcome, _week_monday(start)))
    # A few referrals are booked but have not started yet.
    for plan in rng.sample(plans, round(count * 0.075)):
        plan.fate = "planned"
        plan.first_week = _week_monday(as_of + timedelta(days=rng.randint(7, 24)))
    started = [plan for plan in plans if plan.fate == "normal"]
    old_enough = [p for p in started if p.first_week <= as_of - timedelta(days=28)]
    stopped_count = min(len(old_enough), rng.choice([1, 2]) if count >= 20 else int(count >= 8))
    for plan in rng.sample(old_enough, stopped_count):
        plan.fate = "stopped"
    in_maintenance = [
        p
        for p in started
        if p.fate == "normal"
        and p.outcome != "none"
        and p.protocol.maintenance_interval_weeks is not None
        and p.first_week <= as_of - timedelta(days=100)
    ]
    if count >= 15 and in_maintenance:
        rng.choice(in_maintenance).fate = "on_hold"
    # Ids follow referral order: P-0001 is the clinic's earliest course.
    plans.sort(key=lambda plan: plan.first_week)
    return plans


def _induction_days(first_week: date, weekly: Sequence[int]) -> list[date]:
    days: list[date] = []
    for week, infusions in enumerate(weekly):
        monday = first_week + timedelta(weeks=week)
        for weekday in WEEK_PATTERNS[infusions]:
            days.append(_open_day(monday + timedelta(days=weekday), set(days)))
    return days


# ---------------------------------------------------------------------------------------------
# One course, simulated session by session


@dataclass
class _Draft:
    """A session or assessment waiting for its external id (ids follow chronological order)."""

    when: datetime
    owner: str
    fields: dict[str, object]


@dataclass
class _Visit:
    """One booked infusion: its time, whether it is induction, and the dose prescribed for it."""

    when: datetime
    induction: bool
    dose_mg_per_kg: float


@dataclass(frozen=True)
class _StopEarly:
    """Why an infusion was stopped part-way, and the adverse event that made it so."""

    reason: str
    kind: AdverseEventKind
    description: str | None = None


STOP_EARLY: Final = (
    _StopEarly(
        "Infusion stopped at minute {minute} at the patient's request: distressing dissociation.",
        AdverseEventKind.dissociation,
    ),
    _StopEarly(
        "Infusion stopped at minute {minute}: systolic {systolic} mmHg persisted after a rate "
        "reduction.",
        AdverseEventKind.hypertension,
    ),
    _StopEarly(
        "Infusion stopped at minute {minute}: IV infiltrated and could not be re-sited.",
        AdverseEventKind.other,
        "IV infiltration at the cannula site; swelling resolved with elevation.",
    ),
    _StopEarly(
        "Infusion stopped at minute {minute}: vomiting despite ondansetron.",
        AdverseEventKind.vomiting,
        "Vomited during the infusion despite ondansetron.",
    ),
)

DISSOCIATION_STOP: Final = STOP_EARLY[0]


def _revised(event: AdverseEvent, **changes: object) -> AdverseEvent:
    """A changed copy, validated again (model_copy would skip the model's checks)."""
    return AdverseEvent.model_validate({**event.model_dump(), **changes})


def _explain_stop(
    events: list[AdverseEvent], stop: _StopEarly, started: datetime
) -> list[AdverseEvent]:
    """Make the charted events tell the same story as the stop reason."""
    stopping = next(event for event in events if event.kind is stop.kind)
    revised: list[AdverseEvent] = []
    for event in events:
        if event is stopping and stop.description is not None:
            event = _revised(event, description=stop.description)
        elif event.kind is AdverseEventKind.nausea and stop.kind is AdverseEventKind.vomiting:
            # The reason says "despite ondansetron": the nausea before it was treated.
            onset = max(started, min(event.onset_at, stopping.onset_at - _minutes(8)))
            event = _revised(
                event,
                onset_at=onset,
                action=AdverseEventAction.medication_given,
                description="Nausea during the infusion. Ondansetron 4 mg IV given.",
            )
        revised.append(event)
    return revised


@dataclass(frozen=True)
class _Peak:
    """The highest systolic during an infusion, and when a reading first passed the limit."""

    systolic: int
    minute: int
    first_high: datetime | None


@dataclass
class _CourseSimulation:
    """Books, runs and scores one patient's course; all choices come from the shared rng."""

    rng: random.Random
    as_of: date
    staff: _Staff
    pharmacy: _Pharmacy
    plan: _Plan
    patient_id: str
    diagnosis_id: str
    course_id: str
    body: _Body
    prescriber: Clinician
    phq9: _Trajectory
    companions: list[_Trajectory]
    slot: time
    maintenance_weekday: int
    cadss_baseline: int
    given: list[datetime] = field(default_factory=list)
    induction_phq9: list[int] = field(default_factory=list)

    @property
    def now(self) -> datetime:
        """Start of the as_of day: everything earlier is history, the rest is still booked."""
        return _at(self.as_of, time(0))

    @property
    def protocol(self) -> Protocol:
        return self.plan.protocol

    # -- booking --------------------------------------------------------------------------

    def _visit_time(self, day: date) -> datetime:
        # Patients keep a usual slot; a quarter of visits land elsewhere in the day.
        slot = self.slot if self.rng.random() < 0.75 else self.rng.choice(CLINIC_SLOTS)
        return _at(day, slot)

    def _induction_visits(self) -> list[_Visit]:
        first_week = self.plan.first_week
        weekly = self.protocol.induction_weekly_sessions
        days = _induction_days(first_week, weekly)
        # A started course had its first infusion before as_of (holidays can push it later).
        while self.plan.fate != "planned" and days[0] >= self.as_of:
            first_week -= timedelta(weeks=1)
            days = _induction_days(first_week, weekly)
        dose = self.protocol.dose_mg_per_kg
        return [_Visit(self._visit_time(day), True, dose) for day in days]

    def _maintenance_visits(self, after: date, interval: int, dose: float) -> list[_Visit]:
        """Maintenance every `interval` weeks up to as_of, then one or two booked ahead."""
        visits: list[_Visit] = []
        week = _week_monday(after)
        upcoming = self.rng.randint(1, 2)
        while upcoming:
            week += timedelta(weeks=interval)
            day = _open_day(week + timedelta(days=self.maintenance_weekday))
            visits.append(_Visit(self._visit_time(day), False, dose))
            if day >= self.as_of:
                upcoming -= 1
        return visits

    def _book(self) -> tuple[list[_Visit], CourseStatus, list[str]]:
        """The course's visits and status; notes that need scores are added after the run."""
        visits = self._induction_visits()
        fate, rng = self.plan.fate, self.rng
        if fate == "planned":
            return visits, CourseStatus.planned, []
        if fate == "stopped":
            held = sum(visit.when < self.now for visit in visits)
            return visits[: rng.randint(2, min(5, held))], CourseStatus.stopped, []
        if visits[-1].when >= self.now:
            return visits, CourseStatus.active, []  # still in induction
        interval = self.protocol.maintenance_interval_weeks
        if interval is None:
            return visits, CourseStatus.completed, []  # outcome note added after the run
        dose = self.protocol.dose_mg_per_kg
        if self.plan.outcome == "none":
            if rng.random() < 0.45:
                return visits, CourseStatus.completed, []  # no response: no maintenance
            # Partial responders get a higher maintenance dose before anyone gives up.
            dose = rng.choice([0.6, 0.65, 0.7, 0.75])
        maintenance = self._maintenance_visits(visits[-1].when.date(), interval, dose)
        past = [visit for visit in maintenance if visit.when < self.now]
        if fate == "on_hold":
            kept = past[: rng.randint(1, len(past))] if past else []
            last = (kept or visits)[-1].when.date()
            hold_day = min(
                self.as_of - timedelta(days=1), last + timedelta(days=rng.randint(3, 14))
            )
            note = rng.choice(HOLD_REASONS).format(day=hold_day.isoformat())
            return visits + kept, CourseStatus.on_hold, [note]
        taper_after = rng.randint(4, 6)
        if self.plan.outcome != "none" and len(past) >= taper_after and rng.random() < 0.35:
            note = "Maintenance completed with sustained benefit; follow up as needed."
            return visits + past[:taper_after], CourseStatus.completed, [note]
        return visits + maintenance, CourseStatus.active, []

    # -- one session ----------------------------------------------------------------------

    def _session(self, index: int, visit: _Visit, stop: _StopEarly | None) -> _Draft:
        fields: dict[str, object] = {"course": self.course_id, "scheduled_start": visit.when}
        if visit.when >= self.now:
            fields["status"] = SessionStatus.scheduled
            return _Draft(visit.when, self.course_id, fields)
        roll = self.rng.random()
        if stop is None and roll < CANCEL_RATE:
            fields.update(self._cancelled(visit))
        elif stop is None and roll < CANCEL_RATE + NO_SHOW_RATE:
            fields.update(status=SessionStatus.no_show, status_reason=NO_SHOW_REASON)
        else:
            if stop is None and roll < CANCEL_RATE + NO_SHOW_RATE + STOPPED_EARLY_RATE:
                stop = self.rng.choice(STOP_EARLY)
            fields.update(self._given(index, visit, stop))
        return _Draft(visit.when, self.course_id, fields)

    def _cancelled(self, visit: _Visit) -> dict[str, object]:
        rng = self.rng
        if rng.random() < 0.4:
            return {"status": SessionStatus.cancelled, "status_reason": rng.choice(CANCEL_REASONS)}
        # Blood pressure over the limit on arrival and again on a 10-minute recheck.
        first = visit.when + _minutes(rng.randint(0, 5))
        readings = []
        for taken_at in (first, first + _minutes(10)):
            systolic = rng.randint(164, 184)
            diastolic = rng.randint(94, 108)
            readings.append(
                Vitals(
                    taken_at=taken_at,
                    phase=VitalPhase.pre,
                    systolic=systolic,
                    diastolic=diastolic,
                    heart_rate=self.body.heart_rate + rng.randint(2, 12),
                    spo2=rng.randint(96, 100),
                )
            )
        last = readings[-1]
        reason = BP_CANCEL_REASON.format(systolic=last.systolic, diastolic=last.diastolic)
        return {"status": SessionStatus.cancelled, "status_reason": reason, "vitals": readings}

    def _draw_events(self, received: int) -> list[AdverseEventKind]:
        rng = self.rng
        kinds: list[AdverseEventKind] = []
        # Dissociation is most common at the first infusions and fades with repetition.
        if rng.random() < 0.20 + 0.25 * math.exp(-received / 2.5):
            kinds.append(AdverseEventKind.dissociation)
        kinds.extend(kind for kind, rate in EVENT_RATES.items() if rng.random() < rate)
        if AdverseEventKind.nausea in kinds and rng.random() < VOMITING_GIVEN_NAUSEA:
            kinds.append(AdverseEventKind.vomiting)
        return kinds

    def _given(self, index: int, visit: _Visit, stop: _StopEarly | None) -> dict[str, object]:
        """A session in which ketamine was given: completed, or stopped part-way."""
        rng = self.rng
        received = len(self.given)
        planned = self.protocol.infusion_minutes
        started = visit.when + _minutes(rng.randint(2, 12))
        if stop is None:
            ran = planned + rng.randint(0, 3)  # pump end plus the line flush
            kinds = self._draw_events(received)
        else:
            ran = rng.randint(12, max(12, planned - 10))
            kinds = [stop.kind]
            if stop.kind is AdverseEventKind.vomiting:
                kinds.insert(0, AdverseEventKind.nausea)
        ended = started + _minutes(ran)
        weight = round(self.body.weight_kg + rng.uniform(-1.0, 1.0), 1)
        dose = visit.dose_mg_per_kg
        full_dose = round(weight * dose, 1)
        given_dose = full_dose if stop is None else round(full_dose * ran / planned, 1)
        hypertensive = AdverseEventKind.hypertension in kinds
        vitals, peak = self._vitals(started, ended, ran, planned, hypertensive)
        events = [
            self._event(kind, started, ended, peak, stopped=stop is not None and kind is stop.kind)
            for kind in kinds
        ]
        if stop is not None:
            events = _explain_stop(events, stop, started)
        events.sort(key=lambda event: event.onset_at)
        self.given.append(visit.when)
        fields: dict[str, object] = {
            "status": SessionStatus.completed if stop is None else SessionStatus.stopped_early,
            "started_at": started,
            "ended_at": ended,
            "weight_kg": weight,
            "dose_mg_per_kg": dose,
            "total_dose_mg": given_dose,
            "rate_mg_per_hour": round(full_dose / planned * 60, 1),
            "product": self.pharmacy.product(rng, visit.when.date()),
            "site": _weighted(rng, SITES),
            "administered_by": rng.choice(self.staff.nurses).external_id,
            "supervised_by": rng.choice(self.staff.supervisors).external_id,
            "vitals": vitals,
            "assessments": self._session_scores(index, visit, received, started, ended, kinds),
            "adverse_events": events,
        }
        if stop is not None:
            fields["status_reason"] = stop.reason.format(minute=ran, systolic=peak.systolic)
        return fields

    # -- vitals ---------------------------------------------------------------------------

    def _during_minutes(self, ran: int) -> list[int]:
        """Readings from minute 9-12 to the infusion's last minutes, evenly 10-15 minutes apart.

        The last reading falls where the blood pressure peaks, at the end of the infusion.
        """
        first = self.rng.randint(9, 12)
        last = self.rng.randint(max(1, ran - 4), ran)
        span = last - first
        if span < 8:  # an infusion stopped early: one reading, at the stop
            return [last]
        intervals = math.ceil(span / 15)
        return [first + round(span * step / intervals) for step in range(intervals + 1)]

    def _vitals(
        self, started: datetime, ended: datetime, ran: int, planned: int, hypertensive: bool
    ) -> tuple[list[Vitals], _Peak]:
        rng, body = self.rng, self.body
        pre = Vitals(
            taken_at=started - _minutes(rng.randint(3, 8)),
            phase=VitalPhase.pre,
            systolic=body.systolic + rng.randint(-6, 8),
            diastolic=body.diastolic + rng.randint(-4, 5),
            heart_rate=body.heart_rate + rng.randint(-3, 8),
            resp_rate=body.resp_rate,
            spo2=rng.randint(96, 100),
            temperature_c=round(rng.uniform(36.3, 37.2), 1),
        )
        vitals = [pre]
        # Ketamine's pressor effect builds through the infusion and peaks near its end.
        if hypertensive:
            rise = rng.randint(HYPERTENSION_SYSTOLIC + 3, 184) - body.systolic
            diastolic_rise = rng.randint(12, 22)
        else:
            rise, diastolic_rise = rng.randint(10, 25), rng.randint(5, 15)
        heart_rise = rng.randint(4, 14)
        marks = self._during_minutes(ran)
        peak_systolic, peak_minute, first_high = 0, 0, None
        for minute in marks:
            share = min(1.0, minute / planned) ** 0.7
            systolic = round(body.systolic + rise * share + rng.gauss(0.0, 2.0))
            if not hypertensive:
                systolic = min(systolic, HYPERTENSION_SYSTOLIC)
            elif minute == marks[-1]:
                systolic = max(systolic, HYPERTENSION_SYSTOLIC + rng.randint(2, 10))
            diastolic = round(body.diastolic + diastolic_rise * share + rng.gauss(0.0, 2.0))
            taken_at = started + _minutes(minute)
            vitals.append(
                Vitals(
                    taken_at=taken_at,
                    phase=VitalPhase.during,
                    systolic=systolic,
                    diastolic=min(diastolic, systolic - 25),
                    heart_rate=round(body.heart_rate + heart_rise * share + rng.gauss(0.0, 2.0)),
                    resp_rate=_clamp(body.resp_rate + rng.randint(-1, 1), 12, 18),
                    spo2=_weighted(rng, SPO2_DURING),
                )
            )
            if systolic > peak_systolic:
                peak_systolic, peak_minute = systolic, minute
            if systolic > HYPERTENSION_SYSTOLIC and first_high is None:
                first_high = taken_at
        peak = _Peak(peak_systolic, peak_minute, first_high)
        # Once the infusion stops the pressure settles back towards baseline, below the peak.
        settled = min(body.systolic + rng.randint(0, 8), peak_systolic - rng.randint(3, 8))
        vitals.append(
            Vitals(
                taken_at=ended + _minutes(rng.randint(15, 30)),
                phase=VitalPhase.post,
                systolic=settled,
                diastolic=body.diastolic + rng.randint(0, 5),
                heart_rate=body.heart_rate + rng.randint(0, 6),
                resp_rate=body.resp_rate,
                spo2=rng.randint(96, 100),
            )
        )
        return vitals, peak

    # -- adverse events -------------------------------------------------------------------

    def _event(
        self,
        kind: AdverseEventKind,
        started: datetime,
        ended: datetime,
        peak: _Peak,
        *,
        stopped: bool,
    ) -> AdverseEvent:
        rng = self.rng
        ran = round((ended - started).total_seconds() / 60)
        severity, action = Severity.mild, AdverseEventAction.none
        if kind is AdverseEventKind.dissociation:
            onset = started + _minutes(rng.randint(4, min(15, ran)))
            resolved = max(onset + _minutes(15), ended + _minutes(rng.randint(5, 20)))
            roll = rng.random()
            if roll < 0.02:  # rare: paused until it settled, then finished
                severity, action = Severity.severe, AdverseEventAction.paused
            elif roll < 0.17:
                severity = Severity.moderate
                action = rng.choice([AdverseEventAction.none, AdverseEventAction.rate_reduced])
        elif kind is AdverseEventKind.hypertension:
            onset = peak.first_high or ended
            resolved = ended + _minutes(rng.randint(5, 14))  # back near baseline by post vitals
            severity = Severity.mild if peak.systolic < 175 else Severity.moderate
            action = _weighted(
                rng,
                (
                    (AdverseEventAction.rate_reduced, 0.6),
                    (AdverseEventAction.paused, 0.3),
                    (AdverseEventAction.medication_given, 0.1),
                ),
            )
        elif kind is AdverseEventKind.nausea:
            onset = started + _minutes(rng.randint(min(15, ran), ran))
            resolved = onset + _minutes(rng.randint(15, 50))
            severity = Severity.mild if rng.random() < 0.8 else Severity.moderate
            if rng.random() < 0.4:
                action = AdverseEventAction.medication_given
        elif kind is AdverseEventKind.vomiting:
            onset = ended + _minutes(rng.randint(2, 15))
            resolved = onset + _minutes(rng.randint(5, 20))
            severity = Severity.moderate if rng.random() < 0.6 else Severity.mild
            action = AdverseEventAction.medication_given
        elif kind is AdverseEventKind.dizziness:
            onset = ended + _minutes(rng.randint(0, 10))
            resolved = onset + _minutes(rng.randint(10, 40))
            severity = Severity.mild if rng.random() < 0.9 else Severity.moderate
        elif kind is AdverseEventKind.sedation:
            onset = started + _minutes(rng.randint(min(20, ran), ran))
            resolved = ended + _minutes(rng.randint(10, 40))
        elif kind is AdverseEventKind.headache:
            onset = max(started, ended + _minutes(rng.randint(-5, 20)))
            resolved = onset + _minutes(rng.randint(30, 120))
            severity = Severity.mild if rng.random() < 0.85 else Severity.moderate
            if rng.random() < 0.3:
                action = AdverseEventAction.medication_given
        elif kind is AdverseEventKind.anxiety:
            onset = started + _minutes(rng.randint(2, min(12, ran)))
            resolved = onset + _minutes(rng.randint(10, 40))
            severity = Severity.mild if rng.random() < 0.6 else Severity.moderate
            action = _weighted(
                rng,
                (
                    (AdverseEventAction.none, 0.5),
                    (AdverseEventAction.medication_given, 0.25),
                    (AdverseEventAction.rate_reduced, 0.25),
                ),
            )
        else:  # other: only an IV problem that stops an infusion
            onset = ended - _minutes(1)
            resolved = ended + _minutes(rng.randint(20, 60))
        if stopped:
            # The event that ended the infusion began shortly before the stop.
            onset = max(started, min(onset, ended - _minutes(rng.randint(0, 3))))
            resolved = max(resolved, onset + _minutes(10))
            severity, action = Severity.moderate, AdverseEventAction.stopped
        return AdverseEvent(
            kind=kind,
            description=self._describe(kind, action, peak),
            onset_at=onset,
            severity=severity,
            serious=False,
            action=action,
            resolved_at=resolved,
        )

    def _describe(self, kind: AdverseEventKind, action: AdverseEventAction, peak: _Peak) -> str:
        options = EVENT_DESCRIPTIONS.get(kind)
        if options is None:
            return "IV problem at the cannula site."
        text = self.rng.choice(options).format(systolic=peak.systolic, minute=peak.minute)
        if action is AdverseEventAction.medication_given and kind in MEDICATIONS:
            medication = MEDICATIONS[kind]
            text += f" {medication[0].upper()}{medication[1:]}."
        elif action is AdverseEventAction.rate_reduced:
            text += " Infusion rate reduced."
        elif action is AdverseEventAction.paused:
            text += " Infusion paused briefly."
        return text

    # -- scores ---------------------------------------------------------------------------

    def _scored(
        self, trajectory: _Trajectory, received: int, waning: int = 0, *, baseline: bool = False
    ) -> tuple[list[int], int]:
        total = trajectory.baseline if baseline else trajectory.score(self.rng, received, waning)
        return _items_for(self.rng, trajectory.instrument, total), total

    def _session_scores(
        self,
        index: int,
        visit: _Visit,
        received: int,
        started: datetime,
        ended: datetime,
        kinds: Sequence[AdverseEventKind],
    ) -> list[SessionAssessment]:
        rng = self.rng
        induction = self.protocol.induction_sessions
        # Between maintenance infusions the effect wanes a little.
        waning = 0 if visit.induction else rng.randint(0, 2)
        pcl5_now = not visit.induction or index in (3, induction - 1)
        scores: list[SessionAssessment] = []
        administered = started - _minutes(rng.randint(12, 20))
        for trajectory in [self.phq9, *self.companions]:
            if trajectory.instrument is Instrument.pcl5 and not pcl5_now:
                continue
            items, total = self._scored(trajectory, received, waning)
            if trajectory is self.phq9 and visit.induction:
                self.induction_phq9.append(total)
            scores.append(
                SessionAssessment(
                    instrument=trajectory.instrument,
                    timing=AssessmentTiming.pre_infusion,
                    administered_at=administered,
                    items=items,
                    total=total,
                )
            )
            administered += _minutes(rng.randint(1, 3))
        if received < 3:
            # CADSS after the first infusions: dissociation is strongest early, and higher
            # still when it was charted as an adverse event.
            total = round(self.cadss_baseline * 0.7**received + rng.gauss(0.0, 2.0))
            if AdverseEventKind.dissociation in kinds:
                total += rng.randint(8, 15)
            total = _clamp(total, 0, 92)
            scores.append(
                SessionAssessment(
                    instrument=Instrument.cadss,
                    timing=AssessmentTiming.post_infusion,
                    administered_at=ended + _minutes(rng.randint(3, 10)),
                    items=_items_for(rng, Instrument.cadss, total),
                    total=total,
                )
            )
        return scores

    def _standalone(self, day: date, timing: AssessmentTiming, *, waning: int = 0) -> list[_Draft]:
        """Baseline or follow-up scores outside an infusion, on one clinic-day visit."""
        rng = self.rng
        at = _at(day, time(rng.randint(9, 15), rng.choice((0, 15, 30, 45))))
        received = sum(when < at for when in self.given)
        drafts: list[_Draft] = []
        for trajectory in [self.phq9, *self.companions]:
            items, total = self._scored(
                trajectory, received, waning, baseline=timing is AssessmentTiming.baseline
            )
            fields: dict[str, object] = {
                "patient": self.patient_id,
                "course": self.course_id,
                "instrument": trajectory.instrument,
                "timing": timing,
                "administered_at": at,
                "items": items,
                "total": total,
            }
            drafts.append(_Draft(at, self.course_id, fields))
            at += _minutes(rng.randint(2, 5))
        return drafts

    def _follow_up_days(
        self, visits: Sequence[_Visit], status: CourseStatus, end_date: date | None
    ) -> list[tuple[date, int]]:
        """Follow-up days with their waning: after induction, between maintenance, after end."""
        rng = self.rng
        if status in (CourseStatus.planned, CourseStatus.stopped):
            return []
        induction = [visit for visit in visits if visit.induction]
        maintenance = [visit for visit in visits if not visit.induction]
        days: list[tuple[date, int]] = []
        if maintenance or status is CourseStatus.completed:
            days.append((induction[-1].when.date() + timedelta(days=rng.randint(6, 9)), 0))
        for first, second in itertools.pairwise(maintenance):
            gap = (second.when.date() - first.when.date()).days
            days.append((first.when.date() + timedelta(days=gap // 2), rng.randint(0, 2)))
        if end_date is not None:
            days.append((end_date + timedelta(days=rng.randint(14, 28)), rng.randint(0, 2)))
        return [(_open_day(day), waning) for day, waning in days]

    # -- the whole course -----------------------------------------------------------------

    def run(self) -> tuple[TreatmentCourse, list[_Draft], list[_Draft]]:
        rng = self.rng
        visits, status, notes = self._book()
        start_date = visits[0].when.date()
        stop_reason = rng.choice(STOP_REASONS) if status is CourseStatus.stopped else None
        # A patient who stops over distressing dissociation stopped during the last infusion.
        stop_with = DISSOCIATION_STOP if stop_reason is STOP_REASONS[0] else None
        sessions = [
            self._session(index, visit, stop_with if index == len(visits) - 1 else None)
            for index, visit in enumerate(visits)
        ]
        end_date: date | None = None
        if status is CourseStatus.completed:
            end_date = visits[-1].when.date()
        elif stop_reason is not None:
            end_date = min(
                self.as_of - timedelta(days=1),
                _open_day_before(visits[-1].when.date() + timedelta(days=rng.randint(1, 5))),
            )
            notes.append(stop_reason.format(count=len(self.given)))
        notes.extend(self._outcome_notes(visits, status))
        assessments: list[_Draft] = []
        baseline_day = _open_day_before(start_date - timedelta(days=rng.randint(3, 10)))
        if baseline_day < self.as_of:
            assessments.extend(self._standalone(baseline_day, AssessmentTiming.baseline))
        for day, waning in self._follow_up_days(visits, status, end_date):
            if day < self.as_of:
                assessments.extend(self._standalone(day, AssessmentTiming.follow_up, waning=waning))
        course = TreatmentCourse(
            external_id=self.course_id,
            patient=self.patient_id,
            diagnosis=self.diagnosis_id,
            prescriber=self.prescriber.external_id,
            protocol=self.protocol,
            start_date=start_date,
            end_date=end_date,
            status=status,
            notes=notes,
        )
        return course, sessions, assessments

    def _outcome_notes(self, visits: Sequence[_Visit], status: CourseStatus) -> list[str]:
        """Notes a clinician would chart about the induction result, with the actual scores."""
        induction_over = status is not CourseStatus.stopped and all(
            visit.when < self.now for visit in visits if visit.induction
        )
        if not induction_over or not self.induction_phq9:
            return []
        baseline, last = self.phq9.baseline, self.induction_phq9[-1]
        titrated = [
            visit for visit in visits if visit.dose_mg_per_kg > self.protocol.dose_mg_per_kg
        ]
        if titrated:
            return [
                f"Partial response to induction (PHQ-9 {baseline} to {last}); maintenance dose "
                f"raised to {titrated[0].dose_mg_per_kg:g} mg/kg."
            ]
        has_maintenance = any(not visit.induction for visit in visits)
        if status is not CourseStatus.completed or has_maintenance:
            return []
        scores = f"PHQ-9 {baseline} to {last}"
        if self.plan.outcome != "none":
            return [f"Induction-only protocol completed with response ({scores})."]
        if self.protocol.maintenance_interval_weeks is None:
            return [
                f"Induction-only protocol completed without response ({scores}); referred back "
                "to the treating psychiatrist."
            ]
        return [
            f"Induction completed without response ({scores}); maintenance not offered; "
            "referred back to the treating psychiatrist."
        ]


# ---------------------------------------------------------------------------------------------
# The clinic


def _make_patient(
    rng: random.Random, names: _NamePicker, number: int, mrn: int, ehr: int, as_of: date
) -> Patient:
    sex = _weighted(rng, ((Sex.female, 0.56), (Sex.male, 0.42), (Sex.other, 0.02)))
    age = min(74, int(rng.triangular(19, 75, 40)))
    birth_date = as_of - timedelta(days=round(age * 365.25) + rng.randint(1, 364))
    return Patient(
        external_id=f"P-{number:04d}",
        mrn=f"CLN-{mrn:06d}",
        ehr_identifiers=[Identifier(system=EHR_IDENTIFIER_SYSTEM, value=f"E{ehr}")],
        name=names.pick(sex),
        birth_date=birth_date,
        sex=sex,
    )


def _make_diagnosis(
    rng: random.Random,
    number: int,
    patient: Patient,
    condition: Condition,
    start: date,
    as_of: date,
    status: DiagnosisStatus,
) -> Diagnosis:
    if condition in DEPRESSIVE:
        resistant = rng.random() < 0.88  # ketamine is mostly offered after failed antidepressants
    else:
        resistant = rng.random() < (0.4 if condition is Condition.ptsd else 0.2)
    recorded_on = min(start - timedelta(days=rng.randint(7, 365)), as_of - timedelta(days=1))
    return Diagnosis(
        external_id=f"D-{number:04d}",
        patient=patient.external_id,
        condition=condition,
        icd10=_weighted(rng, ICD10_CODES[condition]),
        treatment_resistant=resistant,
        recorded_on=recorded_on,
        status=status,
    )


def _companions(rng: random.Random, condition: Condition, phq9: _Trajectory) -> list[_Trajectory]:
    companions: list[_Trajectory] = []
    # GAD-7 for the anxiety indications, and for most depressed patients (anxious distress).
    if condition in ANXIETY or rng.random() < 0.6:
        baseline = rng.randint(11, 19) if condition in ANXIETY else rng.randint(7, 15)
        companions.append(_companion_trajectory(rng, Instrument.gad7, baseline, phq9))
    if condition is Condition.ptsd:
        companions.append(_companion_trajectory(rng, Instrument.pcl5, rng.randint(38, 66), phq9))
    return companions


def _prescriber(rng: random.Random, staff: _Staff) -> Clinician:
    weighted = [
        (clinician, 0.4 if clinician.role is ClinicianRole.psychiatrist else 0.2)
        for clinician in staff.prescribers
    ]
    return _weighted(rng, weighted)


def _numbered(drafts: Iterable[_Draft], prefix: str, model: type[Numbered]) -> list[Numbered]:
    """Hands out ids in chronological order, so S-00001 is the clinic's first infusion."""
    ordered = sorted(drafts, key=lambda draft: (draft.when, draft.owner))
    return [
        model.model_validate({"external_id": f"{prefix}-{number:05d}", **draft.fields})
        for number, draft in enumerate(ordered, start=1)
    ]


def generate_clinic(*, seed: int = 7, patients: int = 40, as_of: date) -> list[RecordModel]:
    """A synthetic clinic as of `as_of`: history before that day, bookings from it on.

    Records come in dependency order: clinicians, patients, diagnoses, courses, sessions,
    assessments. The same seed, patient count and as_of always give the same records.
    """
    if patients < 0:
        raise ValueError("patients must be zero or more")
    rng = random.Random(seed)
    names = _NamePicker(rng)
    staff = _make_staff(rng, names)
    pharmacy = _Pharmacy(rng, as_of)
    plans = _make_plans(rng, patients, as_of)
    mrns = rng.sample(range(1000, 1_000_000), patients)
    ehr_numbers = rng.sample(range(1_000_000, 10_000_000), patients)
    people: list[Patient] = []
    diagnoses: list[Diagnosis] = []
    courses: list[TreatmentCourse] = []
    session_drafts: list[_Draft] = []
    assessment_drafts: list[_Draft] = []
    for number, plan in enumerate(plans, start=1):
        patient = _make_patient(
            rng, names, number, mrns[number - 1], ehr_numbers[number - 1], as_of
        )
        phq9 = _phq9_trajectory(rng, plan.condition, plan.outcome, plan.protocol.induction_sessions)
        simulation = _CourseSimulation(
            rng=rng,
            as_of=as_of,
            staff=staff,
            pharmacy=pharmacy,
            plan=plan,
            patient_id=patient.external_id,
            diagnosis_id=f"D-{number:04d}",
            course_id=f"TC-{number:04d}",
            body=_make_body(rng, patient.sex),
            prescriber=_prescriber(rng, staff),
            phq9=phq9,
            companions=_companions(rng, plan.condition, phq9),
            slot=rng.choice(CLINIC_SLOTS),
            maintenance_weekday=rng.randint(0, 4),
            cadss_baseline=rng.randint(6, 24),
        )
        course, sessions, assessments = simulation.run()
        remitted = course.status is CourseStatus.completed and plan.outcome == "remission"
        status = DiagnosisStatus.remission if remitted else DiagnosisStatus.active
        diagnosis = _make_diagnosis(
            rng, number, patient, plan.condition, course.start_date, as_of, status
        )
        people.append(patient)
        diagnoses.append(diagnosis)
        courses.append(course)
        session_drafts.extend(sessions)
        assessment_drafts.extend(assessments)
    records: list[RecordModel] = [*staff.clinicians, *people, *diagnoses, *courses]
    records.extend(_numbered(session_drafts, "S", InfusionSession))
    records.extend(_numbered(assessment_drafts, "A", Assessment))
    return records


def _json_encoder() -> Callable[[object], bytes]:
    try:
        import orjson
    except ImportError:  # the stdlib encoder keeps the export working without orjson
        return lambda value: json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    return orjson.dumps


def to_ndjson(records: Iterable[RecordModel]) -> Iterator[bytes]:
    """One JSON line per record (nulls left out), the NDJSON that `POST /api/v1/import` reads."""
    dumps = _json_encoder()
    for record in records:
        yield dumps(record.model_dump(mode="json", exclude_none=True)) + b"\n"
