"""Search-index rows of a FHIR resource, extracted at write time from the official definitions.

Each search parameter's FHIRPath expression (`service.fhir.search_parameters`) is compiled once
into a small path program and run over the resource JSON; the values it selects become rows of
the parameter's kind:

    string     normalized text (case- and accent-folded) and the text as written
    token      (system, code) per Coding, Identifier, code, boolean or ContactPoint, with its
               display or text folded for `:text`; uri parameters store the uri as the code
    date       an inclusive [low, high] UTC range from the value's precision, or a Period
    reference  target type and id (relative or this server's), or the absolute URL
    quantity   value with system and code
    composite  one row per element the composite's expression selects (the resource, or each
               `Observation.component`) and combination of its parts' values there: a token,
               then the second part's token, quantity, date range or folded string. Both parts
               of a row come from the same element, which is what a composite search asks for.

The official expressions use a handful of FHIRPath shapes (paths, choice types with `as`,
`where(resolve() is Type)`, `where(system='...')`); those are evaluated here by hand because this
runs for every parameter of every resource version written (fhirpathpy takes ~100 µs per
expression, the path program a few µs, and a write of 13 resources has ~300 expressions). Any
other expression is evaluated with fhirpathpy (of the stored types' only Patient's `deceased`,
whose usual shapes are answered by hand too). A test runs both over the official examples.

Per shape of resource (its top-level keys, and its meta's) the programs that can select
something there are chosen and bound once, with their row makers: their first step resolved to
the keys it reads (`Program.bind`), and the second of `meta.tag` and its like. What is left per
resource is a few µs of Python per parameter that has a value, which is why the row makers below
inline their common cases (a CodeableConcept, an Identifier, a Reference, a Period) and the
values that recur within a write (dates, references, folded text) are remembered.

Pure: no database, no settings.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache, lru_cache, partial, wraps
from itertools import repeat
from typing import Any, Final, TypeVar

from service.fhir.search_parameters import (
    Component,
    Definitions,
    SearchParameter,
    definitions,
    index_aliases,
)

Resource = dict[str, Any]

MIN_DATE: Final = datetime(1, 1, 1, tzinfo=UTC)
MAX_DATE: Final = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
RESOURCE_COLUMNS: Final = frozenset({"_id", "_lastUpdated"})
"""Parameters answered from the resources table itself; they get no index rows."""
MAX_TEXT: Final = 256
"""Index values (text, codes, systems, URLs) are cut to this many characters, and so are the
values searched for: PostgreSQL refuses a btree row over ~2.7 kB, and four bytes a character
keeps two such columns under it. Values longer than this match on their first MAX_TEXT."""


def cut(value: str | None) -> str | None:
    """A value as the index holds it."""
    return None if value is None else value[:MAX_TEXT]


_T = TypeVar("_T")


def _memoized(cache: dict[str, _T]) -> Callable[[Callable[[str], _T]], Callable[[str], _T]]:
    """`function`, keeping its results in `cache` for up to a few thousand strings of up to 64
    characters: the values of one write recur (the session's patient and encounter in each of
    its resources, the time its vital signs were taken in each of them). Anything else is
    passed on as it is, to fail as it would.

    A plain dict, emptied when full, rather than an LRU: the row makers look their common
    values up in it themselves (`_DATE_RANGES.get(value)`), without a call in between."""

    def memoized(function: Callable[[str], _T]) -> Callable[[str], _T]:
        @wraps(function)
        def call(value: str) -> _T:
            if not isinstance(value, str) or len(value) > 64:
                return function(value)
            found = cache.get(value)
            if found is None:
                if len(cache) >= 4096:
                    cache.clear()
                found = cache[value] = function(value)
            return found

        return call

    return memoized


_NORMALIZED: Final[dict[str, str]] = {}
_DATE_RANGES: Final[dict[str, tuple[datetime, datetime]]] = {}
_REFERENCES: Final[dict[str, tuple[str | None, str | None, str | None]]] = {}


@_memoized(_NORMALIZED)
def normalize(text: str) -> str:
    """Case- and accent-insensitive form of a string, as string search compares them."""
    if text.isascii():  # no accents to strip, and casefold() is lower() (a test checks each)
        return " ".join(text.lower().split())[:MAX_TEXT]
    decomposed = unicodedata.normalize("NFKD", text)
    folded = "".join(char for char in decomposed if not unicodedata.combining(char)).casefold()
    return " ".join(folded.split())[:MAX_TEXT]


# --- dates --------------------------------------------------------------------------------------

_DATE = re.compile(
    r"(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?P<fraction>\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?"
)


@_memoized(_DATE_RANGES)
def date_range(value: str) -> tuple[datetime, datetime]:
    """The inclusive UTC range a FHIR date, dateTime or instant covers at its precision.

    A value without a time zone is read as UTC. Raises ValueError for anything else.
    """
    match = _DATE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a FHIR date or dateTime")
    try:
        return _range(*match.groups())
    except (ValueError, OverflowError):  # a month 13, a 30 February, a 25th hour
        raise ValueError(f"{value!r} is not a FHIR date or dateTime") from None


# Each index row of a date costs its range: the ranges are built with as few datetime and
# timedelta objects as the precision allows (the spans are constants).
_MICROSECOND: Final = timedelta(microseconds=1)
_DAY: Final = timedelta(days=1, microseconds=-1)
_LAST_DAY: Final = datetime(9999, 12, 31, tzinfo=UTC)
_MINUTE: Final = timedelta(minutes=1, microseconds=-1)
_SPANS: Final = tuple(timedelta(microseconds=10 ** (6 - digits) - 1) for digits in range(7))
"""A time to the second and to 1-6 digits of a fraction of it covers these."""


def _range(
    year: str,
    month: str | None,
    day: str | None,
    hour: str | None,
    minute: str | None,
    second: str | None,
    fraction: str | None,
    zone: str | None,
) -> tuple[datetime, datetime]:
    number = int(year)
    if month is None:
        low = datetime(number, 1, 1, tzinfo=UTC)
        return low, _end(datetime(number + 1, 1, 1, tzinfo=UTC) if number < 9999 else None)
    months = int(month)
    if day is None:
        low = datetime(number, months, 1, tzinfo=UTC)
        following = (
            datetime(number + 1, 1, 1, tzinfo=UTC)
            if months == 12
            else datetime(number, months + 1, 1, tzinfo=UTC)
        )
        return low, _end(following if number < 9999 or months < 12 else None)
    if hour is None or minute is None:
        low = datetime(number, months, int(day), tzinfo=UTC)
        return low, (low + _DAY if low < _LAST_DAY else MAX_DATE)
    seconds = 0 if second is None else int(second)
    digits = "" if fraction is None else fraction[1:7]
    micro = int(digits.ljust(6, "0")) if digits else 0
    # The zone moves whole minutes, so the seconds can be set before it is applied (the same
    # instant, out of range for the same values), unless a leap second or a 99th carries over.
    carried = seconds > 59
    start = datetime(
        number,
        months,
        int(day),
        int(hour),
        int(minute),
        0 if carried else seconds,
        0 if carried else micro,
        tzinfo=UTC,
    )
    if zone is not None and zone != "Z":
        start -= _offset(zone)
    if carried:
        start += timedelta(seconds=seconds, microseconds=micro)
    if second is None:
        return start, start + _MINUTE
    return start, start + _SPANS[len(digits)]


@lru_cache(maxsize=256)  # a handful of zones in practice (`\d` is any script's digit)
def _offset(zone: str) -> timedelta:
    sign = -1 if zone[0] == "-" else 1
    return timedelta(minutes=sign * (int(zone[1:3]) * 60 + int(zone[4:6])))


def _end(following: datetime | None) -> datetime:
    return MAX_DATE if following is None else following - _MICROSECOND


# --- rows ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class IndexRows:
    """The index rows of one resource, by kind; each row starts with the parameter code."""

    strings: list[tuple[str, str, str]] = field(default_factory=list)
    """(param, normalized value, exact value)"""
    tokens: list[tuple[str, str | None, str | None, str | None]] = field(default_factory=list)
    """(param, system, code, folded text)"""
    dates: list[tuple[str, datetime, datetime]] = field(default_factory=list)
    """(param, low, high), inclusive"""
    references: list[tuple[str, str | None, str | None, str | None]] = field(default_factory=list)
    """(param, target type, target id, absolute URL or canonical)"""
    quantities: list[tuple[str, float, str | None, str | None]] = field(default_factory=list)
    """(param, value, system, code)"""
    composites: list[CompositeRow] = field(default_factory=list)
    """(param, system, code, then the second part: value system, value code, value number,
    value low, value high, value text); the second part fills what its type has, so a token
    has a system and code, a quantity those (its unit) and a number, a date its range and a
    string its folded text."""


Values = tuple[str | None, str | None, float | None, datetime | None, datetime | None, str | None]
"""A composite part's value as the second part's columns (value system, code, number, low,
high, text); a first part, a token, is the first two."""
CompositeRow = tuple[
    str,
    str | None,
    str | None,
    str | None,
    str | None,
    float | None,
    datetime | None,
    datetime | None,
    str | None,
]


# --- path programs ------------------------------------------------------------------------------

Node = tuple[str, Any]
"""A selected value with the name of the element it was found under: the name tells a Timing
from a Period, a telecom from an identifier. "" for the resource itself and for the values
fhirpathpy selects. A plain tuple: the programs make one per value of every parameter."""
Step = Callable[[list[Node]], list[Node]]

_SIMPLE_PART = re.compile(
    r"\(?(?P<path>[A-Za-z]+(?:\.[A-Za-z]+)*)"
    r"(?:\.as\((?P<as1>[A-Za-z]+)\)| as (?P<as2>[A-Za-z]+)\))?"
    r"(?:\.where\(resolve\(\) is (?P<resolve>[A-Za-z]+)\)"
    r"|\.where\((?P<key>[a-z]+)='(?P<value>[^']*)'\))?"
    r"(?P<tail>(?:\.[A-Za-z]+)*)"
)


def _children(name: str) -> Step:
    """The `name` children of each node, choice-type elements (`value[x]`) included."""
    size = len(name)

    def step(nodes: list[Node]) -> list[Node]:
        out: list[Node] = []
        for _, node in nodes:
            if not isinstance(node, dict):
                continue
            if name in node:  # _extend(), inline for the common case
                value = node[name]
                if isinstance(value, list):
                    out += zip(repeat(name), value)
                else:
                    out.append((name, value))
                continue
            for key, value in node.items():
                if key.startswith(name) and len(key) > size and key[size].isupper():
                    _extend(out, value, key)
        return out

    return step


def _typed(name: str, type_name: str) -> Step:
    """`name as Type`: the choice element of that type only (`valueQuantity`)."""
    key = _typed_key(name, type_name)

    def step(nodes: list[Node]) -> list[Node]:
        out: list[Node] = []
        for _, node in nodes:
            if isinstance(node, dict) and key in node:
                _extend(out, node[key], key)
        return out

    return step


def _typed_key(name: str, type_name: str) -> str:
    return name + type_name[0].upper() + type_name[1:]


def _extend(out: list[Node], value: Any, key: str) -> None:
    if isinstance(value, list):
        out += zip(repeat(key), value)
    else:
        out.append((key, value))


def _where_reference_to(type_name: str) -> Step:
    prefix = f"{type_name}/"
    inner = f"/{prefix}"

    def step(nodes: list[Node]) -> list[Node]:
        kept = []
        for node in nodes:
            value = node[1]
            reference = value.get("reference", "") if isinstance(value, dict) else ""
            if isinstance(reference, str) and (reference.startswith(prefix) or inner in reference):
                kept.append(node)
        return kept

    return step


def _where_equals(key: str, wanted: str) -> Step:
    def step(nodes: list[Node]) -> list[Node]:
        return [node for node in nodes if isinstance(node[1], dict) and node[1].get(key) == wanted]

    return step


class Program:
    """A compiled search-parameter expression: resource JSON in, selected nodes out."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self._parts: list[_Part] | None = []
        roots: set[str] = set()
        for member in (p.strip() for p in expression.split(" | ")):
            part = _compile_part(member)
            if part is None:
                self._parts = None
                break
            self._parts.append(part)
            root = _ROOT.match(member.lstrip("("))
            roots.add(root[1] if root else "")  # "": the resource itself (a composite's)
        self.roots: frozenset[str] | None = (
            None if self._parts is None or "" in roots else frozenset(roots)
        )
        """The top-level elements the expression starts from: absent ones select nothing
        (None: the program cannot tell, so it always runs)."""
        self._fhirpath: Callable[[Resource], list[Any]] | None = None
        self._shortcut: Callable[[Resource], list[Node] | None] | None = None
        if self._parts is None:
            import fhirpathpy  # only for expressions outside the hand-evaluated subset
            from fhirpathpy.models import models

            compiled = fhirpathpy.compile(expression, models["r4"])
            self._fhirpath = lambda resource: list(compiled(resource, None))
            self._shortcut = _exists_and_not_false(expression, models["r4"])

    @property
    def by_hand(self) -> bool:
        return self._parts is not None

    def nodes(self, resource: Resource) -> list[Node]:
        """Selected nodes, each with its element name."""
        if self._parts is None:
            found = None if self._shortcut is None else self._shortcut(resource)
            if found is not None:
                return found
            assert self._fhirpath is not None
            return [("", value) for value in self._fhirpath(resource)]
        out: list[Node] = []
        for part in self._parts:
            nodes: list[Node] = [("", resource)]
            for step in part.steps:
                nodes = step(nodes)
                if not nodes:
                    break
            if len(self._parts) == 1:
                return nodes
            out += nodes
        return out

    def values(self, resource: Resource) -> list[Any]:
        return [value for _, value in self.nodes(resource)]

    @property
    def single_key(self) -> str | None:
        """The key, when the program is one step reading one key of its input: `code` (as
        `_children`, which reads only that key when it is there), `value.as(Quantity)`
        (`_typed`'s `valueQuantity`)."""
        if self._parts is None or len(self._parts) != 1:
            return None
        (only,) = self._parts
        if only.first is None or len(only.steps) != 1:
            return None
        name, type_name = only.first
        return name if type_name is None else _typed_key(name, type_name)

    @property
    def selects_resource(self) -> bool:
        """Whether it selects the resource itself (a composite's `Observation`)."""
        return self._parts is not None and all(
            part.first is None and not part.steps for part in self._parts
        )

    def bind(
        self, keys: tuple[str, ...], meta: tuple[str, ...] | None = None
    ) -> Callable[[Resource], list[Node]] | None:
        """`nodes` for a resource with these top-level keys, or None if it selects nothing
        there: the first step of each part (`Observation.code`'s one) resolved to the keys it
        reads. `extract` binds the programs once per shape of resource (`_selected`).

        `meta`: the keys of the resource's `meta` when it is an object, which resolve the
        second step of `meta.tag` and the like too: of the four meta parameters every type has,
        a resource's meta mostly has one or two, and the others are left out."""
        parts = self._bound(keys, meta)
        if parts is None:
            return self.nodes
        if not parts:
            return None
        read, inner, steps = parts[0]
        if len(parts) == 1 and read is not None and len(read) == 1:
            # Most parameters: one element, often nothing after it.
            if inner is not None:
                return partial(_inner, read[0], inner, steps)
            return partial(_element, read[0]) if not steps else partial(_below, read[0], steps)
        return partial(_run, parts)

    def runner(
        self, keys: tuple[str, ...], meta: tuple[str, ...] | None, code: str, add: Adder
    ) -> Runner | None:
        """`bind`, with the parameter's row maker: for one element read as it is (`status`,
        `Observation.code`, `meta.profile`), the maker is given its values straight from the
        resource."""
        parts = self._bound(keys, meta)
        if parts is not None and len(parts) == 1:
            read, inner, steps = parts[0]
            if read is not None and len(read) == 1 and not steps:
                if inner is None:
                    return partial(_element_rows, read[0], add, code)
                if len(inner) == 1:
                    return partial(_inner_rows, read[0], inner[0], add, code)
        nodes_of = self.bind(keys, meta)
        return None if nodes_of is None else partial(_rows, nodes_of, add, code)

    def _bound(self, keys: tuple[str, ...], meta: tuple[str, ...] | None) -> BoundParts | None:
        """Per part that can select something: the top-level keys its first step reads (None:
        it starts from the resource), the meta keys its second reads (None: it is run), and the
        steps left. None: fhirpathpy's."""
        if self._parts is None:
            return None
        bound: list[tuple[tuple[str, ...] | None, tuple[str, ...] | None, tuple[Step, ...]]] = []
        for part in self._parts:
            if part.first is None:
                bound.append((None, None, part.steps))
                continue
            reads = _reads(*part.first, keys)
            if not reads:
                continue
            if meta is not None and part.first == ("meta", None) and part.second is not None:
                inner = _reads(part.second, None, meta)
                if inner:
                    bound.append((reads, inner, part.steps[2:]))
                continue
            bound.append((reads, None, part.steps[1:]))
        return tuple(bound)


