"""The resource store: every version of every FHIR resource as stored JSON, and the outbox.

A write gives a resource whose content changed a new version (meta.versionId and
meta.lastUpdated set here), keeps the version in `resource_versions`, and queues an outbox row, all
on the caller's connection (its unit of work commits). A resource whose content is unchanged is
not written at all. Reads serve the stored bytes.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import (
    Boolean,
    Connection,
    Dialect,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from service.fhir.search_index import IndexRows, extract
from service.json_text import dump_json
from service.store.db import pairs_in
from service.store.tables import (
    UtcDateTime,
    outbox,
    record_resources,
    resource_versions,
    resources,
    search_composite,
    search_date,
    search_quantity,
    search_reference,
    search_string,
    search_token,
)

Resource = dict[str, Any]
Key = tuple[str, str]
"""(resource type, id)"""


@dataclass(frozen=True, slots=True)
class WrittenResource:
    """A resource version the store wrote, as a read now returns it (`body` None if deleted)."""

    resource_type: str
    id: str
    version: int
    deleted: bool
    last_updated: datetime
    body: str | None

    @property
    def key(self) -> Key:
        return (self.resource_type, self.id)


@dataclass(frozen=True, slots=True)
class StoredResource:
    resource_type: str
    id: str
    version: int
    last_updated: datetime
    deleted: bool
    body: str


@dataclass(frozen=True, slots=True)
class VersionRow:
    """One stored version of a resource; `body` is None for a deletion."""

    resource_type: str
    id: str
    version: int
    last_updated: datetime
    deleted: bool
    body: str | None


_STORED_COLUMNS = (
    resources.c.resource_type,
    resources.c.id,
    resources.c.version,
    resources.c.last_updated,
    resources.c.deleted,
    resources.c.body,
)
"""A current version as `StoredResource` holds it."""
_VERSION_COLUMNS = (
    resource_versions.c.resource_type,
    resource_versions.c.id,
    resource_versions.c.version,
    resource_versions.c.last_updated,
    resource_versions.c.deleted,
    resource_versions.c.body,
)


def content_hash(resource: Resource) -> str:
    """The hash of a resource's content: what the mapping produced, before version metadata."""
    return hashlib.sha256(dump_json(resource)).hexdigest()


