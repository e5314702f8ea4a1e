"""`:text` on a token searches the text a code carries: CodeableConcept.text, Coding.display
or Identifier.type.text, as a string search (starts with, ignoring case and accents)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.fhir.search_index import extract
from service.store.db import Database
from tests.api.test_fhir_search import ids
from tests.api.test_search_spec_include import Searcher

SNOMED = "http://snomed.info/sct"


@pytest.fixture
def searcher(client: TestClient, database: Database) -> Searcher:
    return Searcher(client, database)


def condition(code: dict[str, object]) -> dict[str, object]:
    return {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}, "code": code}


def test_text_matches_the_display_of_a_coding_when_the_concept_has_text_too(
    searcher: Searcher,
) -> None:
    (both,) = searcher.put(
        condition(
            {
                "coding": [
                    {"system": SNOMED, "code": "35489007", "display": "Depressive disorder"},
                    {"system": "urn:icd", "code": "F33.2", "display": "Récurrent MDD"},
                ],
                "text": "Treatment-resistant depression",
            }
        )
    )
    (display_only,) = searcher.put(
        condition({"coding": [{"system": SNOMED, "code": "47505003", "display": "PTSD"}]})
    )
    for value, expected in (
        ("treatment", [both]),  # CodeableConcept.text
        ("depressive", [both]),  # the first coding's display
        ("recurrent", [both]),  # the second's, accents folded
        ("ptsd", [display_only]),
        ("disorder", []),  # starts with, as a string search
    ):
        bundle = searcher.search("Condition", f"code:text={value}", Prefer="handling=strict")
        assert ids(bundle) == expected, value


def test_the_display_rows_change_nothing_a_code_search_finds(searcher: Searcher) -> None:
    (both,) = searcher.put(
        condition(
            {
                "coding": [{"system": SNOMED, "code": "35489007", "display": "Depressive"}],
                "text": "Depression",
            }
        )
    )
    (other,) = searcher.put(condition({"coding": [{"system": SNOMED, "code": "47505003"}]}))
    for query, expected in (
        (f"code={SNOMED}|35489007", [both]),
        ("code=|35489007", []),
        (f"code={SNOMED}|", sorted([both, other])),
        ("code:not=35489007", [other]),
        ("code:missing=false", sorted([both, other])),
    ):
        bundle = searcher.search("Condition", query, Prefer="handling=strict")
        assert sorted(ids(bundle)) == expected, query
    ordered = searcher.search("Condition", "_sort=code", Prefer="handling=strict")
    assert ids(ordered) == [both, other]  # 35489007 before 47505003: no code is ""


def test_a_display_that_reads_as_the_text_adds_no_row() -> None:
    rows = extract(
        condition(
            {
                "coding": [{"system": SNOMED, "code": "35489007", "display": "Depression"}],
                "text": "depression",
            }
        )
    )
    assert [row for row in rows.tokens if row[0] == "code"] == [
        ("code", SNOMED, "35489007", "depression")
    ]
