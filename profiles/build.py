"""Rebuild the Infusion Bridge FHIR package and the validator's R4 core data.

Run from the repository root: `python profiles/build.py` (see profiles/README.md). It

1. compiles `profiles/input/fsh` with SUSHI (snapshots on) and writes the resources to the top
   level of `profiles/`, next to unchanged copies of the service's own CodeSystems and ConceptMaps
   from `mappings/terminology` (so the published ids and URLs are the ones the mappings emit);
2. extracts from the official R4 4.0.1 definitions (npm `hl7.fhir.r4.examples@4.0.1`) what the
   service's profile validator needs at runtime without any npm package: the invariants of the
   base resource types the service emits (with the data types they use), the core vital-signs
   profiles, and the code lists of the ValueSets those profiles bind as required. The result is
   `service/fhir/r4_core_constraints.json`.

SUSHI needs `hl7.fhir.r4.core#4.0.1` in the FHIR package cache (~/.fhir/packages). Where the FHIR
package registry is unreachable, this script builds that cache entry from the examples package
(which holds every core StructureDefinition, ValueSet and CodeSystem); it never replaces an
existing entry.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROFILES = Path(__file__).resolve().parent
REPO = PROFILES.parent
TERMINOLOGY = REPO / "mappings" / "terminology"
CORE_DATA = REPO / "service" / "fhir" / "r4_core_constraints.json"

SUSHI = "npx --yes fsh-sushi@3.21.0"
EXAMPLES = "hl7.fhir.r4.examples@4.0.1"
CORE_CACHE = Path.home() / ".fhir" / "packages" / "hl7.fhir.r4.core#4.0.1" / "package"
FHIR_BASE = "http://hl7.org/fhir/StructureDefinition/"

RESOURCE_TYPES = (
    "Patient",
    "Practitioner",
    "Organization",
    "Condition",
    "CarePlan",
    "Goal",
    "MedicationRequest",
    "Encounter",
    "MedicationAdministration",
    "Observation",
    "QuestionnaireResponse",
    "AdverseEvent",
    "Provenance",
)
"""The resource types the service emits: their core invariants go into the data file."""

VITAL_SIGN_PROFILES = (
    "vitalsigns",
    "bp",
    "heartrate",
    "resprate",
    "oxygensat",
    "bodyweight",
    "bodytemp",
)
"""Core profiles the vital-sign Observations claim (mappings/context.py `Profiles`)."""

EXCLUDED = {
    "ele-1": "Every element has a value or children: checked structurally by fhirkit-rs on the "
    "write path; evaluating it per element in FHIRPath would dominate validation time.",
    "dom-6": "Best-practice guideline (a resource should have a narrative), not a conformance "
    "rule; the service exchanges structured data and receiving systems render their own text.",
    "txt-1": "Narrative XHTML rules (htmlChecks() is not a FHIRPath function).",
    "txt-2": "Narrative XHTML rules (htmlChecks() is not a FHIRPath function).",
}
"""Core invariants deliberately left out, with the reason recorded in the data file."""

REWRITES = {
    "dom-3": (
        "contained.where((('#'+id in (%resource.descendants().reference"
        " | %resource.descendants().ofType(canonical) | %resource.descendants().ofType(uri)"
        " | %resource.descendants().ofType(url))) or descendants().where(reference = '#').exists()"
        " or descendants().where(ofType(canonical) = '#').exists()).not())"
        ".trace('unmatched', id).empty()",
        "as() on a collection is an error in fhirpathpy (FHIRPath's singleton rule): ofType() "
        "filters the same descendants.",
    ),
    "rng-2": (
        "low.empty() or high.empty() or low.value.empty() or high.value.empty()"
        " or (low.code ~ high.code and low.system ~ high.system).not()"
        " or (low.value <= high.value)",
        "fhirpathpy cannot compare Quantities without UCUM conversion: the values are compared "
        "when both bounds have the same unit.",
    ),
}
"""Core expressions fhirpathpy cannot evaluate as written, with an equivalent and the reason."""

SKIPPED_TYPES = frozenset({"Extension", "Meta", "Narrative", "Element", "BackboneElement"})
"""Data types not descended into: extensions are open content, Meta and Narrative are not data."""

MAX_TYPE_DEPTH = 4
"""How many data types deep constraint sites are collected (Dosage > Timing > Period ...)."""


def main(argv: list[str] | None = None) -> int:
    """Rebuild the package JSON and the core data file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sushi", default=SUSHI, help=f"SUSHI command (default: {SUSHI})")
    parser.add_argument("--examples", type=Path, help=f"{EXAMPLES} tarball (default: npm pack)")
    parser.add_argument("--skip-sushi", action="store_true", help="only rebuild the core data")
    parser.add_argument("--skip-core", action="store_true", help="only rebuild the package")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ib-profiles-") as scratch:
        tmp = Path(scratch)
        tarball = args.examples or _npm_pack(EXAMPLES, tmp)
        core = _core_resources(tarball)
        if not args.skip_sushi:
            _ensure_core_cache(core)
            _run_sushi(args.sushi, tmp / "sushi")
            _publish(tmp / "sushi" / "fsh-generated" / "resources")
        if not args.skip_core:
            CORE_DATA.write_text(_dump(_core_data(core)), encoding="utf-8")
            print(f"wrote {CORE_DATA.relative_to(REPO)}")
    return 0


