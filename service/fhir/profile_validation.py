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
(`per-1` needs both a start and an end, and two instants in order are true), because fhirpathpy
costs ~50-500 us per evaluation and validation sits on the write path. For the same reason the
walk skips the parts of a resource that nothing checks and formats a location only for an
issue. An invariant is broken only by a `false` result: an empty one (a `$this as dateTime` on a
Period, say) passes.

The validator is pure: it reads the package folder and the core data file
(`r4_core_constraints.json`, written by `profiles/build.py` from the official R4 definitions)
when it is built, and nothing else. Results are R4 OperationOutcomes whose issues carry FHIRPath
locations (`MedicationAdministration.dosage.route`, `CarePlan.activity[1].detail`) and codes from
the FHIR issue-type ValueSet.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, Final, TypeAlias

from fhirpathpy import compile as fhirpath_compile
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models as fhirpath_models

Json = Any
"""A FHIR JSON value as `json.loads` returns it."""

Issue = dict[str, Any]
"""One OperationOutcome.issue."""

Location: TypeAlias = "str | tuple[Location, str, int | None]"
"""Where an occurrence is: a FHIRPath location, or (parent, step, index) for `parent.step[index]`.

The walk carries the tuples and `_text` formats them only when an issue is reported: most
occurrences of a valid resource never need theirs."""

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

# How `_Walk._check_children` checks an occurrence of a node, from the checks the node has:
_ONLY_FIXED: Final = 0  # a fixed value and nothing else, not even below (coding.system)
_ONLY_CODES: Final = 1  # a required binding and nothing else of its own (status)
_OWN: Final = 2  # other checks of its own: `_check_item` (unless its one guard rules out all)
_BENEATH: Final = 3  # nothing of its own: only its children and extension profiles, if any


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
    """One occurrence of an element in a resource, as slicing sees it."""

    value: Json
    location: Location
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
    most: int = field(init=False, default=sys.maxsize)
    """`max` as a number to compare counts with, filled by `_finalize`."""
    counted: bool = field(init=False, default=False)
    """Whether there is a min or a max to count occurrences for, filled by `_finalize`."""
    closed: bool = field(init=False, default=False)
    """Whether the slicing is closed: every occurrence must be in a slice."""
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
    matchers: dict[str, _Matcher] = field(default_factory=dict)
    keys: dict[str, _Key] = field(default_factory=dict)
    """JSON property -> how it occurs, filled by `_finalize` for the children with something
    to check (the walk never looks at the others, nor below them)."""
    required: tuple[tuple[_Node, frozenset[str]], ...] = ()
    """Children with a minimum, with the JSON properties they occur as: checked even when
    absent."""
    required_names: frozenset[str] = frozenset()
    """The names of the required children (`status`): when an object has them all, only the
    required choices (`effective[x]`) are left to look for."""
    required_choices: tuple[tuple[_Node, frozenset[str]], ...] = ()
    """The required children that are choices, from `required`."""
    properties: frozenset[str] = frozenset()
    """The properties of `keys`, to tell at once whether an object has any of them."""
    own: bool = False
    """Whether an occurrence has checks of its own (type, fixed, pattern, target, binding,
    invariants), filled by `_finalize`."""
    only_fixed: bool = False
    """Whether a fixed value is all there is to check on an occurrence (coding.system)."""
    codes: frozenset[str] = frozenset()
    """The codes of the binding, when a required binding is all an occurrence itself has to
    meet (status): a code among them needs no `_check_item`."""
    kind: int = 0
    """How the walk checks an occurrence: `_ONLY_FIXED`, `_ONLY_CODES`, `_OWN` or `_BENEATH`,
    filled by `_finalize`."""
    one_invariant: bool = False
    """Whether one invariant is all there is to check on an occurrence itself (ref-1)."""
    guard: Callable[[Json], bool] | None = None
    """That one invariant's guard (None: there is none, or more to check), filled by
    `_finalize`, so that the walk tests it without looking through `invariants`."""
    guarded: tuple[tuple[Callable[[Json], bool] | None, tuple[_Invariant, ...]], ...] = ()
    """The invariants in order, consecutive ones with the same guard together (dom-2 ...
    dom-5 share one), so that each guard runs once per occurrence; filled by `_finalize`."""
    slice_plan: tuple[_SlicePlan, ...] = ()
    """The slices in order with what `_check_slices_of_one` needs of each, filled by
    `_finalize` so that the walk looks nothing up by slice name."""
    values: bool = False
    """Whether an occurrence's value has a fixed value, pattern, target or binding to meet."""
    inspect: bool = False
    """Whether an occurrence has anything to check on it or beneath it, filled by `_finalize`."""
    slice_types: dict[str, frozenset[str]] = field(default_factory=dict)
    """The data type of each type slice of a choice (valueQuantity: Quantity)."""
    type_slices: dict[str, tuple[tuple[str, _Node], ...]] | None = None
    """When every slice is an optional type slice and the slicing is open: the slices of each
    data type, in order (an occurrence of another type, valueString, leaves them nothing to
    check), filled by `_finalize`."""

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


_Matcher: TypeAlias = "Callable[[Json, str | None], bool]"
"""Whether an occurrence (its value, and its data type for a choice) belongs to a slice."""

_SlicePlan: TypeAlias = "tuple[str, _Node, frozenset[str] | None, _Matcher, bool, bool]"
"""One slice as `_check_slices_of_one` walks it: its name, node, types (of a type slice, else
None: its matcher decides), matcher, and whether one occurrence (hit) or none (miss) is outside
its cardinality."""

