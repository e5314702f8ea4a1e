"""Care-plan sync from an EHR: pulled CarePlans merged into the courses they plan.

Plans arrive two ways: the worker polls `CarePlan?_lastUpdated=ge<cursor>` (optionally by
category) or, for EHRs that search CarePlans only within a patient (`by_patient`),
`CarePlan?patient=<id>&_lastUpdated=ge<its cursor>` for each EHR Patient delivery has matched,
and EHRs send R4 Subscriptions Backport notifications (a `history` Bundle whose first
entry is the status Parameters) to `POST /api/v1/sync/notifications/{destination}`. A handshake
starts the event count, a heartbeat or event-notification whose event number skips ahead marks a
catch-up poll (of every patient, with `by_patient`) as due; full-resource notifications are
applied at once.

A pulled plan goes through `mappings.care_plan.course_from_care_plan` and is merged field by
field with the course (`merge`): the EHR owns the plan (status, period, schedule and dose order,
notes), the clinic owns progress (sessions, activity status and outcomes are never read back).
Where both sides changed a field since the version they last agreed on (the one last pushed or
pulled), the clinic's value stays and the conflict is recorded. A version written from a pull is
marked in the ledger as the EHR's, so the worker does not push it back; a remote version the
worker wrote itself is recognised by its version id and not pulled back as new.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, select

from mappings.care_plan import course_from_care_plan
from mappings.context import resource_id
from mappings.unsupported import UnsupportedContent
from service.errors import InvalidRecord
from service.records.materialize import Materializer
from service.records.models import TreatmentCourse
from service.records.repository import RecordRepository, RecordVersion
from service.records.service import load, repository_lookup, write_record
from service.store.db import Database
from service.store.tables import search_token
from service.sync import ledger as store
from service.sync.client import DeliveryError, EhrClient
from service.sync.destinations import Destination
from service.sync.outbound import references, relative_key

log = logging.getLogger("service.sync.care_plans")

Resource = dict[str, Any]

EHR_OWNED = ("status", "start_date", "end_date", "protocol", "notes")
"""Course fields the EHR's plan decides; everything else is the clinic's."""


@dataclass(frozen=True)
class Conflict:
    field: str
    clinic: Any
    ehr: Any
    base: Any


def merge(
    *, base: TreatmentCourse, clinic: TreatmentCourse, ehr: TreatmentCourse
) -> tuple[TreatmentCourse, list[Conflict]]:
    """Three-way merge of the EHR-owned fields; the clinic's value stays where both changed."""
    was = base.model_dump(mode="json")
    ours = clinic.model_dump(mode="json")
    theirs = ehr.model_dump(mode="json")
    merged = dict(ours)
    conflicts = []
    for name in EHR_OWNED:
        b, c, e = was.get(name), ours.get(name), theirs.get(name)
        if e in (b, c):
            continue
        if c == b:
            merged[name] = e
        else:
            conflicts.append(Conflict(name, c, e, b))
    return TreatmentCourse.model_validate(merged), conflicts


class NotificationError(ValueError):
    """A notification that is not an R4 Subscriptions Backport history Bundle."""


@dataclass(frozen=True)
class Notification:
    type: str
    events_since_start: int | None
    event_numbers: tuple[int, ...]
    resources: tuple[Resource, ...]


def _int(part: dict[str, Any]) -> int | None:
    for name in ("valueInteger64", "valueString", "valueUnsignedInt", "valueInteger"):
        if name in part:
            try:
                return int(part[name])
            except (TypeError, ValueError):
                raise NotificationError(f"{part.get('name')} is not a number") from None
    return None


