"""Bulk Data $export and Patient/$everything through the ASGI app, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from mappings.context import resource_id
from service.app import create_app
from service.bootstrap import bootstrap
from service.config import Settings
from service.store.db import Database
from service.store.export import ExportJobs
from service.store.resources import ResourceRepository
from service.store.tables import resources
from tests.api.test_fhir_read import assert_outcome
from tests.factory import Clinic, clinic, path_of
from tests.fhir_check import r4_errors

ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
MANIFEST_KEYS = {"transactionTime", "request", "requiresAccessToken", "output", "error"}
COMPARTMENT_TYPES = {
    "AdverseEvent",
    "CarePlan",
    "Condition",
    "Encounter",
    "Goal",
    "MedicationAdministration",
    "MedicationRequest",
    "Observation",
    "Patient",
    "Provenance",
    "QuestionnaireResponse",
}


def database_of(client: TestClient) -> Database:
    database: Database = client.app.state.services.database  # type: ignore[attr-defined]
    return database


def load(client: TestClient) -> Clinic:
    records = clinic()
    for record in records.records():
        assert client.put(path_of(record), json=record).status_code == 201
    return records


def patient_id(records: Clinic) -> str:
    return resource_id("patient", records.patient["external_id"])


def stored_ids(client: TestClient, resource_type: str, since: datetime) -> set[str]:
    """What the store holds now, by a query of its own (independent of the export code)."""
    with database_of(client).unit_of_work(write=False) as uow:
        rows = uow.connection.execute(
            select(resources.c.id).where(
                resources.c.resource_type == resource_type,
                resources.c.deleted.is_(False),
                resources.c.last_updated >= since,
            )
        )
        return {row.id for row in rows}


def kick_off(client: TestClient, url: str) -> str:
    response = client.get(url, headers=ASYNC)
    assert response.status_code == 202, response.text
    status_url = response.headers["content-location"]
    assert urlsplit(status_url).path.startswith("/fhir/$export-status/")
    return status_url


def manifest_of(client: TestClient, status_url: str) -> dict[str, Any]:
    response = client.get(status_url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == MANIFEST_KEYS
    assert body["requiresAccessToken"] is False
    assert body["error"] == []
    transaction_time = datetime.fromisoformat(body["transactionTime"])
    assert transaction_time.tzinfo is not None
    for item in body["output"]:
        assert set(item) == {"type", "url", "count"}
        assert item["count"] > 0
    assert len({item["type"] for item in body["output"]}) == len(body["output"])
    return body


def download(client: TestClient, manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every output file, parsed, checked against its manifest entry and R4."""
    files: dict[str, list[dict[str, Any]]] = {}
    for item in manifest["output"]:
        response = client.get(item["url"], headers={"Accept": "application/fhir+ndjson"})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/fhir+ndjson")
        lines = response.content.split(b"\n")
        assert lines[-1] == b""  # every line ends in a newline
        parsed = [orjson.loads(line) for line in lines[:-1]]
        assert len(parsed) == item["count"]
        for resource in parsed:
            assert resource["resourceType"] == item["type"]
            assert r4_errors(resource) == []
        assert len({r["id"] for r in parsed}) == len(parsed)
        files[item["type"]] = parsed
    return files


def ids(files: dict[str, list[dict[str, Any]]]) -> dict[str, set[str]]:
    return {t: {r["id"] for r in rs} for t, rs in files.items()}


def export(client: TestClient, url: str) -> tuple[dict[str, Any], dict[str, set[str]]]:
    manifest = manifest_of(client, kick_off(client, url))
    return manifest, ids(download(client, manifest))


def since_param(when: datetime) -> str:
    return when.isoformat().replace("+", "%2B")


# --- kick-off -----------------------------------------------------------------------------------


