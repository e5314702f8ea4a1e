"""The SQL side of delivery and sync: fan-out, lanes, deliveries, the ledger, conflicts, status.

Every function works on the caller's connection and never commits (the worker's and the API's
units of work do). Fan-out copies new outbox rows into one delivery per destination; a lane is
one patient's deliveries to one destination, leased by one worker at a time (claimed with
`FOR UPDATE SKIP LOCKED` on PostgreSQL), so a patient's changes arrive in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from service.json_text import load_json
from service.security.audit import record_audit
from service.store.db import pairs_in
from service.store.resources import patient_of
from service.store.tables import (
    outbox,
    record_resources,
    resource_versions,
    resources,
    sync_conflicts,
    sync_deliveries,
    sync_delivery_totals,
    sync_destinations,
    sync_lanes,
    sync_ledger,
    sync_pull_cursors,
)
from service.sync.destinations import Destination

Key = tuple[str, str]

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"
SKIPPED = "skipped"
SUPERSEDED = "superseded"
ECHO = "echo"
UNSUPPORTED = "unsupported"

LATENCY_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
_LOOKBACK_IDS = 10_000
_LOOKBACK = timedelta(seconds=60)


def _insert_ignore(connection: Connection, table: Any) -> Any:
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


def ensure_destinations(connection: Connection, destinations: Iterable[Destination]) -> None:
    """Register destinations not seen before: from the outbox's start, or its end (no backfill)."""
    newest = connection.execute(select(func.max(outbox.c.id))).scalar() or 0
    rows = [
        {"name": d.name, "outbox_cursor": 0 if d.backfill else newest, "pull_requested": False}
        for d in destinations
    ]
    if rows:
        connection.execute(_insert_ignore(connection, sync_destinations), rows)


# --- fan-out ----------------------------------------------------------------------------------


def lane_of(resource_type: str, resource_id: str, patient_id: str | None) -> str:
    return patient_id if patient_id else f"{resource_type}/{resource_id}"


def fan_out(
    connection: Connection, destination: Destination, *, now: datetime, limit: int = 5000
) -> int:
    """Copy outbox rows not yet seen by `destination` into deliveries; how many were queued.

    On PostgreSQL an outbox id can commit after a higher one (sequences are taken before
    commit), so recent rows just behind the cursor are looked at again; the unique
    (destination, outbox id) keeps that from queueing anything twice.
    """
    name = destination.name
    cursor_row = connection.execute(
        select(sync_destinations.c.outbox_cursor)
        .where(sync_destinations.c.name == name)
        .with_for_update()
    ).first()
    cursor = int(cursor_row[0]) if cursor_row else 0
    seen = select(sync_deliveries.c.id).where(
        sync_deliveries.c.destination == name, sync_deliveries.c.outbox_id == outbox.c.id
    )
    window = outbox.c.id > cursor
    if connection.dialect.name == "postgresql":
        # Look back only over what this destination has fanned out since it began: a destination
        # registered without backfill must not pick up the rows before its start.
        first = (
            select(func.min(sync_deliveries.c.outbox_id))
            .where(sync_deliveries.c.destination == name)
            .scalar_subquery()
        )
        window = or_(
            window,
            and_(
                outbox.c.id > cursor - _LOOKBACK_IDS,
                outbox.c.id > first,
                outbox.c.created_at > now - _LOOKBACK,
                ~seen.exists(),
            ),
        )
    rows = connection.execute(select(outbox).where(window).order_by(outbox.c.id).limit(limit)).all()
    if not rows:
        return 0
    queued = [
        {
            "destination": name,
            "lane": lane_of(row.resource_type, row.resource_id, row.patient_id),
            "outbox_id": row.id,
            "resource_type": row.resource_type,
            "resource_id": row.resource_id,
            "version": row.version,
            "deleted": row.deleted,
            "status": PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "written_at": row.created_at,
        }
        for row in rows
        if destination.sends(row.resource_type)
    ]
    if queued:
        connection.execute(_insert_ignore(connection, sync_deliveries), queued)
        lanes = sorted({q["lane"] for q in queued})
        connection.execute(
            _insert_ignore(connection, sync_lanes),
            [{"destination": name, "lane": lane, "next_due": now} for lane in lanes],
        )
        for start in range(0, len(lanes), 500):
            connection.execute(
                update(sync_lanes)
                .where(
                    sync_lanes.c.destination == name,
                    sync_lanes.c.lane.in_(lanes[start : start + 500]),
                    sync_lanes.c.next_due.is_(None),
                )
                .values(next_due=now)
            )
    newest = max(row.id for row in rows)
    if newest > cursor:
        connection.execute(
            update(sync_destinations)
            .where(sync_destinations.c.name == name)
            .values(outbox_cursor=newest)
        )
    return len(queued)


