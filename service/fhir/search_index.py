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
other expression is evaluated with fhirpathpy. A test runs both over the official examples.

Pure: no database, no settings.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any, Final

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


def normalize(text: str) -> str:
    """Case- and accent-insensitive form of a string, as string search compares them."""
    decomposed = unicodedata.normalize("NFKD", text)
    folded = "".join(char for char in decomposed if not unicodedata.combining(char)).casefold()
    return " ".join(folded.split())[:MAX_TEXT]


# --- dates --------------------------------------------------------------------------------------

_DATE = re.compile(
    r"(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?P<fraction>\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?"
)


def date_range(value: str) -> tuple[datetime, datetime]:
    """The inclusive UTC range a FHIR date, dateTime or instant covers at its precision.

    A value without a time zone is read as UTC. Raises ValueError for anything else.
    """
    match = _DATE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a FHIR date or dateTime")
    try:
        return _range(match.groupdict())
    except (ValueError, OverflowError):  # a month 13, a 30 February, a 25th hour
        raise ValueError(f"{value!r} is not a FHIR date or dateTime") from None


def _range(parts: dict[str, str | None]) -> tuple[datetime, datetime]:
    assert parts["year"] is not None
    year = int(parts["year"])
    if parts["month"] is None:
        low = datetime(year, 1, 1, tzinfo=UTC)
        return low, _end(datetime(year + 1, 1, 1, tzinfo=UTC) if year < 9999 else None)
    month = int(parts["month"])
    if parts["day"] is None:
        low = datetime(year, month, 1, tzinfo=UTC)
        following = (
            datetime(year + 1, 1, 1, tzinfo=UTC)
            if month == 12
            else datetime(year, month + 1, 1, tzinfo=UTC)
        )
        return low, _end(following if year < 9999 or month < 12 else None)
    day = datetime(year, month, int(parts["day"]), tzinfo=UTC)
    if parts["hour"] is None or parts["minute"] is None:
        return day, _end(day + timedelta(days=1) if day.date() < MAX_DATE.date() else None)
    offset = timedelta(0)
    zone = parts["tz"]
    if zone is not None and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        hours, minutes = zone[1:].split(":")
        offset = sign * timedelta(hours=int(hours), minutes=int(minutes))
    start = day.replace(hour=int(parts["hour"]), minute=int(parts["minute"])) - offset
    if parts["second"] is None:
        return start, start + timedelta(minutes=1, microseconds=-1)
    start += timedelta(seconds=int(parts["second"]))
    fraction = parts["fraction"]
    if fraction is None:
        return start, start + timedelta(seconds=1, microseconds=-1)
    digits = fraction[1:7]
    start += timedelta(microseconds=int(digits.ljust(6, "0")))
    step = 10 ** (6 - len(digits))
    return start, start + timedelta(microseconds=step - 1)


def _end(following: datetime | None) -> datetime:
    return MAX_DATE if following is None else following - timedelta(microseconds=1)


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

Node = Any
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

    def step(nodes: list[Node]) -> list[Node]:
        out: list[Node] = []
        for named in nodes:
            node = named.value if isinstance(named, _Named) else named
            if not isinstance(node, dict):
                continue
            if name in node:
                _extend(out, node[name], name)
                continue
            for key, value in node.items():
                if key.startswith(name) and len(key) > len(name) and key[len(name)].isupper():
                    _extend(out, value, key)
        return out

    return step


def _typed(name: str, type_name: str) -> Step:
    """`name as Type`: the choice element of that type only (`valueQuantity`)."""
    key = name + type_name[0].upper() + type_name[1:]

    def step(nodes: list[Node]) -> list[Node]:
        out: list[Node] = []
        for named in nodes:
            node = named.value if isinstance(named, _Named) else named
            if isinstance(node, dict) and key in node:
                _extend(out, node[key], key)
        return out

    return step


def _extend(out: list[Node], value: Any, key: str) -> None:
    # Remember the element name: it tells a Timing from a Period, a telecom from an identifier.
    for item in value if isinstance(value, list) else [value]:
        out.append(_Named(key, item))


@dataclass(frozen=True, slots=True)
class _Named:
    key: str
    value: Any


def _unwrap(nodes: list[Node]) -> list[Node]:
    return [node.value if isinstance(node, _Named) else node for node in nodes]


def _where_reference_to(type_name: str) -> Step:
    prefix = f"{type_name}/"

    def step(nodes: list[Node]) -> list[Node]:
        kept = []
        for node in nodes:
            value = node.value if isinstance(node, _Named) else node
            reference = value.get("reference", "") if isinstance(value, dict) else ""
            if isinstance(reference, str) and (
                reference.startswith(prefix) or f"/{prefix}" in reference
            ):
                kept.append(node)
        return kept

    return step


