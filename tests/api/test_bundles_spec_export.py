"""Bulk Data kick-off (Bulk Data Access IG v2, export.md) and `$everything` paging against the
letter of their specifications: the `Prefer` header as RFC 7240 writes it, `handling=lenient`
and `handling=strict`, and `_count` larger than a page."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import SecureApi


def observation() -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:ehr:obs", "value": uuid.uuid4().hex}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {"value": 72, "system": "http://unitsofmeasure.org", "code": "/min"},
    }


def manifest(client: TestClient, kicked_off: Any) -> dict[str, Any]:
    assert kicked_off.status_code == 202, kicked_off.text
    status = client.get(kicked_off.headers["content-location"])
    assert status.status_code == 200, status.text
    body: dict[str, Any] = status.json()
    return body


def outcome_issue(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    issue: dict[str, Any] = body["issue"][0]
    assert issue["severity"] == "error"
    return issue


@pytest.mark.parametrize(
    "prefer",
    [
        "respond-async",
        "Respond-Async",
        "respond-async, handling=lenient",
        "handling=lenient, respond-async",
        "respond-async; wait=10",  # a parameter of the preference (RFC 7240 section 2)
        "return=minimal, respond-async",
    ],
)
def test_kick_off_takes_respond_async_as_rfc_7240_writes_it(
    client: TestClient, prefer: str
) -> None:
    response = client.get("/fhir/$export?_type=Observation", headers={"Prefer": prefer})
    assert response.status_code == 202, response.text
    assert "/fhir/$export-status/" in response.headers["content-location"]


@pytest.mark.parametrize("prefer", ["respond-asyncx", "handling=lenient", "wait=respond-async"])
def test_kick_off_without_respond_async_is_a_400(client: TestClient, prefer: str) -> None:
    issue = outcome_issue(client.get("/fhir/$export", headers={"Prefer": prefer}), 400)
    assert "respond-async" in issue["diagnostics"]


@pytest.mark.parametrize("level", ["/fhir/$export", "/fhir/Patient/$export"])
@pytest.mark.parametrize(
    "query",
    ["_elements=id", "includeAssociatedData=LatestProvenanceResources", "_until=2030-01-01"],
)
def test_unsupported_parameters_are_processed_under_handling_lenient(
    client: TestClient, level: str, query: str
) -> None:
    """export.md: a server unable to support the parameter SHOULD return an error; "when a
    Prefer: handling=lenient header is included in the request, the server MAY process the
    request instead of returning an error"."""
    name = query.split("=")[0]
    issue = outcome_issue(client.get(f"{level}?{query}", headers={"Prefer": "respond-async"}), 400)
    assert issue["code"] == "not-supported"
    assert issue["expression"] == [name]
    lenient = {"Prefer": "respond-async, handling=lenient"}
    client.post("/fhir/Observation", json=observation())
    body = manifest(client, client.get(f"{level}?{query}&_type=Observation", headers=lenient))
    assert body["request"].endswith(f"?{query}&_type=Observation")
    assert body["error"] == []
    if level == "/fhir/$export":  # an Observation with no subject is in no Patient compartment
        assert [item["type"] for item in body["output"]] == ["Observation"]


def test_unsupported_types_are_left_out_under_handling_lenient(client: TestClient) -> None:
    client.post("/fhir/Observation", json=observation())
    strict_by_default = client.get(
        "/fhir/$export?_type=Observation,Spaceship", headers={"Prefer": "respond-async"}
    )
    assert outcome_issue(strict_by_default, 400)["code"] == "not-supported"
    lenient = {"Prefer": "respond-async, handling=lenient"}
    body = manifest(
        client, client.get("/fhir/$export?_type=Observation,Spaceship", headers=lenient)
    )
    assert [item["type"] for item in body["output"]] == ["Observation"]
    # Nothing left to export is still an error.
    only_unknown = client.get("/fhir/$export?_type=Spaceship", headers=lenient)
    assert outcome_issue(only_unknown, 400)["expression"] == ["_type"]


def test_a_parameter_the_ig_does_not_define_is_a_400_under_handling_strict(
    client: TestClient,
) -> None:
    strict = {"Prefer": "respond-async, handling=strict"}
    issue = outcome_issue(client.get("/fhir/$export?colour=blue", headers=strict), 400)
    assert issue["code"] == "not-supported"
    assert issue["expression"] == ["colour"]
    posted = client.post(
        "/fhir/Patient/$export",
        json={
            "resourceType": "Parameters",
            "parameter": [{"name": "colour", "valueString": "blue"}],
        },
        headers=strict,
    )
    assert outcome_issue(posted, 400)["expression"] == ["colour"]
    # Known parameters and the format parameters pass; by default an unknown one is left out.
    known = client.get("/fhir/$export?_type=Observation&_format=json", headers=strict)
    assert known.status_code == 202, known.text
    lenient_default = client.get("/fhir/$export?colour=blue", headers={"Prefer": "respond-async"})
    assert lenient_default.status_code == 202, lenient_default.text


@pytest.mark.parametrize("count", ["1001", "99999999999", "0001000"])
def test_everything_takes_a_count_larger_than_a_page(client: TestClient, count: str) -> None:
    patient = client.get("/fhir/Patient/$everything?_count=1").json()
    assert patient["type"] == "searchset"
    response = client.get(f"/fhir/Patient/$everything?_count={count}")
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "searchset"


@pytest.mark.parametrize("count", ["0", "000", "-1", "ten", ""])
def test_everything_refuses_a_count_that_is_no_positive_integer(
    client: TestClient, count: str
) -> None:
    issue = outcome_issue(client.get(f"/fhir/Patient/$everything?_count={count}"), 400)
    assert issue["expression"] == ["_count"]


def test_the_manifest_says_files_need_the_token_when_the_facade_asks_for_one(
    secure: SecureApi,
) -> None:
    """export.md: `requiresAccessToken` is true when the files are downloaded with the kick-off's
    authorization, as they are whenever the facade asks for a token."""
    headers = secure.headers("system/Observation.crs")
    created = secure.http.post("/fhir/Observation", json=observation(), headers=headers)
    assert created.status_code == 201, created.text
    kicked = secure.http.get(
        "/fhir/$export?_type=Observation", headers=headers | {"Prefer": "respond-async"}
    )
    assert kicked.status_code == 202, kicked.text
    status_url = kicked.headers["content-location"].removeprefix("http://testserver")
    deadline = time.monotonic() + 30
    while (status := secure.http.get(status_url, headers=headers)).status_code == 202:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status.status_code == 200, status.text
    body = status.json()
    assert body["requiresAccessToken"] is True
    file_url = body["output"][0]["url"].removeprefix("http://testserver")
    assert secure.http.get(file_url).status_code == 401  # without the token
    assert secure.http.get(file_url, headers=headers).status_code == 200


def test_the_manifest_says_files_need_no_token_when_the_facade_asks_for_none(
    client: TestClient,
) -> None:
    client.post("/fhir/Observation", json=observation())
    kicked = client.get("/fhir/$export?_type=Observation", headers={"Prefer": "respond-async"})
    body = manifest(client, kicked)
    assert body["requiresAccessToken"] is False
    assert client.get(body["output"][0]["url"]).status_code == 200
