"""Which way each resource type goes to an EHR, from its CapabilityStatement and the overrides.

Pure: a CapabilityStatement (JSON) and a destination in, a `Plan` out. The order of preference:
transaction Bundles of conditional updates where the server takes both; conditional update by
business identifier; plain create and update with the ledger of remote ids; and, for a type the
EHR cannot take, the DocumentReference summary where one exists (MedicationAdministration and
score Observations), else nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from service.sync.destinations import Destination, Strategy

FALLBACK_TYPES = frozenset({"MedicationAdministration", "Observation"})
"""Types whose content the DocumentReference summary carries when the EHR cannot take them."""


@dataclass(frozen=True)
class TypeSupport:
    """What the EHR's CapabilityStatement says about one resource type."""

    interactions: frozenset[str] = frozenset()
    conditional_update: bool = False
    search_params: frozenset[str] | None = None
    """None: the statement lists none (then `identifier`, common to most types, is assumed)."""
    update_create: bool = False

    @property
    def writable(self) -> bool:
        return bool({"create", "update"} & self.interactions)

    def searches_by(self, name: str) -> bool:
        """Whether a search may name parameter `name`: listed, or nothing is listed."""
        return self.search_params is None or name in self.search_params

    @property
    def identifier_search(self) -> bool:
        return self.searches_by("identifier")

    @property
    def idempotent_put(self) -> bool:
        """A PUT of our own id creates or updates: safe to repeat."""
        return self.update_create and "update" in self.interactions


@dataclass(frozen=True)
class Capabilities:
    types: dict[str, TypeSupport] = field(default_factory=dict)
    transaction: bool = False

    def of(self, resource_type: str) -> TypeSupport:
        return self.types.get(resource_type, TypeSupport())


def read_capabilities(statement: dict[str, Any]) -> Capabilities:
    """The server side (`rest.mode` server) of a CapabilityStatement."""
    types: dict[str, TypeSupport] = {}
    transaction = False
    for rest in statement.get("rest") or []:
        if not isinstance(rest, dict) or rest.get("mode", "server") != "server":
            continue
        for item in rest.get("interaction") or []:
            if isinstance(item, dict) and item.get("code") == "transaction":
                transaction = True
        for resource in rest.get("resource") or []:
            if not isinstance(resource, dict) or not isinstance(resource.get("type"), str):
                continue
            codes = frozenset(
                str(i.get("code")) for i in resource.get("interaction") or [] if isinstance(i, dict)
            )
            listed = resource.get("searchParam")
            params = (
                frozenset(str(p.get("name")) for p in listed if isinstance(p, dict))
                if isinstance(listed, list) and listed
                else None
            )
            types[resource["type"]] = TypeSupport(
                interactions=codes,
                conditional_update=resource.get("conditionalUpdate") is True,
                search_params=params,
                update_create=resource.get("updateCreate") is True,
            )
    return Capabilities(types=types, transaction=transaction)


def choose(
    resource_type: str, capabilities: Capabilities, overrides: dict[str, Strategy]
) -> Strategy:
    """The strategy for one type: the override, else the best the EHR supports."""
    if resource_type in overrides:
        return overrides[resource_type]
    support = capabilities.of(resource_type)
    by_identifier = support.conditional_update and support.identifier_search
    if "update" in support.interactions and (by_identifier or support.update_create):
        if capabilities.transaction:
            return Strategy.transaction
        if by_identifier:
            return Strategy.conditional_update
    if support.writable:
        return Strategy.ledger
    if resource_type in FALLBACK_TYPES and capabilities.of("DocumentReference").writable:
        return Strategy.document_reference
    return Strategy.unsupported


@dataclass(frozen=True)
class Plan:
    """The strategy per resource type for one destination, as shown by status and the CLI."""

    strategies: dict[str, Strategy]
    capabilities: Capabilities

    def of(self, resource_type: str) -> Strategy:
        return self.strategies.get(resource_type, Strategy.unsupported)

    def as_json(self) -> dict[str, str]:
        return {name: strategy.value for name, strategy in sorted(self.strategies.items())}


EMITTED_TYPES = (
    "Patient",
    "Practitioner",
    "Organization",
    "Condition",
    "Encounter",
    "MedicationRequest",
    "Goal",
    "CarePlan",
    "MedicationAdministration",
    "Observation",
    "QuestionnaireResponse",
    "AdverseEvent",
    "Provenance",
)
"""Every type the service emits, in the order a lane delivers them: referenced types first."""


def plan(
    destination: Destination, statement: dict[str, Any], *, types: Iterable[str] = EMITTED_TYPES
) -> Plan:
    capabilities = read_capabilities(statement)
    wanted = [t for t in types if destination.sends(t)]
    strategies = {t: choose(t, capabilities, dict(destination.strategy)) for t in wanted}
    # Patient: matched, never written unless the site says to create missing patients.
    if "Patient" in strategies and not destination.patients.create_missing:
        strategies["Patient"] = Strategy.unsupported
    return Plan(strategies=strategies, capabilities=capabilities)