_Key: TypeAlias = "tuple[_Node, str | None, str, bool, frozenset[str]]"
"""A JSON property of an object: the child node, the data type of a choice (valueQuantity:
Quantity), the FHIRPath step of its occurrences (`value.ofType(Quantity)`), whether it is the
`_given` of a primitive (its extensions), and the other properties of a choice (valueString
...), which may hold more of its occurrences."""


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
        if not isinstance(resource, dict) and isinstance(resource, Mapping):
            resource = dict(resource)  # the walk reads JSON objects as dicts
        resource_type = resource.get("resourceType") if isinstance(resource, dict) else None
        if not isinstance(resource_type, str):
            return [_issue("error", "structure", "The content is not a FHIR resource", None)]
        if profile is not None:
            claimed: tuple[str, ...] = (profile,)
        else:
            meta = resource.get("meta")
            listed = meta.get("profile", []) if isinstance(meta, dict) else []
            claimed = tuple([p for p in listed if isinstance(p, str)])
        trees, issues = self._resolve(resource_type, claimed)
        walk = _Walk(resource, "", self._trees)
        for tree in trees:
            walk.source = tree.url
            walk.run(tree.root, issues)
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
    """Index a node's children by JSON property and build its slice matchers, recursively.

    A child with nothing to check on it or beneath it (no cardinality, slices or checks of its
    own, which is most of the core trees and of the profiles' backbone elements) is left out of
    the index, so that the walk skips its occurrences and everything below them.
    """
    for child in node.children.values():
        _finalize(child, url)
        if not (child.inspect or child.min > 0 or child.max is not None or child.slices):
            continue
        if child.choice:
            names = frozenset(_json_keys(child))
            for suffix, type_ in _TYPE_BY_SUFFIX.items():
                key = child.base + suffix
                step = f"{child.base}.ofType({type_})"
                node.keys[key] = (child, type_, step, False, names - {key})
        else:
            node.keys[child.name] = (child, None, child.name, False, frozenset())
            node.keys[f"_{child.name}"] = (child, None, child.name, True, frozenset())
    node.required = tuple(
        (child, frozenset(_json_keys(child))) for child in node.children.values() if child.min > 0
    )
    node.required_names = frozenset(c.name for c, _ in node.required if not c.choice)
    node.required_choices = tuple((c, names) for c, names in node.required if c.choice)
    for name, slice_node in node.slices.items():
        node.matchers[name] = _matcher(node, name, slice_node, url)
        sliced = _slice_type(node, name)
        if sliced is not None:
            node.slice_types[name] = frozenset({sliced})
        _finalize(slice_node, url)
    if (
        node.slices
        and len(node.slice_types) == len(node.slices)
        and all(s.min == 0 for s in node.slices.values())
        and (node.slicing or {}).get("rules") != "closed"
    ):
        node.type_slices = {
            type_: tuple((n, s) for n, s in node.slices.items() if type_ in node.slice_types[n])
            for type_ in frozenset().union(*node.slice_types.values())
        }
    node.own = bool(
        node.types is not None
        or node.fixed is not _MISSING
        or node.pattern is not _MISSING
        or node.targets is not None
        or node.binding is not None
        or node.invariants
    )
    node.inspect = node.own or bool(node.keys or node.type_profiles)
    node.properties = frozenset(node.keys)
    node.most = sys.maxsize if node.max is None else node.max
    node.counted = node.min > 0 or node.max is not None
    node.closed = (node.slicing or {}).get("rules") == "closed"
    node.values = (
        node.fixed is not _MISSING
        or node.pattern is not _MISSING
        or node.targets is not None
        or node.binding is not None
    )
    node.one_invariant = len(node.invariants) == 1 and node.types is None and not node.values
    node.guard = node.invariants[0].may_fail if node.one_invariant else None
    groups: list[tuple[Callable[[Json], bool] | None, list[_Invariant]]] = []
    for invariant in node.invariants:
        if groups and groups[-1][0] is invariant.may_fail:
            groups[-1][1].append(invariant)
        else:
            groups.append((invariant.may_fail, [invariant]))
    node.guarded = tuple((guard, tuple(group)) for guard, group in groups)
    node.slice_plan = tuple(
        (
            name,
            slice_node,
            node.slice_types.get(name),
            node.matchers[name],
            slice_node.min > 1 or slice_node.most < 1,
            slice_node.min > 0 or slice_node.most < 0,
        )
        for name, slice_node in node.slices.items()
    )
    node.only_fixed = (
        node.fixed is not _MISSING
        and node.types is None
        and node.pattern is _MISSING
        and node.targets is None
        and node.binding is None
        and not node.invariants
        and not node.keys
        and not node.type_profiles
    )
    binding = node.binding
    if node.only_fixed:
        node.kind = _ONLY_FIXED
    elif (
        binding is not None
        and node.types is None
        and node.fixed is _MISSING
        and node.pattern is _MISSING
        and node.targets is None
        and not node.invariants
    ):
        node.kind, node.codes = _ONLY_CODES, binding.codes
    else:
        node.kind = _OWN if node.own else _BENEATH


def _json_keys(node: _Node) -> Iterator[str]:
    """The JSON properties an element occurs as: `valueQuantity` ..., or `status` and `_status`."""
    if node.choice:
        yield from (node.base + suffix for suffix in _TYPE_BY_SUFFIX)
    else:
        yield from (node.name, f"_{node.name}")


def _slice_type(node: _Node, name: str) -> str | None:
    """The data type of a type slice of a choice element (value[x]:valueQuantity), else None."""
    suffix = name[len(node.base) :]
    if node.choice and name.startswith(node.base) and suffix in _TYPE_BY_SUFFIX:
        return _TYPE_BY_SUFFIX[suffix]
    return None


