"""Bulk Data $export and Patient/$everything through the ASGI app, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from mappings.context import resource_id
from service.app import create_app
from service.bootstrap import bootstrap
from service.config import Settings
from service.store.db import Database
from service.store.export import ExportJobs
from service.store.resources import ResourceRepository
from service.store.tables import export_jobs, resources
from tests.api.conftest import SecureApi
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
    assert_outcome(client.get(f"{url}?start=next-week"), 400, "invalid")
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


# --- whole OperationOutcomes --------------------------------------------------------------------


def outcome(code: str, diagnostics: str, expression: str | None = None) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": diagnostics}
    if expression is not None:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def assert_whole_outcome(response: Any, status: int, expected: dict[str, Any]) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.json() == expected
    assert r4_errors(response.json()) == []


def quoted(query: str) -> str:
    """A `_typeFilter` query URL-encoded, as the IG has clients send it."""
    return quote(query, safe="")


def search_ids(client: TestClient, query: str) -> set[str]:
    """What the facade's search answers (another route to the same index)."""
    response = client.get(f"/fhir/{query}&_count=1000")
    assert response.status_code == 200, response.text
    return {e["resource"]["id"] for e in response.json().get("entry", [])}


# --- _typeFilter --------------------------------------------------------------------------------

HEART_RATE = "http://loinc.org|8867-4"
PHQ9 = "http://loinc.org|44261-6"


def test_type_filter_filters_its_types_and_ors_its_queries(client: TestClient) -> None:
    before = datetime.now(UTC)
    first, second = load(client), load(client)
    since = since_param(before)
    filters = ",".join(
        quoted(query) for query in (f"Observation?code={HEART_RATE}", f"Observation?code={PHQ9}")
    )
    url = f"/fhir/$export?_type=Observation,Encounter&_since={since}&_typeFilter={filters}"
    manifest, exported = export(client, url)
    assert manifest["request"] == f"http://testserver{url}"
    last_updated = f"_lastUpdated=ge{since}"
    heart = search_ids(client, f"Observation?code={HEART_RATE}&{last_updated}")
    phq9 = search_ids(client, f"Observation?code={PHQ9}&{last_updated}")
    assert len(heart) == 4  # two clinics, two of each
    assert len(phq9) == 4
    assert exported["Observation"] == heart | phq9
    assert exported["Observation"] < stored_ids(client, "Observation", before)
    # Encounter has no filter: all of it.
    assert exported["Encounter"] == stored_ids(client, "Encounter", before)

    # Repeated _typeFilter parameters are one list; a comma inside a query is a search OR.
    repeated = (
        f"/fhir/$export?_type=Observation&_since={since}"
        f"&_typeFilter={quoted(f'Observation?code={HEART_RATE}')}"
        f"&_typeFilter={quoted(f'Observation?code={PHQ9}')}"
    )
    assert export(client, repeated)[1] == {"Observation": heart | phq9}
    inner_or = (
        f"/fhir/$export?_type=Observation&_since={since}"
        f"&_typeFilter={quoted(f'Observation?code={HEART_RATE},{PHQ9}')}"
    )
    assert export(client, inner_or)[1] == {"Observation": heart | phq9}
    spaced = (
        f"/fhir/$export?_type=Observation&_since={since}"
        f"&_typeFilter={quoted(f'Observation?code={HEART_RATE}')},%20"
        f"{quoted(f'Observation?code={PHQ9}')}"
    )
    assert export(client, spaced)[1] == {"Observation": heart | phq9}

    # Without _type every type is exported, the filtered one filtered; criteria AND within a query.
    mine = patient_id(first)
    query = f"Observation?code={PHQ9}&subject=Patient/{mine}&date=ge2026-11-01"
    manifest, exported = export(client, f"/fhir/$export?_since={since}&_typeFilter={quoted(query)}")
    assert exported["Observation"] == search_ids(client, f"{query}&{last_updated}")
    assert len(exported["Observation"]) == 1
    assert exported["Patient"] == stored_ids(client, "Patient", before)
    assert patient_id(second) in exported["Patient"]