# --- lanes ------------------------------------------------------------------------------------


def claim_lanes(
    connection: Connection,
    destination: str,
    *,
    worker: str,
    now: datetime,
    limit: int,
    lease: timedelta,
) -> list[str]:
    """Lease up to `limit` lanes whose first pending change is due; the caller commits."""
    query = (
        select(sync_lanes.c.lane)
        .where(
            sync_lanes.c.destination == destination,
            sync_lanes.c.next_due <= now,
            or_(sync_lanes.c.leased_until.is_(None), sync_lanes.c.leased_until < now),
        )
        .order_by(sync_lanes.c.next_due)
        .limit(limit)
    )
    if connection.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    lanes = [row.lane for row in connection.execute(query)]
    if lanes:
        connection.execute(
            update(sync_lanes)
            .where(sync_lanes.c.destination == destination, sync_lanes.c.lane.in_(lanes))
            .values(leased_until=now + lease, leased_by=worker)
        )
    return lanes


def release_lane(connection: Connection, destination: str, lane: str, *, worker: str) -> None:
    """End the lease; the lane is due again when its first pending change (by order) is."""
    first_due = (
        select(sync_deliveries.c.next_attempt_at)
        .where(
            sync_deliveries.c.destination == destination,
            sync_deliveries.c.lane == lane,
            sync_deliveries.c.status == PENDING,
        )
        .order_by(sync_deliveries.c.id)
        .limit(1)
        .scalar_subquery()
    )
    connection.execute(
        update(sync_lanes)
        .where(
            sync_lanes.c.destination == destination,
            sync_lanes.c.lane == lane,
            sync_lanes.c.leased_by == worker,
        )
        .values(next_due=first_due, leased_until=None, leased_by=None)
    )


@dataclass(frozen=True)
class Delivery:
    id: int
    lane: str
    resource_type: str
    resource_id: str
    version: int
    deleted: bool
    attempts: int
    written_at: datetime
    next_attempt_at: datetime

    @property
    def key(self) -> Key:
        return (self.resource_type, self.resource_id)


def pending(connection: Connection, destination: str, lane: str, *, limit: int) -> list[Delivery]:
    """The lane's pending deliveries in order; the first may not be due yet (then: none)."""
    rows = connection.execute(
        select(
            sync_deliveries.c.id,
            sync_deliveries.c.lane,
            sync_deliveries.c.resource_type,
            sync_deliveries.c.resource_id,
            sync_deliveries.c.version,
            sync_deliveries.c.deleted,
            sync_deliveries.c.attempts,
            sync_deliveries.c.written_at,
            sync_deliveries.c.next_attempt_at,
        )
        .where(
            sync_deliveries.c.destination == destination,
            sync_deliveries.c.lane == lane,
            sync_deliveries.c.status == PENDING,
        )
        .order_by(sync_deliveries.c.id)
        .limit(limit)
    ).all()
    return [Delivery(*row) for row in rows]


def first_due(connection: Connection, destination: str, lane: str) -> datetime | None:
    value = connection.execute(
        select(func.min(sync_deliveries.c.next_attempt_at)).where(
            sync_deliveries.c.destination == destination,
            sync_deliveries.c.lane == lane,
            sync_deliveries.c.status == PENDING,
        )
    ).scalar()
    return value if isinstance(value, datetime) else None


