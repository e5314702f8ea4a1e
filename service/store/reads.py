"""Point reads of stored resources for the FHIR read path, straight from the database driver.

`GET /fhir/{type}/{id}` and its vread are the service's hot path: a primary-key lookup whose
answer is served as stored. Through SQLAlchemy each read cost a threadpool hop, a pooled
connection checkout (with a pre-ping on PostgreSQL) and BEGIN/SELECT/ROLLBACK, several times
the lookup itself. The readers here do one statement per read on the driver and nothing else:

- `PostgresReader`: an asyncio psycopg 3 pool in autocommit (a lone SELECT needs no
  transaction), statements prepared on first use per connection, no check per checkout (a
  connection found dead is discarded, the pool checked and the query tried once more), and the
  reads that arrive while queries are in flight sent together in the next one.
- `SqliteReader`: one sqlite3 connection per thread, queried on the calling thread, which on the
  server is the event loop's (see `SqliteReader` for why that beats a thread hop).

Every read goes to the database: several API processes may serve one PostgreSQL database, so
nothing here caches a resource. Readers only read; writes go through the unit of work
(`service.store.db`).
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio.to_thread
import psycopg
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import make_url

from service.store.resources import StoredResource, VersionRow

_CURRENT = (
    "SELECT version, last_updated, deleted, body FROM resources"
    " WHERE resource_type = {0} AND id = {0}"
)
_VERSION = (
    "SELECT last_updated, deleted, body FROM resource_versions"
    " WHERE resource_type = {0} AND id = {0} AND version = {0}"
)
_SQLITE_CURRENT, _SQLITE_VERSION = _CURRENT.format("?"), _VERSION.format("?")


READER_APPLICATION_NAME = "infusion-bridge fhir-read"
"""How the read pool's PostgreSQL sessions show in pg_stat_activity."""


class ResourceReader(Protocol):
    """Reads the current version or one version of a resource; None when there is none."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def current(self, resource_type: str, resource_id: str) -> StoredResource | None: ...

    async def version(
        self, resource_type: str, resource_id: str, version: int
    ) -> VersionRow | None: ...


def resource_reader(
    database_url: str, *, pool_size: int = 10, timeout: float = 30.0
) -> ResourceReader:
    """The reader for the database at `database_url` (a SQLAlchemy URL, as in Settings)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise ValueError("the FHIR read path needs a SQLite file, not an in-memory database")
        return SqliteReader(url.database)
    params: dict[str, Any] = {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
    }
    params["application_name"] = READER_APPLICATION_NAME  # unless the URL names one
    params.update({k: v for k, v in url.query.items() if isinstance(v, str)})
    conninfo = make_conninfo("", **{k: v for k, v in params.items() if v is not None})
    return PostgresReader(conninfo, pool_size=pool_size, timeout=timeout)


_PG_CURRENT_MANY = (
    "SELECT k.resource_type, k.id, r.version, r.last_updated, r.deleted, r.body"
    " FROM unnest(%s::text[], %s::text[]) AS k(resource_type, id)"
    " JOIN resources r ON r.resource_type = k.resource_type AND r.id = k.id"
)
_PG_VERSION_MANY = (
    "SELECT k.resource_type, k.id, k.version, r.last_updated, r.deleted, r.body"
    " FROM unnest(%s::text[], %s::text[], %s::int[]) AS k(resource_type, id, version)"
    " JOIN resource_versions r"
    " ON r.resource_type = k.resource_type AND r.id = k.id AND r.version = k.version"
)
_BATCH_LIMIT = 200

Key = tuple[Any, ...]
Rows = dict[Key, tuple[Any, ...]]


