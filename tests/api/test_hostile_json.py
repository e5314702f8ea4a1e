"""Hostile JSON against the record and FHIR parsers, and through both APIs.

Huge numbers, deep nesting, wrong types, invalid UTF-8 and lone surrogates, duplicate keys, NUL
characters: the parsers refuse them with their own errors (InvalidRecord, FhirError), never
anything else, and the APIs answer 4xx in their own error shape, never 5xx.
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.bootstrap import resource_validator
from service.errors import InvalidRecord
from service.fhir.errors import FhirError
from service.fhir.writes import parse_json, resource_body
from service.records.service import parse_record
from tests.factory import clinic

FIELDS = [
    "kind",
    "external_id",
    "patient",
    "course",
    "mrn",
    "name",
    "items",
    "total",
    "vitals",
    "resourceType",
    "id",
    "meta",
    "subject",
    "status",
    "code",
    "value",
    "birth_date",
]

HOSTILE_SCALARS = [
    b"1" * 400,  # an integer no 64-bit type holds
    b"-" + b"9" * 400,
    b"1e999999",
    b"-1e-999999",
    b"1.7976931348623157e309",
    b"NaN",
    b"Infinity",
    b'"\\ud800"',  # a lone surrogate
    b'"\\udfff\\ud800"',
    b'"\\u0000"',
    b'"\xff\xfe"',  # invalid UTF-8
    b'"\xc3\x28"',
    b'"' + "\U0010ffff".encode() * 50 + b'"',
    b'"' + b"a" * 100_000 + b'"',
    b"true",
    b"null",
    b"[]",
    b"{}",
    b'"2026-02-30T25:61:00+99:00"',
]


def nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


@st.composite
def hostile_documents(draw: st.DrawFn) -> bytes:
    """Raw bytes shaped like a record or resource, with hostile parts."""
    template = draw(st.sampled_from([dict(clinic().patient), {"resourceType": "Observation"}, {}]))
    parts = []
    for key, value in template.items():
        parts.append(orjson.dumps(key) + b":" + orjson.dumps(value))
    for _ in range(draw(st.integers(1, 4))):
        key = orjson.dumps(draw(st.sampled_from(FIELDS)))  # duplicates of real keys too
        choice = draw(st.integers(0, 3))
        if choice == 0:
            value = draw(st.sampled_from(HOSTILE_SCALARS))
        elif choice == 1:
            value = nested(
                draw(st.sampled_from([70, 2000, 20_000])), draw(st.sampled_from(["list", "dict"]))
            )
        elif choice == 2:
            value = orjson.dumps(
                draw(
                    st.recursive(
                        st.none()
                        | st.booleans()
                        | st.integers(-(2**63), 2**63 - 1)
                        | st.floats(allow_nan=False)
                        | st.text(),
                        lambda inner: (
                            st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(max_size=8), inner, max_size=4)
                        ),
                        max_leaves=10,
                    )
                )
            )
        else:
            value = (
                b'"' + draw(st.binary(max_size=20)).replace(b'"', b"").replace(b"\\", b"") + b'"'
            )
        parts.append(key + b":" + value)
    order = draw(st.permutations(parts))
    document = b"{" + b",".join(order) + b"}"
    if draw(st.booleans()):
        document = document[: draw(st.integers(0, len(document)))]  # cut short
    return document


def decode_record(raw: bytes) -> None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return
    with contextlib.suppress(InvalidRecord):
        parse_record(data)


@given(raw=hostile_documents())
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_record_parser_refuses_hostile_input_with_its_own_error(raw: bytes) -> None:
    decode_record(raw)


_VALIDATOR = None


def validator() -> Any:
    global _VALIDATOR
    if _VALIDATOR is None:
        _VALIDATOR = resource_validator()
    return _VALIDATOR


@given(raw=hostile_documents())
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_fhir_parser_refuses_hostile_input_with_its_own_error(raw: bytes) -> None:
    try:
        resource = resource_body(parse_json(raw), "Observation", None)
    except FhirError as error:
        status = error.status
    else:
        validator().issues(resource)  # whatever it finds, it finds without failing
        return
    assert 400 <= status < 500


@pytest.mark.parametrize("depth", [65, 5000, 100_000])
def test_deep_nesting_is_refused_not_a_crash(depth: int) -> None:
    for kind in ("list", "dict"):
        raw = b'{"resourceType":"Observation","x":' + nested(depth, kind) + b"}"
        with pytest.raises(FhirError) as refused:
            parse_json(raw)
        assert refused.value.status == 400
        decode_record(raw)


def test_the_apis_answer_hostile_bodies_with_4xx_in_their_shape(client: TestClient) -> None:
    @given(raw=hostile_documents())
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    def run(raw: bytes) -> None:
        patient = client.put(
            "/api/v1/patients/P-hostile", content=raw, headers={"Content-Type": "application/json"}
        )
        assert 400 <= patient.status_code < 500 or patient.status_code in (200, 201), patient.text
        if patient.status_code >= 400:
            assert patient.headers["content-type"] == "application/problem+json"
            assert patient.json()["request_id"]
        fhir = client.post(
            "/fhir/Observation", content=raw, headers={"Content-Type": "application/fhir+json"}
        )
        assert 400 <= fhir.status_code < 500, fhir.text
        assert fhir.json()["resourceType"] == "OperationOutcome"
        line = client.post("/api/v1/import", content=raw.replace(b"\n", b" ") + b"\n")
        assert line.status_code in (200, 422), line.text

    run()
