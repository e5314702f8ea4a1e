"""Valid intake records for tests, linked to one another, with random external ids.

Built from the intake contract's own example; each call gives a fresh set of ids so tests can
share a database without touching each other's rows.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Clinic:
    """One patient's linked records: the order is the order they can be written in."""

    patient: Record
    prescriber: Record
    nurse: Record
    diagnosis: Record
    course: Record
    session: Record
    assessment: Record

    def records(self) -> list[Record]:
        return copy.deepcopy(
            [
                self.patient,
                self.prescriber,
                self.nurse,
                self.diagnosis,
                self.course,
                self.session,
                self.assessment,
            ]
        )


def clinic() -> Clinic:
    patient_id, diagnosis_id, course_id = _id("P"), _id("D"), _id("TC")
    prescriber_id, nurse_id = _id("C"), _id("C")
    return Clinic(
        patient={
            "kind": "patient",
            "external_id": patient_id,
            "mrn": "CLN-" + uuid.uuid4().hex[:6],
            "ehr_identifiers": [
                {"system": "urn:oid:2.16.840.1.113883.3.9999.1", "value": "E12345"}
            ],
            "name": {"given": ["Ana"], "family": "Silva"},
            "birth_date": "1984-03-02",
            "sex": "female",
        },
        prescriber={
            "kind": "clinician",
            "external_id": prescriber_id,
            "npi": "1234567893",
            "name": {"given": ["Rui"], "family": "Costa"},
            "role": "psychiatrist",
        },
        nurse={
            "kind": "clinician",
            "external_id": nurse_id,
            "name": {"given": ["Joana"], "family": "Reis"},
            "role": "nurse",
        },
        diagnosis={
            "kind": "diagnosis",
            "external_id": diagnosis_id,
            "patient": patient_id,
            "condition": "mdd_recurrent",
            "icd10": "F33.2",
            "treatment_resistant": True,
            "recorded_on": "2026-09-01",
            "status": "active",
        },
        course={
            "kind": "course",
            "external_id": course_id,
            "patient": patient_id,
            "diagnosis": diagnosis_id,
            "prescriber": prescriber_id,
            "protocol": {
                "name": "standard-iv",
                "induction_weekly_sessions": [3, 2, 3],
                "maintenance_interval_weeks": 4,
                "dose_mg_per_kg": 0.5,
                "infusion_minutes": 40,
            },
            "start_date": "2026-10-05",
            "status": "active",
        },
        session={
            "kind": "session",
            "external_id": _id("S"),
            "course": course_id,
            "scheduled_start": "2026-10-05T09:00:00-04:00",
            "started_at": "2026-10-05T09:04:00-04:00",
            "ended_at": "2026-10-05T09:46:00-04:00",
            "status": "completed",
            "weight_kg": 68.0,
            "dose_mg_per_kg": 0.5,
            "total_dose_mg": 34.0,
            "rate_mg_per_hour": 51.0,
            "product": {"concentration_mg_per_ml": 50, "lot": "K12345", "expires": "2027-06-30"},
            "route": "iv",
            "site": "left_forearm",
            "administered_by": nurse_id,
            "supervised_by": prescriber_id,
            "vitals": [
                {
                    "taken_at": "2026-10-05T09:02:00-04:00",
                    "phase": "pre",
                    "systolic": 122,
                    "diastolic": 78,
                    "heart_rate": 72,
                    "resp_rate": 14,
                    "spo2": 98,
                },
                {
                    "taken_at": "2026-10-05T09:44:00-04:00",
                    "phase": "during",
                    "systolic": 141,
                    "diastolic": 88,
                    "heart_rate": 80,
                },
            ],
            "assessments": [
                {
                    "instrument": "phq9",
                    "timing": "pre_infusion",
                    "administered_at": "2026-10-05T08:50:00-04:00",
                    "items": [2, 2, 1, 3, 2, 1, 2, 1, 0],
                    "total": 14,
                }
            ],
            "adverse_events": [
                {
                    "kind": "dissociation",
                    "onset_at": "2026-10-05T09:20:00-04:00",
                    "severity": "mild",
                    "serious": False,
                    "action": "none",
                    "resolved_at": "2026-10-05T10:05:00-04:00",
                }
            ],
        },
        assessment={
            "kind": "assessment",
            "external_id": _id("A"),
            "patient": patient_id,
            "instrument": "phq9",
            "timing": "follow_up",
            "administered_at": "2026-11-02T10:00:00-05:00",
            "items": [1, 1, 0, 1, 1, 0, 1, 0, 0],
            "total": 5,
        },
    )


PLURALS = {
    "patient": "patients",
    "clinician": "clinicians",
    "diagnosis": "diagnoses",
    "course": "courses",
    "session": "sessions",
    "assessment": "assessments",
}


def path_of(record: Record) -> str:
    """The intake API path of a record."""
    return f"/api/v1/{PLURALS[record['kind']]}/{record['external_id']}"
