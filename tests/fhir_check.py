"""Independent R4 4.0.1 checks of emitted resources, for tests: fhirkit-rs and the R4B models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import fhirkit
import orjson
from fhir.resources.R4B import get_fhir_model_class
from fhirpathpy import evaluate
from fhirpathpy.models import models


def r4_errors(resource: dict[str, Any]) -> list[str]:
    """Every error fhirkit-rs (a Rust R4 4.0.1 validator) finds, with its path."""
    issues = fhirkit.validate(orjson.dumps(resource))
    return [f"{issue.path}: {issue.message}" for issue in issues if issue.severity == "error"]


def assert_valid_r4(resource: dict[str, Any]) -> None:
    errors = r4_errors(resource)
    assert errors == [], f"{resource.get('resourceType')}/{resource.get('id')}: {errors}"
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


# Conformance to the official R4 definitions beyond what fhirkit-rs checks, read straight from
# the official StructureDefinitions (independently of the service's own profile validator): the
# invariants (cpl-3, gol-1, obs-6, tim-*, per-1, ...) by FHIRPath and required-binding codes.

R4 = models["r4"]

ANCHORS: dict[str, dict[str, tuple[str, ...]]] = {
    "CarePlan": {
        "CarePlan": ("CarePlan",),
        "Timing": ("CarePlan.activity.detail.scheduledTiming",),
        "Period": (
            "CarePlan.period",
            "CarePlan.activity.detail.scheduledTiming.repeat.boundsPeriod",
        ),
    },
    "MedicationRequest": {
        "MedicationRequest": ("MedicationRequest",),
        "Dosage": ("MedicationRequest.dosageInstruction",),
        "Timing": ("MedicationRequest.dosageInstruction.timing",),
        "Period": ("MedicationRequest.dosageInstruction.timing.repeat.boundsPeriod",),
        "Quantity": ("MedicationRequest.dosageInstruction.doseAndRate.doseQuantity",),
    },
    "Goal": {"Goal": ("Goal",), "Quantity": ("Goal.target.detailQuantity",)},
    "Observation": {"Observation": ("Observation",)},
    "QuestionnaireResponse": {"QuestionnaireResponse": ("QuestionnaireResponse",)},
}
"""Where in each resource the instances of each StructureDefinition's root are."""


def _package(folder: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / name).read_text(encoding="utf-8"))
    return data


@cache
def _code_system_files(folder: Path) -> dict[str, str]:
    return {
        _package(folder, path.name)["url"]: path.name for path in folder.glob("CodeSystem-*.json")
    }


def _concepts(concepts: list[dict[str, Any]]) -> Iterator[str]:
    for concept in concepts:
        yield concept["code"]
        yield from _concepts(concept.get("concept", []))


@cache
def value_set_codes(folder: Path, url: str) -> frozenset[str]:
    """The codes of a ValueSet of the R4 package (compose: listed concepts or whole systems)."""
    name = url.split("|")[0].rsplit("/", 1)[1]
    value_set = _package(folder, f"ValueSet-{name}.json")
    codes: set[str] = set()
    for include in value_set["compose"]["include"]:
        if "concept" in include:
            codes |= {concept["code"] for concept in include["concept"]}
        elif include["system"] in _code_system_files(folder):
            system = _package(folder, _code_system_files(folder)[include["system"]])
            codes |= set(_concepts(system.get("concept", [])))
    return frozenset(codes)


def conformance_problems(resource: dict[str, Any], folder: Path) -> list[str]:
    """Invariant failures and codes outside required bindings, with the rule that failed."""
    problems = []
    for definition, anchors in ANCHORS[resource["resourceType"]].items():
        structure = _package(folder, f"StructureDefinition-{definition}.json")
        for element in structure["snapshot"]["element"]:
            relative = element["path"][len(definition) :]
            for anchor in anchors:
                path = anchor + relative
                for constraint in element.get("constraint", []):
                    # ele-1/ext-1 hold for any JSON the validator accepts; dom-* are about
                    # contained resources, which the service never emits.
                    if constraint["severity"] != "error" or constraint["key"][:4] in (
                        "ele-",
                        "ext-",
                        "dom-",
                    ):
                        continue
                    # fhirpathpy lacks hasValue(); on primitives without extensions it is exists().
                    expression = constraint["expression"].replace("hasValue()", "exists()")
                    failing = evaluate(resource, f"{path}.where(({expression}).not())", model=R4)
                    if failing:
                        problems.append(f"{constraint['key']} at {path}")
                binding = element.get("binding", {})
                types = [t["code"] for t in element.get("type", [])]
                if binding.get("strength") == "required" and types == ["code"]:
                    if "[x]" in path:
                        continue
                    allowed = value_set_codes(folder, binding["valueSet"])
                    for value in evaluate(resource, path, model=R4):
                        if value not in allowed:
                            problems.append(f"{path} {value!r} not in {binding['valueSet']}")
    return problems


def assert_conformant(resource: dict[str, Any], folder: Path) -> None:
    assert_valid_r4(resource)
    assert "contained" not in resource
    assert conformance_problems(resource, folder) == [], resource["id"]
