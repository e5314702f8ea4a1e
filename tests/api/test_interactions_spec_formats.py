"""Content negotiation against the letter of FHIR R4 (http.html#mime-type, versioning.html's
`fhirVersion` parameter), on SQLite and PostgreSQL: Accept with weights, `_format` values, and
request bodies in another charset or FHIR version."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from tests.api.test_fhir_write import observation

FHIR = "application/fhir+json"


def assert_outcome(response: Any, status: int, code: str, diagnostics: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR)
    assert response.json() == {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


@pytest.fixture
def url(client: TestClient) -> str:
    created = client.post("/fhir/Observation", json=observation()).json()
    return f"/fhir/Observation/{created['id']}"


@pytest.mark.parametrize(
    "accept",
    [
        "application/fhir+json;q=0",  # q=0: "not acceptable" (RFC 9110 12.4.2)
        "application/fhir+json; q=0.0, application/fhir+xml",
        "application/fhir+json; fhirVersion=3.0",  # STU3 JSON is not what is served
        "application/x-json-bogus",
        "application/jsonx",
        "text/*",
    ],
)
def test_an_accept_that_excludes_r4_json_is_406(client: TestClient, url: str, accept: str) -> None:
    for path in (
        url,
        f"{url}/_history/1",
        f"{url}/_history",
        "/fhir/Observation",
        "/fhir/metadata",
    ):
        assert_outcome(
            client.get(path, headers={"Accept": accept}),
            406,
            "not-supported",
            f"this server answers in application/fhir+json, not {accept}",
        )


@pytest.mark.parametrize(
    "accept",
    [
        "application/fhir+xml;q=0.9, application/fhir+json;q=0.1",
        "application/fhir+json; fhirVersion=4.0",
        "application/fhir+json; charset=utf-8",
        "application/json+fhir",
        "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        "application/*",
        "application/fhir+json;q=bad",
    ],
)
def test_an_accept_that_allows_r4_json_gets_it(client: TestClient, url: str, accept: str) -> None:
    response = client.get(url, headers={"Accept": accept})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(FHIR)


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("JSON", 200),  # media types and their short forms are case-insensitive
        ("Application/FHIR+JSON", 200),
        ("application/fhir+json;fhirVersion=4.0", 200),
        ("application/fhir+json;fhirVersion=5.0", 406),
        ("xml", 406),
        ("ttl", 406),
        ("jsonp", 406),
    ],
)
def test_format_overrides_accept(client: TestClient, url: str, value: str, status: int) -> None:
    # `_format` wins over Accept, either way (R4 http.html#mime-type).
    response = client.get(f"{url}?_format={quote(value)}", headers={"Accept": "application/xml"})
    assert response.status_code == status, response.text
    xml_accept = client.get(url, headers={"Accept": "application/fhir+xml"})
    assert xml_accept.status_code == 406


@pytest.mark.parametrize(
    ("content_type", "diagnostics"),
    [
        (
            "application/fhir+json; fhirVersion=3.0",
            "this server takes FHIR 4.0 (R4) resources, not fhirVersion=3.0",
        ),
        (
            "application/fhir+json; charset=iso-8859-1",
            "FHIR bodies are UTF-8, not charset=iso-8859-1",
        ),
    ],
)
def test_a_body_in_another_fhir_version_or_charset_is_415(
    client: TestClient, url: str, content_type: str, diagnostics: str
) -> None:
    headers = {"Content-Type": content_type}
    body = client.get(url).json()
    for response in (
        client.post("/fhir/Observation", json=observation(), headers=headers),
        client.put(url, json=body | {"status": "amended"}, headers=headers),
        client.patch(
            url,
            content=b'[{"op": "replace", "path": "/status", "value": "amended"}]',
            headers={"Content-Type": content_type.replace(FHIR, "application/json-patch+json")},
        ),
    ):
        assert_outcome(response, 415, "not-supported", diagnostics)
    assert client.get(url).json()["meta"]["versionId"] == "1"


def test_utf8_and_r4_media_type_parameters_are_taken(client: TestClient, url: str) -> None:
    for content_type in (
        "application/fhir+json; charset=utf-8",
        "application/fhir+json; charset=UTF-8; fhirVersion=4.0",
        'application/fhir+json;charset="utf-8"',
    ):
        response = client.post(
            "/fhir/Observation", json=observation(), headers={"Content-Type": content_type}
        )
        assert response.status_code == 201, (content_type, response.text)


def test_an_empty_format_leaves_it_to_accept(client: TestClient, url: str) -> None:
    assert client.get(f"{url}?_format=").status_code == 200
    refused = client.get(f"{url}?_format=", headers={"Accept": "application/fhir+xml"})
    assert refused.status_code == 406