def test_type_filter_on_patient_export(client: TestClient) -> None:
    before = datetime.now(UTC)
    first, second = load(client), load(client)
    mine = patient_id(first)
    since = since_param(before)
    url = (
        f"/fhir/Patient/$export?_type=Patient,Condition&_since={since}"
        f"&_typeFilter={quoted(f'Patient?_id={mine}')}"
    )
    _manifest, exported = export(client, url)
    assert exported["Patient"] == {mine}
    # Condition is unfiltered: every compartment's.
    assert exported["Condition"] == stored_ids(client, "Condition", before)
    assert len(exported["Condition"]) == 2
    assert patient_id(second) not in exported["Patient"]


def test_type_filter_keeps_the_snapshot(client: TestClient) -> None:
    """Matching is as of transactionTime: what changes afterwards changes no download."""
    before = datetime.now(UTC)
    female, male = load(client), clinic()
    male.patient["sex"] = "male"
    for record in male.records():
        assert client.put(path_of(record), json=record).status_code == 201
    url = (
        f"/fhir/$export?_type=Patient&_since={since_param(before)}"
        f"&_typeFilter={quoted('Patient?gender=female')}"
    )
    status_url = kick_off(client, url)
    manifest = manifest_of(client, status_url)
    files = download(client, manifest)
    assert ids(files) == {"Patient": {patient_id(female)}}

    # After the snapshot the one that matched stops matching, the other starts to, and a new
    # matching patient arrives.
    for record, sex in ((female.patient, "other"), (male.patient, "female")):
        changed = record | {"sex": sex}
        assert client.put(path_of(changed), json=changed).status_code == 200
    later = load(client)
    assert search_ids(client, "Patient?gender=female") >= {patient_id(male), patient_id(later)}

    again = manifest_of(client, status_url)
    assert again == manifest
    assert download(client, again) == files
    (served,) = files["Patient"]
    assert served["gender"] == "female"
    assert served["meta"]["versionId"] == "1"
    # A new kick-off sees the store as it is now.
    _manifest, now = export(client, url)
    assert now == {"Patient": {patient_id(male), patient_id(later)}}


def test_type_filter_is_counted_as_of_the_snapshot_when_a_job_is_taken_over(
    client: TestClient,
) -> None:
    """A job counted only after writes (its first process died) counts what it serves."""
    before = datetime.now(UTC)
    female = load(client)
    database = database_of(client)
    now = datetime.now(UTC)
    with database.unit_of_work() as uow:
        job = ExportJobs(uow.connection).create(
            job_id=f"filtered-{now.timestamp()}",
            level="system",
            request="http://testserver/fhir/$export",
            types=["Patient"],
            since=before,
            now=now,
            type_filters={"Patient": ("gender=female",)},
        )
        # Its process died at once: the claim is stale.
        stale = now - timedelta(minutes=2)
        uow.connection.execute(
            update(export_jobs).where(export_jobs.c.id == job.id).values(claimed_at=stale)
        )
        uow.commit()
    # Written after the snapshot, before the job is counted.
    changed = female.patient | {"sex": "other"}
    assert client.put(path_of(changed), json=changed).status_code == 200
    load(client)
    status_url = f"http://testserver/fhir/$export-status/{job.id}"
    assert client.get(status_url).status_code == 202  # taken over and counted
    manifest = manifest_of(client, status_url)
    assert ids(download(client, manifest)) == {"Patient": {patient_id(female)}}


