"""The profile validator reads JSON objects and arrays by what they are, not by their exact type.

The walk tells plain dicts, lists and strings apart by `type(...) is` before it falls back to
isinstance(), for speed: a resource built of dict and list subclasses (as a caller's own
Mapping types may be) must be reported on exactly as the same resource of plain ones.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from service.fhir.profile_validation import ProfileValidator, default_validator

BP = "http://hl7.org/fhir/StructureDefinition/bp"


class _Object(dict[str, Any]):
    """A JSON object of another type than dict."""


class _Array(list[Any]):
    """A JSON array of another type than list."""


class _Text(str):
    """A JSON string of another type than str."""

    __slots__ = ()


def _retyped(value: Any) -> Any:
    """The same JSON with every object, array and string (keys aside) of a subclass."""
    if isinstance(value, dict):
        return _Object({key: _retyped(entry) for key, entry in value.items()})
    if isinstance(value, list):
        return _Array(_retyped(entry) for entry in value)
    if isinstance(value, str):
        return _Text(value)
    return value


def _coding(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def _blood_pressure() -> dict[str, Any]:
    loinc = "http://loinc.org"
    ucum = "http://unitsofmeasure.org"
    return {
        "resourceType": "Observation",
        "id": "bp-1",
        "meta": {"profile": [BP]},
        "status": "final",
        "category": [
            _coding("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs")
        ],
        "code": _coding(loinc, "85354-9"),
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2026-06-08T11:34:00-04:00",
        "component": [
            {
                "code": _coding(loinc, code),
                "valueQuantity": {"value": value, "unit": "mmHg", "system": ucum, "code": "mm[Hg]"},
            }
            for code, value in (("8480-6", 113), ("8462-4", 73))
        ],
    }


def _variants() -> list[dict[str, Any]]:
    """A valid blood pressure and ones with an issue in each place the fast paths read."""
    valid = _blood_pressure()
    variants = [valid]
    changes: list[Callable[[dict[str, Any]], object]] = [
        lambda r: r["category"][0]["coding"][0].update(code="laboratory"),
        lambda r: r["category"].append([{"coding": []}]),
        lambda r: r["component"][0]["code"]["coding"][0].update(code=["8480-6"]),
        lambda r: r["component"][1]["code"].update(coding=[[{"code": "8462-4"}]]),
        lambda r: r["component"].pop(),
        lambda r: r["component"][0]["valueQuantity"].update(code="mmHg"),
        lambda r: r.update(status="unknown-status"),
        lambda r: r.update(subject={"reference": "Group/g1"}),
        lambda r: r.update(effectiveDateTime="2026"),
        lambda r: r.update(code=[r["code"]]),
    ]
    for change in changes:
        variant = copy.deepcopy(valid)
        change(variant)
        variants.append(variant)
    return variants


@pytest.fixture(scope="module")
def validator() -> ProfileValidator:
    return default_validator()


@pytest.mark.parametrize("resource", _variants())
def test_subclassed_json_is_reported_on_as_plain_json(
    validator: ProfileValidator, resource: dict[str, Any]
) -> None:
    plain = validator.issues(resource)
    assert validator.issues(_retyped(resource)) == plain
    assert validator.issues(_retyped(resource), BP) == validator.issues(resource, BP)


def test_the_variants_break_what_they_change(validator: ProfileValidator) -> None:
    valid, *changed = _variants()
    assert validator.issues(valid) == []
    # Arrays in arrays (2, 3 and the array of one `code`) are fhirkit-rs's to reject; the
    # others break a slice, a fixed value, a binding, a target or vs-1.
    reported = [bool(validator.issues(resource)) for resource in changed]
    assert reported == [True, False, False, True, True, True, True, True, True, False]