def _reads(name: str, type_name: str | None, keys: tuple[str, ...]) -> tuple[str, ...]:
    """The keys among these that `_typed(name, type_name)` or `_children(name)` reads."""
    if type_name is not None:
        key = _typed_key(name, type_name)
        return (key,) if key in keys else ()
    if name in keys:
        return (name,)
    size = len(name)
    return tuple(
        key for key in keys if key.startswith(name) and len(key) > size and key[size].isupper()
    )


BoundParts = tuple[tuple[tuple[str, ...] | None, tuple[str, ...] | None, tuple[Step, ...]], ...]
Runner = Callable[["IndexRows", Resource], None]
"""A parameter bound for one shape of resource, with its code and row maker: adds its rows."""


def _run(parts: BoundParts, resource: Resource) -> list[Node]:
    """A bound program (`Program.bind`): per part, the values of the keys its first step
    reads (or the resource itself), then its other steps."""
    out: list[Node] = []
    for read, inner, steps in parts:
        if read is None:
            nodes: list[Node] = [("", resource)]
        elif inner is not None:
            nodes = _inner(read[0], inner, (), resource)
        else:
            nodes = []
            for key in read:  # _extend(), inline: this is every parameter's first step
                value = resource[key]
                if isinstance(value, list):
                    nodes += zip(repeat(key), value)
                else:
                    nodes.append((key, value))
        for step in steps:
            nodes = step(nodes)
            if not nodes:
                break
        out += nodes
    return out