@pytest.mark.parametrize(
    ("query", "status", "expected"),
    [
        (
            f"_typeFilter={quoted('Spaceship?name=x')}",
            400,
            outcome(
                "not-supported",
                "_typeFilter Spaceship?name=x: Spaceship is not a type this export returns "
                "(Patient, Observation)",
                "_typeFilter",
            ),
        ),
        (
            f"_typeFilter={quoted('Encounter?status=finished')}",
            400,
            outcome(
                "not-supported",
                "_typeFilter Encounter?status=finished: Encounter is not a type this export "
                "returns (Patient, Observation)",
                "_typeFilter",
            ),
        ),
        (
            f"_typeFilter={quoted('Observation?colour=red')}",
            400,
            outcome(
                "processing",
                "_typeFilter Observation?colour=red: colour: is not a search parameter of "
                "Observation",
                "_typeFilter",
            ),
        ),
        (
            f"_typeFilter={quoted('Observation?date=yesterday')}",
            400,
            outcome(
                "processing",
                "_typeFilter Observation?date=yesterday: date: 'yesterday' is not a date, "
                "dateTime or instant",
                "_typeFilter",
            ),
        ),
        (
            f"_typeFilter={quoted('Observation?status:fuzzy=final')}",
            400,
            outcome(
                "processing",
                "_typeFilter Observation?status:fuzzy=final: status:fuzzy: modifier :fuzzy is "
                "not supported on token",
                "_typeFilter",
            ),
        ),
        (
            f"_typeFilter={quoted('Observation?status=final&_sort=date')}",
            400,
            outcome(
                "invalid",
                "_typeFilter Observation?status=final&_sort=date: _sort is a search result "
                "parameter, which _typeFilter does not take",
                "_typeFilter",
            ),
        ),
        (
            f"_typeFilter={quoted('Observation?_include=Observation:subject')}",
            400,
            outcome(
                "invalid",
                "_typeFilter Observation?_include=Observation:subject: _include is a search "
                "result parameter, which _typeFilter does not take",
                "_typeFilter",
            ),
        ),
        (
            f"_typeFilter={quoted('Observation?subject:Patient.name=Silva')}",
            400,
            outcome(
                "not-supported",
                "_typeFilter Observation?subject:Patient.name=Silva: chained and _has "
                "parameters are not supported here",
                "_typeFilter",
            ),
        ),
        (
            f"_typeFilter={quoted('Patient?_has:Observation:subject:code=x')}",
            400,
            outcome(
                "not-supported",
                "_typeFilter Patient?_has:Observation:subject:code=x: chained and _has "
                "parameters are not supported here",
                "_typeFilter",
            ),
        ),
        (
            f"_typeFilter={quoted('status=final')}",
            400,
            outcome(
                "invalid", "_typeFilter 'status=final' is not Type?search-query", "_typeFilter"
            ),
        ),
        (
            f"_typeFilter={quoted('Observation?')}",
            400,
            outcome("invalid", "_typeFilter Observation? has no search criteria", "_typeFilter"),
        ),
    ],
)
def test_type_filter_errors_at_kick_off(
    client: TestClient, query: str, status: int, expected: dict[str, Any]
) -> None:
    for url in (
        f"/fhir/$export?_type=Patient,Observation&{query}",
        f"/fhir/Patient/$export?_type=Patient,Observation&{query}",
    ):
        assert_whole_outcome(client.get(url, headers=ASYNC), status, expected)


# --- POST kick-off ------------------------------------------------------------------------------


def parameters(*items: tuple[str, str, Any]) -> dict[str, Any]:
    """A Parameters resource of (name, value[x] key, value)."""
    return {
        "resourceType": "Parameters",
        "parameter": [{"name": name, key: value} for name, key, value in items],
    }


def post_kick_off(client: TestClient, url: str, body: dict[str, Any]) -> str:
    response = client.post(
        url, json=body, headers=ASYNC | {"Content-Type": "application/fhir+json"}
    )
    assert response.status_code == 202, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    status_url: str = response.headers["content-location"]
    assert urlsplit(status_url).path.startswith("/fhir/$export-status/")
    return status_url


def test_post_kick_off_takes_parameters(client: TestClient) -> None:
    before = datetime.now(UTC)
    load(client), load(client)
    body = parameters(
        ("_outputFormat", "valueString", "application/ndjson"),
        ("_since", "valueInstant", before.isoformat()),
        ("_type", "valueString", "Observation"),
        ("_type", "valueString", "Encounter"),
        ("_typeFilter", "valueString", f"Observation?code={HEART_RATE}"),
    )
    manifest = manifest_of(client, post_kick_off(client, "/fhir/$export", body))
    # A POST's request is its URL, without the parameters (as the IG has it).
    assert manifest["request"] == "http://testserver/fhir/$export"
    exported = ids(download(client, manifest))
    get_url = (
        f"/fhir/$export?_type=Observation,Encounter&_since={since_param(before)}"
        f"&_typeFilter={quoted(f'Observation?code={HEART_RATE}')}"
    )
    assert exported == export(client, get_url)[1]
    assert set(exported) == {"Observation", "Encounter"}
    # An empty body exports what a bare GET does.
    response = client.post("/fhir/$export?_type=Patient", headers=ASYNC)
    assert response.status_code == 202, response.text
    # A form-encoded body is read too.
    response = client.post(
        "/fhir/$export", data={"_type": "Patient", "_outputFormat": "ndjson"}, headers=ASYNC
    )
    assert response.status_code == 202, response.text


