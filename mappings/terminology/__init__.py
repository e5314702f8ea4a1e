"""Terminology as data: the service's own CodeSystems, and ConceptMaps to standard codes.

The JSON files beside this module are FHIR R4 CodeSystem and ConceptMap resources. A site changes
a mapping without touching code by passing override ConceptMaps (`TERMINOLOGY_OVERRIDES` names a
file of them): an override element replaces the default targets of the same source code in the
same target system, or adds one. Codes marked "check" in their comment are the ones a site is
expected to confirm.

Loading reads package data files only; it takes no settings and no network.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

Coding = dict[str, str]


class UnknownCode(LookupError):
    """A code that its map or CodeSystem does not know."""


@dataclass(frozen=True)
class Terminology:
    """Codes of the service's own CodeSystems and their mappings to standard systems."""

    code_systems: Mapping[str, Mapping[str, str]]
    """CodeSystem id -> code -> display."""
    code_system_urls: Mapping[str, str]
    """CodeSystem id -> canonical URL."""
    maps: Mapping[str, Mapping[str, tuple[Coding, ...]]]
    """ConceptMap id -> source code -> target codings, in order of their groups."""

    def own(self, code_system: str, code: str) -> Coding:
        """The coding of `code` in one of the service's own CodeSystems."""
        try:
            display = self.code_systems[code_system][code]
        except KeyError:
            raise UnknownCode(f"{code!r} is not in CodeSystem {code_system}") from None
        return {"system": self.code_system_urls[code_system], "code": code, "display": display}

    def mapped(self, concept_map: str, code: str) -> tuple[Coding, ...]:
        """Standard codings `code` maps to (none when the map has no target for it)."""
        if concept_map not in self.maps:
            raise UnknownCode(f"no ConceptMap {concept_map}")
        # Copies: a coding put into one resource must not be shared with the next.
        return tuple(dict(coding) for coding in self.maps[concept_map].get(code, ()))

    def unmap(self, concept_map: str, system: str, code: str) -> str | None:
        """The source code a standard coding maps from, for reading resources back."""
        for source, targets in self.maps.get(concept_map, {}).items():
            if any(t["system"] == system and t["code"] == code for t in targets):
                return source
        return None


def _read_package_files() -> list[dict[str, Any]]:
    folder = resources.files(__name__)
    out = []
    for entry in sorted(folder.iterdir(), key=lambda item: item.name):
        if entry.name.endswith(".json"):
            out.append(json.loads(entry.read_text(encoding="utf-8")))
    return out


def _targets(concept_map: Mapping[str, Any]) -> dict[str, dict[str, Coding]]:
    """source code -> target system -> coding, for one ConceptMap."""
    out: dict[str, dict[str, Coding]] = {}
    for group in concept_map.get("group", []):
        system = group["target"]
        for element in group.get("element", []):
            for target in element.get("target", []):
                if target.get("equivalence") in ("unmatched", "disjoint"):
                    continue
                coding = {"system": system, "code": target["code"]}
                if "display" in target:
                    coding["display"] = target["display"]
                out.setdefault(element["code"], {})[system] = coding
    return out


def build_terminology(
    files: Iterable[Mapping[str, Any]], overrides: Iterable[Mapping[str, Any]] = ()
) -> Terminology:
    code_systems: dict[str, dict[str, str]] = {}
    urls: dict[str, str] = {}
    maps: dict[str, dict[str, dict[str, Coding]]] = {}
    for resource in files:
        if resource["resourceType"] == "CodeSystem":
            code_systems[resource["id"]] = {c["code"]: c["display"] for c in resource["concept"]}
            urls[resource["id"]] = resource["url"]
        elif resource["resourceType"] == "ConceptMap":
            maps[resource["id"]] = _targets(resource)
    for override in overrides:
        if override.get("resourceType") != "ConceptMap" or override.get("id") not in maps:
            known = ", ".join(sorted(maps))
            raise ValueError(f"an override must be a ConceptMap with the id of one of: {known}")
        for code, by_system in _targets(override).items():
            maps[override["id"]].setdefault(code, {}).update(by_system)
    return Terminology(
        code_systems=code_systems,
        code_system_urls=urls,
        maps={
            name: {code: tuple(by_system.values()) for code, by_system in entries.items()}
            for name, entries in maps.items()
        },
    )


@cache
def _defaults() -> tuple[dict[str, Any], ...]:
    return tuple(_read_package_files())


def load_terminology(overrides: Iterable[Mapping[str, Any]] = ()) -> Terminology:
    """The packaged terminology, with a site's override ConceptMaps applied."""
    return build_terminology(_defaults(), overrides)


def package_resources() -> tuple[dict[str, Any], ...]:
    """The CodeSystem and ConceptMap resources as packaged, for publishing."""
    return _defaults()
