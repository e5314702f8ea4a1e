"""JSON with its numbers as written.

A FHIR decimal's precision is significant (R4 datatypes.html#decimal: 0.010 is not 0.01), but
orjson reads a number into a float and writes the float back its own way: `1.50` as `1.5`,
`1e2` as `100.0`, a 20-digit decimal rounded. A body holding such a number is read again with
the standard `json` module, each of those numbers a `NumberText` (a float that keeps its text),
which `dump_json` writes back as that text. Every other body keeps orjson's fast path.

Everything that reads a resource to write it out again (the store, the facade's writes and
Bundles, validation, delivery to EHRs) reads with `load_json` and writes with `dump_json`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson


class NumberText(float):
    """A JSON number as its float, for everything that computes with it (search, comparisons),
    and as the text it was written in, for what writes it out again (`dump_json`)."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> NumberText:
        number = super().__new__(cls, text)
        number.text = text
        return number

    def __copy__(self) -> NumberText:
        return self  # immutable, as a float is

    def __deepcopy__(self, memo: dict[int, Any]) -> NumberText:
        return self

    def __reduce__(self) -> tuple[type[NumberText], tuple[str]]:
        return (NumberText, (self.text,))


# What orjson does not write back as it was written is looked for by substring searches and by
# regexes led by a literal character, which the stdlib engine skips ahead to (a regex led by a
# character class is tried at every position, several times slower): in the JSON, or in its
# skeleton (each digit a 0, each `,`, `[` and white space a `:`). Inside a string a match is a
# false alarm, which only costs the slower parse.
_SKELETON = bytes.maketrans(b"123456789E,[ \t\n\r", b"000000000e::::::")
_LONG_INTEGER = b"0" * 19
"""19 digits in a row (in the skeleton): maybe an integer beyond 64 bits, which orjson reads as
a float."""
_EXPONENT = re.compile(rb"0e[-+]?0+(?=[:}\]]|\Z)")
"""An exponent (in the skeleton; orjson writes 1e2 as 100.0): a digit, e or E, digits and
where a JSON number ends (not in an id's hex digits)."""
_FRACTION = re.compile(
    rb"\.(?<=\d\.)(?:"
    rb"\d+0(?=[,}\]\s]|\Z)"  # two digits or more ending in 0, then where a number ends: 1.50
    rb"|(?<=[^\d]0\.)00000"  # below 1e-5, which orjson writes with an exponent
    # 16 digits or more, more than a double keeps: 8 on one side of the point at least, then
    # k before it and 16 - k after
    rb"|(?=\d{8}|(?<=\d{8}\.))(?:"
    + b"|".join(rb"(?<=\d{%d}\.)\d{%d}" % (k, 16 - k) for k in range(1, 16))
    + rb"))"
)
_NEGATIVE_ZERO = re.compile(rb"-0(?![.\d])(?<=[:,\[\s]-0)")
"""The integer -0, which orjson reads as 0."""
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
"""The integers orjson reads as integers."""


def has_inexact_numbers(raw: bytes | str) -> bool:
    """Whether JSON holds a number orjson would not write back as it was written: one with an
    exponent, a fraction ending in 0, more digits than a double keeps, a fraction below 1e-5,
    an integer beyond 64 bits or -0. True for some others (it errs on the side of the exact
    parse). About 5 microseconds for a 2 KB Observation."""
    data = raw.encode() if isinstance(raw, str) else raw
    if _FRACTION.search(data) is not None or _NEGATIVE_ZERO.search(data) is not None:
        return True
    skeleton = data.translate(_SKELETON)
    return _LONG_INTEGER in skeleton or _EXPONENT.search(skeleton) is not None


def _integer(text: str) -> int | NumberText:
    number = int(text)
    if _INT64_MIN <= number <= _UINT64_MAX and text != "-0":
        return number
    return NumberText(text)  # a float to orjson too, but one that keeps its text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def exact_json(raw: bytes | str) -> Any:
    """JSON orjson has read (so it is valid and no deeper than orjson takes) read again with
    every number orjson would not write back as it was a `NumberText`; the same types as
    orjson's otherwise (an integer beyond 64 bits a float, as orjson reads it)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    return json.loads(text, parse_float=NumberText, parse_int=_integer, parse_constant=_no_constant)


def load_json(raw: bytes | str, *, inexact: bool | None = None) -> Any:
    """JSON as orjson reads it, but each number it would not write back as it was a
    `NumberText`: what `dump_json` writes as it was read. Raises `orjson.JSONDecodeError`.

    `inexact`: whether the JSON holds such numbers, when the caller knows (`dump_json_noting`
    wrote it); by default `has_inexact_numbers` says.
    """
    data = orjson.loads(raw)
    if not (has_inexact_numbers(raw) if inexact is None else inexact):
        return data
    try:
        return exact_json(raw)
    except (ValueError, RecursionError):  # what orjson took and `json` does not: orjson's
        return data


def _number_text(value: Any) -> orjson.Fragment:
    if isinstance(value, NumberText):
        return orjson.Fragment(value.text)
    raise TypeError(f"{type(value).__name__} is not JSON")


def dump_json(value: Any, option: int | None = None) -> bytes:
    """`orjson.dumps`, each `NumberText` written as the text it was read as."""
    return orjson.dumps(value, default=_number_text, option=option)


def dump_json_noting(value: Any) -> tuple[bytes, bool]:
    """`dump_json`, and whether it wrote a `NumberText`: what `load_json` needs to know to read
    the JSON back (changed or not) without looking through it."""
    wrote: list[bool] = []

    def number_text(item: Any) -> orjson.Fragment:
        wrote.append(True)
        return _number_text(item)

    return orjson.dumps(value, default=number_text), bool(wrote)