def with_version(resource: Resource, version: int, last_updated: datetime) -> Resource:
    """The resource as stored and served: meta.versionId and meta.lastUpdated first in meta."""
    meta = {"versionId": str(version), "lastUpdated": last_updated.isoformat()}
    return {
        "resourceType": resource["resourceType"],
        "id": resource["id"],
        "meta": meta | resource.get("meta", {}),
        **{k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")},
    }


def patient_of(resource: Resource) -> str | None:
    """The id of the Patient a resource belongs to, for ordering deliveries per patient."""
    if resource["resourceType"] == "Patient":
        return str(resource["id"])
    for element in ("subject", "patient"):
        target = resource.get(element)
        if isinstance(target, dict):
            ref = str(target.get("reference", ""))
            patient_id = ref.removeprefix("Patient/")
            # Only an id that is a FHIR id orders deliveries; anything else is no patient.
            if ref.startswith("Patient/") and _FHIR_ID.fullmatch(patient_id):
                return patient_id
    return None


_CHUNK = 500
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_CURRENT = select(
    resources.c.resource_type,
    resources.c.id,
    resources.c.version,
    resources.c.content_hash,
    resources.c.deleted,
)
_UPDATE_CURRENT = update(resources).where(
    resources.c.resource_type == bindparam("b_type"), resources.c.id == bindparam("b_id")
)


class ResourceRepository:
    """Reads and writes FHIR resources on one connection; never commits."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._index = SearchIndexWriter(connection)

    def _current(self, keys: Iterable[Key]) -> dict[Key, tuple[int, str, bool]]:
        wanted = sorted(set(keys))
        out: dict[Key, tuple[int, str, bool]] = {}
        # In chunks: PostgreSQL refuses a tuple IN list of many thousands as too deep to parse.
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            query = _CURRENT.where(pairs_in(resources.c.resource_type, resources.c.id, chunk))
            for row in self._connection.execute(query):
                out[(row.resource_type, row.id)] = (row.version, row.content_hash, row.deleted)
        return out

    def write(
        self,
        batch: Sequence[Resource],
        *,
        now: datetime,
        validate: Callable[[Resource], None] | None = None,
        new: bool = False,
    ) -> list[WrittenResource]:
        """Store the resources whose content changed as new versions; returns what was written.

        `validate` sees each resource about to get a new version (and may raise); unchanged
        resources are neither validated nor written again. `new`: the caller made the ids (new
        uuids), so none is looked up; should one be taken after all, its INSERT fails.
        """
        current = {} if new else self._current((r["resourceType"], r["id"]) for r in batch)
        written: list[WrittenResource] = []
        new_rows, changed_rows, versions, queued = [], [], [], []
        seen: set[Key] = set()
        indexed: list[Resource] = []
        for resource in batch:
            key = (resource["resourceType"], resource["id"])
            if key in seen:
                raise ValueError(f"{key[0]}/{key[1]} appears twice in one write")
            seen.add(key)
            digest = content_hash(resource)
            before = current.get(key)
            if before is not None and before[1] == digest and not before[2]:
                continue
            if validate is not None:
                validate(resource)
            version = 1 if before is None else before[0] + 1
            stored = with_version(resource, version, now)
            indexed.append(stored)
            body = dump_json(stored).decode()
            row = {"version": version, "last_updated": now, "deleted": False}
            row |= {"content_hash": digest, "body": body}
            if before is None:
                new_rows.append({"resource_type": key[0], "id": key[1], **row})
            else:
                changed_rows.append({"b_type": key[0], "b_id": key[1], **row})
            versions.append({"resource_type": key[0], "id": key[1], **row})
            queued.append(_queued(key, version, False, patient_of(resource), now))
            written.append(WrittenResource(key[0], key[1], version, False, now, body))
        self._apply(new_rows, changed_rows, versions, queued)
        self._index.remove(w.key for w in written if w.version > 1)
        self._index.insert(indexed)
        return written

    def delete(self, keys: Iterable[Key], *, now: datetime) -> list[WrittenResource]:
        """Mark resources deleted (a new, empty version); history stays."""
        current = self._current(keys)
        changed_rows, versions, queued, written = [], [], [], []
        for key, (version, digest, deleted) in sorted(current.items()):
            if deleted:
                continue
            row = {"version": version + 1, "last_updated": now, "deleted": True}
            changed_rows.append({"b_type": key[0], "b_id": key[1], "content_hash": digest} | row)
            versions.append({"resource_type": key[0], "id": key[1], "body": None} | row)
            queued.append(_queued(key, version + 1, True, None, now))
            written.append(WrittenResource(key[0], key[1], version + 1, True, now, None))
        self._apply([], changed_rows, versions, queued)
        self._index.remove(w.key for w in written)
        return written

    def _apply(
        self,
        new_rows: list[dict[str, Any]],
        changed_rows: list[dict[str, Any]],
        versions: list[dict[str, Any]],
        queued: list[dict[str, Any]],
    ) -> None:
        if new_rows:
            insert_rows(self._connection, resources, new_rows)
        if changed_rows:
            self._connection.execute(_UPDATE_CURRENT, changed_rows)
        if versions:
            rows = [{**v, "body": v.get("body")} for v in versions]
            for row in rows:
                row.pop("content_hash", None)
            insert_rows(self._connection, resource_versions, rows)
        if queued:
            insert_rows(self._connection, outbox, queued)

    def read(self, resource_type: str, resource_id: str) -> StoredResource | None:
        row = self._connection.execute(
            select(*_STORED_COLUMNS).where(
                resources.c.resource_type == resource_type, resources.c.id == resource_id
            )
        ).first()
        return None if row is None else StoredResource(*row)

    def history(self, resource_type: str, resource_id: str) -> list[tuple[int, bool, str | None]]:
        """(version, deleted, body) of every version, oldest first."""
        rows = self._connection.execute(
            select(
                resource_versions.c.version, resource_versions.c.deleted, resource_versions.c.body
            )
            .where(
                resource_versions.c.resource_type == resource_type,
                resource_versions.c.id == resource_id,
            )
            .order_by(resource_versions.c.version)
        )
        return [(row.version, row.deleted, row.body) for row in rows]

    def version(self, resource_type: str, resource_id: str, version: int) -> VersionRow | None:
        row = self._connection.execute(
            select(*_VERSION_COLUMNS).where(
                resource_versions.c.resource_type == resource_type,
                resource_versions.c.id == resource_id,
                resource_versions.c.version == version,
            )
        ).first()
        return None if row is None else VersionRow(*row)

    def type_history(
        self,
        resource_type: str,
        *,
        resource_id: str | None = None,
        since: datetime | None = None,
        at: tuple[datetime, datetime] | None = None,
        before: tuple[datetime, str, int] | None = None,
        limit: int = 50,
    ) -> list[VersionRow]:
        """Versions newest first, after a keyset cursor (last updated, id, version).

        `since`: the versions made at or after it. `at` (an inclusive range): the versions
        current at some point of it, from when each was made until the next version was.
        """
        query = select(*_VERSION_COLUMNS).where(resource_versions.c.resource_type == resource_type)
        if resource_id is not None:
            query = query.where(resource_versions.c.id == resource_id)
        if since is not None:
            query = query.where(resource_versions.c.last_updated >= since)
        if at is not None:
            low, high = at
            following = resource_versions.alias("following")
            superseded = (
                select(following.c.last_updated)
                .where(
                    following.c.resource_type == resource_versions.c.resource_type,
                    following.c.id == resource_versions.c.id,
                    following.c.version == resource_versions.c.version + 1,
                )
                .scalar_subquery()
            )
            query = query.where(
                resource_versions.c.last_updated <= high,
                or_(superseded.is_(None), superseded > low),
            )
        if before is not None:
            when, last_id, last_version = before
            query = query.where(
                or_(
                    resource_versions.c.last_updated < when,
                    and_(
                        resource_versions.c.last_updated == when,
                        or_(
                            resource_versions.c.id < last_id,
                            and_(
                                resource_versions.c.id == last_id,
                                resource_versions.c.version < last_version,
                            ),
                        ),
                    ),
                )
            )
        query = query.order_by(
            resource_versions.c.last_updated.desc(),
            resource_versions.c.id.desc(),
            resource_versions.c.version.desc(),
        ).limit(limit)
        return [VersionRow(*row) for row in self._connection.execute(query)]

    def deletions(
        self, resource_type: str, versions: Iterable[tuple[str, int]]
    ) -> set[tuple[str, int]]:
        """Which of the (id, version) pairs of a type are deletions."""
        wanted = sorted(set(versions))
        found: set[tuple[str, int]] = set()
        v = resource_versions.c
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            query = select(v.id, v.version).where(
                v.resource_type == resource_type, v.deleted, pairs_in(v.id, v.version, chunk)
            )
            found.update((row.id, row.version) for row in self._connection.execute(query))
        return found

    # --- which resources a record maps to ---

    def links(self, record_kind: str, record_ids: Iterable[str]) -> dict[str, set[Key]]:
        ids = sorted(set(record_ids))
        out: dict[str, set[Key]] = {record_id: set() for record_id in ids}
        for start in range(0, len(ids), _CHUNK):
            rows = self._connection.execute(
                select(
                    record_resources.c.record_id,
                    record_resources.c.resource_type,
                    record_resources.c.resource_id,
                ).where(
                    record_resources.c.record_kind == record_kind,
                    record_resources.c.record_id.in_(ids[start : start + _CHUNK]),
                )
            )
            for row in rows:
                out[row.record_id].add((row.resource_type, row.resource_id))
        return out

    def relink(
        self,
        *,
        added: Sequence[tuple[str, str, str, str]],
        removed: Sequence[tuple[str, str, str, str]],
    ) -> None:
        """Record which resources records map to: (record kind, record id, type, resource id)."""
        columns = ("record_kind", "record_id", "resource_type", "resource_id")
        if removed:
            self._connection.execute(
                delete(record_resources).where(
                    record_resources.c.record_kind == bindparam("b_kind"),
                    record_resources.c.record_id == bindparam("b_record"),
                    record_resources.c.resource_type == bindparam("b_type"),
                    record_resources.c.resource_id == bindparam("b_id"),
                ),
                [
                    dict(zip(("b_kind", "b_record", "b_type", "b_id"), row, strict=True))
                    for row in removed
                ],
            )
        if added:
            self._connection.execute(
                _insert_ignore(self._connection),
                [dict(zip(columns, row, strict=True)) for row in sorted(added)],
            )

    # --- for the FHIR facade's writes ---

    def lock(self, resource_type: str, resource_id: str) -> StoredResource | None:
        """The current version, locked until the transaction ends: writers of one id queue.

        On PostgreSQL an advisory lock on the key comes first, so two writers of an id that does
        not exist yet queue too (a row lock needs a row); SQLite write transactions hold the
        database's write lock already.
        """
        self.serialize(f"{resource_type}/{resource_id}")
        row = self._connection.execute(
            select(*_STORED_COLUMNS)
            .where(resources.c.resource_type == resource_type, resources.c.id == resource_id)
            .with_for_update()
        ).first()
        return None if row is None else StoredResource(*row)

    def lock_many(self, keys: Collection[Key]) -> dict[Key, StoredResource]:
        """The current versions of `keys` that exist, each locked as `lock` locks one: one
        query for them all (ids that may not exist yet are `serialize`d by the caller)."""
        wanted = sorted(set(keys))
        found: dict[Key, StoredResource] = {}
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            query = (
                select(*_STORED_COLUMNS)
                .where(pairs_in(resources.c.resource_type, resources.c.id, chunk))
                .order_by(resources.c.resource_type, resources.c.id)
                .with_for_update()
            )
            for row in self._connection.execute(query):
                found[(row.resource_type, row.id)] = StoredResource(*row)
        return found

    def serialize(self, name: str) -> None:
        """Queue this transaction behind any other holding `name` (PostgreSQL), until it ends."""
        if self._connection.dialect.name != "postgresql":
            return  # SQLite: BEGIN IMMEDIATE already serializes every writer
        digest = hashlib.sha256(name.encode()).digest()
        key = int.from_bytes(digest[:8], "big", signed=True)
        self._connection.execute(select(func.pg_advisory_xact_lock(key)))


_INDEX_TABLES = (search_string, search_token, search_date, search_reference, search_quantity)
_OWNER = ("resource_type", "resource_id")
INDEX_COLUMNS: dict[Table, tuple[str, ...]] = {
    search_string: (*_OWNER, "param", "value", "exact"),
    search_token: (*_OWNER, "param", "system", "code", "text"),
    search_date: (*_OWNER, "param", "low", "high"),
    search_reference: (*_OWNER, "param", "target_type", "target_id", "url"),
    search_quantity: (*_OWNER, "param", "value", "system", "code"),
    search_composite: (
        *(*_OWNER, "param", "system", "code", "value_system", "value_code"),
        *("value_number", "value_low", "value_high", "value_text"),
    ),
}
"""Each index table's columns: the resource's key, then its `IndexRows` tuples' fields."""


class SearchIndexWriter:
    """Keeps the search-index rows of current resource versions; never commits.

    A new version's rows replace the old version's; a deleted resource has none, so search
    never sees it.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def remove(self, keys: Iterable[Key]) -> None:
        wanted = sorted(set(keys))
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            for table in (*_INDEX_TABLES, search_composite):
                self._connection.execute(
                    delete(table).where(pairs_in(table.c.resource_type, table.c.resource_id, chunk))
                )

    def insert(self, batch: Sequence[Resource], *, tables: Collection[Table] | None = None) -> None:
        """Write the index rows of `batch` (into `tables` only, when given)."""
        # Rows as tuples in each table's column order (`INDEX_COLUMNS`), not dicts: a write
        # makes dozens per resource, on the write path.
        found: dict[Table, list[tuple[Any, ...]]] = {table: [] for table in INDEX_COLUMNS}
        strings, tokens, dates = found[search_string], found[search_token], found[search_date]
        references, quantities = found[search_reference], found[search_quantity]
        composites = found[search_composite]
        for resource in batch:
            rows: IndexRows = extract(resource)
            head = (resource["resourceType"], resource["id"])
            # A FHIRPath union has no duplicates; neither do the index rows.
            strings += [head + row for row in dict.fromkeys(rows.strings)]
            tokens += [head + row for row in dict.fromkeys(rows.tokens)]
            dates += [head + row for row in dict.fromkeys(rows.dates)]
            references += [head + row for row in dict.fromkeys(rows.references)]
            quantities += [head + row for row in dict.fromkeys(rows.quantities)]
            composites += [head + row for row in dict.fromkeys(rows.composites)]
        for table, values in found.items():
            if values and (tables is None or table in tables):
                insert_values(self._connection, table, INDEX_COLUMNS[table], values)

    def insert_bodies(self, bodies: Sequence[str]) -> None:
        """Index stored resources (a reindex, or the migration that added the index).

        Only into the index tables there are: a migration's backfill runs before later
        revisions add theirs (which backfill them).
        """
        there = set(inspect(self._connection).get_table_names())
        tables = {t for t in (*_INDEX_TABLES, search_composite) if t.name in there}
        self.insert([orjson.loads(body) for body in bodies], tables=tables)


_COPY_FROM = 50
"""Rows from which PostgreSQL gets them by COPY: a batched INSERT is faster for a few."""


def insert_rows(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """INSERT `rows` (dicts with the same keys) into `table`, on the caller's transaction."""
    if not rows:
        return
    columns = tuple(rows[0])
    if any(tuple(row) != columns for row in rows):
        raise ValueError(f"rows for {table.name} do not all have the columns {columns}")
    insert_values(connection, table, columns, [tuple(row.values()) for row in rows])


def insert_values(
    connection: Connection,
    table: Table,
    columns: tuple[str, ...],
    values: Sequence[tuple[Any, ...]],
) -> None:
    """INSERT `values` (tuples in the order of `columns`) into `table`, on the caller's
    transaction.

    Without SQLAlchemy's per-row parameter processing, which dominated the cost of a write:
    values go through each column type's bind processor, as SQLAlchemy binds them, so what is
    stored (SQLite's datetime text, PostgreSQL's timestamptz) is what queries compare against.
    PostgreSQL takes larger batches by COPY on the same connection, SQLite a prepared INSERT's
    executemany; any other connection SQLAlchemy's own executemany.
    """
    if not values:
        return
    dialect = connection.dialect
    if dialect.name not in ("sqlite", "postgresql") or (
        dialect.name == "postgresql" and len(values) < _COPY_FROM
    ):
        connection.execute(insert(table), [dict(zip(columns, row, strict=True)) for row in values])
        return
    statement, processors = _prepared(dialect, table, columns)
    # Only the columns that have a bind processor are touched (most index columns have none).
    processed = [(index, process) for index, process in enumerate(processors) if process]
    rows: Sequence[tuple[Any, ...]] = values
    if processed:
        rows = [_processed(row, processed) for row in values]
    if dialect.name == "sqlite":
        connection.exec_driver_sql(statement, rows)
        return
    raw = connection.connection.driver_connection
    assert raw is not None
    driver_error = dialect.loaded_dbapi.Error
    try:
        with raw.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
    except driver_error as error:
        # As SQLAlchemy raises it for an INSERT (IntegrityError, OperationalError, ...), so
        # callers that look at the error (a deadlock retried, say) see what they would.
        raise DBAPIError.instance(statement, None, error, driver_error) from error


def _processed(
    row: tuple[Any, ...], processed: list[tuple[int, Callable[[Any], Any]]]
) -> tuple[Any, ...]:
    values = list(row)
    for index, process in processed:
        values[index] = process(values[index])
    return tuple(values)


@functools.lru_cache(maxsize=512)
def _prepared(
    dialect: Dialect, table: Table, columns: tuple[str, ...]
) -> tuple[str, tuple[Callable[[Any], Any] | None, ...]]:
    """The statement (COPY on PostgreSQL, INSERT elsewhere) and each column's bind processor."""
    quote = dialect.identifier_preparer.quote
    names = ", ".join(quote(name) for name in columns)
    processors = tuple(
        table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns
    )
    if dialect.name == "postgresql":
        # psycopg's COPY adapts bools and aware datetimes (any zone: timestamptz keeps the
        # instant) itself: their processors only cost a call per value, a tenth of a row's cost.
        processors = tuple(
            None if isinstance(table.c[name].type, Boolean | UtcDateTime) else process
            for name, process in zip(columns, processors, strict=True)
        )
        return f"COPY {quote(table.name)} ({names}) FROM STDIN", processors
    marks = ", ".join("?" for _ in columns)
    return f"INSERT INTO {quote(table.name)} ({names}) VALUES ({marks})", processors


def _insert_ignore(connection: Connection) -> Any:
    dialect_insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    return dialect_insert(record_resources).on_conflict_do_nothing()


def _queued(
    key: Key, version: int, deleted: bool, patient_id: str | None, now: datetime
) -> dict[str, Any]:
    return {
        "resource_type": key[0],
        "resource_id": key[1],
        "version": version,
        "deleted": deleted,
        "patient_id": patient_id,
        "created_at": now,
    }