def _matcher(node: _Node, name: str, slice_node: _Node, url: str) -> _Matcher:
    """Whether an occurrence belongs to a slice, from the slicing's discriminators."""
    type_ = _slice_type(node, name)
    if type_ is not None:
        # A type slice of a choice element (value[x]:valueQuantity) needs no discriminator.
        return _type_test(frozenset({type_}))
    discriminators = (node.slicing or {}).get("discriminator", [])
    if not discriminators:
        raise ProfileError(f"{url}: slice {node.path}:{name} has no discriminator")
    tests: list[_Matcher] = []
    keyed: list[tuple[str, str]] = []  # the (key, string) of each exact one-step value test
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
        if exact and len(steps) == 1 and isinstance(expected, str):
            keyed.append((steps[0], expected))
    if len(tests) == 1:
        return tests[0]
    if len(keyed) == len(tests) == 2:  # a Coding's system and code: both tests in one call
        return _two_keys_test(*keyed[0], *keyed[1])
    if len(tests) == 2:  # coding.system and coding.code, say
        first, second = tests
        return lambda value, type_: first(value, type_) and second(value, type_)

    def matcher(value: Json, type_: str | None) -> bool:
        for test in tests:  # noqa: SIM110 (a loop, not all(), makes no generator per call)
            if not test(value, type_):
                return False
        return True

    return matcher


# --- walking a resource ------------------------------------------------------------------------


