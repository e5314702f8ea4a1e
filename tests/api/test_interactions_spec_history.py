"""vread and history against the letter of FHIR R4 (http.html#vread, #history), on SQLite and
PostgreSQL: version ids that are not this server's, `_since` as an instant, `_at`, and the
history Bundle's order and entries."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

FHIR = "application/fhir+json"


def observation(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:ehr:obs", "value": uuid.uuid4().hex}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"display": "someone"},
        "effectiveDateTime": "2026-10-05T09:02:00-04:00",
        "valueQuantity": {"value": 72, "unit": "/min"},
    } | extra


def assert_outcome(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR)
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == code, body
    return body


@pytest.mark.parametrize(
    "version_id",
    [
        "\u00b2",  # a superscript two: str.isdigit() says yes, int() refuses it
        "\u0661",  # ARABIC-INDIC DIGIT ONE: int() reads it as 1
        "99999999999999999999",  # past any integer column
        "2147483648",
        "+1",
        " 1",
        "1.0",
    ],
)
def test_vread_of_a_version_id_the_server_never_issued_is_404(
    client: TestClient, version_id: str
) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    url = f"/fhir/Observation/{created['id']}/_history/{quote(version_id)}"
    assert_outcome(client.get(url), 404, "not-found")


def test_vread_of_a_deleted_version_is_gone_and_earlier_versions_stay(client: TestClient) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    url = f"/fhir/Observation/{created['id']}"
    assert client.delete(url).status_code == 204
    gone = client.get(f"{url}/_history/2")
    assert_outcome(gone, 410, "deleted")
    assert gone.headers["etag"] == 'W/"2"'
    assert client.get(f"{url}/_history/1").json() == created
    assert_outcome(client.get(f"{url}/_history/3"), 404, "not-found")
