"""vread and history against the letter of FHIR R4 (http.html#vread, #history), on SQLite and
PostgreSQL: version ids that are not this server's, `_since` as an instant, `_at`, and the
history Bundle's order and entries."""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from tests.api.test_fhir_write import observation

FHIR = "application/fhir+json"


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


def _versions(client: TestClient, count: int) -> tuple[str, list[datetime]]:
    """An Observation with `count` versions, a few milliseconds apart, and when each was made."""
    created = client.post("/fhir/Observation", json=observation()).json()
    url = f"/fhir/Observation/{created['id']}"
    times = [datetime.fromisoformat(created["meta"]["lastUpdated"])]
    body = created
    for n in range(2, count + 1):
        time.sleep(0.01)
        body = client.put(url, json=body | {"valueQuantity": {"value": n, "unit": "/min"}}).json()
        assert body["meta"]["versionId"] == str(n)
        times.append(datetime.fromisoformat(body["meta"]["lastUpdated"]))
    return url, times


def _history_versions(response: Any) -> list[str]:
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert (bundle["resourceType"], bundle["type"]) == ("Bundle", "history")
    return [entry["response"]["etag"] for entry in bundle.get("entry", [])]


def _param(moment: datetime) -> str:
    return quote(moment.isoformat(), safe="")


@pytest.mark.parametrize(
    "since",
    [
        "2026-01-01",  # a date is no instant: read as midnight UTC it would guess a zone
        "2026",  # read as a number it was 33 minutes past 1970
        "2026-01-01T00:00:00",  # a time without its offset
        "yesterday",
        "2026-13-01T00:00:00Z",
    ],
)
def test_history_since_takes_an_instant_only(client: TestClient, since: str) -> None:
    url, _times = _versions(client, 1)
    body = assert_outcome(client.get(f"{url}/_history?_since={since}"), 400, "invalid")
    assert body["issue"][0]["expression"] == ["_since"]
    assert_outcome(client.get(f"/fhir/Observation/_history?_since={since}"), 400, "invalid")


def test_history_since_keeps_the_versions_made_at_or_after_it(client: TestClient) -> None:
    url, times = _versions(client, 3)
    assert _history_versions(client.get(f"{url}/_history?_since={_param(times[1])}")) == [
        'W/"3"',
        'W/"2"',
    ]
    # An offset other than UTC, its `+` left unencoded (it arrives as a space): the same instant.
    east = times[1].astimezone(timezone(timedelta(hours=5))).isoformat()
    assert _history_versions(client.get(f"{url}/_history?_since={east}")) == ['W/"3"', 'W/"2"']
    later = times[2] + timedelta(seconds=1)
    assert _history_versions(client.get(f"{url}/_history?_since={_param(later)}")) == []


def test_history_at_keeps_the_versions_current_during_it(client: TestClient) -> None:
    url, times = _versions(client, 3)
    between = times[0] + (times[1] - times[0]) / 2
    assert _history_versions(client.get(f"{url}/_history?_at={_param(between)}")) == ['W/"1"']
    assert _history_versions(client.get(f"{url}/_history?_at={_param(times[1])}")) == ['W/"2"']
    after = times[2] + timedelta(days=2)
    assert _history_versions(client.get(f"{url}/_history?_at={_param(after)}")) == ['W/"3"']
    before = times[0] - timedelta(days=2)
    assert _history_versions(client.get(f"{url}/_history?_at={_param(before)}")) == []
    # A day is its whole range: every version made that day, and the one current when it began.
    day = times[0].date().isoformat()
    assert _history_versions(client.get(f"{url}/_history?_at={day}")) == [
        'W/"3"',
        'W/"2"',
        'W/"1"',
    ]
    # Type history too: a resource made after the moment was not current at it.
    other, _ = _versions(client, 1)
    type_history = client.get(f"/fhir/Observation/_history?_at={_param(between)}&_count=1000")
    urls = [entry["fullUrl"] for entry in type_history.json()["entry"]]
    assert f"http://testserver{url}" in urls
    assert f"http://testserver{other}" not in urls
    body = assert_outcome(client.get(f"{url}/_history?_at=soon"), 400, "invalid")
    assert body["issue"][0]["expression"] == ["_at"]


def test_a_deletion_is_a_history_entry_without_a_resource(client: TestClient) -> None:
    url, times = _versions(client, 2)
    assert client.delete(url).status_code == 204
    bundle = client.get(f"{url}/_history").json()
    entries = bundle["entry"]
    assert [e["request"]["method"] for e in entries] == ["DELETE", "PUT", "POST"]
    assert "resource" not in entries[0]
    assert entries[0]["response"]["etag"] == 'W/"3"'
    assert entries[0]["request"]["url"] == url.removeprefix("/fhir/")
    assert all("resource" in e for e in entries[1:])
    modified = [datetime.fromisoformat(e["response"]["lastModified"]) for e in entries]
    assert modified == sorted(modified, reverse=True)
    assert modified[1:] == times[::-1]