class _Walk:
    """One resource checked against its trees, one after the other (`source` names the tree).

    Hand-written for speed, since it runs on every write: locations are carried as `Location`
    tuples and formatted only for an issue, cardinality is compared before anything is called,
    only the properties of `_Node.keys` (those with something checked at or below them) are
    looked at, and the commonest cases are handled inline rather than through a call.
    """

    __slots__ = ("resource", "source", "trees")

    def __init__(self, resource: Mapping[str, Any], source: str, trees: Mapping[str, _Tree]):
        self.resource = resource
        self.source = source
        self.trees = trees

    def run(self, root: _Node, out: list[Issue]) -> None:
        """Check the resource itself, then its elements."""
        resource_type = str(self.resource["resourceType"])
        self._check_item(root, self.resource, None, resource_type, out, True)

    def _check_children(
        self, node: _Node, value: Mapping[str, Any], at: Location, out: list[Issue]
    ) -> None:
        """Check the children a profile requires that are absent, then the others in the order
        the object has them.

        An element is one property, but for a choice given as several types (valueQuantity and
        valueString): those are checked together, where the first one is. The common case, one
        property, is checked here rather than through `_check_element`, which does the same,
        in one pass over the object.
        """
        present = value.keys()
        if node.required:
            for child, names in (
                node.required_choices if present >= node.required_names else node.required
            ):
                if present.isdisjoint(names):
                    self._check_element(child, [], at, out)
        keys = node.keys
        done: set[_Node] | None = None
        for key, child_value in value.items():
            entry = keys.get(key)
            if entry is None:
                continue  # nothing is checked at or below it
            child, type_, step, extensions, others = entry
            if extensions:
                if step in value:
                    continue  # the extensions of a primitive that has its value: counted with it
            elif others and not present.isdisjoint(others):
                if done is None or child not in done:
                    done = {child} if done is None else done | {child}
                    properties = [(v, keys[k]) for k, v in value.items() if k in others or k == key]
                    self._check_element(child, properties, at, out)
                continue
            # isinstance(child_value, list), told for a plain object or string (most values)
            # without an isinstance() that fails, which costs more.
            cls = type(child_value)
            many = cls is list or (
                cls is not dict and cls is not str and isinstance(child_value, list)
            )
            if child.counted:
                count = len(child_value) if many else 1
                if count < child.min or count > child.most:
                    self._cardinality(child, count, (at, child.base, None), None, out)
            if child.inspect and not extensions:
                # What `_check_item` does, with its commonest cases inline: a fixed value
                # (coding.system), a code of a required binding (status), an invariant its
                # guard rules out (ref-1 on a Reference), and an object with nothing of its
                # own to check. An array's entries are checked in the loop; a single value,
                # the commoner, by the same steps after it, without a 1-tuple to loop over.
                kind = child.kind
                if many:
                    for position, occurrence in enumerate(child_value):
                        if kind == _ONLY_FIXED:
                            if occurrence is not None and occurrence != child.fixed:
                                self._not_fixed(child, occurrence, (at, step, position), out)
                            continue
                        if kind == _ONLY_CODES:
                            if not (isinstance(occurrence, str) and occurrence in child.codes):
                                self._check_item(
                                    child, occurrence, type_, (at, step, position), out
                                )
                            continue
                        if kind == _OWN:
                            # One invariant whose guard rules it out leaves only the children.
                            guard = child.guard
                            if guard is None or guard(occurrence):
                                self._check_item(
                                    child, occurrence, type_, (at, step, position), out
                                )
                                continue
                        if isinstance(occurrence, dict):
                            if child.required or not child.properties.isdisjoint(occurrence):
                                self._check_children(child, occurrence, (at, step, position), out)
                            if child.type_profiles:
                                self._check_profiles(child, occurrence, (at, step, position), out)
                elif kind == _ONLY_FIXED:
                    if child_value is not None and child_value != child.fixed:
                        self._not_fixed(child, child_value, (at, step, None), out)
                elif kind == _ONLY_CODES:
                    if not (isinstance(child_value, str) and child_value in child.codes):
                        self._check_item(child, child_value, type_, (at, step, None), out)
                elif kind == _OWN and ((guard := child.guard) is None or guard(child_value)):
                    self._check_item(child, child_value, type_, (at, step, None), out)
                elif isinstance(child_value, dict):
                    # The set's isdisjoint() over the object's keys: no keys view for the
                    # small objects (a Reference, a Coding) most occurrences are.
                    if child.required or not child.properties.isdisjoint(child_value):
                        self._check_children(child, child_value, (at, step, None), out)
                    if child.type_profiles:
                        self._check_profiles(child, child_value, (at, step, None), out)
            if child.slices:
                by_type = child.type_slices
                if many:
                    if len(child_value) == 1 and not extensions:
                        self._check_slices_of_one(
                            child, child_value[0], type_, (at, step, 0), (at, child.base, None), out
                        )
                    else:
                        items = _occurrences([(child_value, entry)], at)
                        self._check_slices(child, items, (at, child.base, None), out)
                elif by_type is None:
                    # What `_occurrences` and `_check_slices` make of one property given once:
                    # one occurrence, without a value if it is only the extensions.
                    self._check_slices_of_one(
                        child,
                        None if extensions else child_value,
                        None if extensions else type_,
                        (at, step, None),
                        (at, child.base, None),
                        out,
                    )
                elif child_value is not None and type_ in by_type:
                    # What `_check_slices` does for one occurrence that only type slices take.
                    where: Location = (at, child.base, None)
                    for name, slice_node in by_type[type_]:
                        if slice_node.most < 1:
                            self._cardinality(slice_node, 1, where, name, out)
                        if not slice_node.inspect:
                            continue
                        guard = slice_node.guard
                        if (
                            guard is None
                            or guard(child_value)
                            or slice_node.properties
                            or slice_node.type_profiles
                        ):
                            self._check_item(slice_node, child_value, type_, (at, step, None), out)

    def _check_element(
        self, node: _Node, properties: list[tuple[Json, _Key]], at: Location, out: list[Issue]
    ) -> None:
        """Cardinality, then each occurrence, then the slices."""
        count = 0
        for child_value, _ in properties:
            count += len(child_value) if isinstance(child_value, list) else 1
        if count < node.min or count > node.most:
            self._cardinality(node, count, (at, node.base, None), None, out)
        if node.inspect:
            check_item = self._check_item
            for child_value, (_, type_, step, extensions, _) in properties:
                if extensions:
                    continue  # a primitive present only through its extensions: no value
                if isinstance(child_value, list):
                    for index, entry in enumerate(child_value):
                        check_item(node, entry, type_, (at, step, index), out)
                else:
                    check_item(node, child_value, type_, (at, step, None), out)
        if node.slices:
            self._check_slices(node, _occurrences(properties, at), (at, node.base, None), out)

    def _check_slices(
        self, node: _Node, items: list[_Item], where: Location, out: list[Issue]
    ) -> None:
        """Assign the occurrences to slices, then check each slice's cardinality and rules."""
        if len(items) == 1:
            item = items[0]
            self._check_slices_of_one(node, item.value, item.type, item.location, where, out)
            return
        claimed = [False] * len(items)
        for name, slice_node, types, matcher, _, _ in node.slice_plan:
            matched = []
            if types is not None:
                # What the matcher tests, without a call per occurrence.
                for index, item in enumerate(items):
                    if item.value is not None and item.type in types:
                        matched.append(item)
                        claimed[index] = True
            else:
                for index, item in enumerate(items):
                    if item.value is not None and matcher(item.value, item.type):
                        matched.append(item)
                        claimed[index] = True
            count = len(matched)
            if count < slice_node.min or count > slice_node.most:
                self._cardinality(slice_node, count, where, name, out)
            if slice_node.inspect:
                for item in matched:
                    self._check_item(slice_node, item.value, item.type, item.location, out)
        if node.closed:
            for item, taken in zip(items, claimed, strict=True):
                if not taken:
                    text = f"{node.path}: this element matches none of the profile's slices"
                    out.append(self._issue("error", "structure", text, item.location))

    def _check_slices_of_one(
        self,
        node: _Node,
        value: Json,
        type_: str | None,
        location: Location,
        where: Location,
        out: list[Issue],
    ) -> None:
        """What `_check_slices` does for a single occurrence (category, a coding), the common
        case, without lists of matches nor an `_Item`: `value` None for one without a value.

        Whether a count of one (hit) or none (miss) breaks a slice's cardinality is known from
        `_finalize`, so that only a broken one costs a call."""
        taken = False
        for name, slice_node, types, matcher, bad_hit, bad_miss in node.slice_plan:
            if value is None:
                hit = False
            elif types is not None:
                hit = type_ in types
            else:
                hit = matcher(value, type_)
            if hit:
                taken = True
                if bad_hit:
                    self._cardinality(slice_node, 1, where, name, out)
                if slice_node.inspect:
                    self._check_item(slice_node, value, type_, location, out)
            elif bad_miss:
                self._cardinality(slice_node, 0, where, name, out)
        if node.closed and not taken:
            text = f"{node.path}: this element matches none of the profile's slices"
            out.append(self._issue("error", "structure", text, location))

    def _cardinality(
        self, node: _Node, count: int, where: Location, slice_name: str | None, out: list[Issue]
    ) -> None:
        """An element's (or a slice's) number of occurrences against its min and max."""
        label = node.path if slice_name is None else f"{node.path}:{slice_name}"
        if count < node.min:
            text = f"{label}: minimum required = {node.min}, but only found {count}"
            out.append(self._issue("error", "required", text, where))
        if node.max is not None and count > node.max:
            text = f"{label}: max allowed = {node.max}, but found {count}"
            out.append(self._issue("error", "structure", text, where))

    def _check_item(
        self,
        node: _Node,
        value: Json,
        type_: str | None,
        at: Location,
        out: list[Issue],
        root: bool = False,
    ) -> None:
        """Every check of a node on one occurrence (of a data type, for a choice), then its
        children."""
        if node.own:
            if node.types is not None and type_ is not None and type_ not in node.types:
                allowed = ", ".join(sorted(node.types))
                text = f"{node.path}: type {type_} is not allowed here (allowed: {allowed})"
                out.append(self._issue("error", "structure", text, at))
                return
            if value is None:
                return  # a primitive with only extensions: no value to check
            if node.values:
                if node.fixed is not _MISSING and value != node.fixed:
                    self._not_fixed(node, value, at, out)
                if node.pattern is not _MISSING and not _matches(node.pattern, value):
                    text = f"{node.path}: value must match the pattern {_show(node.pattern)}"
                    out.append(self._issue("error", "value", text, at))
                if node.targets is not None and isinstance(value, dict):
                    self._check_target(node, node.targets, value, at, out)
                if node.binding is not None:
                    self._check_binding(node, node.binding, value, at, out)
            for guard, invariants in node.guarded:  # dom-2 ... dom-5 share one guard
                if guard is None or guard(value):
                    for invariant in invariants:
                        self._check_invariant(invariant, value, type_, at, out, root)
        if isinstance(value, dict):
            # Not even a call for an object with none of the properties checked below it.
            if node.required or not value.keys().isdisjoint(node.properties):
                self._check_children(node, value, at, out)
            if node.type_profiles:
                self._check_profiles(node, value, at, out)

    def _check_profiles(
        self, node: _Node, value: Mapping[str, Any], at: Location, out: list[Issue]
    ) -> None:
        """The children an extension's profiles check (of an element of type Extension)."""
        for profile in node.type_profiles:
            tree = self.trees.get(profile)
            if tree is not None and (
                tree.root.required or not value.keys().isdisjoint(tree.root.properties)
            ):
                self._check_children(tree.root, value, at, out)

    def _not_fixed(self, node: _Node, value: Json, at: Location, out: list[Issue]) -> None:
        """The issue of a value other than the fixed one."""
        text = f"{node.path}: value must be exactly {_show(node.fixed)}, found {_show(value)}"
        out.append(self._issue("error", "value", text, at))

    def _check_target(
        self,
        node: _Node,
        targets: frozenset[str],
        reference: Mapping[str, Any],
        at: Location,
        out: list[Issue],
    ) -> None:
        """A reference's target type against the types the profile allows."""
        found = _reference_type(reference)
        if found is not None and found not in targets:
            allowed = ", ".join(sorted(targets))
            text = f"{node.path}: a reference to {found} is not allowed (allowed: {allowed})"
            out.append(self._issue("error", "structure", text, at))

    def _check_binding(
        self, node: _Node, binding: _Binding, value: Json, at: Location, out: list[Issue]
    ) -> None:
        """A code, Coding, Quantity or CodeableConcept against a required binding.

        The codes are shown only in an issue, so they are formatted only for one."""
        if isinstance(value, str):
            if value in binding.codes:
                return
            shown = value
        elif isinstance(value, dict) and "coding" in value:
            pairs = binding.pairs
            for coding in value["coding"]:
                # In order, up to the first code in the ValueSet, as `any()` would look.
                if isinstance(coding, dict) and (coding.get("system"), coding.get("code")) in pairs:
                    return
            shown = ", ".join(
                f"{c.get('system')}#{c.get('code')}" for c in value["coding"] if isinstance(c, dict)
            )
        elif isinstance(value, dict) and "code" in value:
            if (value.get("system"), value.get("code")) in binding.pairs:
                return
            shown = f"{value.get('system')}#{value.get('code')}"
        elif isinstance(value, dict):
            shown = "no code"  # a CodeableConcept with text only
        else:
            return
        text = f"{node.path}: {shown} is not in the required ValueSet {binding.value_set}"
        out.append(self._issue("error", "code-invalid", text, at))

    def _check_invariant(
        self,
        invariant: _Invariant,
        value: Json,
        type_: str | None,
        at: Location,
        out: list[Issue],
        root: bool,
    ) -> None:
        """Evaluate one invariant on one occurrence (its guard has not ruled a failure out)."""
        context = invariant.context or type_
        target = value if root or context is None else _node(value, context)
        try:
            # %resource and %rootResource, which some core invariants use (dom-3, ref-1).
            variables = {"resource": self.resource, "rootResource": self.resource}
            result = invariant.evaluate(target, variables)
        except Exception as error:  # a fhirpathpy failure must not fail a write: reported
            text = f"{invariant.key} could not be evaluated ({error}): {invariant.expression}"
            out.append(self._issue("warning", "processing", text, at, invariant.source))
            return
        if result == [False]:
            text = f"{invariant.key}: {invariant.human}"
            severity = "error" if invariant.severity == "error" else "warning"
            out.append(self._issue(severity, "invariant", text, at, invariant.source))

    def _issue(
        self, severity: str, code: str, text: str, at: Location, source: str | None = None
    ) -> Issue:
        """An issue whose diagnostics name the definition the rule comes from."""
        return _issue(severity, code, f"{text} ({source or self.source})", _text(at))


