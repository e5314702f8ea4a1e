"""Search entries and conditional references in batch and transaction Bundles (POST /fhir), on
SQLite and PostgreSQL: an entry answers what the same search sent alone answers, and
`Patient?identifier=...` in a resource becomes `Patient/<id>` of its one match."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import SecureApi
from tests.factory import clinic, path_of
from tests.fhir_check import r4_errors

FHIR = "application/fhir+json"
OBS = "urn:ehr:obs"
MRN = "http://infusion-bridge.org/fhir/sid/mrn"


def observation(value: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": OBS, "value": value}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
        "valueQuantity": {"value": 120, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
    } | extra


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def get(url: str) -> dict[str, Any]:
    return {"request": {"method": "GET", "url": url}}


def post(resource: dict[str, Any]) -> dict[str, Any]:
    return {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}


def send(client: TestClient, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/fhir", json=body, headers={"Content-Type": FHIR} | headers)


def answered(
    client: TestClient, body: dict[str, Any], *, subsetted: bool = False, **headers: str
) -> list[dict[str, Any]]:
    response = send(client, body, **headers)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == f"{body['type']}-response"
    if not subsetted:  # a SUBSETTED resource may lack what R4 requires
        assert r4_errors(result) == []
    entries: list[dict[str, Any]] = result["entry"]
    return entries


def without_time(searchset: dict[str, Any]) -> dict[str, Any]:
    """A searchset without `meta.lastUpdated`, the one thing two runs of a search differ in."""
    assert set(searchset["meta"]) == {"lastUpdated"}
    return {key: value for key, value in searchset.items() if key != "meta"}


def created(client: TestClient, count: int) -> tuple[list[str], list[dict[str, Any]]]:
    values = [uuid.uuid4().hex for _ in range(count)]
    stored = []
    for value in values:
        response = client.post("/fhir/Observation", json=observation(value))
        assert response.status_code == 201, response.text
        stored.append(response.json())
    return values, stored


def load_patient(client: TestClient) -> tuple[str, str]:
    """A patient through the intake API: its FHIR id and its MRN."""
    records = clinic()
    assert client.put(path_of(records.patient), json=records.patient).status_code == 201
    mrn = records.patient["mrn"]
    found = client.get(f"/fhir/Patient?identifier={MRN}|{mrn}").json()
    return found["entry"][0]["resource"]["id"], mrn


def any_of(values: list[str]) -> str:
    return ",".join(f"{OBS}|{value}" for value in values)


# --- search entries -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["batch", "transaction"])
@pytest.mark.parametrize(
    "extra",
    [
        "",
        "&_count=2",
        "&_count=2&_total=accurate",
        "&_summary=count",
        "&_summary=true",
        "&_elements=status,valueQuantity",
        "&_sort=-_id&_include=Observation:has-member",
        "&unknown-parameter=1&_count=nope",
    ],
)
def test_a_search_entry_answers_the_searchset_the_search_alone_answers(
    client: TestClient, kind: str, extra: str
) -> None:
    values, stored = created(client, 3)
    member = client.post(
        "/fhir/Observation",
        json=observation(values[0], hasMember=[{"reference": f"Observation/{stored[1]['id']}"}]),
    )
    assert member.status_code == 201, member.text
    url = f"Observation?identifier={quote(any_of(values), safe=':|,/')}{extra}"
    alone = client.get(f"/fhir/{url}")
    assert alone.status_code == 200, alone.text
    entries = answered(
        client,
        bundle(kind, get(url), get(f"Observation/{stored[0]['id']}")),
        subsetted="_elements" in extra,
    )
    assert entries[0]["response"] == {"status": "200 OK"}
    assert without_time(entries[0]["resource"]) == without_time(alone.json())
    assert entries[1]["resource"] == stored[0]  # a read beside it is still a read
    next_url = next(
        (link["url"] for link in alone.json()["link"] if link["relation"] == "next"), None
    )
    if next_url is not None:  # the entry's next link pages on as a search alone does
        rest = client.get(next_url.removeprefix("http://testserver"))
        assert rest.status_code == 200, rest.text
        seen = [e["resource"]["id"] for e in entries[0]["resource"]["entry"]]
        seen += [e["resource"]["id"] for e in rest.json()["entry"]]
        assert sorted(seen) == sorted([*(s["id"] for s in stored), member.json()["id"]])


def test_the_ignored_parameters_are_reported_in_the_searchset(client: TestClient) -> None:
    values, stored = created(client, 1)
    entries = answered(
        client, bundle("batch", get(f"Observation?identifier={OBS}|{values[0]}&x=1"))
    )
    assert entries[0]["resource"]["entry"] == [
        {
            "fullUrl": f"http://testserver/fhir/Observation/{stored[0]['id']}",
            "resource": stored[0],
            "search": {"mode": "match"},
        },
        {
            "resource": {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "warning",
                        "code": "not-supported",
                        "diagnostics": "ignored: x: is not a search parameter of Observation",
                        "expression": ["x"],
                    }
                ],
            },
            "search": {"mode": "outcome"},
        },
    ]
    self_link = entries[0]["resource"]["link"][0]
    assert self_link == {
        "relation": "self",
        "url": f"http://testserver/fhir/Observation?identifier={OBS}|{values[0]}",
    }


def strict_outcome(index: int, url: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "processing",
                "diagnostics": f"entry {index} (GET {url}): x: is not a search parameter of "
                "Observation",
                "expression": [f"Bundle.entry[{index}]", "x"],
            }
        ],
    }


def test_under_strict_handling_an_unsupported_parameter_fails_its_entry(
    client: TestClient,
) -> None:
    """In a batch only the entry fails; in a transaction all of it, with nothing written."""
    values, _ = created(client, 1)
    url = f"Observation?identifier={OBS}|{values[0]}&x=1"
    fresh = uuid.uuid4().hex
    strict = "handling=strict"
    entries = answered(client, bundle("batch", post(observation(fresh)), get(url)), Prefer=strict)
    assert entries[0]["response"]["status"] == "201 Created"
    assert entries[1]["response"] == {"status": "400", "outcome": strict_outcome(1, url)}
    other = uuid.uuid4().hex
    refused = send(client, bundle("transaction", post(observation(other)), get(url)), Prefer=strict)
    assert refused.status_code == 400, refused.text
    assert refused.json() == strict_outcome(1, url)
    assert client.get(f"/fhir/Observation?identifier={OBS}|{other}").json()["total"] == 0


def test_transaction_searches_run_last_and_see_its_own_writes(client: TestClient) -> None:
    values, stored = created(client, 2)
    fresh = uuid.uuid4().hex
    put_id = f"tx-{uuid.uuid4().hex[:10]}"
    url = f"Observation?identifier={any_of([*values, fresh])}&_sort=_lastUpdated"
    entries = answered(
        client,
        bundle(
            "transaction",
            get(url),  # listed first, run last
            post(observation(fresh)),
            {"request": {"method": "DELETE", "url": f"Observation/{stored[0]['id']}"}},
            {
                "resource": observation(values[1], id=put_id),
                "request": {"method": "PUT", "url": f"Observation/{put_id}"},
            },
            get(f"Observation/{put_id}/_history/1"),
        ),
    )
    searchset = entries[0]["resource"]
    found = [e["resource"] for e in searchset["entry"]]
    assert found == [stored[1], entries[1]["resource"], entries[3]["resource"]]
    assert searchset["total"] == 3
    assert entries[4]["resource"] == entries[3]["resource"]  # a version read sees it too
    assert entries[4]["response"]["etag"] == 'W/"1"'


def test_an_invalid_search_fails_the_transaction_naming_its_entry(client: TestClient) -> None:
    fresh = uuid.uuid4().hex
    url = "Observation?code=8480-6&_page=not-a-page-token"  # wrong under lenient handling too
    refused = send(client, bundle("transaction", post(observation(fresh)), get(url)))
    assert refused.status_code == 400, refused.text
    assert refused.json() == {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "processing",
                "diagnostics": f"entry 1 (GET {url}): _page: is not a page token this server "
                "issued",
                "expression": ["Bundle.entry[1]", "_page"],
            }
        ],
    }
    assert client.get(f"/fhir/Observation?identifier={OBS}|{fresh}").json()["total"] == 0


def test_history_and_unknown_types_are_refused_per_entry(client: TestClient) -> None:
    entries = answered(
        client,
        bundle(
            "batch",
            get("Observation/_history"),
            get("Nope?x=1"),
            get("StructureDefinition?url=http://example.org"),
        ),
    )
    assert [e["response"]["status"] for e in entries] == ["400", "404", "400"]
    assert entries[0]["response"]["outcome"] == {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "not-supported",
                "diagnostics": "entry 0 (GET Observation/_history): a GET entry here searches "
                "(Type?params), reads (Type/id) or reads a version (Type/id/_history/n)",
                "expression": ["Bundle.entry[0]"],
            }
        ],
    }


def test_return_minimal_keeps_what_searches_and_reads_answer(client: TestClient) -> None:
    values, stored = created(client, 1)
    entries = answered(
        client,
        bundle(
            "transaction",
            post(observation(uuid.uuid4().hex)),
            get(f"Observation?identifier={OBS}|{values[0]}"),
        ),
        Prefer="return=minimal",
    )
    assert "resource" not in entries[0]
    assert [e["resource"] for e in entries[1]["resource"]["entry"]] == [stored[0]]


# --- conditional references -----------------------------------------------------------------------


def test_a_conditional_reference_becomes_a_reference_to_its_one_match(client: TestClient) -> None:
    patient_id, mrn = load_patient(client)
    values, stored = created(client, 1)
    fresh = uuid.uuid4().hex
    sent = observation(
        fresh,
        subject={"reference": f"Patient?identifier={MRN}|{mrn}", "display": "the patient"},
        hasMember=[{"reference": f"Observation?identifier={OBS}|{values[0]}"}],
    )
    entries = answered(client, bundle("transaction", post(sent)))
    written = entries[0]["resource"]
    assert written["subject"] == {"reference": f"Patient/{patient_id}", "display": "the patient"}
    assert written["hasMember"] == [{"reference": f"Observation/{stored[0]['id']}"}]
    assert client.get(f"/fhir/Observation/{written['id']}").json() == written
    found = client.get(f"/fhir/Observation?subject=Patient/{patient_id}").json()
    assert [e["resource"]["id"] for e in found["entry"]] == [written["id"]]


def conditional_failure(index: int, reference: str, text: str, code: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": code,
                "diagnostics": f"entry {index} (POST Observation): the conditional reference "
                f"{reference!r} {text}",
                "expression": [f"Bundle.entry[{index}]", "Observation.subject"],
            }
        ],
    }


def test_a_conditional_reference_matching_none_or_several_fails_the_transaction(
    client: TestClient,
) -> None:
    """412 for no match as for several, as HAPI FHIR answers: the reference's precondition (one
    match) failed; a 404 would say the Bundle's own URL was not found. The issue code tells the
    two apart (not-found, multiple-matches)."""
    _, mrn = load_patient(client)
    load_patient(client)
    nobody = f"Patient?identifier={MRN}|nobody-{uuid.uuid4().hex}"
    everybody = "Patient?identifier=urn:oid:2.16.840.1.113883.3.9999.1|E12345"  # each clinic()'s
    fine = f"Patient?identifier={MRN}|{mrn}"
    for reference, text, code in (
        (nobody, "matches no Patient", "not-found"),
        (everybody, "matches more than one Patient", "multiple-matches"),
    ):
        fresh = uuid.uuid4().hex
        response = send(
            client,
            bundle(
                "transaction",
                post(observation(uuid.uuid4().hex, subject={"reference": fine})),
                post(observation(fresh, subject={"reference": reference})),
            ),
        )
        assert response.status_code == 412, response.text
        assert response.json() == conditional_failure(1, reference, text, code)
        assert client.get(f"/fhir/Observation?identifier={OBS}|{fresh}").json()["total"] == 0


def test_a_conditional_reference_does_not_see_the_transactions_own_creates(
    client: TestClient,
) -> None:
    """As HAPI FHIR does, a conditional reference is matched against the store before the
    transaction: a resource its conditional create adds is not found (the spec leaves it open).
    A client references what it creates by its fullUrl."""
    fresh = uuid.uuid4().hex
    reference = f"Observation?identifier={OBS}|{fresh}"
    created_here = {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": observation(fresh),
        "request": {"method": "POST", "url": "Observation", "ifNoneExist": reference},
    }
    referring = post(observation(uuid.uuid4().hex, subject={"reference": reference}))
    response = send(client, bundle("transaction", created_here, referring))
    assert response.status_code == 412, response.text
    assert response.json() == conditional_failure(
        1, reference, "matches no Observation", "not-found"
    )
    referring["resource"]["subject"] = {"reference": created_here["fullUrl"]}
    entries = answered(client, bundle("transaction", created_here, referring))
    assert entries[1]["resource"]["subject"] == {
        "reference": f"Observation/{entries[0]['resource']['id']}"
    }


def test_conditional_references_with_bad_criteria_are_refused(client: TestClient) -> None:
    for reference, status, code, text in (
        ("Observation?x=1", 400, "processing", "x: is not a search parameter of Observation"),
        ("Nope?identifier=a|b", 400, "not-supported", "Nope is not stored here"),
    ):
        response = send(
            client,
            bundle("transaction", post(observation("x", subject={"reference": reference}))),
        )
        assert response.status_code == status, response.text
        assert response.json() == {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": code,
                    "diagnostics": "entry 0 (POST Observation): the conditional reference "
                    f"{reference!r}: {text}",
                    "expression": ["Bundle.entry[0]", "Observation.subject"],
                }
            ],
        }


def test_batch_entries_resolve_their_conditional_references_one_by_one(
    client: TestClient,
) -> None:
    patient_id, mrn = load_patient(client)
    nobody = f"Patient?identifier={MRN}|nobody-{uuid.uuid4().hex}"
    good, bad = uuid.uuid4().hex, uuid.uuid4().hex
    entries = answered(
        client,
        bundle(
            "batch",
            post(observation(good, subject={"reference": f"Patient?identifier={MRN}|{mrn}"})),
            post(observation(bad, subject={"reference": nobody})),
        ),
    )
    assert entries[0]["response"]["status"] == "201 Created"
    assert entries[0]["resource"]["subject"] == {"reference": f"Patient/{patient_id}"}
    assert entries[1]["response"] == {
        "status": "412",
        "outcome": conditional_failure(1, nobody, "matches no Patient", "not-found"),
    }
    assert client.get(f"/fhir/Observation?identifier={OBS}|{bad}").json()["total"] == 0


# --- scopes ---------------------------------------------------------------------------------------


def forbidden(index: int, method: str, resource_type: str, scope: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "forbidden",
                "diagnostics": f"entry {index} ({method} {resource_type}): this needs the scope "
                f"{scope}",
            }
        ],
    }


def test_search_entries_and_conditional_references_need_the_scopes_of_a_search(
    secure: SecureApi,
) -> None:
    intake = secure.headers("system/intake.write")
    records = clinic()
    loaded = secure.http.put(path_of(records.patient), json=records.patient, headers=intake)
    assert loaded.status_code == 201, loaded.text
    search = bundle("batch", get("Observation?code=http://loinc.org|8480-6"))
    including = bundle("batch", get("Observation?code=8480-6&_include=Observation:subject"))
    referring = bundle(
        "transaction",
        post(
            observation(
                uuid.uuid4().hex,
                subject={"reference": f"Patient?identifier={MRN}|{records.patient['mrn']}"},
            )
        ),
    )

    def answer(body: dict[str, Any], scope: str) -> Any:
        headers = {"Content-Type": FHIR} | secure.headers(scope)
        return secure.http.post("/fhir", json=body, headers=headers)

    for body, scope, missing in (
        (search, "system/Observation.r", ("GET", "Observation", "system/Observation.s")),
        (including, "system/Observation.s", ("GET", "Observation", "system/Patient.r")),
        (referring, "system/Observation.c", ("POST", "Observation", "system/Patient.s")),
    ):
        refused = answer(body, scope)
        assert refused.status_code == 403, refused.text
        assert refused.json() == forbidden(0, *missing)
    assert answer(search, "system/Observation.s").status_code == 200
    assert answer(including, "system/Observation.s system/Patient.r").status_code == 200
    done = answer(referring, "system/Observation.c system/Patient.s")
    assert done.status_code == 200, done.text


# --- a FHIR client's models -----------------------------------------------------------------------


def test_fhirclient_models_build_the_transaction_and_read_its_searchset_strictly(
    client: TestClient,
) -> None:
    """The SMART python client's strict R4 models write the Bundle and parse the answer."""
    from fhirclient.models import bundle as fhir_bundle
    from fhirclient.models import observation as fhir_observation

    patient_id, mrn = load_patient(client)
    fresh = uuid.uuid4().hex
    sent = fhir_bundle.Bundle(
        {
            "type": "transaction",
            "entry": [
                post(observation(fresh, subject={"reference": f"Patient?identifier={MRN}|{mrn}"})),
                get(f"Observation?subject=Patient/{patient_id}&identifier={OBS}|{fresh}"),
            ],
        }
    )
    response = send(client, sent.as_json())
    assert response.status_code == 200, response.text
    result = fhir_bundle.Bundle(response.json(), strict=True)
    assert [e.response.status for e in result.entry] == ["201 Created", "200 OK"]
    searchset = result.entry[1].resource
    assert isinstance(searchset, fhir_bundle.Bundle)
    assert searchset.type == "searchset"
    assert searchset.total == 1
    found = searchset.entry[0].resource
    assert isinstance(found, fhir_observation.Observation)
    assert found.subject.reference == f"Patient/{patient_id}"
    assert found.as_json() == result.entry[0].resource.as_json()