def _element(key: str, resource: Resource) -> list[Node]:
    """A bound program that reads one top-level element (`Observation.code`)."""
    value = resource[key]
    return list(zip(repeat(key), value)) if isinstance(value, list) else [(key, value)]


def _below(key: str, steps: tuple[Step, ...], resource: Resource) -> list[Node]:
    """A bound program that walks down from one top-level element (`Observation.meta.tag`)."""
    nodes = _element(key, resource)
    for step in steps:
        nodes = step(nodes)
        if not nodes:
            break
    return nodes


def _inner(
    key: str, inner: tuple[str, ...], steps: tuple[Step, ...], resource: Resource
) -> list[Node]:
    """A bound program that reads known keys of a top-level object (`meta`'s `tag`), as
    `_children` would from it, then walks on."""
    node = resource[key]
    nodes: list[Node] = []
    for name in inner:
        _extend(nodes, node[name], name)
    for step in steps:
        nodes = step(nodes)
        if not nodes:
            break
    return nodes


def _element_rows(key: str, add: Adder, code: str, rows: IndexRows, resource: Resource) -> None:
    """A bound parameter that reads one top-level element as it is: its values go to the row
    maker as they are, with no list of nodes made."""
    value = resource[key]
    add(rows, code, zip(repeat(key), value) if isinstance(value, list) else ((key, value),))


