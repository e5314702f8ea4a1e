"""`$validate` (operation-resource-validate.html) on hostile input: always an OperationOutcome,
never a 500."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

FHIR = {"Content-Type": "application/fhir+json"}


def nested_extensions(depth: int) -> bytes:
    """An Observation whose extensions nest `depth` deep (two JSON levels each)."""
    return (
        b'{"resourceType":"Observation","status":"final","code":{"text":"x"},"extension":'
        + b'[{"url":"http://example.org/x","extension":' * depth
        + b'[{"url":"http://example.org/y","valueString":"end"}]'
        + b"}]" * depth
        + b"}"
    )


@pytest.mark.parametrize("depth", [40, 126, 200, 260])
def test_a_resource_nested_deeper_than_a_write_takes_is_an_error_issue(
    client: TestClient, depth: int
) -> None:
    body = nested_extensions(depth)
    response = client.post("/fhir/Observation/$validate", content=body, headers=FHIR)
    assert response.status_code == 200, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert [issue["code"] for issue in outcome["issue"]] == ["too-costly"]
    assert outcome["issue"][0]["severity"] == "error"
    # What a write of it answers: refused, never stored.
    assert client.post("/fhir/Observation", content=body, headers=FHIR).status_code == 400
    # The same resource inside Parameters is checked the same way.
    wrapped = (
        b'{"resourceType":"Parameters","parameter":[{"name":"resource","resource":' + body + b"}]}"
    )
    inside = client.post("/fhir/Observation/$validate", content=wrapped, headers=FHIR)
    assert inside.status_code == 200, inside.text
    assert [issue["code"] for issue in inside.json()["issue"]] == ["too-costly"]


def test_a_resource_nested_within_the_limit_is_validated(client: TestClient) -> None:
    response = client.post(
        "/fhir/Observation/$validate", content=nested_extensions(20), headers=FHIR
    )
    assert response.status_code == 200, response.text
    codes = [issue["code"] for issue in response.json()["issue"]]
    assert "too-costly" not in codes


OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
}


def _parameters(*parameters: dict[str, object]) -> dict[str, object]:
    return {"resourceType": "Parameters", "parameter": list(parameters)}


def _codes(response: object) -> list[tuple[str, str]]:
    outcome = response.json()  # type: ignore[attr-defined]
    assert outcome["resourceType"] == "OperationOutcome"
    return [(issue["severity"], issue["code"]) for issue in outcome["issue"]]


def test_an_instance_is_validated_for_an_update_of_that_id(client: TestClient) -> None:
    mine = OBSERVATION | {"id": "obs-1"}
    valid = client.post("/fhir/Observation/obs-1/$validate", json=mine, headers=FHIR)
    assert valid.status_code == 200, valid.text
    assert _codes(valid) == [("information", "informational")]
    other = client.post("/fhir/Observation/obs-2/$validate", json=mine, headers=FHIR)
    assert other.status_code == 400
    assert other.json()["issue"][0]["expression"] == ["id"]
    # For an update, at the type's level, the resource must carry its id.
    no_id = client.post("/fhir/Observation/$validate?mode=update", json=OBSERVATION, headers=FHIR)
    assert ("error", "required") in _codes(no_id)


def test_mode_delete_says_whether_the_type_is_deleted_here(client: TestClient) -> None:
    deletable = client.post("/fhir/Observation/obs-1/$validate?mode=delete")
    assert _codes(deletable) == [("information", "informational")]
    kept = client.post(
        "/fhir/Patient/p-1/$validate",
        json=_parameters({"name": "mode", "valueCode": "delete"}),
        headers=FHIR,
    )
    assert kept.status_code == 200, kept.text
    assert _codes(kept) == [("error", "not-supported")]
    at_type_level = client.post("/fhir/Observation/$validate?mode=delete", json=OBSERVATION)
    assert at_type_level.status_code == 400


def test_the_profile_and_mode_may_come_in_the_url(client: TestClient) -> None:
    unknown = "http://example.org/StructureDefinition/none"
    in_url = client.post(
        f"/fhir/Observation/$validate?profile={unknown}", json=OBSERVATION, headers=FHIR
    )
    in_body = client.post(
        "/fhir/Observation/$validate",
        json=_parameters(
            {"name": "resource", "resource": OBSERVATION}, {"name": "profile", "valueUri": unknown}
        ),
        headers=FHIR,
    )
    assert in_url.status_code == in_body.status_code == 200
    assert _codes(in_url) == _codes(in_body)
    assert any(severity == "error" for severity, _ in _codes(in_url)), in_url.text
    bad_mode = client.post("/fhir/Observation/$validate?mode=erase", json=OBSERVATION)
    assert bad_mode.status_code == 400
    assert bad_mode.json()["issue"][0]["code"] == "invalid"


@pytest.mark.parametrize(
    "parameters",
    [
        [{"name": "resource", "resource": OBSERVATION}, {"name": "resource", "resource": {}}],
        [{"name": "resource", "resource": OBSERVATION}, {"name": "profile", "valueUri": 7}],
        [{"name": "resource", "resource": OBSERVATION}, {"name": "mode", "valueCode": "erase"}],
        [{"name": "resource", "resource": "Observation"}],
        ["resource"],
    ],
)
def test_parameters_that_cannot_be_meant_are_a_400(
    client: TestClient, parameters: list[object]
) -> None:
    body = {"resourceType": "Parameters", "parameter": parameters}
    response = client.post("/fhir/Observation/$validate", json=body, headers=FHIR)
    assert response.status_code == 400, response.text
    assert response.json()["issue"][0]["code"] == "invalid"


def test_a_read_only_type_is_validated_with_its_refusal(client: TestClient) -> None:
    event = {
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110100"},
        "recorded": "2026-12-01T09:00:00Z",
        "agent": [{"requestor": True, "who": {"display": "x"}}],
        "source": {"observer": {"display": "x"}},
    }
    response = client.post("/fhir/AuditEvent/$validate", json=event, headers=FHIR)
    assert response.status_code == 200, response.text
    assert ("error", "not-supported") in _codes(response)