def finish(
    connection: Connection,
    destination: str,
    items: Sequence[Delivery],
    *,
    status: str,
    now: datetime,
    strategy: str | None = None,
    error: str | None = None,
    outcome: dict[str, Any] | None = None,
) -> None:
    """Deliveries that ended (delivered, dead, superseded, echo, unsupported), and counted
    (`sync_delivery_totals`) unless they are dead letters."""
    if not items:
        return
    values: dict[str, Any] = {"status": status, "finished_at": now, "error": error}
    if strategy is not None:
        values["strategy"] = strategy
    if outcome is not None:
        values["outcome"] = orjson.dumps(outcome).decode()
    rows = [
        {
            "b_id": item.id,
            "latency_ms": max(0, round((now - item.written_at).total_seconds() * 1000))
            if status == DELIVERED
            else None,
        }
        for item in items
    ]
    connection.execute(
        update(sync_deliveries)
        .where(sync_deliveries.c.id == bindparam("b_id"))
        .values(latency_ms=bindparam("latency_ms"), **values),
        rows,
    )
    if status != DEAD:
        _count_ended(connection, destination, status, [row["latency_ms"] for row in rows])


def _latency_bucket(latency_ms: int | None) -> int:
    if latency_ms is not None:
        for bound in LATENCY_BUCKETS_MS:
            if latency_ms <= bound:
                return bound
    return -1


def _count_ended(
    connection: Connection, destination: str, status: str, latencies: Sequence[int | None]
) -> None:
    """Add deliveries that ended to `sync_delivery_totals`, in the caller's transaction."""
    totals: dict[int, list[int]] = {}
    for latency in latencies:
        total = totals.setdefault(_latency_bucket(latency), [0, 0])
        total[0] += 1
        total[1] += latency or 0
    if connection.dialect.name == "postgresql":
        # The destination's row first: every transaction that counts for a destination takes
        # its locks in the same order (that row, then its totals), so two workers finishing
        # lanes of one destination wait for each other instead of deadlocking.
        connection.execute(
            select(sync_destinations.c.name)
            .where(sync_destinations.c.name == destination)
            .with_for_update()
        )
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(sync_delivery_totals)
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=["destination", "status", "latency_bucket_ms"],
            set_={
                "deliveries": sync_delivery_totals.c.deliveries + statement.excluded.deliveries,
                "latency_ms": sync_delivery_totals.c.latency_ms + statement.excluded.latency_ms,
            },
        ),
        [
            {
                "destination": destination,
                "status": status,
                "latency_bucket_ms": bucket,
                "deliveries": count,
                "latency_ms": latency_ms,
            }
            for bucket, (count, latency_ms) in sorted(totals.items())
        ],
    )


def postpone(
    connection: Connection,
    ids: Sequence[int],
    *,
    until: datetime,
    error: str,
) -> None:
    """A transient failure: try again at `until`."""
    if ids:
        connection.execute(
            update(sync_deliveries)
            .where(sync_deliveries.c.id.in_(list(ids)))
            .values(
                attempts=sync_deliveries.c.attempts + 1,
                next_attempt_at=until,
                error=error,
            )
        )


# --- stored resources -------------------------------------------------------------------------


def version_bodies(connection: Connection, items: Iterable[tuple[str, str, int]]) -> dict[Key, Any]:
    """The stored JSON of (type, id, version)s, by (type, id)."""
    wanted = sorted(set(items))
    out: dict[Key, Any] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        versions: dict[str, set[int]] = {}
        for resource_type, _, version in chunk:
            versions.setdefault(resource_type, set()).add(version)
        # Per type, its ids and the versions asked of any of them: the primary key is looked up
        # for each pair, and the pairs not asked for are dropped here.
        rows = connection.execute(
            select(
                resource_versions.c.resource_type,
                resource_versions.c.id,
                resource_versions.c.version,
                resource_versions.c.body,
            ).where(
                or_(
                    *(
                        and_(
                            resource_versions.c.resource_type == resource_type,
                            resource_versions.c.id.in_(
                                sorted({i for t, i, _ in chunk if t == resource_type})
                            ),
                            resource_versions.c.version.in_(sorted(numbers)),
                        )
                        for resource_type, numbers in sorted(versions.items())
                    )
                )
            )
        )
        asked = set(chunk)
        for row in rows:
            if row.body is not None and (row.resource_type, row.id, row.version) in asked:
                out[(row.resource_type, row.id)] = load_json(row.body)
    return out


