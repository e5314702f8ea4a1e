"""A reference to another server's `Patient/1` is not a reference to this server's `Patient/1`:
searches by `Type/id` or id, chains, `_has` and includes follow only references to resources here
(relative, or absolute under this server's base), and an absolute URL finds what names it."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from service.store.db import Database
from tests.api.test_fhir_search import ids
from tests.api.test_search_spec_include import Searcher, entries

BASE = "http://testserver/fhir"
ELSEWHERE = "https://ehr.example.org/fhir/R4"


@pytest.fixture
def searcher(client: TestClient, database: Database) -> Searcher:
    return Searcher(client, database)


@pytest.fixture
def refs(searcher: Searcher) -> dict[str, str]:
    patient = uuid.uuid4().hex
    searcher.put({"resourceType": "Patient", "id": patient, "name": [{"family": "Here"}]})

    def observation(reference: str) -> str:
        (made,) = searcher.put(
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "x"},
                "subject": {"reference": reference},
            }
        )
        return made

    return {
        "patient": patient,
        "relative": observation(f"Patient/{patient}"),
        "absolute_here": observation(f"{BASE}/Patient/{patient}"),
        "versioned_here": observation(f"{BASE}/Patient/{patient}/_history/1"),
        "elsewhere": observation(f"{ELSEWHERE}/Patient/{patient}"),
    }


def local(refs: dict[str, str]) -> list[str]:
    return sorted([refs["relative"], refs["absolute_here"], refs["versioned_here"]])


@pytest.mark.parametrize(
    "query",
    [
        "subject=Patient/{patient}",
        "subject={patient}",
        "subject:Patient={patient}",
        "patient={patient}",
        "subject=" + BASE + "/Patient/{patient}",
        "subject.name=here",
        "subject:Patient._id={patient}",
    ],
)
def test_references_to_this_server_match_and_another_server_s_do_not(
    searcher: Searcher, refs: dict[str, str], query: str
) -> None:
    bundle = searcher.search("Observation", query.format(**refs), Prefer="handling=strict")
    assert sorted(ids(bundle)) == local(refs)


def test_an_absolute_url_of_another_server_finds_what_names_it(
    searcher: Searcher, refs: dict[str, str]
) -> None:
    url = f"{ELSEWHERE}/Patient/{refs['patient']}"
    bundle = searcher.search("Observation", f"subject={url}", Prefer="handling=strict")
    assert ids(bundle) == [refs["elsewhere"]]


def test_include_does_not_bring_this_server_s_patient_for_another_server_s(
    searcher: Searcher, refs: dict[str, str]
) -> None:
    elsewhere = searcher.search(
        "Observation", f"_id={refs['elsewhere']}&_include=Observation:subject"
    )
    assert entries(elsewhere, "include") == []
    here = searcher.search("Observation", f"_id={refs['relative']}&_include=Observation:subject")
    assert entries(here, "include") == [("Patient", refs["patient"])]


def test_revinclude_and_has_follow_only_references_to_this_server(
    searcher: Searcher, refs: dict[str, str]
) -> None:
    bundle = searcher.search("Patient", f"_id={refs['patient']}&_revinclude=Observation:subject")
    assert [i for _, i in entries(bundle, "include")] == local(refs)
    has_elsewhere = searcher.search(
        "Patient", f"_has:Observation:subject:_id={refs['elsewhere']}", Prefer="handling=strict"
    )
    assert ids(has_elsewhere) == []
    has_here = searcher.search(
        "Patient", f"_has:Observation:subject:_id={refs['relative']}", Prefer="handling=strict"
    )
    assert ids(has_here) == [refs["patient"]]
