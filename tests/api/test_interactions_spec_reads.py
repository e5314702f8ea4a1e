"""Conditional reads against the letter of FHIR R4 (http.html#cread) and HTTP, on SQLite and
PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from fastapi.testclient import TestClient

from tests.api.test_fhir_write import observation


def test_if_modified_since_a_date_still_to_come_is_ignored(client: TestClient) -> None:
    created = client.post("/fhir/Observation", json=observation())
    url = f"/fhir/Observation/{created.json()['id']}"
    # A date later than the server's clock is invalid, and an invalid date is ignored: the
    # client gets the resource, not a 304 for a copy it cannot have.
    future = format_datetime(datetime.now(UTC) + timedelta(days=365), usegmt=True)
    for path in (url, f"{url}/_history/1"):
        response = client.get(path, headers={"If-Modified-Since": future})
        assert response.status_code == 200, response.text
        assert response.json()["id"] == created.json()["id"]
    # The resource's own Last-Modified still answers 304.
    current = client.get(url, headers={"If-Modified-Since": created.headers["last-modified"]})
    assert (current.status_code, current.content) == (304, b"")
    assert current.headers["etag"] == 'W/"1"'
