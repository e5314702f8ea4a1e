"""Numbers kept as written: the detector, the exact parse and the writing back."""

from __future__ import annotations

import copy
import json
import pickle
import random

import orjson
import pytest

from service.json_text import (
    NumberText,
    dump_json,
    dump_json_noting,
    has_inexact_numbers,
    load_json,
)
from service.store.resources import content_hash

OBSERVATION = {
    "resourceType": "Observation",
    "id": "0f8c2b7e-3a51-4d0e-9a6b-2d1c1f0e9b11",
    "identifier": [{"system": "https://clinic.example/ids/session", "value": "S-2024-000123/bp"}],
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}], "text": "BP"},
    "subject": {"reference": "Patient/6d1e3c4a-9f2b-4b8e-8c7d-1a2b3c4d5e6f"},
    "effectiveDateTime": "2024-03-05T10:15:00+01:00",
    "issued": "2024-03-05T10:16:02.120+01:00",
    "note": [{"text": "Seated, 5 min rest, protocol 2.10b, form 1e5x"}],
    "component": [
        {"code": {"text": "systolic"}, "valueQuantity": {"value": 128, "unit": "mmHg"}},
        {"code": {"text": "diastolic"}, "valueQuantity": {"value": -82, "unit": "mmHg"}},
        {"code": {"text": "rate"}, "valueQuantity": {"value": 72.5, "unit": "/min"}},
        {"code": {"text": "temperature"}, "valueQuantity": {"value": 36.85, "unit": "Cel"}},
        {"code": {"text": "ratio"}, "valueQuantity": {"value": 0.00001, "unit": "1"}},
        {"code": {"text": "zero"}, "valueQuantity": {"value": -0.0, "unit": "1"}},
        {"code": {"text": "whole"}, "valueQuantity": {"value": 1.0, "unit": "1"}},
        {"code": {"text": "big"}, "valueInteger": 123456789012345678},
    ],
}

INEXACT = [
    "1.50",
    "0.010",
    "100.000",
    "1e2",
    "1E+2",
    "1.5e-3",
    "-2E5",
    "12345678901234567890.5",
    "1234567890123456.7",
    "0.12345678901234567",
    "0.000001",
    "-0.0000012",
    "-0",
    "18446744073709551616",
    "-9223372036854775809",
    "123456789012345678901234567890",
    "1000000000000000.0",
]


def body(number: str, *, indent: bool = False) -> bytes:
    text = orjson.dumps(OBSERVATION, option=orjson.OPT_INDENT_2 if indent else None).decode()
    return (
        text.replace('"value":128', f'"value":{number}')
        .replace('"value": 128', f'"value": {number}')
        .encode()
    )


@pytest.mark.parametrize("indent", [False, True])
def test_a_body_whose_numbers_orjson_writes_back_takes_the_fast_path(indent: bool) -> None:
    for raw in (orjson.dumps(OBSERVATION), body("128", indent=indent)):
        assert not has_inexact_numbers(raw)
        assert not has_inexact_numbers(raw.decode())
        data = load_json(raw)
        assert not any(isinstance(n, NumberText) for n in _numbers(data))
        assert dump_json(data) == orjson.dumps(orjson.loads(raw))


@pytest.mark.parametrize("number", INEXACT)
@pytest.mark.parametrize("indent", [False, True])
def test_each_number_orjson_would_change_is_found_and_kept(number: str, indent: bool) -> None:
    raw = body(number, indent=indent)
    # orjson alone does not give the text back (the last one it would: the check errs so)
    lost = f'"value":{number},'.encode() not in orjson.dumps(orjson.loads(raw))
    assert lost or number == "1000000000000000.0"
    assert has_inexact_numbers(raw)
    assert has_inexact_numbers(raw.decode())
    written = dump_json(load_json(raw))
    assert f'"value":{number},'.encode() in written
    # Everything else as orjson writes it.
    unchanged = written.replace(f'"value":{number},'.encode(), b'"value":128,', 1)
    assert unchanged == orjson.dumps(orjson.loads(body("128")))


@pytest.mark.parametrize("number", INEXACT)
def test_in_an_array_too(number: str) -> None:
    raw = f'{{"a":[1, {number},2],"b":[{number}]}}'.encode()
    assert has_inexact_numbers(raw)
    assert dump_json(load_json(raw)) == f'{{"a":[1,{number},2],"b":[{number}]}}'.encode()