def _where_equals(key: str, wanted: str) -> Step:
    def step(nodes: list[Node]) -> list[Node]:
        return [
            node
            for node in nodes
            if isinstance(node.value if isinstance(node, _Named) else node, dict)
            and (node.value if isinstance(node, _Named) else node).get(key) == wanted
        ]

    return step


class Program:
    """A compiled search-parameter expression: resource JSON in, selected nodes out."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self._parts: list[list[Step]] | None = []
        roots: set[str] = set()
        for part in (p.strip() for p in expression.split(" | ")):
            steps = _compile_part(part)
            if steps is None:
                self._parts = None
                break
            self._parts.append(steps)
            root = _ROOT.match(part.lstrip("("))
            roots.add(root[1] if root else "")  # "": the resource itself (a composite's)
        self.roots: frozenset[str] | None = (
            None if self._parts is None or "" in roots else frozenset(roots)
        )
        """The top-level elements the expression starts from: absent ones select nothing
        (None: the program cannot tell, so it always runs)."""
        self._fhirpath: Callable[[Resource], list[Any]] | None = None
        if self._parts is None:
            import fhirpathpy  # only for expressions outside the hand-evaluated subset
            from fhirpathpy.models import models

            compiled = fhirpathpy.compile(expression, models["r4"])
            self._fhirpath = lambda resource: list(compiled(resource, None))

    @property
    def by_hand(self) -> bool:
        return self._parts is not None

    def nodes(self, resource: Resource) -> list[Node]:
        """Selected nodes; from the hand path each remembers its element name."""
        if self._parts is None:
            assert self._fhirpath is not None
            return self._fhirpath(resource)
        out: list[Node] = []
        for steps in self._parts:
            nodes: list[Node] = [resource]
            for step in steps:
                nodes = step(nodes)
                if not nodes:
                    break
            out += nodes
        return out

    def values(self, resource: Resource) -> list[Any]:
        return _unwrap(self.nodes(resource))


_ROOT = re.compile(r"[A-Za-z]+\.([A-Za-z]+)")
_CHOICE_SUFFIX = re.compile(r"[A-Z].*")


@cache
def _element_of(key: str) -> str:
    """The choice element a JSON key may belong to: `effectiveDateTime` is `effective`
    (for `managingOrganization` it gives `managing`, which no program starts from)."""
    return _CHOICE_SUFFIX.sub("", key)


def _compile_part(part: str) -> list[Step] | None:
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
    return steps


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
        component.type, component.expression, program, None if keys is None else frozenset(keys)
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


def parse_reference(reference: str) -> tuple[str | None, str | None, str | None]:
    """(type, id, absolute URL) of a reference string; the URL only when it is absolute."""
    match = _REFERENCE.fullmatch(reference)
    if match is None:
        return None, None, reference if ":" in reference else None
    if match["base"] is None:
        return match["type"], match["id"], None
    return match["type"], match["id"], reference.split("/_history/")[0]


def extract(resource: Resource, catalogue: Definitions | None = None) -> IndexRows:
    """Every index row of a resource."""
    rows = IndexRows()
    resource_type = resource["resourceType"]
    if catalogue is None:
        parameter_programs = programs(resource_type)
        plans = composite_plans(resource_type)
    else:
        parameter_programs = _programs(catalogue.by_type.get(resource_type, {}).values())
        plans = _plans(catalogue.by_type.get(resource_type, {}).values())
    # Most of a type's parameters start from elements a given resource does not have: skip
    # those programs outright (choice elements count by their base name, effective[x]).
    present = set(resource)
    present.update(_element_of(key) for key in resource)
    for parameter, program in parameter_programs:
        if program.roots is not None and program.roots.isdisjoint(present):
            continue
        nodes = program.nodes(resource)
        if not nodes:
            continue
        _add(rows, parameter, nodes)
    for plan in plans:
        if plan.elements.roots is not None and plan.elements.roots.isdisjoint(present):
            continue
        for element in plan.elements.values(resource):
            if isinstance(element, dict):
                rows.composites += _composites(plan, element)
    return rows


def _add(rows: IndexRows, parameter: SearchParameter, nodes: list[Node]) -> None:
    code = parameter.code
    kind = parameter.type
    for node in nodes:
        key = node.key if isinstance(node, _Named) else ""
        value = node.value if isinstance(node, _Named) else node
        if kind == "string":
            rows.strings += [(code, normalize(text), text[:MAX_TEXT]) for text in _strings(value)]
        elif kind == "token":
            rows.tokens += [
                (code, _text(system), _text(token), folded)
                for system, token, folded in _tokens(value, key)
            ]
        elif kind == "uri":
            if isinstance(value, str):
                rows.tokens.append((code, None, cut(value), None))
        elif kind == "date":
            rows.dates += [(code, *span) for span in _dates(value, key)]
        elif kind == "reference":
            target = _reference(value)
            if target is not None:
                target_type, target_id, url = target
                rows.references.append((code, target_type, target_id, cut(url)))
        elif kind == "quantity":
            quantity = _quantity(value)
            if quantity is not None:
                rows.quantities.append((code, *quantity))


def _quantity(value: Any) -> tuple[float, str | None, str | None] | None:
    if not isinstance(value, dict):
        return None
    number = value.get("value")
    if not isinstance(number, int | float) or isinstance(number, bool):
        return None
    unit = value.get("code") or value.get("unit")
    return float(number), _text(value.get("system")), _text(unit)


def _composites(plan: CompositePlan, element: dict[str, Any]) -> list[CompositeRow]:
    """The rows of one element: per composite, each code with each second-part value. A part
    several composites share (`code`) is read once."""
    rows: list[CompositeRow] = []
    seen: dict[Part, list[Values]] = {}
    for code, first, second in plan.composites:
        if second.keys is not None and second.keys.isdisjoint(element):
            continue  # of an Observation's value[x] types one is there: most composites end here
        values = seen.get(second)
        if values is None:
            values = seen[second] = _values(second, element)
        if not values:
            continue
        tokens = seen.get(first)
        if tokens is None:
            tokens = seen[first] = list(dict.fromkeys(_values(first, element)))
        rows += [(code, token[0], token[1], *value) for token in tokens for value in values]
    return rows


def _values(compiled: Part, element: dict[str, Any]) -> list[Values]:
    return [
        value
        for node in compiled.program.nodes(element)
        for value in _part(compiled.type, node.value, node.key)
    ]


def _codes(value: Any, key: str) -> Iterator[tuple[Any, Any]]:
    """(system, code) of a token value, without the folded text a composite does not keep."""
    if isinstance(value, dict) and "coding" in value:
        for coding in value["coding"] if isinstance(value["coding"], list) else ():
            if isinstance(coding, dict):
                yield coding.get("system"), coding.get("code")
    else:
        for system, token, _ in _tokens(value, key):
            yield system, token


def _part(kind: str, value: Any, key: str) -> Iterator[Values]:
    """A composite's second part as its columns, one per value it takes from `value`."""
    if kind == "token":
        for system, token in _codes(value, key):
            if token is not None:
                yield _text(system), _text(token), None, None, None, None
    elif kind == "quantity":
        quantity = _quantity(value)
        if quantity is not None:
            number, system, unit = quantity
            yield system, unit, number, None, None, None
    elif kind == "date":
        for low, high in _dates(value, key):
            yield None, None, None, low, high, None
    elif kind == "string":
        for text in _strings(value):
            yield None, None, None, None, None, normalize(text)


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