def current_bodies(
    connection: Connection,
    keys: Iterable[Key],
    *,
    known: Mapping[Key, tuple[int, Any]] | None = None,
) -> dict[Key, Any]:
    """The current JSON of the resources not deleted, by (type, id).

    `known` holds (version, JSON) already read: where that version is still the current one it
    is the answer, found by its version number alone instead of its body read and parsed again.
    """
    wanted = sorted(set(keys))
    known = known or {}
    out: dict[Key, Any] = {}
    unread = [key for key in wanted if key not in known]
    held = [key for key in wanted if key in known]
    for start in range(0, len(held), 500):
        rows = connection.execute(
            select(resources.c.resource_type, resources.c.id, resources.c.version).where(
                pairs_in(resources.c.resource_type, resources.c.id, held[start : start + 500]),
                resources.c.deleted.is_(False),
            )
        )
        for row in rows:
            key = (row.resource_type, row.id)
            version, body = known[key]
            if row.version == version:
                out[key] = body
            else:
                unread.append(key)
    for start in range(0, len(unread), 500):
        rows = connection.execute(
            select(resources.c.resource_type, resources.c.id, resources.c.body).where(
                pairs_in(resources.c.resource_type, resources.c.id, unread[start : start + 500]),
                resources.c.deleted.is_(False),
            )
        )
        for row in rows:
            out[(row.resource_type, row.id)] = load_json(row.body)
    return out


# --- the ledger -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerEntry:
    remote_type: str
    remote_id: str
    remote_version: str | None
    pushed_version: int | None
    origin_version: int | None


def ledger(connection: Connection, destination: str, keys: Iterable[Key]) -> dict[Key, LedgerEntry]:
    wanted = sorted(set(keys))
    out: dict[Key, LedgerEntry] = {}
    for start in range(0, len(wanted), 500):
        rows = connection.execute(
            select(
                sync_ledger.c.resource_type,
                sync_ledger.c.resource_id,
                sync_ledger.c.remote_type,
                sync_ledger.c.remote_id,
                sync_ledger.c.remote_version,
                sync_ledger.c.pushed_version,
                sync_ledger.c.origin_version,
            ).where(
                sync_ledger.c.destination == destination,
                pairs_in(
                    sync_ledger.c.resource_type,
                    sync_ledger.c.resource_id,
                    wanted[start : start + 500],
                ),
            )
        )
        for row in rows:
            out[(row.resource_type, row.resource_id)] = LedgerEntry(*row[2:])
    return out


def by_remote(
    connection: Connection, destination: str, remote_type: str, remote_id: str
) -> tuple[Key, LedgerEntry] | None:
    row = connection.execute(
        select(
            sync_ledger.c.resource_type,
            sync_ledger.c.resource_id,
            sync_ledger.c.remote_type,
            sync_ledger.c.remote_id,
            sync_ledger.c.remote_version,
            sync_ledger.c.pushed_version,
            sync_ledger.c.origin_version,
        ).where(
            sync_ledger.c.destination == destination,
            sync_ledger.c.remote_type == remote_type,
            sync_ledger.c.remote_id == remote_id,
        )
    ).first()
    if row is None:
        return None
    return (row.resource_type, row.resource_id), LedgerEntry(*row[2:])


