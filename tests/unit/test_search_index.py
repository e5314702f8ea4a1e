"""Index extraction: the committed definitions, the hand-run path programs against fhirpathpy
over the official R4 examples, and the values each parameter type indexes."""

from __future__ import annotations

import json
import unicodedata
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import fhirpathpy
import pytest
from fhirpathpy.models import models
from hypothesis import given
from hypothesis import strategies as st

from service.fhir.search_index import (
    MAX_DATE,
    MAX_TEXT,
    Program,
    composite_plans,
    composite_sources,
    date_range,
    extract,
    normalize,
    parse_reference,
    part,
    programs,
    quantity_number,
)
from service.fhir.search_parameters import (
    DATA,
    INDEXED_TYPES,
    SearchParameter,
    definitions,
    dump,
    index_aliases,
)
from service.fhir.search_parameters import extract as extract_definitions


def test_the_committed_definitions_are_what_the_official_package_gives(r4_examples: Path) -> None:
    assert DATA.read_text(encoding="utf-8") == dump(extract_definitions(r4_examples))


def _plain(value: Any) -> Any:
    """fhirpathpy gives Decimals and FHIRPath unions drop duplicates: compare like for like."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _unique(values: list[Any]) -> list[str]:
    return sorted({json.dumps(_plain(v), sort_keys=True) for v in values})


def test_path_programs_select_what_fhirpath_selects_on_the_official_examples(
    r4_examples: Path,
) -> None:
    compared = 0
    for resource_type in INDEXED_TYPES:
        for path in sorted(r4_examples.glob(f"{resource_type}-*.json")):
            resource = json.loads(path.read_text(encoding="utf-8"))
            if resource.get("resourceType") != resource_type:
                continue
            for parameter, program in programs(resource_type):
                # resolve() needs a resolver fhirpathpy lacks; `as` on a collection is an error
                # there (the singleton rule) though the official expressions use it that way.
                if "resolve()" in parameter.expression or not program.by_hand:
                    continue
                if ".component.value as" in parameter.expression:
                    continue
                expected = fhirpathpy.evaluate(resource, parameter.expression, model=models["r4"])
                assert _unique(program.values(resource)) == _unique(expected), (
                    f"{path.name} {parameter.code}: {parameter.expression}"
                )
                compared += 1
    assert compared > 4000


def _examples(r4_examples: Path) -> list[dict[str, Any]]:
    found = []
    for resource_type in INDEXED_TYPES:
        for path in sorted(r4_examples.glob(f"{resource_type}-*.json")):
            resource = json.loads(path.read_text(encoding="utf-8"))
            if resource.get("resourceType") == resource_type:
                found.append(resource)
    return found


# Keys a program may read by its choice-element rule besides the element itself: `codeX` is
# read as `code` when there is no `code`, `valueΣ` too (an upper-case letter of any script).
_ODD_SHAPES: list[dict[str, Any]] = [
    {"resourceType": "Observation", "codeX": {"text": "a"}, "valueQuantity": {"value": 1}},
    {"resourceType": "Observation", "valueΣ": "x", "valueString": "y", "effectiveFoo": "2026"},
    {"resourceType": "Observation", "component": [{"codeA": {"text": "b"}, "valueQuantity": 1}]},
    {"resourceType": "Patient", "nameX": [{"family": "F"}], "telecom": {"system": "phone"}},
    {"resourceType": "Patient", "managingOrganizationX": {"reference": "Organization/o"}},
    {"resourceType": "Encounter", "meta": [{"tag": {"code": "t"}}, "x"], "period": [{}, 5]},
]


def test_bound_programs_select_what_the_programs_select(r4_examples: Path) -> None:
    """`extract` runs each program bound to the resource's top-level keys (its first step
    resolved to the keys it reads): the same nodes as the program, or none where it binds to
    nothing."""
    compared = 0
    for resource in _examples(r4_examples) + _ODD_SHAPES:
        resource_type = resource["resourceType"]
        elements = [plan.elements for plan in composite_plans(resource_type)]
        for program in [program for _, program in programs(resource_type)] + elements:
            bound = program.bind(tuple(resource))
            nodes = program.nodes(resource)
            assert (bound(resource) if bound else []) == nodes, program.expression
            compared += bound is not None
    assert compared > 2000


DECEASED_SHAPES: list[dict[str, Any]] = [
    {},
    {"deceasedBoolean": False},
    {"deceasedBoolean": True},
    {"deceasedDateTime": "2015-02-14T13:42:00+10:00"},
    {"deceasedBoolean": 0},
    {"deceasedBoolean": [True, False]},
    {"deceasedBoolean": None},
    {"deceasedBoolean": True, "deceasedDateTime": "2015"},
    {"_deceasedBoolean": {"extension": []}},
    {"deceasedFoo": True},
    {"deceased": True},
]


def test_deceased_is_what_fhirpath_gives(r4_examples: Path) -> None:
    """`deceased` is the one expression of the stored types outside the path programs: its
    usual shapes (no deceased[x], a boolean one) by hand, the rest by fhirpathpy."""
    (program,) = [program for p, program in programs("Patient") if p.code == "deceased"]
    assert not program.by_hand
    compiled = fhirpathpy.compile(program.expression, models["r4"])
    patients = [r for r in _examples(r4_examples) if r["resourceType"] == "Patient"]
    for resource in patients + [{"resourceType": "Patient", **shape} for shape in DECEASED_SHAPES]:
        expected = [("", value) for value in compiled(resource, None)]
        assert program.nodes(resource) == expected, resource
    assert len(patients) > 10


def test_where_resolve_is_evaluated_on_the_reference_type() -> None:
    observation = {
        "resourceType": "Observation",
        "id": "o",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/p1"},
    }
    # `patient` keeps no rows of its own (its `subject` rows answer it): evaluated here on the
    # whole catalogue, aliases included.
    rows = extract(observation, definitions())
    assert ("patient", "Patient", "p1", None) in rows.references
    group = dict(observation, subject={"reference": "Group/g1"})
    assert not [r for r in extract(group, definitions()).references if r[0] == "patient"]
    assert ("subject", "Group", "g1", None) in extract(group).references


def test_values_per_parameter_type() -> None:
    patient = {
        "resourceType": "Patient",
        "id": "p",
        "meta": {"profile": ["http://example.org/p"]},
        "identifier": [{"system": "urn:mrn", "value": "M-1"}],
        "name": [{"family": "Gonçalves", "given": ["José"]}],
        "telecom": [{"system": "email", "value": "jose@example.org"}],
        "gender": "male",
        "birthDate": "1984-03",
        "deceasedBoolean": False,
        "address": [{"city": "Évora"}],
    }
    rows = extract(patient)
    assert ("family", "goncalves", "Gonçalves") in rows.strings
    assert ("address-city", "evora", "Évora") in rows.strings
    assert ("identifier", "urn:mrn", "M-1", None) in rows.tokens
    assert ("email", None, "jose@example.org", None) in rows.tokens
    assert ("gender", None, "male", None) in rows.tokens
    assert ("_profile", None, "http://example.org/p", None) in rows.tokens
    # `deceased.exists() and deceased != false`: a living patient is `deceased=false`.
    assert ("deceased", None, "false", None) in rows.tokens
    low, high = date_range("1984-03")
    assert ("birthdate", low, high) in rows.dates


def test_date_ranges_follow_precision_and_zone() -> None:
    assert date_range("2026") == (
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    )
    assert date_range("2026-02")[1] == datetime(2026, 2, 28, 23, 59, 59, 999999, tzinfo=UTC)
    assert date_range("2026-10-05T09:04:00-04:00") == (
        datetime(2026, 10, 5, 13, 4, tzinfo=UTC),
        datetime(2026, 10, 5, 13, 4, 0, 999999, tzinfo=UTC),
    )
    assert date_range("2026-10-05T09:04:00.5Z")[1] == datetime(
        2026, 10, 5, 9, 4, 0, 599999, tzinfo=UTC
    )
    assert date_range("9999")[1] == MAX_DATE
    for bad in ("2026-13", "26-01-01", "2026-01-01T25:00", "yesterday", ""):
        with pytest.raises(ValueError, match="not a FHIR date"):
            date_range(bad)


def test_date_ranges_at_the_limits_of_seconds_and_zones() -> None:
    def at(*parts: int) -> datetime:
        return datetime(*parts, tzinfo=UTC)

    second = timedelta(seconds=1, microseconds=-1)
    # A leap second (or any two digits) runs into the next minute, after the zone is applied.
    assert date_range("2026-06-30T23:59:60Z") == (at(2026, 7, 1), at(2026, 7, 1) + second)
    assert date_range("2026-05-01T10:30:99.5+01:00")[0] == at(2026, 5, 1, 9, 31, 39, 500000)
    assert date_range("9999-12-31T23:59:99+00:01")[0] == at(9999, 12, 31, 23, 59, 39)
    assert date_range("9999-12-31T23:59:59+00:01")[0] == at(9999, 12, 31, 23, 58, 59)
    assert date_range("0001-01-01T00:00:30-00:01")[0] == at(1, 1, 1, 0, 1, 30)
    assert date_range("2026-05-01T10:30:15.1234567Z")[1] == at(2026, 5, 1, 10, 30, 15, 123456)
    assert date_range("9999-12-31")[1] == MAX_DATE
    assert date_range(" 2026-05-01 " + " " * 64) == date_range("2026-05-01")
    for bad in (
        "9999-12-31T23:59:59-00:01",
        "0001-01-01T00:00:30+00:01",
        "2026-05-01T10:60Z",
        "2026-05-01T24:00Z",
        "2026-02-29T10:00:00Z",
    ):
        with pytest.raises(ValueError, match="not a FHIR date"):
            date_range(bad)


@given(st.datetimes(timezones=st.just(UTC)))
def test_a_date_range_contains_its_own_instant(moment: datetime) -> None:
    low, high = date_range(moment.isoformat())
    assert low <= moment <= high


def test_normalize_folds_case_accents_and_spaces() -> None:
    assert normalize("  José   GONÇALVES ") == "jose goncalves"
    assert normalize("Straße") == "strasse"


def _folded(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    folded = "".join(char for char in decomposed if not unicodedata.combining(char)).casefold()
    return " ".join(folded.split())[:MAX_TEXT]


@given(st.text(alphabet=st.characters(max_codepoint=127)))
def test_normalize_of_ascii_text_is_its_unicode_folding(text: str) -> None:
    assert normalize(text) == _folded(text)


def test_normalize_of_each_ascii_character_is_its_unicode_folding() -> None:
    for code in range(128):
        assert normalize(f"A{chr(code)}b") == _folded(f"A{chr(code)}b"), code


def test_references_and_numbers() -> None:
    assert parse_reference("Patient/123") == ("Patient", "123", None)
    assert parse_reference("https://ehr.example.org/fhir/Patient/9/_history/2") == (
        "Patient",
        "9",
        "https://ehr.example.org/fhir/Patient/9",
    )
    assert parse_reference("urn:uuid:1234") == (None, None, "urn:uuid:1234")
    assert parse_reference("a/Patient/1") == ("Patient", "1", "a/Patient/1")
    assert parse_reference("Patient/1/_history/2") == ("Patient", "1", None)
    assert parse_reference("patient/1") == (None, None, None)
    long = "https://ehr.example.org/" + "x" * 64 + "/Patient/9"
    assert parse_reference(long) == ("Patient", "9", long)
    assert quantity_number("5.4") == (Decimal("5.4"), Decimal("5.35"), Decimal("5.45"))
    assert quantity_number("100") == (Decimal("100"), Decimal("99.5"), Decimal("100.5"))
    with pytest.raises(ValueError, match="not a number"):
        quantity_number("NaN")


# --- composites ---------------------------------------------------------------------------------

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def _composites(resource_type: str) -> list[SearchParameter]:
    return [p for p in definitions().by_type[resource_type].values() if p.type == "composite"]


def test_every_composite_of_the_stored_types_is_indexed(r4_examples: Path) -> None:
    bundle = json.loads((r4_examples / "Bundle-searchParams.json").read_text(encoding="utf-8"))
    official = {
        (resource_type, entry["resource"]["code"])
        for entry in bundle["entry"]
        if entry["resource"]["type"] == "composite"
        for resource_type in entry["resource"]["base"]
        if resource_type in INDEXED_TYPES
    }
    indexed = {
        (resource_type, parameter.code)
        for resource_type in INDEXED_TYPES
        for parameter in _composites(resource_type)
    }
    assert indexed == official
    assert len(indexed) == 8  # Observation's: the other stored types have none
    for parameter in _composites("Observation"):
        for component in parameter.components:
            assert part(component).program.by_hand


def test_composite_parts_select_what_fhirpath_selects_on_the_official_examples(
    r4_examples: Path,
) -> None:
    """Per element the composite selects (the resource, each component), each part by hand
    against fhirpathpy, addressing the element by its index so parts stay with their element."""
    compared = 0
    for path in sorted(r4_examples.glob("Observation-*.json")):
        resource = json.loads(path.read_text(encoding="utf-8"))
        if resource.get("resourceType") != "Observation":
            continue
        for parameter in _composites("Observation"):
            for member in (m.strip() for m in parameter.expression.split("|")):
                elements = Program(member).values(resource)
                expected_elements = fhirpathpy.evaluate(resource, member, model=models["r4"])
                assert _unique(elements) == _unique(expected_elements), (path.name, member)
                for index, element in enumerate(elements):
                    for component in parameter.components:
                        expected = [
                            value
                            for piece in component.expression.split("|")
                            # `as(DateTime)` names FHIRPath's own type: the R4 definition means
                            # dateTime (its Observation-value-date says so), as the index does.
                            for value in fhirpathpy.evaluate(
                                resource,
                                f"{member}[{index}].{piece.strip()}".replace(
                                    "as(DateTime)", "as(dateTime)"
                                ),
                                model=models["r4"],
                            )
                        ]
                        selected = part(component).program.values(element)
                        assert _unique(selected) == _unique(expected), (
                            f"{path.name} {parameter.code}[{index}] {component.expression}"
                        )
                        compared += 1
    assert compared > 1000


def _blood_pressure(systolic: float, diastolic: float) -> dict[str, Any]:
    def component(code: str, value: float) -> dict[str, Any]:
        return {
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "valueQuantity": {"value": value, "system": UCUM, "code": "mm[Hg]"},
        }

    return {
        "resourceType": "Observation",
        "id": "bp",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
        "component": [component("8480-6", systolic), component("8462-4", diastolic)],
    }


def test_a_composite_row_pairs_the_parts_of_one_element() -> None:
    rows = extract(_blood_pressure(120, 80)).composites
    assert sorted(rows) == [
        ("component-code-value-quantity", LOINC, "8462-4", UCUM, "mm[Hg]", 80.0, *[None] * 3),
        ("component-code-value-quantity", LOINC, "8480-6", UCUM, "mm[Hg]", 120.0, *[None] * 3),
    ]


def test_combo_composites_are_answered_by_the_code_and_component_rows() -> None:
    assert composite_sources("Observation", "combo-code-value-quantity") == (
        "code-value-quantity",
        "component-code-value-quantity",
    )
    assert composite_sources("Observation", "combo-code-value-concept") == (
        "code-value-concept",
        "component-code-value-concept",
    )
    assert composite_sources("Observation", "code-value-date") == ("code-value-date",)


def test_composite_rows_of_each_second_part_type() -> None:
    def observation(code: str, **value: Any) -> dict[str, Any]:
        coded = {"coding": [{"system": LOINC, "code": code}, {"code": "local"}], "text": "X"}
        return {"resourceType": "Observation", "id": "o", "code": coded, **value}

    concept = {"coding": [{"system": "urn:sct", "code": "10828004", "display": "Positive"}]}
    assert extract(observation("94500-6", valueCodeableConcept=concept)).composites == [
        ("code-value-concept", LOINC, "94500-6", "urn:sct", "10828004", *[None] * 4),
        ("code-value-concept", None, "local", "urn:sct", "10828004", *[None] * 4),
    ]
    low, _ = date_range("2026-05-01")
    assert extract(observation("8665-2", valuePeriod={"start": "2026-05-01"})).composites == [
        ("code-value-date", LOINC, "8665-2", None, None, None, low, MAX_DATE, None),
        ("code-value-date", None, "local", None, None, None, low, MAX_DATE, None),
    ]
    assert extract(observation("8251-1", valueString="Straße")).composites[0] == (
        "code-value-string",
        LOINC,
        "8251-1",
        *[None] * 5,
        "strasse",
    )
    # A code without a coding, or a value of a type no composite takes, gives no row.
    assert extract(observation("x", valueBoolean=True)).composites == []
    text_only = observation("x", valueQuantity={"value": 1}) | {"code": {"text": "free"}}
    assert extract(text_only).composites == []


def test_aliases_are_answered_by_exactly_the_rows_their_expressions_would_give(
    r4_examples: Path,
) -> None:
    """Every alias parameter's own rows (from its official expression) are the rows of its
    sources, narrowed to its target type: the rows it no longer gets lose nothing."""
    checked = 0
    every = definitions()
    for resource_type in INDEXED_TYPES:
        aliases = index_aliases(resource_type)
        if not aliases:
            continue
        for path in sorted(r4_examples.glob(f"{resource_type}-*.json")):
            resource = json.loads(path.read_text(encoding="utf-8"))
            if resource.get("resourceType") != resource_type:
                continue
            stored = extract(resource)
            with_aliases = extract(resource, every)
            for kind in ("strings", "tokens", "dates", "references", "quantities"):
                own = getattr(stored, kind)
                assert not [row for row in own if row[0] in aliases], path.name
                for code, source in aliases.items():
                    expected = {row for row in getattr(with_aliases, kind) if row[0] == code}
                    answered = {
                        (code, *row[1:])
                        for row in own
                        if row[0] in source.params
                        and (source.target_type is None or row[1] == source.target_type)
                    }
                    assert answered == expected, f"{path.name} {code}"
                    checked += len(expected)
    assert checked > 300
