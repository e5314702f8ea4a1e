"""The FHIR facade's writes through the ASGI app, on SQLite and PostgreSQL.

Create, update, patch and delete (plain and conditional), version checks, Prefer, every error as
an OperationOutcome, the official R4 examples round-tripped, and CarePlan, Patient and Condition
written back into the clinic's records.
"""

from __future__ import annotations

import json
import random
import string
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from mappings.context import resource_id
from service.fhir.api import STORED_TYPES
from service.fhir.writes import READ_ONLY_TYPES, RECORD_KINDS
from tests.factory import clinic, path_of
from tests.fhir_check import assert_valid_r4, r4_errors

FHIR = "application/fhir+json"
PATCH = {"Content-Type": "application/json-patch+json"}
SITE = "http://infusion-bridge.org/fhir/sid"


def outcome(
    code: str, diagnostics: str, expression: str | None = None, severity: str = "error"
) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression is not None:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def assert_outcome(response: Any, status: int, expected: dict[str, Any]) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR)
    body = response.json()
    assert body == expected
    assert r4_errors(body) == []


def observation(**extra: Any) -> dict[str, Any]:
    """A heart-rate Observation an EHR might send, with an identifier of its own."""
    return {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:ehr:obs", "value": uuid.uuid4().hex}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"display": "someone"},
        "effectiveDateTime": "2026-10-05T09:02:00-04:00",
        "valueQuantity": {
            "value": 72,
            "unit": "/min",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    } | extra


def without_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    out = dict(resource)
    meta = {k: v for k, v in out.pop("meta", {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        out["meta"] = meta
    return out


def assert_written(response: Any, status: int, version: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert response.headers["etag"] == f'W/"{version}"'
    assert body["meta"]["versionId"] == str(version)
    assert response.headers["location"] == (
        f"http://testserver/fhir/{body['resourceType']}/{body['id']}/_history/{version}"
    )
    assert response.headers["last-modified"].endswith(" GMT")
    assert_valid_r4(body)
    return body


def load_clinic(client: TestClient) -> Any:
    records = clinic()
    for record in records.records():
        assert client.put(path_of(record), json=record).status_code == 201
    return records


# --- create, read back ------------------------------------------------------------------------


def test_create_assigns_id_and_version(client: TestClient) -> None:
    sent = observation(id="client-chosen", meta={"versionId": "9", "source": "urn:ehr"})
    response = client.post("/fhir/Observation", json=sent, headers={"Content-Type": FHIR})
    created = assert_written(response, 201, 1)
    assert created["id"] != "client-chosen"
    assert created["meta"]["source"] == "urn:ehr"
    assert "lastUpdated" in created["meta"]
    read = client.get(f"/fhir/Observation/{created['id']}")
    assert read.json() == created
    assert read.headers["etag"] == 'W/"1"'
    assert without_server_meta(created) == without_server_meta(sent | {"id": created["id"]})


def _examples(folder: Path) -> list[Path]:
    stored_as_sent = set(STORED_TYPES) - set(RECORD_KINDS) - set(READ_ONLY_TYPES)
    return [
        path
        for path in sorted(folder.glob("*.json"))
        if path.name.split("-")[0] in stored_as_sent
        and json.loads(path.read_text(encoding="utf-8")).get("resourceType") in stored_as_sent
    ]


def test_official_examples_round_trip(client: TestClient, r4_examples: Path) -> None:
    examples = _examples(r4_examples)
    assert len(examples) >= 150
    for path in examples:
        sent = json.loads(path.read_text(encoding="utf-8"))
        resource_type = sent["resourceType"]
        created = client.post(f"/fhir/{resource_type}", json=sent)
        assert created.status_code == 201, (path.name, created.text)
        new_id = created.json()["id"]
        back = client.get(f"/fhir/{resource_type}/{new_id}").json()
        assert without_server_meta(back) == without_server_meta(sent | {"id": new_id}), path.name
        # The same example updated in place under its own id: update-as-create, then update.
        own_id = f"ex-{uuid.uuid4().hex[:12]}"
        url = f"/fhir/{resource_type}/{own_id}"
        assert client.put(url, json=sent | {"id": own_id}).status_code == 201, path.name
        again = client.put(url, json=sent | {"id": own_id, "language": "en"})
        assert again.status_code == 200, path.name
        assert without_server_meta(again.json()) == without_server_meta(
            sent | {"id": own_id, "language": "en"}
        )


def test_record_backed_examples_are_refused_with_the_path(
    client: TestClient, r4_examples: Path
) -> None:
    patient = json.loads((r4_examples / "Patient-example.json").read_text(encoding="utf-8"))
    assert_outcome(
        client.post("/fhir/Patient", json=patient),
        422,
        outcome("not-supported", f"no identifier in {SITE}/patient", "Patient.identifier"),
    )
    plan = json.loads((r4_examples / "CarePlan-example.json").read_text(encoding="utf-8"))
    response = client.put(f"/fhir/CarePlan/{plan['id']}", json=plan)
    assert response.status_code == 422, response.text
    assert client.get(f"/fhir/CarePlan/{plan['id']}").status_code == 404


# --- update and versions ----------------------------------------------------------------------


def test_update_versions_and_if_match(client: TestClient) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    url = f"/fhir/Observation/{created['id']}"
    changed = created | {"status": "amended"}
    updated = assert_written(client.put(url, json=changed, headers={"If-Match": 'W/"1"'}), 200, 2)
    assert updated["status"] == "amended"
    assert_outcome(
        client.put(url, json=changed | {"status": "final"}, headers={"If-Match": 'W/"1"'}),
        412,
        outcome(
            "conflict",
            f"Observation/{created['id']}: If-Match asked for version 1, it is at version 2",
        ),
    )
    assert client.get(url).json()["status"] == "amended"
    # The same content again is no new version.
    assert_written(client.put(url, json=updated), 200, 2)
    assert client.get(f"{url}/_history/1").json()["status"] == "final"
    assert_outcome(
        client.put(url, json=changed, headers={"If-Match": "yesterday"}),
        400,
        outcome("invalid", "If-Match 'yesterday' is not a version ETag like W/\"3\""),
    )


def test_update_as_create_with_a_client_id(client: TestClient) -> None:
    new_id = f"ehr-{uuid.uuid4().hex[:12]}"
    url = f"/fhir/Observation/{new_id}"
    assert_outcome(
        client.put(url, json=observation(id=new_id), headers={"If-Match": 'W/"1"'}),
        412,
        outcome(
            "conflict", f"Observation/{new_id}: If-Match asked for version 1, it does not exist"
        ),
    )
    created = assert_written(client.put(url, json=observation(id=new_id)), 201, 1)
    assert created["id"] == new_id


def test_prefer_return(client: TestClient) -> None:
    minimal = client.post(
        "/fhir/Observation", json=observation(), headers={"Prefer": "return=minimal"}
    )
    assert (minimal.status_code, minimal.content) == (201, b"")
    location = minimal.headers["location"]
    assert minimal.headers["etag"] == 'W/"1"'
    path = location.removeprefix("http://testserver").rsplit("/_history/", 1)[0]
    body = client.get(path).json()
    as_outcome = client.put(
        path, json=body | {"status": "amended"}, headers={"Prefer": "return=OperationOutcome"}
    )
    assert_outcome(
        as_outcome,
        200,
        outcome(
            "informational",
            f"{path.removeprefix('/fhir/')}/_history/2 updated",
            severity="information",
        ),
    )
    assert as_outcome.headers["etag"] == 'W/"2"'
    full = client.put(path, json=body, headers={"Prefer": "return=representation"})
    assert full.json()["meta"]["versionId"] == "3"


# --- errors -----------------------------------------------------------------------------------


def test_malformed_writes_are_operation_outcomes_and_store_nothing(client: TestClient) -> None:
    new_id = f"bad-{uuid.uuid4().hex[:12]}"
    url = f"/fhir/Observation/{new_id}"
    assert_outcome(
        client.put(url, content=b"{not json", headers={"Content-Type": FHIR}),
        400,
        outcome(
            "invalid",
            "the body is not valid JSON: "
            "unexpected character, expected a string key: line 1 column 2 (char 1)",
        ),
    )
    assert_outcome(
        client.put(url, content=b"<Observation/>", headers={"Content-Type": "application/xml"}),
        415,
        outcome("not-supported", "send application/fhir+json, not application/xml"),
    )
    assert_outcome(
        client.put(url, json=observation(id=new_id) | {"resourceType": "Encounter"}),
        400,
        outcome(
            "invalid", "the body is a Encounter, but the URL is for Observation", "resourceType"
        ),
    )
    assert_outcome(
        client.put(url, json=observation()),
        400,
        outcome("required", "an update's resource must carry its id", "Observation.id"),
    )
    assert_outcome(
        client.put(url, json=observation(id="other")),
        400,
        outcome("invalid", f"the body's id 'other' is not the URL's '{new_id}'", "Observation.id"),
    )
    assert_outcome(
        client.put("/fhir/Observation/" + "x" * 65, json=observation(id="x" * 65)),
        400,
        outcome("invalid", f"{'x' * 65!r} is not a FHIR id ([A-Za-z0-9-.]{{1,64}})"),
    )
    assert_outcome(
        client.post("/fhir/Observation", json=[1, 2]),
        400,
        outcome("invalid", "the body is not a FHIR resource (no resourceType)"),
    )
    assert_outcome(
        client.post("/fhir/Observation", json=observation(note=[{"text": "a\x00b"}])),
        400,
        outcome("invalid", "the body holds a NUL character"),
    )
    deep: Any = "x"
    for _ in range(200):
        deep = {"extension": [{"url": "urn:x", "valueString": "y"}], "x": deep}
    assert_outcome(
        client.post("/fhir/Observation", json=observation(text=deep)),
        400,
        outcome("invalid", "the body nests deeper than 64 levels"),
    )
    assert_outcome(
        client.post("/fhir/Invoice", json={"resourceType": "Invoice", "status": "draft"}),
        404,
        outcome("not-found", "resource type Invoice is not supported here"),
    )
    assert_outcome(
        client.put("/fhir/ValueSet/x", json={"resourceType": "ValueSet", "id": "x"}),
        405,
        outcome("not-supported", "ValueSet resources are read-only here"),
    )
    assert client.get(url).status_code == 404


def test_invalid_resources_get_every_issue(client: TestClient) -> None:
    new_id = f"bad-{uuid.uuid4().hex[:12]}"
    broken = observation(id=new_id, status="guessed", colour="red")
    del broken["code"]
    response = client.put(f"/fhir/Observation/{new_id}", json=broken)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    services = client.app.state.services  # type: ignore[attr-defined]
    assert body["issue"] == services.validator.issues(broken)
    assert len(body["issue"]) >= 2
    assert all(issue.get("expression") for issue in body["issue"])
    assert r4_errors(body) == []
    assert client.get(f"/fhir/Observation/{new_id}").status_code == 404
    unknown_profile = observation(meta={"profile": ["http://example.org/nope"]})
    refused = client.post("/fhir/Observation", json=unknown_profile)
    assert refused.status_code == 422
    assert refused.json()["issue"][0]["code"] == "not-supported"


def test_hostile_values_never_give_a_500(client: TestClient) -> None:
    noise = "".join(random.choice(string.ascii_letters) for _ in range(20000))
    # A long code is valid FHIR: stored whole, indexed by its start, found by it.
    long_code = client.post(
        "/fhir/Observation", json=observation(code={"coding": [{"system": noise, "code": "x"}]})
    )
    assert long_code.status_code == 201, long_code.text
    found = client.get(f"/fhir/Observation?_id={long_code.json()['id']}&code={noise[:256]}|x")
    assert found.json()["total"] == 1
    assert_outcome(
        client.post(
            "/fhir/Observation", json=observation(subject={"reference": "Patient/" + "p" * 65})
        ),
        422,
        outcome("value", "the reference's id is not a FHIR id", "Observation.subject.reference"),
    )
    for sent in (
        observation(identifier=[{"system": "urn:x", "value": "v" * 20000}]),
        observation(identifier=[{"system": "urn:x", "value": noise}]),
        observation(code={"text": noise}),
        observation(subject={"reference": "http://elsewhere.example/fhir/Patient/" + noise}),
        observation(subject={"reference": "Patient/" + "p" * 200}),
        observation(valueQuantity={"value": 1e308, "unit": "x"}),
        observation(effectiveDateTime="9999-12-31T23:59:59+14:00"),
        observation(note=[{"text": "\u202e\ud7ff\U0001f600" * 1000}]),
    ):
        response = client.post("/fhir/Observation", json=sent)
        assert response.status_code in (201, 400, 422), response.text
    assert (
        client.post("/fhir/Observation", content=b'{"a": 1' + b"9" * 400 + b"}").status_code == 400
    )


# --- patch ------------------------------------------------------------------------------------


def test_json_patch(client: TestClient) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    url = f"/fhir/Observation/{created['id']}"
    ops = [
        {"op": "test", "path": "/status", "value": "final"},
        {"op": "replace", "path": "/status", "value": "amended"},
        {"op": "add", "path": "/note", "value": [{"text": "re-read"}]},
    ]
    patched = assert_written(
        client.patch(url, content=orjson.dumps(ops), headers=PATCH | {"If-Match": 'W/"1"'}),
        200,
        2,
    )
    assert (patched["status"], patched["note"]) == ("amended", [{"text": "re-read"}])
    assert without_server_meta(patched) == without_server_meta(
        created | {"status": "amended", "note": [{"text": "re-read"}]}
    )
    assert_outcome(
        client.patch(url, content=orjson.dumps(ops), headers=PATCH),
        422,
        outcome(
            "processing",
            "a test operation failed: "
            "amended (<class 'str'>) is not equal to tested value final (<class 'str'>)",
        ),
    )
    assert_outcome(
        client.patch(url, content=orjson.dumps(ops[1:]), headers=PATCH | {"If-Match": 'W/"1"'}),
        412,
        outcome(
            "conflict",
            f"Observation/{created['id']}: If-Match asked for version 1, it is at version 2",
        ),
    )
    assert_outcome(
        client.patch(url, content=orjson.dumps(ops), headers={"Content-Type": "text/plain"}),
        415,
        outcome(
            "not-supported",
            "PATCH takes a JSON Patch (application/json-patch+json) or a FHIRPath Patch "
            "(application/fhir+json), not text/plain",
        ),
    )
    assert_outcome(
        client.patch(url, content=b'{"op": "replace"}', headers=PATCH),
        400,
        outcome("invalid", "a JSON Patch is an array of operation objects"),
    )
    assert_outcome(
        client.patch(url, content=b'[{"op": "jump", "path": "/status"}]', headers=PATCH),
        400,
        outcome("invalid", "not a valid JSON Patch: Unknown operation 'jump'"),
    )
    assert_outcome(
        client.patch(
            url, content=b'[{"op": "replace", "path": "/id", "value": "x"}]', headers=PATCH
        ),
        422,
        outcome("processing", "the patch changes the id", "Observation.id"),
    )
    invalid = client.patch(
        url,
        content=b'[{"op": "replace", "path": "/valueQuantity/value", "value": "a"}]',
        headers=PATCH,
    )
    assert invalid.status_code == 422
    assert invalid.json()["issue"][0]["expression"]
    assert client.get(url).json()["meta"]["versionId"] == "2"
    assert_outcome(
        client.patch("/fhir/Observation/nope", content=orjson.dumps(ops), headers=PATCH),
        404,
        outcome("not-found", "Observation/nope is not known"),
    )


# --- delete -----------------------------------------------------------------------------------


def test_delete_keeps_history_and_reads_gone(client: TestClient) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    url = f"/fhir/Observation/{created['id']}"
    assert_outcome(
        client.delete(url, headers={"If-Match": 'W/"3"'}),
        412,
        outcome(
            "conflict",
            f"Observation/{created['id']}: If-Match asked for version 3, it is at version 1",
        ),
    )
    deleted = client.delete(url)
    assert (deleted.status_code, deleted.content, deleted.headers["etag"]) == (204, b"", 'W/"2"')
    gone = client.get(url)
    assert gone.status_code == 410
    assert client.get(f"{url}/_history/1").json() == created
    methods = [e["request"]["method"] for e in client.get(f"{url}/_history").json()["entry"]]
    assert methods == ["DELETE", "POST"]
    assert client.delete(url).status_code == 204  # deleting again changes nothing
    assert client.get(f"{url}/_history").json()["entry"][0]["response"]["etag"] == 'W/"2"'
    revived = assert_written(client.put(url, json=created), 201, 3)
    assert revived["status"] == "final"
    assert client.delete(f"/fhir/Observation/never-{uuid.uuid4().hex[:8]}").status_code == 204


def test_resources_maintained_from_records_are_not_written_directly(client: TestClient) -> None:
    records = load_clinic(client)
    encounter_id = resource_id("session", records.session["external_id"], "Encounter")
    url = f"/fhir/Encounter/{encounter_id}"
    encounter = client.get(url).json()
    expected = outcome(
        "conflict",
        f"Encounter/{encounter_id} is maintained from the clinic's session records; "
        "change the record through the intake API",
        "Encounter.identifier",
    )
    assert_outcome(client.put(url, json=encounter | {"status": "cancelled"}), 409, expected)
    assert_outcome(client.delete(url), 409, expected)
    patient_id = resource_id("patient", records.patient["external_id"])
    assert_outcome(
        client.delete(f"/fhir/Patient/{patient_id}"),
        405,
        outcome(
            "not-supported",
            "Patient resources are the clinic's records and are not deleted through the facade",
        ),
    )
    assert client.get(url).json() == encounter


# --- conditional interactions -----------------------------------------------------------------


def test_conditional_create(client: TestClient) -> None:
    sent = observation()
    token = f"identifier={sent['identifier'][0]['system']}|{sent['identifier'][0]['value']}"
    first = client.post("/fhir/Observation", json=sent, headers={"If-None-Exist": token})
    created = assert_written(first, 201, 1)
    second = client.post(
        "/fhir/Observation", json=sent | {"status": "amended"}, headers={"If-None-Exist": token}
    )
    assert second.status_code == 200
    assert second.json() == created  # the existing resource, unchanged
    client.post("/fhir/Observation", json=sent)  # a plain create: now there are two
    assert_outcome(
        client.post("/fhir/Observation", json=sent, headers={"If-None-Exist": token}),
        412,
        outcome("conflict", "If-None-Exist matches 2 Observation resources"),
    )
    unknown = client.post("/fhir/Observation", json=sent, headers={"If-None-Exist": "colour=red"})
    assert unknown.status_code == 400
    assert unknown.json()["issue"][0]["severity"] == "error"
    assert_outcome(
        client.post("/fhir/Observation", json=sent, headers={"If-None-Exist": ""}),
        400,
        outcome("invalid", "a conditional interaction needs search criteria"),
    )


def test_conditional_update(client: TestClient) -> None:
    sent = observation()
    identifier = sent["identifier"][0]
    url = f"/fhir/Observation?identifier={identifier['system']}|{identifier['value']}"
    created = assert_written(client.put(url, json=sent), 201, 1)
    updated = assert_written(client.put(url, json=sent | {"status": "amended"}), 200, 2)
    assert updated["id"] == created["id"]
    assert_outcome(
        client.put(url, json=sent | {"id": "someone-else"}),
        400,
        outcome(
            "invalid",
            f"the criteria match Observation/{created['id']}, but the body's id is someone-else",
            "Observation.id",
        ),
    )
    assert_outcome(
        client.put(url, json=sent, headers={"If-Match": 'W/"1"'}),
        412,
        outcome(
            "conflict",
            f"Observation/{created['id']}: If-Match asked for version 1, it is at version 2",
        ),
    )
    client.post("/fhir/Observation", json=sent)
    assert_outcome(
        client.put(url, json=sent),
        412,
        outcome("conflict", "the criteria match 2 Observation resources: be more selective"),
    )
    assert_outcome(
        client.put("/fhir/Observation", json=sent),
        400,
        outcome("invalid", "a conditional interaction needs search criteria"),
    )


def test_conditional_delete(client: TestClient) -> None:
    sent = observation()
    identifier = sent["identifier"][0]
    url = f"/fhir/Observation?identifier={identifier['system']}|{identifier['value']}"
    assert client.delete(url).status_code == 204  # nothing matches: nothing to do
    created = client.post("/fhir/Observation", json=sent).json()
    deleted = client.delete(url)
    assert (deleted.status_code, deleted.headers["etag"]) == (204, 'W/"2"')
    assert client.get(f"/fhir/Observation/{created['id']}").status_code == 410
    client.post("/fhir/Observation", json=sent)
    client.post("/fhir/Observation", json=sent)
    assert_outcome(
        client.delete(url),
        412,
        outcome(
            "conflict",
            "the criteria match 2 Observation resources; this server deletes one at a time",
        ),
    )


# --- record-backed types map back into records ------------------------------------------------


def test_a_care_plan_changed_by_an_ehr_changes_the_course(client: TestClient) -> None:
    records = load_clinic(client)
    course = records.course
    plan_id = resource_id("course", course["external_id"], "CarePlan")
    url = f"/fhir/CarePlan/{plan_id}"
    read = client.get(url)
    plan, version = read.json(), int(read.json()["meta"]["versionId"])
    changed = plan | {"status": "on-hold", "note": [{"text": "paused by the EHR"}]}
    response = client.put(url, json=changed, headers={"If-Match": read.headers["etag"]})
    stored = assert_written(response, 200, version + 1)
    assert (stored["status"], stored["note"]) == ("on-hold", [{"text": "paused by the EHR"}])
    assert client.get(url).json() == stored
    record = client.get(path_of(course)).json()
    assert (record["status"], record["notes"]) == ("on_hold", ["paused by the EHR"])
    history = client.get(path_of(course) + "/history").json()["items"]
    assert history[-1]["version"] == 2
    assert history[-1]["patch"] is not None
    # What the course cannot hold is refused, with where it is, and nothing changes.
    weekdays = json.loads(json.dumps(stored))
    timing = weekdays["activity"][1]["detail"]["scheduledTiming"]["repeat"]
    timing["dayOfWeek"] = ["mon"]
    refused = client.put(url, json=weekdays)
    assert refused.status_code == 422, refused.text
    assert refused.json()["issue"][0]["code"] == "not-supported"
    assert refused.json()["issue"][0]["expression"][0].startswith("CarePlan.activity[1]")
    assert client.get(url).json() == stored
    assert client.get(path_of(course)).json() == record
    # A JSON Patch goes the same way.
    ops = [{"op": "replace", "path": "/status", "value": "active"}]
    patched = assert_written(
        client.patch(url, content=orjson.dumps(ops), headers=PATCH), 200, version + 2
    )
    assert patched["status"] == "active"
    assert client.get(path_of(course)).json()["status"] == "active"


def test_a_patient_and_condition_from_an_ehr_become_records(client: TestClient) -> None:
    records = load_clinic(client)
    patient_id = resource_id("patient", records.patient["external_id"])
    url = f"/fhir/Patient/{patient_id}"
    patient = client.get(url).json()
    updated = assert_written(client.put(url, json=patient | {"birthDate": "1984-03-03"}), 200, 2)
    assert updated["birthDate"] == "1984-03-03"
    assert client.get(path_of(records.patient)).json()["birth_date"] == "1984-03-03"

    # A new patient, created by an EHR, named by the site's identifier and an MRN.
    external = f"P-{uuid.uuid4().hex[:10]}"
    new_patient = {
        "resourceType": "Patient",
        "identifier": [
            {"system": f"{SITE}/patient", "value": external},
            {"system": f"{SITE}/mrn", "value": "CLN-77"},
        ],
        "name": [{"family": "Reis", "given": ["Ines"]}],
        "gender": "female",
        "birthDate": "1990-01-01",
    }
    created = assert_written(client.post("/fhir/Patient", json=new_patient), 201, 1)
    assert created["id"] == resource_id("patient", external)
    assert client.get(f"/api/v1/patients/{external}").json()["mrn"] == "CLN-77"
    again = client.post("/fhir/Patient", json=new_patient)  # the same record: nothing new
    assert (again.status_code, again.json()) == (200, created)

    diagnosis = f"D-{uuid.uuid4().hex[:10]}"
    condition = {
        "resourceType": "Condition",
        "identifier": [{"system": f"{SITE}/diagnosis", "value": diagnosis}],
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F43.10"}]},
        "subject": {"reference": f"Patient/{created['id']}"},
        "recordedDate": "2026-09-01",
    }
    no_snomed = client.post("/fhir/Condition", json=condition)
    assert_outcome(
        no_snomed,
        422,
        outcome(
            "not-supported",
            "no SNOMED CT code of an indication the clinic treats",
            "Condition.code",
        ),
    )
    services = client.app.state.services  # type: ignore[attr-defined]
    snomed = services.materializer.context.terminology.mapped("condition", "ptsd")
    condition["code"]["coding"] += snomed
    made = assert_written(client.post("/fhir/Condition", json=condition), 201, 1)
    assert made["id"] == resource_id("diagnosis", diagnosis)
    record = client.get(f"/api/v1/diagnoses/{diagnosis}").json()
    assert (record["patient"], record["condition"]) == (external, "ptsd")


@pytest.mark.parametrize("resource_type", sorted(RECORD_KINDS))
def test_record_backed_writes_refuse_a_foreign_id(client: TestClient, resource_type: str) -> None:
    records = load_clinic(client)
    ids = {
        "Patient": resource_id("patient", records.patient["external_id"]),
        "Condition": resource_id("diagnosis", records.diagnosis["external_id"]),
        "CarePlan": resource_id("course", records.course["external_id"], "CarePlan"),
    }
    current = client.get(f"/fhir/{resource_type}/{ids[resource_type]}").json()
    other = f"ehr-{uuid.uuid4().hex[:8]}"
    kind = RECORD_KINDS[resource_type]
    external = {"patient": records.patient, "diagnosis": records.diagnosis}.get(
        kind, records.course
    )["external_id"]
    assert_outcome(
        client.put(f"/fhir/{resource_type}/{other}", json=current | {"id": other}),
        400,
        outcome(
            "invalid",
            f"this {resource_type} belongs to the clinic's {kind} {external}, whose "
            f"{resource_type} id is {ids[resource_type]}, not {other}",
            f"{resource_type}.identifier",
        ),
    )
    assert client.get(f"/fhir/{resource_type}/{other}").status_code == 404
