"""References found in a resource's JSON bytes, as a walk through its elements finds them."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from service.fhir.bundles import _conditional_references, _rewrite
from service.fhir.writes import _has_bad_reference

_CONDITIONAL = re.compile(r"([A-Z][A-Za-z]{1,63})\?(.+)", re.DOTALL)
_RELATIVE = re.compile(r"(?P<type>[A-Z][A-Za-z]+)/(?P<id>[^/]*)(?:/_history/[^/]*)?")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _walk_rewrite(value: Any, targets: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "reference" and isinstance(item, str) and item in targets:
                out[key] = targets[item]
            else:
                out[key] = _walk_rewrite(item, targets)
        return out
    if isinstance(value, list):
        return [_walk_rewrite(item, targets) for item in value]
    return value


def _walk_references(value: Any, *, into_references: bool = True) -> list[str]:
    """Every `reference` string; below a `reference` that is no string too if `into_references`."""
    if isinstance(value, list):
        return [
            found
            for item in value
            for found in _walk_references(item, into_references=into_references)
        ]
    if not isinstance(value, dict):
        return []
    found = []
    for key, item in value.items():
        if key == "reference" and isinstance(item, str):
            found.append(item)
        elif key != "reference" or into_references:
            found += _walk_references(item, into_references=into_references)
    return found


_URLS = ["urn:uuid:1", 'urn:uuid:"q"', "urn:uuid:\\b", "urn:uuid:é\n", "http://x/Patient/1"]
_TEXT = st.one_of(
    st.sampled_from(_URLS),
    st.sampled_from(["Patient?identifier=a|1", "Patient/1", "Patient/a b", "Patient/é", "x"]),
    st.text(max_size=8),
)
_KEYS = st.one_of(st.sampled_from(["reference", "subject", "display", "x"]), st.text(max_size=4))
_JSON = st.recursive(
    st.one_of(_TEXT, st.integers(-5, 5), st.booleans(), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=20,
)
_RESOURCE = st.dictionaries(_KEYS, _JSON, max_size=5).map(
    lambda body: {"resourceType": "Observation", **body}
)


@settings(max_examples=400)
@given(_RESOURCE, st.lists(st.sampled_from(_URLS), max_size=3))
def test_rewrite_points_the_references_a_walk_points(resource: dict[str, Any], urls: list[str]):
    targets = {url: f"Patient/{index}" for index, url in enumerate(urls)}
    assert _rewrite(resource, targets) == _walk_rewrite(resource, targets)


@settings(max_examples=400)
@given(_RESOURCE)
def test_conditional_and_bad_references_are_those_a_walk_finds(resource: dict[str, Any]) -> None:
    references = _walk_references(resource)
    # A conditional reference is looked for where a Reference's `reference` can be.
    assert [r for _, r in _conditional_references(resource)] == [
        r for r in _walk_references(resource, into_references=False) if _CONDITIONAL.fullmatch(r)
    ]
    bad = [r for r in references if (m := _RELATIVE.fullmatch(r)) and not _ID.fullmatch(m["id"])]
    assert _has_bad_reference(resource) is bool(bad)


def test_conditional_references_name_their_element() -> None:
    resource = {
        "resourceType": "Observation",
        "subject": {"reference": "Patient?identifier=http://h|7"},
        "performer": [{"reference": "Practitioner/1"}, {"reference": "Practitioner?name=x"}],
    }
    assert _conditional_references(resource) == [
        ("Observation.subject", "Patient?identifier=http://h|7"),
        ("Observation.performer[1]", "Practitioner?name=x"),
    ]