def test_post_patient_export_of_named_patients(client: TestClient) -> None:
    before = datetime.now(UTC)
    first, second, third = load(client), load(client), load(client)
    chosen = [patient_id(first), patient_id(second)]
    body = parameters(
        ("_since", "valueInstant", before.isoformat()),
        ("patient", "valueReference", {"reference": f"Patient/{chosen[0]}"}),
        ("patient", "valueReference", {"reference": f"http://testserver/fhir/Patient/{chosen[1]}"}),
    )
    manifest = manifest_of(client, post_kick_off(client, "/fhir/Patient/$export", body))
    assert manifest["request"] == "http://testserver/fhir/Patient/$export"
    files = download(client, manifest)
    exported = {(t, i) for t, found in ids(files).items() for i in found}
    assert {i for t, i in exported if t == "Patient"} == set(chosen)
    everything = everything_keys(client, chosen[0]) | everything_keys(client, chosen[1])
    assert exported == {key for key in everything if key[0] in COMPARTMENT_TYPES}
    assert not exported & everything_keys(client, patient_id(third))

    # With a filter and a type list as well.
    body = parameters(
        ("_type", "valueString", "Patient,Observation"),
        ("_typeFilter", "valueString", f"Observation?code={PHQ9}"),
        ("patient", "valueReference", {"reference": f"Patient/{chosen[0]}"}),
    )
    manifest = manifest_of(client, post_kick_off(client, "/fhir/Patient/$export", body))
    exported_ids = ids(download(client, manifest))
    assert exported_ids["Patient"] == {chosen[0]}
    assert exported_ids["Observation"] == search_ids(
        client, f"Observation?code={PHQ9}&subject=Patient/{chosen[0]}"
    )
    assert len(exported_ids["Observation"]) == 2