def record_remote(
    connection: Connection,
    destination: str,
    key: Key,
    *,
    remote_type: str,
    remote_id: str,
    now: datetime,
    remote_version: str | None = None,
    pushed_version: int | None = None,
    origin_version: int | None = None,
) -> None:
    """Insert or update the ledger entry of `key` (None leaves a version as it is)."""
    values: dict[str, Any] = {"remote_type": remote_type, "remote_id": remote_id, "updated_at": now}
    for name, value in (
        ("remote_version", remote_version),
        ("pushed_version", pushed_version),
        ("origin_version", origin_version),
    ):
        if value is not None:
            values[name] = value
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(sync_ledger).values(
        destination=destination, resource_type=key[0], resource_id=key[1], **values
    )
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=["destination", "resource_type", "resource_id"], set_=values
        )
    )


@dataclass(frozen=True, slots=True)
class RemoteEntry:
    """What `record_remote` records for one resource (None leaves a version as it is)."""

    key: Key
    remote_type: str
    remote_id: str
    remote_version: str | None = None
    pushed_version: int | None = None
    origin_version: int | None = None


_VERSIONS = ("remote_version", "pushed_version", "origin_version")


def record_remotes(
    connection: Connection, destination: str, entries: Sequence[RemoteEntry], *, now: datetime
) -> None:
    """`record_remote` for many resources in one statement, as if recorded one after another:
    a delivered batch's ledger entries, without building a statement per resource."""
    merged: dict[Key, dict[str, Any]] = {}
    for entry in entries:
        values = merged.setdefault(entry.key, dict.fromkeys(_VERSIONS))
        values |= {"remote_type": entry.remote_type, "remote_id": entry.remote_id}
        for name in _VERSIONS:
            if getattr(entry, name) is not None:
                values[name] = getattr(entry, name)
    if not merged:
        return
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(sync_ledger)
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=["destination", "resource_type", "resource_id"],
            set_={
                "remote_type": statement.excluded.remote_type,
                "remote_id": statement.excluded.remote_id,
                "updated_at": statement.excluded.updated_at,
            }
            | {
                name: func.coalesce(statement.excluded[name], sync_ledger.c[name])
                for name in _VERSIONS
            },
        ),
        [
            {
                "destination": destination,
                "resource_type": key[0],
                "resource_id": key[1],
                "updated_at": now,
            }
            | values
            for key, values in merged.items()
        ],
    )


# --- care-plan cursors per patient -------------------------------------------------------------


def patient_cursors(connection: Connection, destination: str) -> list[tuple[str, str | None]]:
    """The EHR Patient ids delivery matched for `destination`, each with its care-plan cursor
    (None: never pulled), in id order."""
    matched = (
        select(sync_ledger.c.remote_id)
        .where(
            sync_ledger.c.destination == destination,
            sync_ledger.c.resource_type == "Patient",
            sync_ledger.c.remote_type == "Patient",
        )
        .distinct()
        .subquery()
    )
    rows = connection.execute(
        select(matched.c.remote_id, sync_pull_cursors.c.cursor)
        .select_from(matched)
        .outerjoin(
            sync_pull_cursors,
            and_(
                sync_pull_cursors.c.destination == destination,
                sync_pull_cursors.c.remote_patient_id == matched.c.remote_id,
            ),
        )
        .order_by(matched.c.remote_id)
    )
    return [(row.remote_id, row.cursor) for row in rows]


def save_patient_cursor(
    connection: Connection, destination: str, remote_patient_id: str, cursor: str, *, now: datetime
) -> None:
    values = {"cursor": cursor, "updated_at": now}
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(sync_pull_cursors).values(
        destination=destination, remote_patient_id=remote_patient_id, **values
    )
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=["destination", "remote_patient_id"], set_=values
        )
    )


# --- dead letters, status ---------------------------------------------------------------------


def _delivery_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "destination": row.destination,
        "resource": f"{row.resource_type}/{row.resource_id}",
        "version": row.version,
        "deleted": row.deleted,
        "status": row.status,
        "strategy": row.strategy,
        "attempts": row.attempts,
        "error": row.error,
        "outcome": orjson.loads(row.outcome) if row.outcome else None,
        "written_at": row.written_at.isoformat(),
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
    }