class _Coalescer:
    """Point reads queued while earlier ones are in flight go to the database in one query.

    A query costs the client far more than the rows it returns (psycopg's asyncio round trip
    is ~100 us of CPU here, a row a few us), so under load the reads waiting for a connection
    are sent together. Every read is answered by a query sent after it was queued: never by
    one already in flight, so a read sees every write committed before it arrived.
    """

    def __init__(self, fetch: Callable[[list[Key]], Awaitable[Rows]], *, in_flight: int) -> None:
        self._fetch = fetch
        self._in_flight = in_flight
        self._running = 0
        self._pending: dict[Key, list[asyncio.Future[tuple[Any, ...] | None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: Key) -> tuple[Any, ...] | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Any, ...] | None] = loop.create_future()
        self._pending.setdefault(key, []).append(future)
        if self._running < self._in_flight:
            self._running += 1
            task = loop.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                keys = list(itertools.islice(self._pending, _BATCH_LIMIT))
                waiting = {key: self._pending.pop(key) for key in keys}
                try:
                    rows = await self._fetch(keys)
                except Exception as error:
                    if len(keys) == 1:
                        self._answer(waiting, error=error)
                        continue
                    # One read's failure must not fail the others: each is tried on its own.
                    for key in keys:
                        single = {key: waiting[key]}
                        try:
                            self._answer(single, rows=await self._fetch([key]))
                        except Exception as error:
                            self._answer(single, error=error)
                    continue
                self._answer(waiting, rows=rows)
        finally:
            self._running -= 1

    @staticmethod
    def _answer(
        waiting: dict[Key, list[asyncio.Future[tuple[Any, ...] | None]]],
        *,
        rows: Rows | None = None,
        error: BaseException | None = None,
    ) -> None:
        for key, futures in waiting.items():
            for future in futures:
                if future.done():  # its request went away
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result((rows or {}).get(key))


class PostgresReader:
    """Point reads on an asyncio psycopg pool of autocommit connections, coalesced under load."""

    def __init__(
        self, conninfo: str, *, pool_size: int, in_flight: int = 2, timeout: float = 30.0
    ) -> None:
        self._conninfo = conninfo
        self._pool_size = pool_size
        # How long a read waits for a connection (the database down: then it fails) and how
        # long its statement may run.
        self._timeout = timeout or 30.0
        self._pool: AsyncConnectionPool | None = None
        # A few queries in flight at once: one waits on the network while the next fills up.
        self._current = _Coalescer(self._current_rows, in_flight=in_flight)
        self._versions = _Coalescer(self._version_rows, in_flight=in_flight)

    async def open(self) -> None:
        """Open the pool on the running event loop (the server's lifespan calls this)."""
        if self._pool is not None:
            return
        pool = AsyncConnectionPool(
            self._conninfo,
            min_size=min(2, self._pool_size),
            max_size=self._pool_size,
            # prepare_threshold=0: each connection prepares the two statements on first use.
            kwargs={"autocommit": True, "prepare_threshold": 0},
            configure=self._configure,
            timeout=self._timeout,
            open=False,
            name="fhir-read",
        )
        self._pool = pool
        # Not waiting for connections: the app starts, and /readyz says so, with the database down.
        await pool.open(wait=False)

    async def _configure(self, connection: psycopg.AsyncConnection[Any]) -> None:
        await connection.execute(f"SET statement_timeout = {int(self._timeout * 1000)}")

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _rows(self, query: str, params: tuple[Any, ...], width: int) -> Rows:
        if self._pool is None:
            await self.open()
        assert self._pool is not None
        # No check per checkout: a connection that died while idle (a server restart, an idle
        # timeout) fails its query and the pool discards it; then the pool checks the others
        # and the query is tried once more.
        try:
            rows = await self._fetch_all(self._pool, query, params)
        except psycopg.OperationalError:
            await self._pool.check()
            rows = await self._fetch_all(self._pool, query, params)
        return {tuple(row[:width]): tuple(row[width:]) for row in rows}

    @staticmethod
    async def _fetch_all(
        pool: AsyncConnectionPool, query: str, params: tuple[Any, ...]
    ) -> list[tuple[Any, ...]]:
        async with pool.connection() as connection:
            cursor = await connection.execute(query, params)
            return await cursor.fetchall()

    async def _current_rows(self, keys: list[Key]) -> Rows:
        types, ids = zip(*keys, strict=True)
        return await self._rows(_PG_CURRENT_MANY, (list(types), list(ids)), 2)

    async def _version_rows(self, keys: list[Key]) -> Rows:
        types, ids, versions = zip(*keys, strict=True)
        return await self._rows(_PG_VERSION_MANY, (list(types), list(ids), list(versions)), 3)

    async def current(self, resource_type: str, resource_id: str) -> StoredResource | None:
        if "\x00" in resource_type + resource_id:  # PostgreSQL text cannot hold one: not stored
            return None
        row = await self._current.get((resource_type, resource_id))
        if row is None:
            return None
        version, last_updated, deleted, body = row
        return StoredResource(
            resource_type, resource_id, version, last_updated.astimezone(UTC), deleted, body
        )

    async def version(
        self, resource_type: str, resource_id: str, version: int
    ) -> VersionRow | None:
        if "\x00" in resource_type + resource_id:
            return None
        row = await self._versions.get((resource_type, resource_id, version))
        if row is None:
            return None
        last_updated, deleted, body = row
        return VersionRow(
            resource_type, resource_id, version, last_updated.astimezone(UTC), deleted, body
        )