def test_kick_off_needs_respond_async(client: TestClient) -> None:
    for url in ("/fhir/$export", "/fhir/Patient/$export"):
        assert_outcome(client.get(url), 400, "invalid")
        assert_outcome(client.get(url, headers={"Prefer": "return=minimal"}), 400, "invalid")


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("_outputFormat=text/csv", 400, "not-supported"),
        ("_type=Patient,Spaceship", 400, "not-supported"),
        ("_type=,", 400, "invalid"),
        ("_since=yesterday", 400, "invalid"),
        ("_since=2026-01-01T00:00:00", 400, "invalid"),
        ("_since=2026-01-01", 400, "invalid"),
        ("_since=0001-01-01T00:00:00%2B01:00", 400, "invalid"),
        ("_typeFilter=Observation%3Fstatus%3Dfinal", 400, "not-supported"),
        ("_elements=id", 400, "not-supported"),
    ],
)
def test_kick_off_rejects_what_it_cannot_honour(
    client: TestClient, query: str, status: int, code: str
) -> None:
    assert_outcome(client.get(f"/fhir/$export?{query}", headers=ASYNC), status, code)


def test_kick_off_answers_json_only_and_patient_export_only_compartment_types(
    client: TestClient,
) -> None:
    headers = ASYNC | {"Accept": "application/fhir+xml"}
    assert_outcome(client.get("/fhir/$export", headers=headers), 406, "not-supported")
    response = client.get("/fhir/Patient/$export?_type=Practitioner", headers=ASYNC)
    assert_outcome(response, 400, "not-supported")


@pytest.mark.parametrize(
    "output_format", ["application/fhir+ndjson", "application/ndjson", "ndjson"]
)
def test_kick_off_accepts_the_ndjson_formats(client: TestClient, output_format: str) -> None:
    status_url = kick_off(client, f"/fhir/$export?_type=Patient&_outputFormat={output_format}")
    manifest_of(client, status_url)


# --- system-level export ------------------------------------------------------------------------


def test_system_export_manifest_and_files(client: TestClient) -> None:
    before = datetime.now(UTC)
    first, second = load(client), load(client)
    url = f"/fhir/$export?_since={since_param(before)}"
    manifest, exported = export(client, url)
    assert manifest["request"] == f"http://testserver{url}"
    assert datetime.fromisoformat(manifest["transactionTime"]) >= before
    assert {patient_id(first), patient_id(second)} <= exported["Patient"]
    for resource_type, found in exported.items():
        assert found == stored_ids(client, resource_type, before), resource_type
    assert {"Practitioner", "Observation", "MedicationAdministration"} <= set(exported)


def test_since_and_type_filter(client: TestClient) -> None:
    old = load(client)
    middle = datetime.now(UTC)
    new = load(client)
    manifest, exported = export(
        client, f"/fhir/$export?_type=Patient,Observation&_since={since_param(middle)}"
    )
    assert {item["type"] for item in manifest["output"]} == {"Patient", "Observation"}
    assert patient_id(new) in exported["Patient"]
    assert patient_id(old) not in exported["Patient"]
    assert exported["Observation"] == stored_ids(client, "Observation", middle)
    # An instant after everything: nothing to export, an empty output list.
    later = datetime.now(UTC) + timedelta(days=1)
    manifest, exported = export(client, f"/fhir/$export?_since={since_param(later)}")
    assert manifest["output"] == []
    assert exported == {}


def test_export_is_a_snapshot_at_its_transaction_time(client: TestClient) -> None:
    before = datetime.now(UTC)
    records = load(client)
    status_url = kick_off(client, f"/fhir/$export?_since={since_param(before)}")
    manifest = manifest_of(client, status_url)
    expected = ids(download(client, manifest))
    adverse_events = expected["AdverseEvent"]
    assert adverse_events

    # After the snapshot: the patient changes, the adverse event goes, another clinic arrives.
    patient = records.patient | {"sex": "other"}
    assert client.put(path_of(patient), json=patient).status_code == 200
    session = records.session | {"adverse_events": []}
    assert client.put(path_of(session), json=session).status_code == 200
    later = load(client)
    assert stored_ids(client, "AdverseEvent", before) != adverse_events

    again = manifest_of(client, status_url)
    assert again == manifest
    files = download(client, again)
    assert ids(files) == expected
    assert patient_id(later) not in ids(files)["Patient"]
    (mine,) = [p for p in files["Patient"] if p["id"] == patient_id(records)]
    assert mine["gender"] == "female"
    assert mine["meta"]["versionId"] == "1"


