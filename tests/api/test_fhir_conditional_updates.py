"""Conditional updates by identifier in a transaction, as an EHR feed sends them: matched and
written together, with the outcome of running each in turn, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi.testclient import TestClient

from service.fhir.search import matching_ids

FHIR = "application/fhir+json"


def observation(*values: str, heart_rate: int = 72, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:ehr:obs", "value": value} for value in values],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {
            "value": heart_rate,
            "unit": "/min",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    } | extra


def put(value: str, resource: dict[str, Any]) -> dict[str, Any]:
    return {
        "resource": resource,
        "request": {"method": "PUT", "url": f"Observation?identifier=urn:ehr:obs|{value}"},
    }


def transaction(client: TestClient, *entries: dict[str, Any]) -> Any:
    sent = {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}
    return client.post("/fhir", json=sent, headers={"Content-Type": FHIR})


def holders(client: TestClient, value: str) -> list[str]:
    """The ids of the Observations carrying identifier `value`."""
    services = client.app.state.services  # type: ignore[attr-defined]
    with services.database.unit_of_work(write=False) as uow:
        return matching_ids(
            uow.connection,
            "Observation",
            [("identifier", f"urn:ehr:obs|{value}")],
            base="http://testserver/fhir",
            limit=10,
        )


def new_values(count: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(count)]


def test_each_update_goes_where_its_identifier_says(client: TestClient) -> None:
    changed, fresh, same, chosen = new_values(4)
    old = client.post("/fhir/Observation", json=observation(changed)).json()
    kept = client.post("/fhir/Observation", json=observation(same)).json()
    given = f"given-{uuid.uuid4().hex[:12]}"
    answer = transaction(
        client,
        put(changed, observation(changed, heart_rate=80)),
        put(fresh, observation(fresh)),
        put(same, observation(same)),
        put(chosen, observation(chosen, id=given)),
    )
    assert answer.status_code == 200, answer.text
    entries = answer.json()["entry"]
    assert [e["response"]["status"] for e in entries] == [
        "200 OK",
        "201 Created",
        "200 OK",
        "201 Created",
    ]
    assert entries[0]["resource"]["id"] == old["id"]
    assert entries[0]["resource"]["meta"]["versionId"] == "2"
    assert entries[0]["resource"]["valueQuantity"]["value"] == 80
    assert holders(client, fresh) == [entries[1]["resource"]["id"]]
    # The same content again is no new version.
    assert entries[2]["resource"]["id"] == kept["id"]
    assert entries[2]["resource"]["meta"]["versionId"] == "1"
    assert entries[3]["resource"]["id"] == given
    read = client.get(f"/fhir/Observation/{old['id']}").json()
    assert read["valueQuantity"]["value"] == 80
    assert read["meta"]["versionId"] == "2"


def test_an_update_matching_several_fails_the_transaction_naming_it(client: TestClient) -> None:
    fresh, twice = new_values(2)
    for _ in range(2):
        client.post("/fhir/Observation", json=observation(twice))
    answer = transaction(
        client, put(fresh, observation(fresh)), put(twice, observation(twice, heart_rate=90))
    )
    assert answer.status_code == 412, answer.text
    assert "entry 1" in answer.json()["issue"][0]["diagnostics"]
    assert holders(client, fresh) == []  # rolled back: the first entry's create too


def test_a_body_id_other_than_the_match_is_refused(client: TestClient) -> None:
    (value,) = new_values(1)
    client.post("/fhir/Observation", json=observation(value))
    answer = transaction(client, put(value, observation(value, id="someone-else")))
    assert answer.status_code == 400, answer.text
    assert "entry 0" in answer.json()["issue"][0]["diagnostics"]


def test_an_invalid_update_is_refused_naming_it(client: TestClient) -> None:
    first, second = new_values(2)
    answer = transaction(
        client, put(first, observation(first)), put(second, observation(second, status="nope"))
    )
    assert answer.status_code in (400, 422), answer.text
    assert "entry 1" in answer.json()["issue"][0]["diagnostics"]
    assert holders(client, first) == []


def test_updates_that_depend_on_one_another_run_in_turn(client: TestClient) -> None:
    repeated, carried, named = new_values(3)
    # The same identifier twice: the second updates what the first created.
    answer = transaction(
        client,
        put(repeated, observation(repeated)),
        put(repeated, observation(repeated, heart_rate=99)),
    )
    assert answer.status_code == 200, answer.text
    assert len(holders(client, repeated)) == 1
    # A body that carries the identifier another entry's criteria name.
    answer = transaction(
        client, put(carried, observation(carried, named)), put(named, observation(named))
    )
    assert answer.status_code == 200, answer.text
    assert len(holders(client, named)) == 1


def test_an_update_sees_what_the_transaction_created_before_it(client: TestClient) -> None:
    (value,) = new_values(1)
    answer = transaction(
        client,
        put(value, observation(value, heart_rate=61)),
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": observation(value),
            "request": {"method": "POST", "url": "Observation"},
        },
    )
    assert answer.status_code == 200, answer.text
    created, updated = answer.json()["entry"][1], answer.json()["entry"][0]
    assert created["response"]["status"] == "201 Created"
    assert updated["response"]["status"] == "200 OK"
    assert updated["resource"]["id"] == created["resource"]["id"]
    assert holders(client, value) == [created["resource"]["id"]]