def _inner_rows(
    key: str, name: str, add: Adder, code: str, rows: IndexRows, resource: Resource
) -> None:
    """A bound parameter that reads one known key of a top-level object (`meta.profile`)."""
    value = resource[key][name]
    add(rows, code, zip(repeat(name), value) if isinstance(value, list) else ((name, value),))


def _rows(nodes_of: Bound, add: Adder, code: str, rows: IndexRows, resource: Resource) -> None:
    """Any other bound parameter."""
    nodes = nodes_of(resource)
    if nodes:
        add(rows, code, nodes)


@dataclass(frozen=True, slots=True)
class _Part:
    """One member of an expression's union, compiled."""

    steps: tuple[Step, ...]
    first: tuple[str, str | None] | None
    """The element (and choice type, for `_typed`) the first step reads from the resource;
    None: the steps start from the resource itself."""
    second: str | None = None
    """The element the second step reads, when it is `_children`'s (`tag` of `meta.tag`)."""


_ROOT = re.compile(r"[A-Za-z]+\.([A-Za-z]+)")
_CHOICE_SUFFIX = re.compile(r"[A-Z].*")


@cache
def _element_of(key: str) -> str:
    """The choice element a JSON key may belong to: `effectiveDateTime` is `effective`
    (for `managingOrganization` it gives `managing`, which no program starts from)."""
    return _CHOICE_SUFFIX.sub("", key)


def _compile_part(part: str) -> _Part | None:
    match = _SIMPLE_PART.fullmatch(part)
    if match is None or (part.startswith("(") != (match["as2"] is not None)):
        return None
    names = match["path"].split(".")[1:]  # the first name is the resource type
    type_name = match["as1"] or match["as2"]
    steps: list[Step] = []
    for index, name in enumerate(names):
        last = index == len(names) - 1
        steps.append(_typed(name, type_name) if last and type_name else _children(name))
    if match["resolve"]:
        steps.append(_where_reference_to(match["resolve"]))
    if match["key"]:
        steps.append(_where_equals(match["key"], match["value"]))
    for name in (match["tail"] or "").split(".")[1:]:
        steps.append(_children(name))
    first = (names[0], type_name if len(names) == 1 else None) if names else None
    # The second step is `_children(names[1])` unless it is the last name's, `as` a type.
    second = names[1] if len(names) > 2 or (len(names) == 2 and not type_name) else None
    return _Part(tuple(steps), first, second)


_EXISTS_AND_NOT_FALSE = re.compile(
    r"(?P<type>[A-Za-z]+)\.(?P<name>[a-z][A-Za-z]*)\.exists\(\) and (?P=type)\.(?P=name) != false"
)


def _exists_and_not_false(
    expression: str, model: dict[str, Any]
) -> Callable[[Resource], list[Node] | None] | None:
    """`Patient.deceased.exists() and Patient.deceased != false`, by hand for the two shapes
    nearly every resource has (no such element: false; a boolean one: itself), None for any
    other, which fhirpathpy answers: for a string, a list, an extension... FHIRPath's
    equality and three-valued `and` decide, and fhirpathpy reads choice elements by type."""
    match = _EXISTS_AND_NOT_FALSE.fullmatch(expression)
    if match is None:
        return None
    type_name, name = match["type"], match["name"]
    choices = model["choiceTypePaths"].get(f"{type_name}.{name}", ())
    flag = [name + "Boolean"] if "Boolean" in choices else None
    prefixes = (name, f"_{name}")

    def run(resource: Resource) -> list[Node] | None:
        if not isinstance(resource, dict) or resource.get("resourceType") != type_name:
            return None
        found = [key for key in resource if key.startswith(prefixes)]
        if not found:
            return [("", False)]
        if found == flag and isinstance(resource[found[0]], bool):
            return [("", resource[found[0]])]
        return None

    return run


