"""The clinic's infusion records: the intake contract as typed, validated models.

These models are the clinic's source of truth inside the service. They check everything that can be
checked from one record alone (ranges, enumerations, internal consistency such as a score total
equal to the sum of its items); checks that need other records (does the course exist, does the
diagnosis belong to the same patient) live in `service.records.service`.

This module is pure: it imports no database, HTTP client or settings.
"""

from __future__ import annotations

import re
from datetime import date, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    TypeAdapter,
    model_serializer,
    model_validator,
)

EXTERNAL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

ExternalId = Annotated[
    str,
    StringConstraints(pattern=EXTERNAL_ID_PATTERN),
    Field(
        description="The clinic system's own id: 1-64 letters, digits, '.', '_' or '-'.",
        examples=["P-1001"],
    ),
]
"""An id from the clinic's system. It appears in URLs, so the alphabet is kept URL-safe."""

NonEmptyText = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)
]


class Sex(StrEnum):
    male = "male"
    female = "female"
    other = "other"
    unknown = "unknown"


class ClinicianRole(StrEnum):
    psychiatrist = "psychiatrist"
    anesthesiologist = "anesthesiologist"
    nurse = "nurse"
    nurse_anesthetist = "nurse_anesthetist"
    physician_assistant = "physician_assistant"


PRESCRIBING_ROLES = frozenset(
    {
        ClinicianRole.psychiatrist,
        ClinicianRole.anesthesiologist,
        ClinicianRole.nurse_anesthetist,
        ClinicianRole.physician_assistant,
    }
)
"""Roles that may prescribe a course or supervise an infusion; a nurse administers."""


class Condition(StrEnum):
    mdd_recurrent = "mdd_recurrent"
    mdd_single = "mdd_single"
    ptsd = "ptsd"
    gad = "gad"
    bipolar_depression = "bipolar_depression"
    panic_disorder = "panic_disorder"
    phobia = "phobia"


ICD10_FAMILIES: dict[Condition, tuple[str, ...]] = {
    Condition.mdd_recurrent: ("F33.0", "F33.1", "F33.2", "F33.3", "F33.4", "F33.8", "F33.9"),
    Condition.mdd_single: ("F32.",),
    Condition.ptsd: ("F43.1",),
    Condition.gad: ("F41.1",),
    Condition.bipolar_depression: ("F31.3", "F31.4", "F31.5", "F31.81"),
    Condition.panic_disorder: ("F41.0",),
    Condition.phobia: ("F40.",),
}
"""ICD-10-CM code families a condition may carry, so a PTSD diagnosis cannot carry F33.2."""

ICD10_PATTERN = re.compile(r"^[A-TV-Z][0-9][0-9AB]\.[0-9A-TV-Z]{1,4}$")


class DiagnosisStatus(StrEnum):
    """The clinical status of a diagnosis (the FHIR condition-clinical codes)."""

    active = "active"
    recurrence = "recurrence"
    relapse = "relapse"
    inactive = "inactive"
    remission = "remission"
    resolved = "resolved"


class CourseStatus(StrEnum):
    planned = "planned"
    active = "active"
    on_hold = "on_hold"
    completed = "completed"
    stopped = "stopped"


class SessionStatus(StrEnum):
    scheduled = "scheduled"
    in_progress = "in_progress"
    completed = "completed"
    stopped_early = "stopped_early"
    cancelled = "cancelled"
    no_show = "no_show"


NOT_STARTED = frozenset({SessionStatus.scheduled, SessionStatus.cancelled, SessionStatus.no_show})
"""Session statuses in which no ketamine was given."""


class VitalPhase(StrEnum):
    pre = "pre"
    during = "during"
    post = "post"


class Instrument(StrEnum):
    phq9 = "phq9"
    gad7 = "gad7"
    pcl5 = "pcl5"
    madrs = "madrs"
    cadss = "cadss"


