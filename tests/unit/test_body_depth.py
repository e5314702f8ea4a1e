"""How deep a body nests, counted level by level over its containers as a walk through every
value counts it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.fhir.errors import FhirError
from service.fhir.writes import MAX_DEPTH, _nests_deeper_than, parse_json


def _walked_depth(value: Any) -> int:
    """The document is level 1; each value one level below its container."""
    if isinstance(value, dict):
        return 1 + max((_walked_depth(item) for item in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_walked_depth(item) for item in value), default=0)
    return 1


# Keys and strings full of what the byte passes treat specially: quotes, escapes, brackets.
_TEXT = st.text(alphabet=st.sampled_from('ab"\\{}[]:, \n\t/\u00e9\u2028'), max_size=8)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | _TEXT
)
_DOCUMENTS = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=60,
)


@settings(max_examples=800, deadline=None)
@given(_DOCUMENTS, st.integers(1, 8))
def test_the_levels_find_what_lies_deeper_than_the_limit(document: Any, limit: int) -> None:
    assert _nests_deeper_than(document, limit) == (_walked_depth(document) > limit)


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 5000])
def test_a_body_deeper_than_the_limit_is_refused(depth: int) -> None:
    # `depth - 1` containers around a scalar: the scalar is at level `depth`.
    raw = ('{"a":' * (depth - 1) + '"x"' + "}" * (depth - 1)).encode()
    if depth <= MAX_DEPTH:
        assert parse_json(raw)
    else:
        # Far past it, orjson's own limit answers first: a 400 either way.
        with pytest.raises(FhirError, match=r"nests deeper|depth limit") as refused:
            parse_json(raw)
        assert refused.value.status == 400


@pytest.mark.parametrize(
    "raw",
    [b'{"a":"x\\u0000y"}', b'{"a\\u0000":1}', b'[["\\u0000"]]', b'{"a":["\\\\\\u0000"]}'],
)
def test_a_nul_anywhere_is_refused(raw: bytes) -> None:
    with pytest.raises(FhirError, match="NUL"):
        parse_json(raw)


def test_an_escaped_backslash_before_u0000_is_no_nul() -> None:
    assert parse_json(b'{"a":"\\\\u0000"}') == {"a": "\\u0000"}
