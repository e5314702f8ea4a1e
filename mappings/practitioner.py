"""Clinician records as FHIR Practitioners. Pure: no database, HTTP or settings."""

from __future__ import annotations

from typing import Any

from mappings.context import NPI, MappingContext, Profiles, Resource, concept, meta, resource_id
from service.records.models import Clinician


def practitioner(record: Clinician, *, context: MappingContext) -> Resource:
    """A Clinician as the Practitioner who prescribes, supervises or administers infusions."""
    identifiers: list[dict[str, Any]] = [context.identifier("clinician", record.external_id)]
    if record.npi is not None:
        identifiers.append({"system": NPI, "value": record.npi})
    role = record.role.value
    display = context.terminology.own("clinician-role", role)
    codings = (*context.terminology.mapped("clinician-role", role), display)
    return {
        "resourceType": "Practitioner",
        "id": resource_id("clinician", record.external_id),
        "meta": meta(Profiles.PRACTITIONER),
        "identifier": identifiers,
        "active": True,
        "name": [
            {
                "use": "official",
                "text": " ".join([*record.name.given, record.name.family]),
                "family": record.name.family,
                "given": list(record.name.given),
            }
        ],
        # R4 Practitioner has no role element (that is PractitionerRole); the clinical role is
        # what the practitioner is qualified as.
        "qualification": [{"code": concept(*codings, text=display["display"])}],
    }
