"""The service's own profile validator: what the profiles in `profiles/` promise, checked fast.

fhirkit-rs (`service.fhir.validation`) checks that a resource is structurally valid R4. This module
checks what the Infusion Bridge profiles add on top, and the R4 core invariants of the base
resource types:

- cardinality (min/max) along element paths, through backbone elements and slices;
- fixed[x] values (equal) and pattern[x] values (the pattern's content must be present);
- the types a choice element allows (value[x] only integer) and the targets a reference allows;
- required bindings to ValueSets that can be expanded from the package (concept lists and whole
  CodeSystems of the service's own) or from the core data file;
- invariants, evaluated with fhirpathpy: the profiles' own (`ib-mad-1` ...), the core ones of the
  resource type and of the data types it uses (`mad-1`, `cpl-3`, `obs-6`, `per-1` ...), and
  `vs-1`..`vs-3` through the core vital-signs profiles.

Everything is compiled once, when a `ProfileValidator` is built: each profile's differential
becomes a tree of element checks keyed by JSON property, every FHIRPath expression is parsed once,
and invariants get a cheap guard that skips the evaluation where the expression cannot be false
(`per-1` needs both a start and an end), because fhirpathpy costs ~50-100 us per evaluation and
validation sits on the write path. An invariant is broken only by a `false` result: an empty one
(a `$this as dateTime` on a Period, say) passes.

The validator is pure: it reads the package folder and the core data file
(`r4_core_constraints.json`, written by `profiles/build.py` from the official R4 definitions)
when it is built, and nothing else. Results are R4 OperationOutcomes whose issues carry FHIRPath
locations (`MedicationAdministration.dosage.route`, `CarePlan.activity[1].detail`) and codes from
the FHIR issue-type ValueSet.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Final

from fhirpathpy import compile as fhirpath_compile
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models as fhirpath_models

Json = Any
"""A FHIR JSON value as `json.loads` returns it."""

Issue = dict[str, Any]
"""One OperationOutcome.issue."""

CORE_DATA: Final = Path(__file__).with_name("r4_core_constraints.json")
"""R4 core invariants, vital-signs profiles and code lists, extracted by profiles/build.py."""

FHIR_BASE: Final = "http://hl7.org/fhir/StructureDefinition/"

_R4_MODEL: Final = fhirpath_models["r4"]
_CHOICE_PATHS: Final = frozenset(_R4_MODEL["choiceTypePaths"])
_MISSING: Final = object()
_RESOLVED_LIMIT: Final = 1024

# Every R4 data type, by the suffix a choice element's JSON key carries (valueDateTime ...).
_TYPES: Final = (
    "base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id", "instant",
    "integer", "markdown", "oid", "positiveInt", "string", "time", "unsignedInt", "uri", "url",
    "uuid", "Address", "Age", "Annotation", "Attachment", "CodeableConcept", "Coding",
    "ContactPoint", "Count", "Distance", "Duration", "HumanName", "Identifier", "Money", "Period",
    "Quantity", "Range", "Ratio", "Reference", "SampledData", "Signature", "Timing",
    "ContactDetail", "Contributor", "DataRequirement", "Expression", "ParameterDefinition",
    "RelatedArtifact", "TriggerDefinition", "UsageContext", "Dosage", "Meta",
)  # fmt: skip
_TYPE_BY_SUFFIX: Final = {t[0].upper() + t[1:]: t for t in _TYPES}

# Guards for invariants read off their expressions: `a.b.empty() or ...`, `a.exists() implies
# ...` and `a.hasValue().not() or ...` are true whenever `a` is absent; in a plain disjunction
# (no parentheses), `a.empty()` is true when `a` is absent and `a.exists()` when it is present.
_TRUE_WITHOUT: Final = re.compile(
    r"^(?P<name>[a-z][A-Za-z0-9]*)(?:\.[a-z][A-Za-z0-9]*)*"
    r"(?:\.empty\(\)(?:$| or )|\.exists\(\) implies |\.hasValue\(\)\.not\(\) or )"
)
_ABSENT_TERM: Final = re.compile(
    r"^(?P<name>[a-z][A-Za-z0-9]*)(?:\.[a-z][A-Za-z0-9]*)*\.(?:empty\(\)|hasValue\(\)\.not\(\))$"
)
_PRESENT_TERM: Final = re.compile(r"^(?P<name>[a-z][A-Za-z0-9]*)\.exists\(\)$")
_OF_TYPE_STEP: Final = re.compile(r"([A-Za-z0-9]+)(?:\.ofType\(([A-Za-z0-9]+)\))?")


class ProfileError(ValueError):
    """A profile the validator cannot compile (an unsupported kind of slicing, say)."""


def default_profiles_dir() -> Path:
    """`profiles/` of the source tree this module is in, else ./profiles (an installed service)."""
    candidates = (Path(__file__).resolve().parents[2] / "profiles", Path.cwd() / "profiles")
    for folder in candidates:
        if (folder / "package.json").is_file():
            return folder
    raise FileNotFoundError(f"no FHIR package in {' or '.join(map(str, candidates))}")


@cache
def default_validator() -> ProfileValidator:
    """One shared validator over `default_profiles_dir()` (building one takes ~0.2 s)."""
    return ProfileValidator(default_profiles_dir())


def has_errors(outcome: Mapping[str, Any]) -> bool:
    """Whether an OperationOutcome reports an error or a fatal issue."""
    return any(i.get("severity") in ("error", "fatal") for i in outcome.get("issue", []))


# --- compiled checks ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Invariant:
    """A FHIRPath constraint, parsed once."""

    key: str
    severity: str
    human: str
    expression: str
    context: str | None
    """fhirpathpy type path of the element (None: the occurrence's own type, for choices)."""
    may_fail: Callable[[Json], bool] | None
    """A cheap test: False means the expression cannot be false here, so it is not evaluated."""
    evaluate: Callable[..., list[Any]]
    source: str


@dataclass(slots=True)
class _Binding:
    """A required binding's ValueSet, expanded."""

    value_set: str
    pairs: frozenset[tuple[str, str]]
    codes: frozenset[str]


@dataclass(slots=True)
class _Item:
    """One occurrence of an element in a resource."""

    value: Json
    location: str
    type: str | None = None


@dataclass(slots=True, eq=False)
class _Node:
    """The checks on one element (or slice) of a profile, or of the core constraint tree."""

    name: str
    """The element name as the differential spells it: `dosage`, `value[x]`."""
    path: str
    """The element's FHIR path (`Observation.component`), for messages and invariant contexts."""
    choice: bool = field(init=False)
    base: str = field(init=False)
    min: int = 0
    max: int | None = None
    fixed: Any = _MISSING
    pattern: Any = _MISSING
    types: frozenset[str] | None = None
    targets: frozenset[str] | None = None
    type_profiles: tuple[str, ...] = ()
    binding: _Binding | None = None
    invariants: list[_Invariant] = field(default_factory=list)
    children: dict[str, _Node] = field(default_factory=dict)
    slicing: dict[str, Any] | None = None
    slices: dict[str, _Node] = field(default_factory=dict)
    matchers: dict[str, Callable[[_Item], bool]] = field(default_factory=dict)
    keys: dict[str, tuple[_Node, str | None]] = field(default_factory=dict)
    """JSON property -> (child node, data type of a choice), filled by `_finalize`."""
    required: tuple[_Node, ...] = ()
    """Children with a minimum: checked even when absent."""

    def __post_init__(self) -> None:
        self.choice = self.name.endswith("[x]")
        self.base = self.name[:-3] if self.choice else self.name

    def child(self, name: str) -> _Node:
        """The node of a child element, created on first use."""
        node = self.children.get(name)
        if node is None:
            node = self.children[name] = _Node(name, f"{self.path}.{name.removesuffix('[x]')}")
        return node

    def slice(self, name: str) -> _Node:
        """The node of a named slice of this element, created on first use."""
        node = self.slices.get(name)
        if node is None:
            node = self.slices[name] = _Node(self.name, self.path)
        return node


@dataclass(slots=True)
class _Tree:
    """A compiled profile (or the core constraints of a resource type)."""

    url: str
    type: str
    root: _Node
    base: str | None = None


# --- the validator -----------------------------------------------------------------------------


class ProfileValidator:
    """Validates resources against the profiles of one FHIR package and the R4 core invariants."""

    def __init__(self, profiles_dir: Path, *, core_data: Path = CORE_DATA) -> None:
        """Load and compile the package in `profiles_dir` and the core data file."""
        self.profiles_dir = profiles_dir
        core = json.loads(core_data.read_text(encoding="utf-8"))
        resources = [
            json.loads(path.read_text(encoding="utf-8"))
            for path in sorted(profiles_dir.glob("*.json"))
            if path.name != "package.json"
        ]
        if not resources:
            raise FileNotFoundError(f"no FHIR resources in {profiles_dir}")
        self._code_systems = {r["url"]: r for r in resources if r["resourceType"] == "CodeSystem"}
        self._value_sets = {r["url"]: r for r in resources if r["resourceType"] == "ValueSet"}
        self._core_value_sets: dict[str, list[list[str]]] = core["valueSets"]
        self._expansions: dict[str, _Binding | None] = {}
        definitions = [r for r in resources if r["resourceType"] == "StructureDefinition"]
        definitions += core["profiles"]
        self._definitions = {d["url"]: d for d in definitions}
        self._trees = {d["url"]: self._compile(d) for d in definitions}
        self._core = {
            resource_type: self._compile_core(
                resource_type, sites, core.get("bindings", {}).get(resource_type, ())
            )
            for resource_type, sites in core["constraints"].items()
        }
        self._resolved: dict[tuple[str, tuple[str, ...]], tuple[list[_Tree], list[Issue]]] = {}

    @property
    def profiles(self) -> frozenset[str]:
        """Canonical URLs of every profile and extension the validator knows."""
        return frozenset(self._trees)

    def validate(self, resource: Mapping[str, Any], profile: str | None = None) -> dict[str, Any]:
        """An OperationOutcome of `resource` against `profile` (None: the ones it claims)."""
        issues = self.issues(resource, profile)
        if not issues:
            issues = [
                {
                    "severity": "information",
                    "code": "informational",
                    "diagnostics": "No issues detected",
                }
            ]
        return {"resourceType": "OperationOutcome", "issue": issues}

    def issues(self, resource: Mapping[str, Any], profile: str | None = None) -> list[Issue]:
        """Every issue of `resource` against `profile` (None: the ones it claims); [] if none."""
        if isinstance(resource, Mapping) and not isinstance(resource, dict):
            resource = dict(resource)  # the walk reads JSON objects as dicts
        resource_type = resource.get("resourceType") if isinstance(resource, dict) else None
        if not isinstance(resource_type, str):
            return [_issue("error", "structure", "The content is not a FHIR resource", None)]
        if profile is not None:
            claimed: tuple[str, ...] = (profile,)
        else:
            meta = resource.get("meta")
            listed = meta.get("profile", []) if isinstance(meta, dict) else []
            claimed = tuple(p for p in listed if isinstance(p, str))
        trees, issues = self._resolve(resource_type, claimed)
        for tree in trees:
            _Walk(resource, tree.url, self._trees).run(tree.root, issues)
        return _dedupe(issues)

    # --- resolving profiles ---

    def _resolve(
        self, resource_type: str, claimed: tuple[str, ...]
    ) -> tuple[list[_Tree], list[Issue]]:
        """The trees to walk for a resource type and claimed profiles, cached per combination."""
        cached = self._resolved.get((resource_type, claimed))
        if cached is None:
            trees: list[_Tree] = []
            issues: list[Issue] = []
            core = self._core.get(resource_type)
            if core is not None:
                trees.append(core)
            for claim in claimed:
                url = claim.split("|")[0]
                if url == FHIR_BASE + resource_type:
                    continue  # the base definition itself: its core invariants are walked anyway
                tree = self._trees.get(url)
                if tree is None:
                    text = f"Profile {url} is not known to this service, so it was not checked"
                    issues.append(_issue("error", "not-supported", text, resource_type))
                    continue
                if tree.type != resource_type:
                    text = f"Profile {url} is for {tree.type} resources, not {resource_type}"
                    issues.append(_issue("error", "structure", text, resource_type))
                    continue
                # A profile on a profile (bp on vitalsigns) brings its parents' rules too.
                while tree is not None:
                    if tree not in trees:
                        trees.append(tree)
                    tree = self._trees.get(tree.base or "")
            cached = (trees, issues)
            # Claims come from clients: only known combinations are kept, and not without bound.
            if not issues and len(self._resolved) < _RESOLVED_LIMIT:
                self._resolved[(resource_type, claimed)] = cached
        return cached[0], list(cached[1])

    # --- compiling ---

    def _compile(self, definition: Mapping[str, Any]) -> _Tree:
        """A profile's differential as a tree of element checks."""
        url, type_ = definition["url"], definition["type"]
        root = _Node(type_, type_)
        for element in definition["differential"]["element"]:
            steps = element["id"].split(".")
            if steps[0] != type_:
                raise ProfileError(f"{url}: element {element['id']} is not in {type_}")
            node = root
            for step in steps[1:]:
                name, _, slice_name = step.partition(":")
                node = node.child(name)
                if slice_name:
                    node = node.slice(slice_name)
            node.path = element["path"].replace("[x]", "")
            self._apply(node, element, url)
        _finalize(root, url)
        return _Tree(url, type_, root, definition.get("baseDefinition"))

    def _apply(self, node: _Node, element: Mapping[str, Any], url: str) -> None:
        """Copy one element definition's checkable properties onto its node."""
        if "min" in element:
            node.min = int(element["min"])
        if "max" in element and element["max"] != "*":
            node.max = int(element["max"])
        if "slicing" in element:
            node.slicing = element["slicing"]
        for key, value in element.items():
            if key.startswith("fixed"):
                node.fixed = value
            elif key.startswith("pattern"):
                node.pattern = value
        types = element.get("type", [])
        if types and node.choice:
            node.types = frozenset(t["code"] for t in types)
        targets = [
            self._profile_type(target)
            for t in types
            if t["code"] == "Reference"
            for target in t.get("targetProfile", [])
        ]
        if targets:
            node.targets = frozenset(targets)
        node.type_profiles = tuple(
            profile for t in types if t["code"] == "Extension" for profile in t.get("profile", [])
        )
        binding = element.get("binding")
        if binding and binding.get("strength") == "required" and "valueSet" in binding:
            node.binding = self._binding(binding["valueSet"].split("|")[0])
        context = None if node.choice else node.path
        for constraint in element.get("constraint", []):
            if "expression" in constraint:
                node.invariants.append(_invariant(constraint, context, url))

    def _compile_core(
        self,
        resource_type: str,
        sites: Iterable[Mapping[str, str]],
        bindings: Iterable[Mapping[str, str]] = (),
    ) -> _Tree:
        """The core invariants and required bindings of a resource type, as a tree keyed by
        their element paths."""
        root = _Node(resource_type, resource_type)
        source = FHIR_BASE + resource_type
        for bound in bindings:
            node = root
            for name in bound["path"].split(".")[1:]:
                node = node.child(name)
            node.binding = self._binding(bound["valueSet"])
        for site in sites:
            node = root
            for name, type_ in _OF_TYPE_STEP.findall(site["path"]):
                node = node.child(f"{name}[x]" if type_ else name)
                if type_:
                    # scheduled.ofType(Timing): the JSON key scheduledTiming, as a type slice.
                    node = node.slice(name + type_[0].upper() + type_[1:])
            # The site's context is the data type even for a type slice (Quantity for
            # value.ofType(Quantity)), which is also what the occurrence evaluates as.
            node.invariants.append(_invariant(site, site["context"], source))
        _finalize(root, source)
        return _Tree(source, resource_type, root)

    def _profile_type(self, url: str) -> str:
        """The resource type a (target) profile URL constrains."""
        definition = self._definitions.get(url)
        return str(definition["type"]) if definition else url.rsplit("/", 1)[-1]

    def _binding(self, url: str) -> _Binding | None:
        """A required binding's code list, or None when the ValueSet cannot be expanded here."""
        if url not in self._expansions:
            pairs = self._expand(url, set())
            if pairs is None and url in self._core_value_sets:
                pairs = {(system, code) for system, code in self._core_value_sets[url]}
            self._expansions[url] = (
                None
                if pairs is None
                else _Binding(url, frozenset(pairs), frozenset(c for _, c in pairs))
            )
        return self._expansions[url]

    def _expand(self, url: str, seen: set[str]) -> set[tuple[str, str]] | None:
        """A package ValueSet's (system, code) pairs; None if it uses filters or unknown parts."""
        value_set = self._value_sets.get(url)
        if value_set is None or url in seen:
            return None
        seen.add(url)
        compose = value_set.get("compose", {})
        codes: set[tuple[str, str]] = set()
        for include in compose.get("include", []):
            part = self._expand_part(include, seen)
            if part is None:
                return None
            codes |= part
        for exclude in compose.get("exclude", []):
            part = self._expand_part(exclude, seen)
            if part is None:
                return None
            codes -= part
        return codes

    def _expand_part(self, part: Mapping[str, Any], seen: set[str]) -> set[tuple[str, str]] | None:
        """The codes of one compose.include or compose.exclude."""
        if "filter" in part:
            return None
        codes: set[tuple[str, str]] | None = None
        system = part.get("system")
        if system is not None:
            if "concept" in part:
                codes = {(system, c["code"]) for c in part["concept"]}
            elif system in self._code_systems:
                concepts = self._code_systems[system].get("concept", [])
                codes = {(system, code) for code in _concept_codes(concepts)}
            else:
                return None
        for other in part.get("valueSet", []):
            nested = self._expand(other.split("|")[0], seen)
            if nested is None:
                return None
            codes = nested if codes is None else codes & nested
        return codes


def _finalize(node: _Node, url: str) -> None:
    """Index a node's children by JSON property and build its slice matchers, recursively."""
    for child in node.children.values():
        if child.choice:
            for suffix, type_ in _TYPE_BY_SUFFIX.items():
                node.keys[child.base + suffix] = (child, type_)
        else:
            node.keys[child.name] = (child, None)
            node.keys[f"_{child.name}"] = (child, None)
        _finalize(child, url)
    node.required = tuple(child for child in node.children.values() if child.min > 0)
    for name, slice_node in node.slices.items():
        node.matchers[name] = _matcher(node, name, slice_node, url)
        _finalize(slice_node, url)


def _matcher(node: _Node, name: str, slice_node: _Node, url: str) -> Callable[[_Item], bool]:
    """Whether an occurrence belongs to a slice, from the slicing's discriminators."""
    suffix = name[len(node.base) :]
    if node.choice and name.startswith(node.base) and suffix in _TYPE_BY_SUFFIX:
        # A type slice of a choice element (value[x]:valueQuantity) needs no discriminator.
        return _type_test(frozenset({_TYPE_BY_SUFFIX[suffix]}))
    discriminators = (node.slicing or {}).get("discriminator", [])
    if not discriminators:
        raise ProfileError(f"{url}: slice {node.path}:{name} has no discriminator")
    tests: list[Callable[[_Item], bool]] = []
    for discriminator in discriminators:
        kind, path = discriminator["type"], discriminator["path"]
        steps = [] if path == "$this" else path.split(".")
        if kind == "type" and not steps:
            tests.append(_type_test(slice_node.types or frozenset()))
            continue
        if kind == "exists" and "(" not in path:
            target = _descend(slice_node, steps)
            if target is None or (target.min == 0 and target.max != 0):
                raise ProfileError(f"{url}: slice {node.path}:{name} leaves {path!r} optional")
            tests.append(_exists_test(steps, target.min > 0))
            continue
        if kind not in ("value", "pattern") or "(" in path:
            raise ProfileError(f"{url}: {kind} discriminator {path!r} is not supported")
        target = _descend(slice_node, steps)
        expected, exact = _MISSING, True
        if target is not None and target.fixed is not _MISSING:
            expected = target.fixed
        elif target is not None and target.pattern is not _MISSING:
            expected, exact = target.pattern, False
        elif steps == ["url"] and slice_node.type_profiles:
            expected = slice_node.type_profiles[0]
        if expected is _MISSING:
            raise ProfileError(f"{url}: slice {node.path}:{name} fixes nothing at {path!r}")
        tests.append(_value_test(steps, expected, exact))
    return lambda item: all(test(item) for test in tests)


# --- walking a resource ------------------------------------------------------------------------


class _Walk:
    """One resource checked against one tree."""

    __slots__ = ("resource", "source", "trees", "variables")

    def __init__(self, resource: Mapping[str, Any], source: str, trees: Mapping[str, _Tree]):
        self.resource = resource
        self.source = source
        self.trees = trees
        # %resource and %rootResource, which some core invariants use (dom-3, ref-1).
        self.variables = {"resource": resource, "rootResource": resource}

    def run(self, root: _Node, out: list[Issue]) -> None:
        """Check the resource itself, then its elements."""
        self._check_item(root, _Item(self.resource, str(self.resource["resourceType"])), out, True)

    def _check_children(
        self, node: _Node, value: Mapping[str, Any], at: str, out: list[Issue]
    ) -> None:
        """Group the object's properties by the child nodes that check them, then check each."""
        found: dict[_Node, list[_Item]] = {}
        keys = node.keys
        for key, child_value in value.items():
            entry = keys.get(key)
            if entry is None:
                continue
            child, type_ = entry
            if type_ is not None:
                items = _spread(child_value, f"{at}.{child.base}.ofType({type_})", type_)
            elif key[0] != "_":
                items = _spread(child_value, f"{at}.{key}", None)
            elif key[1:] in value:
                continue  # the extensions of a primitive that has its value: counted with it
            else:
                # A primitive present only through its extensions still occurs, with no value.
                count = len(child_value) if isinstance(child_value, list) else 1
                items = [_Item(None, f"{at}.{key[1:]}")] * count
            found.setdefault(child, []).extend(items)
        for child in node.required:
            if child not in found:
                self._check_element(child, [], at, out)
        for child, items in found.items():
            self._check_element(child, items, at, out)

    def _check_element(self, node: _Node, items: list[_Item], at: str, out: list[Issue]) -> None:
        """Cardinality, then each occurrence, then the slices."""
        where = f"{at}.{node.base}"
        self._cardinality(node, len(items), where, None, out)
        for item in items:
            self._check_item(node, item, out)
        if node.slices:
            self._check_slices(node, items, where, out)

    def _check_slices(self, node: _Node, items: list[_Item], where: str, out: list[Issue]) -> None:
        """Assign the occurrences to slices, then check each slice's cardinality and rules."""
        claimed = [False] * len(items)
        for name, slice_node in node.slices.items():
            matcher = node.matchers[name]
            matched = []
            for index, item in enumerate(items):
                if item.value is not None and matcher(item):
                    matched.append(item)
                    claimed[index] = True
            self._cardinality(slice_node, len(matched), where, name, out)
            for item in matched:
                self._check_item(slice_node, item, out)
        if (node.slicing or {}).get("rules") == "closed":
            for item, taken in zip(items, claimed, strict=True):
                if not taken:
                    text = f"{node.path}: this element matches none of the profile's slices"
                    out.append(self._issue("error", "structure", text, item.location))

    def _cardinality(
        self, node: _Node, count: int, where: str, slice_name: str | None, out: list[Issue]
    ) -> None:
        """An element's (or a slice's) number of occurrences against its min and max."""
        label = node.path if slice_name is None else f"{node.path}:{slice_name}"
        if count < node.min:
            text = f"{label}: minimum required = {node.min}, but only found {count}"
            out.append(self._issue("error", "required", text, where))
        if node.max is not None and count > node.max:
            text = f"{label}: max allowed = {node.max}, but found {count}"
            out.append(self._issue("error", "structure", text, where))

    def _check_item(self, node: _Node, item: _Item, out: list[Issue], root: bool = False) -> None:
        """Every check of a node on one occurrence, then its children."""
        value = item.value
        if node.types is not None and item.type is not None and item.type not in node.types:
            allowed = ", ".join(sorted(node.types))
            text = f"{node.path}: type {item.type} is not allowed here (allowed: {allowed})"
            out.append(self._issue("error", "structure", text, item.location))
            return
        if value is None:
            return  # a primitive with only extensions: no value to check
        if node.fixed is not _MISSING and value != node.fixed:
            text = f"{node.path}: value must be exactly {_show(node.fixed)}, found {_show(value)}"
            out.append(self._issue("error", "value", text, item.location))
        if node.pattern is not _MISSING and not _matches(node.pattern, value):
            text = f"{node.path}: value must match the pattern {_show(node.pattern)}"
            out.append(self._issue("error", "value", text, item.location))
        if node.targets is not None and isinstance(value, dict):
            self._check_target(node, node.targets, value, item.location, out)
        if node.binding is not None:
            self._check_binding(node, node.binding, value, item.location, out)
        for invariant in node.invariants:
            self._check_invariant(invariant, item, out, root)
        if isinstance(value, dict):
            if node.keys or node.required:
                self._check_children(node, value, item.location, out)
            for profile in node.type_profiles:
                tree = self.trees.get(profile)
                if tree is not None:
                    self._check_children(tree.root, value, item.location, out)

    def _check_target(
        self,
        node: _Node,
        targets: frozenset[str],
        reference: Mapping[str, Any],
        at: str,
        out: list[Issue],
    ) -> None:
        """A reference's target type against the types the profile allows."""
        found = _reference_type(reference)
        if found is not None and found not in targets:
            allowed = ", ".join(sorted(targets))
            text = f"{node.path}: a reference to {found} is not allowed (allowed: {allowed})"
            out.append(self._issue("error", "structure", text, at))

    def _check_binding(
        self, node: _Node, binding: _Binding, value: Json, at: str, out: list[Issue]
    ) -> None:
        """A code, Coding, Quantity or CodeableConcept against a required binding."""
        if isinstance(value, str):
            ok, shown = value in binding.codes, value
        elif isinstance(value, dict) and "coding" in value:
            codings = [c for c in value["coding"] if isinstance(c, dict)]
            ok = any((c.get("system"), c.get("code")) in binding.pairs for c in codings)
            shown = ", ".join(f"{c.get('system')}#{c.get('code')}" for c in codings)
        elif isinstance(value, dict) and "code" in value:
            ok = (value.get("system"), value.get("code")) in binding.pairs
            shown = f"{value.get('system')}#{value.get('code')}"
        elif isinstance(value, dict):
            ok, shown = False, "no code"  # a CodeableConcept with text only
        else:
            return
        if not ok:
            text = f"{node.path}: {shown} is not in the required ValueSet {binding.value_set}"
            out.append(self._issue("error", "code-invalid", text, at))

    def _check_invariant(
        self, invariant: _Invariant, item: _Item, out: list[Issue], root: bool
    ) -> None:
        """Evaluate one invariant on one occurrence (unless its guard rules a failure out)."""
        value = item.value
        if invariant.may_fail is not None and not invariant.may_fail(value):
            return
        context = invariant.context or item.type
        target = value if root or context is None else _node(value, context)
        try:
            result = invariant.evaluate(target, self.variables)
        except Exception as error:  # a fhirpathpy failure must not fail a write: reported
            text = f"{invariant.key} could not be evaluated ({error}): {invariant.expression}"
            out.append(self._issue("warning", "processing", text, item.location, invariant.source))
            return
        if result == [False]:
            text = f"{invariant.key}: {invariant.human}"
            severity = "error" if invariant.severity == "error" else "warning"
            out.append(self._issue(severity, "invariant", text, item.location, invariant.source))

    def _issue(
        self, severity: str, code: str, text: str, at: str, source: str | None = None
    ) -> Issue:
        """An issue whose diagnostics name the definition the rule comes from."""
        return _issue(severity, code, f"{text} ({source or self.source})", at)


# --- helpers -----------------------------------------------------------------------------------


def _issue(severity: str, code: str, text: str, at: str | None) -> Issue:
    """An OperationOutcome.issue at a FHIRPath location."""
    issue: Issue = {"severity": severity, "code": code, "diagnostics": text}
    if at is not None:
        issue["expression"] = [at]
    return issue


def _dedupe(issues: list[Issue]) -> list[Issue]:
    """Issues in order, without repeats (a profile and its parent may say the same)."""
    seen: set[tuple[str, str, str, tuple[str, ...]]] = set()
    out = []
    for issue in issues:
        text = issue["diagnostics"].rsplit(" (", 1)[0]
        key = (issue["severity"], issue["code"], text, tuple(issue.get("expression", ())))
        if key not in seen:
            seen.add(key)
            out.append(issue)
    return out


def _spread(value: Json, at: str, type_: str | None) -> list[_Item]:
    """The occurrences of a property's value: one per array entry, with its index."""
    if isinstance(value, list):
        return [_Item(v, f"{at}[{i}]", type_) for i, v in enumerate(value)]
    return [_Item(value, at, type_)]


def _descend(node: _Node, steps: list[str]) -> _Node | None:
    """The node at a discriminator path below a slice, looking into nested slices too."""
    for step in steps:
        found = node.children.get(step) or node.children.get(f"{step}[x]")
        if found is None:
            found = next(
                (s.children[step] for s in node.slices.values() if step in s.children), None
            )
        if found is None:
            return None
        node = found
    return node


def _type_test(allowed: frozenset[str]) -> Callable[[_Item], bool]:
    """Whether an occurrence has one of the allowed types."""
    return lambda item: item.type in allowed


def _exists_test(steps: list[str], wanted: bool) -> Callable[[_Item], bool]:
    """Whether an occurrence has (or lacks, as the slice requires) the element at a path."""
    return lambda item: any(True for _ in _collect(item.value, steps)) == wanted


def _value_test(steps: list[str], expected: Json, exact: bool) -> Callable[[_Item], bool]:
    """Whether the values at a path below an occurrence include the expected one."""

    def test(item: _Item) -> bool:
        for value in _collect(item.value, steps):
            if (value == expected) if exact else _matches(expected, value):
                return True
        return False

    return test


def _collect(value: Json, steps: list[str]) -> Iterator[Json]:
    """Every value at a dotted path below a value, through arrays."""
    if isinstance(value, list):
        for entry in value:
            yield from _collect(entry, steps)
    elif not steps:
        yield value
    elif isinstance(value, dict) and steps[0] in value:
        yield from _collect(value[steps[0]], steps[1:])


def _matches(pattern: Json, value: Json) -> bool:
    """FHIR pattern semantics: everything in the pattern is present in the value."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            key in value and _matches(expected, value[key]) for key, expected in pattern.items()
        )
    if isinstance(pattern, list):
        return isinstance(value, list) and all(
            any(_matches(expected, entry) for entry in value) for expected in pattern
        )
    return bool(pattern == value)


def _reference_type(reference: Mapping[str, Any]) -> str | None:
    """The resource type a Reference points to, when its `reference` or `type` tells."""
    literal = reference.get("reference")
    if isinstance(literal, str) and not literal.startswith(("#", "urn:")):
        parts = literal.split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        if len(parts) >= 2 and parts[-2][:1].isupper() and parts[-2].isalpha():
            return parts[-2]
    declared = reference.get("type")
    return declared if isinstance(declared, str) else None


def _show(value: Json) -> str:
    """A value as compact JSON for a message."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _concept_codes(concepts: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """The codes of a CodeSystem's concepts, nested ones included."""
    for concept in concepts:
        yield concept["code"]
        yield from _concept_codes(concept.get("concept", []))


# --- FHIRPath ----------------------------------------------------------------------------------


def _node(value: Json, context: str) -> Any:
    """A value as fhirpathpy's typed node, so that it resolves choice elements by type."""
    return ResourceNode.create_node(value, context)  # type: ignore[no-untyped-call]


def _has_value(inputs: list[Any]) -> list[bool]:
    """FHIRPath hasValue(), which fhirpathpy lacks: a single primitive with a value."""
    return [len(inputs) == 1 and inputs[0] is not None and not isinstance(inputs[0], dict)]


_OPTIONS: Final = {
    "userInvocationTable": {"hasValue": {"fn": _has_value, "arity": {0: []}}},
    # trace() in core invariants (ref-1, dom-3) would otherwise print to stdout.
    "traceFn": lambda *_: None,
}


@cache
def _compiled(expression: str) -> Callable[..., list[Any]]:
    """A FHIRPath expression parsed once per process (ref-1 alone occurs at ~100 sites)."""
    return fhirpath_compile(expression, model=_R4_MODEL, options=_OPTIONS)


def _invariant(constraint: Mapping[str, Any], context: str | None, source: str) -> _Invariant:
    """Parse a constraint's FHIRPath once and work out its guard."""
    expression = constraint["expression"]
    if context is not None:
        # An element of a data type (Patient.extension) evaluates as that type (Extension), so
        # that fhirpathpy resolves its choice elements (value[x]); backbone elements keep paths.
        context = _R4_MODEL["path2Type"].get(context, context)
    return _Invariant(
        key=constraint["key"],
        severity=constraint.get("severity", "error"),
        human=constraint.get("human", expression),
        expression=expression,
        context=context,
        may_fail=_guard(constraint["key"], expression, context),
        evaluate=_compiled(expression),
        source=source,
    )


def _present(*names: str) -> Callable[[Json], bool]:
    """Guard: the expression can only be false when all these elements are present."""
    return lambda value: not isinstance(value, dict) or all(_has(value, n) for n in names)


def _absent(*names: str) -> Callable[[Json], bool]:
    """Guard: the expression can only be false when none of these elements is present."""
    return lambda value: not isinstance(value, dict) or not any(_has(value, n) for n in names)


def _has(value: Mapping[str, Any], name: str, *, strict: bool = False) -> bool:
    """Whether an element occurs in an object (strict: with a value, not only extensions)."""
    if name.endswith("[x]"):
        base = name[:-3]
        return any(k.startswith(base) and k[len(base) :] in _TYPE_BY_SUFFIX for k in value)
    return name in value or (not strict and f"_{name}" in value)


_GUARDS: Final[dict[str, Callable[[Json], bool]]] = {
    # Read off each core expression; the general forms are derived in `_guard`.
    "dom-3": _present("contained"),  # contained.where(...).empty()
    "dom-4": _present("contained"),  # contained.meta.versionId.empty() and contained.meta...
    "per-1": _present("start", "end"),  # start.hasValue().not() or end.hasValue().not() or ...
    "rng-2": _present("low", "high"),  # low.empty() or high.empty() or ...
    "qrs-1": _present("answer", "item"),  # (answer.exists() and item.exists()).not()
    "obs-7": _present("value[x]", "component"),  # value.empty() or component.code.where(...)...
    "cpl-3": _present("detail", "reference"),  # detail.empty() or reference.empty()
    "gol-1": _present("detail"),  # (detail.exists() and measure.exists()) or detail...not()
    "org-1": _absent("identifier", "name"),  # (identifier.count() + name.count()) > 0
    "mad-1": _absent("dose", "rate[x]"),  # dose.exists() or rate.exists()
    "vs-2": _absent("component", "hasMember", "dataAbsentReason", "value[x]"),
    "vs-3": _absent("value[x]", "dataAbsentReason"),  # value.exists() or dataAbsentReason...
    # ($this as dateTime).toString().length() >= 8: only a short dateTime string can fail.
    "vs-1": lambda value: isinstance(value, str) and len(value) < 10,
    # reference.startsWith('#').not() or ...: only a local reference can fail.
    "ref-1": lambda value: (
        not isinstance(value, dict) or str(value.get("reference", "")).startswith("#")
    ),
}


def _guard(key: str, expression: str, context: str | None) -> Callable[[Json], bool] | None:
    """A cheap test of whether an invariant can be false for a value (None: always evaluate)."""
    if key in _GUARDS:
        return _GUARDS[key]
    if context is None:
        return None

    def name(element: str) -> str:
        # A choice element (value) has no JSON property of its own name: value[x] matches any.
        return f"{element}[x]" if f"{context}.{element}" in _CHOICE_PATHS else element

    top = _top_level(expression)
    if " xor " in top or top.count(" implies ") > 1:
        return None  # precedence the simple forms below do not account for
    if " implies " not in top and "(" not in expression.replace("()", ""):
        absent: list[str] = []
        present: list[str] = []
        for term in expression.split(" or "):
            if match := _ABSENT_TERM.match(term):
                absent.append(name(match.group("name")))
            elif match := _PRESENT_TERM.match(term):
                present.append(name(match.group("name")))
        if absent or present:
            return _unless(tuple(absent), tuple(present))
    match = _TRUE_WITHOUT.match(expression)
    # `a.empty() or b implies c` is `(a.empty() or b) implies c`: the `or` forms need no implies.
    if match is not None and (" implies " not in top or match.group(0).endswith(" implies ")):
        return _present(name(match.group("name")))
    return None


def _top_level(expression: str) -> str:
    """An expression with string literals and parenthesised parts emptied: its top level."""
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "''", expression)
    while (emptied := re.sub(r"\([^()]*\)", "", text)) != text:
        text = emptied
    return text


def _unless(absent: tuple[str, ...], present: tuple[str, ...]) -> Callable[[Json], bool]:
    """Guard of a disjunction: true as soon as one `absent` is absent or one `present` present."""

    def may_fail(value: Json) -> bool:
        if not isinstance(value, dict):
            return True
        if any(not _has(value, n) for n in absent):
            return False
        # A property with a value makes exists() true; one with only extensions may not.
        return not any(_has(value, n, strict=True) for n in present)

    return may_fail
