"""The audit trail's group commit on real databases: waiting and queued events, outages."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from service.security.audit import AuditRecord, AuditWriter
from service.store.db import Database, UnitOfWork
from service.store.tables import resources, search_reference


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