@pytest.mark.parametrize(
    ("url", "body", "content_type", "status", "expected"),
    [
        (
            "/fhir/$export",
            b"{not json",
            "application/fhir+json",
            400,
            None,  # the parser's message: only its code is compared
        ),
        (
            "/fhir/$export",
            orjson.dumps({"resourceType": "Patient"}),
            "application/fhir+json",
            400,
            outcome("invalid", "the body of $export must be a Parameters resource"),
        ),
        (
            "/fhir/$export",
            orjson.dumps({"resourceType": "Parameters", "parameter": {"name": "_type"}}),
            "application/fhir+json",
            400,
            outcome("invalid", "Parameters.parameter must be a list"),
        ),
        (
            "/fhir/$export",
            orjson.dumps({"resourceType": "Parameters", "parameter": [{"valueString": "x"}]}),
            "application/fhir+json",
            400,
            outcome("invalid", "a parameter has no name"),
        ),
        (
            "/fhir/$export",
            orjson.dumps(parameters(("_type", "valueCoding", {"code": "Patient"}))),
            "application/fhir+json",
            400,
            outcome("invalid", "parameter _type has no simple value", "_type"),
        ),
        (
            "/fhir/$export",
            b"<Parameters/>",
            "application/fhir+xml",
            415,
            outcome("not-supported", "send application/fhir+json, not application/fhir+xml"),
        ),
        (
            "/fhir/$export",
            orjson.dumps(parameters(("_outputFormat", "valueString", "text/csv"))),
            "application/fhir+json",
            400,
            outcome(
                "not-supported",
                "_outputFormat text/csv is not supported: use one of application/fhir+ndjson, "
                "application/ndjson, ndjson",
                "_outputFormat",
            ),
        ),
        (
            "/fhir/$export",
            orjson.dumps(
                parameters(
                    ("_since", "valueInstant", "2026-01-01T00:00:00Z"),
                    ("_since", "valueInstant", "2026-02-01T00:00:00Z"),
                )
            ),
            "application/fhir+json",
            400,
            outcome("invalid", "_since is given more than once", "_since"),
        ),
        (
            "/fhir/$export",
            orjson.dumps(parameters(("patient", "valueReference", {"reference": "Patient/x"}))),
            "application/fhir+json",
            400,
            outcome("not-supported", "patient applies to Patient/$export only", "patient"),
        ),
        (
            "/fhir/Patient/$export",
            orjson.dumps(
                parameters(("patient", "valueReference", {"reference": "Patient/no-such-one"}))
            ),
            "application/fhir+json",
            400,
            outcome("not-found", "patient Patient/no-such-one is not known", "patient"),
        ),
        (
            "/fhir/Patient/$export",
            orjson.dumps(
                parameters(("patient", "valueReference", {"reference": "Practitioner/x"}))
            ),
            "application/fhir+json",
            400,
            outcome("invalid", "patient 'Practitioner/x' is not a Patient reference", "patient"),
        ),
        (
            "/fhir/Patient/$export",
            orjson.dumps(parameters(("patient", "valueReference", {"display": "Ana"}))),
            "application/fhir+json",
            400,
            outcome("invalid", "parameter patient has no simple value", "patient"),
        ),
        (
            "/fhir/Patient/$export",
            orjson.dumps(parameters(("_typeFilter", "valueString", "Practitioner?name=x"))),
            "application/fhir+json",
            400,
            outcome(
                "not-supported",
                "_typeFilter Practitioner?name=x: Practitioner is not a type this export "
                "returns (AdverseEvent, CarePlan, Condition, Encounter, Goal, "
                "MedicationAdministration, MedicationRequest, Observation, Patient, "
                "Provenance, QuestionnaireResponse)",
                "_typeFilter",
            ),
        ),
        (
            "/fhir/Patient/$export",
            orjson.dumps(parameters(("_elements", "valueString", "id"))),
            "application/fhir+json",
            400,
            outcome("not-supported", "$export does not support _elements", "_elements"),
        ),
    ],
)
def test_post_kick_off_errors(
    client: TestClient,
    url: str,
    body: bytes,
    content_type: str,
    status: int,
    expected: dict[str, Any] | None,
) -> None:
    response = client.post(url, content=body, headers=ASYNC | {"Content-Type": content_type})
    if expected is None:
        assert_outcome(response, status, "invalid")
    else:
        assert_whole_outcome(response, status, expected)


def test_kick_off_parameter_errors_are_whole_outcomes(client: TestClient) -> None:
    assert_whole_outcome(
        client.post("/fhir/$export", json=parameters()),
        400,
        outcome("invalid", "$export needs the header 'Prefer: respond-async'"),
    )
    assert_whole_outcome(
        client.get("/fhir/$export?_outputFormat=application/fhir%2Bxml", headers=ASYNC),
        400,
        outcome(
            "not-supported",
            "_outputFormat application/fhir+xml is not supported: use one of "
            "application/fhir+ndjson, application/ndjson, ndjson",
            "_outputFormat",
        ),
    )
    # `patient` is a POST parameter.
    assert_whole_outcome(
        client.get("/fhir/Patient/$export?patient=Patient/x", headers=ASYNC),
        400,
        outcome(
            "not-supported",
            "patient is taken in the Parameters body of a POST kick-off only",
            "patient",
        ),
    )


@pytest.mark.parametrize(
    "output_format", ["application/fhir+ndjson", "application/ndjson", "ndjson"]
)
def test_post_kick_off_accepts_the_ndjson_formats(client: TestClient, output_format: str) -> None:
    body = parameters(
        ("_type", "valueString", "Patient"), ("_outputFormat", "valueString", output_format)
    )
    manifest_of(client, post_kick_off(client, "/fhir/$export", body))
    response = client.get(
        f"/fhir/$export?_type=Patient&_outputFormat={quote(output_format)}", headers=ASYNC
    )
    assert response.status_code == 202


# --- $everything start and end ------------------------------------------------------------------

