"""Record persistence: the current version of each record and its history of changes.

Repositories run their statements on the connection of the caller's unit of work and never commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, RowMapping, and_, bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from service.records.models import RecordModel
from service.store.db import pairs_in
from service.store.tables import record_changes, records


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record's current version as stored: canonical JSON text and its bookkeeping."""

    kind: str
    external_id: str
    patient_id: str | None
    course_id: str | None
    version: int
    content_hash: str
    body: str
    created_at: datetime
    updated_at: datetime
    updated_by: str


@dataclass(frozen=True, slots=True)
class RecordVersion:
    """A record as just written, and the stored version it became."""

    record: RecordModel
    stored: StoredRecord
    previous: StoredRecord | None = None
    """The version it replaced: a session that moved to another course leaves that course's plan."""


@dataclass(frozen=True, slots=True)
class RecordChange:
    """One version in a record's history: who changed it, when, and the JSON Patch applied."""

    sequence: int
    kind: str
    external_id: str
    version: int
    operation: str
    changed_at: datetime
    changed_by: str
    request_id: str | None
    patch: str | None
    body: str


_RECORD_COLUMNS = (
    records.c.kind,
    records.c.external_id,
    records.c.patient_id,
    records.c.course_id,
    records.c.version,
    records.c.content_hash,
    records.c.body,
    records.c.created_at,
    records.c.updated_at,
    records.c.updated_by,
)


def _stored(row: RowMapping) -> StoredRecord:
    return StoredRecord(**row)


def _values(record: StoredRecord) -> dict[str, object]:
    return {
        "kind": record.kind,
        "external_id": record.external_id,
        "patient_id": record.patient_id,
        "course_id": record.course_id,
        "version": record.version,
        "content_hash": record.content_hash,
        "body": record.body,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "updated_by": record.updated_by,
    }


def _replacement(record: StoredRecord) -> dict[str, object]:
    values = _values(record)
    parameters = {column: values[column] for column in _REPLACED_COLUMNS}
    return parameters | {"b_kind": record.kind, "b_external_id": record.external_id}


def _change_values(change: RecordChange) -> dict[str, object]:
    return {
        "kind": change.kind,
        "external_id": change.external_id,
        "version": change.version,
        "operation": change.operation,
        "changed_at": change.changed_at,
        "changed_by": change.changed_by,
        "request_id": change.request_id,
        "patch": change.patch,
        "body": change.body,
    }


# Statements on the write path are built once with bound parameters, so SQLAlchemy compiles
# each a single time instead of re-deriving a cache key from literal values on every call.
_GET = select(*_RECORD_COLUMNS).where(
    records.c.kind == bindparam("kind"), records.c.external_id == bindparam("external_id")
)
_GET_FOR_UPDATE = _GET.with_for_update()
_INSERT_NEW = {
    name: dialect_insert(records)
    .on_conflict_do_nothing(index_elements=["kind", "external_id"])
    .returning(records.c.id)
    for name, dialect_insert in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))
}
# An UPDATE without .values() sets the columns named in the parameters it is executed with.
_REPLACE = update(records).where(
    records.c.kind == bindparam("b_kind"), records.c.external_id == bindparam("b_external_id")
)
_REPLACED_COLUMNS = (
    "patient_id",
    "course_id",
    "version",
    "content_hash",
    "body",
    "updated_at",
    "updated_by",
)
_ADD_CHANGE = insert(record_changes)


class RecordRepository:
    """Reads and writes rows of `records` and `record_changes` on one connection."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    @property
    def connection(self) -> Connection:
        return self._connection

    def get(self, kind: str, external_id: str, *, for_update: bool = False) -> StoredRecord | None:
        query = _GET_FOR_UPDATE if for_update else _GET
        row = self._connection.execute(query, {"kind": kind, "external_id": external_id}).first()
        return None if row is None else _stored(row._mapping)

    def get_many(
        self, keys: set[tuple[str, str]], *, for_update: bool = False
    ) -> dict[tuple[str, str], StoredRecord]:
        """Many records by (kind, external_id) in one round trip.

        With `for_update` the rows are locked in key order, so two batches that share records
        queue behind each other instead of deadlocking.
        """
        wanted = sorted(keys)
        out: dict[tuple[str, str], StoredRecord] = {}
        # In chunks, in key order: PostgreSQL rejects a tuple IN list of many thousands.
        for start in range(0, len(wanted), 500):
            query = select(*_RECORD_COLUMNS).where(
                pairs_in(records.c.kind, records.c.external_id, wanted[start : start + 500])
            )
            if for_update:
                query = query.order_by(records.c.kind, records.c.external_id).with_for_update()
            for row in self._connection.execute(query):
                record = _stored(row._mapping)
                out[(record.kind, record.external_id)] = record
        return out

    def insert(self, record: StoredRecord) -> bool:
        """Insert a first version; False when another writer inserted the same key first."""
        statement = _INSERT_NEW[self._connection.dialect.name]
        result = self._connection.execute(statement, _values(record))
        return result.first() is not None

    def replace(self, record: StoredRecord) -> None:
        """Write a new current version over the one the caller read with `for_update`."""
        self._connection.execute(_REPLACE, _replacement(record))

    def add_change(self, change: RecordChange) -> None:
        self._connection.execute(_ADD_CHANGE, _change_values(change))

    def insert_many(self, batch: list[StoredRecord]) -> int:
        """Insert first versions; returns how many were new (fewer: another writer won a race)."""
        if not batch:
            return 0
        statement = _INSERT_NEW[self._connection.dialect.name]
        result = self._connection.execute(statement, [_values(record) for record in batch])
        return len(result.all())

    def replace_many(self, batch: list[StoredRecord]) -> None:
        if batch:
            self._connection.execute(_REPLACE, [_replacement(record) for record in batch])

    def add_changes(self, changes: list[RecordChange]) -> None:
        if changes:
            self._connection.execute(_ADD_CHANGE, [_change_values(c) for c in changes])

    def page(
        self,
        kind: str,
        *,
        patient_id: str | None = None,
        course_id: str | None = None,
        after: str | None = None,
        limit: int = 50,
    ) -> list[StoredRecord]:
        """One page of records of a kind, by external id, after a keyset cursor."""
        conditions = [records.c.kind == kind]
        if patient_id is not None:
            conditions.append(records.c.patient_id == patient_id)
        if course_id is not None:
            conditions.append(records.c.course_id == course_id)
        if after is not None:
            conditions.append(records.c.external_id > after)
        query = (
            select(*_RECORD_COLUMNS)
            .where(and_(*conditions))
            .order_by(records.c.external_id)
            .limit(limit)
        )
        return [_stored(row._mapping) for row in self._connection.execute(query)]

    def history(self, kind: str, external_id: str) -> list[RecordChange]:
        query = (
            select(
                record_changes.c.id.label("sequence"),
                record_changes.c.kind,
                record_changes.c.external_id,
                record_changes.c.version,
                record_changes.c.operation,
                record_changes.c.changed_at,
                record_changes.c.changed_by,
                record_changes.c.request_id,
                record_changes.c.patch,
                record_changes.c.body,
            )
            .where(record_changes.c.kind == kind, record_changes.c.external_id == external_id)
            .order_by(record_changes.c.version)
        )
        return [RecordChange(**row._mapping) for row in self._connection.execute(query)]

    def count(self, kind: str | None = None) -> int:
        query = select(func.count()).select_from(records)
        if kind is not None:
            query = query.where(records.c.kind == kind)
        return int(self._connection.execute(query).scalar_one())
