"""Provenance of each record change: which resources it wrote, when, and on whose behalf.

Pure: the caller passes the resources written (with the versions the store gave them), the
change's time and who made it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from mappings.context import MappingContext, Profiles, Resource, coding, meta, resource_id

DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PROVENANCE_AGENT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"


def provenance(
    *,
    kind: str,
    external_id: str,
    version: int,
    targets: Sequence[tuple[str, str, int]],
    recorded: datetime,
    changed_by: str,
    context: MappingContext,
) -> Resource:
    """A record version as the Provenance of the resource versions it produced.

    `targets` are (resource type, id, version) of every resource the change created or updated.
    """
    operation = "CREATE" if version == 1 else "UPDATE"
    agent: dict[str, Any] = {
        "type": {"coding": [coding(PROVENANCE_AGENT_TYPE, "author", "Author")]},
        "who": context.organization_reference,
    }
    return {
        "resourceType": "Provenance",
        "id": resource_id("provenance", kind, external_id, str(version)),
        "meta": meta(Profiles.PROVENANCE),
        "target": [
            {"reference": f"{resource_type}/{resource_id_}/_history/{resource_version}"}
            for resource_type, resource_id_, resource_version in targets
        ],
        "recorded": recorded.isoformat(),
        "activity": {"coding": [coding(DATA_OPERATION, operation)]},
        "agent": [agent],
        "entity": [
            {
                "role": "source",
                "what": {
                    "identifier": context.identifier(kind, external_id),
                    "display": f"clinic {kind} record {external_id}, version {version}, "
                    f"from {changed_by}",
                },
            }
        ],
    }
