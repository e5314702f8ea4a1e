"""What every mapping needs besides the record: ids, identifiers, references and terminology.

Mappings are pure functions from records plus a `MappingContext` to FHIR R4 resources, as
JSON-ready dicts in the element order of the specification. The context carries the site's
identifier systems, its organization and its terminology; nothing here reads settings.

Resource ids are stable: a UUIDv5 of the record's kind, external id and the resource's role
within the record, so re-mapping a record yields the same ids.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from mappings.terminology import Terminology, load_terminology

Resource = dict[str, Any]
"""A FHIR resource as JSON-ready data."""

CANONICAL = "http://infusion-bridge.org/fhir"
"""Base of the canonical URLs of the conformance resources the service publishes."""

NAMESPACE = uuid.UUID("5d0f3a84-8f0c-5c3e-9a51-7b1c0d6e2f10")
"""The UUIDv5 namespace of resource ids."""


def profile_url(name: str) -> str:
    return f"{CANONICAL}/StructureDefinition/{name}"


class Profiles:
    """Canonical URLs of the profiles every emitted resource claims in `meta.profile`."""

    PATIENT = profile_url("ib-patient")
    PRACTITIONER = profile_url("ib-practitioner")
    CONDITION = profile_url("ib-indication-condition")
    CARE_PLAN = profile_url("ib-treatment-course-careplan")
    MEDICATION_REQUEST = profile_url("ib-standing-order-medicationrequest")
    GOAL = profile_url("ib-treatment-goal")
    ENCOUNTER = profile_url("ib-infusion-encounter")
    MEDICATION_ADMINISTRATION = profile_url("ib-infusion-medicationadministration")
    SCORE_OBSERVATION = profile_url("ib-score-observation")
    QUESTIONNAIRE_RESPONSE = profile_url("ib-score-questionnaireresponse")
    ADVERSE_EVENT = profile_url("ib-infusion-adverseevent")
    PROVENANCE = profile_url("ib-provenance")
    ORGANIZATION = profile_url("ib-organization")
    TREATMENT_RESISTANT = profile_url("treatment-resistant")
    # Vital signs claim the core R4 profiles.
    VITAL_SIGNS = "http://hl7.org/fhir/StructureDefinition/vitalsigns"
    BLOOD_PRESSURE = "http://hl7.org/fhir/StructureDefinition/bp"
    HEART_RATE = "http://hl7.org/fhir/StructureDefinition/heartrate"
    RESPIRATORY_RATE = "http://hl7.org/fhir/StructureDefinition/resprate"
    OXYGEN_SATURATION = "http://hl7.org/fhir/StructureDefinition/oxygensat"
    BODY_WEIGHT = "http://hl7.org/fhir/StructureDefinition/bodyweight"
    BODY_TEMPERATURE = "http://hl7.org/fhir/StructureDefinition/bodytemp"


@lru_cache(maxsize=1 << 16)
def resource_id(kind: str, external_id: str, *role: str) -> str:
    """The stable id of the resource a record (or a part of it, named by `role`) maps to."""
    # Cached: the same patient, course and encounter ids are derived for every resource that
    # references them, and UUIDv5 hashing was a tenth of the mapping time.
    return str(uuid.uuid5(NAMESPACE, "/".join((kind, external_id, *role))))


@dataclass(frozen=True)
class MappingContext:
    """Site configuration the mappings need, passed in explicitly."""

    identifier_system: str = "http://infusion-bridge.org/fhir/sid"
    """Base URI of the site's business identifier systems: `{base}/{kind}` per record kind."""
    mrn_system: str = "http://infusion-bridge.org/fhir/sid/mrn"
    organization_name: str = "Infusion Bridge Clinic"
    organization_id: str = "clinic"
    terminology: Terminology = field(default_factory=load_terminology)

    def system(self, kind: str) -> str:
        return f"{self.identifier_system.rstrip('/')}/{kind}"

    def identifier(self, kind: str, external_id: str, *role: str) -> dict[str, str]:
        """The business identifier of a record's resource in the site's system for `kind`."""
        value = "/".join((external_id, *role))
        return {"system": self.system(kind), "value": value}

    @property
    def organization_reference(self) -> dict[str, str]:
        return {
            "reference": f"Organization/{resource_id('organization', self.organization_id)}",
            "display": self.organization_name,
        }


def reference(resource_type: str, kind: str, external_id: str, *role: str) -> dict[str, str]:
    """A literal reference to the resource a record maps to."""
    return {"reference": f"{resource_type}/{resource_id(kind, external_id, *role)}"}


def coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    out = {"system": system, "code": code}
    if display is not None:
        out["display"] = display
    return out


def concept(*codings: dict[str, str], text: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if codings:
        out["coding"] = list(codings)
    if text is not None:
        out["text"] = text
    return out


def meta(profile: str) -> dict[str, list[str]]:
    return {"profile": [profile]}


UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
NPI = "http://hl7.org/fhir/sid/us-npi"


def quantity(value: float | int, unit: str, code: str | None = None) -> dict[str, Any]:
    """A UCUM quantity; `unit` is the human form, `code` the UCUM code (default: the unit)."""
    return {"value": value, "unit": unit, "system": UCUM, "code": code or unit}


def instant(value: Any) -> str:
    """A date or datetime as FHIR text, keeping the record's own offset."""
    return str(value.isoformat())
