"""Index extraction's hot path against its plain definition: every parameter's program run
unbound over the whole resource, its values made into rows by the general value readers.

`extract` binds programs per shape of resource (skipping those whose elements, or meta keys,
are absent) and makes the common values' rows inline; for any input, odd ones included, the rows
must be the same, in the same order, and a failure the same failure."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from service.fhir.search_index import (
    MAX_TEXT,
    IndexRows,
    Node,
    _dates,
    _part,
    _quantity,
    _reference,
    _strings,
    _tokens,
    composite_plans,
    cut,
    extract,
    normalize,
    programs,
)


def _text(value: Any) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def _add(rows: IndexRows, kind: str, code: str, nodes: list[Node]) -> None:
    for key, value in nodes:
        if kind == "string":
            rows.strings += [(code, normalize(text), text[:MAX_TEXT]) for text in _strings(value)]
        elif kind == "token":
            rows.tokens += [(code, _text(s), _text(t), f) for s, t, f in _tokens(value, key)]
        elif kind == "uri" and isinstance(value, str):
            rows.tokens.append((code, None, value[:MAX_TEXT], None))
        elif kind == "date":
            rows.dates += [(code, low, high) for low, high in _dates(value, key)]
        elif kind == "reference":
            target = _reference(value)
            if target is not None:
                rows.references.append((code, target[0], target[1], cut(target[2])))
        elif kind == "quantity":
            quantity = _quantity(value)
            if quantity is not None:
                rows.quantities.append((code, *quantity))


def _values(compiled: Any, element: dict[str, Any]) -> list[Any]:
    return [
        v for key, node in compiled.program.nodes(element) for v in _part(compiled.type, node, key)
    ]


def plainly(resource: dict[str, Any]) -> IndexRows:
    """The rows by definition: no binding, no shortcut."""
    rows = IndexRows()
    resource_type = resource["resourceType"]
    for parameter, program in programs(resource_type):
        _add(rows, parameter.type, parameter.code, program.nodes(resource))
    for plan in composite_plans(resource_type):
        for _, element in plan.elements.nodes(resource):
            if not isinstance(element, dict):
                continue
            for code, first, second in plan.composites:
                values = _values(second, element)
                if values:
                    tokens = list(dict.fromkeys(_values(first, element)))
                    rows.composites += [(code, t[0], t[1], *v) for t in tokens for v in values]
    return rows


def _outcome(function: Any, resource: dict[str, Any]) -> Any:
    try:
        return function(resource)
    except Exception as error:  # the failure is what is compared
        return type(error), str(error)


texts = st.sampled_from(
    ["Body weight", "ÅNGSTRÖM  é", "ﬁne", "İstanbul", "straße", " a\tB ", "", "x" * 300, "日本"]
)
dates = st.sampled_from(
    [
        "2026",
        "2026-02",
        "2024-02-29",
        "2023-02-29",
        "2026-06-08T11:38",
        "2026-06-08T11:38:00-04:00",
        "2026-06-08T11:38:00.123456789Z",
        "2026-06-08T23:59:60+14:00",
        "9999-12-31T23:59:59-05:00",
        "0001-01-01T00:00:00+01:00",
        " 2026-01-01 ",
        "2026-13",
        "soon",
    ]
)
references = st.sampled_from(
    [
        "Patient/1",
        "urn:uuid:0f1e2d3c-0000-4000-8000-000000000000",
        "http://example.org/fhir/Observation/9/_history/2",
        "#contained",
        "Patient",
        "",
        "http://example.org/ValueSet/a|1.0",
        "Patient/" + "a" * 70,
    ]
)
odd = st.sampled_from([None, 0, 1.5, True, False, "s", [], {}, [None]])
scalars = st.one_of(texts, dates, references, odd, st.integers(-5, 5), st.floats(-1e3, 1e3))
codings = st.fixed_dictionaries(
    {},
    optional={
        "system": st.one_of(texts, odd),
        "code": st.one_of(texts, odd),
        "display": st.one_of(texts, odd),
    },
)
concepts = st.fixed_dictionaries(
    {},
    optional={
        "coding": st.one_of(st.lists(st.one_of(codings, odd), max_size=3), odd),
        "text": st.one_of(texts, odd),
    },
)
identifiers = st.fixed_dictionaries(
    {"value": st.one_of(texts, odd)},
    optional={"system": texts, "type": st.one_of(concepts, odd), "code": texts},
)
periods = st.fixed_dictionaries(
    {}, optional={"start": st.one_of(dates, odd), "end": st.one_of(dates, odd)}
)
quantities = st.fixed_dictionaries(
    {},
    optional={
        "value": st.one_of(st.floats(-1e3, 1e3), st.integers(), odd),
        "unit": st.one_of(texts, odd),
        "system": st.one_of(texts, odd),
        "code": st.one_of(texts, odd),
    },
)
reference_values = st.fixed_dictionaries(
    {"reference": st.one_of(references, odd)}, optional={"display": texts}
)
values = st.one_of(scalars, codings, concepts, identifiers, periods, quantities, reference_values)
elements = st.one_of(values, st.lists(values, max_size=3))
components = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "code": concepts,
            "valueQuantity": st.one_of(quantities, odd),
            "valueCodeableConcept": concepts,
            "dataAbsentReason": concepts,
            "valueString": texts,
        },
    ),
    max_size=3,
)
metas = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "profile": st.one_of(st.lists(st.one_of(references, odd), max_size=2), odd),
            "tag": st.one_of(st.lists(codings, max_size=2), codings, odd),
            "security": st.one_of(st.lists(codings, max_size=2), odd),
            "source": st.one_of(references, odd),
            "sourceX": texts,
            "lastUpdated": dates,
        },
    ),
    odd,
)
KEYS = {
    "Observation": [
        "identifier",
        "status",
        "category",
        "code",
        "subject",
        "encounter",
        "effectiveDateTime",
        "effectivePeriod",
        "effectiveInstant",
        "valueQuantity",
        "valueCodeableConcept",
        "valueString",
        "valueDateTime",
        "valuePeriod",
        "valueInteger",
        "basedOn",
        "derivedFrom",
        "performer",
        "dataAbsentReason",
        "focus",
        "method",
    ],
    "Encounter": [
        "identifier",
        "status",
        "class",
        "type",
        "subject",
        "participant",
        "period",
        "reasonReference",
        "serviceProvider",
        "length",
        "location",
    ],
    "MedicationAdministration": [
        "identifier",
        "status",
        "medicationCodeableConcept",
        "medicationReference",
        "subject",
        "context",
        "effectivePeriod",
        "effectiveDateTime",
        "performer",
        "reasonCode",
        "request",
        "statusReason",
    ],
    "Patient": [
        "identifier",
        "name",
        "telecom",
        "address",
        "gender",
        "birthDate",
        "deceasedBoolean",
        "active",
        "generalPractitioner",
        "link",
    ],
}


@st.composite
def resources(draw: st.DrawFn) -> dict[str, Any]:
    resource_type = draw(st.sampled_from(sorted(KEYS)))
    resource: dict[str, Any] = {"resourceType": resource_type}
    if draw(st.booleans()):
        resource["meta"] = draw(metas)
    for key in draw(st.lists(st.sampled_from(KEYS[resource_type]), unique=True)):
        resource[key] = draw(elements)
    if resource_type == "Observation" and draw(st.booleans()):
        resource["component"] = draw(components)
    if resource_type == "Encounter" and draw(st.booleans()):
        resource["participant"] = [
            {"type": draw(st.lists(concepts, max_size=2)), "individual": draw(reference_values)}
        ]
    if resource_type == "Patient" and draw(st.booleans()):
        resource["name"] = [{"family": draw(texts), "given": draw(st.lists(texts, max_size=2))}]
        resource["telecom"] = [{"system": "phone", "value": draw(texts)}]
    resource["id"] = "x"
    return resource


@settings(max_examples=400, deadline=None)
@given(resources())
def test_extract_makes_the_rows_the_definitions_make(resource: dict[str, Any]) -> None:
    assert _outcome(extract, resource) == _outcome(plainly, resource)