INSTRUMENT_ITEMS: dict[Instrument, tuple[int, int]] = {
    Instrument.phq9: (9, 3),
    Instrument.gad7: (7, 3),
    Instrument.pcl5: (20, 4),
    Instrument.madrs: (10, 6),
    Instrument.cadss: (23, 4),
}
"""Number of items and the highest score of one item, per rating scale."""


class AssessmentTiming(StrEnum):
    baseline = "baseline"
    pre_infusion = "pre_infusion"
    post_infusion = "post_infusion"
    follow_up = "follow_up"


class AdverseEventKind(StrEnum):
    dissociation = "dissociation"
    hypertension = "hypertension"
    nausea = "nausea"
    vomiting = "vomiting"
    dizziness = "dizziness"
    sedation = "sedation"
    headache = "headache"
    anxiety = "anxiety"
    other = "other"


class Severity(StrEnum):
    mild = "mild"
    moderate = "moderate"
    severe = "severe"


class AdverseEventAction(StrEnum):
    none = "none"
    rate_reduced = "rate_reduced"
    paused = "paused"
    stopped = "stopped"
    medication_given = "medication_given"


class InfusionSite(StrEnum):
    left_forearm = "left_forearm"
    right_forearm = "right_forearm"
    left_hand = "left_hand"
    right_hand = "right_hand"
    left_antecubital = "left_antecubital"
    right_antecubital = "right_antecubital"


