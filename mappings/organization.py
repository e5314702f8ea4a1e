"""The clinic itself as a FHIR Organization. Pure: everything comes from the context."""

from __future__ import annotations

from mappings.context import MappingContext, Profiles, Resource, meta, resource_id


def organization(*, context: MappingContext) -> Resource:
    """The clinic as the Organization that manages patients and records every change."""
    return {
        "resourceType": "Organization",
        "id": resource_id("organization", context.organization_id),
        "meta": meta(Profiles.ORGANIZATION),
        "identifier": [context.identifier("organization", context.organization_id)],
        "active": True,
        "type": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                        "code": "prov",
                        "display": "Healthcare Provider",
                    }
                ]
            }
        ],
        "name": context.organization_name,
    }
