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

Searches that are one SELECT (`select`) take the same connections (on SQLite, a worker thread's):
the SQLAlchemy statement is compiled once per shape (its cache key) for the engine's dialect, and
each search only binds its values. On PostgreSQL a search is prepared (planned once per connection)
only when its caller says one plan suits all its values; otherwise it is planned for its values.

Every read goes to the database: several API processes may serve one PostgreSQL database, so
nothing here caches a resource. Readers only read; writes go through the unit of work
(`service.store.db`).
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio.to_thread
import psycopg
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import Dialect, Select, make_url
from sqlalchemy.sql.compiler import SQLCompiler

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

    async def select(
        self, statement: Select[Any], dialect: Dialect, *, prepare: bool = False
    ) -> list[tuple[Any, ...]]:
        """The rows of a read-only `statement`, as SQLAlchemy would give them (each column's
        result processing applied), compiled for `dialect` (the engine's, once connected).
        `prepare`: one plan suits every execution of the statement, whatever its values (on
        PostgreSQL it is then prepared, and planned once; otherwise for each execution)."""
        ...


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


_STATEMENTS_KEPT = 512
"""Compiled statements kept per reader (one per search shape: parameters, modifiers, sorts)."""


@dataclass(slots=True, eq=False)
class _Compiled:
    compiled: SQLCompiler
    processors: Mapping[str, Callable[[Any], Any]]
    """Each bind parameter's bind processor, by its name in the SQL."""
    types: tuple[Any, ...]
    """Each result column's type, for its result processor (found with the first rows' types)."""
    results: list[Callable[[Any], Any] | None] | None = None

    @classmethod
    def of(cls, statement: Select[Any], dialect: Dialect, key: Any) -> _Compiled:
        compiled = statement.compile(dialect=dialect, cache_key=key)
        assert isinstance(compiled, SQLCompiler)
        escaped = compiled.escaped_bind_names
        processors = {
            escaped.get(name, name): process
            for name, bind in compiled.binds.items()
            if (process := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }
        types = tuple(column.type for column in statement.selected_columns)
        return cls(compiled, processors, types)


@dataclass(slots=True)
class _Statements:
    """SQLAlchemy statements compiled once per cache key, bound per execution.

    What `Connection.execute` does before the driver is called, without a unit of work around
    it: the cache key, the cached compilation, the parameters bound (expanding `IN` lists, each
    value through its type's bind processor); and after: each column's result processor.
    """

    _compiled: dict[tuple[Any, ...], _Compiled] = field(default_factory=dict)

    def bind(
        self, statement: Select[Any], dialect: Dialect
    ) -> tuple[_Compiled, str, Sequence[Any] | dict[str, Any]]:
        """The compiled statement, its SQL and the driver parameters for `statement`'s values."""
        key = statement._generate_cache_key()
        if key is None or key.params:  # not cacheable (none the search builds): compiled anew
            entry = _Compiled.of(statement, dialect, None)
            values = entry.compiled.construct_params(escape_names=False)
        else:
            entry_or_none = self._compiled.get((dialect, key.key))
            if entry_or_none is None:
                entry_or_none = _Compiled.of(statement, dialect, key)
                if len(self._compiled) >= _STATEMENTS_KEPT:
                    self._compiled.clear()
                self._compiled[(dialect, key.key)] = entry_or_none
            entry = entry_or_none
            values = entry.compiled.construct_params(
                extracted_parameters=key.bindparams, escape_names=False
            )
        state = entry.compiled.construct_expanded_state(values)
        processors = entry.processors
        if state.processors:  # the expanded `IN` lists' members
            processors = {**processors, **state.processors}
        bound = {
            name: value if name not in processors else processors[name](value)
            for name, value in state.parameters.items()
        }
        if state.positiontup is None:
            return entry, state.statement, bound
        return entry, state.statement, [bound[name] for name in state.positiontup]

    @staticmethod
    def rows(
        entry: _Compiled,
        dialect: Dialect,
        rows: list[tuple[Any, ...]],
        description: Sequence[Any] | None,
    ) -> list[tuple[Any, ...]]:
        """`rows` as SQLAlchemy would return them: through each column's result processor."""
        if entry.results is None:
            codes = [column[1] for column in description or ()] or [None] * len(entry.types)
            entry.results = [
                kind.dialect_impl(dialect).result_processor(dialect, code)
                for kind, code in zip(entry.types, codes, strict=True)
            ]
        results = entry.results
        if not any(results):
            return rows
        return [
            tuple(
                value if process is None or value is None else process(value)
                for process, value in zip(results, row, strict=True)
            )
            for row in rows
        ]


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
        self._statements = _Statements()

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

    async def select(
        self, statement: Select[Any], dialect: Dialect, *, prepare: bool = False
    ) -> list[tuple[Any, ...]]:
        entry, sql, params = self._statements.bind(statement, dialect)
        if self._pool is None:
            await self.open()
        assert self._pool is not None
        try:
            rows, description = await self._select(self._pool, sql, params, prepare)
        except (psycopg.errors.QueryCanceled, PoolTimeout):
            raise  # the statement ran out of time, or no connection came in time: not again
        except psycopg.OperationalError:  # a connection that died while idle: as in `_rows`
            await self._pool.check()
            rows, description = await self._select(self._pool, sql, params, prepare)
        return self._statements.rows(entry, dialect, rows, description)

    @staticmethod
    async def _select(
        pool: AsyncConnectionPool,
        sql: str,
        params: Sequence[Any] | dict[str, Any],
        prepare: bool,
    ) -> tuple[list[tuple[Any, ...]], Sequence[Any] | None]:
        async with pool.connection() as connection:
            # Prepared only when asked: the generic plan PostgreSQL settles on for a prepared
            # statement cannot tell which of its values are selective.
            cursor = await connection.execute(sql, params, prepare=prepare)
            return await cursor.fetchall(), cursor.description

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
    Searches (`select`) run in a worker thread, on its waiting connection.
    """

    def __init__(self, path: str, *, busy_timeout_ms: int = 30_000) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._statements = _Statements()

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

    async def select(
        self, statement: Select[Any], dialect: Dialect, *, prepare: bool = False
    ) -> list[tuple[Any, ...]]:
        # sqlite3 keeps each connection's statements prepared by their SQL (`prepare` or not).
        # In a worker thread, unlike a point read: a search may take a while (whatever it asks
        # for), and the event loop must go on meanwhile (other requests, the request timeout).
        entry, sql, params = self._statements.bind(statement, dialect)
        rows, description = await anyio.to_thread.run_sync(lambda: self._select(sql, params))
        return self._statements.rows(entry, dialect, rows, description)

    def _select(
        self, sql: str, params: Sequence[Any] | dict[str, Any]
    ) -> tuple[list[tuple[Any, ...]], Sequence[Any] | None]:
        cursor = self._connection(wait=True).execute(sql, params)
        return cursor.fetchall(), cursor.description

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