class SqliteReader:
    """Point reads on a sqlite3 connection of the calling thread, without a thread hop.

    A primary-key lookup in SQLite takes tens of microseconds; handing it to the threadpool and
    back costs more than that, and under load the worker threads then contend with the event loop
    for the GIL. So the read runs on the event loop's own connection. In WAL mode a reader never
    waits for a writer; the rare moments it would (another connection recovering the WAL) must
    not stall the loop, so that connection has no busy timeout, and a read that finds the database
    busy is retried in a worker thread whose connection waits as long as the writers' do.
    Autocommit: each SELECT reads the newest committed snapshot, and ends when its rows are taken.
    """

    def __init__(self, path: str, *, busy_timeout_ms: int = 30_000) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []

    async def open(self) -> None:
        """Connections are opened per thread on first use."""

    async def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._local = threading.local()

    def _connection(self, *, wait: bool) -> sqlite3.Connection:
        slot = "waiting" if wait else "immediate"
        connection: sqlite3.Connection | None = getattr(self._local, slot, None)
        if connection is None:
            connection = sqlite3.connect(
                self._path, timeout=0, isolation_level=None, check_same_thread=False
            )
            connection.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms if wait else 0}")
            connection.execute("PRAGMA query_only=ON")
            setattr(self._local, slot, connection)
            with self._lock:
                self._connections.append(connection)
        return connection

    def _fetch(self, query: str, params: tuple[Any, ...], *, wait: bool) -> tuple[Any, ...] | None:
        # fetchall steps the statement to its end, which closes its read transaction: the next
        # read sees what was committed since.
        rows = self._connection(wait=wait).execute(query, params).fetchall()
        return tuple(rows[0]) if rows else None

    async def _read(self, query: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        try:
            return self._fetch(query, params, wait=False)
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
        return await anyio.to_thread.run_sync(lambda: self._fetch(query, params, wait=True))

    async def current(self, resource_type: str, resource_id: str) -> StoredResource | None:
        row = await self._read(_SQLITE_CURRENT, (resource_type, resource_id))
        if row is None:
            return None
        version, last_updated, deleted, body = row
        return StoredResource(
            resource_type, resource_id, version, _sqlite_time(last_updated), bool(deleted), body
        )

    async def version(
        self, resource_type: str, resource_id: str, version: int
    ) -> VersionRow | None:
        row = await self._read(_SQLITE_VERSION, (resource_type, resource_id, version))
        if row is None:
            return None
        last_updated, deleted, body = row
        return VersionRow(
            resource_type, resource_id, version, _sqlite_time(last_updated), bool(deleted), body
        )


def _sqlite_time(value: str) -> datetime:
    """A stored timestamp: SQLAlchemy keeps UTC as naive ISO text on SQLite (`UtcDateTime`)."""
    return datetime.fromisoformat(value).replace(tzinfo=UTC)
