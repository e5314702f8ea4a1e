"""Write interactions against the letter of FHIR R4 (http.html#create, #update, #patch), on
SQLite and PostgreSQL: what `Prefer: return=OperationOutcome` says, what a failed JSON Patch
`test` tells, and writes to the CapabilityStatement."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from tests.api.test_fhir_write import observation as ehr_observation

FHIR = "application/fhir+json"
PATCH = {"Content-Type": "application/json-patch+json"}
OUTCOME = {"Prefer": "return=OperationOutcome"}


def observation(**extra: Any) -> dict[str, Any]:
    """The write tests' Observation, naming a patient no error may repeat."""
    return ehr_observation(**({"subject": {"display": "Ms Secret Name"}} | extra))


def informational(response: Any, status: int, diagnostics: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR)
    assert response.json() == {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational", "diagnostics": diagnostics}],
    }


def test_operation_outcome_says_what_the_write_did(client: TestClient) -> None:
    sent = observation()
    system, value = sent["identifier"][0]["system"], sent["identifier"][0]["value"]
    criteria = {"If-None-Exist": f"identifier={system}|{value}"}
    created = client.post("/fhir/Observation", json=sent, headers=OUTCOME | criteria)
    location = created.headers["location"].removeprefix("http://testserver/fhir/")
    informational(created, 201, f"{location} created")
    path = location.rsplit("/_history/", 1)[0]
    # The match of a conditional create: nothing was created, nor updated.
    found = client.post("/fhir/Observation", json=sent, headers=OUTCOME | criteria)
    informational(found, 200, f"{location} unchanged: it is the current version")
    assert found.headers["etag"] == 'W/"1"'
    body = client.get(f"/fhir/{path}").json()
    # The same content again (as read back, or its members in another order): no new version,
    # and the outcome does not claim one.
    reordered = dict(reversed(list(body.items())))
    for again in (body, reordered):
        unchanged = client.put(f"/fhir/{path}", json=again, headers=OUTCOME)
        informational(unchanged, 200, f"{location} unchanged: it is the current version")
        assert unchanged.headers["etag"] == 'W/"1"'
    assert len(client.get(f"/fhir/{path}/_history").json()["entry"]) == 1
    informational(
        client.put(f"/fhir/{path}", json=body | {"status": "amended"}, headers=OUTCOME),
        200,
        f"{path}/_history/2 updated",
    )
    assert client.get(f"/fhir/{path}").json()["meta"]["versionId"] == "2"


def test_a_failed_patch_test_does_not_repeat_the_resource(client: TestClient) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    url = f"/fhir/Observation/{created['id']}"
    for pointer, missing in (("/nothere", "nothere"), ("/subject/nothere", "nothere")):
        ops = [{"op": "test", "path": pointer, "value": "x"}]
        response = client.patch(url, content=orjson.dumps(ops), headers=PATCH)
        assert response.status_code == 422, response.text
        assert response.json() == {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "processing",
                    "diagnostics": f"a test operation failed: member '{missing}' not found",
                }
            ],
        }
        assert "Secret" not in response.text
    assert client.get(url).json()["meta"]["versionId"] == "1"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_the_capability_statement_is_read_only(client: TestClient, method: str) -> None:
    response = client.request(method, "/fhir/metadata", json={"resourceType": "Basic"})
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == "GET"
    assert response.json() == {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "not-supported",
                "diagnostics": "the CapabilityStatement at /fhir/metadata is read-only",
            }
        ],
    }
    assert client.get("/fhir/metadata").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/fhir/Observation/x", "GET, PUT, PATCH, DELETE"),
        ("PATCH", "/fhir/Observation", "GET, POST, PUT, DELETE"),
        ("DELETE", "/fhir/Observation/x/_history/1", "GET"),
        ("PUT", "/fhir", "POST"),
    ],
)
def test_a_405_allows_every_method_the_path_takes(
    client: TestClient, method: str, path: str, allowed: str
) -> None:
    response = client.request(method, path, content=b"{}", headers={"Content-Type": FHIR})
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == allowed
    assert response.json()["resourceType"] == "OperationOutcome"


def _precondition(response: Any, diagnostics: str) -> None:
    assert response.status_code == 412, response.text
    assert response.json() == {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "conflict", "diagnostics": diagnostics}],
    }


def test_if_match_star_holds_while_a_version_is_current(client: TestClient) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    url = f"/fhir/Observation/{created['id']}"
    star = {"If-Match": "*"}
    updated = client.put(url, json=created | {"status": "amended"}, headers=star)
    assert (updated.status_code, updated.headers["etag"]) == (200, 'W/"2"')
    ops = b'[{"op": "replace", "path": "/status", "value": "final"}]'
    patched = client.patch(url, content=ops, headers=PATCH | star)
    assert (patched.status_code, patched.headers["etag"]) == (200, 'W/"3"')
    assert client.delete(url, headers=star).status_code == 204
    _precondition(
        client.put(url, json=created, headers=star),
        f"Observation/{created['id']}: If-Match * asked for a current version, "
        "was deleted at version 4",
    )
    unknown = f"never-{uuid.uuid4().hex[:12]}"
    _precondition(
        client.put(f"/fhir/Observation/{unknown}", json=observation(id=unknown), headers=star),
        f"Observation/{unknown}: If-Match * asked for a current version, does not exist",
    )
    assert client.get(f"/fhir/Observation/{unknown}").status_code == 404


def test_if_match_of_a_version_that_cannot_exist_fails_the_precondition(
    client: TestClient,
) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    url = f"/fhir/Observation/{created['id']}"
    _precondition(
        client.put(url, json=created, headers={"If-Match": 'W/"12345678901234567890"'}),
        f"Observation/{created['id']}: If-Match asked for version 12345678901234567890, "
        "it is at version 1",
    )


# A superscript digit (sent as its Latin-1 byte, as HTTP headers carry it): str.isdigit() says
# yes, int() refuses it.
@pytest.mark.parametrize("tag", ['W/"\u00b2"', 'W/"\u00b9"', 'W/"1', "W/", 'W/"1", W/"2"', ""])
def test_a_malformed_if_match_is_400(client: TestClient, tag: str) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    url = f"/fhir/Observation/{created['id']}"
    headers = {"If-Match": tag.encode("latin-1")}
    for response in (
        client.put(url, json=created | {"status": "amended"}, headers=headers),
        client.patch(url, content=b"[]", headers=PATCH | headers),
        client.delete(url, headers=headers),
    ):
        assert response.status_code == 400, (tag, response.text)
        assert response.json()["issue"][0]["code"] == "invalid"
    assert client.get(url).json()["meta"]["versionId"] == "1"
