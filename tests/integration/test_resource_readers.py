"""The FHIR read path's readers (`service.store.reads`) against real SQLite and PostgreSQL.

They answer what the unit of work's repository answers, under concurrency (PostgreSQL sends the
reads that queue up together), never from a snapshot older than the read, and survive dead
connections without a pre-ping.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest
from sqlalchemy import make_url, text

from mappings.context import resource_id
from service.store.db import Database
from service.store.reads import (
    READER_APPLICATION_NAME,
    ResourceReader,
    SqliteReader,
    resource_reader,
)
from service.store.resources import ResourceRepository, StoredResource, VersionRow
from tests.factory import clinic
from tests.integration.test_materialization import put


def repository_reads(
    database: Database, keys: list[tuple[str, str]]
) -> list[tuple[StoredResource | None, VersionRow | None]]:
    with database.unit_of_work(write=False) as uow:
        repository = ResourceRepository(uow.connection)
        return [(repository.read(*key), repository.version(*key, 1)) for key in keys]


def stored_keys(database: Database) -> list[tuple[str, str]]:
    with database.unit_of_work(write=False) as uow:
        rows = uow.connection.execute(text("SELECT resource_type, id FROM resources")).all()
    return [(row[0], row[1]) for row in rows]


async def reader_reads(
    reader: ResourceReader, keys: list[tuple[str, str]]
) -> list[tuple[StoredResource | None, VersionRow | None]]:
    async def both(key: tuple[str, str]) -> tuple[StoredResource | None, VersionRow | None]:
        return await reader.current(*key), await reader.version(*key, 1)

    return list(await asyncio.gather(*(both(key) for key in keys)))


def test_concurrent_reads_answer_what_the_repository_answers(database: Database) -> None:
    for _ in range(2):
        for record in clinic().records():
            put(database, record)
    keys = stored_keys(database)
    keys += [("Patient", "no-such-id"), ("Invoice", "1"), keys[0]]
    # PostgreSQL text cannot hold a NUL, so the repository fails on one; the reader finds nothing.
    expected = [*repository_reads(database, keys), (None, None)]
    keys.append(("Patient", "nul\x00id"))

    async def run() -> list[tuple[StoredResource | None, VersionRow | None]]:
        reader = resource_reader(database.url, pool_size=3)
        await reader.open()
        try:
            return await reader_reads(reader, keys)
        finally:
            await reader.close()

    assert asyncio.run(run()) == expected


def test_a_read_sees_every_write_committed_before_it(database: Database) -> None:
    records = clinic()
    for record in records.records():
        put(database, record)
    key = ("Patient", resource_id("patient", records.patient["external_id"]))

    async def run() -> list[int]:
        reader = resource_reader(database.url, pool_size=2)
        await reader.open()
        versions = []
        try:
            for sex in ("other", "male", "female"):
                put(database, records.patient | {"sex": sex})
                read = await asyncio.gather(*(reader.current(*key) for _ in range(5)))
                versions += [r.version for r in read if r is not None]
        finally:
            await reader.close()
        return versions

    assert asyncio.run(run()) == [2] * 5 + [3] * 5 + [4] * 5


@pytest.mark.postgres
def test_postgres_reads_survive_their_connections_being_killed(postgres_url: str) -> None:
    database = Database(postgres_url)
    try:
        for record in clinic().records():
            put(database, record)
        key = stored_keys(database)[0]
        expected = repository_reads(database, [key])[0][0]

        async def run() -> list[StoredResource | None]:
            reader = resource_reader(postgres_url, pool_size=2)
            await reader.open()
            try:
                first = await reader.current(*key)
                with database.engine.connect() as connection:
                    killed = connection.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE application_name = :name AND datname = current_database()"
                        ),
                        {"name": READER_APPLICATION_NAME},
                    ).all()
                assert killed
                return [first, await reader.current(*key), await reader.current(*key)]
            finally:
                await reader.close()

        assert asyncio.run(run()) == [expected] * 3
    finally:
        database.dispose()


def test_a_busy_sqlite_database_is_waited_for_off_the_event_loop(sqlite_url: str) -> None:
    """Another connection holding an exclusive lock: the read waits in a thread, not the loop."""
    database = Database(sqlite_url)
    try:
        for record in clinic().records():
            put(database, record)
        key = stored_keys(database)[0]
        expected = repository_reads(database, [key])[0][0]
    finally:
        database.dispose()
    path = make_url(sqlite_url).database
    assert path is not None
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE resources SET version = version WHERE 0")

    def release() -> None:
        time.sleep(0.3)
        holder.execute("COMMIT")
        holder.execute("PRAGMA locking_mode=NORMAL")
        holder.execute("SELECT 1 FROM resources LIMIT 1").fetchall()  # drops the lock
        holder.close()

    async def run() -> tuple[StoredResource | None, int]:
        reader = SqliteReader(path)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        try:
            return await reader.current(*key), ticks
        finally:
            ticker.cancel()
            await reader.close()

    threading.Thread(target=release).start()
    found, ticks = asyncio.run(run())
    assert found == expected
    assert ticks >= 10  # the loop ran while the read waited