@cache
def programs(resource_type: str) -> tuple[tuple[SearchParameter, Program], ...]:
    """The compiled parameters of a resource type (the common ones included) that have rows
    of their own: composites aside (`composite_plans`), and aliases (`index_aliases`), which
    other parameters' rows answer."""
    aliases = index_aliases(resource_type)
    return _programs(
        p for p in definitions().by_type.get(resource_type, {}).values() if p.code not in aliases
    )


def _programs(parameters: Iterable[SearchParameter]) -> tuple[tuple[SearchParameter, Program], ...]:
    return tuple(
        (parameter, Program(parameter.expression))
        for parameter in parameters
        if parameter.code not in RESOURCE_COLUMNS and not parameter.components
    )


_ELEMENT: Final = "Element"
"""The stand-in type name a composite component's relative expression is compiled under."""


@dataclass(frozen=True, slots=True, eq=False)  # one per component (`part` is cached)
class Part:
    """A composite component compiled: run on one element the composite selects."""

    type: str
    expression: str
    program: Program
    keys: frozenset[str] | None
    """The element keys it reads from (`valueQuantity`), when the expression says exactly
    which: without any of them it selects nothing. None: no such shortcut."""
    key: str | None = None
    """The one element key the program reads when the element has it (`code`,
    `valueQuantity`): then its value is the program's, which `_values` reads itself."""


_CHOICE_OF_ELEMENT = re.compile(r"(?P<name>[A-Za-z]+)\.as\((?P<type>[A-Za-z]+)\)")


@cache
def part(component: Component) -> Part:
    """A composite component's expression (`value.as(Quantity)`), compiled to run on an element.

    Only the hand-evaluated subset: fhirpathpy would need the element's type to read a choice
    element, and every official component expression is a plain path. `value.as(DateTime)`
    (code-value-date's) reads `valueDateTime`, as the parameter that part is defined by does
    (`Observation.value as dateTime`).
    """
    members = [member.strip() for member in component.expression.split("|")]
    program = Program(" | ".join(f"{_ELEMENT}.{member}" for member in members))
    if not program.by_hand:
        raise ValueError(f"composite component {component.expression!r} is not a plain path")
    keys: set[str] | None = set()
    for member in members:  # `value.as(Quantity)` reads `valueQuantity` and nothing else
        match = _CHOICE_OF_ELEMENT.match(member)
        if match is None or keys is None:
            keys = None
        else:
            keys.add(match["name"] + match["type"][0].upper() + match["type"][1:])
    return Part(
        component.type,
        component.expression,
        program,
        None if keys is None else frozenset(keys),
        program.single_key,
    )


@dataclass(frozen=True, slots=True)
class CompositePlan:
    """The composites that take their parts from the elements one path selects (the resource
    itself, or `Observation.component`), so each element is found once for all of them."""

    elements: Program
    composites: tuple[tuple[str, Part, Part], ...]
    """(parameter code, first part, second part)"""


@cache
def composite_plans(resource_type: str) -> tuple[CompositePlan, ...]:
    """The compiled composite parameters of a resource type, by the elements they read."""
    return _plans(definitions().by_type.get(resource_type, {}).values())


@cache
def composite_sources(resource_type: str, code: str) -> tuple[str, ...]:
    """The composites whose rows answer composite `code`: itself, or, for one whose expression
    is a union of other composites' with the same parts (`combo-code-value-quantity` is
    `code-value-quantity` and `component-code-value-quantity`), those, and it has no rows."""
    return _sources(definitions().by_type.get(resource_type, {}).values()).get(code, (code,))


def _sources(parameters: Iterable[SearchParameter]) -> dict[str, tuple[str, ...]]:
    composites = [parameter for parameter in parameters if parameter.components]
    by_shape = {(p.expression, p.components): p.code for p in composites}
    sources: dict[str, tuple[str, ...]] = {}
    for parameter in composites:
        members = [member.strip() for member in parameter.expression.split("|")]
        found = [by_shape.get((member, parameter.components)) for member in members]
        if len(members) > 1 and all(found):
            sources[parameter.code] = tuple(code for code in found if code is not None)
    return sources


def _plans(parameters: Iterable[SearchParameter]) -> tuple[CompositePlan, ...]:
    parameters = tuple(parameters)
    derived = _sources(parameters)
    by_path: dict[str, list[tuple[str, Part, Part]]] = {}
    for parameter in parameters:
        if parameter.components and parameter.code not in derived:
            first, second = (part(component) for component in parameter.components)
            for member in parameter.expression.split("|"):
                by_path.setdefault(member.strip(), []).append((parameter.code, first, second))
    return tuple(CompositePlan(Program(path), tuple(found)) for path, found in by_path.items())


# --- values -------------------------------------------------------------------------------------

_REFERENCE = re.compile(
    r"(?:(?P<base>.+)/)?(?P<type>[A-Z][A-Za-z]{0,63})/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/[^/]+)?"
)


_RELATIVE = re.compile(r"(?P<type>[A-Z][A-Za-z]{0,63})/(?P<id>[A-Za-z0-9\-.]{1,64})")
"""`Type/id`, which _REFERENCE reads the same way, after trying (and backtracking) a base."""


@_memoized(_REFERENCES)
def parse_reference(reference: str) -> tuple[str | None, str | None, str | None]:
    """(type, id, absolute URL) of a reference string; the URL only when it is absolute."""
    relative = _RELATIVE.fullmatch(reference)
    if relative is not None:
        return relative["type"], relative["id"], None
    match = _REFERENCE.fullmatch(reference)
    if match is None:
        return None, None, reference if ":" in reference else None
    if match["base"] is None:
        return match["type"], match["id"], None
    return match["type"], match["id"], reference.split("/_history/")[0]


