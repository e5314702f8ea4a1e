"""`_include` / `_revinclude` as R4 writes them: `:iterate` on the parameter name, and `*`.

Resources are written straight into the store (their index rows come from the write path) and
each test tags its matches with a random `_tag`, so tests never see one another's rows.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.store.db import Database
from tests.api.test_fhir_search import get, link
from tests.integration.test_search import TAG_SYSTEM, Store


class Searcher(Store):
    """Writes tagged resources into the store and searches among them through the facade."""

    def __init__(self, client: TestClient, database: Database) -> None:
        super().__init__(database)
        self.client = client

    def url(self, resource_type: str, query: str) -> str:
        tag = f"_tag={TAG_SYSTEM}|{self.tag}"
        return f"/fhir/{resource_type}?{query}&{tag}" if query else f"/fhir/{resource_type}?{tag}"

    def search(self, resource_type: str, query: str, **headers: str) -> dict[str, Any]:
        return get(self.client, self.url(resource_type, query), **headers)

    def answer(self, resource_type: str, query: str, **headers: str) -> tuple[int, Any]:
        response = self.client.get(self.url(resource_type, query), headers=headers)
        return response.status_code, response.json()


@pytest.fixture
def searcher(client: TestClient, database: Database) -> Searcher:
    return Searcher(client, database)


def entries(bundle: dict[str, Any], mode: str) -> list[tuple[str, str]]:
    return sorted(
        (e["resource"]["resourceType"], e["resource"]["id"])
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == mode
    )


def outcomes(bundle: dict[str, Any]) -> list[str]:
    return [
        issue["diagnostics"]
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == "outcome"
        for issue in e["resource"]["issue"]
    ]


@pytest.fixture
def chain(searcher: Searcher) -> dict[str, str]:
    """An Observation of a Patient and by a Practitioner; the Patient is managed by an
    Organization, which a Provenance names as agent."""
    (org,) = searcher.put({"resourceType": "Organization", "name": "Clinic"})
    (practitioner,) = searcher.put({"resourceType": "Practitioner"})
    (patient,) = searcher.put(
        {"resourceType": "Patient", "managingOrganization": {"reference": f"Organization/{org}"}}
    )
    (observation,) = searcher.put(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "heart rate"},
            "subject": {"reference": f"Patient/{patient}"},
            "performer": [{"reference": f"Practitioner/{practitioner}"}],
        }
    )
    return {
        "org": org,
        "practitioner": practitioner,
        "patient": patient,
        "observation": observation,
    }


@pytest.mark.parametrize("modifier", ["iterate", "recurse"])
def test_include_iterate_is_a_modifier_of_the_parameter_name(
    searcher: Searcher, chain: dict[str, str], modifier: str
) -> None:
    bundle = searcher.search(
        "Observation",
        f"_include=Observation:subject&_include:{modifier}=Patient:organization",
        Prefer="handling=strict",
    )
    assert entries(bundle, "match") == [("Observation", chain["observation"])]
    assert entries(bundle, "include") == sorted(
        [("Patient", chain["patient"]), ("Organization", chain["org"])]
    )
    assert f"_include:{modifier}=Patient:organization" in (link(bundle, "self") or "")


def test_revinclude_iterate_follows_the_included_resources_back(
    searcher: Searcher, chain: dict[str, str]
) -> None:
    bundle = searcher.search(
        "Organization",
        "_id=" + chain["org"] + "&_revinclude=Patient:organization"
        "&_revinclude:iterate=Observation:subject",
        Prefer="handling=strict",
    )
    assert entries(bundle, "match") == [("Organization", chain["org"])]
    assert entries(bundle, "include") == sorted(
        [("Patient", chain["patient"]), ("Observation", chain["observation"])]
    )


def test_without_iterate_an_include_of_another_type_is_refused(
    searcher: Searcher, chain: dict[str, str]
) -> None:
    status, outcome = searcher.answer(
        "Observation", "_include=Patient:organization", Prefer="handling=strict"
    )
    assert status == 400
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["_include"]


def test_an_unknown_modifier_of_include_is_refused_or_reported(
    searcher: Searcher, chain: dict[str, str]
) -> None:
    status, outcome = searcher.answer(
        "Observation", "_include:sideways=Observation:subject", Prefer="handling=strict"
    )
    assert status == 400
    assert outcome["issue"][0]["expression"] == ["_include:sideways"]
    bundle = searcher.search("Observation", "_include:sideways=Observation:subject")
    assert entries(bundle, "include") == []
    assert any("sideways" in text for text in outcomes(bundle))
    assert "_include" not in (link(bundle, "self") or "")


@pytest.mark.parametrize("value", ["Observation:*", "*"])
def test_include_wildcard_follows_every_reference_parameter(
    searcher: Searcher, chain: dict[str, str], value: str
) -> None:
    bundle = searcher.search("Observation", f"_include={value}", Prefer="handling=strict")
    assert entries(bundle, "include") == sorted(
        [("Patient", chain["patient"]), ("Practitioner", chain["practitioner"])]
    )
    assert f"_include={value}" in (link(bundle, "self") or "")


def test_include_wildcard_with_a_target_type_follows_only_references_to_it(
    searcher: Searcher, chain: dict[str, str]
) -> None:
    bundle = searcher.search(
        "Observation", "_include=Observation:*:Practitioner", Prefer="handling=strict"
    )
    assert entries(bundle, "include") == [("Practitioner", chain["practitioner"])]


def test_include_iterate_wildcard_follows_the_included_resources_too(
    searcher: Searcher, chain: dict[str, str]
) -> None:
    bundle = searcher.search(
        "Observation", "_include=Observation:subject&_include:iterate=*", Prefer="handling=strict"
    )
    assert entries(bundle, "include") == sorted(
        [
            ("Patient", chain["patient"]),
            ("Practitioner", chain["practitioner"]),
            ("Organization", chain["org"]),
        ]
    )


@pytest.mark.parametrize("value", ["*", "Patient:*"])
def test_revinclude_wildcard_brings_every_resource_referring_to_the_matches(
    searcher: Searcher, chain: dict[str, str], value: str
) -> None:
    bundle = searcher.search(
        "Organization", f"_id={chain['org']}&_revinclude={value}", Prefer="handling=strict"
    )
    assert entries(bundle, "include") == [("Patient", chain["patient"])]


def test_revinclude_with_a_target_type_includes_only_for_matches_of_that_type(
    searcher: Searcher, chain: dict[str, str]
) -> None:
    matched = searcher.search(
        "Patient", "_revinclude=Observation:subject:Patient", Prefer="handling=strict"
    )
    assert entries(matched, "include") == [("Observation", chain["observation"])]
    # The Observation refers to the Patient, but not as the Group the directive names.
    other = searcher.search(
        "Patient", "_revinclude=Observation:subject:Group", Prefer="handling=strict"
    )
    assert entries(other, "include") == []
