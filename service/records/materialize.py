"""Materialization: the FHIR resources of every record change, written in the same transaction.

After a unit of work writes records, `Materializer.apply` maps each changed record (and the
records whose resources depend on it: a course's CarePlan shows its sessions' progress, a session's
resources name its course's patient, indication and standing order), validates every resource
version about to be stored, writes new versions of those whose content changed, deletes those a
record no longer yields, adds a Provenance per record change and an outbox row per version.
Nothing is mapped on read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, select

from mappings.context import MappingContext, Resource
from mappings.organization import organization
from mappings.provenance import provenance
from mappings.records import resources_for
from service.errors import InvalidRecord, Problem
from service.records.models import InfusionSession, RecordModel, TreatmentCourse
from service.records.repository import RecordRepository, RecordVersion
from service.store.resources import Key, ResourceRepository, WrittenResource
from service.store.tables import records

RecordKey = tuple[str, str]
Validate = Callable[[Resource], Sequence[str]]
"""Returns the errors found in a resource (none: it may be stored)."""


@dataclass
class _Plan:
    """What to map: records by key, and which change each mapping is attributed to."""

    records: dict[RecordKey, RecordModel] = field(default_factory=dict)
    cause: dict[RecordKey, RecordKey] = field(default_factory=dict)
    courses: dict[str, TreatmentCourse] = field(default_factory=dict)
    sessions_of: dict[str, list[InfusionSession]] = field(default_factory=dict)


@dataclass(frozen=True)
class Materializer:
    """Maps, validates and stores the resources of record changes; built at the composition root."""

    context: MappingContext
    validate: Validate

    def apply(
        self, connection: Connection, changes: Sequence[RecordVersion], *, now: datetime
    ) -> list[WrittenResource]:
        """Write the resources of `changes` on the caller's connection; the caller commits."""
        if not changes:
            return []
        plan = _plan(RecordRepository(connection), changes)
        resources = ResourceRepository(connection)
        mapped: dict[RecordKey, list[Resource]] = {}
        for key, record in plan.records.items():
            mapped[key] = resources_for(
                record,
                context=self.context,
                course=plan.courses.get(record.course)
                if isinstance(record, InfusionSession)
                else None,
                sessions=plan.sessions_of.get(record.external_id, ())
                if isinstance(record, TreatmentCourse)
                else (),
            )
        batch = [organization(context=self.context)]
        for items in mapped.values():
            batch += items
        written = resources.write(batch, now=now, validate=self._checked)
        by_resource = {(w.resource_type, w.id): w for w in written}

        links_by_kind: dict[str, dict[str, set[Key]]] = {}
        for kind in {key[0] for key in mapped}:
            ids = [key[1] for key in mapped if key[0] == kind]
            links_by_kind[kind] = resources.links(kind, ids)
        added: list[tuple[str, str, str, str]] = []
        gone: list[tuple[str, str, str, str]] = []
        for key, items in mapped.items():
            now_keys = {(r["resourceType"], r["id"]) for r in items}
            before = links_by_kind[key[0]][key[1]]
            added += [(*key, *resource) for resource in now_keys - before]
            gone += [(*key, *resource) for resource in before - now_keys]
        removed = resources.delete({(g[2], g[3]) for g in gone}, now=now)
        resources.relink(added=added, removed=gone)
        for item in removed:
            by_resource[(item.resource_type, item.id)] = item

        provenances = self._provenances(plan, mapped, gone, by_resource, changes, now)
        return written + removed + resources.write(provenances, now=now, validate=self._checked)

    def _checked(self, resource: Resource) -> None:
        errors = self.validate(resource)
        if errors:
            # The record passed its own checks, so this is a mapping fault; refuse the write
            # rather than store a resource that breaks what the service promises.
            where = f"{resource['resourceType']}/{resource['id']}"
            raise InvalidRecord(
                [Problem((), "fhir_invalid", f"maps to an invalid {where}: {e}") for e in errors]
            )

    def _provenances(
        self,
        plan: _Plan,
        mapped: dict[RecordKey, list[Resource]],
        gone: Sequence[tuple[str, str, str, str]],
        written: dict[Key, WrittenResource],
        changes: Sequence[RecordVersion],
        now: datetime,
    ) -> list[Resource]:
        """A Provenance per record change, naming every version it wrote, deletions included."""
        touched = [
            (plan.cause[key], (resource["resourceType"], resource["id"]))
            for key, items in mapped.items()
            for resource in items
        ]
        touched += [(plan.cause[(kind, rid)], (rtype, res)) for kind, rid, rtype, res in gone]
        targets: dict[RecordKey, list[tuple[str, str, int]]] = {}
        for cause, resource_key in touched:
            item = written.get(resource_key)
            if item is not None:
                targets.setdefault(cause, []).append((item.resource_type, item.id, item.version))
        out = []
        for change in changes:
            key = (change.stored.kind, change.stored.external_id)
            if targets.get(key):
                out.append(
                    provenance(
                        kind=key[0],
                        external_id=key[1],
                        version=change.stored.version,
                        targets=targets[key],
                        recorded=now,
                        changed_by=change.stored.updated_by,
                        context=self.context,
                    )
                )
        return out


