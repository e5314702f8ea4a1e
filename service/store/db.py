"""The database: engine setup per backend, the unit of work, and migration state.

SQLite (the embedded default) runs in WAL mode with full fsync, so an acknowledged write survives
a crash; write transactions start with BEGIN IMMEDIATE so two writers queue instead of failing
half-way. PostgreSQL (production) uses a pooled psycopg 3 engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, and_, create_engine, event, make_url, or_, text
from sqlalchemy.engine import RootTransaction

MIGRATIONS = Path(__file__).parent / "migrations"
_WRITE = "infusion_bridge_write"


def create_database_engine(
    url: str, *, pool_size: int = 10, statement_timeout: float = 30.0
) -> Engine:
    """An engine for `url`, configured for durable, concurrent use on its backend.

    `statement_timeout` (seconds, 0 for none) bounds each PostgreSQL statement and each wait
    for SQLite's write lock: a request stuck behind a runaway query or a held lock fails (and
    rolls back) instead of holding its connection and thread indefinitely.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, pool_size=pool_size, busy_timeout=statement_timeout or 30.0)
    engine = create_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, future=True
    )
    milliseconds = int(statement_timeout * 1000)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET statement_timeout = {milliseconds}")
        dbapi_connection.commit()

    return engine


def _sqlite_engine(url: str, *, pool_size: int, busy_timeout: float) -> Engine:
    parsed = make_url(url)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    # As many pooled connections as the threadpool has threads (40), so concurrent reads do
    # not open and close connections, each with its PRAGMAs, under load.
    engine = create_engine(
        url, connect_args={"timeout": busy_timeout}, pool_size=max(pool_size, 40), max_overflow=10
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module: it would otherwise defer BEGIN
        # and make SAVEPOINTs and BEGIN IMMEDIATE impossible.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(_WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class UnitOfWork:
    """One database transaction: rolled back on exit unless `commit()` was called.

    Repositories take `uow.connection` and never commit; the caller decides when the work is
    whole. `write=True` takes SQLite's write lock at BEGIN, so the transaction cannot fail later
    for want of it.
    """

    def __init__(self, engine: Engine, *, write: bool) -> None:
        self._engine = engine
        self._write = write
        self._connection: Connection | None = None
        self._transaction: RootTransaction | None = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            raise RuntimeError("the unit of work is not open")
        return self._connection

    def __enter__(self) -> Self:
        self._connection = self._engine.connect()
        if self._write:
            self._connection.execution_options(**{_WRITE: True})
        self._transaction = self._connection.begin()
        return self

    def commit(self) -> None:
        assert self._transaction is not None
        self._transaction.commit()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._connection is not None
        assert self._transaction is not None
        try:
            if self._transaction.is_active:
                self._transaction.rollback()
        finally:
            self._connection.close()
            self._connection = None
            self._transaction = None


class Database:
    """The engine and what is built on it: units of work, health and migrations."""

    def __init__(self, url: str, *, pool_size: int = 10, statement_timeout: float = 30.0) -> None:
        self.url = url
        self.statement_timeout = statement_timeout
        self.engine = create_database_engine(
            url, pool_size=pool_size, statement_timeout=statement_timeout
        )
        self._script = ScriptDirectory.from_config(self._alembic_config())

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def unit_of_work(self, *, write: bool = True) -> UnitOfWork:
        return UnitOfWork(self.engine, write=write)

    def _alembic_config(self) -> Config:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        return config

    def migrate(self) -> None:
        """Bring the schema to the newest migration (safe to run from several processes)."""
        config = self._alembic_config()
        with self.unit_of_work(write=True) as uow:
            if self.backend == "postgresql":  # a backfill may take longer than any request
                uow.connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
            config.attributes["connection"] = uow.connection
            command.upgrade(config, "head")
            uow.commit()

    def migration_state(self) -> tuple[set[str], set[str]]:
        """(applied revisions, newest revisions): equal when the schema is current."""
        with self.engine.connect() as connection:
            applied = set(MigrationContext.configure(connection).get_current_heads())
        return applied, set(self._script.get_heads())

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


@contextmanager
def open_database(url: str, *, pool_size: int = 10) -> Iterator[Database]:
    database = Database(url, pool_size=pool_size)
    try:
        yield database
    finally:
        database.dispose()


def grouped(pairs: Iterable[tuple[Any, Any]]) -> dict[Any, list[Any]]:
    """The second values of `pairs` by their first, in the order they come, without repeats."""
    out: dict[Any, dict[Any, None]] = {}
    for key, value in pairs:
        out.setdefault(key, {})[value] = None
    return {key: list(values) for key, values in out.items()}


def pairs_in(first: Any, second: Any, pairs: Iterable[tuple[Any, Any]]) -> Any:
    """`(first, second) IN pairs`, written as one `second IN (...)` per value of `first`.

    SQLite answers a row-value IN list by scanning the whole table; each of these terms it
    looks up in an index led by the two columns (PostgreSQL uses its index for both forms).
    Where other conditions lead the index, SQLite may still not: group the pairs and run one
    statement per first value instead.
    """
    return or_(
        *(and_(first == key, second.in_(values)) for key, values in grouped(sorted(pairs)).items())
    )