def dead_letters(
    connection: Connection, *, destination: str | None = None, after: int = 0, limit: int = 100
) -> list[dict[str, Any]]:
    query = select(sync_deliveries).where(
        sync_deliveries.c.status == DEAD, sync_deliveries.c.id > after
    )
    if destination is not None:
        query = query.where(sync_deliveries.c.destination == destination)
    rows = connection.execute(query.order_by(sync_deliveries.c.id).limit(limit))
    return [_delivery_json(row) for row in rows]


def delivery(connection: Connection, delivery_id: int) -> dict[str, Any] | None:
    row = connection.execute(
        select(sync_deliveries).where(sync_deliveries.c.id == delivery_id)
    ).first()
    return None if row is None else _delivery_json(row)


def retry_dead(connection: Connection, delivery_id: int, *, now: datetime) -> bool:
    """A dead letter back in its lane, due now; False when it is no dead letter."""
    row = connection.execute(
        select(sync_deliveries.c.destination, sync_deliveries.c.lane).where(
            sync_deliveries.c.id == delivery_id, sync_deliveries.c.status == DEAD
        )
    ).first()
    if row is None:
        return False
    connection.execute(
        update(sync_deliveries)
        .where(sync_deliveries.c.id == delivery_id)
        .values(status=PENDING, attempts=0, next_attempt_at=now, finished_at=None)
    )
    connection.execute(
        update(sync_lanes)
        .where(sync_lanes.c.destination == row.destination, sync_lanes.c.lane == row.lane)
        .values(next_due=now)
    )
    return True


def skip_dead(connection: Connection, delivery_id: int, *, now: datetime) -> bool:
    destination = connection.execute(
        select(sync_deliveries.c.destination).where(
            sync_deliveries.c.id == delivery_id, sync_deliveries.c.status == DEAD
        )
    ).scalar()
    if destination is None:
        return False
    result = connection.execute(
        update(sync_deliveries)
        .where(sync_deliveries.c.id == delivery_id, sync_deliveries.c.status == DEAD)
        .values(status=SKIPPED, finished_at=now)
    )
    if not result.rowcount:
        return False
    _count_ended(connection, destination, SKIPPED, [None])
    return True


def status(
    connection: Connection, destinations: Sequence[Destination], *, now: datetime
) -> list[dict[str, Any]]:
    """Per destination: queue depth, oldest pending age, last success, failures, dead letters.

    Bounded reads: the pending deliveries and dead letters through the (destination, status)
    index, and what ended from `sync_delivery_totals`, never the deliveries of the past.
    """
    counts: dict[str, dict[str, int]] = {}
    oldest: dict[str, datetime] = {}
    failing: dict[str, int] = {}
    for name in dict.fromkeys(destination.name for destination in destinations):
        mine = counts.setdefault(name, {})
        waiting = connection.execute(
            select(
                func.count(),
                func.min(sync_deliveries.c.written_at),
                func.sum(case((sync_deliveries.c.attempts > 0, 1), else_=0)),
            ).where(sync_deliveries.c.destination == name, sync_deliveries.c.status == PENDING)
        ).one()
        mine[PENDING] = int(waiting[0])
        if waiting[1] is not None:
            oldest[name] = waiting[1]
        failing[name] = int(waiting[2] or 0)
        mine[DEAD] = int(
            connection.execute(
                select(func.count()).where(
                    sync_deliveries.c.destination == name, sync_deliveries.c.status == DEAD
                )
            ).scalar_one()
        )
    ended = connection.execute(
        select(
            sync_delivery_totals.c.destination,
            sync_delivery_totals.c.status,
            func.sum(sync_delivery_totals.c.deliveries),
        ).group_by(sync_delivery_totals.c.destination, sync_delivery_totals.c.status)
    )
    for name, state, count in ended:
        if name in counts:
            counts[name][state] = int(count)
    open_conflicts: dict[str, int] = dict(
        connection.execute(
            select(sync_conflicts.c.destination, func.count())
            .where(sync_conflicts.c.status == "open")
            .group_by(sync_conflicts.c.destination)
        ).all()
    )
    patient_cursors_of: dict[str, int] = dict(
        connection.execute(
            select(sync_pull_cursors.c.destination, func.count()).group_by(
                sync_pull_cursors.c.destination
            )
        ).all()
    )
    state_rows = {row.name: row for row in connection.execute(select(sync_destinations)).all()}
    out = []
    for destination in destinations:
        name = destination.name
        mine = counts.get(name, {})
        row = state_rows.get(name)
        first = oldest.get(name)
        out.append(
            {
                "destination": name,
                "base_url": destination.base,
                "queue_depth": mine.get(PENDING, 0),
                "oldest_pending_age_seconds": round((now - first).total_seconds(), 3)
                if first
                else None,
                "retrying": failing.get(name, 0),
                "delivered": mine.get(DELIVERED, 0),
                "dead_letters": mine.get(DEAD, 0),
                "skipped": mine.get(SKIPPED, 0),
                "unsupported": mine.get(UNSUPPORTED, 0),
                "superseded": mine.get(SUPERSEDED, 0),
                "echoes_suppressed": mine.get(ECHO, 0),
                "open_conflicts": int(open_conflicts.get(name, 0)),
                "last_success_at": _iso(row.last_success_at) if row else None,
                "last_failure_at": _iso(row.last_failure_at) if row else None,
                "last_error": row.last_error if row else None,
                "strategies": orjson.loads(row.strategies) if row and row.strategies else {},
                "care_plan_cursor": row.care_plan_cursor if row else None,
                "care_plan_patient_cursors": int(patient_cursors_of.get(name, 0)),
                "last_pull_at": _iso(row.last_pull_at) if row else None,
                "subscription_events": row.subscription_events if row else None,
            }
        )
    return out


