"""Batch and transaction Bundles against the letter of FHIR R4 (http.html#transaction,
bundle.html#references), on SQLite and PostgreSQL: entry requests, references between entries,
conditional reads, `Prefer: return` and the shape of the response Bundle."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.fhir_check import r4_errors

FHIR = {"Content-Type": "application/fhir+json"}


def observation(value: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:ehr:obs", "value": value or uuid.uuid4().hex}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {"value": 72, "system": "http://unitsofmeasure.org", "code": "/min"},
    } | extra


def encounter() -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    }


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post(client: TestClient, sent: dict[str, Any], **headers: str) -> Any:
    return client.post("/fhir", json=sent, headers=FHIR | headers)


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def stored(client: TestClient, resource_type: str, resource_id: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{resource_type}/{resource_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def issue_of(response: Any) -> dict[str, Any]:
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    first: dict[str, Any] = outcome["issue"][0]
    return first


# --- entry requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_part", "named"),
    [
        ({"method": "PUT", "url": "Observation/x1", "ifMatch": 1}, "ifMatch"),
        ({"method": ["POST"], "url": "Observation"}, "method"),
        ({"method": "POST", "url": "Observation", "ifNoneExist": 5}, "ifNoneExist"),
        ({"method": "GET", "url": "Observation/x1", "ifNoneMatch": ["1"]}, "ifNoneMatch"),
        ({"method": "GET", "url": "Observation/x1", "ifModifiedSince": "yesterday"}, "ifModified"),
    ],
)
@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_entry_request_elements_of_the_wrong_type_are_a_400(
    client: TestClient, kind: str, request_part: dict[str, Any], named: str
) -> None:
    sent = bundle(kind, {"resource": observation(id="x1"), "request": request_part})
    response = post(client, sent)
    assert response.status_code == 400, response.text
    issue = issue_of(response)
    assert issue["code"] == "invalid"
    assert issue["expression"][0].startswith("Bundle.entry[0].request")
    assert named in issue["diagnostics"] or named == "method"


def test_a_full_url_that_is_not_a_string_is_a_400(client: TestClient) -> None:
    sent = bundle(
        "transaction",
        {
            "fullUrl": 5,
            "resource": observation(),
            "request": {"method": "POST", "url": "Observation"},
        },
    )
    response = post(client, sent)
    assert response.status_code == 400, response.text
    assert issue_of(response)["expression"] == ["Bundle.entry[0].fullUrl"]


def test_a_delete_of_a_version_url_deletes_nothing(client: TestClient) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    for url in (
        f"Observation/{created['id']}/_history/1",
        f"Observation/{created['id']}/extra",
        f"Observation/{created['id']}?status=final",
    ):
        response = post(
            client, bundle("transaction", {"request": {"method": "DELETE", "url": url}})
        )
        assert response.status_code == 400, response.text
        issue = issue_of(response)
        assert issue["code"] == "not-supported"
        assert issue["expression"] == ["Bundle.entry[0].request.url"]
    assert client.get(f"/fhir/Observation/{created['id']}").status_code == 200


@pytest.mark.parametrize(
    "request_part",
    [
        {"method": "POST", "url": "Observation/abc"},
        {"method": "PUT", "url": "Observation/abc/_history/2"},
        {"method": "PATCH", "url": "Observation/abc/_history/2"},
    ],
)
def test_urls_that_do_not_fit_the_interaction_are_refused(
    client: TestClient, request_part: dict[str, Any]
) -> None:
    sent = bundle("transaction", {"resource": observation(id="abc"), "request": request_part})
    response = post(client, sent)
    assert response.status_code == 400, response.text
    assert issue_of(response)["expression"] == ["Bundle.entry[0].request.url"]
    assert client.get("/fhir/Observation/abc").status_code in (404, 410)


# --- the response Bundle --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["batch", "transaction"])
@pytest.mark.parametrize("entries", [None, []])
def test_an_empty_bundle_answers_a_valid_response_bundle(
    client: TestClient, kind: str, entries: list[Any] | None
) -> None:
    sent: dict[str, Any] = {"resourceType": "Bundle", "type": kind}
    if entries is not None:
        sent["entry"] = entries
    response = post(client, sent)
    assert response.status_code == 200, response.text
    # FHIR JSON has no empty arrays: an answer with `"entry": []` is not valid R4.
    assert response.json() == {"resourceType": "Bundle", "type": f"{kind}-response"}
    assert r4_errors(response.json()) == []


def test_a_head_entry_answers_without_a_body(client: TestClient) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    sent = bundle(
        "batch",
        {"request": {"method": "HEAD", "url": f"Observation/{created['id']}"}},
        {"request": {"method": "HEAD", "url": "Observation?_count=1"}},
    )
    response = post(client, sent)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["200 OK", "200 OK"]
    assert entries[0]["response"]["etag"] == 'W/"1"'
    assert all("resource" not in e for e in entries)


@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_conditional_read_entries_answer_304_when_the_client_has_the_version(
    client: TestClient, kind: str
) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    url = f"Observation/{created['id']}"
    last_updated = created["meta"]["lastUpdated"]
    sent = bundle(
        kind,
        {"request": {"method": "GET", "url": url, "ifNoneMatch": 'W/"1"'}},
        {"request": {"method": "GET", "url": url, "ifNoneMatch": 'W/"2"'}},
        {"request": {"method": "GET", "url": url, "ifModifiedSince": last_updated}},
        {"request": {"method": "GET", "url": url, "ifModifiedSince": "2001-01-01T00:00:00Z"}},
        {"request": {"method": "GET", "url": f"{url}/_history/1", "ifNoneMatch": 'W/"1"'}},
    )
    response = post(client, sent)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert [e["response"]["status"] for e in entries] == [
        "304 Not Modified",
        "200 OK",
        "304 Not Modified",
        "200 OK",
        "304 Not Modified",
    ]
    for index in (0, 2, 4):
        assert "resource" not in entries[index]
        assert entries[index]["response"]["etag"] == 'W/"1"'
    assert entries[1]["resource"]["id"] == created["id"]
    assert entries[3]["resource"]["id"] == created["id"]


@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_prefer_return_operation_outcome_answers_an_outcome_per_entry(
    client: TestClient, kind: str
) -> None:
    existing = client.post("/fhir/Observation", json=observation()).json()
    sent = bundle(
        kind,
        {"resource": observation(), "request": {"method": "POST", "url": "Observation"}},
        {"request": {"method": "DELETE", "url": f"Observation/{existing['id']}"}},
        {"request": {"method": "GET", "url": "Observation?_count=1"}},
    )
    response = post(client, sent, Prefer="return=OperationOutcome")
    assert response.status_code == 200, response.text
    result = response.json()
    assert r4_errors(result) == []
    created, deleted, searched = result["entry"]
    for entry in (created, deleted):
        assert "resource" not in entry
        outcome = entry["response"]["outcome"]
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["severity"] == "information"
    assert created["response"]["status"] == "201 Created"
    assert (
        created["response"]["location"] in created["response"]["outcome"]["issue"][0]["diagnostics"]
    )
    assert searched["resource"]["type"] == "searchset"  # a search's answer is its body