CARE_ELEMENTS = {
    "AdverseEvent": ("date",),
    "CarePlan": ("period",),
    "Condition": ("onsetDateTime", "onsetPeriod", "recordedDate"),
    "Encounter": ("period",),
    "Goal": ("startDate",),
    "MedicationAdministration": ("effectiveDateTime", "effectivePeriod"),
    "MedicationRequest": ("authoredOn",),
    "Observation": ("effectiveDateTime", "effectivePeriod", "effectiveInstant"),
    "Provenance": ("occurredDateTime", "occurredPeriod"),
    "QuestionnaireResponse": ("authored",),
}
"""The test's own reading of each type's care date (the spec's elements, not the index)."""


def _day(value: str) -> str:
    """A date or dateTime as its local calendar day (the tests' ranges are whole days apart)."""
    return value[:10]


def in_care_range(resource: dict[str, Any], start: str | None, end: str | None) -> bool:
    for element in CARE_ELEMENTS.get(resource["resourceType"], ()):
        value = resource.get(element)
        if value is None:
            continue
        low, high = (
            (value.get("start"), value.get("end")) if isinstance(value, dict) else (value, value)
        )
        after_start = start is None or high is None or _day(high) >= start
        before_end = end is None or low is None or _day(low) <= end
        return after_start and before_end
    return True  # no care date: always in


def references_in(resource: Any) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    if isinstance(resource, dict):
        for key, value in resource.items():
            if key == "reference" and isinstance(value, str) and value.count("/") == 1:
                kind, ident = value.split("/")
                found.add((kind, ident))
            else:
                found |= references_in(value)
    elif isinstance(resource, list):
        for item in resource:
            found |= references_in(item)
    return found


def expected_in_range(
    client: TestClient, patient: str, start: str | None, end: str | None
) -> set[tuple[str, str]]:
    whole = entries(everything_pages(client, f"/fhir/Patient/{patient}/$everything?_count=1000"))
    kept = [
        e["resource"]
        for e in whole
        if e["resource"]["resourceType"] in COMPARTMENT_TYPES
        and in_care_range(e["resource"], start, end)
    ]
    keys = {(r["resourceType"], r["id"]) for r in kept}
    referenced = set().union(*(references_in(r) for r in kept))
    return keys | {
        (e["resource"]["resourceType"], e["resource"]["id"])
        for e in whole
        if e["resource"]["resourceType"] not in COMPARTMENT_TYPES
        and (e["resource"]["resourceType"], e["resource"]["id"]) in referenced
    }


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("2026-11-01", "2026-11-30"),
        (None, "2026-09-30"),
        ("2026-10-05", None),
        ("2027-01-01", None),
    ],
)
def test_everything_takes_a_care_date_range(
    client: TestClient, start: str | None, end: str | None
) -> None:
    records = load(client)
    load(client)
    mine = patient_id(records)
    query = "&".join(f"{name}={value}" for name, value in (("start", start), ("end", end)) if value)
    url = f"/fhir/Patient/{mine}/$everything?{query}"
    whole = entries(everything_pages(client, f"{url}&_count=1000"))
    found = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in whole}
    assert found == expected_in_range(client, mine, start, end)
    assert ("Patient", mine) in found
    everything = everything_keys(client, mine)
    assert found <= everything
    # Paged, the same entries in the same order; every link keeps the range.
    pages = everything_pages(client, f"{url}&_count=2")
    assert entries(pages) == whole
    for page in pages:
        for link in page["link"]:
            assert query in link["url"]