def latency_histogram(connection: Connection) -> dict[str, tuple[list[int], int, float]]:
    """Per destination: cumulative counts per bucket of `LATENCY_BUCKETS_MS`, count, sum (ms)."""
    rows = connection.execute(
        select(
            sync_delivery_totals.c.destination,
            sync_delivery_totals.c.latency_bucket_ms,
            sync_delivery_totals.c.deliveries,
            sync_delivery_totals.c.latency_ms,
        ).where(sync_delivery_totals.c.status == DELIVERED)
    )
    per_bucket: dict[str, dict[int, int]] = {}
    totals: dict[str, list[float]] = {}
    for name, bucket, count, latency_ms in rows:
        per_bucket.setdefault(name, {})[bucket] = int(count)
        total = totals.setdefault(name, [0, 0.0])
        total[0] += int(count)
        total[1] += float(latency_ms)
    out: dict[str, tuple[list[int], int, float]] = {}
    for name, buckets in per_bucket.items():
        cumulative, running = [], 0
        for bound in LATENCY_BUCKETS_MS:
            running += buckets.get(bound, 0)
            cumulative.append(running)
        count, latency_ms = totals[name]
        out[name] = (cumulative, int(count), latency_ms)
    return out


def note_result(
    connection: Connection, destination: str, *, now: datetime, error: str | None
) -> None:
    values: dict[str, Any] = (
        {"last_success_at": now}
        if error is None
        else {"last_failure_at": now, "last_error": error[:500]}
    )
    connection.execute(
        update(sync_destinations).where(sync_destinations.c.name == destination).values(**values)
    )


def save_strategies(
    connection: Connection, destination: str, strategies: dict[str, str], *, now: datetime
) -> None:
    connection.execute(
        update(sync_destinations)
        .where(sync_destinations.c.name == destination)
        .values(strategies=orjson.dumps(strategies).decode(), capabilities_at=now)
    )


def destination_state(connection: Connection, destination: str) -> Any:
    return connection.execute(
        select(sync_destinations).where(sync_destinations.c.name == destination)
    ).first()


def update_destination(connection: Connection, destination: str, **values: Any) -> None:
    connection.execute(
        update(sync_destinations).where(sync_destinations.c.name == destination).values(**values)
    )


# --- conflicts --------------------------------------------------------------------------------


def add_conflict(connection: Connection, **values: Any) -> None:
    connection.execute(insert(sync_conflicts).values(status="open", **values))