def test_cancel_forgets_the_job(client: TestClient) -> None:
    status_url = kick_off(client, "/fhir/$export?_type=Patient")
    file_url = manifest_of(client, status_url)["output"][0]["url"]
    response = client.delete(status_url)
    assert response.status_code == 202
    assert response.json()["resourceType"] == "OperationOutcome"
    assert_outcome(client.get(status_url), 404, "not-found")
    assert_outcome(client.delete(status_url), 404, "not-found")
    assert_outcome(client.get(file_url), 404, "not-found")


def test_unknown_jobs_and_files_are_not_found(client: TestClient) -> None:
    assert_outcome(client.get("/fhir/$export-status/no-such-job"), 404, "not-found")
    status_url = kick_off(client, "/fhir/$export?_type=Patient")
    job_id = status_url.rsplit("/", 1)[1]
    manifest_of(client, status_url)
    response = client.get(f"/fhir/$export-output/{job_id}/Observation.ndjson")
    assert_outcome(response, 404, "not-found")


def test_status_while_in_progress_and_an_abandoned_job_is_taken_over(client: TestClient) -> None:
    database = database_of(client)
    now = datetime.now(UTC)
    with database.unit_of_work() as uow:
        jobs = ExportJobs(uow.connection)
        running = jobs.create(
            job_id=f"running-{now.timestamp()}",
            level="system",
            request="http://testserver/fhir/$export",
            types=["Patient"],
            since=None,
            now=now,
        )
        # A job whose process died two minutes ago.
        abandoned = jobs.create(
            job_id=f"abandoned-{now.timestamp()}",
            level="system",
            request="http://testserver/fhir/$export",
            types=["Patient"],
            since=None,
            now=now - timedelta(minutes=2),
        )
        uow.commit()
    response = client.get(f"/fhir/$export-status/{running.id}")
    assert response.status_code == 202
    assert response.headers["x-progress"]
    assert int(response.headers["retry-after"]) > 0
    # Still someone else's: polling it does not run it.
    assert client.get(f"/fhir/$export-status/{running.id}").status_code == 202

    assert client.get(f"/fhir/$export-status/{abandoned.id}").status_code == 202
    manifest = manifest_of(client, f"http://testserver/fhir/$export-status/{abandoned.id}")
    assert manifest["transactionTime"] == abandoned.transaction_time.isoformat()
    download(client, manifest)


def test_a_job_is_answered_by_any_api_process(client: TestClient, database_url: str) -> None:
    """Kick-off on one process, poll and download on another (as behind a load balancer)."""
    load(client)
    status_url = kick_off(client, "/fhir/$export?_type=Patient,Encounter")
    other = bootstrap(Settings(database_url=database_url))
    with TestClient(create_app(other)) as second:
        manifest = manifest_of(second, status_url)
        assert ids(download(second, manifest)) == ids(download(client, manifest))


def test_output_is_streamed_in_chunks(client: TestClient) -> None:
    load(client)
    manifest = manifest_of(client, kick_off(client, "/fhir/$export?_type=Observation"))
    with client.stream("GET", manifest["output"][0]["url"]) as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers  # chunked, not built in memory
        body = b"".join(response.iter_bytes())
    assert body.count(b"\n") == manifest["output"][0]["count"]


# --- Patient-level export -----------------------------------------------------------------------


