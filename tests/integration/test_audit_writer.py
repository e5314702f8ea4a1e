"""The audit trail's group commit on real databases: waiting and queued events, outages, and
the rows it stores (those the generic store would write for the same AuditEvents)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from service.fhir.search_index import extract
from service.security.audit import AuditRecord, AuditWriter
from service.store.db import Database, UnitOfWork
from service.store.resources import INDEX_COLUMNS, content_hash, with_version
from service.store.tables import (
    resource_versions,
    resources,
    search_date,
    search_reference,
    search_string,
    search_token,
)


class SwitchableDatabase:
    """The real database, which can be made unreachable or slow to commit."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.down = False
        self.gate = threading.Event()
        self.gate.set()

    @contextmanager
    def _guarded(self) -> Iterator[UnitOfWork]:
        self.gate.wait(10)
        if self.down:
            raise OperationalError("INSERT", {}, Exception("connection refused"))
        with self.database.unit_of_work(write=True) as uow:
            yield uow

    def unit_of_work(self, *, write: bool = True) -> Any:
        return self._guarded()


def record(patient: str) -> AuditRecord:
    return AuditRecord(
        subtype="read",
        entities=[f"Observation/{uuid.uuid4().hex}/_history/1"],
        patients=[patient],
        client_id="c-1",
        request_id=uuid.uuid4().hex,
    )


def stored_for(database: Database, patient: str) -> int:
    with database.engine.connect() as connection:
        return int(
            connection.execute(
                select(func.count())
                .select_from(search_reference)
                .where(
                    search_reference.c.resource_type == "AuditEvent",
                    search_reference.c.param == "patient",
                    search_reference.c.target_id == patient,
                )
            ).scalar_one()
        )


def test_a_queued_event_is_answered_at_once_and_committed_by_the_next_flush(
    database: Database,
) -> None:
    switch = SwitchableDatabase(database)
    writer = AuditWriter(switch)  # type: ignore[arg-type]
    patient = uuid.uuid4().hex

    async def scenario() -> tuple[int, int]:
        switch.gate.clear()  # the commit is held
        await asyncio.wait_for(writer.write(record(patient), wait=False), 1)
        queued = writer.queued
        switch.gate.set()
        await writer.close()
        return queued, writer.queued

    queued, left = asyncio.run(scenario())
    assert (queued, left) == (1, 0)
    assert stored_for(database, patient) == 1


def test_queued_events_survive_an_outage_and_waiting_ones_fail(database: Database) -> None:
    switch = SwitchableDatabase(database)
    writer = AuditWriter(switch)  # type: ignore[arg-type]
    patient = uuid.uuid4().hex

    async def scenario() -> None:
        switch.down = True
        for _ in range(3):
            await writer.write(record(patient), wait=False)
        with pytest.raises(OperationalError):
            await writer.write(record(patient))  # a waiting write learns it failed
        assert writer.queued == 3  # the queued ones are kept
        switch.down = False
        await writer.close()

    asyncio.run(scenario())
    assert stored_for(database, patient) == 3


def test_a_full_queue_makes_reads_wait_for_their_commit(database: Database) -> None:
    switch = SwitchableDatabase(database)
    writer = AuditWriter(switch, backlog=2)  # type: ignore[arg-type]
    patient = uuid.uuid4().hex

    async def scenario() -> None:
        switch.down = True
        await writer.write(record(patient), wait=False)
        await writer.write(record(patient), wait=False)
        with pytest.raises(OperationalError):  # the third cannot be queued: it waits, and fails
            await writer.write(record(patient), wait=False)
        switch.down = False
        await writer.close()

    asyncio.run(scenario())
    assert stored_for(database, patient) == 2


def test_concurrent_events_are_committed_together_and_each_once(database: Database) -> None:
    writer = AuditWriter(database)
    patient = uuid.uuid4().hex
    with database.engine.connect() as connection:
        before = connection.execute(select(func.count()).select_from(resources)).scalar_one()

    async def scenario() -> None:
        await asyncio.gather(*(writer.write(record(patient), wait=i % 2 == 0) for i in range(50)))
        await writer.close()

    asyncio.run(scenario())
    assert stored_for(database, patient) == 50
    with database.engine.connect() as connection:
        after = connection.execute(select(func.count()).select_from(resources)).scalar_one()
    assert after - before == 50


def test_shutdown_gives_up_after_its_timeout_when_the_database_stays_down(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    switch = SwitchableDatabase(database)
    writer = AuditWriter(switch)  # type: ignore[arg-type]

    async def scenario() -> None:
        switch.down = True
        await writer.write(record(uuid.uuid4().hex), wait=False)
        await writer.close(timeout=0.3)

    asyncio.run(scenario())
    assert "1 queued events could not be written at shutdown" in caplog.text


def test_stored_events_are_what_the_generic_store_writes_for_them(database: Database) -> None:
    """Body, hash, version and index rows of each event as the store writes any resource."""
    patient = uuid.uuid4().hex
    records = [
        record(patient),
        AuditRecord(
            subtype="search-type",
            patients=[patient, patient],
            query="patient=Patient/x&date=ge2026-01-01",
            client_id="c-1",
            request_id=uuid.uuid4().hex,
            address="10.0.0.7",
        ),
        AuditRecord(
            subtype="read",
            outcome="4",
            entities=[f"Patient/{patient}"],
            patients=[patient],
            description="missing scope system/Patient.r",
            client_id="c-2",
            address="127.0.0.1",
        ),
        AuditRecord(
            subtype="intake",
            records=["session/S-1", "patient/P-1"],
            patients=[patient],
            client_id="c-1",
            action="U",
        ),
        AuditRecord(subtype="transaction", outcome="8", patients=[patient], action="E"),
    ]
    writer = AuditWriter(database)

    async def scenario() -> None:
        await asyncio.gather(*(writer.write(item, wait=False) for item in records))
        await writer.close()

    asyncio.run(scenario())
    index_tables = (search_string, search_token, search_date, search_reference)
    with database.engine.connect() as connection:
        ids = [
            row.resource_id
            for row in connection.execute(
                select(search_reference.c.resource_id).where(
                    search_reference.c.resource_type == "AuditEvent",
                    search_reference.c.param == "patient",
                    search_reference.c.target_id == patient,
                )
            )
        ]
        assert len(ids) == len(records)
        for event_id in ids:
            current = connection.execute(
                select(resources).where(
                    resources.c.resource_type == "AuditEvent", resources.c.id == event_id
                )
            ).one()
            version = connection.execute(
                select(resource_versions).where(
                    resource_versions.c.resource_type == "AuditEvent",
                    resource_versions.c.id == event_id,
                )
            ).one()
            stored = orjson.loads(current.body)
            event = {k: v for k, v in stored.items() if k != "meta"}
            assert stored == with_version(event, 1, current.last_updated)
            assert current.body == orjson.dumps(stored).decode()
            assert (current.version, current.deleted) == (1, False)
            assert current.content_hash == content_hash(event)
            assert (version.version, version.body, version.deleted) == (1, current.body, False)
            assert version.last_updated == current.last_updated
            generic = extract(stored)
            for table in index_tables:
                columns = [table.c[name] for name in INDEX_COLUMNS[table][2:]]
                found = connection.execute(
                    select(*columns).where(
                        table.c.resource_type == "AuditEvent", table.c.resource_id == event_id
                    )
                ).all()
                kind = {
                    search_string: generic.strings,
                    search_token: generic.tokens,
                    search_date: generic.dates,
                    search_reference: generic.references,
                }[table]
                assert sorted(map(tuple, found), key=repr) == sorted(set(kind), key=repr), table