# --- helpers -----------------------------------------------------------------------------------


def _issue(severity: str, code: str, text: str, at: str | None) -> Issue:
    """An OperationOutcome.issue at a FHIRPath location."""
    issue: Issue = {"severity": severity, "code": code, "diagnostics": text}
    if at is not None:
        issue["expression"] = [at]
    return issue


def _dedupe(issues: list[Issue]) -> list[Issue]:
    """Issues in order, without repeats (a profile and its parent may say the same)."""
    if not issues:
        return issues
    seen: set[tuple[str, str, str, tuple[str, ...]]] = set()
    out = []
    for issue in issues:
        text = issue["diagnostics"].rsplit(" (", 1)[0]
        key = (issue["severity"], issue["code"], text, tuple(issue.get("expression", ())))
        if key not in seen:
            seen.add(key)
            out.append(issue)
    return out


def _text(at: Location) -> str:
    """A location as FHIRPath: `MedicationAdministration.dosage.route`, `Observation.value
    .ofType(Quantity)`, `CarePlan.activity[1].detail`."""
    if isinstance(at, str):
        return at
    parent, step, index = at
    if index is None:
        return f"{_text(parent)}.{step}"
    return f"{_text(parent)}.{step}[{index}]"


def _occurrences(properties: list[tuple[Json, _Key]], at: Location) -> list[_Item]:
    """An element's occurrences in an object: one per array entry, with its index; one without
    a value per extensions of a primitive given without its value."""
    items: list[_Item] = []
    for value, (_, type_, step, extensions, _) in properties:
        if extensions:
            count = len(value) if isinstance(value, list) else 1
            items += [_Item(None, (at, step, None))] * count
        elif isinstance(value, list):
            items += [_Item(v, (at, step, i), type_) for i, v in enumerate(value)]
        else:
            items.append(_Item(value, (at, step, None), type_))
    return items


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