def extract(resource: Resource, catalogue: Definitions | None = None) -> IndexRows:
    """Every index row of a resource."""
    rows = IndexRows([], [], [], [], [], [])  # (not the default factories' six calls)
    resource_type = resource["resourceType"]
    if isinstance(resource, dict):
        keys = tuple(resource)
        meta = resource.get("meta")
        meta_keys = tuple(meta) if isinstance(meta, dict) else None
    else:
        keys, meta_keys = (), None
    if catalogue is None:
        parameters, plans = _selected(resource_type, keys, meta_keys)
    else:
        every = catalogue.by_type.get(resource_type, {}).values()
        parameters, plans = _select(_programs(every), _plans(every), keys, meta_keys)
    for run in parameters:
        run(rows, resource)
    for elements_of, plan in plans:
        if elements_of is None:  # the composites of the resource itself (`code-value-*`)
            if isinstance(resource, dict):
                rows.composites += _composites(plan, resource)
            continue
        for _, element in elements_of(resource):
            if isinstance(element, dict):
                rows.composites += _composites(plan, element)
    return rows


Adder = Callable[[IndexRows, str, Iterable[Node]], None]
"""Adds the rows of one parameter's selected nodes (its code given) to the rows of its kind."""
Bound = Callable[[Resource], list[Node]]
Selected = tuple[tuple[Runner, ...], tuple[tuple[Bound | None, CompositePlan], ...]]
"""What runs on a resource: each parameter bound with its code and row maker, and the
composites with their bound element programs (None: the element is the resource)."""


@lru_cache(maxsize=1024)
def _selected(
    resource_type: str, keys: tuple[str, ...], meta: tuple[str, ...] | None = None
) -> Selected:
    """The parameters and composites of a type bound for a resource with these top-level keys
    (and these keys of its meta), which resources of one kind mostly share; those that select
    nothing there left out (most of a type's parameters start from elements a given resource
    does not have)."""
    return _select(programs(resource_type), composite_plans(resource_type), keys, meta)


def _select(
    parameters: Iterable[tuple[SearchParameter, Program]],
    plans: Iterable[CompositePlan],
    keys: tuple[str, ...],
    meta: tuple[str, ...] | None = None,
) -> Selected:
    # Choice elements count by their base name too (`effectiveDateTime` is `effective`).
    present = frozenset(keys).union(map(_element_of, keys))

    def absent(program: Program) -> bool:
        return program.roots is not None and program.roots.isdisjoint(present)

    def bound(program: Program) -> Bound | None:
        return None if absent(program) else program.bind(keys)

    selected = []
    for parameter, program in parameters:
        add = _ADDERS.get(parameter.type, _add_nothing)
        run = None if absent(program) else program.runner(keys, meta, parameter.code, add)
        if run is not None:
            selected.append(run)
    composites = []
    for plan in plans:
        elements_of = bound(plan.elements)
        if elements_of is not None and plan.elements.selects_resource:
            # The element is the resource: its keys tell which second parts can have a value
            # (of an Observation's value[x] types one is there), as `_composites` would.
            applicable = tuple(
                composite
                for composite in plan.composites
                if composite[2].keys is None or not composite[2].keys.isdisjoint(keys)
            )
            plan = CompositePlan(plan.elements, applicable)
        if elements_of is not None and plan.composites:
            # A plan's path is one member of a union (`_plans`): `Observation` is the resource once.
            itself = plan.elements.selects_resource and "|" not in plan.elements.expression
            composites.append((None if itself else elements_of, plan))
    return tuple(selected), tuple(composites)


# One row maker per parameter kind, with the loop over the selected nodes inside, chosen once
# per parameter (`_select`); a plain code or dateTime is handled inline.


def _add_strings(rows: IndexRows, code: str, nodes: Iterable[Node]) -> None:
    out = rows.strings
    for _, value in nodes:
        if isinstance(value, str):
            out.append((code, normalize(value), value[:MAX_TEXT]))
        else:
            out += [(code, normalize(text), text[:MAX_TEXT]) for text in _strings(value)]


def _add_tokens(rows: IndexRows, code: str, nodes: Iterable[Node]) -> None:
    out = rows.tokens
    for key, value in nodes:
        if isinstance(value, str):
            out.append((code, None, value[:MAX_TEXT], None))
        elif isinstance(value, dict) and "coding" in value:
            # A CodeableConcept, most tokens: `_tokens` and `_text` inline, rows added as made.
            # (Only iterating `coding` can fail, before any row of it is added.)
            text = value.get("text")
            folded = (_NORMALIZED.get(text) or normalize(text)) if isinstance(text, str) else None
            added = False
            for coding in value["coding"]:
                if isinstance(coding, dict):
                    added = True
                    system = coding.get("system")
                    token = coding.get("code")
                    display = coding.get("display")
                    shown = (
                        (_NORMALIZED.get(display) or normalize(display))
                        if isinstance(display, str)
                        else None
                    )
                    out.append(
                        (
                            code,
                            system[:MAX_TEXT] if isinstance(system, str) else None,
                            token[:MAX_TEXT] if isinstance(token, str) else None,
                            folded or shown,
                        )
                    )
                    if folded and shown and shown != folded:
                        # `:text` searches the display too: a row of its own, with no code.
                        out.append((code, None, None, shown))
            if not added and folded:
                out.append((code, None, None, folded))
        elif (
            isinstance(value, dict)
            and "value" in value
            and "code" not in value
            and not key.endswith("telecom")
        ):
            # An Identifier (`_tokens`' case after CodeableConcept's, which `value` rules out;
            # a ContactPoint's is its own): its system and value, its type's text folded.
            type_text = (value.get("type") or {}).get("text")
            system = value.get("system")
            token = value.get("value")
            out.append(
                (
                    code,
                    system[:MAX_TEXT] if isinstance(system, str) else None,
                    token[:MAX_TEXT] if isinstance(token, str) else None,
                    (_NORMALIZED.get(type_text) or normalize(type_text))
                    if isinstance(type_text, str)
                    else None,
                )
            )
        else:
            for system, token, folded in _tokens(value, key):  # _text(), inline
                out.append(
                    (
                        code,
                        system[:MAX_TEXT] if isinstance(system, str) else None,
                        token[:MAX_TEXT] if isinstance(token, str) else None,
                        folded,
                    )
                )