def parse_notification(bundle: Any) -> Notification:
    """The status Parameters and resources of a Subscriptions Backport notification."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise NotificationError("a notification is a Bundle")
    if bundle.get("type") != "history":
        raise NotificationError("a notification Bundle has type history")
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)]
    status = entries[0].get("resource") if entries else None
    if not isinstance(status, dict) or status.get("resourceType") != "Parameters":
        raise NotificationError("the first entry of a notification is the status Parameters")
    kind = None
    since = None
    numbers = []
    for part in status.get("parameter") or []:
        if not isinstance(part, dict):
            continue
        name = part.get("name")
        if name == "type":
            kind = part.get("valueCode")
        elif name == "events-since-subscription-start":
            since = _int(part)
        elif name == "notification-event":
            for sub in part.get("part") or []:
                if isinstance(sub, dict) and sub.get("name") == "event-number":
                    number = _int(sub)
                    if number is not None:
                        numbers.append(number)
    if kind not in ("handshake", "heartbeat", "event-notification", "query-status", "query-event"):
        raise NotificationError(f"unknown notification type {kind!r}")
    resources = tuple(
        e["resource"]
        for e in entries[1:]
        if isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") == "CarePlan"
    )
    return Notification(str(kind), since, tuple(sorted(numbers)), resources)


@dataclass(frozen=True)
class _Pulled:
    seen: int
    changed: int
    cursor: str | None
    """The newest `lastUpdated` seen, or the cursor searched from."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class CarePlanSync:
    """Applies pulled CarePlans; polls EHRs (from the worker) and takes notifications (API)."""

    def __init__(
        self,
        *,
        database: Database,
        materializer: Materializer,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.database = database
        self.materializer = materializer
        self.clock = clock

    # polling -------------------------------------------------------------------------------

    def poll_if_due(self, destination: Destination, client: EhrClient) -> int:
        config = destination.care_plan_sync
        if config is None:
            return 0
        with self.database.unit_of_work(write=False) as uow:
            state = store.destination_state(uow.connection, destination.name)
        now = self.clock()
        due = (
            state is None
            or state.pull_requested
            or state.last_pull_at is None
            or (now - state.last_pull_at).total_seconds() >= config.poll_interval_seconds
        )
        return self.poll(destination, client) if due else 0

    def poll(self, destination: Destination, client: EhrClient) -> int:
        """Pull CarePlans changed since the cursor, or each patient's; how many changed a course.

        With `by_patient`, a patient whose search fails keeps its cursor and is searched again
        at the next poll; the others' progress is saved as each one is done.
        """
        config = destination.care_plan_sync
        by_patient = config is not None and config.by_patient
        name = destination.name
        with self.database.unit_of_work(write=True) as uow:
            store.ensure_destinations(uow.connection, [destination])
            state = store.destination_state(uow.connection, name)
            patients = store.patient_cursors(uow.connection, name) if by_patient else []
            uow.commit()
        started = self.clock()
        values: dict[str, Any] = {"last_pull_at": started, "pull_requested": False}
        if by_patient:
            seen, changed, failed = self._poll_patients(destination, client, patients)
        else:
            pulled = self._pull(
                destination, client, state.care_plan_cursor if state is not None else None
            )
            seen, changed, failed = pulled.seen, pulled.changed, 0
            values["care_plan_cursor"] = pulled.cursor
        with self.database.unit_of_work(write=True) as uow:
            store.update_destination(uow.connection, name, **values)
            uow.commit()
        log.info(
            "care plans polled",
            extra={
                "destination": name,
                "patients": len(patients) if by_patient else None,
                "failed": failed,
                "seen": seen,
                "changed": changed,
            },
        )
        return changed

    def _poll_patients(
        self,
        destination: Destination,
        client: EhrClient,
        patients: list[tuple[str, str | None]],
    ) -> tuple[int, int, int]:
        """Pull each EHR Patient's changed CarePlans; (seen, changed, patients failed)."""
        name = destination.name
        seen = changed = failed = 0
        for remote_patient, cursor in patients:
            try:
                pulled = self._pull(destination, client, cursor, patient=remote_patient)
            except DeliveryError as error:
                failed += 1
                log.warning(
                    "care plans of Patient/%s from %s not polled: %s",
                    remote_patient,
                    name,
                    error.message,
                    extra={
                        "destination": name,
                        "patient": f"Patient/{remote_patient}",
                        "status": error.status,
                    },
                )
                continue
            seen += pulled.seen
            changed += pulled.changed
            if pulled.cursor is not None and pulled.cursor != cursor:
                with self.database.unit_of_work(write=True) as uow:
                    store.save_patient_cursor(
                        uow.connection, name, remote_patient, pulled.cursor, now=self.clock()
                    )
                    uow.commit()
        return seen, changed, failed

    def _pull(
        self,
        destination: Destination,
        client: EhrClient,
        cursor: str | None,
        *,
        patient: str | None = None,
    ) -> _Pulled:
        """Search CarePlans changed since `cursor` (of one EHR Patient) and apply each."""
        params = [("_sort", "_lastUpdated"), ("_count", "100")]
        if patient is not None:
            params.insert(0, ("patient", patient))
        if cursor:
            # ge, not gt: plans sharing the cursor's instant are seen again, and skipped by
            # their version id.
            params.append(("_lastUpdated", f"ge{cursor}"))
        config = destination.care_plan_sync
        if config is not None and config.category:
            params.append(("category", config.category))
        plans = client.search("CarePlan", params)
        changed = 0
        newest = cursor
        for plan in plans:
            changed += self.apply(destination, plan)
            updated = (plan.get("meta") or {}).get("lastUpdated")
            if isinstance(updated, str) and (
                newest is None or _instant(updated) > _instant(newest)
            ):
                newest = updated
        return _Pulled(seen=len(plans), changed=changed, cursor=newest)

    # notifications -------------------------------------------------------------------------

    def notify(self, destination: Destination, bundle: Any) -> dict[str, Any]:
        """Take one notification; gaps in the event numbers make a catch-up poll due."""
        note = parse_notification(bundle)
        now = self.clock()
        with self.database.unit_of_work(write=True) as uow:
            store.ensure_destinations(uow.connection, [destination])
            state = store.destination_state(uow.connection, destination.name)
            last = state.subscription_events if state is not None else None
            gap = False
            if note.type == "handshake":
                newest = note.events_since_start if note.events_since_start is not None else last
            else:
                numbers = list(note.event_numbers)
                if last is not None and numbers and numbers[0] > last + 1:
                    gap = True
                if (
                    last is not None
                    and note.type == "heartbeat"
                    and note.events_since_start is not None
                    and note.events_since_start > last
                ):
                    gap = True
                if last is None and note.type != "handshake":
                    gap = bool(numbers) and numbers[0] > 1
                candidates = [n for n in (last, note.events_since_start, *numbers) if n is not None]
                newest = max(candidates) if candidates else None
            id_only = note.type == "event-notification" and len(note.resources) < len(
                note.event_numbers
            )
            values: dict[str, Any] = {
                "subscription_events": newest,
                "last_notification_at": now,
            }
            if gap or id_only:
                values["pull_requested"] = True
            store.update_destination(uow.connection, destination.name, **values)
            uow.commit()
        applied = sum(self.apply(destination, plan) for plan in note.resources)
        log.info(
            "notification",
            extra={
                "destination": destination.name,
                "type": note.type,
                "gap": gap,
                "applied": applied,
            },
        )
        return {"type": note.type, "gap": gap, "catch_up": gap or id_only, "applied": applied}

    # applying one plan ---------------------------------------------------------------------

    def apply(self, destination: Destination, remote: Resource) -> int:
        """Merge one pulled CarePlan into its course; 1 if the course changed."""
        remote_id = remote.get("id")
        if not isinstance(remote_id, str):
            return 0
        remote_version = (remote.get("meta") or {}).get("versionId")
        context = self.materializer.context
        name = destination.name
        now = self.clock()
        with self.database.unit_of_work(write=True) as uow:
            connection = uow.connection
            found = store.by_remote(connection, name, "CarePlan", remote_id)
            key, entry = found if found else (self._own_key(remote), None)
            if key is None:
                return 0  # not a plan of ours
            if entry is None:
                entry = store.ledger(connection, name, [key]).get(key)
            if entry is not None and remote_version and entry.remote_version == remote_version:
                return 0  # what we wrote, or what we pulled already
            record_key = store.records_of(connection, [key]).get(key)
            if record_key is None:
                return 0
            records = RecordRepository(connection)
            stored = records.get(*record_key, for_update=True)
            if stored is None:
                return 0
            current = load(stored)
            assert isinstance(current, TreatmentCourse)

            def remember(origin: int | None = None) -> None:
                store.record_remote(
                    connection,
                    name,
                    key,
                    remote_type="CarePlan",
                    remote_id=remote_id,
                    remote_version=remote_version,
                    origin_version=origin,
                    now=now,
                )

            try:
                local = _localize(connection, name, remote)
                theirs = course_from_care_plan(local, current=current, context=context)
            except UnsupportedContent as error:
                self._conflict(
                    connection,
                    destination=name,
                    key=key,
                    course=current,
                    field=error.path,
                    clinic=None,
                    ehr=error.message,
                    base=None,
                    remote_version=remote_version,
                    now=now,
                )
                remember()
                uow.commit()
                return 0
            base = self._base(connection, key, entry, current)
            merged, conflicts = merge(base=base, clinic=current, ehr=theirs)
            for conflict in conflicts:
                self._conflict(
                    connection,
                    destination=name,
                    key=key,
                    course=current,
                    field=conflict.field,
                    clinic=conflict.clinic,
                    ehr=conflict.ehr,
                    base=conflict.base,
                    remote_version=remote_version,
                    now=now,
                )
            if merged == current:
                remember()
                uow.commit()
                return 0
            try:
                result = write_record(
                    repository=records,
                    record=merged,
                    lookup=repository_lookup(records),
                    actor=f"ehr:{name}",
                    now=now,
                )
            except InvalidRecord as invalid:
                self._conflict(
                    connection,
                    destination=name,
                    key=key,
                    course=current,
                    field="course",
                    clinic=None,
                    ehr="; ".join(p.message for p in invalid.problems)[:2000],
                    base=None,
                    remote_version=remote_version,
                    now=now,
                )
                remember()
                uow.commit()
                return 0
            written = self.materializer.apply(
                connection, [RecordVersion(merged, result.stored, result.previous)], now=now
            )
            origin = next((w.version for w in written if w.key == key), None)
            remember(origin)
            uow.commit()
        log.info("care plan pulled", extra={"destination": name, "resource": f"CarePlan/{key[1]}"})
        return 1

    def _own_key(self, remote: Resource) -> tuple[str, str] | None:
        system = self.materializer.context.system("course")
        for identifier in remote.get("identifier") or []:
            if not isinstance(identifier, dict) or identifier.get("system") != system:
                continue
            value = identifier.get("value")
            if isinstance(value, str) and value.endswith("/CarePlan"):
                course = value.removesuffix("/CarePlan")
                return ("CarePlan", resource_id("course", course, "CarePlan"))
        return None

    def _base(
        self,
        connection: Connection,
        key: tuple[str, str],
        entry: store.LedgerEntry | None,
        current: TreatmentCourse,
    ) -> TreatmentCourse:
        """The course as both sides last agreed: our CarePlan version last pushed or pulled."""
        agreed = max(
            (v for v in (entry.pushed_version, entry.origin_version) if v is not None)
            if entry
            else (),
            default=None,
        )
        if agreed is None:
            return current
        body = store.version_bodies(connection, [(key[0], key[1], agreed)]).get(key)
        if body is None:
            return current
        try:
            return course_from_care_plan(body, current=current, context=self.materializer.context)
        except UnsupportedContent:
            return current

    def _conflict(
        self,
        connection: Connection,
        *,
        destination: str,
        key: tuple[str, str],
        course: TreatmentCourse,
        field: str,
        clinic: Any,
        ehr: Any,
        base: Any,
        remote_version: str | None,
        now: datetime,
    ) -> None:
        store.add_conflict(
            connection,
            destination=destination,
            resource_type=key[0],
            resource_id=key[1],
            record_kind="course",
            record_id=course.external_id,
            field=field,
            clinic_value=orjson.dumps(clinic).decode(),
            ehr_value=orjson.dumps(ehr).decode(),
            base_value=orjson.dumps(base).decode(),
            remote_version=remote_version,
            detected_at=now,
        )


def _localize(connection: Connection, destination: str, remote: Resource) -> Resource:
    """The pulled plan with its references pointing at our resources again.

    A reference to the EHR's copy of one of ours becomes ours (the ledger knows both ids); a
    logical reference by one of our business identifiers (what the worker sends for a target
    the EHR holds no copy of) becomes a literal reference to the resource with it.
    """
    local: Resource = orjson.loads(orjson.dumps(remote))
    for ref in references(local):
        key = relative_key(ref["reference"])
        if key is None:
            continue
        found = store.by_remote(connection, destination, key[0], key[1])
        if found is not None:
            ref["reference"] = f"{found[0][0]}/{found[0][1]}"
    for ref in _logical(local):
        identifier = ref["identifier"]
        target = connection.execute(
            select(search_token.c.resource_id).where(
                search_token.c.resource_type == ref["type"],
                search_token.c.param == "identifier",
                search_token.c.system == identifier.get("system"),
                search_token.c.code == identifier.get("value"),
            )
        ).first()
        if target is not None:
            ref["reference"] = f"{ref['type']}/{target.resource_id}"
    return local


def _logical(value: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if isinstance(value, dict):
        if (
            "reference" not in value
            and isinstance(value.get("type"), str)
            and isinstance(value.get("identifier"), dict)
        ):
            out.append(value)
        for item in value.values():
            out += _logical(item)
    elif isinstance(value, list):
        for item in value:
            out += _logical(item)
    return out


def _instant(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
