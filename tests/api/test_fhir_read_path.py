"""The FHIR read path (`service.fhir.reads`): whole responses, headers included, on both stores.

read and vread bypass FastAPI's routing, so these tests pin everything a client sees: the
stored bytes, every header in order, conditional reads, and each error's whole OperationOutcome
and headers, as the FastAPI routes answered them before.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.testclient import TestClient

from mappings.context import resource_id
from service.app import create_app
from service.bootstrap import bootstrap
from service.config import Settings
from service.store.db import Database
from service.store.resources import ResourceRepository, StoredResource
from tests.factory import clinic, path_of

FHIR_JSON = "application/fhir+json; charset=utf-8"
REQUEST_ID = {"X-Request-ID": "read-path-test"}
REQUEST_ID_HEADER = ("x-request-id", "read-path-test")


def stored(database_url: str, resource_type: str, id_: str) -> StoredResource:
    """The current version as the store holds it, read through the unit of work."""
    database = Database(database_url)
    try:
        with database.unit_of_work(write=False) as uow:
            found = ResourceRepository(uow.connection).read(resource_type, id_)
    finally:
        database.dispose()
    assert found is not None
    return found


def http_date(resource: StoredResource) -> str:
    return resource.last_updated.strftime("%a, %d %b %Y %H:%M:%S GMT")


def validators(resource: StoredResource) -> list[tuple[str, str]]:
    return [
        ("etag", f'W/"{resource.version}"'),
        ("last-modified", http_date(resource)),
        ("content-location", f"{resource.resource_type}/{resource.id}/_history/{resource.version}"),
    ]


def outcome(code: str, diagnostics: str) -> bytes:
    issue = {"severity": "error", "code": code, "diagnostics": diagnostics}
    return orjson.dumps({"resourceType": "OperationOutcome", "issue": [issue]})


def answer(
    client: TestClient, path: str, headers: dict[str, str] | None = None
) -> tuple[int, list[Any], bytes]:
    response = client.get(path, headers=REQUEST_ID | (headers or {}), follow_redirects=False)
    return response.status_code, response.headers.multi_items(), response.content


def body_headers(body: bytes) -> list[tuple[str, str]]:
    return [("content-length", str(len(body))), ("content-type", FHIR_JSON)]


def error(status: int, code: str, diagnostics: str, *extra: tuple[str, str]) -> Any:
    body = outcome(code, diagnostics)
    return status, [*extra, *body_headers(body), REQUEST_ID_HEADER], body


def load(client: TestClient) -> dict[str, Any]:
    records = clinic()
    for record in records.records():
        assert client.put(path_of(record), json=record).status_code == 201
    session = records.session
    fewer_vitals = session | {"vitals": session["vitals"][:1]}
    assert client.put(path_of(session), json=fewer_vitals).status_code == 200
    return {
        "records": records,
        "patient": resource_id("patient", records.patient["external_id"]),
        "removed_bp": resource_id(
            "session", session["external_id"], "vitals", "2026-10-05T09:44:00-04:00", "bp"
        ),
    }


def test_read_and_vread_answer_the_stored_bytes_with_their_headers(
    client: TestClient, database_url: str
) -> None:
    patient_id = load(client)["patient"]
    current = stored(database_url, "Patient", patient_id)
    body = current.body.encode()
    expected = (200, [*validators(current), *body_headers(body), REQUEST_ID_HEADER], body)
    assert answer(client, f"/fhir/Patient/{patient_id}") == expected
    assert answer(client, f"/fhir/Patient/{patient_id}/_history/1") == expected
    assert answer(client, f"/fhir/Patient/{patient_id}?_format=json") == expected
    assert answer(client, f"/fhir/Patient/{patient_id}", {"Accept": "application/json"}) == expected
    assert answer(client, f"/fhir/Patient/{patient_id}", {"Accept": "*/*"}) == expected


def test_conditional_reads_answer_304_with_the_validators_only(
    client: TestClient, database_url: str
) -> None:
    patient_id = load(client)["patient"]
    current = stored(database_url, "Patient", patient_id)
    not_modified = (304, [*validators(current), REQUEST_ID_HEADER], b"")
    url = f"/fhir/Patient/{patient_id}"
    assert answer(client, url, {"If-None-Match": 'W/"1"'}) == not_modified
    assert answer(client, url, {"If-None-Match": 'W/"3", W/"1"'}) == not_modified
    assert answer(client, url, {"If-None-Match": "*"}) == not_modified
    assert answer(client, url, {"If-Modified-Since": http_date(current)}) == not_modified
    assert answer(client, f"{url}/_history/1", {"If-None-Match": '"1"'}) == not_modified
    for headers in (
        {"If-None-Match": 'W/"2"'},
        {"If-Modified-Since": "Mon, 01 Jan 2024 00:00:00 GMT"},
        {"If-Modified-Since": "not a date"},
    ):
        assert answer(client, url, headers)[0] == 200


def test_errors_are_whole_operation_outcomes(client: TestClient) -> None:
    loaded = load(client)
    patient, gone = loaded["patient"], loaded["removed_bp"]
    cases = {
        "/fhir/Patient/no-such-id": error(404, "not-found", "Patient/no-such-id is not known"),
        "/fhir/Invoice/1": error(404, "not-found", "resource type Invoice is not supported here"),
        "/fhir/Invoice/1/_history/1": error(
            404, "not-found", "resource type Invoice is not supported here"
        ),
        f"/fhir/Patient/{patient}/_history/9": error(
            404, "not-found", f"Patient/{patient} has no version 9"
        ),
        f"/fhir/Patient/{patient}/_history/one": error(
            404, "not-found", f"Patient/{patient}/_history/one"
        ),
        "/fhir/StructureDefinition/ib-patient/_history/1": error(
            404, "not-found", "StructureDefinition/ib-patient/_history/1"
        ),
        "/fhir/StructureDefinition/no-such-profile": error(
            404, "not-found", "StructureDefinition/no-such-profile is not known"
        ),
        f"/fhir/Observation/{gone}": error(
            410, "deleted", f"Observation/{gone} was deleted", ("etag", 'W/"2"')
        ),
        f"/fhir/Observation/{gone}/_history/2": error(
            410, "deleted", f"Observation/{gone} was deleted", ("etag", 'W/"2"')
        ),
    }
    for path, expected in cases.items():
        assert answer(client, path) == expected, path
    assert answer(client, f"/fhir/Observation/{gone}/_history/1")[0] == 200


def test_xml_is_not_acceptable_before_anything_else(client: TestClient) -> None:
    patient = load(client)["patient"]
    for path, headers in (
        (f"/fhir/Patient/{patient}?_format=xml", {}),
        (f"/fhir/Patient/{patient}/_history/1?_format=application/fhir%2Bxml", {}),
        (f"/fhir/Patient/{patient}", {"Accept": "application/fhir+xml"}),
        ("/fhir/Invoice/1", {"Accept": "application/fhir+xml"}),
    ):
        wanted = "application/fhir+xml" if headers or "%2B" in path else "xml"
        assert answer(client, path, headers) == error(
            406, "not-supported", f"this server answers in application/fhir+json, not {wanted}"
        ), path


def test_published_conformance_resources_are_served_as_packaged(client: TestClient) -> None:
    raw = (
        client.app.state.conformance.by_key[("StructureDefinition", "ib-patient")]  # type: ignore[attr-defined]
    )
    expected = (200, [*body_headers(raw), REQUEST_ID_HEADER], raw)
    assert answer(client, "/fhir/StructureDefinition/ib-patient") == expected


def test_other_methods_and_paths_reach_the_routes_they_always_reached(
    client: TestClient,
) -> None:
    patient = load(client)["patient"]
    head = client.head(f"/fhir/Patient/{patient}", headers=REQUEST_ID)
    assert (head.status_code, head.headers["allow"]) == (405, "GET, PUT, PATCH, DELETE")
    slash = client.get(f"/fhir/Patient/{patient}/", follow_redirects=False)
    assert (slash.status_code, slash.headers["location"]) == (
        307,
        f"http://testserver/fhir/Patient/{patient}",
    )
    history = client.get("/fhir/Patient/_history?_count=1").json()
    assert (history["resourceType"], history["type"]) == ("Bundle", "history")
    assert client.get(f"/fhir/Patient/{patient}/_history").json()["type"] == "history"
    assert answer(client, "/fhir/Patient/_unknown")[0] == 404
    generated = client.get(f"/fhir/Patient/{patient}")
    assert len(generated.headers["x-request-id"]) == 32


def test_every_read_sees_what_another_process_committed(
    client: TestClient, database_url: str
) -> None:
    """Two API processes on one database: the second never serves a version it has not read."""
    records = load(client)["records"]
    patient_id = resource_id("patient", records.patient["external_id"])
    other_services = bootstrap(Settings(database_url=database_url, auth_disabled=True))
    with TestClient(create_app(other_services)) as other:
        url = f"/fhir/Patient/{patient_id}"
        assert other.get(url).headers["etag"] == 'W/"1"'
        for version, sex in enumerate(("other", "male", "female"), start=2):
            patient = records.patient | {"sex": sex}
            assert client.put(path_of(patient), json=patient).status_code == 200
            read = other.get(url)
            assert (read.headers["etag"], read.json()["gender"]) == (f'W/"{version}"', sex)
            assert other.get(url, headers={"If-None-Match": f'W/"{version - 1}"'}).status_code == (
                200
            )