def _type_test(allowed: frozenset[str]) -> _Matcher:
    """Whether an occurrence has one of the allowed types."""
    return lambda _, type_: type_ in allowed


def _exists_test(steps: list[str], wanted: bool) -> _Matcher:
    """Whether an occurrence has (or lacks, as the slice requires) the element at a path."""
    return lambda value, _: _found(value, steps, 0, _MISSING, True) == wanted


def _two_keys_test(first: str, one: str, second: str, other: str) -> _Matcher:
    """What `_value_test([first], one, True)` and then `_value_test([second], other, True)`
    test, in one call: the properties' strings themselves, else `_found` for each."""
    first_steps, second_steps = [first], [second]

    def two_keys(value: Json, _: str | None) -> bool:
        if isinstance(value, dict):
            given = value.get(first)
            if isinstance(given, str):
                if given != one:
                    return False
            elif not _found(value, first_steps, 0, one, True):
                return False
            given = value.get(second)
            if isinstance(given, str):
                return given == other
        elif not _found(value, first_steps, 0, one, True):
            return False
        return _found(value, second_steps, 0, other, True)

    return two_keys


def _value_test(steps: list[str], expected: Json, exact: bool) -> _Matcher:
    """Whether the values at a path below an occurrence include the expected one."""
    # The common discriminators, a string at a path of plain properties: one (Coding: code),
    # two through an array (CodeableConcept: coding.code), or more (component: code.coding
    # .code). `_found` is left the occurrences with arrays in arrays, which it flattens.
    if exact and len(steps) == 1 and isinstance(expected, str):
        key = steps[0]

        def one_key(value: Json, _: str | None) -> bool:
            if isinstance(value, dict):
                given = value.get(key)
                if isinstance(given, str):
                    return given == expected
            return _found(value, steps, 0, expected, exact)

        return one_key
    if exact and len(steps) == 2 and isinstance(expected, str):
        first, second = steps

        def in_entries(value: Json, _: str | None) -> bool:
            entries = value.get(first) if isinstance(value, dict) else None
            if isinstance(entries, list):
                # `type(...) is` first: a plain dict is no list, a plain string neither, and
                # that is cheaper to tell than an isinstance() that fails.
                for entry in entries:
                    if type(entry) is not dict:
                        if isinstance(entry, list):
                            break  # an array in an array: flattened by `_found`
                        if not isinstance(entry, dict):
                            continue
                    given = entry.get(second)
                    if type(given) is not str and isinstance(given, list):
                        break
                    if given == expected:
                        return True
                else:
                    return False
            return _found(value, steps, 0, expected, exact)

        return in_entries
    if exact and isinstance(expected, str):

        def along_path(occurrence: Json, _: str | None) -> bool:
            values = [occurrence]
            for step in steps:
                below: list[Json] = []
                for value in values:
                    if isinstance(value, dict):
                        if step in value:
                            inner = value[step]
                            # A plain dict or string is no list: told without an isinstance().
                            kind = type(inner)
                            if kind is not dict and kind is not str and isinstance(inner, list):
                                below += inner
                            else:
                                below.append(inner)
                    elif isinstance(value, list):
                        return _found(occurrence, steps, 0, expected, exact)  # arrays in arrays
                values = below
            for value in values:
                if type(value) is not str and isinstance(value, list):
                    return _found(occurrence, steps, 0, expected, exact)
            return expected in values

        return along_path
    return lambda value, _: _found(value, steps, 0, expected, exact)


def _found(value: Json, steps: list[str], depth: int, expected: Json, exact: bool) -> bool:
    """Whether a value at a dotted path below a value (through arrays, from `steps[depth]`)
    equals the expected one (exact) or matches it as a pattern; any value for _MISSING.

    It stops at the first: slicing runs it on every occurrence of a sliced element."""
    while True:
        if isinstance(value, list):
            for entry in value:  # noqa: SIM110 (no generator per array)
                if _found(entry, steps, depth, expected, exact):
                    return True
            return False
        if depth == len(steps):
            if expected is _MISSING:
                return True
            return bool(value == expected) if exact else _matches(expected, value)
        if not isinstance(value, dict) or steps[depth] not in value:
            return False
        value = value[steps[depth]]
        depth += 1


def _matches(pattern: Json, value: Json) -> bool:
    """FHIR pattern semantics: everything in the pattern is present in the value."""
    # Loops rather than all() and any() over generators: this runs for every sliced occurrence.
    if isinstance(pattern, dict):
        if not isinstance(value, dict):
            return False
        for key, expected in pattern.items():
            if key not in value or not _matches(expected, value[key]):
                return False
        return True
    if isinstance(pattern, list):
        if not isinstance(value, list):
            return False
        for expected in pattern:
            for entry in value:
                if _matches(expected, entry):
                    break
            else:
                return False
        return True
    return bool(pattern == value)


