"""Composite search parameters through the ASGI app: both parts match on the same element.

Each test tags the Observations it creates with a random `_tag`, so searches see only its own.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlencode

import pytest
from fastapi.testclient import TestClient

from tests.api.test_fhir_read import assert_outcome
from tests.api.test_fhir_search import get, ids, link
from tests.fhir_check import r4_errors

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
SYSTOLIC, DIASTOLIC = "8480-6", "8462-4"
TAG_SYSTEM = "urn:test:tag"
COMPOSITES = {
    "code-value-concept",
    "code-value-date",
    "code-value-quantity",
    "code-value-string",
    "combo-code-value-concept",
    "combo-code-value-quantity",
    "component-code-value-concept",
    "component-code-value-quantity",
}


class Observations:
    """Creates tagged Observations through the API and searches among them."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.tag = uuid.uuid4().hex

    def create(self, **fields: Any) -> str:
        body = {
            "resourceType": "Observation",
            "status": "final",
            "subject": {"display": "someone"},
            "meta": {"tag": [{"system": TAG_SYSTEM, "code": self.tag}]},
        } | fields
        response = self.client.post("/fhir/Observation", json=body)
        assert response.status_code == 201, response.text
        created: str = response.json()["id"]
        return created

    def blood_pressure(self, systolic: float, diastolic: float) -> str:
        return self.create(
            code=concept(LOINC, "85354-9"),
            component=[
                {"code": concept(LOINC, SYSTOLIC), "valueQuantity": mmhg(systolic)},
                {"code": concept(LOINC, DIASTOLIC), "valueQuantity": mmhg(diastolic)},
            ],
        )

    def url(self, *params: tuple[str, str]) -> str:
        return "/fhir/Observation?" + urlencode([*params, ("_tag", f"{TAG_SYSTEM}|{self.tag}")])

    def find(self, *params: tuple[str, str]) -> list[str]:
        return sorted(ids(get(self.client, self.url(*params))))