def test_patient_export_holds_the_compartments_and_nothing_else(client: TestClient) -> None:
    before = datetime.now(UTC)
    first, second = load(client), load(client)
    manifest, exported = export(client, f"/fhir/Patient/$export?_since={since_param(before)}")
    assert manifest["request"].endswith("/fhir/Patient/$export?_since=" + since_param(before))
    assert set(exported) <= COMPARTMENT_TYPES
    assert exported["Patient"] == {patient_id(first), patient_id(second)}
    everything = everything_keys(client, patient_id(first)) | everything_keys(
        client, patient_id(second)
    )
    in_compartments = {key for key in everything if key[0] in COMPARTMENT_TYPES}
    assert {(t, i) for t, found in exported.items() for i in found} == in_compartments
    # The system export has more: practitioners, organizations, session Provenance.
    _manifest, system = export(client, f"/fhir/$export?_since={since_param(before)}")
    assert "Practitioner" in system
    assert "Practitioner" not in exported
    assert exported["Observation"] == system["Observation"]


# --- Patient/$everything ------------------------------------------------------------------------


def everything_pages(client: TestClient, url: str) -> list[dict[str, Any]]:
    pages = []
    next_url: str | None = url
    while next_url is not None:
        response = client.get(next_url)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/fhir+json")
        bundle = response.json()
        assert bundle["resourceType"] == "Bundle"
        assert bundle["type"] == "searchset"
        assert r4_errors(bundle) == []
        pages.append(bundle)
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        next_url = links.get("next")
    return pages


def entries(pages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for page in pages for entry in page.get("entry", [])]


def everything_keys(client: TestClient, patient: str) -> set[tuple[str, str]]:
    found = entries(everything_pages(client, f"/fhir/Patient/{patient}/$everything?_count=1000"))
    return {(e["resource"]["resourceType"], e["resource"]["id"]) for e in found}


def test_everything_pages_without_gaps_or_repeats(client: TestClient) -> None:
    first, second = load(client), load(client)
    mine = patient_id(first)
    whole = entries(everything_pages(client, f"/fhir/Patient/{mine}/$everything?_count=1000"))
    paged_pages = everything_pages(client, f"/fhir/Patient/{mine}/$everything?_count=4")
    assert len(paged_pages) > 2
    assert all(len(page.get("entry", [])) <= 4 for page in paged_pages)
    paged = entries(paged_pages)
    keys = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in paged]
    assert len(keys) == len(set(keys))
    assert paged == whole
    types = {key[0] for key in keys}
    assert {"Patient", "Observation", "CarePlan", "Practitioner", "Organization"} <= types
    assert ("Patient", mine) in keys
    assert ("Patient", patient_id(second)) not in keys
    assert not set(keys) & {
        key for key in everything_keys(client, patient_id(second)) if key[0] in COMPARTMENT_TYPES
    }
    for entry in paged:
        resource = entry["resource"]
        assert entry["fullUrl"] == (
            f"http://testserver/fhir/{resource['resourceType']}/{resource['id']}"
        )
        mode = "match" if resource["resourceType"] in COMPARTMENT_TYPES else "include"
        assert entry["search"] == {"mode": mode}
        if resource["resourceType"] in COMPARTMENT_TYPES - {"Patient"}:
            assert f"Patient/{mine}".encode() in orjson.dumps(resource)


def test_everything_serves_the_stored_bytes(client: TestClient) -> None:
    mine = patient_id(load(client))
    raw = client.get(f"/fhir/Patient/{mine}/$everything?_type=Patient").content
    stored = client.get(f"/fhir/Patient/{mine}").content
    assert b'"resource":' + stored + b"," in raw


