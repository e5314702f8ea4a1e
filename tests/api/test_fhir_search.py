"""FHIR search through the ASGI app: searchset Bundles, links, paging, handling, POST _search."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fastapi.testclient import TestClient

from mappings.context import resource_id
from tests.api.test_fhir_read import FHIR, assert_outcome
from tests.factory import clinic, path_of
from tests.fhir_check import r4_errors


def load(client: TestClient) -> dict[str, Any]:
    records = clinic()
    for record in records.records():
        assert client.put(path_of(record), json=record).status_code == 201
    return {
        "patient_id": resource_id("patient", records.patient["external_id"]),
        "mrn": records.patient["mrn"],
    }


def get(client: TestClient, url: str, **headers: str) -> dict[str, Any]:
    response = client.get(url, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(FHIR)
    bundle: dict[str, Any] = response.json()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    assert r4_errors(bundle) == []
    return bundle


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((item["url"] for item in bundle["link"] if item["relation"] == relation), None)


def test_search_serves_the_stored_resources_in_a_searchset(client: TestClient) -> None:
    loaded = load(client)
    bundle = get(client, f"/fhir/Observation?patient={loaded['patient_id']}&code=8867-4")
    assert bundle["total"] == len(bundle["entry"]) >= 1
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert resource["code"]["coding"][0]["code"] == "8867-4"
        assert entry["fullUrl"] == f"http://testserver/fhir/Observation/{resource['id']}"
        stored = client.get(f"/fhir/Observation/{resource['id']}").json()
        assert resource == stored
    assert link(bundle, "self") == (
        f"http://testserver/fhir/Observation?patient={loaded['patient_id']}&code=8867-4"
    )


def test_next_links_page_through_every_match_once(client: TestClient) -> None:
    loaded = load(client)
    first = get(client, f"/fhir/Observation?patient={loaded['patient_id']}&_total=accurate")
    expected = sorted(ids(first))
    url: str | None = f"/fhir/Observation?patient={loaded['patient_id']}&_count=2"
    seen: list[str] = []
    while url is not None:
        bundle = get(client, url)
        seen += ids(bundle)
        next_url = link(bundle, "next")
        url = (
            None if next_url is None else urlsplit(next_url)._replace(scheme="", netloc="").geturl()
        )
    assert sorted(seen) == expected
    assert first["total"] == len(expected)


def test_chained_identifier_include_and_revinclude(client: TestClient) -> None:
    loaded = load(client)
    system = "http://infusion-bridge.org/fhir/sid/mrn"
    bundle = get(
        client,
        f"/fhir/Encounter?subject:Patient.identifier={system}|{loaded['mrn']}"
        "&_include=Encounter:subject&_revinclude=Provenance:target",
    )
    assert ids(bundle)
    included = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]}
    assert ("Patient", loaded["patient_id"]) in included
    assert any(kind == "Provenance" for kind, _ in included)


def test_unknown_parameters_are_reported_or_refused(client: TestClient) -> None:
    load(client)
    bundle = get(client, "/fhir/Patient?gender=female&colour=blue")
    outcomes = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert len(outcomes) == 1
    assert outcomes[0]["resource"]["issue"][0]["code"] == "not-supported"
    assert "colour" in outcomes[0]["resource"]["issue"][0]["diagnostics"]
    assert link(bundle, "self") == "http://testserver/fhir/Patient?gender=female"

    strict = client.get(
        "/fhir/Patient?gender=female&colour=blue", headers={"Prefer": "handling=strict"}
    )
    assert_outcome(strict, 400, "processing")
    assert "colour" in strict.json()["issue"][0]["diagnostics"]
    # Preference names and values are case-insensitive, and come among others (RFC 7240).
    for prefer in ("Handling=Strict", "return=minimal, handling=strict", 'handling="strict"'):
        again = client.get("/fhir/Patient?gender=female&colour=blue", headers={"Prefer": prefer})
        assert again.status_code == 400, prefer


def test_invalid_values_are_a_400_outcome_not_a_500(client: TestClient) -> None:
    for query in (
        "birthdate=not-a-date",
        "_count=lots",
        "_page=garbage",
        "_sort=nonsense",
        "general-practitioner.name.family=x",
    ):
        response = client.get(f"/fhir/Patient?{query}", headers={"Prefer": "handling=strict"})
        assert_outcome(response, 400, "processing")
    assert_outcome(client.get("/fhir/Patient?_page=garbage"), 400, "processing")
    assert_outcome(client.get("/fhir/Nonsense?name=x"), 404, "not-found")


def test_post_search_takes_form_parameters(client: TestClient) -> None:
    loaded = load(client)
    response = client.post(
        "/fhir/Patient/_search",
        content=f"_id={loaded['patient_id']}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    assert ids(response.json()) == [loaded["patient_id"]]
    wrong = client.post("/fhir/Patient/_search", json={"_id": "x"})
    assert_outcome(wrong, 415, "not-supported")


def test_summary_and_elements_subset_and_tag(client: TestClient) -> None:
    loaded = load(client)
    bundle = get(client, f"/fhir/Patient?_id={loaded['patient_id']}&_elements=birthDate")
    (resource,) = [e["resource"] for e in bundle["entry"]]
    assert set(resource) == {"resourceType", "id", "meta", "birthDate"}
    assert {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "code": "SUBSETTED",
    } in resource["meta"]["tag"]
    counted = get(client, f"/fhir/Patient?_id={loaded['patient_id']}&_summary=count")
    assert counted["total"] == 1
    assert "entry" not in counted
    summary = get(client, f"/fhir/Patient?_id={loaded['patient_id']}&_summary=true")
    assert "text" not in summary["entry"][0]["resource"]


def test_published_conformance_resources_are_searchable_by_url(client: TestClient) -> None:
    url = "http://infusion-bridge.org/fhir/StructureDefinition/ib-patient"
    bundle = get(client, f"/fhir/StructureDefinition?url={url}")
    assert [e["resource"]["url"] for e in bundle["entry"]] == [url]
    assert get(client, "/fhir/StructureDefinition?url=http://nowhere.example")["total"] == 0


def test_empty_pages_have_no_entry_array(client: TestClient) -> None:
    empty_search = get(client, "/fhir/Patient?_id=nobody")
    assert "entry" not in empty_search
    assert empty_search["total"] == 0
    history = client.get("/fhir/Patient/_history?_since=2999-01-01T00:00:00Z")
    assert history.status_code == 200
    assert "entry" not in history.json()
    assert r4_errors(history.json()) == []
