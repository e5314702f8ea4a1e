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