def _add_uris(rows: IndexRows, code: str, nodes: Iterable[Node]) -> None:
    out = rows.tokens
    for _, value in nodes:
        if isinstance(value, str):
            out.append((code, None, value[:MAX_TEXT], None))


def _add_dates(rows: IndexRows, code: str, nodes: Iterable[Node]) -> None:
    out = rows.dates
    for key, value in nodes:
        if isinstance(value, str):
            span = _DATE_RANGES.get(value)  # date_range()'s memory, without the call
            if span is None:
                try:
                    span = date_range(value)
                except (ValueError, OverflowError):
                    continue
            out.append((code, *span))
        elif isinstance(value, dict) and ("start" in value or "end" in value):
            # A Period, as `_dates` reads it: open ends stretch to the limits. (Only a string
            # is looked up: another value fails in date_range as `_dates` lets it.)
            try:
                if "start" in value:
                    start = value["start"]
                    low = (
                        (isinstance(start, str) and _DATE_RANGES.get(start)) or date_range(start)
                    )[0]
                else:
                    low = MIN_DATE
                if "end" in value:
                    end = value["end"]
                    high = ((isinstance(end, str) and _DATE_RANGES.get(end)) or date_range(end))[1]
                else:
                    high = MAX_DATE
            except (ValueError, OverflowError, TypeError):
                continue
            out.append((code, low, high))
        else:
            out += [(code, low, high) for low, high in _dates(value, key)]


def _add_references(rows: IndexRows, code: str, nodes: Iterable[Node]) -> None:
    out = rows.references
    for _, value in nodes:
        if isinstance(value, dict):  # a Reference, as `_reference` reads it
            reference = value.get("reference")
            if isinstance(reference, str):
                if reference.startswith("#"):  # to a contained resource: no row
                    continue
                target_type, target_id, url = _REFERENCES.get(reference) or parse_reference(
                    reference
                )
                out.append((code, target_type, target_id, None if url is None else url[:MAX_TEXT]))
                continue
        target = _reference(value)
        if target is not None:
            target_type, target_id, url = target
            out.append((code, target_type, target_id, cut(url)))


def _add_quantities(rows: IndexRows, code: str, nodes: Iterable[Node]) -> None:
    out = rows.quantities
    for _, value in nodes:
        if isinstance(value, dict):  # _quantity(), inline
            number = value.get("value")
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                unit = value.get("code") or value.get("unit")
                system = value.get("system")
                out.append(
                    (
                        code,
                        float(number),
                        system[:MAX_TEXT] if isinstance(system, str) else None,
                        unit[:MAX_TEXT] if isinstance(unit, str) else None,
                    )
                )


def _add_nothing(rows: IndexRows, code: str, nodes: Iterable[Node]) -> None:
    """A kind without rows (only in a catalogue passed in)."""


_ADDERS: Final[dict[str, Adder]] = {
    "string": _add_strings,
    "token": _add_tokens,
    "uri": _add_uris,
    "date": _add_dates,
    "reference": _add_references,
    "quantity": _add_quantities,
}


def _quantity(value: Any) -> tuple[float, str | None, str | None] | None:
    if not isinstance(value, dict):
        return None
    number = value.get("value")
    # A tuple, not `int | float`: that builds a union object on every call.
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        return None
    unit = value.get("code") or value.get("unit")
    system = value.get("system")  # _text(), inline
    return (
        float(number),
        system[:MAX_TEXT] if isinstance(system, str) else None,
        unit[:MAX_TEXT] if isinstance(unit, str) else None,
    )


def _composites(plan: CompositePlan, element: dict[str, Any]) -> list[CompositeRow]:
    """The rows of one element: per composite, each code with each second-part value. A part
    several composites share (`code`) is read once."""
    rows: list[CompositeRow] = []
    seen: dict[Part, list[Values]] = {}
    for code, first, second in plan.composites:
        if second.keys is not None and element.keys().isdisjoint(second.keys):
            continue  # of an Observation's value[x] types one is there: most composites end here
        values = seen.get(second)
        if values is None:
            values = seen[second] = _values(second, element)
        if not values:
            continue
        tokens = seen.get(first)
        if tokens is None:
            tokens = _values(first, element)
            if len(tokens) > 1:  # (one has no duplicate)
                tokens = list(dict.fromkeys(tokens))
            seen[first] = tokens
        for token in tokens:
            for value in values:
                rows.append((code, token[0], token[1], *value))
    return rows


def _values(compiled: Part, element: dict[str, Any]) -> list[Values]:
    key = compiled.key
    nodes: Iterable[Node]
    if key is not None and key in element:  # the program's one step, inline
        value = element[key]
        if isinstance(value, list):
            nodes = zip(repeat(key), value)
        elif compiled.type == "token" and isinstance(value, dict) and "coding" in value:
            # A CodeableConcept (`code`, in every composite): `_part` and `_codes` inline.
            codings = value["coding"]
            if not isinstance(codings, list):
                return []
            found: list[Values] = []
            for coding in codings:
                if isinstance(coding, dict):
                    token = coding.get("code")
                    if token is not None:
                        system = coding.get("system")
                        found.append(
                            (
                                system[:MAX_TEXT] if isinstance(system, str) else None,
                                token[:MAX_TEXT] if isinstance(token, str) else None,
                                None,
                                None,
                                None,
                                None,
                            )
                        )
            return found
        else:
            return _part(compiled.type, value, key)
    else:
        nodes = compiled.program.nodes(element)
    found = []
    for key, node in nodes:
        found += _part(compiled.type, node, key)
    return found


