"""A transaction whose entries resolve to one resource fails as a whole (FHIR R4 http.html#trules:
"If any resource identities (including resolved identities from conditional update/delete)
overlap in steps 1-3, then the transaction SHALL fail"), naming both entries; a batch's entries
stay independent. On SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson
from fastapi.testclient import TestClient

from tests.api.test_fhir_conditional_updates import observation
from tests.fhir_check import r4_errors

FHIR = "application/fhir+json"


def send(client: TestClient, kind: str, *entries: dict[str, Any]) -> Any:
    sent = {"resourceType": "Bundle", "type": kind, "entry": list(entries)}
    return client.post("/fhir", json=sent, headers={"Content-Type": FHIR})


def put(resource: dict[str, Any], url: str, **extra: Any) -> dict[str, Any]:
    return {"resource": resource, "request": {"method": "PUT", "url": url}} | extra


def delete(url: str) -> dict[str, Any]:
    return {"request": {"method": "DELETE", "url": url}}


def patch(url: str) -> dict[str, Any]:
    operations = [{"op": "replace", "path": "/status", "value": "amended"}]
    return {
        "resource": {
            "resourceType": "Binary",
            "contentType": "application/json-patch+json",
            "data": base64.b64encode(orjson.dumps(operations)).decode(),
        },
        "request": {"method": "PATCH", "url": url},
    }


def by_identifier(value: str) -> str:
    return f"Observation?identifier=urn:ehr:obs|{value}"


def stored(client: TestClient, value: str) -> dict[str, Any]:
    """The one Observation carrying identifier `value`, as a read serves it."""
    found = client.get(f"/fhir/{by_identifier(value)}").json()
    (entry,) = found["entry"]
    resource: dict[str, Any] = entry["resource"]
    return resource


def refused(answer: Any, failing: int, other: int, identity: str) -> str:
    """Check the transaction was refused because entry `failing` resolves to `identity`, which
    entry `other` already holds; its diagnostics."""
    assert answer.status_code == 400, answer.text
    outcome = answer.json()
    assert r4_errors(outcome) == []
    (issue,) = outcome["issue"]
    assert issue["severity"] == "error"
    assert issue["code"] == "invalid"
    assert issue["expression"] == [f"Bundle.entry[{failing}]", f"Bundle.entry[{other}]"]
    diagnostics = str(issue["diagnostics"])
    assert diagnostics.startswith(f"entry {failing} (")
    assert f" and entry {other} (" in diagnostics
    assert f"both resolve to {identity}" in diagnostics
    return diagnostics


def test_two_puts_of_one_id_fail_the_transaction(client: TestClient) -> None:
    value = uuid.uuid4().hex
    given = f"twice-{value[:12]}"
    answer = send(
        client,
        "transaction",
        put(observation(value, id=given), f"Observation/{given}", fullUrl="urn:uuid:" + value),
        put(observation(value, id=given, heart_rate=90), f"Observation/{given}"),
    )
    diagnostics = refused(answer, 1, 0, f"Observation/{given}")
    assert f"entry 0 (PUT Observation/{given}, fullUrl urn:uuid:{value})" in diagnostics
    assert client.get(f"/fhir/Observation/{given}").status_code == 404  # nothing was written


def test_a_put_and_a_delete_of_one_resource_fail_it(client: TestClient) -> None:
    value = uuid.uuid4().hex
    existing = client.post("/fhir/Observation", json=observation(value)).json()
    url = f"Observation/{existing['id']}"
    answer = send(
        client,
        "transaction",
        put(observation(value, id=existing["id"], heart_rate=90), url),
        delete(url),
    )
    # The DELETE runs first (step 1): the PUT is the entry that finds it taken.
    refused(answer, 0, 1, url)
    assert client.get(f"/fhir/{url}").json() == existing


def test_a_patch_of_what_another_entry_puts_fails_it(client: TestClient) -> None:
    value = uuid.uuid4().hex
    existing = client.post("/fhir/Observation", json=observation(value)).json()
    url = f"Observation/{existing['id']}"
    answer = send(
        client,
        "transaction",
        patch(url),
        put(observation(value, id=existing["id"], heart_rate=90), url),
    )
    refused(answer, 1, 0, url)
    assert client.get(f"/fhir/{url}").json() == existing


def test_conditional_updates_matching_one_resource_fail_it(client: TestClient) -> None:
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    existing = client.post("/fhir/Observation", json=observation(a, b)).json()
    # Each body keeps only its own identifier: whichever ran first, the other's criteria would
    # no longer match it. Both matched it before the transaction, so they overlap.
    answer = send(
        client,
        "transaction",
        put(observation(a, heart_rate=80), by_identifier(a)),
        put(observation(b, heart_rate=90), by_identifier(b)),
    )
    refused(answer, 1, 0, f"Observation/{existing['id']}")
    assert stored(client, a) == existing


def test_a_conditional_update_resolving_to_an_id_another_entry_puts_fails_it(
    client: TestClient,
) -> None:
    value = uuid.uuid4().hex
    existing = client.post("/fhir/Observation", json=observation(value)).json()
    url = f"Observation/{existing['id']}"
    renamed = observation(uuid.uuid4().hex, id=existing["id"])
    for entries in (
        # The PUT by id runs first and drops the identifier the other names: still the
        # resource that one matched.
        (put(renamed, url), put(observation(value), by_identifier(value))),
        (put(observation(value), by_identifier(value)), put(renamed, url)),
    ):
        answer = send(client, "transaction", *entries)
        conditional = 1 if entries[1]["request"]["url"] != url else 0
        refused(answer, conditional, 1 - conditional, url)
        assert client.get(f"/fhir/{url}").json() == existing


def test_a_conditional_delete_and_update_of_one_resource_fail_it(client: TestClient) -> None:
    value = uuid.uuid4().hex
    existing = client.post("/fhir/Observation", json=observation(value)).json()
    answer = send(
        client,
        "transaction",
        put(observation(value, heart_rate=90), by_identifier(value)),
        delete(f"Observation?identifier=urn:ehr:obs|{value}&status=final"),
    )
    refused(answer, 0, 1, f"Observation/{existing['id']}")
    assert stored(client, value) == existing


def test_a_conditional_create_matching_what_another_entry_updates_fails_it(
    client: TestClient,
) -> None:
    value = uuid.uuid4().hex
    existing = client.post("/fhir/Observation", json=observation(value)).json()
    url = f"Observation/{existing['id']}"
    answer = send(
        client,
        "transaction",
        put(observation(value, id=existing["id"], heart_rate=90), url),
        {
            "fullUrl": f"urn:uuid:{value}",
            "resource": observation(value),
            "request": {
                "method": "POST",
                "url": "Observation",
                "ifNoneExist": f"identifier=urn:ehr:obs|{value}",
            },
        },
    )
    diagnostics = refused(answer, 1, 0, url)
    assert f"it (fullUrl urn:uuid:{value}) and entry 0" in diagnostics
    assert client.get(f"/fhir/{url}").json() == existing


def test_a_conditional_create_matching_what_the_transaction_created_fails_it(
    client: TestClient,
) -> None:
    value = uuid.uuid4().hex
    create = {"resource": observation(value), "request": {"method": "POST", "url": "Observation"}}
    conditional = {
        "resource": observation(value),
        "request": {
            "method": "POST",
            "url": "Observation",
            "ifNoneExist": f"identifier=urn:ehr:obs|{value}",
        },
    }
    answer = send(client, "transaction", create, conditional)
    diagnostics = refused(answer, 1, 0, "Observation/")
    assert "entry 1 (POST Observation)" in diagnostics
    assert client.get(f"/fhir/{by_identifier(value)}").json().get("entry") is None


def test_entries_on_different_resources_and_reads_of_them_do_not_overlap(
    client: TestClient,
) -> None:
    a, b, c = (uuid.uuid4().hex for _ in range(3))
    first = client.post("/fhir/Observation", json=observation(a)).json()
    second = client.post("/fhir/Observation", json=observation(b)).json()
    answer = send(
        client,
        "transaction",
        put(observation(a, id=first["id"], heart_rate=90), f"Observation/{first['id']}"),
        put(observation(b, heart_rate=91), by_identifier(b)),
        put(observation(c), by_identifier(c)),
        {"resource": observation(c), "request": {"method": "POST", "url": "Observation"}},
        {"request": {"method": "GET", "url": f"Observation/{first['id']}"}},
        {"request": {"method": "GET", "url": f"Observation/{second['id']}"}},
    )
    # The POST creates an Observation carrying c: the conditional update of c, run after it,
    # resolves to that one.
    refused(answer, 2, 3, "Observation/")
    del answer
    answer = send(
        client,
        "transaction",
        put(observation(a, id=first["id"], heart_rate=90), f"Observation/{first['id']}"),
        put(observation(b, heart_rate=91), by_identifier(b)),
        put(observation(c), by_identifier(c)),
        {"request": {"method": "GET", "url": f"Observation/{first['id']}"}},
        {"request": {"method": "GET", "url": f"Observation/{second['id']}"}},
    )
    # Each write names a resource of its own; the GETs, which read them, are no writes.
    assert answer.status_code == 200, answer.text
    statuses = [e["response"]["status"] for e in answer.json()["entry"]]
    assert statuses == ["200 OK", "200 OK", "201 Created", "200 OK", "200 OK"]


def test_a_batch_may_name_one_resource_in_several_entries(client: TestClient) -> None:
    value = uuid.uuid4().hex
    given = f"batch-{value[:12]}"
    url = f"Observation/{given}"
    answer = send(
        client,
        "batch",
        put(observation(value, id=given), url),
        put(observation(value, id=given, heart_rate=90), url),
        put(observation(value, heart_rate=95), by_identifier(value)),
    )
    assert answer.status_code == 200, answer.text
    statuses = [e["response"]["status"] for e in answer.json()["entry"]]
    assert statuses == ["201 Created", "200 OK", "200 OK"]
    read = client.get(f"/fhir/{url}").json()
    assert (read["meta"]["versionId"], read["valueQuantity"]["value"]) == ("3", 95)
