"""Patient, Practitioner, Condition, Organization and Provenance mappings, and their reverse."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mappings.condition import condition, diagnosis_from_fhir
from mappings.context import MappingContext, resource_id
from mappings.organization import organization
from mappings.patient import patient, patient_from_fhir
from mappings.practitioner import practitioner
from mappings.provenance import provenance
from mappings.terminology import load_terminology
from mappings.unsupported import UnsupportedContent
from service.records.models import Clinician, Diagnosis, Patient
from service.records.service import parse_record
from tests.factory import clinic
from tests.fhir_check import assert_valid_r4
from tests.golden import assert_golden

CONTEXT = MappingContext()


def fixed(record: dict[str, Any], **ids: str) -> dict[str, Any]:
    return record | ids


def test_patient_golden_and_valid() -> None:
    record = parse_record(fixed(clinic().patient, external_id="P-1001", mrn="CLN-000123"))
    assert isinstance(record, Patient)
    resource = patient(record, context=CONTEXT)
    assert_valid_r4(resource)
    assert_golden("record-patient", resource)
    assert resource["id"] == resource_id("patient", "P-1001")


def test_practitioner_golden_and_valid() -> None:
    records = clinic()
    record = parse_record(fixed(records.prescriber, external_id="C-7"))
    assert isinstance(record, Clinician)
    resource = practitioner(record, context=CONTEXT)
    assert_valid_r4(resource)
    assert_golden("record-practitioner", resource)
    nurse = parse_record(fixed(records.nurse, external_id="C-9"))
    assert isinstance(nurse, Clinician)
    nurse_resource = practitioner(nurse, context=CONTEXT)
    assert_valid_r4(nurse_resource)
    assert [i["system"] for i in nurse_resource["identifier"]] == [CONTEXT.system("clinician")]


def test_condition_golden_and_valid() -> None:
    record = parse_record(fixed(clinic().diagnosis, external_id="D-1", patient="P-1001"))
    assert isinstance(record, Diagnosis)
    resource = condition(record, context=CONTEXT)
    assert_valid_r4(resource)
    assert_golden("record-condition", resource)
    assert resource["subject"] == {"reference": f"Patient/{resource_id('patient', 'P-1001')}"}


def test_organization_and_provenance_are_valid() -> None:
    assert_valid_r4(organization(context=CONTEXT))
    resource = provenance(
        kind="session",
        external_id="S-1",
        version=2,
        targets=[("Encounter", resource_id("session", "S-1", "Encounter"), 3)],
        recorded=datetime(2026, 10, 5, 13, 50, tzinfo=UTC),
        changed_by="api",
        context=CONTEXT,
    )
    assert_valid_r4(resource)
    assert_golden("record-provenance", resource)


def test_patient_round_trips() -> None:
    record = parse_record(clinic().patient)
    assert isinstance(record, Patient)
    assert (
        patient_from_fhir(patient(record, context=CONTEXT), current=None, context=CONTEXT) == record
    )


def test_an_ehr_change_to_a_patient_shows_up() -> None:
    record = parse_record(clinic().patient)
    assert isinstance(record, Patient)
    resource = patient(record, context=CONTEXT)
    resource["name"][0]["family"] = "Silva-Costa"
    resource["identifier"].append({"system": "urn:oid:1.2.3.4", "value": "X9"})
    back = patient_from_fhir(resource, current=record, context=CONTEXT)
    assert back.name.family == "Silva-Costa"
    assert [i.value for i in back.ehr_identifiers][-1] == "X9"


def test_diagnosis_round_trips_and_keeps_treatment_resistance() -> None:
    for flag in (True, False):
        record = parse_record(clinic().diagnosis | {"treatment_resistant": flag})
        assert isinstance(record, Diagnosis)
        resource = condition(record, context=CONTEXT)
        assert (
            diagnosis_from_fhir(resource, current=None, patient=record.patient, context=CONTEXT)
            == record
        )


def test_a_condition_the_clinic_does_not_treat_is_unsupported() -> None:
    record = parse_record(clinic().diagnosis)
    assert isinstance(record, Diagnosis)
    resource = condition(record, context=CONTEXT)
    resource["code"] = {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}
    with pytest.raises(UnsupportedContent) as caught:
        diagnosis_from_fhir(resource, current=None, patient=record.patient, context=CONTEXT)
    assert caught.value.path == "Condition.code"


def test_terminology_overrides_change_codes_without_code_changes() -> None:
    override = {
        "resourceType": "ConceptMap",
        "id": "condition",
        "group": [
            {
                "source": "http://infusion-bridge.org/fhir/CodeSystem/condition",
                "target": "http://snomed.info/sct",
                "element": [
                    {
                        "code": "mdd_single",
                        "target": [{"code": "370143000", "equivalence": "equivalent"}],
                    }
                ],
            }
        ],
    }
    context = MappingContext(terminology=load_terminology([override]))
    record = parse_record(clinic().diagnosis | {"condition": "mdd_single", "icd10": "F32.2"})
    assert isinstance(record, Diagnosis)
    codes = [c["code"] for c in condition(record, context=context)["code"]["coding"]]
    assert codes == ["370143000", "F32.2"]
    with pytest.raises(ValueError, match="override"):
        load_terminology([{"resourceType": "ConceptMap", "id": "nonexistent"}])


def _examples(folder: Path, resource_type: str) -> list[dict[str, Any]]:
    return [
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(folder.glob(f"{resource_type}-*.json"))
    ]


def test_official_patient_examples_reverse_map_or_say_what_is_unsupported(
    r4_examples: Path,
) -> None:
    examples = _examples(r4_examples, "Patient")
    assert len(examples) > 5
    paths = []
    for example in examples:
        try:
            back = patient_from_fhir(example, current=None, context=CONTEXT)
        except UnsupportedContent as unsupported:
            paths.append(unsupported.path)
        else:
            assert isinstance(back, Patient)
    assert all(path.startswith("Patient") for path in paths), paths


def test_official_condition_examples_reverse_map_or_say_what_is_unsupported(
    r4_examples: Path,
) -> None:
    examples = _examples(r4_examples, "Condition")
    assert len(examples) > 5
    paths, mapped = [], []
    for example in examples:
        try:
            mapped.append(
                diagnosis_from_fhir(example, current=None, patient="P-1", context=CONTEXT)
            )
        except UnsupportedContent as unsupported:
            paths.append(unsupported.path)
    assert all(path.startswith("Condition") for path in paths), paths
    assert all(isinstance(d, Diagnosis) for d in mapped)