def _codes(value: Any, key: str) -> list[tuple[Any, Any]]:
    """(system, code) of a token value, without the folded text a composite does not keep."""
    if isinstance(value, dict) and "coding" in value:
        codings = value["coding"]
        if not isinstance(codings, list):
            return []
        codes = []
        for coding in codings:
            if isinstance(coding, dict):
                codes.append((coding.get("system"), coding.get("code")))
        return codes
    return [(system, token) for system, token, _ in _tokens(value, key)]


def _part(kind: str, value: Any, key: str) -> list[Values]:
    """A composite's second part as its columns, one per value it takes from `value`."""
    if kind == "token":
        tokens: list[Values] = []
        for system, token in _codes(value, key):
            if token is not None:  # _text(), inline
                tokens.append(
                    (
                        system[:MAX_TEXT] if isinstance(system, str) else None,
                        token[:MAX_TEXT] if isinstance(token, str) else None,
                        None,
                        None,
                        None,
                        None,
                    )
                )
        return tokens
    if kind == "quantity":
        quantity = _quantity(value)
        if quantity is None:
            return []
        number, system, unit = quantity
        return [(system, unit, number, None, None, None)]
    if kind == "date":
        return [(None, None, None, low, high, None) for low, high in _dates(value, key)]
    if kind == "string":
        return [(None, None, None, None, None, normalize(text)) for text in _strings(value)]
    return []


def _text(value: Any) -> str | None:
    """A string value cut to the index's size; anything else (a malformed value) is no value."""
    return value[:MAX_TEXT] if isinstance(value, str) else None


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        # HumanName and Address: every part a person might search by.
        for part in ("text", "family", "given", "prefix", "suffix", "line", "city", "district"):
            yield from _texts(value.get(part))
        for part in ("state", "postalCode", "country"):
            yield from _texts(value.get(part))


def _texts(value: Any) -> Iterator[str]:
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str):
            yield item


def _tokens(value: Any, key: str) -> list[tuple[Any, Any, str | None]]:
    """(system, code, folded text) of each token a value has, as written (`_text` cuts them)."""
    if isinstance(value, bool):
        return [(None, "true" if value else "false", None)]
    if isinstance(value, str):
        return [(None, value, None)]
    if not isinstance(value, dict):
        return []
    if "coding" in value or ("text" in value and "code" not in value and "value" not in value):
        text = value.get("text")
        folded = normalize(text) if isinstance(text, str) else None
        tokens = []
        for coding in value.get("coding", []):
            if isinstance(coding, dict):
                display = coding.get("display")
                shown = normalize(display) if isinstance(display, str) else None
                tokens.append((coding.get("system"), coding.get("code"), folded or shown))
                if folded and shown and shown != folded:  # `:text` searches the display too
                    tokens.append((None, None, shown))
        return [(None, None, folded)] if not tokens and folded else tokens
    if key.endswith("telecom") or key == "telecom":
        # ContactPoint: the token is the value (`email=...`), its system the kind.
        return [(None, value.get("value"), None)]
    if "value" in value and "code" not in value:
        type_text = (value.get("type") or {}).get("text")
        return [
            (
                value.get("system"),
                value.get("value"),
                normalize(type_text) if isinstance(type_text, str) else None,
            )
        ]
    display = value.get("display")
    return [
        (
            value.get("system"),
            value.get("code"),
            normalize(display) if isinstance(display, str) else None,
        )
    ]


def _dates(value: Any, key: str) -> Iterator[tuple[datetime, datetime]]:
    if isinstance(value, str):
        try:
            yield date_range(value)
        except (ValueError, OverflowError):
            return
    elif isinstance(value, dict):
        if "start" in value or "end" in value:  # Period: open ends stretch to the limits
            try:
                low = date_range(value["start"])[0] if "start" in value else MIN_DATE
                high = date_range(value["end"])[1] if "end" in value else MAX_DATE
            except (ValueError, OverflowError, TypeError):
                return
            yield low, high
        elif "event" in value or "repeat" in value:  # Timing: its events, or its bounds
            spans = list(_dates(value.get("event", []), key)) if value.get("event") else []
            bounds = (value.get("repeat") or {}).get("boundsPeriod")
            if bounds:
                spans += list(_dates(bounds, key))
            if spans:
                yield min(s[0] for s in spans), max(s[1] for s in spans)
    elif isinstance(value, list):
        for item in value:
            yield from _dates(item, key)


def _reference(value: Any) -> tuple[str | None, str | None, str | None] | None:
    if isinstance(value, str):  # canonical
        return (*parse_reference(value)[:2], value.split("|")[0])
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        reference: str = value["reference"]
        if reference.startswith("#"):
            return None
        return parse_reference(reference)
    return None


_SEARCH_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
"""A number as a search value writes it: a FHIR decimal, or in exponent form (`1e2`)."""


def quantity_number(text: str) -> tuple[Decimal, Decimal, Decimal]:
    """A search number as (value, low, high): the range its significant figures imply."""
    # Decimal reads `1_000`, ` 5`, `NaN` and other scripts' digits too.
    if _SEARCH_NUMBER.fullmatch(text) is None:
        raise ValueError(f"{text!r} is not a number")
    try:
        number = Decimal(text)
        exponent = number.as_tuple().exponent
        assert isinstance(exponent, int)
        half = Decimal(5).scaleb(exponent - 1)
        return number, number - half, number + half
    except ArithmeticError:  # an exponent beyond what a decimal holds (`1e-9999999`)
        raise ValueError(f"{text!r} is out of range") from None