class FieldError(ValueError):
    """A record check that failed at a known field path (relative to the model that raised it).

    Pydantic wraps it in a ValidationError whose error `ctx["error"]` is this object; the error
    formatter in `service.records.errors` joins the two locations into one field path.
    """

    def __init__(self, path: str, kind: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.kind = kind
        self.message = message


class _Strict(BaseModel):
    """Base of every record part: unknown fields are rejected, strings are trimmed."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)


class HumanName(_Strict):
    given: list[NonEmptyText] = Field(min_length=1, max_length=5)
    family: NonEmptyText


class Identifier(_Strict):
    system: Annotated[str, StringConstraints(pattern=r"^(urn:(oid|uuid):|https?://)\S+$")] = Field(
        description="A URI naming the identifier system, e.g. urn:oid:2.16.840.1.113883.3.9999.1"
    )
    value: NonEmptyText


class Patient(_Strict):
    """A person receiving infusions at the clinic (maps to a FHIR Patient)."""

    kind: Literal["patient"] = "patient"
    external_id: ExternalId
    mrn: NonEmptyText = Field(description="The clinic's medical record number.")
    ehr_identifiers: list[Identifier] = Field(default_factory=list, max_length=20)
    name: HumanName
    birth_date: date
    sex: Sex

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.birth_date < date(1900, 1, 1):
            raise FieldError("birth_date", "date_too_early", "birth_date is before 1900")
        systems = [identifier.system for identifier in self.ehr_identifiers]
        if len(systems) != len(set(systems)):
            raise FieldError(
                "ehr_identifiers", "duplicate_system", "two identifiers share one system"
            )
        return self


def npi_is_valid(npi: str) -> bool:
    """The NPI check digit: Luhn over the number prefixed with the card issuer code 80840."""
    digits = [int(char) for char in "80840" + npi]
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


class Clinician(_Strict):
    """A licensed clinician who prescribes, supervises or administers (maps to a Practitioner)."""

    kind: Literal["clinician"] = "clinician"
    external_id: ExternalId
    npi: Annotated[str, StringConstraints(pattern=r"^[0-9]{10}$")] | None = None
    name: HumanName
    role: ClinicianRole

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.npi is not None and not npi_is_valid(self.npi):
            raise FieldError("npi", "npi_check_digit", f"{self.npi} fails the NPI check digit")
        return self


class Diagnosis(_Strict):
    """The indication a course treats (maps to a FHIR Condition)."""

    kind: Literal["diagnosis"] = "diagnosis"
    external_id: ExternalId
    patient: ExternalId
    condition: Condition
    icd10: Annotated[str, StringConstraints(to_upper=True)] | None = Field(
        default=None, examples=["F33.2"]
    )
    treatment_resistant: bool = False
    recorded_on: date
    status: DiagnosisStatus = DiagnosisStatus.active

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.icd10 is not None:
            code = self.icd10
            if not ICD10_PATTERN.match(code):
                raise FieldError("icd10", "icd10_format", f"{code} is not an ICD-10-CM code")
            families = ICD10_FAMILIES[self.condition]
            if not code.startswith(families):
                expected = ", ".join(family + "*" for family in families)
                raise FieldError(
                    "icd10",
                    "icd10_condition",
                    f"{code} is not a code for {self.condition.value} (expected {expected})",
                )
        return self


class Protocol(_Strict):
    """A course's treatment protocol: the induction series, then maintenance. Data, not code."""

    name: NonEmptyText = "standard-iv"
    induction_weekly_sessions: list[Annotated[int, Field(ge=1, le=7)]] = Field(
        default_factory=lambda: [3, 2, 3],
        min_length=1,
        max_length=12,
        description="Infusions in each induction week, e.g. [3, 2, 3].",
    )
    maintenance_interval_weeks: int | None = Field(
        default=4, ge=1, le=52, description="Weeks between maintenance infusions; null for none."
    )
    dose_mg_per_kg: float = Field(default=0.5, ge=0.05, le=1.0)
    infusion_minutes: int = Field(default=40, ge=5, le=180)

    @property
    def induction_sessions(self) -> int:
        return sum(self.induction_weekly_sessions)

    @model_serializer(mode="wrap")
    def _keep_no_maintenance(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # null means "no maintenance phase": it must survive exclude_none, or it reads back as 4.
        data: dict[str, Any] = handler(self)
        data["maintenance_interval_weeks"] = self.maintenance_interval_weeks
        return data


class TreatmentCourse(_Strict):
    """A course of infusions under one protocol (maps to a CarePlan and its standing order)."""

    kind: Literal["course"] = "course"
    external_id: ExternalId
    patient: ExternalId
    diagnosis: ExternalId
    prescriber: ExternalId
    protocol: Protocol = Field(default_factory=Protocol)
    start_date: date
    end_date: date | None = None
    status: CourseStatus
    notes: list[Annotated[str, StringConstraints(min_length=1, max_length=2000)]] = Field(
        default_factory=list, max_length=50
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.end_date is not None and self.end_date < self.start_date:
            raise FieldError("end_date", "end_before_start", "end_date is before start_date")
        return self


class Product(_Strict):
    """The ketamine product used: concentration, lot and expiry."""

    concentration_mg_per_ml: float = Field(gt=0, le=100)
    lot: NonEmptyText | None = None
    expires: date | None = None


class Vitals(_Strict):
    """One set of vital signs taken before, during or after an infusion."""

    taken_at: AwareDatetime
    phase: VitalPhase
    systolic: int | None = Field(default=None, ge=50, le=260, description="mmHg")
    diastolic: int | None = Field(default=None, ge=20, le=160, description="mmHg")
    heart_rate: int | None = Field(default=None, ge=20, le=250, description="beats per minute")
    resp_rate: int | None = Field(default=None, ge=4, le=60, description="breaths per minute")
    spo2: int | None = Field(default=None, ge=50, le=100, description="percent")
    temperature_c: float | None = Field(default=None, ge=30, le=45, description="degrees Celsius")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.systolic is None) != (self.diastolic is None):
            missing = "diastolic" if self.diastolic is None else "systolic"
            raise FieldError(missing, "blood_pressure_pair", "systolic and diastolic go together")
        if (
            self.systolic is not None
            and self.diastolic is not None
            and self.diastolic >= self.systolic
        ):
            raise FieldError(
                "diastolic", "blood_pressure_order", "diastolic must be below systolic"
            )
        measured = (
            self.systolic,
            self.heart_rate,
            self.resp_rate,
            self.spo2,
            self.temperature_c,
        )
        if all(value is None for value in measured):
            raise FieldError("", "no_measurement", "a vitals entry needs at least one measurement")
        return self


def _check_scores(instrument: Instrument, items: list[int] | None, total: int) -> None:
    """Item count and ranges per rating scale, and a total equal to the sum of the items."""
    count, highest = INSTRUMENT_ITEMS[instrument]
    name = instrument.value
    if items is None:
        if total > count * highest:
            raise FieldError(
                "total", "total_range", f"{total} exceeds the {name} maximum {count * highest}"
            )
        return
    if len(items) != count:
        raise FieldError("items", "item_count", f"{name} has {count} items, got {len(items)}")
    for index, score in enumerate(items):
        if not 0 <= score <= highest:
            raise FieldError(
                f"items.{index}", "item_range", f"{score} is outside {name}'s 0-{highest}"
            )
    if total != sum(items):
        raise FieldError(
            "total", "total_mismatch", f"{total} is not the sum of the items ({sum(items)})"
        )


_ITEMS_DESCRIPTION = (
    "Item scores in the scale's order; may be left out when only the total is known."
)


class SessionAssessment(_Strict):
    """A score taken as part of an infusion session, before or after the infusion."""

    instrument: Instrument
    timing: Literal[AssessmentTiming.pre_infusion, AssessmentTiming.post_infusion]
    administered_at: AwareDatetime
    items: list[int] | None = Field(default=None, description=_ITEMS_DESCRIPTION)
    total: int = Field(ge=0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        _check_scores(self.instrument, self.items, self.total)
        return self


class Assessment(_Strict):
    """A standalone score: a baseline or follow-up outside an infusion (maps to an Observation)."""

    kind: Literal["assessment"] = "assessment"
    external_id: ExternalId
    patient: ExternalId
    course: ExternalId | None = Field(default=None, description="The course it belongs to.")
    instrument: Instrument
    timing: AssessmentTiming
    administered_at: AwareDatetime
    items: list[int] | None = Field(default=None, description=_ITEMS_DESCRIPTION)
    total: int = Field(ge=0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        _check_scores(self.instrument, self.items, self.total)
        return self


class AdverseEvent(_Strict):
    """A side effect observed during or after an infusion (maps to a FHIR AdverseEvent)."""

    kind: AdverseEventKind
    description: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None
    onset_at: AwareDatetime
    severity: Severity
    serious: bool = False
    action: AdverseEventAction = AdverseEventAction.none
    resolved_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.kind is AdverseEventKind.other and self.description is None:
            raise FieldError(
                "description", "missing", "an adverse event of kind other needs a description"
            )
        if self.resolved_at is not None and self.resolved_at < self.onset_at:
            raise FieldError(
                "resolved_at", "resolved_before_onset", "resolved_at is before onset_at"
            )
        return self


MIN_INFUSION = timedelta(minutes=5)
MAX_INFUSION = timedelta(minutes=180)
DOSE_TOLERANCE = 0.10
"""How far total_dose_mg may stray from weight x dose: rounding and drawn-up volumes."""


class InfusionSession(_Strict):
    """One infusion visit (maps to an Encounter, a MedicationAdministration and Observations)."""

    kind: Literal["session"] = "session"
    external_id: ExternalId
    course: ExternalId
    scheduled_start: AwareDatetime
    started_at: AwareDatetime | None = None
    ended_at: AwareDatetime | None = None
    status: SessionStatus
    status_reason: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = Field(
        default=None, description="Why a session was stopped early, cancelled or missed."
    )
    weight_kg: float | None = Field(default=None, ge=20, le=350)
    dose_mg_per_kg: float | None = Field(default=None, ge=0.05, le=1.0)
    total_dose_mg: float | None = Field(default=None, gt=0, le=350)
    rate_mg_per_hour: float | None = Field(default=None, gt=0, le=1000)
    product: Product | None = None
    route: Literal["iv"] = "iv"
    site: InfusionSite | None = None
    administered_by: ExternalId | None = None
    supervised_by: ExternalId | None = None
    vitals: list[Vitals] = Field(default_factory=list, max_length=100)
    assessments: list[SessionAssessment] = Field(default_factory=list, max_length=20)
    adverse_events: list[AdverseEvent] = Field(default_factory=list, max_length=50)

    @model_validator(mode="after")
    def _check(self) -> Self:
        # Each failure names its own field, so the 422 points at the right place.
        self._check_unique()
        if self.status in NOT_STARTED:
            self._check_not_started()
        else:
            self._check_started()
        self._check_dose()
        self._check_timeline()
        return self

    def _check_unique(self) -> None:
        """One vitals set per moment, one score per scale and timing, one event per kind and onset.

        Each of these becomes a FHIR resource identified by exactly that, so a duplicate would
        silently overwrite its twin.
        """
        keyed: list[tuple[str, list[object]]] = [
            ("vitals", [v.taken_at for v in self.vitals]),
            ("assessments", [(a.instrument, a.timing) for a in self.assessments]),
            ("adverse_events", [(e.kind, e.onset_at) for e in self.adverse_events]),
        ]
        for name, keys in keyed:
            seen: set[object] = set()
            for index, key in enumerate(keys):
                if key in seen:
                    raise FieldError(
                        f"{name}.{index}", "duplicate", f"{name}[{index}] repeats an earlier entry"
                    )
                seen.add(key)

    def _check_not_started(self) -> None:
        given = {
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "total_dose_mg": self.total_dose_mg,
            "rate_mg_per_hour": self.rate_mg_per_hour,
        }
        for field, value in given.items():
            if value is not None:
                raise FieldError(
                    field,
                    "not_given",
                    f"a {self.status.value} session has no {field}: no infusion was given",
                )
        for index, vitals in enumerate(self.vitals):
            if vitals.phase is not VitalPhase.pre:
                raise FieldError(
                    f"vitals.{index}.phase",
                    "not_given",
                    f"a {self.status.value} session can only have pre-infusion vitals",
                )
        for index, assessment in enumerate(self.assessments):
            if assessment.timing is not AssessmentTiming.pre_infusion:
                raise FieldError(
                    f"assessments.{index}.timing",
                    "not_given",
                    f"a {self.status.value} session can only have pre-infusion assessments",
                )
        if self.adverse_events:
            raise FieldError(
                "adverse_events",
                "not_given",
                f"a {self.status.value} session gave no infusion, so it has no adverse events",
            )

    def _check_started(self) -> None:
        if self.started_at is None:
            raise FieldError(
                "started_at", "missing", f"a {self.status.value} session needs started_at"
            )
        finished = self.status in (SessionStatus.completed, SessionStatus.stopped_early)
        if finished and self.ended_at is None:
            raise FieldError("ended_at", "missing", f"a {self.status.value} session needs ended_at")
        if self.status is SessionStatus.in_progress and self.ended_at is not None:
            raise FieldError("ended_at", "not_ended", "an in_progress session has no ended_at yet")
        if self.status is SessionStatus.completed:
            for field in ("weight_kg", "dose_mg_per_kg", "total_dose_mg"):
                if getattr(self, field) is None:
                    raise FieldError(field, "missing", f"a completed session needs {field}")
        if self.status is SessionStatus.stopped_early and self.status_reason is None:
            raise FieldError(
                "status_reason", "missing", "a session stopped early needs a status_reason"
            )
        if self.ended_at is not None and self.started_at is not None:
            duration = self.ended_at - self.started_at
            if duration <= timedelta(0):
                raise FieldError("ended_at", "end_before_start", "ended_at is not after started_at")
            if not MIN_INFUSION <= duration <= MAX_INFUSION:
                minutes = duration.total_seconds() / 60
                raise FieldError(
                    "ended_at",
                    "duration",
                    f"the infusion lasted {minutes:g} minutes; expected 5-180",
                )

    def _check_dose(self) -> None:
        if self.weight_kg is None or self.dose_mg_per_kg is None or self.total_dose_mg is None:
            return
        expected = self.weight_kg * self.dose_mg_per_kg
        # Stopped early: the patient received part of the prescribed dose.
        if self.status is SessionStatus.stopped_early:
            if self.total_dose_mg > expected * (1 + DOSE_TOLERANCE):
                raise FieldError(
                    "total_dose_mg",
                    "dose_mismatch",
                    f"total_dose_mg {self.total_dose_mg:g} exceeds weight x dose ({expected:.1f})",
                )
            return
        if abs(self.total_dose_mg - expected) > expected * DOSE_TOLERANCE:
            raise FieldError(
                "total_dose_mg",
                "dose_mismatch",
                f"total_dose_mg {self.total_dose_mg:g} is not within 10% of weight_kg x "
                f"dose_mg_per_kg ({self.weight_kg:g} x {self.dose_mg_per_kg:g} = {expected:.1f})",
            )

    def _check_timeline(self) -> None:
        start, end = self.started_at, self.ended_at
        expires = self.product.expires if self.product is not None else None
        if expires is not None and start is not None and expires < start.date():
            raise FieldError(
                "product.expires",
                "product_expired",
                f"the product expired on {expires} before the infusion",
            )
        for index, vitals in enumerate(self.vitals):
            taken = vitals.taken_at
            where = f"vitals.{index}.taken_at"
            if vitals.phase is VitalPhase.pre and start is not None and taken > start:
                raise FieldError(where, "phase_time", "pre-infusion vitals taken after started_at")
            if vitals.phase is VitalPhase.during:
                if start is not None and taken < start:
                    raise FieldError(
                        where, "phase_time", "vitals during the infusion taken before started_at"
                    )
                if end is not None and taken > end:
                    raise FieldError(
                        where, "phase_time", "vitals during the infusion taken after ended_at"
                    )
            if vitals.phase is VitalPhase.post and end is not None and taken < end:
                raise FieldError(where, "phase_time", "post-infusion vitals taken before ended_at")
        for index, assessment in enumerate(self.assessments):
            at = assessment.administered_at
            where = f"assessments.{index}.administered_at"
            if (
                assessment.timing is AssessmentTiming.pre_infusion
                and start is not None
                and at > start
            ):
                raise FieldError(where, "phase_time", "a pre-infusion assessment after started_at")
            if assessment.timing is AssessmentTiming.post_infusion and end is not None and at < end:
                raise FieldError(where, "phase_time", "a post-infusion assessment before ended_at")
        for index, event in enumerate(self.adverse_events):
            if start is not None and event.onset_at < start:
                raise FieldError(
                    f"adverse_events.{index}.onset_at",
                    "phase_time",
                    "an adverse event cannot begin before the infusion started",
                )


Record = Annotated[
    Patient | Clinician | Diagnosis | TreatmentCourse | InfusionSession | Assessment,
    Field(discriminator="kind"),
]
"""Any intake record; `kind` tells which."""

RecordModel = Patient | Clinician | Diagnosis | TreatmentCourse | InfusionSession | Assessment

RECORD_TYPES: dict[str, type[RecordModel]] = {
    "patient": Patient,
    "clinician": Clinician,
    "diagnosis": Diagnosis,
    "course": TreatmentCourse,
    "session": InfusionSession,
    "assessment": Assessment,
}
"""Record kinds by their `kind` value, in dependency order: a kind refers only to earlier ones."""

PLURALS: dict[str, str] = {
    "patient": "patients",
    "clinician": "clinicians",
    "diagnosis": "diagnoses",
    "course": "courses",
    "session": "sessions",
    "assessment": "assessments",
}

record_adapter: TypeAdapter[RecordModel] = TypeAdapter(Record)
