"""An entry of a batch fails on its own; a transaction's fails the Bundle (http.html#batch)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

FHIR = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


def observation(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:ehr:obs", "value": uuid.uuid4().hex}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {"value": 72, "system": "http://unitsofmeasure.org", "code": "/min"},
    } | extra


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post(client: TestClient, sent: dict[str, Any]) -> Any:
    return client.post("/fhir", json=sent, headers=FHIR)


def created(client: TestClient) -> str:
    response = client.post("/fhir/Observation", json=observation(), headers=FHIR)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


# --- a version that is no ASCII number --------------------------------------------------------


@pytest.mark.parametrize("kind", ["batch", "transaction"])
@pytest.mark.parametrize("version", ["²", "\u0661", "1²", "0x1", "1234567890"])
def test_a_get_of_a_version_that_is_no_number_is_a_404_not_a_500(
    client: TestClient, kind: str, version: str
) -> None:
    resource_id = created(client)
    url = f"Observation/{resource_id}/_history/{version}"
    response = post(client, bundle(kind, {"request": {"method": "GET", "url": url}}))
    if kind == "batch":
        assert response.status_code == 200, response.text
        entry = response.json()["entry"][0]
        assert entry["response"]["status"] == "404", entry
        issue = entry["response"]["outcome"]["issue"][0]
        assert issue["code"] == "not-found"
        assert f"no version {version}" in issue["diagnostics"]
    else:
        assert response.status_code == 404, response.text
        assert response.json()["issue"][0]["code"] == "not-found"


@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_a_get_of_a_version_by_its_number_still_reads_it(client: TestClient, kind: str) -> None:
    resource_id = created(client)
    url = f"Observation/{resource_id}/_history/1"
    response = post(client, bundle(kind, {"request": {"method": "GET", "url": url}}))
    assert response.status_code == 200, response.text
    entry = response.json()["entry"][0]
    assert entry["response"]["status"] == "200 OK"
    assert entry["resource"]["id"] == resource_id
    assert entry["resource"]["meta"]["versionId"] == "1"


# --- a malformed ifMatch ----------------------------------------------------------------------


@pytest.mark.parametrize("tag", ['W/"1', '"1', "W/", "one", 'W/"²"'])
def test_a_malformed_if_match_fails_its_batch_entry_alone(client: TestClient, tag: str) -> None:
    resource_id = created(client)
    fresh = observation()
    sent = bundle(
        "batch",
        {"resource": fresh, "request": {"method": "POST", "url": "Observation"}},
        {
            "resource": observation(id=resource_id, status="amended"),
            "request": {"method": "PUT", "url": f"Observation/{resource_id}", "ifMatch": tag},
        },
        {"request": {"method": "GET", "url": f"Observation/{resource_id}"}},
    )
    response = post(client, sent)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert [entry["response"]["status"] for entry in entries] == ["201 Created", "400", "200 OK"]
    outcome = entries[1]["response"]["outcome"]
    assert outcome["resourceType"] == "OperationOutcome"
    [issue] = outcome["issue"]
    assert issue["severity"] == "error"
    assert issue["code"] == "invalid"
    assert issue["diagnostics"].startswith(f"entry 1 (PUT Observation/{resource_id}): If-Match")
    assert issue["expression"] == ["Bundle.entry[1]", "Bundle.entry[1].request.ifMatch"]
    assert "resource" not in entries[1]
    # The failed entry wrote nothing; the others ran.
    assert entries[2]["resource"]["status"] == "final"
    assert entries[2]["resource"]["meta"]["versionId"] == "1"
    location = entries[0]["response"]["location"]
    assert client.get(location.split("/_history/")[0], headers=FHIR).status_code == 200


def test_a_malformed_if_match_fails_a_transaction_naming_its_entry(client: TestClient) -> None:
    resource_id = created(client)
    fresh = observation()
    sent = bundle(
        "transaction",
        {"resource": fresh, "request": {"method": "POST", "url": "Observation"}},
        {
            "resource": observation(id=resource_id, status="amended"),
            "request": {"method": "PUT", "url": f"Observation/{resource_id}", "ifMatch": 'W/"1'},
        },
    )
    response = post(client, sent)
    assert response.status_code == 400, response.text
    [issue] = response.json()["issue"]
    assert issue["code"] == "invalid"
    assert issue["diagnostics"].startswith(f"entry 1 (PUT Observation/{resource_id}): If-Match")
    assert issue["expression"] == ["Bundle.entry[1].request.ifMatch"]
    # Nothing was written: the update did not happen, nor the create.
    read = client.get(f"/fhir/Observation/{resource_id}", headers=FHIR).json()
    assert read["meta"]["versionId"] == "1"
    identifier = fresh["identifier"][0]
    search = client.get(
        "/fhir/Observation",
        params={"identifier": f"{identifier['system']}|{identifier['value']}"},
        headers=FHIR,
    ).json()
    assert search.get("total", len(search.get("entry", []))) == 0


@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_a_well_formed_stale_if_match_is_still_a_412(client: TestClient, kind: str) -> None:
    resource_id = created(client)
    sent = bundle(
        kind,
        {
            "resource": observation(id=resource_id, status="amended"),
            "request": {"method": "PUT", "url": f"Observation/{resource_id}", "ifMatch": 'W/"7"'},
        },
    )
    response = post(client, sent)
    if kind == "batch":
        assert response.status_code == 200, response.text
        assert response.json()["entry"][0]["response"]["status"] == "412"
    else:
        assert response.status_code == 412, response.text