def test_a_random_number_the_detector_passes_is_one_orjson_writes_back() -> None:
    rng = random.Random(20260401)

    def digits(count: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(count))

    checked = 0
    for _ in range(20000):
        whole = rng.choice(["0", str(rng.randint(1, 9)) + digits(rng.randint(0, 21))])
        fraction = rng.choice(
            ["", "." + digits(rng.randint(1, 19)), "." + "0" * rng.randint(0, 7) + "7"]
        )
        exponent = rng.choice(["", "", "e" + rng.choice(["", "+", "-"]) + str(rng.randint(0, 30))])
        number = rng.choice(["", "-"]) + whole + fraction + exponent
        raw = f'{{"v":{number}}}'.encode()
        try:
            fast = orjson.dumps(orjson.loads(raw))
        except orjson.JSONDecodeError:
            continue  # beyond a double: refused before any of this
        if not has_inexact_numbers(raw):
            assert fast == raw, number
        assert dump_json(load_json(raw)) == raw, number
        checked += 1
    assert checked > 15000


def test_a_number_text_is_its_float_for_everything_but_writing() -> None:
    data = load_json(b'{"v":1.50,"w":1e2,"big":18446744073709551616,"z":-0}')
    value, hundred, big, zero = data["v"], data["w"], data["big"], data["z"]
    assert isinstance(value, NumberText)
    assert isinstance(value, float)
    assert (value, float(value), value.text) == (1.5, 1.5, "1.50")
    assert (hundred, hundred.text) == (100.0, "1e2")
    assert (big, big.text) == (float(2**64), "18446744073709551616")
    assert (zero, zero.text) == (0, "-0")
    for same in (copy.copy(data), copy.deepcopy(data), pickle.loads(pickle.dumps(data))):
        assert dump_json(same) == b'{"v":1.50,"w":1e2,"big":18446744073709551616,"z":-0}'
    assert dump_json(data, option=orjson.OPT_SORT_KEYS) == (
        b'{"big":18446744073709551616,"v":1.50,"w":1e2,"z":-0}'
    )
    # The standard library writes the float (the profile validator compares values so).
    assert json.dumps(value) == "1.5"


def test_an_integer_orjson_keeps_stays_an_int() -> None:
    data = load_json(b'{"a":1.50,"b":18446744073709551615,"c":-9223372036854775808,"d":7}')
    assert [type(data[k]) for k in "bcd"] == [int, int, int]
    assert dump_json(data) == b'{"a":1.50,"b":18446744073709551615,"c":-9223372036854775808,"d":7}'


def test_the_content_hash_tells_precisions_apart() -> None:
    assert content_hash(load_json(b'{"v":1.50}')) != content_hash(load_json(b'{"v":1.5}'))
    assert content_hash(load_json(b'{"v":1.5}')) == content_hash(orjson.loads(b'{"v":1.5}'))


def test_dump_json_noting_says_whether_it_wrote_a_number_text() -> None:
    assert dump_json_noting(load_json(b'{"v":[1.5,{"w":2}]}')) == (b'{"v":[1.5,{"w":2}]}', False)
    assert dump_json_noting(load_json(b'{"v":[1.5,{"w":2.0e1}]}')) == (
        b'{"v":[1.5,{"w":2.0e1}]}',
        True,
    )
    assert load_json(b'{"v":1.50}', inexact=False) == {"v": 1.5}
    assert load_json(b'{"v":1.50}', inexact=False)["v"].__class__ is float


def test_what_is_not_json_stays_an_error() -> None:
    for raw in (b'{"v":NaN, "w":1.50}', b'{"v":1.50', b'{"v":1e400}', b'{"v":01.50}'):
        with pytest.raises(orjson.JSONDecodeError):
            load_json(raw)
    with pytest.raises(TypeError):
        dump_json({"v": object()})


def _numbers(value: object) -> list[object]:
    if isinstance(value, dict):
        return [n for item in value.values() for n in _numbers(item)]
    if isinstance(value, list):
        return [n for item in value for n in _numbers(item)]
    return [value] if isinstance(value, int | float) else []
