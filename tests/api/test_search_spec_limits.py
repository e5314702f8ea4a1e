"""Searches with many parameters or values: answered, or refused with a 400 too-costly under any
handling (leaving a filter out would answer more than was asked), never a 5xx from a database
that cannot parse the statement (SQLite stops at an expression depth of 1000)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.fhir.search import MAX_FILTERS, MAX_VALUES
from service.store.db import Database
from tests.api.test_fhir_search import ids
from tests.api.test_search_spec_include import Searcher


@pytest.fixture
def searcher(client: TestClient, database: Database) -> Searcher:
    return Searcher(client, database)


@pytest.fixture
def heart_rate(searcher: Searcher) -> str:
    (made,) = searcher.put(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "effectiveDateTime": "2026-10-05T09:02:00Z",
            "valueQuantity": {"value": 72, "code": "/min"},
            "subject": {"reference": "Patient/p1"},
        }
    )
    return made


@pytest.mark.parametrize(
    "repeated",
    [
        "code=8867-4",
        "date=ge2026-01-01",
        "value-quantity=gt10",
        "subject=Patient/p1",
        "code-value-quantity=8867-4$gt10",
        "code:not=1234-5",
        "_lastUpdated=ge2020",
    ],
)
def test_the_most_filters_a_search_takes_are_answered(
    searcher: Searcher, heart_rate: str, repeated: str
) -> None:
    # With the tag, MAX_FILTERS in all.
    query = "&".join([repeated] * (MAX_FILTERS - 1))
    bundle = searcher.search("Observation", query + "&_total=accurate", Prefer="handling=strict")
    assert ids(bundle) == [heart_rate]
    assert bundle["total"] == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("code", "8867-4"),
        ("date", "ge2026-01-01"),
        ("date", "ap2026-10-05"),
        ("value-quantity", "gt10"),
        ("code-value-date", "8867-4$ge2026-01-01"),
        ("subject.name", "x"),
    ],
)
def test_the_most_values_a_search_takes_are_answered(
    searcher: Searcher, heart_rate: str, name: str, value: str
) -> None:
    # With the tag's, MAX_VALUES in all.
    values = ",".join([value] * (MAX_VALUES - 1))
    bundle = searcher.search("Observation", f"{name}={values}&_sort=-date&_total=accurate")
    assert bundle["resourceType"] == "Bundle"


@pytest.mark.parametrize("strict", [True, False])
def test_more_values_are_a_400_too_costly_under_any_handling(
    searcher: Searcher, heart_rate: str, strict: bool
) -> None:
    headers = {"Prefer": "handling=strict"} if strict else {}
    codes = ",".join(f"c{n}" for n in range(2000))
    status, outcome = searcher.answer("Observation", f"code={codes}", **headers)
    assert status == 400, outcome
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "too-costly"
    assert outcome["issue"][0]["expression"] == ["code"]


@pytest.mark.parametrize("strict", [True, False])
def test_more_filters_are_a_400_too_costly_under_any_handling(
    searcher: Searcher, heart_rate: str, strict: bool
) -> None:
    headers = {"Prefer": "handling=strict"} if strict else {}
    query = "&".join(["code=8867-4"] * MAX_FILTERS)
    status, outcome = searcher.answer("Observation", query, **headers)
    assert status == 400, outcome
    assert outcome["issue"][0]["code"] == "too-costly"


def test_ids_are_not_counted_against_the_values(searcher: Searcher, heart_rate: str) -> None:
    many = ",".join([f"x{n}" for n in range(MAX_VALUES * 5)] + [heart_rate])
    bundle = searcher.search("Observation", f"_id={many}", Prefer="handling=strict")
    assert ids(bundle) == [heart_rate]
