"""Per-patient care-plan cursors (`care_plan_sync.by_patient`) on real SQLite and PostgreSQL: the
patients polled are those the ledger matched for the destination, and migration 0014 adds and
removes their table."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect

from service.store.db import MIGRATIONS, Database
from service.sync import ledger

NOW = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)


def _name() -> str:
    return f"ehr-{uuid.uuid4().hex[:10]}"


def test_the_patients_polled_are_those_matched_for_the_destination(database: Database) -> None:
    target, other = _name(), _name()
    with database.unit_of_work() as uow:
        for destination, key, remote in (
            (target, ("Patient", "p-1"), ("Patient", "E-2")),
            (target, ("Patient", "p-2"), ("Patient", "E-1")),
            (target, ("Patient", "p-3"), ("Patient", "E-1")),  # two of ours, one in the EHR
            (target, ("CarePlan", "c-1"), ("CarePlan", "E-9")),
            (other, ("Patient", "p-4"), ("Patient", "E-7")),
        ):
            ledger.record_remote(
                uow.connection,
                destination,
                key,
                remote_type=remote[0],
                remote_id=remote[1],
                now=NOW,
            )
        uow.commit()
    with database.unit_of_work() as uow:
        assert ledger.patient_cursors(uow.connection, target) == [("E-1", None), ("E-2", None)]
        ledger.save_patient_cursor(uow.connection, target, "E-2", "2026-12-01T09:00:00Z", now=NOW)
        ledger.save_patient_cursor(uow.connection, other, "E-1", "2026-12-01T08:00:00Z", now=NOW)
        uow.commit()
    with database.unit_of_work() as uow:
        ledger.save_patient_cursor(uow.connection, target, "E-2", "2026-12-01T09:05:00Z", now=NOW)
        uow.commit()
    with database.unit_of_work(write=False) as uow:
        assert ledger.patient_cursors(uow.connection, target) == [
            ("E-1", None),
            ("E-2", "2026-12-01T09:05:00Z"),
        ]
        assert ledger.patient_cursors(uow.connection, other) == [("E-7", None)]


def test_migration_0014_adds_the_cursor_table_and_takes_it_away(empty_url: str) -> None:
    database = Database(empty_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))

    def tables() -> set[str]:
        with database.engine.connect() as connection:
            return set(inspect(connection).get_table_names())

    def to(revision: str, step: Callable[[Config, str], None]) -> None:
        with database.unit_of_work() as uow:
            config.attributes["connection"] = uow.connection
            step(config, revision)
            uow.commit()

    try:
        database.migrate()
        assert "sync_pull_cursors" in tables()
        with database.engine.connect() as connection:
            columns = {c["name"]: c for c in inspect(connection).get_columns("sync_pull_cursors")}
            key = inspect(connection).get_pk_constraint("sync_pull_cursors")
        assert list(columns) == ["destination", "remote_patient_id", "cursor", "updated_at"]
        assert key["constrained_columns"] == ["destination", "remote_patient_id"]
        assert not any(c["nullable"] for c in columns.values())
        to("0013", command.downgrade)
        assert "sync_pull_cursors" not in tables()
        assert "sync_ledger" in tables()
        to("head", command.upgrade)
        assert "sync_pull_cursors" in tables()
        applied, newest = database.migration_state()
        assert applied == newest
    finally:
        database.dispose()
