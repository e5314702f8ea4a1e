"""The R4 core resources' required bindings (status, intent, gender ...) hold for every resource,
whatever profile it claims or does not claim."""

from __future__ import annotations

from service.fhir.profile_validation import default_validator

VALIDATOR = default_validator()


def test_a_status_outside_its_required_value_set_is_an_error() -> None:
    issues = VALIDATOR.issues(
        {"resourceType": "Observation", "id": "x", "status": "maybe", "code": {"text": "x"}}
    )
    assert issues == [
        {
            "severity": "error",
            "code": "code-invalid",
            "diagnostics": "Observation.status: maybe is not in the required ValueSet "
            "http://hl7.org/fhir/ValueSet/observation-status "
            "(http://hl7.org/fhir/StructureDefinition/Observation)",
            "expression": ["Observation.status"],
        }
    ]


def test_codes_inside_backbone_elements_are_checked_too() -> None:
    plan = {
        "resourceType": "CarePlan",
        "id": "x",
        "status": "active",
        "intent": "plan",
        "subject": {"reference": "Patient/p"},
        "activity": [{"detail": {"status": "half-done"}}],
    }
    (issue,) = VALIDATOR.issues(plan)
    assert issue["expression"] == ["CarePlan.activity[0].detail.status"]
    assert "half-done" in issue["diagnostics"]


def test_codes_in_their_value_sets_pass() -> None:
    patient = {"resourceType": "Patient", "id": "x", "gender": "female"}
    assert VALIDATOR.issues(patient) == []
    assert VALIDATOR.issues(patient | {"gender": "woman"})[0]["code"] == "code-invalid"
