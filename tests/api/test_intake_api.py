"""The intake API through the ASGI app: upserts, reads, lists, history, import, errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from tests.factory import Record, clinic
from tests.factory import path_of as url


def put_all(client: TestClient, records: list[Record]) -> None:
    for record in records:
        response = client.put(url(record), json=record)
        assert response.status_code == 201, response.text


def assert_problem(response: Any, status: int, *expected: tuple[str, str]) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    document: dict[str, Any] = response.json()
    assert document["status"] == status
    assert document["request_id"] == response.headers["x-request-id"]
    found = {(e["path"], e["type"]) for e in document.get("errors", [])}
    assert set(expected) <= found, found
    return document


def test_put_then_get_round_trips_and_resending_changes_nothing(client: TestClient) -> None:
    records = clinic().records()
    put_all(client, records)
    for record in records:
        read = client.get(url(record))
        assert read.status_code == 200
        assert read.headers["etag"] == '"1"'
        body = read.json()
        assert {k: body[k] for k in record} == record | {
            k: v for k, v in body.items() if k in record and isinstance(v, float)
        }
        again = client.put(url(record), content=read.content)
        assert again.status_code == 200
        assert again.headers["x-record-outcome"] == "unchanged"
        assert again.headers["etag"] == '"1"'


def test_kind_and_external_id_may_come_from_the_url(client: TestClient) -> None:
    patient = clinic().patient
    path = url(patient)
    body = {k: v for k, v in patient.items() if k not in ("kind", "external_id")}
    created = client.put(path, json=body)
    assert created.status_code == 201
    assert created.headers["location"].endswith(path)
    assert created.json()["external_id"] == patient["external_id"]
    mismatch = client.put(path, json=body | {"external_id": "P-elsewhere"})
    assert_problem(mismatch, 422, ("external_id", "mismatch"))
    wrong_kind = client.put(path, json=body | {"kind": "clinician"})
    assert_problem(wrong_kind, 422, ("kind", "mismatch"))


def test_invalid_record_is_a_422_with_field_paths_and_stores_nothing(client: TestClient) -> None:
    records = clinic()
    put_all(client, records.records()[:5])
    session = records.session
    session["vitals"][0]["systolic"] = 400
    session["assessments"][0]["total"] = 3
    session["surprise"] = True
    response = client.put(url(session), json=session)
    document = assert_problem(
        response,
        422,
        ("vitals[0].systolic", "less_than_equal"),
        ("surprise", "extra_forbidden"),
    )
    error = next(e for e in document["errors"] if e["path"] == "vitals[0].systolic")
    assert error["pointer"] == "/vitals/0/systolic"
    assert error["loc"] == ["vitals", 0, "systolic"]
    assert client.get(url(session)).status_code == 404


def test_unresolved_reference_is_a_clear_422(client: TestClient) -> None:
    session = clinic().session
    response = client.put(url(session), json=session)
    document = assert_problem(response, 422, ("course", "unresolved_reference"))
    assert session["course"] in document["detail"]


@pytest.mark.parametrize(
    ("content", "path", "kind"),
    [(b"", "", "missing"), (b"{oops", "", "json_invalid"), (b"[1, 2]", "", "type")],
)
def test_malformed_bodies_are_422(client: TestClient, content: bytes, path: str, kind: str) -> None:
    response = client.put("/api/v1/patients/P-x", content=content)
    assert_problem(response, 422, (path, kind))


def test_bad_external_id_in_the_url_is_a_422(client: TestClient) -> None:
    response = client.put("/api/v1/patients/bad%20id", json=clinic().patient)
    assert_problem(response, 422, ("path.external_id", "string_pattern_mismatch"))


def test_unknown_record_is_404_as_a_problem(client: TestClient) -> None:
    response = client.get("/api/v1/courses/TC-nothing")
    assert_problem(response, 404)


def test_if_match_on_put(client: TestClient) -> None:
    patient = clinic().patient
    put_all(client, [patient])
    assert (
        client.put(
            url(patient), json=patient | {"sex": "other"}, headers={"If-Match": 'W/"1"'}
        ).headers["etag"]
        == '"2"'
    )
    stale = client.put(url(patient), json=patient | {"sex": "male"}, headers={"If-Match": '"1"'})
    assert_problem(stale, 412)
    assert client.get(url(patient)).json()["sex"] == "other"


def test_history_shows_who_when_and_what(client: TestClient) -> None:
    patient = clinic().patient
    first = client.put(url(patient), json=patient, headers={"X-Request-ID": "req-first"})
    assert first.headers["x-request-id"] == "req-first"
    client.put(url(patient), json=patient | {"mrn": "CLN-changed"})
    history = client.get(url(patient) + "/history").json()["items"]
    assert [(h["version"], h["operation"], h["changed_by"]) for h in history] == [
        (1, "create", "api"),
        (2, "update", "api"),
    ]
    assert history[0]["request_id"] == "req-first"
    assert history[1]["patch"] == [{"op": "replace", "path": "/mrn", "value": "CLN-changed"}]


def test_lists_filter_by_patient_and_page_with_a_cursor(client: TestClient) -> None:
    first, second = clinic(), clinic()
    put_all(client, first.records()[:5] + second.records()[:5])
    sessions = []
    for n in range(5):
        session = first.session | {"external_id": f"{first.session['external_id']}-{n}"}
        sessions.append(session["external_id"])
        put_all(client, [session])
    put_all(client, [second.session])

    seen: list[str] = []
    page_url: str | None = f"/api/v1/sessions?patient={first.patient['external_id']}&limit=2"
    while page_url:
        page = client.get(page_url).json()
        assert len(page["items"]) <= 2
        seen += [item["external_id"] for item in page["items"]]
        page_url = page.get("next")
    assert seen == sorted(sessions)
    by_course = client.get(f"/api/v1/sessions?course={second.course['external_id']}").json()
    assert [s["external_id"] for s in by_course["items"]] == [second.session["external_id"]]
    assert by_course["next_cursor"] is None
    patients = client.get(f"/api/v1/diagnoses?patient={second.patient['external_id']}").json()
    assert [d["external_id"] for d in patients["items"]] == [second.diagnosis["external_id"]]
    assert_problem(client.get("/api/v1/sessions?cursor=***"), 422)
    assert_problem(
        client.get("/api/v1/sessions?limit=5000"), 422, ("query.limit", "less_than_equal")
    )


def ndjson(records: Sequence[Record | bytes]) -> bytes:
    return b"\n".join(r if isinstance(r, bytes) else orjson.dumps(r) for r in records) + b"\n"


def test_import_reports_each_line(client: TestClient) -> None:
    records = clinic()
    bad_session = records.session | {"total_dose_mg": 99.0}
    body = ndjson([*records.records()[:5], bad_session, records.assessment, b"nope"])
    response = client.post(
        "/api/v1/import", content=body, headers={"Content-Type": "application/x-ndjson"}
    )
    assert response.status_code == 200
    report = response.json()
    assert report["summary"] == {
        "lines": 8,
        "accepted": 6,
        "created": 6,
        "updated": 0,
        "unchanged": 0,
        "rejected": 2,
    }
    assert [line["line"] for line in report["lines"]] == list(range(1, 9))
    rejected = {line["line"]: line for line in report["lines"] if line["status"] == "rejected"}
    assert rejected[6]["errors"][0]["path"] == "total_dose_mg"
    assert rejected[6]["external_id"] == bad_session["external_id"]
    assert rejected[8]["errors"][0]["type"] == "json_invalid"
    assert client.get(url(bad_session)).status_code == 404
    assert client.get(url(records.assessment)).status_code == 200

    resent = client.post("/api/v1/import", content=body).json()
    assert resent["summary"]["unchanged"] == 6
    assert resent["summary"]["created"] == 0


def test_import_streams_durable_results_as_ndjson(client: TestClient) -> None:
    records = clinic().records()
    response = client.post(
        "/api/v1/import", content=ndjson(records), headers={"Accept": "application/x-ndjson"}
    )
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [orjson.loads(line) for line in response.content.splitlines()]
    assert lines[-1] == {
        "summary": {
            "lines": 7,
            "accepted": 7,
            "created": 7,
            "updated": 0,
            "unchanged": 0,
            "rejected": 0,
        }
    }
    assert sorted(line["line"] for line in lines[:-1]) == list(range(1, 8))


def test_empty_import_is_a_422(client: TestClient) -> None:
    assert_problem(client.post("/api/v1/import", content=b"\n\n"), 422)


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["migrations"] == "current"


def test_openapi_describes_every_record(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for name in (
        "Patient",
        "Clinician",
        "Diagnosis",
        "TreatmentCourse",
        "InfusionSession",
        "Assessment",
    ):
        assert name in components
    put_patient = schema["paths"]["/api/v1/patients/{external_id}"]["put"]
    assert put_patient["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Patient"
    }


def test_every_openapi_operation_has_its_own_id(client: TestClient) -> None:
    """OpenAPI requires operationIds to be unique (code generators name methods by them)."""
    schema = client.get("/openapi.json").json()
    ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    export = schema["paths"]["/fhir/$export"]
    assert set(export) == {"get", "post"}
