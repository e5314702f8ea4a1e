"""What status and `/metrics` report of ended deliveries (`sync_delivery_totals`), on real SQLite
and PostgreSQL: counted as deliveries end, a skipped dead letter counted as skipped, and
migration 0017 counting what the deliveries table held before it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import insert, select

from service.store.db import MIGRATIONS, Database
from service.store.tables import sync_deliveries
from service.sync import ledger
from service.sync.destinations import Destination, parse_destinations

NOW = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)


def _destination() -> Destination:
    (destination,) = parse_destinations(
        f"destinations:\n  - name: ehr-{uuid.uuid4().hex[:10]}\n    base_url: http://ehr/fhir\n"
        "    patients: {match_identifier_system: urn:mrn}\n"
    )
    return destination


def _deliveries(name: str, ended: list[tuple[str, int | None]]) -> list[dict[str, Any]]:
    """`sync_deliveries` rows of `name` with these statuses, written that long before NOW."""
    rows = []
    for number, (status, latency_ms) in enumerate(ended):
        written = NOW - timedelta(milliseconds=latency_ms or 0)
        rows.append(
            {
                "destination": name,
                "lane": f"p-{number % 3}",
                "outbox_id": number + 1,
                "resource_type": "Observation",
                "resource_id": f"o-{number}",
                "version": 1,
                "deleted": False,
                "status": status,
                "attempts": 0,
                "next_attempt_at": written,
                "written_at": written,
                "latency_ms": latency_ms if status == ledger.DELIVERED else None,
            }
        )
    return rows


def _rows(database: Database, name: str) -> list[ledger.Delivery]:
    with database.unit_of_work(write=False) as uow:
        found = uow.connection.execute(
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
            .where(sync_deliveries.c.destination == name)
            .order_by(sync_deliveries.c.id)
        ).all()
    return [ledger.Delivery(*row) for row in found]


def test_deliveries_are_counted_as_they_end_and_a_skipped_letter_as_skipped(
    database: Database,
) -> None:
    target = _destination()
    latencies = [10, 50, 51, 400, 70_000]
    with database.unit_of_work() as uow:
        ledger.ensure_destinations(uow.connection, [target])
        uow.connection.execute(
            insert(sync_deliveries),
            _deliveries(target.name, [(ledger.PENDING, latency) for latency in latencies] * 2),
        )
        uow.commit()
    deliveries = _rows(database, target.name)
    with database.unit_of_work() as uow:
        delivered, rest = deliveries[:5], deliveries[5:]
        ledger.finish(uow.connection, target.name, delivered[:2], status=ledger.DELIVERED, now=NOW)
        ledger.finish(uow.connection, target.name, delivered[2:], status=ledger.DELIVERED, now=NOW)
        ledger.finish(uow.connection, target.name, rest[:1], status=ledger.ECHO, now=NOW)
        ledger.finish(uow.connection, target.name, rest[1:3], status=ledger.DEAD, now=NOW)
        uow.commit()
    with database.unit_of_work() as uow:
        assert ledger.skip_dead(uow.connection, rest[1].id, now=NOW)
        assert not ledger.skip_dead(uow.connection, rest[1].id, now=NOW)  # no longer dead
        uow.commit()
    with database.unit_of_work(write=False) as uow:
        (row,) = ledger.status(uow.connection, [target], now=NOW)
        histogram = ledger.latency_histogram(uow.connection)[target.name]
    assert row["delivered"] == 5
    assert row["echoes_suppressed"] == 1
    assert row["skipped"] == 1
    assert row["dead_letters"] == 1
    assert row["queue_depth"] == 2
    assert row["oldest_pending_age_seconds"] is not None
    within = [sum(latency <= bound for latency in latencies) for bound in ledger.LATENCY_BUCKETS_MS]
    assert within[:4] == [2, 3, 3, 4]  # 50, 100, 250, 500 ms; 70 s is beyond every bound
    assert histogram == (within, 5, float(sum(latencies)))


def test_migration_0017_counts_the_deliveries_that_ended_before_it(empty_url: str) -> None:
    database = Database(empty_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))

    def to(revision: str, step: Callable[[Config, str], None]) -> None:
        with database.unit_of_work() as uow:
            config.attributes["connection"] = uow.connection
            step(config, revision)
            uow.commit()

    target = _destination()
    ended = [
        (ledger.DELIVERED, 20),
        (ledger.DELIVERED, 120),
        (ledger.DELIVERED, 90_000),
        (ledger.SKIPPED, None),
        (ledger.UNSUPPORTED, None),
        (ledger.DEAD, None),
        (ledger.PENDING, None),
    ]
    try:
        database.migrate()
        to("0016", command.downgrade)
        with database.unit_of_work() as uow:
            uow.connection.execute(insert(sync_deliveries), _deliveries(target.name, ended))
            uow.commit()
        to("head", command.upgrade)
        with database.unit_of_work(write=False) as uow:
            (row,) = ledger.status(uow.connection, [target], now=NOW)
            histogram = ledger.latency_histogram(uow.connection)[target.name]
        assert (row["delivered"], row["skipped"], row["unsupported"]) == (3, 1, 1)
        assert (row["dead_letters"], row["queue_depth"]) == (1, 1)
        cumulative = [1 if bound < 120 else 2 for bound in ledger.LATENCY_BUCKETS_MS]
        assert histogram == (cumulative, 3, 90_140.0)
        to("0016", command.downgrade)
        to("head", command.upgrade)
        applied, newest = database.migration_state()
        assert applied == newest
    finally:
        database.dispose()
