"""The FHIR package in profiles/ and the service's profile validator.

The package tests check that every published resource is valid R4 and that the package hangs
together (names, canonical URLs, bindings, the terminology copies). The validator tests build one
conforming resource per profile by hand, then break one rule at a time and expect the issue at
the right FHIRPath location with the right issue-type code.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mappings.context import CANONICAL, Profiles
from service.fhir import profile_validation
from service.fhir.profile_validation import (
    ProfileValidator,
    default_profiles_dir,
    default_validator,
    has_errors,
)
from service.records.models import INSTRUMENT_ITEMS, Instrument
from tests.fhir_check import assert_valid_r4

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "profiles"
TERMINOLOGY = REPO / "mappings" / "terminology"
PACKAGE_FILES = sorted(p for p in PROFILES.glob("*.json") if p.name != "package.json")

Resource = dict[str, Any]

# The R4 issue-type CodeSystem (http://hl7.org/fhir/issue-type), which OperationOutcome binds.
ISSUE_TYPES = {
    "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown",
    "expired", "forbidden", "suppressed", "processing", "not-supported", "duplicate",
    "multiple-matches", "not-found", "deleted", "too-long", "code-invalid", "extension",
    "too-costly", "business-rule", "conflict", "transient", "lock-error", "no-store", "exception",
    "timeout", "incomplete", "throttled", "informational",
}  # fmt: skip


def load(path: Path) -> Resource:
    data: Resource = json.loads(path.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def validator() -> ProfileValidator:
    return ProfileValidator(PROFILES)


# --- the package -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: p.name)
def test_every_package_resource_is_valid_r4(path: Path) -> None:
    resource = load(path)
    assert_valid_r4(resource)
    assert path.name == f"{resource['resourceType']}-{resource['id']}.json"
    assert resource["url"] == f"{CANONICAL}/{resource['resourceType']}/{resource['id']}"


def test_package_json_is_a_well_formed_fhir_package() -> None:
    manifest = load(PROFILES / "package.json")
    config = yaml.safe_load((PROFILES / "sushi-config.yaml").read_text(encoding="utf-8"))
    assert manifest["name"] == "infusion-bridge.fhir"
    assert re.fullmatch(r"\d+\.\d+\.\d+", manifest["version"])
    assert manifest["version"] == config["version"]
    assert manifest["fhirVersions"] == ["4.0.1"] == [config["fhirVersion"]]
    assert manifest["dependencies"] == {"hl7.fhir.r4.core": "4.0.1"}
    assert manifest["canonical"] == CANONICAL == config["canonical"]
    versions = {load(p).get("version") for p in PACKAGE_FILES}
    assert versions == {manifest["version"]}


def test_every_profile_the_mappings_claim_is_published() -> None:
    urls = {load(p)["url"] for p in PACKAGE_FILES}
    claimed = {v for k, v in vars(Profiles).items() if k.isupper()}
    ours = {url for url in claimed if url.startswith(CANONICAL)}
    assert ours <= urls
    assert claimed <= default_validator().profiles


def test_structure_definitions_are_constraints_with_snapshots() -> None:
    definitions = [load(p) for p in PROFILES.glob("StructureDefinition-*.json")]
    assert len(definitions) == 14
    for definition in definitions:
        assert definition["derivation"] == "constraint"
        assert definition["fhirVersion"] == "4.0.1"
        assert definition["baseDefinition"].startswith("http://hl7.org/fhir/StructureDefinition/")
        assert definition["differential"]["element"]
        assert definition["snapshot"]["element"]


def test_terminology_is_published_unchanged() -> None:
    sources = sorted(TERMINOLOGY.glob("*.json"))
    assert sources
    for source in sources:
        assert (PROFILES / source.name).read_bytes() == source.read_bytes(), source.name


def test_bindings_and_concept_map_sources_resolve_in_the_package() -> None:
    resources = [load(p) for p in PACKAGE_FILES]
    value_sets = {r["url"] for r in resources if r["resourceType"] == "ValueSet"}
    code_systems = {r["url"] for r in resources if r["resourceType"] == "CodeSystem"}
    for resource in resources:
        if resource["resourceType"] == "StructureDefinition":
            for element in resource["differential"]["element"]:
                if "binding" in element:
                    assert element["binding"]["valueSet"] in value_sets, element["id"]
        if resource["resourceType"] == "ConceptMap":
            assert resource["sourceUri"] in value_sets
        if resource["resourceType"] == "ValueSet":
            for include in resource["compose"]["include"]:
                if include["system"].startswith(CANONICAL):
                    assert include["system"] in code_systems


def test_required_bindings_expand_from_the_package(validator: ProfileValidator) -> None:
    """A required binding the validator could not expand would silently check nothing."""
    bound = [
        element["binding"]["valueSet"]
        for path in PROFILES.glob("StructureDefinition-*.json")
        for element in load(path)["differential"]["element"]
        if element.get("binding", {}).get("strength") == "required"
    ]
    assert len(bound) >= 5
    for url in bound:
        assert validator._binding(url) is not None, url


@pytest.mark.parametrize("instrument", sorted(INSTRUMENT_ITEMS))
def test_questionnaires_number_items_without_their_wording(instrument: Instrument) -> None:
    count, top = INSTRUMENT_ITEMS[instrument]
    questionnaire = load(PROFILES / f"Questionnaire-{instrument.value}.json")
    assert questionnaire["url"] == f"{CANONICAL}/Questionnaire/{instrument.value}"
    assert [item["linkId"] for item in questionnaire["item"]] == [
        str(n) for n in range(1, count + 1)
    ]
    for number, item in enumerate(questionnaire["item"], start=1):
        assert item["type"] == "integer"
        assert item["text"].endswith(f" item {number}")
        bounds = {e["url"].rsplit("/", 1)[-1]: e["valueInteger"] for e in item["extension"]}
        assert bounds == {"minValue": 0, "maxValue": top}
    assert "wording is not reproduced" in questionnaire["description"]


def test_core_data_has_the_invariants_the_service_relies_on() -> None:
    core = json.loads(profile_validation.CORE_DATA.read_text(encoding="utf-8"))
    keys = {site["key"] for sites in core["constraints"].values() for site in sites}
    assert {"mad-1", "cpl-3", "obs-6", "obs-7", "per-1", "dom-2", "ref-1"} <= keys
    assert "ele-1" in core["excluded"]
    assert "ele-1" not in keys
    vital = next(p for p in core["profiles"] if p["url"].endswith("/vitalsigns"))
    vital_keys = {
        c["key"] for e in vital["differential"]["element"] for c in e.get("constraint", [])
    }
    assert vital_keys == {"vs-1", "vs-2", "vs-3"}


def test_default_profiles_dir_is_this_repository() -> None:
    assert default_profiles_dir() == PROFILES


# --- conforming resources, one per profile ----------------------------------------------------

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
OWN = f"{CANONICAL}/CodeSystem"
PATIENT = {"reference": "Patient/p1"}


def meta(profile: str) -> dict[str, list[str]]:
    return {"profile": [profile]}


def ucum(value: float, code: str) -> dict[str, Any]:
    return {"value": value, "unit": code, "system": UCUM, "code": code}


V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def patient() -> Resource:
    return {
        "resourceType": "Patient",
        "id": "p1",
        "meta": meta(Profiles.PATIENT),
        "identifier": [
            {"system": f"{CANONICAL}/sid/patient", "value": "P-1001"},
            {
                "type": {"coding": [{"system": V2_0203, "code": "MR"}]},
                "system": f"{CANONICAL}/sid/mrn",
                "value": "CLN-000123",
            },
        ],
        "name": [{"family": "Silva", "given": ["Ana"]}],
        "gender": "female",
        "birthDate": "1984-03-02",
    }


def practitioner() -> Resource:
    return {
        "resourceType": "Practitioner",
        "id": "c7",
        "meta": meta(Profiles.PRACTITIONER),
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}],
        "name": [{"family": "Costa", "given": ["Rui"]}],
    }


def organization() -> Resource:
    return {
        "resourceType": "Organization",
        "id": "clinic",
        "meta": meta(Profiles.ORGANIZATION),
        "name": "Infusion Bridge Clinic",
    }


def condition() -> Resource:
    return {
        "resourceType": "Condition",
        "id": "d1",
        "meta": meta(Profiles.CONDITION),
        "extension": [{"url": Profiles.TREATMENT_RESISTANT, "valueBoolean": True}],
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "verificationStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                    "code": "confirmed",
                }
            ]
        },
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                        "code": "problem-list-item",
                        "display": "Problem List Item",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {"system": SNOMED, "code": "66344007", "display": "Recurrent major depression"},
                {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F33.2"},
            ],
            "text": "Major depressive disorder, recurrent, treatment-resistant",
        },
        "subject": PATIENT,
        "recordedDate": "2026-09-01",
    }


def care_plan() -> Resource:
    def activity(start: str, end: str, frequency: int) -> dict[str, Any]:
        repeat = {
            "boundsPeriod": {"start": start, "end": end},
            "duration": 40,
            "durationUnit": "min",
            "frequency": frequency,
            "period": 1,
            "periodUnit": "wk",
        }
        return {
            "outcomeReference": [{"reference": "MedicationAdministration/ma1"}],
            "detail": {
                "kind": "MedicationRequest",
                "status": "in-progress",
                "scheduledTiming": {"repeat": repeat},
                "description": f"{frequency} infusions",
            },
        }

    return {
        "resourceType": "CarePlan",
        "id": "cp1",
        "meta": meta(Profiles.CARE_PLAN),
        "status": "active",
        "intent": "plan",
        "subject": PATIENT,
        "period": {"start": "2026-10-05"},
        "addresses": [{"reference": "Condition/d1"}],
        "activity": [
            activity("2026-10-05", "2026-10-11", 3),
            activity("2026-10-12", "2026-10-18", 2),
        ],
    }


def medication_request() -> Resource:
    return {
        "resourceType": "MedicationRequest",
        "id": "mr1",
        "meta": meta(Profiles.MEDICATION_REQUEST),
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {
            "coding": [{"system": RXNORM, "code": "6130", "display": "ketamine"}],
            "text": "Ketamine",
        },
        "subject": PATIENT,
        "dosageInstruction": [
            {
                "timing": {
                    "repeat": {
                        "boundsPeriod": {"start": "2026-10-05"},
                        "duration": 40,
                        "durationUnit": "min",
                    }
                },
                "route": {"coding": [{"system": SNOMED, "code": "47625008"}]},
                "doseAndRate": [{"doseQuantity": ucum(0.5, "mg/kg")}],
            }
        ],
    }


def goal() -> Resource:
    return {
        "resourceType": "Goal",
        "id": "g1",
        "meta": meta(Profiles.GOAL),
        "lifecycleStatus": "active",
        "description": {"text": "Remission (PHQ-9 below 5)"},
        "subject": PATIENT,
        "target": [
            {
                "measure": {"coding": [{"system": LOINC, "code": "44261-6"}]},
                "detailQuantity": {"value": 5, "comparator": "<", **ucum(5, "{score}")},
            }
        ],
    }


def encounter() -> Resource:
    return {
        "resourceType": "Encounter",
        "id": "e1",
        "meta": meta(Profiles.ENCOUNTER),
        "status": "finished",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "AMB",
            "display": "ambulatory",
        },
        "subject": PATIENT,
        "period": {"start": "2026-10-05T08:50:00-04:00", "end": "2026-10-05T10:05:00-04:00"},
    }


def medication_administration() -> Resource:
    return {
        "resourceType": "MedicationAdministration",
        "id": "ma1",
        "meta": meta(Profiles.MEDICATION_ADMINISTRATION),
        "status": "completed",
        "category": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/medication-admin-category",
                    "code": "outpatient",
                }
            ]
        },
        "medicationCodeableConcept": {
            "coding": [
                {"system": RXNORM, "code": "238084"},
                {"system": RXNORM, "code": "6130"},
            ]
        },
        "subject": PATIENT,
        "context": {"reference": "Encounter/e1"},
        "effectivePeriod": {
            "start": "2026-10-05T09:04:00-04:00",
            "end": "2026-10-05T09:46:00-04:00",
        },
        "performer": [{"actor": {"reference": "Practitioner/c9"}}],
        "reasonReference": [{"reference": "Condition/d1"}],
        "request": {"reference": "MedicationRequest/mr1"},
        "dosage": {
            "site": {
                "coding": [
                    {"system": SNOMED, "code": "14975008"},
                    {"system": f"{OWN}/infusion-site", "code": "left_forearm"},
                ]
            },
            "route": {"coding": [{"system": SNOMED, "code": "47625008"}]},
            "dose": ucum(34, "mg"),
            "rateQuantity": ucum(51, "mg/h"),
        },
    }


def score_observation() -> Resource:
    return {
        "resourceType": "Observation",
        "id": "s1",
        "meta": meta(Profiles.SCORE_OBSERVATION),
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "survey",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": "44261-6"}], "text": "PHQ-9 total score"},
        "subject": PATIENT,
        "effectiveDateTime": "2026-10-05T08:50:00-04:00",
        "valueInteger": 14,
        "interpretation": [{"coding": [{"system": f"{OWN}/score-band", "code": "moderate"}]}],
        "derivedFrom": [{"reference": "QuestionnaireResponse/qr1"}],
    }


def questionnaire_response() -> Resource:
    return {
        "resourceType": "QuestionnaireResponse",
        "id": "qr1",
        "meta": meta(Profiles.QUESTIONNAIRE_RESPONSE),
        "questionnaire": f"{CANONICAL}/Questionnaire/phq9",
        "status": "completed",
        "subject": PATIENT,
        "authored": "2026-10-05T08:50:00-04:00",
        "item": [
            {"linkId": str(n), "answer": [{"valueInteger": answer}]}
            for n, answer in enumerate([2, 2, 1, 3, 2, 1, 2, 1, 0], start=1)
        ],
    }


def adverse_event() -> Resource:
    return {
        "resourceType": "AdverseEvent",
        "id": "ae1",
        "meta": meta(Profiles.ADVERSE_EVENT),
        "actuality": "actual",
        "event": {
            "coding": [{"system": f"{OWN}/adverse-event-kind", "code": "dissociation"}],
            "text": "Dissociation",
        },
        "subject": PATIENT,
        "date": "2026-10-05T09:20:00-04:00",
        "seriousness": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness",
                    "code": "Non-serious",
                }
            ]
        },
        "severity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/adverse-event-severity",
                    "code": "mild",
                }
            ]
        },
        "suspectEntity": [{"instance": {"reference": "MedicationAdministration/ma1"}}],
    }


def provenance() -> Resource:
    return {
        "resourceType": "Provenance",
        "id": "pv1",
        "meta": meta(Profiles.PROVENANCE),
        "target": [{"reference": "Patient/p1/_history/1"}],
        "recorded": "2026-10-05T10:00:00-04:00",
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "CREATE",
                }
            ]
        },
        "agent": [{"who": {"reference": "Organization/clinic"}}],
    }


def blood_pressure() -> Resource:
    def component(code: str, value: int) -> dict[str, Any]:
        return {
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "valueQuantity": {"value": value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
        }

    return {
        "resourceType": "Observation",
        "id": "bp1",
        "meta": meta(Profiles.BLOOD_PRESSURE),
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
        "subject": PATIENT,
        "effectiveDateTime": "2026-10-05T09:02:00-04:00",
        "component": [component("8480-6", 122), component("8462-4", 78)],
    }


def heart_rate() -> Resource:
    return {
        "resourceType": "Observation",
        "id": "hr1",
        "meta": meta(Profiles.HEART_RATE),
        "status": "final",
        "category": blood_pressure()["category"],
        "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
        "subject": PATIENT,
        "effectiveDateTime": "2026-10-05T09:02:00-04:00",
        "valueQuantity": {"value": 72, "unit": "beats/minute", "system": UCUM, "code": "/min"},
    }


CONFORMING: dict[str, Callable[[], Resource]] = {
    Profiles.PATIENT: patient,
    Profiles.PRACTITIONER: practitioner,
    Profiles.ORGANIZATION: organization,
    Profiles.CONDITION: condition,
    Profiles.CARE_PLAN: care_plan,
    Profiles.MEDICATION_REQUEST: medication_request,
    Profiles.GOAL: goal,
    Profiles.ENCOUNTER: encounter,
    Profiles.MEDICATION_ADMINISTRATION: medication_administration,
    Profiles.SCORE_OBSERVATION: score_observation,
    Profiles.QUESTIONNAIRE_RESPONSE: questionnaire_response,
    Profiles.ADVERSE_EVENT: adverse_event,
    Profiles.PROVENANCE: provenance,
    Profiles.BLOOD_PRESSURE: blood_pressure,
    Profiles.HEART_RATE: heart_rate,
}


def test_every_profile_of_the_package_has_a_conforming_example() -> None:
    ours = {load(p)["url"] for p in PROFILES.glob("StructureDefinition-ib-*.json")}
    assert ours <= set(CONFORMING)


@pytest.mark.parametrize("profile", sorted(CONFORMING), ids=lambda url: url.rsplit("/", 1)[-1])
def test_conforming_resources_pass(validator: ProfileValidator, profile: str) -> None:
    resource = CONFORMING[profile]()
    assert_valid_r4(resource)
    assert validator.issues(resource) == []
    outcome = validator.validate(resource, profile)
    assert outcome == {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "information",
                "code": "informational",
                "diagnostics": "No issues detected",
            }
        ],
    }
    assert not has_errors(outcome)


# --- violations, one rule at a time ------------------------------------------------------------


def only_issue(validator: ProfileValidator, resource: Resource) -> dict[str, Any]:
    issues = validator.issues(resource)
    assert len(issues) == 1, issues
    return issues[0]


def assert_issue(
    validator: ProfileValidator, resource: Resource, code: str, expression: str, text: str = ""
) -> None:
    issue = only_issue(validator, resource)
    assert (issue["severity"], issue["code"], issue["expression"]) == ("error", code, [expression])
    assert text in issue["diagnostics"]


def test_min_cardinality(validator: ProfileValidator) -> None:
    resource = patient()
    del resource["gender"]
    assert_issue(validator, resource, "required", "Patient.gender", "minimum required = 1")


def test_min_cardinality_inside_a_backbone_element(validator: ProfileValidator) -> None:
    resource = care_plan()
    del resource["activity"][1]["detail"]
    # cpl-3 stays quiet: the activity has neither a detail nor a reference.
    assert_issue(validator, resource, "required", "CarePlan.activity[1].detail")


def test_min_cardinality_of_a_nested_element(validator: ProfileValidator) -> None:
    resource = care_plan()
    del resource["period"]["start"]
    assert_issue(validator, resource, "required", "CarePlan.period.start")


def test_max_cardinality(validator: ProfileValidator) -> None:
    resource = medication_request()
    dose = resource["dosageInstruction"][0]["doseAndRate"][0]
    resource["dosageInstruction"][0]["doseAndRate"].append(copy.deepcopy(dose))
    assert_issue(
        validator,
        resource,
        "structure",
        "MedicationRequest.dosageInstruction[0].doseAndRate",
        "max allowed = 1, but found 2",
    )


def test_required_slice(validator: ProfileValidator) -> None:
    resource = patient()
    resource["identifier"] = resource["identifier"][:1]
    assert_issue(validator, resource, "required", "Patient.identifier", "Patient.identifier:mrn")


def test_slice_maximum(validator: ProfileValidator) -> None:
    resource = condition()
    resource["code"]["coding"].append({"system": SNOMED, "code": "47505003"})
    assert_issue(validator, resource, "structure", "Condition.code.coding", ":snomed")


def test_fixed_value(validator: ProfileValidator) -> None:
    resource = care_plan()
    resource["intent"] = "proposal"
    assert_issue(validator, resource, "value", "CarePlan.intent", 'exactly "plan"')


def test_fixed_value_of_a_status(validator: ProfileValidator) -> None:
    resource = questionnaire_response()
    resource["status"] = "in-progress"
    assert_issue(validator, resource, "value", "QuestionnaireResponse.status")


def test_pattern_route(validator: ProfileValidator) -> None:
    resource = medication_administration()
    resource["dosage"]["route"] = {"coding": [{"system": SNOMED, "code": "26643006"}]}
    assert_issue(validator, resource, "value", "MedicationAdministration.dosage.route", "47625008")


def test_pattern_medication_needs_the_ingredient_coding(validator: ProfileValidator) -> None:
    resource = medication_administration()
    resource["medicationCodeableConcept"]["coding"].pop()
    assert_issue(
        validator,
        resource,
        "value",
        "MedicationAdministration.medication.ofType(CodeableConcept)",
        "6130",
    )


def test_pattern_dose_unit(validator: ProfileValidator) -> None:
    resource = medication_administration()
    resource["dosage"]["dose"] = ucum(0.5, "mg/kg")
    assert_issue(validator, resource, "value", "MedicationAdministration.dosage.dose")


def test_pattern_encounter_class(validator: ProfileValidator) -> None:
    resource = encounter()
    resource["class"]["code"] = "IMP"
    assert_issue(validator, resource, "value", "Encounter.class", "AMB")


def test_required_binding_on_code(validator: ProfileValidator) -> None:
    resource = score_observation()
    resource["code"] = {"coding": [{"system": LOINC, "code": "8867-4"}]}
    assert_issue(validator, resource, "code-invalid", "Observation.code", "ValueSet/score-code")


def test_required_binding_accepts_the_services_own_codes(validator: ProfileValidator) -> None:
    resource = score_observation()
    resource["code"] = {"coding": [{"system": f"{OWN}/rating-scale", "code": "cadss-total"}]}
    assert validator.issues(resource) == []
    resource["code"]["coding"][0]["code"] = "cadss"  # the scale, not its total
    assert_issue(validator, resource, "code-invalid", "Observation.code")


def test_required_binding_on_a_slice(validator: ProfileValidator) -> None:
    resource = condition()
    resource["code"]["coding"][0]["code"] = "35489007"  # depressive disorder: not an indication
    assert_issue(
        validator, resource, "code-invalid", "Condition.code.coding[0]", "indication-snomed"
    )


def test_required_binding_expanded_from_a_whole_code_system(validator: ProfileValidator) -> None:
    resource = score_observation()
    resource["interpretation"][0]["coding"][0]["code"] = "extreme"
    assert_issue(validator, resource, "code-invalid", "Observation.interpretation[0]")


def test_required_binding_without_a_code(validator: ProfileValidator) -> None:
    resource = adverse_event()
    resource["event"] = {"text": "Felt strange"}
    assert_issue(validator, resource, "code-invalid", "AdverseEvent.event")


def test_choice_type_restriction(validator: ProfileValidator) -> None:
    resource = score_observation()
    del resource["valueInteger"]
    resource["valueQuantity"] = ucum(14, "{score}")
    issues = validator.issues(resource)
    assert [(i["code"], i["expression"]) for i in issues] == [
        ("structure", ["Observation.value.ofType(Quantity)"])
    ]


def test_reference_target_type(validator: ProfileValidator) -> None:
    resource = medication_administration()
    resource["subject"] = {"reference": "Group/g1"}
    assert_issue(validator, resource, "structure", "MedicationAdministration.subject", "Group")


def test_reference_target_type_in_a_backbone_element(validator: ProfileValidator) -> None:
    resource = adverse_event()
    resource["suspectEntity"][0]["instance"] = {"reference": "Medication/m1"}
    assert_issue(validator, resource, "structure", "AdverseEvent.suspectEntity[0].instance")


def test_absolute_and_versioned_references_are_typed(validator: ProfileValidator) -> None:
    resource = medication_administration()
    resource["context"] = {"reference": "https://ehr.example.org/fhir/Encounter/e1/_history/2"}
    assert validator.issues(resource) == []
    resource["context"] = {"reference": "https://ehr.example.org/fhir/EpisodeOfCare/e1"}
    assert_issue(validator, resource, "structure", "MedicationAdministration.context")


def test_extension_content_is_checked_against_its_definition(validator: ProfileValidator) -> None:
    resource = condition()
    resource["extension"] = [{"url": Profiles.TREATMENT_RESISTANT, "valueString": "yes"}]
    assert_issue(
        validator, resource, "structure", "Condition.extension[0].value.ofType(string)", "boolean"
    )


def test_profile_invariant_ib_mad_1(validator: ProfileValidator) -> None:
    resource = medication_administration()
    del resource["effectivePeriod"]["end"]
    assert_issue(validator, resource, "invariant", "MedicationAdministration", "ib-mad-1")
    stopped = medication_administration()
    stopped["status"] = "stopped"
    del stopped["effectivePeriod"]["end"]
    assert validator.issues(stopped) == []


def test_profile_invariant_ib_npi_1(validator: ProfileValidator) -> None:
    resource = practitioner()
    resource["identifier"][0]["value"] = "12345"
    assert_issue(validator, resource, "invariant", "Practitioner", "ib-npi-1")


def test_core_invariant_mad_1(validator: ProfileValidator) -> None:
    resource = medication_administration()
    resource["status"] = "in-progress"
    del resource["dosage"]["dose"], resource["dosage"]["rateQuantity"]
    assert_issue(validator, resource, "invariant", "MedicationAdministration.dosage", "mad-1")


def test_core_invariant_cpl_3(validator: ProfileValidator) -> None:
    resource = care_plan()
    resource["activity"][0]["reference"] = {"reference": "MedicationRequest/mr1"}
    assert_issue(validator, resource, "invariant", "CarePlan.activity[0]", "cpl-3")


def test_core_invariant_vs_3(validator: ProfileValidator) -> None:
    resource = blood_pressure()
    del resource["component"][1]["valueQuantity"]
    assert_issue(validator, resource, "invariant", "Observation.component[1]", "vs-3")


def test_core_invariant_vs_2(validator: ProfileValidator) -> None:
    resource = heart_rate()
    del resource["valueQuantity"]
    assert_issue(validator, resource, "invariant", "Observation", "vs-2")


def test_core_invariant_vs_1(validator: ProfileValidator) -> None:
    resource = heart_rate()
    resource["effectiveDateTime"] = "2026-10"
    assert_issue(validator, resource, "invariant", "Observation.effective.ofType(dateTime)", "vs-1")


def test_core_invariant_obs_6(validator: ProfileValidator) -> None:
    resource = score_observation()
    resource["dataAbsentReason"] = {"text": "asked but declined"}
    assert_issue(validator, resource, "invariant", "Observation", "obs-6")


def test_core_invariant_per_1_of_a_data_type(validator: ProfileValidator) -> None:
    resource = encounter()
    resource["period"]["end"] = "2026-10-05T08:00:00-04:00"
    assert_issue(validator, resource, "invariant", "Encounter.period", "per-1")


def test_core_invariant_of_a_nested_data_type(validator: ProfileValidator) -> None:
    resource = care_plan()
    del resource["activity"][0]["detail"]["scheduledTiming"]["repeat"]["periodUnit"]
    assert_issue(
        validator,
        resource,
        "invariant",
        "CarePlan.activity[0].detail.scheduled.ofType(Timing).repeat",
        "tim-2",
    )


def test_core_invariant_ext_1(validator: ProfileValidator) -> None:
    resource = condition()
    resource["extension"][0]["extension"] = [{"url": "part", "valueString": "x"}]
    issues = validator.issues(resource)
    assert ("invariant", ["Condition.extension[0]"]) in [
        (i["code"], i["expression"]) for i in issues
    ]


def test_warning_invariants_are_warnings(validator: ProfileValidator) -> None:
    resource = condition()
    del resource["clinicalStatus"]
    issues = validator.issues(resource)
    assert sorted((i["severity"], i["code"], i["expression"][0]) for i in issues) == [
        ("error", "required", "Condition.clinicalStatus"),
        ("warning", "invariant", "Condition"),  # con-3
    ]


def test_core_invariants_apply_without_a_profile(validator: ProfileValidator) -> None:
    resource = care_plan()
    del resource["meta"]
    resource["activity"][0]["reference"] = {"reference": "MedicationRequest/mr1"}
    assert_issue(validator, resource, "invariant", "CarePlan.activity[0]", "cpl-3")


# --- profiles, outcomes and guards -------------------------------------------------------------


def test_unknown_profile_is_an_error_issue(validator: ProfileValidator) -> None:
    url = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"
    outcome = validator.validate(patient(), url)
    assert outcome["issue"][0]["severity"] == "error"
    assert outcome["issue"][0]["code"] == "not-supported"
    assert url in outcome["issue"][0]["diagnostics"]
    assert has_errors(outcome)
    claimed = patient()
    claimed["meta"]["profile"].append(url)
    assert_issue(validator, claimed, "not-supported", "Patient")


def test_profile_for_another_resource_type_is_an_error(validator: ProfileValidator) -> None:
    assert_issue(validator, patient() | {"meta": meta(Profiles.ENCOUNTER)}, "structure", "Patient")


def test_explicit_profile_replaces_the_claimed_ones(validator: ProfileValidator) -> None:
    resource = patient()
    del resource["birthDate"]
    assert validator.issues(resource, "http://hl7.org/fhir/StructureDefinition/Patient") == []
    assert validator.issues(resource, f"{Profiles.PATIENT}|0.1.0") != []


def test_not_a_resource(validator: ProfileValidator) -> None:
    outcome = validator.validate({"name": "x"})
    assert outcome["issue"][0]["code"] == "structure"
    assert_valid_r4(outcome)


def violations() -> Iterator[Resource]:
    """A broken copy of each conforming resource, for the outcome and guard tests."""
    breakers: list[Callable[[Resource], None]] = [
        lambda r: r.pop("subject", None),
        lambda r: r.update(status="entered-in-error"),
        lambda r: r.update(id="x" * 3, meta={"profile": ["http://example.org/unknown"]}),
        lambda r: r.update(contained=[{"resourceType": "Basic", "id": "b", "code": {}}]),
    ]
    for make in CONFORMING.values():
        for breaker in breakers:
            resource = make()
            breaker(resource)
            yield resource


def test_outcomes_are_valid_r4_operation_outcomes(validator: ProfileValidator) -> None:
    seen = set()
    for resource in violations():
        outcome = validator.validate(resource)
        assert_valid_r4(outcome)
        for issue in outcome["issue"]:
            assert issue["code"] in ISSUE_TYPES
            assert issue["severity"] in ("fatal", "error", "warning", "information")
            seen.add(issue["code"])
    assert {"required", "not-supported"} <= seen


def test_guards_never_hide_a_broken_invariant(validator: ProfileValidator) -> None:
    """The cheap guards in front of fhirpathpy change the speed, never the result."""
    unguarded = unguarded_validator()
    resources = [make() for make in CONFORMING.values()]
    resources += list(violations())
    mutated: list[tuple[Callable[[], Resource], Callable[[Resource], object]]] = [
        (medication_administration, lambda r: r["dosage"].pop("dose")),
        (encounter, lambda r: r["period"].update(end="2020-01-01")),
        (
            care_plan,
            lambda r: r["activity"][0]["detail"]["scheduledTiming"]["repeat"].pop("period"),
        ),
        (blood_pressure, lambda r: r["component"][0].pop("valueQuantity")),
        (heart_rate, lambda r: r.update(effectiveDateTime="2026")),
        (score_observation, lambda r: r.update(dataAbsentReason={"text": "n/a"})),
    ]
    for make, change in mutated:
        resource = make()
        change(resource)
        resources.append(resource)
    for resource in resources:
        assert validator.issues(resource) == unguarded.issues(resource), resource["id"]


def test_exists_discriminator_and_closed_slicing(tmp_path: Path) -> None:
    """Slicing the validator supports beyond what the package uses today."""
    url = "http://example.org/fhir/StructureDefinition/sliced-careplan"

    def element(id_: str, **more: Any) -> dict[str, Any]:
        path = ".".join(step.split(":")[0] for step in id_.split("."))
        return {"id": f"CarePlan.{id_}", "path": f"CarePlan.{path}", **more}

    definition = {
        "resourceType": "StructureDefinition",
        "id": "sliced-careplan",
        "url": url,
        "name": "SlicedCarePlan",
        "status": "draft",
        "kind": "resource",
        "abstract": False,
        "type": "CarePlan",
        "baseDefinition": "http://hl7.org/fhir/StructureDefinition/CarePlan",
        "derivation": "constraint",
        "differential": {
            "element": [
                element(
                    "activity",
                    slicing={
                        "discriminator": [{"type": "exists", "path": "reference"}],
                        "rules": "closed",
                    },
                ),
                element("activity:order", sliceName="order", min=0, max="1"),
                element("activity:order.reference", min=1),
                element("activity:phase", sliceName="phase", min=1, max="*"),
                element("activity:phase.reference", max="0"),
                element("activity:phase.detail", min=1),
            ]
        },
    }
    (tmp_path / "StructureDefinition-sliced-careplan.json").write_text(json.dumps(definition))
    sliced = ProfileValidator(tmp_path)
    resource = care_plan()
    order = {"reference": {"reference": "MedicationRequest/mr1"}}
    resource["activity"].insert(0, order)
    assert sliced.issues(resource, url) == []
    resource["activity"].append(copy.deepcopy(order))
    issues = sliced.issues(resource, url)
    assert [(i["code"], i["expression"]) for i in issues] == [("structure", ["CarePlan.activity"])]
    assert "CarePlan.activity:order: max allowed = 1, but found 2" in issues[0]["diagnostics"]
    resource["activity"] = [order, {"outcomeReference": [{"reference": "Procedure/x"}]}]
    issues = sliced.issues(resource, url)
    assert [(i["code"], i["expression"]) for i in issues] == [
        ("required", ["CarePlan.activity[1].detail"])
    ]
    resource["activity"] = [order]
    issues = sliced.issues(resource, url)
    assert [(i["code"], i["expression"]) for i in issues] == [("required", ["CarePlan.activity"])]


def test_closed_slicing(tmp_path: Path) -> None:
    url = "http://example.org/fhir/StructureDefinition/closed-patient"
    definition = {
        "resourceType": "StructureDefinition",
        "url": url,
        "type": "Patient",
        "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Patient",
        "derivation": "constraint",
        "differential": {
            "element": [
                {
                    "id": "Patient.identifier",
                    "path": "Patient.identifier",
                    "slicing": {
                        "discriminator": [{"type": "value", "path": "system"}],
                        "rules": "closed",
                    },
                },
                {"id": "Patient.identifier:mrn", "path": "Patient.identifier", "sliceName": "mrn"},
                {
                    "id": "Patient.identifier:mrn.system",
                    "path": "Patient.identifier.system",
                    "fixedUri": f"{CANONICAL}/sid/mrn",
                },
            ]
        },
    }
    (tmp_path / "StructureDefinition-closed-patient.json").write_text(json.dumps(definition))
    closed = ProfileValidator(tmp_path)
    resource = patient()
    issues = closed.issues(resource, url)
    assert [(i["code"], i["expression"]) for i in issues] == [
        ("structure", ["Patient.identifier[0]"])
    ]
    resource["identifier"] = resource["identifier"][1:]
    assert closed.issues(resource, url) == []


def unguarded_validator() -> ProfileValidator:
    """A validator that evaluates every invariant in fhirpathpy, without the guards."""
    unguarded = ProfileValidator(PROFILES)
    for tree in [*unguarded._core.values(), *unguarded._trees.values()]:
        stack = [tree.root]
        while stack:
            node = stack.pop()
            for invariant in node.invariants:
                invariant.may_fail = None
            stack += [*node.children.values(), *node.slices.values()]
    return unguarded


def test_hand_written_guards_agree_with_fhirpath(validator: ProfileValidator) -> None:
    """The guards that read values (per-1's dates, ext-1, ib-mad-1, tim-4, con-3, con-5,
    ib-npi-1) skip fhirpathpy only where it says true: on both sides of each line."""
    unguarded = unguarded_validator()
    ver = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
    changes: list[tuple[Callable[[], Resource], Callable[[Resource], object]]] = [
        (encounter, lambda r: r["period"].update(end="2026-10-05T08:49:59-04:00")),
        (encounter, lambda r: r["period"].update(end="2026-10-05T08:50:00-04:00")),
        (encounter, lambda r: r["period"].update(end="2026-10-05T12:49:00Z")),
        (encounter, lambda r: r["period"].update(end="2026-10-05T08:50:00.5-04:00")),
        (encounter, lambda r: r["period"].update(start="2026-10-05", end="2026-10-04")),
        (encounter, lambda r: r["period"].update(start="2026-10-05", end="2026-10-05")),
        (encounter, lambda r: r["period"].update(start="2026-04-31", end="2026-05-01")),
        (encounter, lambda r: r["period"].update(_start={"id": "s"})),
        (condition, lambda r: r["extension"][0].update(extension=[{"url": "x"}])),
        (condition, lambda r: r["extension"][0].pop("valueBoolean")),
        (condition, lambda r: r["extension"][0].update(valueBoolean=[])),
        (medication_administration, lambda r: r.update(effectiveDateTime="2026-10-05")),
        (medication_administration, lambda r: r["effectivePeriod"].pop("end")),
        (medication_administration, lambda r: r.update(status="in-progress", dosage={})),
        (medication_administration, lambda r: r.update(_status={"id": "s"})),
        (
            care_plan,
            lambda r: r["activity"][0]["detail"]["scheduledTiming"]["repeat"].update(duration=-1),
        ),
        (
            care_plan,
            lambda r: r["activity"][0]["detail"]["scheduledTiming"]["repeat"].update(period=0.0),
        ),
        (condition, lambda r: r["verificationStatus"]["coding"][0].update(code="entered-in-error")),
        (condition, lambda r: r.update(verificationStatus={"coding": [{"system": ver}]})),
        (condition, lambda r: r.pop("clinicalStatus")),
        (condition, lambda r: (r.pop("clinicalStatus"), r.pop("category"))),
        (practitioner, lambda r: r["identifier"][0].update(value="123456789")),
        (practitioner, lambda r: r["identifier"][0].update(value="1234567893\n")),
        (practitioner, lambda r: r["identifier"].append({"system": "x", "value": "1"})),
    ]
    broken = 0
    for make, change in changes:
        resource = make()
        change(resource)
        expected = unguarded.issues(resource)
        assert validator.issues(resource) == expected, resource
        broken += any(i["code"] in ("invariant", "processing") for i in expected)
    assert broken >= 10  # the lines above do reach fhirpathpy's false


def test_issue_locations_deep_in_nested_slices(validator: ProfileValidator) -> None:
    """Locations are put together only for an issue: those of a slice inside a slice, of a
    choice's type, and of array entries, as the walk met them."""
    resource = blood_pressure()
    systolic, diastolic = resource["component"]
    systolic["code"]["coding"].append(copy.deepcopy(systolic["code"]["coding"][0]))
    diastolic["valueQuantity"].update(code="mmHg", _unit={"extension": []})
    del diastolic["valueQuantity"]["unit"]  # present through its extensions: still counted
    resource["category"].append({"text": "not a vital sign"})
    issues = validator.issues(resource)
    assert [(i["code"], i["expression"], i["diagnostics"].split(":")[0]) for i in issues] == [
        (
            "structure",
            ["Observation.component[0].code.coding"],
            "Observation.component.code.coding",
        ),
        (
            "value",
            ["Observation.component[1].value.ofType(Quantity).code"],
            "Observation.component.valueQuantity.code",
        ),
        (
            "code-invalid",
            ["Observation.component[1].value.ofType(Quantity)"],
            "Observation.component.value",
        ),
    ]
    assert "SBPCode: max allowed = 1, but found 2" in issues[0]["diagnostics"]
    assert issues == unguarded_validator().issues(resource)
