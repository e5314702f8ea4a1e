"""The CapabilityStatement at /fhir/metadata, generated from what the facade's modules implement.

Each facade module states what it implements (the read side `READ_INTERACTIONS`, writes
`WRITE_INTERACTIONS` and the conditional flags, Bundles, the operations of `$export` and
`$everything`), and the search parameters come from the same definitions the search engine and
the index use, so the statement cannot promise what is not there. This module sits above those
modules (they must not import it).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from mappings.fhir import FHIR_VERSION
from service.fhir import export, writes
from service.fhir.api import (
    CONFORMANCE_TYPES,
    READ_INTERACTIONS,
    STORED_TYPES,
    ConformanceDep,
    ConformanceResources,
    Negotiated,
)
from service.fhir.errors import FHIR_JSON
from service.fhir.search_parameters import definitions

VALIDATE = {
    "name": "validate",
    "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
}
SYSTEM_INTERACTIONS = ("transaction", "batch")


def capability_statement(base: str, conformance: ConformanceResources) -> dict[str, Any]:
    """What the facade implements, generated from the same lists that route requests."""
    resources: list[dict[str, Any]] = []
    for resource_type in sorted((*STORED_TYPES, *CONFORMANCE_TYPES)):
        stored = resource_type in STORED_TYPES
        entry: dict[str, Any] = {"type": resource_type}
        profiles = conformance.profiles_by_type.get(resource_type)
        if profiles:
            entry["supportedProfile"] = sorted(profiles)
        written = writes.write_interactions(resource_type) if stored else ()
        interactions = (*READ_INTERACTIONS, *written) if stored else ("read",)
        entry["interaction"] = [{"code": code} for code in interactions]
        entry["versioning"] = "versioned-update" if stored else "no-version"
        entry["readHistory"] = stored
        if stored:
            # The conditional and create-on-update flags only where the write they qualify is
            # there (a read-only type, the audit trail, says none of them).
            if "update" in written:
                entry["updateCreate"] = writes.UPDATE_CREATE
            if "create" in written:
                entry["conditionalCreate"] = writes.CONDITIONAL_CREATE
            entry["conditionalRead"] = "full-support"
            if "update" in written:
                entry["conditionalUpdate"] = writes.CONDITIONAL_UPDATE
            if "delete" in written:
                entry["conditionalDelete"] = writes.CONDITIONAL_DELETE
            entry.update(search_capabilities(resource_type))
            operations = [VALIDATE]
            if resource_type == "Patient":
                operations += export.PATIENT_OPERATIONS
            entry["operation"] = operations
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "publisher": "Infusion Bridge",
        "kind": "instance",
        "software": {"name": "Infusion Bridge"},
        "implementation": {"description": "Infusion Bridge FHIR facade", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "patchFormat": list(writes.PATCH_FORMATS),
        "rest": [
            {
                "mode": "server",
                "resource": resources,
                "interaction": [{"code": code} for code in SYSTEM_INTERACTIONS],
                "operation": export.SYSTEM_OPERATIONS,
            }
        ],
    }


def search_capabilities(resource_type: str) -> dict[str, Any]:
    """searchParam, searchInclude and searchRevInclude of a stored type, from the definitions."""
    catalogue = definitions()
    own = catalogue.by_type.get(resource_type, {})
    params = [
        {"name": code, "definition": parameter.url, "type": parameter.type}
        for code, parameter in sorted(own.items())
    ]
    includes = sorted(f"{resource_type}:{code}" for code, p in own.items() if p.type == "reference")
    reverse = sorted(
        f"{source}:{code}"
        for source, parameters in catalogue.by_type.items()
        if source in STORED_TYPES
        for code, p in parameters.items()
        if p.type == "reference" and (not p.targets or resource_type in p.targets)
    )
    return {"searchInclude": includes, "searchRevInclude": reverse, "searchParam": params}


def build_capability_router() -> APIRouter:
    router = APIRouter(prefix="/fhir", tags=["fhir"], dependencies=[Negotiated])

    @router.get("/metadata", summary="The CapabilityStatement", response_class=Response)
    async def metadata(request: Request, conformance: ConformanceDep) -> Response:
        base = str(request.base_url).rstrip("/") + "/fhir"
        body = capability_statement(base, conformance)
        if request.app.state.services.settings.auth_disabled is False:
            from service.security.api import rest_security

            body["rest"][0]["security"] = rest_security(base.removesuffix("/fhir"))
        return Response(orjson.dumps(body), media_type=FHIR_JSON)

    return router