def conflicts(
    connection: Connection, *, state: str | None = "open", after: int = 0, limit: int = 100
) -> list[dict[str, Any]]:
    query = select(sync_conflicts).where(sync_conflicts.c.id > after)
    if state is not None:
        query = query.where(sync_conflicts.c.status == state)
    out = []
    for row in connection.execute(query.order_by(sync_conflicts.c.id).limit(limit)):
        out.append(
            {
                "id": row.id,
                "destination": row.destination,
                "resource": f"{row.resource_type}/{row.resource_id}",
                "record": {"kind": row.record_kind, "external_id": row.record_id},
                "field": row.field,
                "clinic_value": _loads(row.clinic_value),
                "ehr_value": _loads(row.ehr_value),
                "base_value": _loads(row.base_value),
                "remote_version": row.remote_version,
                "status": row.status,
                "detected_at": row.detected_at.isoformat(),
                "resolved_at": _iso(row.resolved_at),
            }
        )
    return out


def resolve_conflict(connection: Connection, conflict_id: int, *, now: datetime) -> str | None:
    """Mark an open conflict resolved; the resource (`Type/id`) it is about, None if none."""
    row = connection.execute(
        update(sync_conflicts)
        .where(sync_conflicts.c.id == conflict_id, sync_conflicts.c.status == "open")
        .values(status="resolved", resolved_at=now)
        .returning(sync_conflicts.c.resource_type, sync_conflicts.c.resource_id)
    ).first()
    return None if row is None else f"{row.resource_type}/{row.resource_id}"


def _loads(value: str | None) -> Any:
    return orjson.loads(value) if value is not None else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def records_of(connection: Connection, keys: Iterable[Key]) -> dict[Key, tuple[str, str]]:
    """The (record kind, external id) each resource was materialized from."""
    wanted = sorted(set(keys))
    out: dict[Key, tuple[str, str]] = {}
    for start in range(0, len(wanted), 500):
        rows = connection.execute(
            select(
                record_resources.c.resource_type,
                record_resources.c.resource_id,
                record_resources.c.record_kind,
                record_resources.c.record_id,
            ).where(
                pairs_in(
                    record_resources.c.resource_type,
                    record_resources.c.resource_id,
                    wanted[start : start + 500],
                )
            )
        )
        for row in rows:
            out[(row.resource_type, row.resource_id)] = (row.record_kind, row.record_id)
    return out


def act_on_dead_letter(
    connection: Connection,
    delivery_id: int,
    action: str,
    *,
    now: datetime,
    actor: str | None = None,
) -> dict[str, Any] | None:
    """Retry or skip a dead letter, audited in the same transaction; None when it is none.

    `actor` names who acts where there is no request (the CLI).
    """
    act = retry_dead if action == "retry" else skip_dead
    if not act(connection, delivery_id, now=now):
        return None
    found = delivery(connection, delivery_id)
    assert found is not None
    record_audit(
        connection,
        subtype="sync",
        entities=[f"{found['resource']}/_history/{found['version']}"],
        patients=[_resource_patient(connection, found["resource"])],
        description=f"{action} dead letter {delivery_id} to {found['destination']}",
        actor=actor,
    )
    return found


def resolve_conflict_audited(
    connection: Connection, conflict_id: int, *, now: datetime, actor: str | None = None
) -> bool:
    """Mark an open conflict resolved, audited in the same transaction; False if none is."""
    resource = resolve_conflict(connection, conflict_id, now=now)
    if resource is None:
        return False
    record_audit(
        connection,
        subtype="sync",
        entities=[resource],
        patients=[_resource_patient(connection, resource)],
        description=f"resolve conflict {conflict_id}",
        actor=actor,
    )
    return True


def _resource_patient(connection: Connection, reference: str) -> str | None:
    """The patient a stored resource (`Type/id`) belongs to."""
    resource_type, _, resource_id = reference.partition("/")
    body = connection.execute(
        select(resources.c.body).where(
            resources.c.resource_type == resource_type, resources.c.id == resource_id
        )
    ).scalar_one_or_none()
    return None if body is None else patient_of(orjson.loads(body))
