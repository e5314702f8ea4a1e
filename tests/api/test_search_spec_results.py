"""Result parameters: what `_count` and `_sort` take, and the self link showing what was applied."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, urlsplit

import pytest
from fastapi.testclient import TestClient

from service.fhir.search import MAX_COUNT
from service.store.db import Database
from tests.api.test_fhir_search import ids, link
from tests.api.test_search_spec_include import Searcher


@pytest.fixture
def searcher(client: TestClient, database: Database) -> Searcher:
    return Searcher(client, database)


def applied(bundle: dict[str, object]) -> list[tuple[str, str]]:
    """The parameters of the self link, the searched tag left out."""
    url = link(bundle, "self")  # type: ignore[arg-type]
    assert url is not None
    return [(k, v) for k, v in parse_qsl(urlsplit(url).query) if k != "_tag"]


@pytest.mark.parametrize("value", ["²", "١٢", "٣", "1.0", "-1", "+1", " 1", "0x10", ""])
def test_a_count_that_is_not_an_ascii_integer_is_a_400_or_reported(
    searcher: Searcher, value: str
) -> None:
    searcher.put({"resourceType": "Patient", "gender": "other"})
    status, outcome = searcher.answer("Patient", f"_count={quote(value)}", Prefer="handling=strict")
    assert status == 400, outcome
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["_count"]
    bundle = searcher.search("Patient", f"_count={quote(value)}")
    assert len(ids(bundle)) == 1
    assert applied(bundle) == []


def test_the_self_link_shows_the_count_applied_not_one_over_the_maximum(
    searcher: Searcher,
) -> None:
    searcher.put({"resourceType": "Patient", "gender": "other"})
    bundle = searcher.search("Patient", f"_count={MAX_COUNT * 5}", Prefer="handling=strict")
    assert applied(bundle) == [("_count", str(MAX_COUNT))]
    huge = searcher.search("Patient", "_count=" + "9" * 40)
    assert applied(huge) == [("_count", str(MAX_COUNT))]


def test_a_count_given_twice_applies_and_shows_the_later(searcher: Searcher) -> None:
    searcher.put(*({"resourceType": "Patient", "gender": "other"} for _ in range(3)))
    bundle = searcher.search("Patient", "_count=1&_count=2")
    assert len(ids(bundle)) == 2
    assert applied(bundle) == [("_count", "2")]
    next_url = link(bundle, "next")
    assert next_url is not None
    assert [v for k, v in parse_qsl(urlsplit(next_url).query) if k == "_count"] == ["2"]


def test_a_sort_given_twice_sorts_by_both_keys_in_order(searcher: Searcher) -> None:
    def patient(family: str, born: str) -> dict[str, object]:
        return {"resourceType": "Patient", "name": [{"family": family}], "birthDate": born}

    old_a, old_b, young_a, young_b = searcher.put(
        patient("Alpha", "1980-01-01"),
        patient("Bravo", "1980-01-01"),
        patient("Alpha", "1990-01-01"),
        patient("Bravo", "1990-01-01"),
    )
    both = searcher.search("Patient", "_sort=-birthdate&_sort=family", Prefer="handling=strict")
    # Neither key alone gives this order.
    assert ids(both) == [young_a, young_b, old_a, old_b]
    assert ids(both) == ids(searcher.search("Patient", "_sort=-birthdate,family"))
    assert applied(both) == [("_sort", "-birthdate"), ("_sort", "family")]
