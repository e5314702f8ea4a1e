"""The official R4 search parameters of the stored resource types, as the facade indexes them.

`search_parameters.json` beside this module is extracted from the official R4 4.0.1 definitions
(npm `hl7.fhir.r4.examples@4.0.1`: `Bundle-searchParams.json`, the Patient CompartmentDefinition
and the resources' StructureDefinitions) by `python -m service.fhir.search_parameters PACKAGE_DIR`;
a test checks that it still equals what the definitions give. Per resource type it holds each
parameter's type, its FHIRPath expression cut down to that type's part of the (often multi-type)
official expression, and its reference targets; the parameters that put a resource in a
Patient's compartment; and the elements `_summary=true` keeps (`isSummary`).

This module only reads and shapes definitions; it knows nothing of the database.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final

DATA: Final = Path(__file__).with_name("search_parameters.json")

INDEXED_TYPES: Final = (
    "AdverseEvent",
    "AuditEvent",
    "CarePlan",
    "Condition",
    "Encounter",
    "Goal",
    "MedicationAdministration",
    "MedicationRequest",
    "Observation",
    "Organization",
    "Patient",
    "Practitioner",
    "Provenance",
    "QuestionnaireResponse",
)
"""Resource types the store holds and indexes: what the clinic's records map to, and AuditEvent
(the audit trail). `service.fhir.api.STORED_TYPES` is this list."""

COMMON: Final = ("_id", "_lastUpdated", "_profile", "_security", "_source", "_tag")
"""Parameters of every resource (base `Resource`) the facade supports."""

INDEXED_KINDS: Final = ("string", "token", "date", "reference", "quantity", "uri", "composite")
"""Parameter types with index rows; special parameters are not supported."""
COMPOSITE_PARTS: Final = ("token", "quantity", "date", "string")
"""What the composite index holds: a token, then one of these (the shape of every composite of
the indexed types, Observation's `code-value-quantity` and the like). Other composites are left
out of the definitions."""


@dataclass(frozen=True, slots=True)
class Component:
    """One part of a composite parameter: its type, and its expression relative to the element
    the composite's expression selects."""

    type: str
    expression: str


@dataclass(frozen=True, slots=True)
class SearchParameter:
    """One search parameter of one resource type."""

    code: str
    type: str
    expression: str
    url: str
    targets: tuple[str, ...] = ()
    components: tuple[Component, ...] = ()
    """A composite's parts, in the order its values give them (`code$value`)."""


@dataclass(frozen=True, slots=True)
class Definitions:
    by_type: dict[str, dict[str, SearchParameter]]
    patient_compartment: dict[str, tuple[str, ...]]
    summary_elements: dict[str, tuple[str, ...]]

    def parameter(self, resource_type: str, code: str) -> SearchParameter | None:
        return self.by_type.get(resource_type, {}).get(code)


@cache
def definitions() -> Definitions:
    """The committed definitions, read once per process."""
    data = json.loads(DATA.read_text(encoding="utf-8"))
    return Definitions(
        by_type={
            resource_type: {
                code: SearchParameter(
                    code=code,
                    type=item["type"],
                    expression=item["expression"],
                    url=item["url"],
                    targets=tuple(item.get("target", ())),
                    components=tuple(
                        Component(type=part["type"], expression=part["expression"])
                        for part in item.get("component", ())
                    ),
                )
                for code, item in parameters.items()
            }
            for resource_type, parameters in data["parameters"].items()
        },
        patient_compartment={
            resource_type: tuple(params)
            for resource_type, params in data["patientCompartment"].items()
        },
        summary_elements={
            resource_type: tuple(elements)
            for resource_type, elements in data["summaryElements"].items()
        },
    )


@dataclass(frozen=True, slots=True)
class IndexSource:
    """The index rows that answer a parameter: those of `params`, and for a reference only
    the rows whose target is `target_type` (None: any)."""

    params: tuple[str, ...]
    target_type: str | None = None


_WHERE_TYPE = re.compile(r"(?P<path>.+)\.where\(resolve\(\) is (?P<type>[A-Z][A-Za-z]+)\)")


@cache
def index_aliases(resource_type: str) -> dict[str, IndexSource]:
    """Parameters whose rows would repeat other parameters' rows, and the rows that answer
    them instead; they get no rows of their own.

    Two shapes of the official definitions: a reference parameter that is another's path
    narrowed to one target type (`patient` is `subject.where(resolve() is Patient)`), and a
    union of other parameters' expressions (`combo-code` is `code | component-code`). About a
    quarter of an Observation's index rows were such repeats.
    """
    parameters = [
        p for p in definitions().by_type.get(resource_type, {}).values() if not p.components
    ]
    by_expression = {p.expression: p for p in parameters}
    members = {p.code: frozenset(_members(p.expression)) for p in parameters}
    aliases: dict[str, IndexSource] = {}
    for parameter in parameters:
        narrowed = _WHERE_TYPE.fullmatch(parameter.expression)
        source = by_expression.get(narrowed["path"]) if narrowed else None
        if (
            narrowed is not None
            and source is not None
            and parameter.type == source.type == "reference"
        ):
            aliases[parameter.code] = IndexSource((source.code,), narrowed["type"])
            continue
        mine = members[parameter.code]
        if len(mine) < 2:
            continue
        parts = [
            other.code
            for other in parameters
            if other.code != parameter.code
            and other.type == parameter.type
            and members[other.code] < mine
        ]
        covered = [members[code] for code in parts]
        if parts and frozenset().union(*covered) == mine and sum(map(len, covered)) == len(mine):
            aliases[parameter.code] = IndexSource(tuple(parts))
    return aliases


def index_source(resource_type: str, code: str) -> IndexSource:
    """The rows that answer parameter `code` of `resource_type` (its own, unless an alias)."""
    return index_aliases(resource_type).get(code) or IndexSource((code,))


@cache
def compartment_sources() -> dict[str, tuple[str, ...]]:
    """Each type's Patient-compartment parameters, as the parameters whose index rows answer
    them (`patient` on a CarePlan is its `subject` rows; compartment queries ask for Patient
    targets, so an alias's narrowing to Patient is implied)."""
    return {
        resource_type: tuple(
            dict.fromkeys(
                source for param in params for source in index_source(resource_type, param).params
            )
        )
        for resource_type, params in definitions().patient_compartment.items()
    }


def _members(expression: str) -> list[str]:
    return [part.strip() for part in _split_union(expression)]


# --- extraction from the official definitions ----------------------------------------------------


def _own_part(expression: str, resource_type: str) -> str:
    """The union members of a multi-type expression that apply to `resource_type`."""
    parts = [part.strip() for part in _split_union(expression)]
    mine = [
        part
        for part in parts
        if part.startswith((f"{resource_type}.", f"({resource_type}.", "Resource."))
        or part in (resource_type, f"({resource_type})")
    ]
    return " | ".join(mine)


def _split_union(expression: str) -> list[str]:
    """Split on top-level `|` (not inside parentheses or quotes)."""
    parts, depth, quoted, start = [], 0, False, 0
    for index, char in enumerate(expression):
        if char == "'":
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth -= 1
        elif not quoted and depth == 0 and char == "|":
            parts.append(expression[start:index])
            start = index + 1
    parts.append(expression[start:])
    return parts


def _components(
    definition: dict[str, Any], by_url: dict[str, dict[str, Any]]
) -> list[dict[str, str]] | None:
    """A composite's parts (type and relative expression), or None when the index cannot
    hold its shape (a token and one of COMPOSITE_PARTS)."""
    parts = []
    for component in definition.get("component", ()):
        defined = by_url.get(component["definition"])
        if defined is None:
            return None
        parts.append({"type": defined["type"], "expression": component["expression"]})
    if len(parts) != 2 or parts[0]["type"] != "token" or parts[1]["type"] not in COMPOSITE_PARTS:
        return None
    return parts


def extract(package: Path) -> dict[str, Any]:
    """The data file's content from the official R4 package folder."""
    bundle = json.loads((package / "Bundle-searchParams.json").read_text(encoding="utf-8"))
    by_url = {entry["resource"]["url"]: entry["resource"] for entry in bundle["entry"]}
    parameters: dict[str, dict[str, Any]] = {t: {} for t in INDEXED_TYPES}
    for entry in bundle["entry"]:
        definition = entry["resource"]
        kind = definition["type"]
        if kind not in INDEXED_KINDS or not definition.get("expression"):
            continue
        components = _components(definition, by_url) if kind == "composite" else []
        if components is None:
            continue
        bases = set(definition["base"])
        if "Resource" in bases:
            if definition["code"] not in COMMON:
                continue
            targets = list(INDEXED_TYPES)
        else:
            targets = sorted(bases & set(INDEXED_TYPES))
        for resource_type in targets:
            expression = definition["expression"]
            if "Resource" not in bases:
                expression = _own_part(expression, resource_type)
            else:
                expression = expression.replace("Resource.", f"{resource_type}.")
            if not expression:
                continue
            item: dict[str, Any] = {
                "type": kind,
                "expression": expression,
                "url": definition["url"],
            }
            if definition.get("target"):
                item["target"] = sorted(definition["target"])
            if components:
                item["component"] = components
            parameters[resource_type][definition["code"]] = item
    compartment = json.loads(
        (package / "CompartmentDefinition-patient.json").read_text(encoding="utf-8")
    )
    patient_compartment = {
        item["code"]: item.get("param", [])
        for item in compartment["resource"]
        if item["code"] in INDEXED_TYPES and item.get("param")
    }
    summary: dict[str, list[str]] = {}
    for resource_type in INDEXED_TYPES:
        structure = json.loads(
            (package / f"StructureDefinition-{resource_type}.json").read_text(encoding="utf-8")
        )
        names = []
        for element in structure["snapshot"]["element"]:
            path = element["path"].split(".")
            if len(path) == 2 and element.get("isSummary"):
                names.append(path[1].removesuffix("[x]"))
        summary[resource_type] = names
    return {
        "description": "R4 4.0.1 search parameters, Patient compartment and summary elements of "
        "the indexed resource types, extracted from npm hl7.fhir.r4.examples@4.0.1 by "
        "service/fhir/search_parameters.py. Do not edit.",
        "fhirVersion": "4.0.1",
        "parameters": {t: dict(sorted(p.items())) for t, p in parameters.items()},
        "patientCompartment": patient_compartment,
        "summaryElements": summary,
    }


def dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    DATA.write_text(dump(extract(Path(sys.argv[1]))), encoding="utf-8")
    print(f"wrote {DATA}")
