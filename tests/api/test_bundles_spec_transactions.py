"""Batch and transaction Bundles against the letter of FHIR R4 (http.html#transaction,
bundle.html#references), on SQLite and PostgreSQL: entry requests, references between entries,
conditional reads, `Prefer: return` and the shape of the response Bundle."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.fhir_check import r4_errors

FHIR = {"Content-Type": "application/fhir+json"}


def observation(value: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:ehr:obs", "value": value or uuid.uuid4().hex}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {"value": 72, "system": "http://unitsofmeasure.org", "code": "/min"},
    } | extra


def encounter() -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    }


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post(client: TestClient, sent: dict[str, Any], **headers: str) -> Any:
    return client.post("/fhir", json=sent, headers=FHIR | headers)


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def stored(client: TestClient, resource_type: str, resource_id: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{resource_type}/{resource_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def issue_of(response: Any) -> dict[str, Any]:
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    first: dict[str, Any] = outcome["issue"][0]
    return first


# --- entry requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_part", "named"),
    [
        ({"method": "PUT", "url": "Observation/x1", "ifMatch": 1}, "ifMatch"),
        ({"method": ["POST"], "url": "Observation"}, "method"),
        ({"method": "POST", "url": "Observation", "ifNoneExist": 5}, "ifNoneExist"),
        ({"method": "GET", "url": "Observation/x1", "ifNoneMatch": ["1"]}, "ifNoneMatch"),
        ({"method": "GET", "url": "Observation/x1", "ifModifiedSince": "yesterday"}, "ifModified"),
    ],
)
@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_entry_request_elements_of_the_wrong_type_are_a_400(
    client: TestClient, kind: str, request_part: dict[str, Any], named: str
) -> None:
    sent = bundle(kind, {"resource": observation(id="x1"), "request": request_part})
    response = post(client, sent)
    assert response.status_code == 400, response.text
    issue = issue_of(response)
    assert issue["code"] == "invalid"
    assert issue["expression"][0].startswith("Bundle.entry[0].request")
    assert named in issue["diagnostics"] or named == "method"


def test_a_full_url_that_is_not_a_string_is_a_400(client: TestClient) -> None:
    sent = bundle(
        "transaction",
        {
            "fullUrl": 5,
            "resource": observation(),
            "request": {"method": "POST", "url": "Observation"},
        },
    )
    response = post(client, sent)
    assert response.status_code == 400, response.text
    assert issue_of(response)["expression"] == ["Bundle.entry[0].fullUrl"]


def test_a_delete_of_a_version_url_deletes_nothing(client: TestClient) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    for url in (
        f"Observation/{created['id']}/_history/1",
        f"Observation/{created['id']}/extra",
        f"Observation/{created['id']}?status=final",
    ):
        response = post(
            client, bundle("transaction", {"request": {"method": "DELETE", "url": url}})
        )
        assert response.status_code == 400, response.text
        issue = issue_of(response)
        assert issue["code"] == "not-supported"
        assert issue["expression"] == ["Bundle.entry[0].request.url"]
    assert client.get(f"/fhir/Observation/{created['id']}").status_code == 200


@pytest.mark.parametrize(
    "request_part",
    [
        {"method": "POST", "url": "Observation/abc"},
        {"method": "PUT", "url": "Observation/abc/_history/2"},
        {"method": "PATCH", "url": "Observation/abc/_history/2"},
    ],
)
def test_urls_that_do_not_fit_the_interaction_are_refused(
    client: TestClient, request_part: dict[str, Any]
) -> None:
    sent = bundle("transaction", {"resource": observation(id="abc"), "request": request_part})
    response = post(client, sent)
    assert response.status_code == 400, response.text
    assert issue_of(response)["expression"] == ["Bundle.entry[0].request.url"]
    assert client.get("/fhir/Observation/abc").status_code in (404, 410)


# --- the response Bundle --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["batch", "transaction"])
@pytest.mark.parametrize("entries", [None, []])
def test_an_empty_bundle_answers_a_valid_response_bundle(
    client: TestClient, kind: str, entries: list[Any] | None
) -> None:
    sent: dict[str, Any] = {"resourceType": "Bundle", "type": kind}
    if entries is not None:
        sent["entry"] = entries
    response = post(client, sent)
    assert response.status_code == 200, response.text
    # FHIR JSON has no empty arrays: an answer with `"entry": []` is not valid R4.
    assert response.json() == {"resourceType": "Bundle", "type": f"{kind}-response"}
    assert r4_errors(response.json()) == []


def test_a_head_entry_answers_without_a_body(client: TestClient) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    sent = bundle(
        "batch",
        {"request": {"method": "HEAD", "url": f"Observation/{created['id']}"}},
        {"request": {"method": "HEAD", "url": "Observation?_count=1"}},
    )
    response = post(client, sent)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["200 OK", "200 OK"]
    assert entries[0]["response"]["etag"] == 'W/"1"'
    assert all("resource" not in e for e in entries)


@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_conditional_read_entries_answer_304_when_the_client_has_the_version(
    client: TestClient, kind: str
) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    url = f"Observation/{created['id']}"
    last_updated = created["meta"]["lastUpdated"]
    sent = bundle(
        kind,
        {"request": {"method": "GET", "url": url, "ifNoneMatch": 'W/"1"'}},
        {"request": {"method": "GET", "url": url, "ifNoneMatch": 'W/"2"'}},
        {"request": {"method": "GET", "url": url, "ifModifiedSince": last_updated}},
        {"request": {"method": "GET", "url": url, "ifModifiedSince": "2001-01-01T00:00:00Z"}},
        {"request": {"method": "GET", "url": f"{url}/_history/1", "ifNoneMatch": 'W/"1"'}},
    )
    response = post(client, sent)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert [e["response"]["status"] for e in entries] == [
        "304 Not Modified",
        "200 OK",
        "304 Not Modified",
        "200 OK",
        "304 Not Modified",
    ]
    for index in (0, 2, 4):
        assert "resource" not in entries[index]
        assert entries[index]["response"]["etag"] == 'W/"1"'
    assert entries[1]["resource"]["id"] == created["id"]
    assert entries[3]["resource"]["id"] == created["id"]


@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_prefer_return_operation_outcome_answers_an_outcome_per_entry(
    client: TestClient, kind: str
) -> None:
    existing = client.post("/fhir/Observation", json=observation()).json()
    sent = bundle(
        kind,
        {"resource": observation(), "request": {"method": "POST", "url": "Observation"}},
        {"request": {"method": "DELETE", "url": f"Observation/{existing['id']}"}},
        {"request": {"method": "GET", "url": "Observation?_count=1"}},
    )
    response = post(client, sent, Prefer="return=OperationOutcome")
    assert response.status_code == 200, response.text
    result = response.json()
    assert r4_errors(result) == []
    created, deleted, searched = result["entry"]
    for entry in (created, deleted):
        assert "resource" not in entry
        outcome = entry["response"]["outcome"]
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["severity"] == "information"
    assert created["response"]["status"] == "201 Created"
    assert (
        created["response"]["location"] in created["response"]["outcome"]["issue"][0]["diagnostics"]
    )
    assert searched["resource"]["type"] == "searchset"  # a search's answer is its body


# --- references between entries -------------------------------------------------------------------


@pytest.mark.parametrize("matches", [False, True])
def test_references_to_a_conditional_updates_full_url_name_its_resource(
    client: TestClient, matches: bool
) -> None:
    value = uuid.uuid4().hex
    if matches:
        existing = client.post("/fhir/Observation", json=observation(value)).json()
    full_url = urn()
    sent = bundle(
        "transaction",
        {
            "fullUrl": full_url,
            "resource": observation(value, status="amended"),
            "request": {"method": "PUT", "url": f"Observation?identifier=urn:ehr:obs|{value}"},
        },
        {
            "resource": observation(derivedFrom=[{"reference": full_url}]),
            "request": {"method": "POST", "url": "Observation"},
        },
    )
    response = post(client, sent)
    assert response.status_code == 200, response.text
    updated, referring = response.json()["entry"]
    assert updated["response"]["status"] == ("200 OK" if matches else "201 Created")
    if matches:
        assert updated["resource"]["id"] == existing["id"]
    target = f"Observation/{updated['resource']['id']}"
    assert referring["resource"]["derivedFrom"] == [{"reference": target}]
    assert stored(client, "Observation", referring["resource"]["id"])["derivedFrom"] == [
        {"reference": target}
    ]


def test_references_to_a_conditional_update_by_other_criteria_name_its_resource(
    client: TestClient,
) -> None:
    value = uuid.uuid4().hex
    existing = client.post("/fhir/Observation", json=observation(value)).json()
    full_url = urn()
    sent = bundle(
        "transaction",
        {
            "resource": observation(hasMember=[{"reference": full_url}]),
            "request": {"method": "POST", "url": "Observation"},
        },
        {
            "fullUrl": full_url,
            "resource": observation(value),
            "request": {
                "method": "PUT",
                "url": f"Observation?identifier=urn:ehr:obs|{value}&status=final",
            },
        },
    )
    response = post(client, sent)
    assert response.status_code == 200, response.text
    referring = response.json()["entry"][0]["resource"]
    assert referring["hasMember"] == [{"reference": f"Observation/{existing['id']}"}]


def test_relative_references_resolve_against_the_entrys_restful_full_url(
    client: TestClient,
) -> None:
    """bundle.html#references: `Type/id` in an entry whose fullUrl is `[base]/Type/id` names
    the entry whose fullUrl is `[base]/Type/id`, if there is one."""
    other = "http://ehr.example.org/fhir"
    old_id = uuid.uuid4().hex[:12]
    sent = bundle(
        "transaction",
        {
            "fullUrl": f"{other}/Encounter/{old_id}",
            "resource": encounter() | {"id": old_id},
            "request": {"method": "POST", "url": "Encounter"},
        },
        {
            "fullUrl": f"{other}/Observation/{uuid.uuid4().hex[:12]}",
            "resource": observation(encounter={"reference": f"Encounter/{old_id}"}),
            "request": {"method": "POST", "url": "Observation"},
        },
        {
            "fullUrl": f"{other}/Observation/{uuid.uuid4().hex[:12]}",
            "resource": observation(
                encounter={"reference": f"{other}/Encounter/{old_id}"},
                extension=[
                    {
                        "url": "http://example.org/fhir/StructureDefinition/visit",
                        "valueReference": {"reference": f"Encounter/{old_id}"},
                    }
                ],
            ),
            "request": {"method": "POST", "url": "Observation"},
        },
        {
            # No RESTful fullUrl: its relative reference is to this server, left as it is.
            "resource": observation(derivedFrom=[{"reference": f"Observation/{old_id}"}]),
            "request": {"method": "POST", "url": "Observation"},
        },
    )
    response = post(client, sent)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    new_id = entries[0]["resource"]["id"]
    assert new_id != old_id
    target = {"reference": f"Encounter/{new_id}"}
    assert entries[1]["resource"]["encounter"] == target
    assert entries[2]["resource"]["encounter"] == target
    assert entries[2]["resource"]["extension"][0]["valueReference"] == target
    assert entries[3]["resource"]["derivedFrom"] == [{"reference": f"Observation/{old_id}"}]


def test_references_rewritten_in_contained_resources_extensions_and_arrays(
    client: TestClient,
) -> None:
    visit, first, second = urn(), urn(), f"urn:oid:1.2.840.{uuid.uuid4().int % 10**9}"
    sent = bundle(
        "transaction",
        {
            "resource": observation(
                encounter={"reference": visit},
                extension=[
                    {
                        "url": "http://example.org/fhir/StructureDefinition/visit",
                        "valueReference": {"reference": visit},
                    }
                ],
                contained=[
                    {
                        "resourceType": "Observation",
                        "id": "inner",
                        "status": "final",
                        "code": {"text": "inner"},
                        "encounter": {"reference": visit},
                    }
                ],
                hasMember=[{"reference": "#inner"}, {"reference": first}, {"reference": second}],
            ),
            "request": {"method": "POST", "url": "Observation"},
        },
        {
            "fullUrl": visit,
            "resource": encounter(),
            "request": {"method": "POST", "url": "Encounter"},
        },
        {
            "fullUrl": first,
            "resource": observation(),
            "request": {"method": "POST", "url": "Observation"},
        },
        {
            "fullUrl": second,
            "resource": observation(),
            "request": {"method": "POST", "url": "Observation"},
        },
    )
    response = post(client, sent)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    made = stored(client, "Observation", entries[0]["resource"]["id"])
    visit_ref = {"reference": f"Encounter/{entries[1]['resource']['id']}"}
    assert made["encounter"] == visit_ref
    assert made["extension"][0]["valueReference"] == visit_ref
    assert made["contained"][0]["encounter"] == visit_ref
    assert made["hasMember"] == [
        {"reference": "#inner"},
        {"reference": f"Observation/{entries[2]['resource']['id']}"},
        {"reference": f"Observation/{entries[3]['resource']['id']}"},
    ]


def test_a_urn_uuid_reference_to_no_entry_fails_the_transaction(client: TestClient) -> None:
    value, dangling = uuid.uuid4().hex, urn()
    sent = bundle(
        "transaction",
        {"resource": observation(value), "request": {"method": "POST", "url": "Observation"}},
        {
            "fullUrl": urn(),
            "resource": observation(derivedFrom=[{"reference": dangling}]),
            "request": {"method": "POST", "url": "Observation"},
        },
    )
    response = post(client, sent)
    assert response.status_code == 400, response.text
    issue = issue_of(response)
    assert issue["code"] == "invalid"
    assert issue["expression"][0] == "Bundle.entry[1]"
    assert dangling in issue["diagnostics"]
    assert sent["entry"][1]["fullUrl"] in issue["diagnostics"]
    # Rolled back: the first entry's create is not there either.
    assert client.get(f"/fhir/Observation?identifier=urn:ehr:obs|{value}").json().get("total") == 0


def test_batch_entries_may_not_refer_to_each_other(client: TestClient) -> None:
    """http.html#brules: a reference from one batch entry to another that it creates is not
    conformant; the entry that refers fails on its own, the others run."""
    visit, server_side = urn(), "http://ehr.example.org/fhir/Encounter/9"
    sent = bundle(
        "batch",
        {
            "fullUrl": visit,
            "resource": encounter(),
            "request": {"method": "POST", "url": "Encounter"},
        },
        {
            "resource": observation(encounter={"reference": visit}),
            "request": {"method": "POST", "url": "Observation"},
        },
        {
            "fullUrl": server_side,
            "resource": encounter(),
            "request": {"method": "POST", "url": "Encounter"},
        },
        {
            "fullUrl": "http://ehr.example.org/fhir/Observation/1",
            "resource": observation(encounter={"reference": "Encounter/9"}),
            "request": {"method": "POST", "url": "Observation"},
        },
        {"resource": observation(), "request": {"method": "POST", "url": "Observation"}},
    )
    response = post(client, sent)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert [e["response"]["status"] for e in entries] == [
        "201 Created",
        "400",
        "201 Created",
        "400",
        "201 Created",
    ]
    for index in (1, 3):
        issue = entries[index]["response"]["outcome"]["issue"][0]
        assert issue["code"] == "invalid"
        assert issue["expression"] == [f"Bundle.entry[{index}]"]
    assert visit in entries[1]["response"]["outcome"]["issue"][0]["diagnostics"]


def test_the_outcome_of_a_failed_transaction_names_the_entrys_index_and_full_url(
    client: TestClient,
) -> None:
    full_url = urn()
    broken = observation()
    del broken["status"]
    sent = bundle(
        "transaction",
        {"resource": observation(), "request": {"method": "POST", "url": "Observation"}},
        {
            "fullUrl": full_url,
            "resource": broken,
            "request": {"method": "POST", "url": "Observation"},
        },
    )
    response = post(client, sent)
    assert response.status_code == 422, response.text
    issues = response.json()["issue"]
    assert issues
    for issue in issues:
        assert issue["expression"][0] == "Bundle.entry[1]"
        assert issue["diagnostics"].startswith(f"entry 1 (POST Observation, fullUrl {full_url}): ")


# --- conditional create in a batch ----------------------------------------------------------------


def test_a_batch_entry_with_if_none_exist_creates_only_without_a_match(client: TestClient) -> None:
    """A batch entry is the request sent alone: `ifNoneExist` is a conditional create (no match:
    create, 201; one: nothing created, 200 with the match; several: 412)."""
    one, several, none = (uuid.uuid4().hex for _ in range(3))
    existing = client.post("/fhir/Observation", json=observation(one)).json()
    for _ in range(2):
        client.post("/fhir/Observation", json=observation(several))

    def conditional(value: str) -> dict[str, Any]:
        return {
            "resource": observation(value),
            "request": {
                "method": "POST",
                "url": "Observation",
                "ifNoneExist": f"identifier=urn:ehr:obs|{value}",
            },
        }

    sent = bundle("batch", conditional(one), conditional(several), conditional(none))
    response = post(client, sent)
    assert response.status_code == 200, response.text
    matched, ambiguous, created = response.json()["entry"]
    assert matched["response"]["status"] == "200 OK"
    assert matched["resource"]["id"] == existing["id"]
    assert matched["response"]["location"].endswith(f"/Observation/{existing['id']}/_history/1")
    assert ambiguous["response"]["status"] == "412"
    assert ambiguous["response"]["outcome"]["issue"][0]["expression"] == ["Bundle.entry[1]"]
    assert created["response"]["status"] == "201 Created"
    totals = {
        value: client.get(f"/fhir/Observation?identifier=urn:ehr:obs|{value}").json()["total"]
        for value in (one, several, none)
    }
    assert totals == {one: 1, several: 2, none: 1}


def test_a_batch_entry_with_bad_if_none_exist_criteria_fails_on_its_own(client: TestClient) -> None:
    sent = bundle(
        "batch",
        {
            "resource": observation(),
            "request": {"method": "POST", "url": "Observation", "ifNoneExist": "colour=blue"},
        },
        {"resource": observation(), "request": {"method": "POST", "url": "Observation"}},
    )
    response = post(client, sent)
    assert response.status_code == 200, response.text
    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    assert statuses == ["400", "201 Created"]


# --- the Bundle's size and shape ------------------------------------------------------------------


def test_a_bundle_over_the_entry_limit_is_too_costly(client: TestClient) -> None:
    entry = {"request": {"method": "GET", "url": "Observation/x"}}
    response = post(client, bundle("batch", *([entry] * 10001)))
    issue = issue_of(response)
    assert response.status_code == 400
    assert issue["code"] == "too-costly"
    assert issue["expression"] == ["Bundle.entry"]
    assert "10001" in issue["diagnostics"]


def test_an_entry_element_that_is_no_list_is_invalid(client: TestClient) -> None:
    response = post(client, {"resourceType": "Bundle", "type": "batch", "entry": {}})
    issue = issue_of(response)
    assert response.status_code == 400
    assert (issue["code"], issue["expression"]) == ("invalid", ["Bundle.entry"])


def test_a_read_entry_takes_the_format_parameters(client: TestClient) -> None:
    created = client.post("/fhir/Observation", json=observation()).json()
    url = f"Observation/{created['id']}"
    sent = bundle(
        "batch",
        {"request": {"method": "GET", "url": f"{url}?_format=json"}},
        {"request": {"method": "GET", "url": f"{url}/_history/1?_format=application/fhir%2Bjson"}},
        {"request": {"method": "GET", "url": f"{url}?_pretty=true"}},
        {"request": {"method": "GET", "url": f"{url}?status=final"}},
    )
    response = post(client, sent)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["200 OK", "200 OK", "200 OK", "400"]
    assert all(e["resource"] == created for e in entries[:3])


def test_links_to_full_urls_in_the_narrative_and_url_elements_are_rewritten(
    client: TestClient,
) -> None:
    """http.html#trules: servers SHALL replace all matching links in the bundle, in resource
    references, elements of type uri and url, and `<a href>` and `<img src>` in the narrative."""
    visit, document, other = urn(), f"urn:oid:1.2.840.{uuid.uuid4().int % 10**9}", urn()
    div = (
        '<div xmlns="http://www.w3.org/1999/xhtml"><p>Seen at <a href="'
        + visit
        + "\">the visit</a>, <img src='"
        + document
        + "'/>; not this: "
        + visit
        + ', nor <a href="'
        + other
        + '">an unknown one</a></p></div>'
    )
    sent = bundle(
        "transaction",
        {
            "fullUrl": visit,
            "resource": encounter(),
            "request": {"method": "POST", "url": "Encounter"},
        },
        {
            "fullUrl": document,
            "resource": observation(),
            "request": {"method": "POST", "url": "Observation"},
        },
        {
            "resource": {
                "resourceType": "QuestionnaireResponse",
                "status": "completed",
                "text": {"status": "generated", "div": div},
                "encounter": {"reference": visit},
                "item": [
                    {
                        "linkId": "1",
                        "answer": [{"valueAttachment": {"url": document, "title": "scan"}}],
                    }
                ],
            },
            "request": {"method": "POST", "url": "QuestionnaireResponse"},
        },
    )
    response = post(client, sent)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    encounter_ref = f"Encounter/{entries[0]['resource']['id']}"
    observation_ref = f"Observation/{entries[1]['resource']['id']}"
    made = stored(client, "QuestionnaireResponse", entries[2]["resource"]["id"])
    assert made["encounter"] == {"reference": encounter_ref}
    assert made["item"][0]["answer"][0]["valueAttachment"]["url"] == observation_ref
    narrative = made["text"]["div"]
    assert f'<a href="{encounter_ref}">' in narrative
    assert f"<img src='{observation_ref}'/>" in narrative
    assert f"not this: {visit}," in narrative  # text, not a link
    assert f'<a href="{other}">' in narrative  # names no entry: left as it is
