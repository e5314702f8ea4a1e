"""FHIR search over the search index, in SQL: parameters parsed per the R4 spec, keyset paging.

A request's parameters become one SQL statement over `resources`, each search parameter a
sub-select on its index table (`service.store.tables` search_*), ANDed across parameters and ORed
across a parameter's comma-separated values: the likeliest most selective parameter gives the
candidates (IN), the others probe their index rows for each candidate inside that sub-select, so a
resource row is read only for a match. A composite parameter's value (`code$value`) is one
condition on one `search_composite` row, so its parts match on the same element. Results are
ordered by the `_sort` keys (nulls last) and then by resource id, and paged with a cursor of the
last row's sort values and id, so a page never repeats or skips a resource whose sort values did
not change in between, whatever is written meanwhile. `_include` / `_revinclude` follow the
reference index. Resources are never loaded into Python to be filtered; a page's bodies are the
stored bytes.

    parse_search      parameters -> SearchQuery (or SearchError: what is wrong, where)
    run_search        SearchQuery -> SearchPage (matches, includes, total, next cursor)
    page_statement    SearchQuery -> the page's SELECT, when `one_statement` says it is all
                      the search runs (a caller may run it on its own connection), and page_of
                      its rows -> SearchPage
    matching_ids      for conditional interactions: ids matching criteria, strictly parsed

Must not: know about HTTP, Bundles or settings (service.fhir.api shapes the response).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlencode

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    FromClause,
    Integer,
    Select,
    String,
    and_,
    false,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.sql.expression import ScalarSelect

from service.fhir.errors import FhirError
from service.fhir.search_index import (
    MAX_DATE,
    MIN_DATE,
    composite_sources,
    date_range,
    normalize,
    parse_reference,
    quantity_number,
)
from service.fhir.search_parameters import SearchParameter, definitions, index_source
from service.store.db import grouped, pairs_in
from service.store.tables import (
    UtcDateTime,
    resources,
    search_composite,
    search_date,
    search_quantity,
    search_reference,
    search_string,
    search_token,
)

DEFAULT_COUNT: Final = 50
MAX_COUNT: Final = 1000
MAX_INCLUDED: Final = 1000
"""Included resources per page at most (a `_include` fan-out cannot grow a page unboundedly)."""
MAX_ITERATE: Final = 3
"""Rounds of `:iterate` at most."""
MAX_VALUES: Final = 60
"""Comma-separated values of the filter parameters of one search at most (`_id`'s aside): each
is a term of an OR, and SQLite parses a statement's ORs and ANDs, sub-selects included, as one
expression tree, which it refuses beyond a depth of 1000."""
MAX_FILTERS: Final = 50
"""Filter parameters of one search at most (each is a condition of one AND)."""

PREFIXES: Final = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
RESULT_PARAMETERS: Final = frozenset(
    {
        "_sort",
        "_count",
        "_include",
        "_revinclude",
        "_summary",
        "_elements",
        "_total",
        "_page",
    }
)
SINGLE_VALUED: Final = frozenset({"_count", "_summary", "_elements", "_total"})
"""Result parameters of which a search applies one value: given again, the later one."""
INCLUDE_MODIFIERS: Final = ("iterate", "recurse")
"""`_include:iterate=...` (R4) and `_include:recurse=...` (its name before R4)."""
WILDCARD: Final = "*"
"""`_include=Type:*`: every reference parameter of the type (`*` alone: of the searched type)."""
IGNORED_QUIETLY: Final = frozenset({"_format", "_pretty"})
"""Handled elsewhere (content negotiation) or harmless: never reported as unsupported."""
SUMMARY_MODES: Final = ("true", "false", "data", "count")

_MAX_TEXT_CHAR: Final = "\U0010ffff"
_STRING_MAX: Final = _MAX_TEXT_CHAR * 4
_TABLES: Final = {
    "string": search_string,
    "token": search_token,
    "uri": search_token,
    "date": search_date,
    "reference": search_reference,
    "quantity": search_quantity,
    "composite": search_composite,
}
_MODIFIERS: Final = {
    "string": ("exact", "contains", "missing"),
    "token": ("not", "text", "missing"),
    "uri": ("below", "missing"),
    "date": ("missing",),
    "reference": ("missing",),
    "quantity": ("missing",),
    "composite": ("missing",),
}


class SearchError(FhirError):
    """A search parameter the server cannot apply: 400 processing, naming the parameter."""

    def __init__(self, name: str, diagnostics: str) -> None:
        super().__init__(400, "processing", f"{name}: {diagnostics}", expression=name)
        self.name = name


def _too_costly(name: str, diagnostics: str) -> FhirError:
    """A search beyond the server's limits: 400 too-costly, under any handling."""
    return FhirError(400, "too-costly", f"{name}: {diagnostics}", expression=name)


# --- the parsed query ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SortKey:
    code: str
    descending: bool
    kind: str
    """string, token, uri, date, quantity, or `id` / `lastUpdated` for the resource columns."""


@dataclass(frozen=True, slots=True)
class Include:
    source_type: str
    param: str
    target_type: str | None
    iterate: bool
    reverse: bool


@dataclass(slots=True)
class SearchQuery:
    """A parsed search: what to filter, sort, include and return."""

    resource_type: str
    base: str = ""
    """The server's base URL: an absolute reference under it is to a resource here."""
    conditions: list[ColumnElement[bool]] = field(default_factory=list)
    applied: list[tuple[str, str]] = field(default_factory=list)
    """The parameters applied, as given: the self link shows exactly these."""
    ignored: list[tuple[str, str]] = field(default_factory=list)
    """(parameter, why) for what was not applied (lenient handling only)."""
    sort: list[SortKey] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    includes: list[Include] = field(default_factory=list)
    summary: str | None = None
    elements: tuple[str, ...] = ()
    total: str | None = None
    after: tuple[list[Any], str] | None = None
    fixed_plan: bool = False
    """Whether one plan suits every search of this shape, whatever its values: the candidates
    come from an equality lookup and every other condition probes them (so a database may plan
    the statement once, as a prepared statement, rather than for each search)."""


@dataclass(frozen=True, slots=True)
class Row:
    resource_type: str
    id: str
    body: str


@dataclass(slots=True)
class SearchPage:
    matches: list[Row]
    included: list[Row]
    total: int | None
    next_cursor: str | None


# --- parsing ------------------------------------------------------------------------------------


def parse_search(
    resource_type: str,
    params: Sequence[tuple[str, str]],
    *,
    base: str,
    strict: bool,
    filters_only: bool = False,
) -> SearchQuery:
    """Parse search parameters for `resource_type`.

    Unknown or unsupported parameters raise SearchError when `strict`, and are otherwise left out
    and listed in `ignored`. With `filters_only` (conditional interactions) result parameters
    are not allowed.
    """
    query = SearchQuery(resource_type=resource_type, base=base)
    # Every condition probes its index per candidate (EXISTS) but one: the likeliest most
    # selective parameter is the set the candidates come from (IN), so neither database scans
    # every resource of the type or collects every id a broad parameter (a date, a common code)
    # matches. It is chosen before the conditions are built, each built once.
    ranked = sorted(
        (rank, n)
        for n, (name, value) in enumerate(params)
        if not is_result_parameter(name) and name not in IGNORED_QUIETLY
        for rank in [_selectivity(resource_type, name, value)]
        if rank is not None
    )
    drivers = [n for _, n in ranked]
    driving = drivers.pop(0) if drivers else None
    # The probes go inside the driver's sub-select, on its index rows: a candidate's resource row
    # is read only once every index says it matches. A probe of the driver's own table takes an
    # alias, so it cannot correlate with the driver's rows.
    taken = None if driving is None else _index_table(resource_type, params[driving][0])
    built: list[ColumnElement[bool] | _Probe] = []
    driver: ColumnElement[bool] | _Probe | None = None
    terms = 0
    for n, (name, value) in enumerate(params):
        try:
            if name in IGNORED_QUIETLY:
                continue
            if is_result_parameter(name):
                if filters_only:
                    raise SearchError(name, "is not allowed in conditional criteria")
                _result_parameter(query, name, value)
            else:
                # Beyond these a search is refused, whatever the handling: leaving out one of its
                # filters would answer more than was asked for.
                if len(built) >= MAX_FILTERS:
                    raise _too_costly(name, f"is more than the {MAX_FILTERS} filters taken")
                if name != "_id":
                    terms += len(_split(value, ","))
                    if terms > MAX_VALUES:
                        raise _too_costly(
                            name, f"makes more than the {MAX_VALUES} values a search takes"
                        )
                found = _criterion(
                    resource_type,
                    name,
                    value,
                    base=base,
                    subject=resources.c.id,
                    taken=None if n == driving else taken,
                )
                built.append(found)
                if n == driving:
                    driver = found
            if name in SINGLE_VALUED:  # the last one given is the one applied
                query.applied = [item for item in query.applied if item[0] != name]
            if name == "_count":  # as applied: a count over the maximum is the maximum
                query.applied.append((name, str(query.count)))
            elif name != "_page":
                query.applied.append((name, value))
        except SearchError as error:
            if strict or name == "_page":
                raise
            query.ignored.append((name, error.diagnostics))
            if n == driving:  # left out: the next likeliest drives (it has not been built yet,
                # or was built as a probe, which stays correct, only slower)
                later = [d for d in drivers if d > n]
                driving = later[0] if later else None
    query.conditions = _assemble(built, driver)
    # One condition, the driver's, holding every other: the candidates come from an equality
    # lookup and the rest is probes of each. The best plan is that whatever the values.
    query.fixed_plan = isinstance(driver, _Probe) and driver.exact and len(query.conditions) == 1
    return query


def _assemble(
    built: list[ColumnElement[bool] | _Probe], driver: ColumnElement[bool] | _Probe | None
) -> list[ColumnElement[bool]]:
    """The conditions on the searched resources: the driver's sub-select holding the probes it
    can hold (those of other tables), every other condition beside it."""
    if not isinstance(driver, _Probe):  # no driver, or `_id`: probes on the resources' ids
        return [c.on(resources.c.id) if isinstance(c, _Probe) else c for c in built]
    own = driver.table
    inner = [c for c in built if isinstance(c, _Probe) and c is not driver and c.table is not own]
    candidates = driver.rows.where(*_probes(inner, own.c.resource_id))
    conditions: list[ColumnElement[bool]] = []
    for c in built:
        if c is driver:
            conditions.append(resources.c.id.in_(candidates))
        elif not isinstance(c, _Probe):
            conditions.append(c)
        elif not any(c is probe for probe in inner):
            conditions.append(c.on(resources.c.id))
    return conditions


def _probes(probes: list[_Probe], subject: ColumnElement[str]) -> list[ColumnElement[bool]]:
    """The probes of each candidate `subject`, in the order they likely narrow the candidates
    (most first, `:not` last): each nested in the one before it, so it is made only of the
    candidates that one passed (a database orders ANDed conditions as it estimates their cost,
    and estimates them alike). A probe of a table already in the chain goes beside it instead:
    a nested sub-select on the same table would correlate with the enclosing one."""
    ordered = sorted(probes, key=lambda probe: (probe.negate, probe.rank))
    chain: list[_Probe] = []
    beside: list[_Probe] = []
    for probe in ordered:
        # (A chain as deep as the parameters are many would be as deep a statement: the
        # databases' parsers and SQLAlchemy's compiler stop at some depth.)
        nests = len(chain) < _MAX_NESTED and not any(probe.table is link.table for link in chain)
        (chain if nests and not (chain and chain[-1].negate) else beside).append(probe)
    # Negated probes hold nothing: after the first, each goes beside the chain. Each probe in
    # the chain is of the id of the one around it (a sub-select correlates with the one
    # directly around it), the same candidate's.
    nested: list[ColumnElement[bool]] = []
    for at in range(len(chain) - 1, -1, -1):
        around = subject if at == 0 else chain[at - 1].table.c.resource_id
        nested = [chain[at].fenced(around, *nested)]
    return [*nested, *(probe.fenced(subject) for probe in beside)]


_MAX_NESTED: Final = 6
"""Probes nested in one another at most; the others go beside them."""


def _index_table(resource_type: str, name: str) -> FromClause | None:
    """The index table parameter `name` (one that can drive) searches; None for `_id`."""
    code = name.partition(":")[0]
    found = None if code == "_id" else definitions().parameter(resource_type, code)
    return None if found is None else _TABLES.get(found.type)


_SELECTIVITY: Final = {
    "reference": 1,
    "token": 2,
    "composite": 2,
    "uri": 3,
    "string": 3,
    "quantity": 4,
    "date": 4,
}


def _selectivity(resource_type: str, name: str, value: str) -> int | None:
    """How few resources a parameter likely matches (lower is fewer); None: it cannot drive."""
    code, _, modifier = name.partition(":")
    if name.startswith("_has:") or "." in name or modifier in ("not", "missing"):
        return None
    if code == "_id":
        return 0
    if code == "_lastUpdated":
        return None
    found = definitions().parameter(resource_type, code)
    return None if found is None else _SELECTIVITY.get(found.type)


def is_result_parameter(name: str) -> bool:
    """Whether `name` controls the results rather than filters them (`_include:iterate` too)."""
    if name in RESULT_PARAMETERS:
        return True
    base, _, modifier = name.partition(":")
    return bool(modifier) and base in ("_include", "_revinclude")


def _result_parameter(query: SearchQuery, name: str, value: str) -> None:
    if name == "_count":
        if not (value.isascii() and value.isdigit()):  # str.isdigit: superscripts too
            raise SearchError(name, f"{value!r} is not a non-negative integer")
        query.count = min(int(value), MAX_COUNT)
    elif name == "_sort":
        # Given again, its keys come after those given before (`_sort=a&_sort=b` is `a,b`).
        query.sort += [_sort_key(query.resource_type, item) for item in value.split(",") if item]
    elif name.partition(":")[0] in ("_include", "_revinclude"):
        query.includes.append(_include(query.resource_type, name, value))
    elif name == "_summary":
        if value not in SUMMARY_MODES:
            raise SearchError(name, f"{value!r} is not supported (use {', '.join(SUMMARY_MODES)})")
        query.summary = None if value == "false" else value
    elif name == "_elements":
        query.elements = tuple(item.strip() for item in value.split(",") if item.strip())
    elif name == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise SearchError(name, f"{value!r} is not none, estimate or accurate")
        query.total = value
    elif name == "_page":
        query.after = _decode_cursor(value)


def _parameter(resource_type: str, code: str) -> SearchParameter:
    found = definitions().parameter(resource_type, code)
    if found is None:
        raise SearchError(code, f"is not a search parameter of {resource_type}")
    return found


def _sort_key(resource_type: str, item: str) -> SortKey:
    descending = item.startswith("-")
    code = item.removeprefix("-")
    if code == "_id":
        return SortKey(code, descending, "id")
    if code == "_lastUpdated":
        return SortKey(code, descending, "lastUpdated")
    parameter = _parameter(resource_type, code)
    if parameter.type not in ("string", "token", "uri", "date", "quantity"):
        raise SearchError("_sort", f"cannot sort by {parameter.type} parameter {code}")
    return SortKey(code, descending, parameter.type)


def _include(resource_type: str, name: str, value: str) -> Include:
    """`_include` / `_revinclude` (`:iterate`, or `:recurse`, on the name or, as this server
    also reads it, at the end of the value): `Type:parameter[:targetType]`, where `parameter`
    may be `*` (every reference parameter of `Type`), or `*` alone (of the searched type; with
    `:iterate`, or reversed, of any type)."""
    kind, _, modifier = name.partition(":")
    if modifier and modifier not in INCLUDE_MODIFIERS:
        raise SearchError(name, f"modifier :{modifier} is not supported on {kind}")
    iterate = bool(modifier)
    if value.endswith(":iterate") or value.endswith(":recurse"):
        iterate = True
        value = value.rsplit(":", 1)[0]
    reverse = kind == "_revinclude"
    if value == WILDCARD:
        any_type = reverse or iterate
        return Include(WILDCARD if any_type else resource_type, WILDCARD, None, iterate, reverse)
    parts = value.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise SearchError(name, f"{value!r} is not Type:parameter[:targetType]")
    source_type, param = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    if not reverse and source_type != resource_type and not iterate:
        raise SearchError(name, f"{source_type} is not the searched type {resource_type}")
    if param == WILDCARD:
        targets = {
            t
            for p in definitions().by_type.get(source_type, {}).values()
            if p.type == "reference"
            for t in p.targets
        }
        if not targets:
            raise SearchError(name, f"{source_type} has no reference parameters")
        if target is not None and target not in targets:
            raise SearchError(name, f"no reference parameter of {source_type} refers to {target}")
        return Include(source_type, WILDCARD, target, iterate, reverse)
    parameter = _parameter(source_type, param)
    if parameter.type != "reference":
        raise SearchError(name, f"{source_type}.{param} is not a reference parameter")
    if target is not None and parameter.targets and target not in parameter.targets:
        raise SearchError(name, f"{source_type}.{param} cannot refer to {target}")
    return Include(source_type, param, target, iterate, reverse)


@dataclass(frozen=True, slots=True, eq=False)
class _Probe:
    """An index condition before it is tied to the ids it filters: `rows` selects the
    `resource_id` of `table`'s rows that match (`negate`: none may, for `:not`)."""

    table: FromClause
    rows: Select[Any]
    negate: bool
    exact: bool
    """The rows are found by equality (a reference, a code, an exact string), not a range."""
    rank: int
    """How few resources it likely matches (`_SELECTIVITY`: lower is fewer)."""

    def on(self, subject: ColumnElement[str]) -> ColumnElement[bool]:
        """Whether `subject` has (or, negated, has no) matching index row."""
        probe = self.rows.where(self.table.c.resource_id == subject).exists()
        return not_(probe) if self.negate else probe

    def fenced(
        self, subject: ColumnElement[str], *then: ColumnElement[bool]
    ) -> ColumnElement[bool]:
        """`on`, kept a probe of each candidate: PostgreSQL does not flatten an EXISTS with an
        OFFSET into a join, so its plan cannot start from this (likely broader) parameter's rows
        or read a candidate's resource row before every probe has passed, whatever the values.
        `then`: the probes to make (inside this one) only of the candidates this one passes."""
        rows = self.rows.where(self.table.c.resource_id == subject, *then)
        probe = rows.offset(_NO_OFFSET).exists()
        return not_(probe) if self.negate else probe


_NO_OFFSET: Final = literal_column("0", Integer)


def _condition(
    resource_type: str,
    name: str,
    value: str,
    *,
    base: str,
    subject: ColumnElement[str],
) -> ColumnElement[bool]:
    """The condition one parameter puts on `subject`, the column of the ids being searched.

    Every index table is used through its own alias, so the sub-selects of chains and `_has`
    (which search the same tables again) never correlate with an enclosing one. An index
    condition is an EXISTS probing the index rows of each candidate.
    """
    found = _criterion(resource_type, name, value, base=base, subject=subject)
    return found.on(subject) if isinstance(found, _Probe) else found


def _criterion(
    resource_type: str,
    name: str,
    value: str,
    *,
    base: str,
    subject: ColumnElement[str],
    taken: FromClause | None = None,
) -> ColumnElement[bool] | _Probe:
    """`_condition`, but an index value condition is returned as its `_Probe` (so the search can
    drive from it or nest it), on an alias of its table when that is `taken`."""
    if name.startswith("_has:"):
        return _has(resource_type, name, value, base=base, subject=subject)
    code, _, modifier = name.partition(":")
    chain: str | None = None
    if "." in code:
        code, chain = code.split(".", 1)
    elif "." in modifier:
        modifier, chain = modifier.split(".", 1)
    if code == "_id":
        if modifier and modifier != "not":
            raise SearchError(name, f"modifier :{modifier} is not supported on _id")
        matched = subject.in_(_values(value, name))
        return not_(matched) if modifier == "not" else matched
    if code == "_lastUpdated":
        if modifier:
            raise SearchError(name, f"modifier :{modifier} is not supported on _lastUpdated")
        top = subject is resources.c.id
        own = resources if top else resources.alias()
        when = or_(
            *(
                _date_match(item, own.c.last_updated, own.c.last_updated, name)
                for item in _values(value, name)
            )
        )
        if top:
            return when  # the searched resources' own column
        return subject.in_(
            select(own.c.id).where(
                own.c.resource_type == resource_type, own.c.deleted.is_(false()), when
            )
        )
    parameter = _parameter(resource_type, code)
    if chain is not None:
        return _chained(
            resource_type, parameter, modifier or None, chain, value, name, base, subject
        )
    shared = _TABLES.get(parameter.type)
    if shared is None:
        raise SearchError(name, f"{parameter.type} parameters are not supported")
    # Aliases only where a sub-select nests in another over the same table (chains, _has):
    # building an alias's column collection costs more than the rest of the condition.
    table = shared if subject is resources.c.id and shared is not taken else shared.alias()
    target_type: str | None = None
    if modifier and modifier not in _MODIFIERS[parameter.type]:
        if parameter.type == "reference" and modifier in parameter.targets:
            target_type = modifier
        else:
            raise SearchError(name, f"modifier :{modifier} is not supported on {parameter.type}")
    owned = _owned(table, resource_type, parameter)
    if modifier == "missing":
        if value not in ("true", "false"):
            raise SearchError(name, "takes true or false")
        present = owned.where(table.c.resource_id == subject).exists()
        return not_(present) if value == "true" else present
    if parameter.type == "composite":  # its values' escapes (`\$`) matter after the split
        matches = [_composite_match(table, parameter, item, name) for item in _split(value, ",")]
    else:
        # A token's `\|` is a literal bar, so its values keep their escapes until it is split.
        escaped = parameter.type == "token" and modifier != "text"
        matches = [
            _value_match(table, parameter, modifier or None, target_type, item, name, base)
            for item in _values(value, name, escaped=escaped)
        ]
    exact = parameter.type in ("reference", "token", "composite", "uri") or modifier == "exact"
    exact = exact and modifier not in ("text", "below")
    rank = _SELECTIVITY.get(parameter.type, len(_SELECTIVITY))
    return _Probe(table, owned.where(or_(*matches)), modifier == "not", exact, rank)


_OWNED: dict[tuple[FromClause, str, str], Select[Any]] = {}
"""`_owned` of the shared index tables, by table, resource type and parameter code."""


def _owned(table: FromClause, resource_type: str, parameter: SearchParameter) -> Select[Any]:
    """The ids of `table`'s rows of `resource_type` that answer `parameter`, whatever their
    values: the sub-select each of its conditions narrows. The same for every search, so built
    once per parameter on a shared table (statements are immutable: each search adds to a copy)."""
    key = (table, resource_type, parameter.code)
    found = _OWNED.get(key)
    if found is not None:
        return found
    if parameter.components:
        sources = composite_sources(resource_type, parameter.code)
        rows_of = table.c.param == sources[0] if len(sources) == 1 else table.c.param.in_(sources)
    else:
        rows_of = rows_answering(table, resource_type, parameter.code)
    owned = select(table.c.resource_id).where(table.c.resource_type == resource_type, rows_of)
    if any(table is shared for shared in _TABLES.values()):  # not an alias (one per use)
        _OWNED[key] = owned
    return owned


def _values(value: str, name: str, *, escaped: bool = False) -> list[str]:
    """Comma-separated values (OR); `\\,` is a literal comma. `escaped`: each value as given,
    its escapes kept (for a syntax with separators of its own, `system|code`)."""
    items = _split(value, ",")
    plain = [_unescape(item) for item in items]
    if any(item == "" for item in plain):
        raise SearchError(name, "has an empty value")
    return items if escaped else plain


def _split(value: str, separator: str) -> list[str]:
    """`value` split on `separator` where it is not escaped (`\\,`, `\\$`); escapes are kept."""
    items, start, escaped = [], 0, False
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            items.append(value[start:index])
            start = index + 1
    items.append(value[start:])
    return items


def _unescape(value: str) -> str:
    out, escaped = [], False
    for char in value:
        if escaped or char != "\\":
            out.append(char)
            escaped = False
        else:
            escaped = True
    return "".join(out)


def _value_match(
    t: FromClause,
    parameter: SearchParameter,
    modifier: str | None,
    target_type: str | None,
    value: str,
    name: str,
    base: str,
) -> ColumnElement[bool]:
    kind = parameter.type
    if kind == "string":
        if modifier == "exact":
            return t.c.exact == value
        folded = normalize(value)
        if modifier == "contains":
            return t.c.value.like(f"%{_escape_like(folded)}%", escape="\\")
        return _prefix(t.c.value, folded)
    if kind == "uri":
        if modifier == "below":
            return _prefix(t.c.code, value)
        if "|" in value:  # a canonical with its version: that version
            return t.c.code == value
        # A canonical without one: any version of it, or none (`meta.profile` may name one).
        return or_(t.c.code == value, _prefix(t.c.code, value + "|"))
    if kind == "token":
        if modifier == "text":
            return _prefix(t.c.text, normalize(value))
        return _token_match(t.c.system, t.c.code, value)
    if kind == "date":
        return _date_match(value, t.c.low, t.c.high, name)
    if kind == "quantity":
        return _quantity_match(t.c.value, t.c.system, t.c.code, value, name)
    return _reference_match(t, parameter, target_type, value, name, base)


def _prefix(column: Any, text: str) -> ColumnElement[bool]:
    # A range, not LIKE: it uses the index on both databases (byte-wise collation).
    return and_(column >= text, column < text + _STRING_MAX)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _token_match(
    system_column: ColumnElement[Any], code_column: ColumnElement[Any], value: str
) -> ColumnElement[bool]:
    """`code`, `system|code`, `|code` or `system|`, from a value with its escapes: `\\|` is a
    bar in the system or code, not the one between them."""
    parts = _split(value, "|")
    if len(parts) == 1:
        return code_column == _unescape(value)
    system, code = _unescape(parts[0]), _unescape("|".join(parts[1:]))
    if system == "":
        return and_(system_column.is_(None), code_column == code)
    if code == "":
        return system_column == system
    return and_(system_column == system, code_column == code)


def _composite_match(
    t: FromClause, parameter: SearchParameter, value: str, name: str
) -> ColumnElement[bool]:
    """One composite value (`http://loinc.org|8480-6$gt100`): every part on the same row, each
    part in its own type's syntax."""
    if value == "":
        raise SearchError(name, "has an empty value")
    parts = _split(value, "$")  # escapes kept: a token part's `\|` is split on after
    if len(parts) != len(parameter.components):
        raise SearchError(
            name, f"{value!r} is not {len(parameter.components)} values separated by $"
        )
    if any(_unescape(part) == "" for part in parts):
        raise SearchError(name, f"{value!r} has an empty part")
    first, second = parts
    kind = parameter.components[1].type
    if kind != "token":
        second = _unescape(second)
    if kind == "token":
        other = _token_match(t.c.value_system, t.c.value_code, second)
    elif kind == "quantity":
        other = _quantity_match(t.c.value_number, t.c.value_system, t.c.value_code, second, name)
    elif kind == "date":
        other = _date_match(second, t.c.value_low, t.c.value_high, name)
    else:
        other = _prefix(t.c.value_text, normalize(second))
    return and_(_token_match(t.c.system, t.c.code, first), other)


def _split_prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in PREFIXES and (value[2].isdigit() or value[2] == "-"):
        return value[:2], value[2:]
    return "eq", value


_PLUS_AS_SPACE: Final = re.compile(r"^(\d{4}-\d{2}-\d{2}T[\d:.]+) (\d{2}:\d{2})$", re.ASCII)


def _date_match(
    value: str, low: ColumnElement[datetime], high: ColumnElement[datetime], name: str
) -> ColumnElement[bool]:
    """R4 date search: the search value's range against the resource value's range."""
    prefix, text = _split_prefix(value)
    if " " in text:
        # `+02:00` sent unencoded in a query string arrives as ` 02:00` (`+` is a space there).
        text = _PLUS_AS_SPACE.sub(r"\1+\2", text)
    try:
        start, end = date_range(text)
    except (ValueError, OverflowError):
        raise SearchError(name, f"{text!r} is not a date, dateTime or instant") from None
    if prefix == "eq":
        return and_(low >= start, high <= end)
    if prefix == "ne":
        return not_(and_(low >= start, high <= end))
    if prefix == "gt":
        return high > end
    if prefix == "lt":
        return low < start
    if prefix == "ge":
        return or_(high > end, and_(low >= start, high <= end))
    if prefix == "le":
        return or_(low < start, and_(low >= start, high <= end))
    if prefix == "sa":
        return low > end
    if prefix == "eb":
        return high < start
    # ap: the ranges overlap once the search range is widened by 10% of its distance from now.
    now = datetime.now(UTC)
    gap = max(abs(now - start), abs(now - end)) / 10
    gap = max(gap, timedelta(days=1))
    wide_start = max(start - gap, MIN_DATE) if start - MIN_DATE > gap else MIN_DATE
    wide_end = end + gap if MAX_DATE - end > gap else MAX_DATE
    return and_(low <= wide_end, high >= wide_start)


def _quantity_match(
    column: ColumnElement[Any],
    system_column: ColumnElement[Any],
    code_column: ColumnElement[Any],
    value: str,
    name: str,
) -> ColumnElement[bool]:
    prefix, text = _split_prefix(value)
    number_text, _, unit = text.partition("|")
    try:
        number, low, high = quantity_number(number_text)
    except ValueError as error:
        raise SearchError(name, str(error)) from None
    exact, lo, hi = float(number), float(low), float(high)
    comparisons: dict[str, ColumnElement[bool]] = {
        "eq": and_(column >= lo, column < hi),
        "ne": or_(column < lo, column >= hi),
        "gt": column > exact,
        "lt": column < exact,
        "ge": column >= exact,
        "le": column <= exact,
        # starts after / ends before: outside the search value's range, above / below it
        "sa": column >= hi,
        "eb": column < lo,
    }
    if prefix == "ap":
        spread = abs(exact) / 10
        comparison = and_(column >= exact - spread, column <= exact + spread)
    else:
        comparison = comparisons[prefix]
    if unit:
        system, _, code = unit.partition("|")
        if code:
            unit_match = code_column == code
            if system:
                unit_match = and_(system_column == system, unit_match)
        else:
            unit_match = code_column == system  # `value||code` was split as `|code`
        comparison = and_(comparison, unit_match)
    return comparison


def _reference_match(
    t: FromClause,
    parameter: SearchParameter,
    target_type: str | None,
    value: str,
    name: str,
    base: str,
) -> ColumnElement[bool]:
    column_id = t.c.target_id
    if value.startswith(base + "/"):
        value = value.removeprefix(base + "/")
    if "://" in value or value.startswith("urn:"):
        canonical = value.split("|")[0]
        return t.c.url == canonical
    if "/" in value:
        kind, resource_id, url = parse_reference(value)
        if kind is None or resource_id is None or url is not None:
            raise SearchError(name, f"{value!r} is not Type/id, an id or a URL")
        if target_type is not None and kind != target_type:
            raise SearchError(name, f"{value!r} is not a {target_type}")
        return _on_this_server(t, base, kind, resource_id)
    if target_type is not None:
        return _on_this_server(t, base, target_type, value)
    if len(parameter.targets) == 1:
        return _on_this_server(t, base, parameter.targets[0], value)
    return and_(column_id == value, local_targets(t, base))


def _on_this_server(t: FromClause, base: str, kind: str, resource_id: str) -> ColumnElement[bool]:
    """References to `kind/resource_id` of this server: relative, or absolute under `base`
    (another server's `.../Patient/1` is not this server's `Patient/1`)."""
    return and_(
        t.c.target_type == kind,
        t.c.target_id == resource_id,
        or_(t.c.url.is_(None), t.c.url == f"{base}/{kind}/{resource_id}"),
    )


def local_targets(t: FromClause, base: str) -> ColumnElement[bool]:
    """The reference rows of `t` whose target is a resource of this server: a relative
    reference (no URL), or an absolute one under `base`. A row's target type and id are read
    from any URL of the `Type/id` shape, another server's too, and name no resource here."""
    here = literal(base + "/", String) + t.c.target_type + literal("/", String) + t.c.target_id
    return or_(t.c.url.is_(None), t.c.url == here)


def _chained(
    resource_type: str,
    parameter: SearchParameter,
    target_type: str | None,
    chain: str,
    value: str,
    name: str,
    base: str,
    subject: ColumnElement[str],
) -> ColumnElement[bool]:
    """`subject:Patient.identifier=...`: one level of chaining through the reference index."""
    if parameter.type != "reference":
        raise SearchError(name, f"{parameter.code} is not a reference parameter: cannot chain")
    if "." in chain:
        raise SearchError(name, "only one level of chaining is supported")
    targets = [target_type] if target_type else list(parameter.targets)
    if target_type is not None and parameter.targets and target_type not in parameter.targets:
        raise SearchError(name, f"{parameter.code} cannot refer to {target_type}")
    usable = [t for t in targets if definitions().parameter(t, chain.split(":")[0]) is not None]
    if not usable:
        raise SearchError(name, f"no target of {parameter.code} has a parameter {chain}")
    if len(usable) > 1 and target_type is None:
        raise SearchError(
            name, f"{parameter.code} may refer to {', '.join(usable)}: name one ({name}:Type)"
        )
    refs = search_reference.alias()
    branches = []
    for target in usable:
        own = resources.alias()
        inner = _condition(target, chain, value, base=base, subject=own.c.id)
        target_ids = select(own.c.id).where(
            own.c.resource_type == target, own.c.deleted.is_(false()), inner
        )
        branches.append(and_(refs.c.target_type == target, refs.c.target_id.in_(target_ids)))
    referring = select(refs.c.resource_id).where(
        refs.c.resource_type == resource_type,
        rows_answering(refs, resource_type, parameter.code),
        or_(*branches),
        local_targets(refs, base),
    )
    return subject.in_(referring)


def _has(
    resource_type: str, name: str, value: str, *, base: str, subject: ColumnElement[str]
) -> ColumnElement[bool]:
    """`_has:Observation:patient:code=...`: resources another type refers to, by its criteria."""
    parts = name.split(":", 3)
    if len(parts) != 4 or not all(parts[1:]):
        raise SearchError(name, "is not _has:Type:reference:parameter")
    _, source_type, reference, criterion = parts
    if criterion.startswith("_has:"):
        raise SearchError(name, "nested _has is not supported")
    parameter = _parameter(source_type, reference)
    if parameter.type != "reference":
        raise SearchError(name, f"{source_type}.{reference} is not a reference parameter")
    if parameter.targets and resource_type not in parameter.targets:
        raise SearchError(name, f"{source_type}.{reference} cannot refer to {resource_type}")
    own = resources.alias()
    inner = _condition(source_type, criterion, value, base=base, subject=own.c.id)
    sources = select(own.c.id).where(
        own.c.resource_type == source_type, own.c.deleted.is_(false()), inner
    )
    refs = search_reference.alias()
    targets = select(refs.c.target_id).where(
        refs.c.resource_type == source_type,
        rows_answering(refs, source_type, reference),
        refs.c.target_type == resource_type,
        refs.c.resource_id.in_(sources),
        local_targets(refs, base),
    )
    return subject.in_(targets)


# --- cursors ------------------------------------------------------------------------------------


def _encode_cursor(values: list[Any], last_id: str) -> str:
    encoded = [v.isoformat() if isinstance(v, datetime) else v for v in values]
    raw = orjson.dumps([encoded, last_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(token: str) -> tuple[list[Any], str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        values, last_id = orjson.loads(raw)
        if not isinstance(values, list) or not isinstance(last_id, str):
            raise ValueError
        return values, last_id
    except (binascii.Error, ValueError, TypeError, orjson.JSONDecodeError):
        raise SearchError("_page", "is not a page token this server issued") from None


# --- running ------------------------------------------------------------------------------------


def rows_answering(table: Any, resource_type: str, code: str) -> ColumnElement[bool]:
    """The condition on `table`'s rows of `resource_type` that answer parameter `code`: its own
    rows, or for an alias (`patient` on Observation) those of its sources, narrowed to the
    alias's target type."""
    source = index_source(resource_type, code)
    params = source.params
    condition: ColumnElement[bool] = (
        table.c.param == params[0] if len(params) == 1 else table.c.param.in_(params)
    )
    if source.target_type is not None:
        condition = and_(condition, table.c.target_type == source.target_type)
    return condition


def _sort_column(key: SortKey, resource_type: str) -> ColumnElement[Any]:
    """The value a resource sorts by for `key`, nulls (no value) last in either direction."""
    if key.kind == "id":
        return resources.c.id
    if key.kind == "lastUpdated":
        return resources.c.last_updated
    table = _TABLES[key.kind]
    if key.kind == "date":
        value = table.c.high if key.descending else table.c.low
        missing: Any = literal(MIN_DATE if key.descending else MAX_DATE, UtcDateTime)
    elif key.kind == "quantity":
        value = table.c.value
        missing = literal(-1e308 if key.descending else 1e308)
    else:
        value = table.c.value if key.kind == "string" else table.c.code
        missing = literal("" if key.descending else _STRING_MAX)
    aggregate = func.max(value) if key.descending else func.min(value)
    scalar: ScalarSelect[Any] = (
        select(aggregate)
        .where(
            table.c.resource_type == resource_type,
            table.c.resource_id == resources.c.id,
            rows_answering(table, resource_type, key.code),
        )
        .scalar_subquery()
    )
    return func.coalesce(scalar, missing)


def _after(
    columns: list[tuple[ColumnElement[Any], SortKey]], values: list[Any], last_id: str
) -> ColumnElement[bool]:
    """Rows strictly after the cursor in the order (sort keys..., id)."""
    if len(values) != len(columns):
        raise SearchError("_page", "does not belong to this search")
    decoded = []
    for (_, key), value in zip(columns, values, strict=True):
        if key.kind in ("date", "lastUpdated") and isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                raise SearchError("_page", "is not a page token this server issued") from None
        decoded.append(value)
    branches: list[ColumnElement[bool]] = []
    equal: list[ColumnElement[bool]] = []
    for (column, key), value in zip(columns, decoded, strict=True):
        beyond = column < value if key.descending else column > value
        branches.append(and_(*equal, beyond))
        equal.append(column == value)
    branches.append(and_(*equal, resources.c.id > last_id))
    return or_(*branches)


def _base_query(query: SearchQuery) -> Select[Any]:
    return select(resources.c.id).where(
        resources.c.resource_type == query.resource_type,
        resources.c.deleted.is_(false()),
        *query.conditions,
    )


def matching_ids(
    connection: Connection,
    resource_type: str,
    params: Sequence[tuple[str, str]],
    *,
    base: str,
    limit: int = 2,
) -> list[str]:
    """Ids of current resources matching the criteria of a conditional interaction.

    Parsed strictly: an unknown parameter is an error, not a match of everything. At most
    `limit` ids (a conditional interaction only needs to tell none, one and several apart).
    """
    if not params:
        raise FhirError(400, "invalid", "conditional criteria are empty")
    query = parse_search(resource_type, params, base=base, strict=True, filters_only=True)
    statement = _base_query(query).order_by(resources.c.id).limit(limit)
    return [row.id for row in connection.execute(statement)]


def run_search(connection: Connection, query: SearchQuery) -> SearchPage:
    """One page of matches, with their includes, total (when asked or free) and next cursor."""
    total: int | None = None
    # `_count=0` asks for the total alone (clients count that way), as `_summary=count` does.
    if query.summary == "count" or query.total == "accurate" or query.count == 0:
        filtered = _base_query(query)
        total = connection.execute(
            select(func.count()).select_from(filtered.subquery())
        ).scalar_one()
    if query.summary == "count" or query.count == 0:
        return SearchPage([], [], total, None)
    page = page_of(query, connection.execute(page_statement(query)).all(), total=total)
    if query.includes:
        page.included = _included(connection, query.includes, page.matches, base=query.base)
    return page


def one_statement(query: SearchQuery) -> bool:
    """Whether `run_search` answers `query` with its page statement alone (no total to count,
    no includes to follow): then `page_of` the rows of `page_statement` is the whole search."""
    return (
        not query.includes
        and query.summary != "count"
        and query.total != "accurate"
        and query.count != 0
    )


def page_statement(query: SearchQuery) -> Select[Any]:
    """The page's rows, and one more to tell whether a next page follows: resource type, id and
    stored body of each match, then its sort values, in the sort order."""
    keys = [(_sort_column(key, query.resource_type), key) for key in query.sort]
    labelled = [column.label(f"sort_{index}") for index, (column, _) in enumerate(keys)]
    statement = select(
        resources.c.resource_type, resources.c.id, resources.c.body, *labelled
    ).where(*_current(query.resource_type), *query.conditions)
    if query.after is not None:
        statement = statement.where(_after(keys, *query.after))
    order = [column.desc() if key.descending else column.asc() for column, key in keys]
    return statement.order_by(*order, resources.c.id).limit(query.count + 1)


_CURRENT: dict[str, tuple[ColumnElement[bool], ...]] = {}


def _current(resource_type: str) -> tuple[ColumnElement[bool], ...]:
    """The conditions on `resources` a search of `resource_type` starts from (built once)."""
    found = _CURRENT.get(resource_type)
    if found is None:
        found = (resources.c.resource_type == resource_type, resources.c.deleted.is_(false()))
        if len(_CURRENT) < 1000:  # the stored types, or whatever a caller searches
            _CURRENT[resource_type] = found
    return found


def page_of(
    query: SearchQuery, rows: Sequence[Sequence[Any]], *, total: int | None = None
) -> SearchPage:
    """The page `page_statement`'s rows make (without includes), and its next cursor."""
    next_cursor = None
    if len(rows) > query.count:
        rows = rows[: query.count]
        last = rows[-1]
        next_cursor = _encode_cursor([last[3 + i] for i in range(len(query.sort))], last[1])
    matches = [Row(row[0], row[1], row[2]) for row in rows]
    if total is None and query.total != "none" and query.after is None and next_cursor is None:
        total = len(matches)  # the whole result is on this page: the total costs nothing
    return SearchPage(matches, [], total, next_cursor)


def _included(
    connection: Connection, includes: Sequence[Include], matches: Sequence[Row], *, base: str
) -> list[Row]:
    seen = {(row.resource_type, row.id) for row in matches}
    included: list[Row] = []
    frontier = list(matches)
    for round_number in range(MAX_ITERATE + 1):
        wanted: set[tuple[str, str]] = set()
        for include in includes:
            if round_number > 0 and not include.iterate:
                continue
            wanted |= _include_keys(connection, include, frontier, base=base)
        fresh = sorted(wanted - seen)[: MAX_INCLUDED - len(included)]
        if not fresh:
            break
        loaded = _load(connection, fresh)
        seen |= set(fresh)
        included += loaded
        frontier = loaded
        if len(included) >= MAX_INCLUDED:
            break
    return included


def _include_keys(
    connection: Connection, include: Include, rows: Sequence[Row], *, base: str
) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    if include.reverse:
        targets = [
            (row.resource_type, row.id)
            for row in rows
            if include.target_type is None or row.resource_type == include.target_type
        ]
        # One statement per target type: its ids are looked up in the lookup index, where SQLite
        # would read every row of the parameter for a list of (type, id) pairs.
        for target_type, target_ids in grouped(targets).items():
            statement = select(
                search_reference.c.resource_type, search_reference.c.resource_id
            ).where(
                *_include_rows(include, include.source_type),
                search_reference.c.target_type == target_type,
                search_reference.c.target_id.in_(target_ids),
                local_targets(search_reference, base),
            )
            found.update((row[0], row[1]) for row in connection.execute(statement))
        return found
    sources = [
        (row.resource_type, row.id)
        for row in rows
        if include.source_type in (WILDCARD, row.resource_type)
    ]
    for source_type, source_ids in grouped(sources).items():
        statement = select(search_reference.c.target_type, search_reference.c.target_id).where(
            *_include_rows(include, source_type),
            search_reference.c.resource_id.in_(source_ids),
            search_reference.c.target_id.is_not(None),
            local_targets(search_reference, base),
            search_reference.c.target_type == include.target_type
            if include.target_type
            else true(),
        )
        found.update((row[0], row[1]) for row in connection.execute(statement) if row[0])
    return found


def _include_rows(include: Include, source_type: str) -> list[ColumnElement[bool]]:
    """The reference rows an include follows from resources of `source_type` (`*`: any):
    its parameter's, or for `*` every reference parameter's (the reference index holds only
    reference parameters' rows)."""
    conditions: list[ColumnElement[bool]] = []
    if source_type != WILDCARD:
        conditions.append(search_reference.c.resource_type == source_type)
        if include.param != WILDCARD:
            conditions.append(rows_answering(search_reference, source_type, include.param))
    return conditions


def _load(connection: Connection, keys: Sequence[tuple[str, str]]) -> list[Row]:
    out: list[Row] = []
    for start in range(0, len(keys), 500):
        chunk = list(keys[start : start + 500])
        statement = (
            select(resources.c.resource_type, resources.c.id, resources.c.body)
            .where(
                pairs_in(resources.c.resource_type, resources.c.id, chunk),
                resources.c.deleted.is_(false()),
            )
            .order_by(resources.c.resource_type, resources.c.id)
        )
        out += [Row(row.resource_type, row.id, row.body) for row in connection.execute(statement)]
    return out


def query_string(params: Sequence[tuple[str, str]]) -> str:
    return urlencode(list(params), safe=":|,/$*")
