"""Records to a FHIR transaction Bundle, with no database: what `infusion-bridge map` prints.

Pure. A session is mapped with its course and a course with its sessions, all from the same set
of records; a session whose course is not among them cannot be mapped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from mappings.context import MappingContext, Resource
from mappings.organization import organization
from mappings.records import MissingContext, resources_for
from service.records.models import InfusionSession, RecordModel, TreatmentCourse


def map_records(records: Sequence[RecordModel], *, context: MappingContext) -> Iterator[Resource]:
    """Every resource the records map to, the clinic's Organization first, each once."""
    courses = {r.external_id: r for r in records if isinstance(r, TreatmentCourse)}
    sessions_of: dict[str, list[InfusionSession]] = {}
    for record in records:
        if isinstance(record, InfusionSession):
            sessions_of.setdefault(record.course, []).append(record)
    unique: dict[tuple[str, str], Resource] = {}
    unique[("Organization", "")] = organization(context=context)
    for record in records:
        if isinstance(record, InfusionSession) and record.course not in courses:
            raise MissingContext(
                f"session {record.external_id}: its course {record.course} is not in the input"
            )
        mapped = resources_for(
            record,
            context=context,
            course=courses.get(record.course) if isinstance(record, InfusionSession) else None,
            sessions=sorted(
                sessions_of.get(record.external_id, []),
                key=lambda s: (s.scheduled_start, s.external_id),
            )
            if isinstance(record, TreatmentCourse)
            else (),
        )
        # A record sent twice maps twice: the later version wins, in its first place.
        for resource in mapped:
            unique[(resource["resourceType"], resource["id"])] = resource
    yield from unique.values()


def transaction_bundle(resources: Iterable[Resource], *, base: str | None = None) -> Resource:
    """A transaction that creates or updates each resource at its own id (PUT: idempotent)."""
    entries: list[dict[str, Any]] = []
    for resource in resources:
        url = f"{resource['resourceType']}/{resource['id']}"
        entry: dict[str, Any] = {}
        if base is not None:
            entry["fullUrl"] = f"{base.rstrip('/')}/{url}"
        entry["resource"] = resource
        entry["request"] = {"method": "PUT", "url": url}
        entries.append(entry)
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
