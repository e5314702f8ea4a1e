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


def overlap(answer: Any, failing: int, other: int) -> str:
    """The diagnostics of a transaction refused because entry `failing` resolves to the resource
    entry `other` holds (http.html#trules), after checking it names both."""
    assert answer.status_code == 400, answer.text
    (issue,) = answer.json()["issue"]
    assert issue["code"] == "invalid"
    assert issue["expression"] == [f"Bundle.entry[{failing}]", f"Bundle.entry[{other}]"]
    assert issue["diagnostics"].startswith(f"entry {failing} (")
    assert f" and entry {other} (" in issue["diagnostics"]
    return str(issue["diagnostics"])


def test_updates_that_end_at_one_resource_fail_the_transaction(client: TestClient) -> None:
    repeated, carried, named = new_values(3)
    # The same identifier twice: run in turn, the second would update what the first created.
    answer = transaction(
        client,
        put(repeated, observation(repeated)),
        put(repeated, observation(repeated, heart_rate=99)),
    )
    overlap(answer, 1, 0)
    assert holders(client, repeated) == []
    # A body that carries the identifier another entry's criteria name: the same resource.
    answer = transaction(
        client, put(carried, observation(carried, named)), put(named, observation(named))
    )
    diagnostics = overlap(answer, 1, 0)
    assert "both resolve to Observation/" in diagnostics
    assert holders(client, named) == []


def test_updates_that_depend_on_one_another_but_do_not_overlap_run_in_turn(
    client: TestClient,
) -> None:
    named, carried = new_values(2)
    # The second's body carries the identifier the first names, so they are not matched
    # together; run in turn, the first has run before it and each creates a resource of its own.
    answer = transaction(
        client, put(named, observation(named)), put(carried, observation(carried, named))
    )
    assert answer.status_code == 200, answer.text
    entries = answer.json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["201 Created", "201 Created"]
    assert entries[0]["resource"]["id"] != entries[1]["resource"]["id"]
    assert holders(client, carried) == [entries[1]["resource"]["id"]]


def test_an_update_resolving_to_what_the_transaction_created_fails_it(client: TestClient) -> None:
    (value,) = new_values(1)
    created = f"urn:uuid:{uuid.uuid4()}"
    answer = transaction(
        client,
        put(value, observation(value, heart_rate=61)),
        {
            "fullUrl": created,
            "resource": observation(value),
            "request": {"method": "POST", "url": "Observation"},
        },
    )
    # The POST runs first and creates it; the update then resolves to that same resource.
    diagnostics = overlap(answer, 0, 1)
    assert f"fullUrl {created}" in diagnostics
    assert holders(client, value) == []
