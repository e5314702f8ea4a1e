"""The FHIR facade's read side through the ASGI app: metadata, read, vread, history, errors."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.testclient import TestClient

from mappings.context import resource_id
from tests.factory import clinic, path_of
from tests.fhir_check import r4_errors

FHIR = "application/fhir+json"


def load(client: TestClient) -> dict[str, Any]:
    records = clinic()
    for record in records.records():
        assert client.put(path_of(record), json=record).status_code == 201
    return {
        "patient": records.patient,
        "session": records.session,
        "patient_id": resource_id("patient", records.patient["external_id"]),
        "encounter_id": resource_id("session", records.session["external_id"], "Encounter"),
    }


def assert_outcome(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == code
    assert r4_errors(body) == []


def test_metadata_is_a_valid_capability_statement(client: TestClient) -> None:
    response = client.get("/fhir/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(FHIR)
    statement = response.json()
    assert statement["fhirVersion"] == "4.0.1"
    assert r4_errors(statement) == []
    by_type = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert [i["code"] for i in by_type["Patient"]["interaction"]] == [
        "read",
        "vread",
        "history-instance",
        "history-type",
        "search-type",
        "create",
        "update",
        "patch",
    ]
    assert "delete" in [i["code"] for i in by_type["Observation"]["interaction"]]
    params = {p["name"]: p for p in by_type["Observation"]["searchParam"]}
    assert params["patient"] == {
        "name": "patient",
        "definition": "http://hl7.org/fhir/SearchParameter/clinical-patient",
        "type": "reference",
    }
    assert {"code", "date", "value-quantity", "_id", "_lastUpdated", "_profile"} <= set(params)
    assert "Observation:patient" in by_type["Observation"]["searchInclude"]
    assert "Provenance:target" in by_type["Observation"]["searchRevInclude"]
    assert [o["name"] for o in by_type["Patient"]["operation"]] == [
        "validate",
        "export",
        "everything",
    ]
    rest = statement["rest"][0]
    assert [i["code"] for i in rest["interaction"]] == ["transaction", "batch"]
    assert [o["name"] for o in rest["operation"]] == ["export"]
    assert by_type["Patient"]["supportedProfile"] == [
        "http://infusion-bridge.org/fhir/StructureDefinition/ib-patient"
    ]
    assert [i["code"] for i in by_type["StructureDefinition"]["interaction"]] == ["read"]


def test_the_write_flags_are_stated_only_for_the_writes_a_type_takes(
    client: TestClient,
) -> None:
    statement = client.get("/fhir/metadata").json()
    flags = ("updateCreate", "conditionalCreate", "conditionalUpdate", "conditionalDelete")
    needs = dict(zip(flags, ("update", "create", "update", "delete"), strict=True))
    for entry in statement["rest"][0]["resource"]:
        codes = {i["code"] for i in entry["interaction"]}
        for flag, interaction in needs.items():
            assert (flag in entry) == (interaction in codes), (entry["type"], flag)
    by_type = {r["type"]: r for r in statement["rest"][0]["resource"]}
    audit = by_type["AuditEvent"]
    assert not set(flags) & set(audit), audit
    refused = client.post(
        "/fhir/AuditEvent",
        content=b'{"resourceType":"AuditEvent"}',
        headers={"Content-Type": FHIR},
    )
    assert refused.status_code == 405
    assert "conditionalDelete" not in by_type["Patient"]
    assert by_type["Observation"]["conditionalDelete"] == "single"


def test_read_serves_the_stored_resource_with_its_version(client: TestClient) -> None:
    loaded = load(client)
    response = client.get(f"/fhir/Patient/{loaded['patient_id']}")
    assert response.status_code == 200
    assert response.headers["etag"] == 'W/"1"'
    assert response.headers["content-type"].startswith(FHIR)
    assert response.headers["last-modified"]
    patient = response.json()
    assert patient["meta"]["versionId"] == "1"
    assert patient["identifier"][0]["value"] == loaded["patient"]["external_id"]
    assert r4_errors(patient) == []


def test_vread_and_history_follow_record_changes(client: TestClient) -> None:
    loaded = load(client)
    patient = loaded["patient"]
    assert client.put(path_of(patient), json=patient | {"sex": "other"}).status_code == 200
    base = f"/fhir/Patient/{loaded['patient_id']}"
    assert client.get(base).json()["gender"] == "other"
    assert client.get(f"{base}/_history/1").json()["gender"] == "female"
    assert client.get(f"{base}/_history/2").headers["etag"] == 'W/"2"'
    assert_outcome(client.get(f"{base}/_history/3"), 404, "not-found")
    history = client.get(f"{base}/_history").json()
    assert history["type"] == "history"
    assert r4_errors(history) == []
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"2"', 'W/"1"']
    assert [e["request"]["method"] for e in history["entry"]] == ["PUT", "POST"]


def test_a_deleted_resource_is_gone_and_its_history_stays(client: TestClient) -> None:
    loaded = load(client)
    session = loaded["session"]
    bp_id = resource_id(
        "session", session["external_id"], "vitals", "2026-10-05T09:44:00-04:00", "bp"
    )
    assert client.get(f"/fhir/Observation/{bp_id}").status_code == 200
    assert (
        client.put(path_of(session), json=session | {"vitals": session["vitals"][:1]}).status_code
        == 200
    )
    gone = client.get(f"/fhir/Observation/{bp_id}")
    assert_outcome(gone, 410, "deleted")
    assert gone.headers["etag"] == 'W/"2"'
    assert client.get(f"/fhir/Observation/{bp_id}/_history/1").status_code == 200
    assert_outcome(client.get(f"/fhir/Observation/{bp_id}/_history/2"), 410, "deleted")
    methods = [
        e["request"]["method"]
        for e in client.get(f"/fhir/Observation/{bp_id}/_history").json()["entry"]
    ]
    assert methods == ["DELETE", "POST"]


def test_type_history_pages_without_repeats(client: TestClient) -> None:
    for _ in range(3):
        load(client)
    seen: list[str] = []
    url: str | None = "/fhir/Encounter/_history?_count=2"
    while url is not None:
        bundle = client.get(url).json()
        assert len(bundle["entry"]) <= 2
        seen += [e["fullUrl"] + e["response"]["etag"] for e in bundle["entry"]]
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    assert len(seen) == len(set(seen)) >= 3


def test_published_profiles_are_readable(client: TestClient) -> None:
    response = client.get("/fhir/StructureDefinition/ib-infusion-medicationadministration")
    assert response.status_code == 200
    assert response.json()["url"].endswith("/ib-infusion-medicationadministration")
    assert client.get("/fhir/CodeSystem/score-band").json()["resourceType"] == "CodeSystem"


def test_errors_are_operation_outcomes(client: TestClient) -> None:
    assert_outcome(client.get("/fhir/Patient/does-not-exist"), 404, "not-found")
    assert_outcome(client.get("/fhir/Invoice/1"), 404, "not-found")
    assert_outcome(
        client.get("/fhir/metadata", headers={"Accept": "application/fhir+xml"}),
        406,
        "not-supported",
    )
    assert_outcome(client.get("/fhir/metadata?_format=xml"), 406, "not-supported")
    assert_outcome(client.get("/fhir/Patient/_history?_count=0"), 400, "invalid")
    assert_outcome(client.get("/fhir/Patient/_history?_page=garbage"), 400, "invalid")
    assert_outcome(client.delete("/fhir/Patient/x"), 405, "not-supported")
    assert_outcome(client.get("/fhir/a/b/c/d/e"), 404, "not-found")
    assert client.get("/fhir/metadata", headers={"Accept": "application/json"}).status_code == 200
    body = orjson.loads(client.get("/fhir/Patient/x").content)
    assert body["issue"][0]["severity"] == "error"


def test_conditional_read(client: TestClient) -> None:
    loaded = load(client)
    url = f"/fhir/Patient/{loaded['patient_id']}"
    first = client.get(url)
    same = client.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert (same.status_code, same.content, same.headers["etag"]) == (304, b"", 'W/"1"')
    assert client.get(url, headers={"If-None-Match": 'W/"7"'}).status_code == 200
    since = client.get(url, headers={"If-Modified-Since": first.headers["last-modified"]})
    assert since.status_code == 304
    older = client.get(url, headers={"If-Modified-Since": "Mon, 01 Jan 2024 00:00:00 GMT"})
    assert older.status_code == 200
    assert client.get(url, headers={"If-Modified-Since": "not a date"}).status_code == 200
    patient = loaded["patient"]
    client.put(path_of(patient), json=patient | {"sex": "other"})
    changed = client.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert (changed.status_code, changed.headers["etag"]) == (200, 'W/"2"')
    version_one = client.get(f"{url}/_history/1", headers={"If-None-Match": 'W/"1"'})
    assert version_one.status_code == 304


def test_validate_operation(client: TestClient) -> None:
    loaded = load(client)
    patient = client.get(f"/fhir/Patient/{loaded['patient_id']}").json()
    ok = client.post("/fhir/Patient/$validate", json=patient)
    assert ok.status_code == 200
    assert [i["severity"] for i in ok.json()["issue"]] == ["information"]
    broken = dict(patient)
    del broken["gender"]
    found = client.post("/fhir/Patient/$validate", json=broken)
    assert found.status_code == 200
    issues = found.json()["issue"]
    assert any(
        i["severity"] == "error" and i.get("expression") == ["Patient.gender"] for i in issues
    )
    as_parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "resource", "resource": patient},
            {
                "name": "profile",
                "valueUri": "http://infusion-bridge.org/fhir/StructureDefinition/ib-practitioner",
            },
        ],
    }
    wrong_profile = client.post("/fhir/Patient/$validate", json=as_parameters).json()
    assert any(i["severity"] == "error" for i in wrong_profile["issue"])
    assert_outcome(
        client.post("/fhir/Patient/$validate", json={"resourceType": "Encounter"}), 400, "invalid"
    )
    assert_outcome(client.post("/fhir/Patient/$validate", content=b"{oops"), 400, "invalid")
    assert_outcome(
        client.post(
            "/fhir/Patient/$validate",
            content=b"<Patient/>",
            headers={"Content-Type": "application/fhir+xml"},
        ),
        415,
        "not-supported",
    )