def _plan(repository: RecordRepository, changes: Sequence[RecordVersion]) -> _Plan:
    """The records to map for `changes`, with the courses and sessions their mappings need."""
    plan = _Plan()
    for change in changes:
        key = (change.stored.kind, change.stored.external_id)
        plan.records[key] = change.record
        plan.cause[key] = key
    changed_courses = {k[1] for k in plan.records if k[0] == "course"}
    session_courses = {r.course for r in plan.records.values() if isinstance(r, InfusionSession)}
    # A session moved to another course: the course it left re-maps too (its plan loses it).
    left = {
        change.previous.course_id
        for change in changes
        if change.stored.kind == "session"
        and change.previous is not None
        and change.previous.course_id is not None
        and change.previous.course_id != change.stored.course_id
    }
    course_ids = changed_courses | session_courses | {c for c in left if c is not None}
    if not course_ids:
        return plan
    known = {key[1]: r for key, r in plan.records.items() if isinstance(r, TreatmentCourse)}
    missing = {("course", c) for c in course_ids - set(known)}
    for stored in repository.get_many(missing).values():
        course = TreatmentCourse.model_validate_json(stored.body)
        known[course.external_id] = course
    plan.courses = known
    sessions = {key[1]: r for key, r in plan.records.items() if isinstance(r, InfusionSession)}
    for external_id, body in _session_bodies(repository, course_ids, exclude=set(sessions)):
        sessions[external_id] = InfusionSession.model_validate_json(body)
    for session in sorted(sessions.values(), key=lambda s: (s.scheduled_start, s.external_id)):
        plan.sessions_of.setdefault(session.course, []).append(session)

    # A changed session re-maps its course's CarePlan; a changed course re-maps its sessions.
    for course_id in course_ids:
        course_key = ("course", course_id)
        if course_key not in plan.records and course_id in plan.courses:
            plan.records[course_key] = plan.courses[course_id]
            plan.cause[course_key] = _session_cause(course_id, changes)
    for course_id in changed_courses:
        for session in plan.sessions_of.get(course_id, []):
            session_key = ("session", session.external_id)
            if session_key not in plan.records:
                plan.records[session_key] = session
                plan.cause[session_key] = ("course", course_id)
    return plan


def _session_cause(course_id: str, changes: Sequence[RecordVersion]) -> RecordKey:
    """The session change a course's re-mapping is attributed to: one that joined or left it."""
    for change in changes:
        if change.stored.kind != "session":
            continue
        before = change.previous.course_id if change.previous is not None else None
        if course_id in (change.stored.course_id, before):
            return ("session", change.stored.external_id)
    raise AssertionError(f"course {course_id} re-mapped without a session change")


def _session_bodies(
    repository: RecordRepository, course_ids: set[str], *, exclude: set[str]
) -> list[tuple[str, str]]:
    rows = repository.connection.execute(
        select(records.c.external_id, records.c.body).where(
            records.c.kind == "session", records.c.course_id.in_(sorted(course_ids))
        )
    )
    return [(row.external_id, row.body) for row in rows if row.external_id not in exclude]