def test_everything_care_range_by_type(client: TestClient) -> None:
    records = load(client)
    mine = patient_id(records)
    url = f"/fhir/Patient/{mine}/$everything?_count=1000"
    november = entries(everything_pages(client, f"{url}&start=2026-11-01&end=2026-11"))
    types = {e["resource"]["resourceType"] for e in november}
    # The follow-up assessment (2 November) and what has no end or no date; not the session.
    assert {"Patient", "Observation", "QuestionnaireResponse", "CarePlan"} <= types
    assert not types & {"Encounter", "MedicationAdministration", "AdverseEvent", "Condition"}
    observations = [
        e["resource"] for e in november if e["resource"]["resourceType"] == "Observation"
    ]
    assert [o["effectiveDateTime"][:10] for o in observations] == ["2026-11-02"]
    # The Condition counts by when it was recorded (it has no onset): 1 September.
    september = entries(everything_pages(client, f"{url}&start=2026-09-01&end=2026-09-01"))
    assert "Condition" in {e["resource"]["resourceType"] for e in september}
    # An Encounter by its period: it overlaps a range that starts while it runs.
    inside = entries(
        everything_pages(client, f"{url}&start=2026-10-05T13:00:00Z&end=2026-10-05T13:10:00Z")
    )
    assert "Encounter" in {e["resource"]["resourceType"] for e in inside}
    # POST takes them as dates.
    body = parameters(("start", "valueDate", "2026-11-01"), ("end", "valueDate", "2026-11-30"))
    response = client.post(f"/fhir/Patient/{mine}/$everything?_count=1000", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["entry"] == november


def test_everything_care_range_errors(client: TestClient) -> None:
    mine = patient_id(load(client))
    url = f"/fhir/Patient/{mine}/$everything"
    assert_whole_outcome(
        client.get(f"{url}?start=next-week"),
        400,
        outcome("invalid", "start must be a FHIR date (or dateTime), not 'next-week'", "start"),
    )
    assert_whole_outcome(
        client.get(f"{url}?end=2026-13-01"),
        400,
        outcome("invalid", "end must be a FHIR date (or dateTime), not '2026-13-01'", "end"),
    )
    assert_whole_outcome(
        client.get(f"{url}?start=2026-11-02&end=2026-11-01"),
        400,
        outcome("invalid", "start is after end", "start"),
    )


# --- the CapabilityStatement --------------------------------------------------------------------


def test_capability_statement_lists_the_parameters(client: TestClient) -> None:
    statement = client.get("/fhir/metadata").json()
    assert r4_errors(statement) == []
    rest = statement["rest"][0]
    (system_export,) = rest["operation"]
    for name in ("_outputFormat", "_since", "_type", "_typeFilter", "POST", "ndjson"):
        assert name in system_export["documentation"], name
    assert "`patient`" not in system_export["documentation"]
    (patient,) = [r for r in rest["resource"] if r["type"] == "Patient"]
    operations = {o["name"]: o for o in patient["operation"]}
    for name in ("_typeFilter", "`patient`", "POST"):
        assert name in operations["export"]["documentation"], name
    for name in ("`start`", "`end`", "Observation date", "Condition onset-date, recorded-date"):
        assert name in operations["everything"]["documentation"], name


# --- access: a POST kick-off needs what its body asks for ---------------------------------------


def test_post_kick_off_needs_read_on_every_type_its_body_names(secure: SecureApi) -> None:
    headers = {"Prefer": "respond-async", "Content-Type": "application/fhir+json"}

    def code(path: str, scope: str, body: dict[str, Any], query: str = "") -> int:
        response = secure.http.post(
            path + query, json=body, headers=secure.headers(scope) | headers
        )
        return response.status_code

    patient_only = parameters(("_type", "valueString", "Patient"))
    audit = parameters(("_type", "valueString", "AuditEvent"))
    both = parameters(("_type", "valueString", "Patient"), ("_type", "valueString", "Observation"))
    for path in ("/fhir/$export", "/fhir/Patient/$export"):
        assert code(path, "system/Patient.rs", parameters()) == 403
        assert code(path, "system/Patient.rs", patient_only) == 202
        assert code(path, "system/Patient.rs", both) == 403
        assert code(path, "system/Patient.rs system/Observation.rs", both) == 202
        # Named in the query and the body: read on both.
        assert code(path, "system/Patient.rs", patient_only, "?_type=Observation") == 403
    assert code("/fhir/$export", "system/*.read", parameters()) == 202
    assert code("/fhir/$export", "system/*.read", audit) == 403
    form = secure.http.post(
        "/fhir/$export",
        data={"_type": "AuditEvent"},
        headers=secure.headers("system/*.read") | {"Prefer": "respond-async"},
    )
    assert form.status_code == 403
    # Repeated _type in a GET: read on every one of them.
    get = secure.http.get(
        "/fhir/$export?_type=Patient&_type=Observation",
        headers=secure.headers("system/Patient.rs") | {"Prefer": "respond-async"},
    )
    assert get.status_code == 403
    # A body the operation cannot read names no types: the check is the query's (here: all
    # types but the audit trail), and the operation refuses the body.
    for scope, status in (("system/Patient.rs", 403), ("system/*.read", 400)):
        bad = secure.http.post(
            "/fhir/$export", content=b"{not json", headers=secure.headers(scope) | headers
        )
        assert bad.status_code == status, bad.text


def test_post_everything_needs_read_on_the_types_its_body_names(secure: SecureApi) -> None:
    records = clinic()
    intake = secure.headers("system/intake.write")
    for record in records.records():
        assert secure.http.put(path_of(record), json=record, headers=intake).status_code == 201
    url = f"/fhir/Patient/{patient_id(records)}/$everything"

    def code(scope: str, body: dict[str, Any]) -> int:
        return secure.http.post(url, json=body, headers=secure.headers(scope)).status_code

    assert code("system/Patient.rs", parameters(("_type", "valueString", "Patient"))) == 200
    assert code("system/*.read", parameters(("_type", "valueString", "AuditEvent"))) == 403
    assert code("system/Patient.rs", parameters(("_type", "valueString", "Observation"))) == 403


# --- Patient/$everything: every patient's -------------------------------------------------------


def test_every_patients_everything(client: TestClient) -> None:
    before = datetime.now(UTC)
    first, second = load(client), load(client)
    mine, theirs = patient_id(first), patient_id(second)
    url = f"/fhir/Patient/$everything?_since={since_param(before)}"
    pages = everything_pages(client, f"{url}&_count=1000")
    assert pages[0]["link"][0]["url"].startswith("http://testserver/fhir/Patient/$everything?")
    whole = entries(pages)
    found = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in whole]
    assert len(found) == len(set(found))
    # Written since `before`: these two patients' everything, nothing else (the clinic's
    # Organization may be older).
    both = everything_keys(client, mine) | everything_keys(client, theirs)
    recent = {(t, i) for t in {k[0] for k in both} for i in stored_ids(client, t, before)}
    assert set(found) == both & recent
    assert found == sorted(found)
    for entry in whole:
        mode = "match" if entry["resource"]["resourceType"] in COMPARTMENT_TYPES else "include"
        assert entry["search"] == {"mode": mode}
    paged = everything_pages(client, f"{url}&_count=3")
    assert len(paged) > 2
    assert entries(paged) == whole

    ranged = entries(everything_pages(client, f"{url}&start=2026-11-01&end=2026-11-30"))
    keys = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in ranged}
    expected = expected_in_range(client, mine, "2026-11-01", "2026-11-30") | expected_in_range(
        client, theirs, "2026-11-01", "2026-11-30"
    )
    assert keys == expected & recent
    only = entries(everything_pages(client, f"{url}&_type=Patient,Condition"))
    assert {(e["resource"]["resourceType"], e["resource"]["id"]) for e in only} == {
        key for key in found if key[0] in ("Patient", "Condition")
    }
    body = parameters(
        ("_type", "valueString", "Patient"), ("_since", "valueInstant", before.isoformat())
    )
    response = client.post("/fhir/Patient/$everything", json=body)
    assert response.status_code == 200, response.text
    assert {e["resource"]["id"] for e in response.json()["entry"]} == {mine, theirs}
    assert_whole_outcome(
        client.get("/fhir/Patient/$everything?start=2026-12-01&end=2026-11-01"),
        400,
        outcome("invalid", "start is after end", "start"),
    )


def test_every_patients_everything_needs_read_on_what_it_returns(secure: SecureApi) -> None:
    def code(query: str, scope: str) -> int:
        url = f"/fhir/Patient/$everything{query}"
        return secure.http.get(url, headers=secure.headers(scope)).status_code

    assert code("", "system/Patient.rs") == 403
    assert code("?_type=Patient", "system/Patient.rs") == 200
    assert code("?_type=Patient,Observation", "system/Patient.rs") == 403
    assert code("?_type=AuditEvent", "system/*.read") == 403
    assert code("?_count=1", "system/*.read") == 200
