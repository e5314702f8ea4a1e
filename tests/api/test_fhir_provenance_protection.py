"""The service's own Provenance (of each record change) cannot be changed or deleted through the
facade, by any write interaction or Bundle entry; a client's Provenance stays the client's to
write. On SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import copy
import uuid
from typing import Any

import orjson
from fastapi.testclient import TestClient

from mappings.context import resource_id
from tests.api.test_fhir_write import (
    assert_outcome,
    assert_written,
    load_clinic,
    observation,
    outcome,
    without_server_meta,
)
from tests.factory import path_of

FHIR = {"Content-Type": "application/fhir+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}
SITE = "http://infusion-bridge.org/fhir/sid"
STATUS_PATCH = {
    "resourceType": "Parameters",
    "parameter": [
        {
            "name": "operation",
            "part": [
                {"name": "type", "valueCode": "add"},
                {"name": "path", "valueString": "Provenance"},
                {"name": "name", "valueString": "reason"},
                {"name": "value", "part": [{"name": "text", "valueString": "edited"}]},
            ],
        }
    ],
}


def protected(provenance_id: str, kind: str) -> dict[str, Any]:
    return outcome(
        "conflict",
        f"Provenance/{provenance_id} is the service's own record of a change to a clinic {kind} "
        "record; it is not changed or deleted through the facade",
        "Provenance.entity",
    )


def service_provenance(client: TestClient) -> tuple[Any, str, dict[str, Any]]:
    """A clinic loaded, and the Provenance of its patient record's first version."""
    records = load_clinic(client)
    provenance_id = resource_id("provenance", "patient", records.patient["external_id"], "1")
    read = client.get(f"/fhir/Provenance/{provenance_id}")
    assert read.status_code == 200, read.text
    return records, provenance_id, read.json()


def client_provenance(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Provenance",
        "target": [{"reference": f"Observation/{uuid.uuid4()}"}],
        "recorded": "2026-10-05T09:02:00-04:00",
        "agent": [{"who": {"display": "the EHR's interface engine"}}],
    } | extra


def test_every_write_of_the_services_provenance_is_refused(client: TestClient) -> None:
    _, provenance_id, stored = service_provenance(client)
    url = f"/fhir/Provenance/{provenance_id}"
    expected = protected(provenance_id, "patient")
    changed = stored | {"reason": [{"text": "edited"}]}
    assert_outcome(client.put(url, json=changed), 409, expected)
    assert_outcome(client.put(url, json=changed, headers={"If-Match": 'W/"1"'}), 409, expected)
    assert_outcome(client.patch(url, json=STATUS_PATCH, headers=FHIR), 409, expected)
    json_patch = [{"op": "add", "path": "/reason", "value": [{"text": "edited"}]}]
    assert_outcome(
        client.patch(url, content=orjson.dumps(json_patch), headers=JSON_PATCH), 409, expected
    )
    assert_outcome(client.delete(url), 409, expected)
    criteria = f"/fhir/Provenance?_id={provenance_id}"
    assert_outcome(client.put(criteria, json=changed), 409, expected)
    assert_outcome(client.delete(criteria), 409, expected)
    assert client.get(url).json() == stored
    history = client.get(f"{url}/_history").json()["entry"]
    assert len(history) == 1


def test_a_later_versions_provenance_is_protected_too(client: TestClient) -> None:
    records, _, _ = service_provenance(client)
    patient = copy.deepcopy(records.patient) | {"birth_date": "1984-03-03"}
    assert client.put(path_of(patient), json=patient).status_code == 200
    second = resource_id("provenance", "patient", patient["external_id"], "2")
    url = f"/fhir/Provenance/{second}"
    stored = client.get(url).json()
    assert_outcome(client.delete(url), 409, protected(second, "patient"))
    assert client.get(url).json() == stored
    # A session's Provenance names its session record.
    session = resource_id("provenance", "session", records.session["external_id"], "1")
    assert_outcome(
        client.patch(f"/fhir/Provenance/{session}", json=STATUS_PATCH, headers=FHIR),
        409,
        protected(session, "session"),
    )


