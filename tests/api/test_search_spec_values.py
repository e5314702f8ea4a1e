"""Search values per their type's R4 syntax: numbers, escapes, dates; a bad one is a 400."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from service.store.db import Database
from tests.api.test_fhir_search import ids
from tests.api.test_search_spec_include import Searcher

UCUM = "http://unitsofmeasure.org"


@pytest.fixture
def searcher(client: TestClient, database: Database) -> Searcher:
    return Searcher(client, database)


def observation(**fields: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, **fields}


def quantity(value: float, code: str = "mg") -> dict[str, Any]:
    return {"valueQuantity": {"value": value, "system": UCUM, "code": code}}


@pytest.mark.parametrize(
    "value",
    [
        "1e-9999999",
        "1e99999999999",
        "gt1e-9999999",
        "1_000",
        "١٢",
        "NaN",
        "Infinity",
        "0x10",
        "5 ",
        "--5",
        "1e",
    ],
)
@pytest.mark.parametrize("name", ["value-quantity", "combo-code-value-quantity"])
def test_a_number_outside_the_decimal_syntax_is_a_400_naming_the_parameter(
    searcher: Searcher, name: str, value: str
) -> None:
    searcher.put(observation(**quantity(5)))
    search_value = value if name == "value-quantity" else f"x${value}"
    status, outcome = searcher.answer(
        "Observation", f"{name}={quote(search_value)}", Prefer="handling=strict"
    )
    assert status == 400, outcome
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == [name]
    lenient = searcher.search("Observation", f"{name}={quote(search_value)}")
    assert len(ids(lenient)) == 1  # left out, and reported
    assert lenient["entry"][-1]["search"]["mode"] == "outcome"


def test_numbers_in_every_decimal_form_are_read(searcher: Searcher) -> None:
    (five,) = searcher.put(observation(**quantity(5)))
    (hundred,) = searcher.put(observation(**quantity(100)))
    for value, expected in (
        ("5", [five]),
        ("5.", [five]),
        ("5.0", [five]),
        ("0005", [five]),
        (".5e1", [five]),
        ("1e2", [hundred]),
        ("1E+2", [hundred]),
        ("-1", []),
        ("gt9.99e999999", []),
        ("lt9.99e999999", sorted([five, hundred])),
        ("gt1e-999998", sorted([five, hundred])),
    ):
        bundle = searcher.search(
            "Observation", f"value-quantity={quote(value)}", Prefer="handling=strict"
        )
        assert sorted(ids(bundle)) == expected, value


def test_an_escaped_bar_in_a_token_is_part_of_the_code_not_the_system_separator(
    searcher: Searcher,
) -> None:
    (barred,) = searcher.put(
        {"resourceType": "Patient", "identifier": [{"system": "urn:ids", "value": "A|7"}]}
    )
    (plain,) = searcher.put(
        {"resourceType": "Patient", "identifier": [{"system": "A", "value": "7"}]}
    )
    (comma,) = searcher.put(
        {"resourceType": "Patient", "identifier": [{"value": "B,8"}, {"value": "C$9"}]}
    )
    for value, expected in (
        ("A\\|7", [barred]),
        ("urn:ids|A\\|7", [barred]),
        ("A|7", [plain]),
        ("|A\\|7", []),  # no system: the one there has urn:ids
        ("B\\,8", [comma]),
        ("C\\$9", [comma]),
        ("A\\|7,B\\,8", sorted([barred, comma])),
    ):
        bundle = searcher.search("Patient", f"identifier={quote(value)}", Prefer="handling=strict")
        assert sorted(ids(bundle)) == expected, value
    not_plain = searcher.search("Patient", "identifier:not=" + quote("A|7"))
    assert sorted(ids(not_plain)) == sorted([barred, comma])
    not_barred = searcher.search("Patient", "identifier:not=" + quote("A\\|7"))
    assert sorted(ids(not_barred)) == sorted([plain, comma])


def test_an_escaped_bar_in_a_composite_token_part_is_part_of_the_code(
    searcher: Searcher,
) -> None:
    (barred,) = searcher.put(
        observation(
            code={"coding": [{"system": "urn:codes", "code": "x|1"}]},
            valueCodeableConcept={"coding": [{"system": "urn:answers", "code": "y|2"}]},
        )
    )
    for value, expected in (
        ("urn:codes|x\\|1$urn:answers|y\\|2", [barred]),
        ("x\\|1$y\\|2", [barred]),
        ("x|1$y|2", []),
    ):
        bundle = searcher.search(
            "Observation", f"code-value-concept={quote(value)}", Prefer="handling=strict"
        )
        assert ids(bundle) == expected, value


def test_starts_after_and_ends_before_lie_outside_the_search_value_s_range(
    searcher: Searcher,
) -> None:
    values = (99.4, 99.5, 99.6, 100, 100.2, 100.5, 100.6)
    written = searcher.put(*(observation(**quantity(v)) for v in values))
    stored = dict(zip(values, written, strict=True))

    def found(query: str) -> list[float]:
        bundle = searcher.search("Observation", query, Prefer="handling=strict")
        return sorted(v for v, i in stored.items() if i in ids(bundle))

    # 100 is [99.5, 100.5): sa and eb leave out what that range holds, gt and lt do not.
    assert found("value-quantity=sa100") == [100.5, 100.6]
    assert found("value-quantity=eb100") == [99.4]
    assert found("value-quantity=gt100") == [100.2, 100.5, 100.6]
    assert found("value-quantity=lt100") == [99.4, 99.5, 99.6]
    assert found("value-quantity=eq100") == [99.5, 99.6, 100, 100.2]
    assert found(f"value-quantity=sa100|{UCUM}|mg") == [100.5, 100.6]
    assert found("value-quantity=eb100||g") == []


def test_a_time_zone_sent_with_an_unencoded_plus_is_read_as_the_offset_it_was(
    searcher: Searcher,
) -> None:
    (taken,) = searcher.put(observation(effectiveDateTime="2026-10-05T09:02:00-04:00"))
    # In a query string `+` is a space: `+02:00` sent unencoded arrives as ` 02:00`.
    for query in (
        "date=2026-10-05T15:02:00+02:00",
        "date=2026-10-05T15:02:00%2B02:00",
        "date=ge2026-10-05T15:01:00.5+02:00",
        "_lastUpdated=2026-11-30T14:00:00+02:00",
    ):
        bundle = searcher.search("Observation", query, Prefer="handling=strict")
        assert ids(bundle) == [taken], query
    assert ids(searcher.search("Observation", "date=2026-10-05T15:02:00-02:00")) == []
    status, _ = searcher.answer("Observation", "date=2026-10-05+02:00", Prefer="handling=strict")
    assert status == 400


def test_a_profile_searched_without_a_version_finds_every_version_of_it(
    searcher: Searcher,
) -> None:
    profile = "http://example.org/fhir/StructureDefinition/infusion-patient"
    versioned, unversioned, other_version, longer = searcher.put(
        {"resourceType": "Patient", "meta": {"profile": [f"{profile}|1.0"]}},
        {"resourceType": "Patient", "meta": {"profile": [profile]}},
        {"resourceType": "Patient", "meta": {"profile": [f"{profile}|2.0"]}},
        {"resourceType": "Patient", "meta": {"profile": [f"{profile}-child"]}},
    )
    for value, expected in (
        (profile, sorted([versioned, unversioned, other_version])),
        (f"{profile}|1.0", [versioned]),
        (f"{profile}|3.0", []),
    ):
        bundle = searcher.search("Patient", f"_profile={value}", Prefer="handling=strict")
        assert sorted(ids(bundle)) == expected, value
    below = searcher.search("Patient", f"_profile:below={profile}", Prefer="handling=strict")
    assert sorted(ids(below)) == sorted([versioned, unversioned, other_version, longer])
