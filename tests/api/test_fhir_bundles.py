"""Batch and transaction Bundles at POST /fhir, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson
from fastapi.testclient import TestClient

from tests.fhir_check import r4_errors

FHIR = "application/fhir+json"


def observation(value: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:ehr:obs", "value": value}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {"value": 72, "system": "http://unitsofmeasure.org", "code": "/min"},
    } | extra


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def found(client: TestClient, value: str) -> list[str]:
    services = client.app.state.services  # type: ignore[attr-defined]
    from service.fhir.search import matching_ids

    with services.database.unit_of_work(write=False) as uow:
        return matching_ids(
            uow.connection,
            "Observation",
            [("identifier", f"urn:ehr:obs|{value}")],
            base="http://testserver/fhir",
            limit=10,
        )


def test_transaction_rewrites_references_and_runs_in_order(client: TestClient) -> None:
    old = client.post("/fhir/Observation", json=observation(uuid.uuid4().hex)).json()
    patched = client.post("/fhir/Observation", json=observation(uuid.uuid4().hex)).json()
    a, b, c = (uuid.uuid4().hex for _ in range(3))
    put_id = f"tx-{uuid.uuid4().hex[:10]}"
    patch = base64.b64encode(
        orjson.dumps([{"op": "replace", "path": "/status", "value": "amended"}])
    ).decode()
    sent = bundle(
        "transaction",
        {
            "fullUrl": "urn:uuid:" + a,
            "resource": observation(a),
            "request": {"method": "POST", "url": "Observation"},
        },
        {
            "fullUrl": "urn:uuid:" + b,
            "resource": observation(b, hasMember=[{"reference": "urn:uuid:" + a}]),
            "request": {"method": "POST", "url": "Observation"},
        },
        {
            "resource": observation(c, id=put_id, derivedFrom=[{"reference": "urn:uuid:" + b}]),
            "request": {"method": "PUT", "url": f"Observation/{put_id}"},
        },
        {"request": {"method": "DELETE", "url": f"Observation/{old['id']}"}},
        {
            "resource": {
                "resourceType": "Binary",
                "contentType": "application/json-patch+json",
                "data": patch,
            },
            "request": {"method": "PATCH", "url": f"Observation/{patched['id']}"},
        },
        {"request": {"method": "GET", "url": f"Observation/{patched['id']}"}},
    )
    response = client.post("/fhir", json=sent, headers={"Content-Type": FHIR})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "transaction-response"
    assert r4_errors(result) == []
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == [
        "201 Created",
        "201 Created",
        "201 Created",
        "204 No Content",
        "200 OK",
        "200 OK",
    ]
    first, second, third = (e["resource"] for e in result["entry"][:3])
    assert second["hasMember"] == [{"reference": f"Observation/{first['id']}"}]
    assert third["derivedFrom"] == [{"reference": f"Observation/{second['id']}"}]
    assert result["entry"][4]["resource"]["status"] == "amended"
    assert result["entry"][5]["resource"] == result["entry"][4]["resource"]  # GET runs last
    assert result["entry"][5]["resource"]["meta"]["versionId"] == "2"
    assert client.get(f"/fhir/Observation/{old['id']}").status_code == 410
    location = result["entry"][0]["response"]["location"]
    assert location == f"http://testserver/fhir/Observation/{first['id']}/_history/1"


def test_a_failing_entry_rolls_the_transaction_back(client: TestClient) -> None:
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    broken = observation(b)
    del broken["code"]
    response = client.post(
        "/fhir",
        json=bundle(
            "transaction",
            {"resource": observation(a), "request": {"method": "POST", "url": "Observation"}},
            {"resource": broken, "request": {"method": "POST", "url": "Observation"}},
        ),
    )
    assert response.status_code == 422, response.text
    issues = response.json()["issue"]
    assert issues
    assert all(issue["expression"][0] == "Bundle.entry[1]" for issue in issues)
    assert all(issue["diagnostics"].startswith("entry 1 (POST Observation): ") for issue in issues)
    assert r4_errors(response.json()) == []
    assert found(client, a) == []
    conflict = client.post(
        "/fhir",
        json=bundle(
            "transaction",
            {"resource": observation(a), "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "DELETE", "url": "Patient/x"}},
        ),
    )
    assert conflict.status_code == 405
    assert conflict.json()["issue"][0]["expression"] == ["Bundle.entry[1]"]
    assert found(client, a) == []


def test_conditional_create_in_a_transaction_points_references_at_the_match(
    client: TestClient,
) -> None:
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    existing = client.post("/fhir/Observation", json=observation(a)).json()
    entries = (
        {
            "fullUrl": "urn:uuid:" + a,
            "resource": observation(a),
            "request": {
                "method": "POST",
                "url": "Observation",
                "ifNoneExist": f"identifier=urn:ehr:obs|{a}",
            },
        },
        {
            "resource": observation(b, hasMember=[{"reference": "urn:uuid:" + a}]),
            "request": {"method": "POST", "url": "Observation"},
        },
    )
    result = client.post("/fhir", json=bundle("transaction", *entries)).json()
    assert [e["response"]["status"] for e in result["entry"]] == ["200 OK", "201 Created"]
    assert result["entry"][0]["resource"] == existing
    assert result["entry"][1]["resource"]["hasMember"] == [
        {"reference": f"Observation/{existing['id']}"}
    ]
    assert found(client, a) == [existing["id"]]


def test_transaction_creates_answer_what_a_read_then_serves(client: TestClient) -> None:
    values = [uuid.uuid4().hex for _ in range(5)]
    existing = client.post("/fhir/Observation", json=observation(values[4])).json()
    entries = [
        {
            "fullUrl": f"urn:uuid:{value}",
            "resource": observation(value, hasMember=[{"reference": f"urn:uuid:{values[0]}"}]),
            "request": {"method": "POST", "url": "Observation"},
        }
        for value in values[:4]
    ]
    # Run between the creates: it finds the one stored before the transaction.
    entries.insert(
        2,
        {
            "resource": observation(values[4]),
            "request": {
                "method": "POST",
                "url": "Observation",
                "ifNoneExist": f"identifier=urn:ehr:obs|{values[4]}",
            },
        },
    )
    result = client.post("/fhir", json=bundle("transaction", *entries)).json()
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == ["201 Created", "201 Created", "200 OK", "201 Created", "201 Created"]
    first = result["entry"][0]["resource"]
    assert result["entry"][2]["resource"] == existing
    for entry in result["entry"]:
        resource, response = entry["resource"], entry["response"]
        read = client.get(f"/fhir/Observation/{resource['id']}")
        assert read.json() == resource
        assert resource == existing or resource["hasMember"] == [
            {"reference": f"Observation/{first['id']}"}
        ]
        assert response == {
            "status": response["status"],
            "location": f"http://testserver/fhir/Observation/{resource['id']}/_history/1",
            "etag": 'W/"1"',
            "lastModified": resource["meta"]["lastUpdated"],
        }
        assert read.headers["ETag"] == 'W/"1"'


def test_a_failing_create_among_many_names_its_entry(client: TestClient) -> None:
    values = [uuid.uuid4().hex for _ in range(4)]
    entries = [
        {"resource": observation(value), "request": {"method": "POST", "url": "Observation"}}
        for value in values
    ]
    del entries[2]["resource"]["status"]
    entries.append({"resource": observation("x"), "request": {"method": "POST", "url": "Nope"}})
    response = client.post("/fhir", json=bundle("transaction", *entries))
    assert response.status_code == 422, response.text
    assert {issue["expression"][0] for issue in response.json()["issue"]} == {"Bundle.entry[2]"}
    del entries[2]
    response = client.post("/fhir", json=bundle("transaction", *entries))
    assert response.status_code == 404, response.text
    assert response.json()["issue"][0]["expression"] == ["Bundle.entry[3]"]
    assert all(found(client, value) == [] for value in values)


def test_batch_entries_are_independent(client: TestClient) -> None:
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    broken = observation(b)
    del broken["status"]
    response = client.post(
        "/fhir",
        json=bundle(
            "batch",
            {"resource": observation(a), "request": {"method": "POST", "url": "Observation"}},
            {"resource": broken, "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "GET", "url": "Observation/nope"}},
        ),
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "batch-response"
    assert [e["response"]["status"] for e in result["entry"]] == ["201 Created", "422", "404"]
    assert result["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert r4_errors(result) == []
    assert len(found(client, a)) == 1
    assert found(client, b) == []


def test_what_is_not_a_batch_or_transaction_is_refused(client: TestClient) -> None:
    for body, status in (
        ({"resourceType": "Patient"}, 400),
        (bundle("collection"), 400),
        (bundle("transaction", {"resource": observation("x")}), 400),
        (bundle("transaction", {"request": {"method": "BREW", "url": "Observation"}}), 400),
    ):
        response = client.post("/fhir", json=body)
        assert response.status_code == status, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
    assert client.post("/fhir", content=b"[", headers={"Content-Type": FHIR}).status_code == 400


def test_two_entries_with_one_full_url_are_refused_before_anything_is_written(
    client: TestClient,
) -> None:
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    full_url = f"urn:uuid:{uuid.uuid4()}"
    for kind in ("transaction", "batch"):
        response = client.post(
            "/fhir",
            json=bundle(
                kind,
                *(
                    {
                        "fullUrl": full_url,
                        "resource": observation(value),
                        "request": {"method": "POST", "url": "Observation"},
                    }
                    for value in (a, b)
                ),
            ),
        )
        assert response.status_code == 400, response.text
        issue = response.json()["issue"][0]
        assert issue["expression"] == ["Bundle.entry[1].fullUrl"]
        assert "bdl-7" in issue["diagnostics"]
    assert found(client, a) == []
    assert found(client, b) == []


def test_one_full_url_with_different_versions_is_no_duplicate(client: TestClient) -> None:
    # bdl-7 allows one fullUrl on entries whose meta.versionId differ.
    observation_id = uuid.uuid4().hex[:16]
    url = f"Observation/{observation_id}"
    entries = [
        {
            "fullUrl": f"http://testserver/fhir/{url}",
            "resource": observation(
                uuid.uuid4().hex, id=observation_id, meta={"versionId": version}
            ),
            "request": {"method": "PUT", "url": url},
        }
        for version in ("1", "2")
    ]
    response = client.post("/fhir", json=bundle("batch", *entries))
    assert response.status_code == 200, response.text
    assert "bdl-7" not in response.text