def _tokens(value: Any, key: str) -> Iterator[tuple[str | None, str | None, str | None]]:
    if isinstance(value, bool):
        yield None, "true" if value else "false", None
    elif isinstance(value, str):
        yield None, value, None
    elif isinstance(value, dict):
        if "coding" in value or ("text" in value and "code" not in value and "value" not in value):
            text = value.get("text")
            folded = normalize(text) if isinstance(text, str) else None
            codings = [c for c in value.get("coding", []) if isinstance(c, dict)]
            for coding in codings:
                display = coding.get("display")
                yield (
                    coding.get("system"),
                    coding.get("code"),
                    folded or (normalize(display) if isinstance(display, str) else None),
                )
            if not codings and folded:
                yield None, None, folded
        elif key.endswith("telecom") or key == "telecom":
            # ContactPoint: the token is the value (`email=...`), its system the kind.
            yield None, value.get("value"), None
        elif "value" in value and "code" not in value:
            type_text = (value.get("type") or {}).get("text")
            yield (
                value.get("system"),
                value.get("value"),
                normalize(type_text) if isinstance(type_text, str) else None,
            )
        else:
            display = value.get("display")
            yield (
                value.get("system"),
                value.get("code"),
                normalize(display) if isinstance(display, str) else None,
            )


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


def quantity_number(text: str) -> tuple[Decimal, Decimal, Decimal]:
    """A search number as (value, low, high): the range its significant figures imply."""
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number") from None
    if not number.is_finite():
        raise ValueError(f"{text!r} is not a number")
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)
    half = Decimal(5).scaleb(exponent - 1)
    return number, number - half, number + half