def _npm_pack(spec: str, into: Path) -> Path:
    """Download an npm package tarball with the ordinary npm client."""
    out = subprocess.run(
        ["npm", "pack", spec, "--pack-destination", str(into), "--silent"],
        check=True,
        capture_output=True,
        text=True,
    )
    return into / out.stdout.strip().splitlines()[-1]


def _core_resources(tarball: Path) -> dict[str, dict[str, Any]]:
    """The conformance resources of the R4 examples package, by file name."""
    kinds = ("StructureDefinition-", "ValueSet-", "CodeSystem-")
    out: dict[str, dict[str, Any]] = {}
    with tarfile.open(tarball) as archive:
        for member in archive.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if member.isfile() and name.endswith(".json") and name.startswith(kinds):
                handle = archive.extractfile(member)
                assert handle is not None
                out[name] = json.load(io.TextIOWrapper(handle, encoding="utf-8"))
    return out


def _ensure_core_cache(core: dict[str, dict[str, Any]]) -> None:
    """Give SUSHI hl7.fhir.r4.core#4.0.1, built from the examples package if it is missing."""
    if (CORE_CACHE / "package.json").exists():
        return
    CORE_CACHE.mkdir(parents=True)
    index = []
    for name, resource in sorted(core.items()):
        (CORE_CACHE / name).write_text(json.dumps(resource), encoding="utf-8")
        entry = {"filename": name, "resourceType": resource["resourceType"], "id": resource["id"]}
        entry.update({k: resource[k] for k in ("url", "version", "kind", "type") if k in resource})
        index.append(entry)
    (CORE_CACHE / ".index.json").write_text(
        json.dumps({"index-version": 1, "files": index}), encoding="utf-8"
    )
    manifest = {
        "name": "hl7.fhir.r4.core",
        "version": "4.0.1",
        "fhirVersions": ["4.0.1"],
        "type": "fhir.core",
        "canonical": "http://hl7.org/fhir",
        "title": f"FHIR R4 core definitions, rebuilt locally from {EXAMPLES}",
    }
    (CORE_CACHE / "package.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    print(f"built {CORE_CACHE.parent} from {EXAMPLES}")


def _run_sushi(command: str, out: Path) -> None:
    """Compile the FSH with snapshots into `out`; SUSHI's exit status is its error count."""
    argv = [*shlex.split(command), "build", str(PROFILES), "--snapshot", "--out", str(out)]
    result = subprocess.run(argv, check=False)
    if result.returncode != 0:
        sys.exit(f"SUSHI reported {result.returncode} error(s)")


def _publish(generated: Path) -> None:
    """Replace the package's resources with SUSHI's output and the terminology copies."""
    for old in PROFILES.glob("*.json"):
        if old.name != "package.json":
            old.unlink()
    for source in sorted(generated.glob("*.json")):
        resource = json.loads(source.read_text(encoding="utf-8"))
        (PROFILES / source.name).write_text(_dump(resource), encoding="utf-8")
    for source in sorted(TERMINOLOGY.glob("*.json")):
        # Copied byte for byte: the mappings read these very files, and the package publishes them.
        shutil.copyfile(source, PROFILES / source.name)
        resource = json.loads(source.read_text(encoding="utf-8"))
        value_set = PROFILES / f"ValueSet-{resource['id']}.json"
        if resource["resourceType"] == "CodeSystem" and not value_set.exists():
            value_set.write_text(_dump(_all_codes(resource)), encoding="utf-8")
    print(f"wrote {len(list(PROFILES.glob('*.json'))) - 1} resources to {PROFILES.name}/")


def _all_codes(code_system: dict[str, Any]) -> dict[str, Any]:
    """The ValueSet of every code of one of the service's CodeSystems (a ConceptMap's source)."""
    return {
        "resourceType": "ValueSet",
        "id": code_system["id"],
        "url": code_system["url"].replace("/CodeSystem/", "/ValueSet/"),
        "version": code_system["version"],
        "name": code_system["name"],
        "title": code_system["title"],
        "status": code_system["status"],
        "experimental": False,
        "publisher": "Infusion Bridge",
        "description": f"All codes of CodeSystem {code_system['id']}.",
        "compose": {"include": [{"system": code_system["url"]}]},
    }


def _dump(data: Any) -> str:
    """JSON as the package stores it: two-space indent, UTF-8, final newline."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# --- core data ---------------------------------------------------------------------------------


def _core_data(core: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the runtime validator needs from the R4 core definitions."""
    definitions = {
        resource["url"]: resource
        for resource in core.values()
        if resource["resourceType"] == "StructureDefinition"
    }
    constraints = {
        resource_type: _constraint_sites(definitions, resource_type)
        for resource_type in RESOURCE_TYPES
    }
    profiles = [_vital_sign_profile(definitions, name) for name in VITAL_SIGN_PROFILES]
    value_sets = _required_value_sets(core, profiles)
    bindings = {
        resource_type: _required_bindings(core, definitions, resource_type, value_sets)
        for resource_type in RESOURCE_TYPES
    }
    return {
        "description": "R4 4.0.1 core constraints for service.fhir.profile_validation, extracted "
        f"from the official definitions in npm {EXAMPLES} by profiles/build.py. Do not edit.",
        "fhirVersion": "4.0.1",
        "excluded": EXCLUDED,
        "constraints": constraints,
        "bindings": bindings,
        "profiles": profiles,
        "valueSets": value_sets,
    }


def _constraint_sites(definitions: dict[str, Any], resource_type: str) -> list[dict[str, str]]:
    """Every invariant of a resource type, at the element (path) it applies to."""
    snapshot = definitions[FHIR_BASE + resource_type]["snapshot"]["element"]
    sites: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add(path: str, context: str, constraint: dict[str, Any]) -> None:
        key = constraint["key"]
        if key in EXCLUDED or (path, key) in seen or "expression" not in constraint:
            return
        seen.add((path, key))
        site = {"path": path, "context": context, "key": key}
        site |= {k: constraint[k] for k in ("severity", "human", "expression")}
        if key in REWRITES:
            site["original"] = site["expression"]
            site["expression"], site["rewritten"] = REWRITES[key]
        sites.append(site)

    for element in snapshot:
        steps = element["path"].split(".")[1:]
        types = [t["code"] for t in element.get("type", [])]
        if steps and steps[-1].endswith("[x]"):
            name = steps[-1][:-3]
            for code, type_ref in zip(types, element.get("type", []), strict=True):
                path = ".".join([*steps[:-1], f"{name}.ofType({code})"])
                for constraint in element.get("constraint", []):
                    add(path, code, constraint)
                for at, context, constraint in _type_sites(definitions, type_ref, (code,)):
                    add(_join(path, at), context, constraint)
            continue
        path = ".".join(steps)
        for constraint in element.get("constraint", []):
            add(path, element["path"], constraint)
        for type_ref in element.get("type", []):
            for at, context, constraint in _type_sites(definitions, type_ref, (type_ref["code"],)):
                add(_join(path, at), context, constraint)
    return sites


def _type_sites(
    definitions: dict[str, Any], type_ref: dict[str, Any], chain: tuple[str, ...]
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(path within the type, FHIRPath context type, constraint) of a data type, recursively."""
    code = type_ref["code"]
    if code in SKIPPED_TYPES or code[:1].islower() or len(chain) > MAX_TYPE_DEPTH:
        return
    # A profiled type (SimpleQuantity, Duration ...) carries its own extra invariants.
    url = (type_ref.get("profile") or [FHIR_BASE + code])[0]
    definition = definitions.get(url) or definitions.get(FHIR_BASE + code)
    if definition is None or definition.get("kind") != "complex-type":
        return
    for element in definition["snapshot"]["element"]:
        steps = element["path"].split(".")[1:]
        context = element["path"] if steps else definition["type"]
        if steps and steps[-1].endswith("[x]"):
            name = steps[-1][:-3]
            for inner in element.get("type", []):
                path = ".".join([*steps[:-1], f"{name}.ofType({inner['code']})"])
                if inner["code"] not in chain:
                    for at, ctx, constraint in _type_sites(
                        definitions, inner, (*chain, inner["code"])
                    ):
                        yield _join(path, at), ctx, constraint
            continue
        path = ".".join(steps)
        for constraint in element.get("constraint", []):
            # ext-1 is kept where resources and backbone elements carry extensions, not repeated
            # for the extension slot of every data type (it would triple the data file).
            if constraint["key"] != "ext-1":
                yield path, context, constraint
        if steps:
            for inner in element.get("type", []):
                if inner["code"] not in chain:
                    for at, ctx, constraint in _type_sites(
                        definitions, inner, (*chain, inner["code"])
                    ):
                        yield _join(path, at), ctx, constraint


def _join(*parts: str) -> str:
    """A dotted path of the non-empty parts."""
    return ".".join(part for part in parts if part)


PROFILE_KEYS = ("id", "path", "sliceName", "slicing", "min", "max", "type", "binding", "constraint")


def _vital_sign_profile(definitions: dict[str, Any], name: str) -> dict[str, Any]:
    """A core vital-signs profile, reduced to the differential properties the validator checks."""
    definition = definitions[FHIR_BASE + name]
    base = definitions[FHIR_BASE + definition["type"]]["snapshot"]["element"]
    choices = {e["path"][:-3] for e in base if e["path"].endswith("[x]")}
    elements = []
    for element in definition["differential"]["element"]:
        reduced = {k: element[k] for k in PROFILE_KEYS if k in element}
        reduced.update({k: v for k, v in element.items() if k.startswith(("fixed", "pattern"))})
        if "constraint" in reduced:
            reduced["constraint"] = [
                {k: c[k] for k in ("key", "severity", "human", "expression") if k in c}
                for c in reduced["constraint"]
                if c["key"] not in EXCLUDED
            ]
        reduced["id"] = _modern_id(element["id"], choices)
        elements.append(reduced)
    return {
        "resourceType": "StructureDefinition",
        "url": definition["url"],
        "name": definition["name"],
        "type": definition["type"],
        "baseDefinition": definition["baseDefinition"],
        "derivation": definition["derivation"],
        "differential": {"element": elements},
    }


def _modern_id(element_id: str, choices: set[str]) -> str:
    """`Observation.valueQuantity` (R4 core style) as a type slice: `value[x]:valueQuantity`."""
    steps = element_id.split(".")
    out = [steps[0]]
    for step in steps[1:]:
        plain = step.split(":")[0]
        prefix = ".".join([*[s.split(":")[0] for s in out], ""])
        for choice in choices:
            head, _, name = choice.rpartition(".")
            if prefix == head + "." and plain.startswith(name) and plain[len(name) :][:1].isupper():
                step = f"{name}[x]:{plain}"
                break
        out.append(step)
    return ".".join(out)


def _required_value_sets(
    core: dict[str, dict[str, Any]], profiles: list[dict[str, Any]]
) -> dict[str, list[list[str]]]:
    """Code lists of the ValueSets the vital-signs profiles bind as required, where enumerable."""
    by_url = {r["url"]: r for r in core.values() if "url" in r}
    out: dict[str, list[list[str]]] = {}
    for profile in profiles:
        for element in profile["differential"]["element"]:
            binding = element.get("binding", {})
            if binding.get("strength") != "required" or "valueSet" not in binding:
                continue
            url = binding["valueSet"].split("|")[0]
            codes = _expand(by_url, url)
            if codes is not None:
                out[url] = sorted([system, code] for system, code in codes)
    return out


def _required_bindings(
    core: dict[str, dict[str, Any]],
    definitions: dict[str, Any],
    resource_type: str,
    value_sets: dict[str, list[list[str]]],
) -> list[dict[str, str]]:
    """The base resource's required bindings whose ValueSets can be enumerated (their code lists
    are added to `value_sets`): status, intent, gender and the like, checked on every resource."""
    by_url = {r["url"]: r for r in core.values() if "url" in r}
    out = []
    for element in definitions[FHIR_BASE + resource_type]["snapshot"]["element"]:
        binding = element.get("binding", {})
        if binding.get("strength") != "required" or "valueSet" not in binding:
            continue
        url = binding["valueSet"].split("|")[0]
        codes = _expand(by_url, url)
        if codes is None:
            continue
        value_sets[url] = sorted([system, code] for system, code in codes)
        out.append({"path": element["path"], "valueSet": url})
    return out


def _expand(by_url: dict[str, Any], url: str) -> set[tuple[str, str]] | None:
    """A ValueSet's codes from concept lists and whole CodeSystems; None if it uses filters."""
    value_set = by_url.get(url)
    if value_set is None or "compose" not in value_set:
        return None
    codes: set[tuple[str, str]] = set()
    for include in value_set["compose"].get("include", []):
        if "filter" in include or "valueSet" in include:
            return None
        system = include["system"]
        if "concept" in include:
            codes |= {(system, c["code"]) for c in include["concept"]}
        elif system in by_url:
            codes |= {(system, code) for code in _concepts(by_url[system].get("concept", []))}
        else:
            return None
    return codes


def _concepts(concepts: list[dict[str, Any]]) -> Iterator[str]:
    """The codes of a CodeSystem's concepts, nested ones included."""
    for concept in concepts:
        yield concept["code"]
        yield from _concepts(concept.get("concept", []))


if __name__ == "__main__":
    sys.exit(main())