def concept(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def mmhg(value: float) -> dict[str, Any]:
    return {"value": value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}


@pytest.fixture
def observations(client: TestClient) -> Observations:
    return Observations(client)


def test_both_parts_must_match_the_same_component(observations: Observations) -> None:
    normal = observations.blood_pressure(120, 80)
    low = observations.blood_pressure(85, 60)
    # Its diastolic 80 is below 90, but the systolic component's value is 120: no match.
    systolic_below_90 = ("component-code-value-quantity", f"{LOINC}|{SYSTOLIC}$lt90")
    bundle = get(observations.client, observations.url(systolic_below_90))
    assert ids(bundle) == [low]
    assert link(bundle, "self") == (
        "http://testserver/fhir/Observation?component-code-value-quantity="
        f"{LOINC}|{SYSTOLIC}$lt90&_tag={TAG_SYSTEM}|{observations.tag}"
    )
    assert observations.find(("component-code-value-quantity", f"{SYSTOLIC}$gt100")) == [normal]
    assert observations.find(("component-code-value-quantity", f"{DIASTOLIC}$ge80")) == [normal]
    assert observations.find(("component-code-value-quantity", f"{SNOMED}|{SYSTOLIC}$120")) == []


def test_each_part_takes_its_own_type_s_syntax(observations: Observations) -> None:
    normal = observations.blood_pressure(120, 80)
    high = observations.blood_pressure(160, 100)
    param = "component-code-value-quantity"
    assert observations.find((param, f"{SYSTOLIC}$120|{UCUM}|mm[Hg]")) == [normal]
    assert observations.find((param, f"{SYSTOLIC}$120||mm[Hg]")) == [normal]
    assert observations.find((param, f"{SYSTOLIC}$120||kg")) == []
    assert observations.find((param, f"{SYSTOLIC}$le120")) == [normal]
    assert observations.find((param, f"{SYSTOLIC}$ne120")) == [high]
    assert observations.find((param, f"{SYSTOLIC}$ap155")) == [high]
    assert observations.find((param, f"|{SYSTOLIC}$120")) == []  # a code without a system
    # Comma: either value; the parameter repeated: both.
    either = (param, f"{SYSTOLIC}$lt100,{DIASTOLIC}$gt90")
    assert observations.find(either) == [high]
    assert observations.find((param, f"{SYSTOLIC}$gt100"), (param, f"{DIASTOLIC}$lt90")) == [normal]
    assert observations.find((param, f"{SYSTOLIC}$gt150"), (param, f"{DIASTOLIC}$lt90")) == []


def test_code_value_composites_read_the_observation_s_own_code_and_value(
    observations: Observations,
) -> None:
    weight = observations.create(
        code=concept(LOINC, "29463-7"), valueQuantity={"value": 72, "system": UCUM, "code": "kg"}
    )
    positive = observations.create(
        code=concept(LOINC, "94500-6"), valueCodeableConcept=concept(SNOMED, "10828004")
    )
    dated = observations.create(code=concept(LOINC, "8665-2"), valueDateTime="2026-03-04")
    text = observations.create(code=concept(LOINC, "8251-1"), valueString="Cor amarela")
    pressure = observations.blood_pressure(120, 80)
    find = observations.find
    assert find(("code-value-quantity", f"{LOINC}|29463-7$gt70|{UCUM}|kg")) == [weight]
    assert find(("code-value-quantity", "29463-7$lt70")) == []
    assert find(("code-value-quantity", f"{SYSTOLIC}$120")) == []  # a component's, not its own
    assert find(("code-value-concept", f"94500-6${SNOMED}|10828004")) == [positive]
    assert find(("code-value-concept", "94500-6$260385009")) == []
    assert find(("component-code-value-concept", "94500-6$10828004")) == []
    assert find(("code-value-date", "8665-2$2026-03")) == [dated]
    assert find(("code-value-date", "8665-2$gt2026-03-04")) == []
    assert find(("code-value-string", "8251-1$cor am")) == [text]
    assert find(("code-value-string", "29463-7$cor")) == []
    # combo-: the Observation's own code and value, or a component's.
    assert find(("combo-code-value-quantity", "29463-7$72,8480-6$120")) == sorted(
        [weight, pressure]
    )
    assert find(("combo-code-value-concept", "94500-6$10828004")) == [positive]


def test_missing_tells_which_observations_have_a_composite(observations: Observations) -> None:
    pressure = observations.blood_pressure(120, 80)
    weight = observations.create(code=concept(LOINC, "29463-7"), valueQuantity={"value": 72})
    param = "component-code-value-quantity:missing"
    assert observations.find((param, "true")) == [weight]
    assert observations.find((param, "false")) == [pressure]
    assert observations.find(("combo-code-value-quantity:missing", "true")) == []


def test_post_search_takes_composites_as_form_parameters(observations: Observations) -> None:
    low = observations.blood_pressure(85, 60)
    observations.blood_pressure(120, 80)
    form = urlencode(
        [
            ("component-code-value-quantity", f"{LOINC}|{SYSTOLIC}$lt90"),
            ("_tag", f"{TAG_SYSTEM}|{observations.tag}"),
        ]
    )
    response = observations.client.post(
        "/fhir/Observation/_search",
        content=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text
    assert ids(response.json()) == [low]


@pytest.mark.parametrize(
    "value",
    [SYSTOLIC, f"{SYSTOLIC}$90$1", f"{SYSTOLIC}$", "$90", f"{SYSTOLIC}$high", f"{SYSTOLIC}$90,"],
)
def test_a_malformed_composite_is_refused_or_reported(
    observations: Observations, value: str
) -> None:
    client = observations.client
    url = observations.url(("component-code-value-quantity", value))
    strict = client.get(url, headers={"Prefer": "handling=strict"})
    assert_outcome(strict, 400, "processing")
    assert "component-code-value-quantity" in strict.json()["issue"][0]["diagnostics"]
    lenient = get(client, url)
    outcomes = [e["resource"] for e in lenient["entry"] if e["search"]["mode"] == "outcome"]
    assert [o["issue"][0]["code"] for o in outcomes] == ["not-supported"]
    assert link(lenient, "self") == (
        f"http://testserver/fhir/Observation?_tag={TAG_SYSTEM}|{observations.tag}"
    )


def test_modifiers_other_than_missing_are_refused(client: TestClient) -> None:
    for modifier in ("exact", "not", "text"):
        response = client.get(
            f"/fhir/Observation?code-value-quantity:{modifier}={SYSTOLIC}$90",
            headers={"Prefer": "handling=strict"},
        )
        assert_outcome(response, 400, "processing")
        assert (
            f":{modifier} is not supported on composite"
            in response.json()["issue"][0]["diagnostics"]
        )


def test_the_capability_statement_lists_the_composites(client: TestClient) -> None:
    statement = client.get("/fhir/metadata").json()
    assert r4_errors(statement) == []
    (observation,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "Observation"]
    composites = {p["name"]: p for p in observation["searchParam"] if p["type"] == "composite"}
    assert set(composites) == COMPOSITES
    assert composites["component-code-value-quantity"] == {
        "name": "component-code-value-quantity",
        "definition": "http://hl7.org/fhir/SearchParameter/Observation-component-code-value-quantity",
        "type": "composite",
    }
    others = [
        p["name"]
        for r in statement["rest"][0]["resource"]
        if r["type"] != "Observation"
        for p in r.get("searchParam", ())
        if p["type"] == "composite"
    ]
    assert others == []