def test_everything_pages_stay_whole_under_writes(client: TestClient) -> None:
    records = load(client)
    mine = patient_id(records)
    expected = everything_keys(client, mine)
    response = client.get(f"/fhir/Patient/{mine}/$everything?_count=3")
    seen = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in response.json()["entry"]]
    # The patient (on a later page, sorted by type) and a condition change between pages.
    patient = records.patient | {"sex": "other"}
    assert client.put(path_of(patient), json=patient).status_code == 200
    next_url = {link["relation"]: link["url"] for link in response.json()["link"]}["next"]
    for entry in entries(everything_pages(client, next_url)):
        seen.append((entry["resource"]["resourceType"], entry["resource"]["id"]))
    assert len(seen) == len(set(seen))
    # Nothing that was there is skipped; the write's own Provenance may or may not show.
    assert expected <= set(seen) <= everything_keys(client, mine)


def test_everything_since_type_and_post(client: TestClient) -> None:
    records = load(client)
    mine = patient_id(records)
    middle = datetime.now(UTC)
    patient = records.patient | {"sex": "other"}
    assert client.put(path_of(patient), json=patient).status_code == 200
    found = everything_keys(client, mine)
    url = f"/fhir/Patient/{mine}/$everything"
    only = entries(everything_pages(client, f"{url}?_type=Observation,Encounter"))
    assert {e["resource"]["resourceType"] for e in only} == {"Observation", "Encounter"}
    assert len(only) == len([k for k in found if k[0] in ("Observation", "Encounter")])
    recent = entries(everything_pages(client, f"{url}?_since={since_param(middle)}"))
    changed = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in recent}
    # The patient, and the Provenance of its change.
    assert ("Patient", mine) in changed
    assert {key[0] for key in changed} == {"Patient", "Provenance"}
    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "_type", "valueString": "Observation,Encounter"},
            {"name": "_count", "valueInteger": 2},
        ],
    }
    response = client.post(url, json=parameters, headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert len(bundle["entry"]) == 2
    next_url = {link["relation"]: link["url"] for link in bundle["link"]}["next"]
    rest = entries(everything_pages(client, next_url))
    assert bundle["entry"] + rest == only
    assert client.post(url).status_code == 200
    form = client.post(url, data={"_type": "Observation,Encounter", "_count": "1000"})
    assert form.status_code == 200
    assert form.json()["entry"] == only


def test_everything_errors_are_operation_outcomes(client: TestClient) -> None:
    mine = patient_id(load(client))
    url = f"/fhir/Patient/{mine}/$everything"
    assert_outcome(client.get("/fhir/Patient/no-such-patient/$everything"), 404, "not-found")
    assert_outcome(client.get(f"{url}?_page=not-a-token"), 400, "invalid")
    assert_outcome(client.get(f"{url}?_count=0"), 400, "invalid")
    assert_outcome(client.get(f"{url}?_count=lots"), 400, "invalid")
    assert_outcome(client.get(f"{url}?_count=%C2%B2"), 400, "invalid")
    assert_outcome(client.get(f"{url}?_since=0001-01-01T00:00:00%2B01:00"), 400, "invalid")
    assert_outcome(client.get(f"{url}?_since=soon"), 400, "invalid")
    assert_outcome(client.get(f"{url}?_type=Spaceship"), 400, "not-supported")
    assert_outcome(client.get(f"{url}?start=2026-01-01"), 400, "not-supported")
    assert_outcome(client.post(url, content=b"{not json"), 400, "invalid")
    assert_outcome(client.post(url, json={"resourceType": "Patient"}), 400, "invalid")
    assert_outcome(
        client.post(url, content=b"<Parameters/>", headers={"Content-Type": "application/xml"}),
        415,
        "not-supported",
    )
    assert_outcome(
        client.get(url, headers={"Accept": "application/fhir+xml"}), 406, "not-supported"
    )
    # More than the maximum is served as the maximum.
    assert client.get(f"{url}?_count=5000").status_code == 200

    with database_of(client).unit_of_work() as uow:
        ResourceRepository(uow.connection).delete([("Patient", mine)], now=datetime.now(UTC))
        uow.commit()
    assert_outcome(client.get(url), 410, "deleted")