def _token(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        _token("2026-01-01T00:00:00", "a", 1),  # no offset: the store takes none
        _token("0001-01-01T00:00:00+01:00", "a", 1),  # before year 1 in UTC
        _token("2026-01-01T00:00:00+00:00", "a", 2**40),  # past the version column
        _token("2026-01-01T00:00:00+00:00", "a", "1"),
        _token("2026-01-01T00:00:00+00:00", ["a"], 1),
        _token("2026-01-01T00:00:00+00:00", "a" * 65, 1),
        _token("2026-01-01T00:00:00+00:00", "a", 1, 2),
    ],
)
def test_a_forged_history_page_token_is_400(client: TestClient, token: str) -> None:
    url, _times = _versions(client, 1)
    for path in (f"{url}/_history", "/fhir/Observation/_history"):
        body = assert_outcome(client.get(f"{path}?_page={token}"), 400, "invalid")
        assert body["issue"][0]["diagnostics"] == "_page is not a page token this server issued"


def test_history_pages_follow_next_links_newest_first(client: TestClient) -> None:
    url, _times = _versions(client, 5)
    seen: list[str] = []
    page: str | None = f"{url}/_history?_count=2"
    while page is not None:
        bundle = client.get(page).json()
        seen += [entry["response"]["etag"] for entry in bundle["entry"]]
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        page = links.get("next", "").removeprefix("http://testserver") or None
    assert seen == [f'W/"{n}"' for n in range(5, 0, -1)]


def test_the_history_of_an_unknown_resource_is_404_whatever_the_filters(
    client: TestClient,
) -> None:
    unknown = f"/fhir/Observation/never-{uuid.uuid4().hex[:12]}/_history"
    for query in ("", "?_since=2026-01-01T00:00:00Z", "?_at=2026", "?_count=1"):
        assert_outcome(client.get(unknown + query), 404, "not-found")
    # A known resource whose versions the filters leave out: an empty history, not a 404.
    url, times = _versions(client, 1)
    later = _param(times[0] + timedelta(days=1))
    assert _history_versions(client.get(f"{url}/_history?_since={later}")) == []


def test_an_update_after_a_deletion_is_a_create_in_the_history(client: TestClient) -> None:
    url, _times = _versions(client, 2)
    body = client.get(url).json()
    assert client.delete(url).status_code == 204
    recreated = client.put(url, json=body)
    assert (recreated.status_code, recreated.headers["etag"]) == (201, 'W/"4"')
    updated = client.put(url, json=recreated.json() | {"status": "amended"})
    assert (updated.status_code, updated.headers["etag"]) == (200, 'W/"5"')
    expected = [
        ("PUT", "200 OK"),
        ("PUT", "201 Created"),  # as the update answered: it brought the resource back
        ("DELETE", "204 No Content"),
        ("PUT", "200 OK"),
        ("POST", "201 Created"),
    ]
    entries = client.get(f"{url}/_history").json()["entry"]
    assert [(e["request"]["method"], e["response"]["status"]) for e in entries] == expected
    # The same on pages of one, where the deletion is not on the recreation's page.
    seen: list[tuple[str, str]] = []
    page: str | None = f"{url}/_history?_count=1"
    while page is not None:
        bundle = client.get(page).json()
        seen += [(e["request"]["method"], e["response"]["status"]) for e in bundle["entry"]]
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        page = links.get("next", "").removeprefix("http://testserver") or None
    assert seen == expected
    type_entries = client.get("/fhir/Observation/_history?_count=1000").json()["entry"]
    mine = [e for e in type_entries if e["fullUrl"] == f"http://testserver{url}"]
    assert [(e["request"]["method"], e["response"]["status"]) for e in mine] == expected


def test_a_count_above_the_page_limit_gets_the_limit(client: TestClient) -> None:
    url, _times = _versions(client, 2)
    for count in ("1001", "5000", "99999999999999999999"):
        response = client.get(f"{url}/_history?_count={count}")
        assert _history_versions(response) == ['W/"2"', 'W/"1"'], count
        type_history = client.get(f"/fhir/Observation/_history?_count={count}")
        assert type_history.status_code == 200, type_history.text
        assert len(type_history.json()["entry"]) <= 1000
    for count in ("0", "-1", "ten"):
        assert_outcome(client.get(f"{url}/_history?_count={count}"), 400, "invalid")