def _reference_type(reference: Mapping[str, Any]) -> str | None:
    """The resource type a Reference points to, when its `reference` or `type` tells."""
    literal = reference.get("reference")
    if isinstance(literal, str) and not literal.startswith(("#", "urn:")):
        if "_history" in literal:
            parts = literal.split("/")
            if "_history" in parts:
                parts = parts[: parts.index("_history")]
            kind = parts[-2] if len(parts) >= 2 else ""
        else:
            # The next to last step of `literal.split("/")` (Patient/p1: Patient, none of p1),
            # without a list of every step.
            head, slash, _ = literal.rpartition("/")
            kind = head.rpartition("/")[2] if slash else ""
        if kind[:1].isupper() and kind.isalpha():
            return kind
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


# The guards run on every occurrence of their element, so each name is turned into the set of
# JSON properties it occurs as once, and tested with `dict.keys().isdisjoint`, which looks up
# the smaller of the two sets.


def _properties(name: str, *, strict: bool = False) -> frozenset[str]:
    """The JSON properties through which an element occurs in an object (strict: with a value,
    not only extensions): `valueQuantity` ... for `value[x]`, `start` and `_start` for `start`."""
    if name.endswith("[x]"):
        return frozenset(name[:-3] + suffix for suffix in _TYPE_BY_SUFFIX)
    return frozenset((name,) if strict else (name, f"_{name}"))


@cache
def _present(*names: str) -> Callable[[Json], bool]:
    """Guard: the expression can only be false when all these elements are present."""
    wanted = tuple(_properties(n) for n in names)
    if len(wanted) == 1:
        # One element (dom-2 ... dom-5: contained), the commonest: no map() per call.
        (only,) = wanted
        if len(only) == 2:
            # `contained` or `_contained`: two lookups cost less than a keys view's isdisjoint.
            first, second = sorted(only)
            return lambda value: not isinstance(value, dict) or first in value or second in value
        return lambda value: not isinstance(value, dict) or not value.keys().isdisjoint(only)

    def may_fail(value: Json) -> bool:
        if not isinstance(value, dict):
            return True
        keys = value.keys()
        for properties in wanted:  # noqa: SIM110 (a loop, not any(), makes no map per call)
            if keys.isdisjoint(properties):
                return False
        return True

    return may_fail


def _absent(*names: str) -> Callable[[Json], bool]:
    """Guard: the expression can only be false when none of these elements is present."""
    unwanted = frozenset().union(*(_properties(n) for n in names))
    return lambda value: not isinstance(value, dict) or value.keys().isdisjoint(unwanted)


def _given(value: Mapping[str, Any], name: str) -> bool:
    """Whether an element is given in an object as one plain value, without extensions."""
    return name in value and f"_{name}" not in value and not isinstance(value[name], list)


# ISO 8601 dates, and dateTimes to the second or finer with a time zone, with valid fields.
# Two of either with the same length (and zone) compare as text as they compare in time.
_DATE: Final = re.compile(r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])")
_INSTANT: Final = re.compile(
    _DATE.pattern + r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)


def _in_order(start: Json, end: Json) -> bool:
    """Whether `start <= end` is provably true in FHIRPath for two JSON dates or dateTimes:
    ordered as text, of the same form (and time zone), and real days (no 31 April).

    fhirpathpy compares two of the same precision by their POSIX timestamps. Those of local
    times depend on the zone the service runs in (a daylight saving gap can put 02:30 after
    03:10), so a dateTime needs its time zone; dates are local midnights a day or more apart,
    which no zone's offset change (at most a day, Samoa 2011) puts out of order.
    """
    if not (isinstance(start, str) and isinstance(end, str)):
        return False
    if len(start) != len(end) or start > end:
        return False
    if len(start) == 10:
        form = _DATE
    else:
        form = _INSTANT
        zone = 1 if start.endswith("Z") else 6
        if start[-zone:] != end[-zone:]:
            return False
    if form.fullmatch(start) is None or form.fullmatch(end) is None:
        return False
    try:
        datetime.fromisoformat(start)
        datetime.fromisoformat(end)
    except ValueError:
        return False
    return True


def _per_1(value: Json) -> bool:
    """Guard of per-1, `start.hasValue().not() or end.hasValue().not() or (start <= end)`.

    Both must be present for it to be false, and a Period of two ordered instants is the
    common case that still needs a comparison: made here rather than through fhirpathpy.
    """
    if not isinstance(value, dict):
        return True
    if not (("start" in value or "_start" in value) and ("end" in value or "_end" in value)):
        return False
    if _given(value, "start") and _given(value, "end") and "resourceType" not in value:
        return not _in_order(value["start"], value["end"])
    return True


def _ext_1(value: Json) -> bool:
    """Guard of ext-1, `extension.exists() != value.exists()`: false only with both or neither.

    (An object with a resourceType is evaluated as that resource, not as an Extension.)

    fhirpathpy finds value[x] by the first of the R4 type suffixes whose property (or its
    `_` twin) is in the object, and counts it as existing unless it is null or []: a single
    `value...` property holding a JSON scalar or a non-empty object exists, a non-empty list
    of extensions exists, and anything else is evaluated.
    """
    if not isinstance(value, dict) or "_extension" in value or "resourceType" in value:
        return True
    values = [k for k in value if k.startswith(("value", "_value"))]
    extensions = value.get("extension")
    if extensions is None:
        if len(values) != 1 or values[0][5:] not in _TYPE_BY_SUFFIX:
            return True
        given = value[values[0]]
        return not (isinstance(given, str | int | float) or (isinstance(given, dict) and given))
    return bool(values) or not (
        isinstance(extensions, list) and extensions and all(isinstance(e, dict) for e in extensions)
    )