def test_bundle_entries_are_refused_without_a_partial_write(client: TestClient) -> None:
    _, provenance_id, stored = service_provenance(client)
    target = f"Provenance/{provenance_id}"
    value = uuid.uuid4().hex
    new = observation(identifier=[{"system": "urn:ehr:obs", "value": value}])
    entries: list[dict[str, Any]] = [
        {
            "resource": stored | {"reason": [{"text": "x"}]},
            "request": {"method": "PUT", "url": target},
        },
        {"resource": STATUS_PATCH, "request": {"method": "PATCH", "url": target}},
        {
            "resource": {
                "resourceType": "Binary",
                "contentType": "application/json-patch+json",
                "data": base64.b64encode(
                    orjson.dumps([{"op": "remove", "path": "/entity"}])
                ).decode(),
            },
            "request": {"method": "PATCH", "url": target},
        },
        {"request": {"method": "DELETE", "url": target}},
    ]
    for entry in entries:
        sent = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": new, "request": {"method": "POST", "url": "Observation"}},
                entry,
            ],
        }
        method = entry["request"]["method"]
        assert_outcome(
            client.post("/fhir", json=sent),
            409,
            {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "error",
                        "code": "conflict",
                        "diagnostics": f"entry 1 ({method} {target}): "
                        + protected(provenance_id, "patient")["issue"][0]["diagnostics"],
                        "expression": ["Bundle.entry[1]", "Provenance.entity"],
                    }
                ],
            },
        )
    search = client.get(f"/fhir/Observation?identifier=urn:ehr:obs|{value}").json()
    assert search.get("entry", []) == []  # the Observation before it was rolled back
    # In a batch the refused entry fails alone.
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": new, "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "DELETE", "url": target}},
        ],
    }
    answered = client.post("/fhir", json=batch)
    assert answered.status_code == 200, answered.text
    created, refused = answered.json()["entry"]
    assert created["response"]["status"] == "201 Created"
    assert refused["response"]["status"] == "409"
    assert refused["response"]["outcome"]["issue"][0]["expression"] == [
        "Bundle.entry[1]",
        "Provenance.entity",
    ]
    assert client.get(f"/fhir/{target}").json() == stored


def test_a_clients_provenance_stays_writable(client: TestClient) -> None:
    created = assert_written(client.post("/fhir/Provenance", json=client_provenance()), 201, 1)
    url = f"/fhir/Provenance/{created['id']}"
    updated = assert_written(
        client.put(url, json=created | {"reason": [{"text": "first"}]}), 200, 2
    )
    patched = assert_written(client.patch(url, json=STATUS_PATCH, headers=FHIR), 200, 3)
    assert patched["reason"] == [{"text": "first"}, {"text": "edited"}]
    assert without_server_meta(patched) == without_server_meta(
        updated | {"reason": [{"text": "first"}, {"text": "edited"}]}
    )
    assert client.delete(url).status_code == 204


def test_a_clients_provenance_citing_a_clinic_record_stays_writable(client: TestClient) -> None:
    # Naming a clinic record as its source does not make a Provenance the service's: its id does.
    records, _, stored = service_provenance(client)
    copied = {k: v for k, v in stored.items() if k not in ("id", "meta")}
    created = assert_written(client.post("/fhir/Provenance", json=copied), 201, 1)
    assert created["entity"][0]["what"]["identifier"] == {
        "system": f"{SITE}/patient",
        "value": records.patient["external_id"],
    }
    url = f"/fhir/Provenance/{created['id']}"
    assert_written(client.patch(url, json=STATUS_PATCH, headers=FHIR), 200, 2)
    assert client.delete(url).status_code == 204
    # An id of the client's choosing is the client's too.
    own = f"prov-{uuid.uuid4().hex[:10]}"
    assert_written(client.put(f"/fhir/Provenance/{own}", json=copied | {"id": own}), 201, 1)
    assert client.delete(f"/fhir/Provenance/{own}").status_code == 204
