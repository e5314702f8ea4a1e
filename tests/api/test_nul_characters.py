"""NUL characters, which no FHIR value, id or record key may hold and PostgreSQL text cannot
store, on SQLite and PostgreSQL: in a URL they are a 400 before anything is looked up (the same
on either store), and in a header's criteria a 400 (422 on the intake API's problem shape) from
the store's refusal, never a 500, and nothing is written."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from service.fhir.errors import FHIR_JSON

PRACTITIONER = b'{"resourceType":"Practitioner","active":true}'


@pytest.mark.parametrize(
    "url",
    [
        "/fhir/Patient?name=%00",
        "/fhir/Patient?_has:Observation:patient:code=%00",
        "/fhir/Observation?_profile=a%00b",
        "/fhir/AuditEvent?entity=%00",
        "/fhir/Patient/x%00",
        "/fhir/Patient/%00/_history",
        "/fhir/Patient/x%00/$everything",
        "/fhir/metadata?mode=%00",
        "/api/v1/sync/dead-letters?destination=%00",
    ],
)
def test_a_nul_in_the_url_is_a_400_in_the_apis_shape(client: TestClient, url: str) -> None:
    answer = client.get(url)
    assert answer.status_code == 400, answer.text
    if url.startswith("/fhir"):
        outcome = answer.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "invalid"
        assert "NUL" in outcome["issue"][0]["diagnostics"]
    else:
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert "NUL" in answer.json()["detail"]


def test_a_nul_in_writes_urls_is_a_400_and_writes_nothing(client: TestClient) -> None:
    system = f"urn:test:{uuid.uuid4().hex}"
    headers = {"Content-Type": FHIR_JSON}
    for method, url in (
        ("PUT", f"/fhir/Practitioner?identifier={system}|a%00"),
        ("PUT", "/fhir/Practitioner/x%00"),
        ("DELETE", f"/fhir/Practitioner?identifier={system}|a%00"),
    ):
        answer = client.request(method, url, content=PRACTITIONER, headers=headers)
        assert answer.status_code == 400, (method, url, answer.text)
        assert answer.json()["resourceType"] == "OperationOutcome"
    assert client.get("/fhir/Practitioner/x").status_code == 404


def test_a_nul_in_if_none_exist_criteria_is_a_4xx_and_creates_nothing(client: TestClient) -> None:
    system = f"urn:test:{uuid.uuid4().hex}"

    def stored() -> int:
        count = client.get("/fhir/Practitioner", params={"_summary": "count"}).json()["total"]
        return int(count)

    before = stored()
    answer = client.post(
        "/fhir/Practitioner",
        content=PRACTITIONER,
        headers={"Content-Type": FHIR_JSON, "If-None-Exist": f"identifier={system}|a%00b"},
    )
    # SQLite can compare the value (nothing matches: the Practitioner is created); PostgreSQL
    # cannot hold it, so the conditional create cannot be decided: a 400, nothing created.
    postgres = client.app.state.services.database.backend == "postgresql"  # type: ignore[attr-defined]
    assert answer.status_code == (400 if postgres else 201), answer.text
    if postgres:
        assert answer.json()["issue"][0]["code"] == "invalid"
    assert stored() == before + (0 if postgres else 1)