def _ib_mad_1(value: Json) -> bool:
    """Guard of ib-mad-1, `status = 'completed' implies (effective.ofType(Period).start.exists()
    and effective.ofType(Period).end.exists() and dosage.dose.exists())`.

    Only a status of 'completed' can make it false, and a completed infusion with a period of
    start and end and a dose, the common case, makes it true. fhirpathpy takes effective[x]
    as the first type present (effectiveDateTime before effectivePeriod), so no other may be.
    """
    if not isinstance(value, dict) or "_status" in value:
        return True
    if value.get("resourceType") != "MedicationAdministration":
        return True
    status = value.get("status", _MISSING)
    if status is _MISSING or (isinstance(status, str) and status != "completed"):
        return False
    period, dosage = value.get("effectivePeriod"), value.get("dosage")
    return not (
        status == "completed"
        and value.keys().isdisjoint(("effectiveDateTime", "_effectiveDateTime", "_dosage"))
        and _given(value, "effectivePeriod")
        and isinstance(period, dict)
        and _given(period, "start")
        and _given(period, "end")
        and isinstance(period["start"], str)
        and isinstance(period["end"], str)
        and period["start"] != ""
        and period["end"] != ""
        and isinstance(dosage, dict)
        and "_dose" not in dosage
        and isinstance(dosage.get("dose"), dict)
        and bool(dosage["dose"])
    )


_NPI: Final = "http://hl7.org/fhir/sid/us-npi"
_ENTERED_IN_ERROR: Final = "entered-in-error"


def _codes_other_than(concept: Json, code: str) -> bool:
    """Whether a CodeableConcept provably has no coding with this code (for `coding.where(...
    and code = '...')`): plain codings whose codes, if any, are other strings."""
    if not isinstance(concept, dict) or "_coding" in concept:
        return False
    codings = concept.get("coding", [])
    if not isinstance(codings, list):
        return False
    for coding in codings:
        if not isinstance(coding, dict) or "_code" in coding:
            return False
        given = coding.get("code", _MISSING)
        if given is not _MISSING and (not isinstance(given, str) or given == code):
            return False
    return True


def _con_3(value: Json) -> bool:
    """Guard of con-3, `clinicalStatus.exists() or verificationStatus.coding.where(...).exists()
    or category.select($this='problem-list-item').empty()`: true with a clinicalStatus, or
    without a category."""
    if not isinstance(value, dict):
        return True
    clinical = value.get("clinicalStatus")
    if isinstance(clinical, dict) and clinical:
        return False
    return not value.keys().isdisjoint(("category", "_category"))


def _con_5(value: Json) -> bool:
    """Guard of con-5, `verificationStatus.coding.where(system=... and code='entered-in-error')
    .empty() or clinicalStatus.empty()`: true without either, or when no verification coding
    is entered-in-error."""
    if not isinstance(value, dict):
        return True
    keys = value.keys()
    if keys.isdisjoint(("clinicalStatus", "_clinicalStatus")):
        return False
    if keys.isdisjoint(("verificationStatus", "_verificationStatus")):
        return False
    if "_verificationStatus" in value:
        return True
    return not _codes_other_than(value["verificationStatus"], _ENTERED_IN_ERROR)


def _ib_npi_1(value: Json) -> bool:
    """Guard of ib-npi-1, `identifier.where(system = 'http://hl7.org/fhir/sid/us-npi')
    .all(value.matches('^[0-9]{10}$'))`: true without identifiers, or when every plain NPI
    identifier's value is ten digits (other systems, or none, are not selected)."""
    if not isinstance(value, dict):
        return True
    if value.keys().isdisjoint(("identifier", "_identifier")):
        return False
    identifiers = value.get("identifier")
    if "_identifier" in value or not isinstance(identifiers, list):
        return True
    for identifier in identifiers:
        if not isinstance(identifier, dict) or "_system" in identifier or "_value" in identifier:
            return True
        system = identifier.get("system", _MISSING)
        if system is _MISSING or (isinstance(system, str) and system != _NPI):
            continue
        number = identifier.get("value")
        if system != _NPI or not isinstance(number, str) or not _TEN_DIGITS.fullmatch(number):
            return True
    return False


_TEN_DIGITS: Final = re.compile("[0-9]{10}")


def _not_negative(name: str) -> Callable[[Json], bool]:
    """Guard of `name.exists() implies name >= 0` (tim-4, tim-5): true without it, or when it
    is a JSON number that is not negative."""

    def may_fail(value: Json) -> bool:
        if not isinstance(value, dict):
            return True
        if name not in value and f"_{name}" not in value:
            return False
        if not _given(value, name) or "resourceType" in value:
            return True
        number = value[name]
        return not (type(number) in (int, float) and number >= 0)

    return may_fail


_GUARDS: Final[dict[str, Callable[[Json], bool]]] = {
    # Read off each core expression; the general forms are derived in `_guard`.
    "dom-3": _present("contained"),  # contained.where(...).empty()
    "dom-4": _present("contained"),  # contained.meta.versionId.empty() and contained.meta...
    "per-1": _per_1,
    "ext-1": _ext_1,
    "ib-mad-1": _ib_mad_1,
    "tim-4": _not_negative("duration"),
    "tim-5": _not_negative("period"),
    "con-3": _con_3,
    "con-5": _con_5,
    "ib-npi-1": _ib_npi_1,
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
        not isinstance(value, dict)
        or (ref if isinstance(ref := value.get("reference", ""), str) else str(ref)).startswith("#")
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

    absent_properties = tuple(_properties(n) for n in absent)
    # A property with a value makes exists() true; one with only extensions may not.
    present_properties = frozenset().union(*(_properties(n, strict=True) for n in present))

    def may_fail(value: Json) -> bool:
        if not isinstance(value, dict):
            return True
        keys = value.keys()
        for properties in absent_properties:  # a loop, not any(), makes no map per call
            if keys.isdisjoint(properties):
                return False
        return keys.isdisjoint(present_properties)

    return may_fail
