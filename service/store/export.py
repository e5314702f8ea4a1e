"""Queries behind Bulk Data `$export` and `Patient/$everything`: job rows, snapshots, compartments.

An export job is a row in `export_jobs`, so any API process can answer for it. Its files are not
written anywhere: each is streamed from the store when downloaded, as the snapshot at the job's
`transaction_time`. A resource whose current row is newer than that instant is served as the
version that was current then (from `resource_versions`), one that did not exist yet or was
deleted then is left out, so every download of a job gives the same content whatever was
written since. Pages are keyset pages over the primary key, so memory stays flat however large
the store.

Patient compartments come from the search index (`search_reference`), which holds the reference
rows of current versions: compartment membership is as of the query, not as of the snapshot (a
resource moved to another patient, or deleted, after `transaction_time` follows its current
rows). A job's `patient` list narrows the compartments to those patients' in the same way.

A job's `_typeFilter` criteria (an SQL condition on `resources` built by the caller from the
facade's search) are applied as of the snapshot: a resource not written since `transaction_time`
is matched by its index rows, which are its snapshot version's; the version current at the
snapshot of one written since is matched over index rows extracted from that version's body, in
a private in-memory SQLite database (`_matching_versions`), because the store keeps index rows
of current versions only. Criteria that reach other resources (chains, `_has`) cannot be matched
so and must not be given.

`transaction_time` is the kick-off process's clock, as `last_updated` is each writer's: a write
stamped before the instant that commits only after the job counted its files is in the file but
not in the manifest's count (a window as long as that write's transaction).

`Patient/$everything` with a care date range (`start`, `end`) keeps a compartment resource when
one of its care dates (search-index date rows of the parameters the caller names per type, the
first of them the resource has) overlaps the range, or when it has none; the patient itself and
what the kept resources reference are always included.

This module runs queries on connections it is given (or units of work of the `Database` it is
given, one per page); it never commits a caller's transaction and knows nothing of HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    case,
    create_engine,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    true,
    union,
    update,
)

from service.store.db import Database
from service.store.resources import SearchIndexWriter
from service.store.tables import (
    export_jobs,
    metadata,
    resource_versions,
    resources,
    search_date,
    search_reference,
)

Compartment = Mapping[str, Sequence[str]]
"""Resource type -> the search parameters that put a resource in a Patient's compartment."""
CareDates = Mapping[str, Sequence[str]]
"""Resource type -> its date search parameters that say when care happened, preferred first."""
Criteria = ColumnElement[bool]
"""A condition on `resources` (its current row and the index rows of its id) a resource meets."""

IN_PROGRESS = "in-progress"
COMPLETE = "complete"


@dataclass(frozen=True, slots=True)
class ExportJob:
    """One Bulk Data export: what it covers and, once complete, how many resources per type."""

    id: str
    level: str
    request: str
    types: tuple[str, ...]
    since: datetime | None
    transaction_time: datetime
    status: str
    progress: str | None
    claimed_at: datetime
    counts: dict[str, int] | None
    created_at: datetime
    completed_at: datetime | None
    type_filters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Resource type -> its `_typeFilter` search queries (ORed), as given; unfiltered types
    are absent."""
    patients: tuple[str, ...] = ()
    """The Patient ids a Patient-level export is limited to; empty for every patient."""
    client_id: str | None = None
    """The client that started the job (None for jobs of earlier releases: anyone's)."""

    def belongs_to(self, client_id: str) -> bool:
        return self.client_id is None or self.client_id == client_id

    @property
    def patient_level(self) -> bool:
        return self.level == "patient"


def _selection_text(
    types: Sequence[str], type_filters: Mapping[str, Sequence[str]], patients: Sequence[str]
) -> str:
    """The `types` column: the comma list of types, or, with filters or patients, a JSON object
    (a plain job keeps the plain list, which processes of earlier releases read)."""
    if not type_filters and not patients:
        return ",".join(types)
    selection = {
        "types": list(types),
        "typeFilter": {t: list(queries) for t, queries in type_filters.items()},
        "patient": list(patients),
    }
    return orjson.dumps(selection).decode()


def _selection(
    text: str,
) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]], tuple[str, ...]]:
    if not text.startswith("{"):
        return tuple(t for t in text.split(",") if t), {}, ()
    selection = orjson.loads(text)
    filters = {t: tuple(queries) for t, queries in selection["typeFilter"].items()}
    return tuple(selection["types"]), filters, tuple(selection["patient"])


def _job(row: Any) -> ExportJob:
    types, type_filters, patients = _selection(row.types)
    return ExportJob(
        id=row.id,
        level=row.level,
        request=row.request,
        types=types,
        since=row.since,
        transaction_time=row.transaction_time,
        status=row.status,
        progress=row.progress,
        claimed_at=row.claimed_at,
        counts=None if row.counts is None else orjson.loads(row.counts),
        created_at=row.created_at,
        completed_at=row.completed_at,
        type_filters=type_filters,
        patients=patients,
        client_id=row.client_id,
    )


class ExportJobs:
    """The `export_jobs` rows on one connection; never commits."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def create(
        self,
        *,
        job_id: str,
        level: str,
        request: str,
        types: Sequence[str],
        since: datetime | None,
        now: datetime,
        type_filters: Mapping[str, Sequence[str]] | None = None,
        patients: Sequence[str] = (),
        client_id: str | None = None,
    ) -> ExportJob:
        """A new job, in progress and claimed by the caller, its snapshot instant `now`."""
        self._connection.execute(
            insert(export_jobs).values(
                id=job_id,
                level=level,
                request=request,
                types=_selection_text(types, type_filters or {}, patients),
                since=since,
                transaction_time=now,
                status=IN_PROGRESS,
                progress="queued",
                claimed_at=now,
                counts=None,
                created_at=now,
                completed_at=None,
                client_id=client_id,
            )
        )
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> ExportJob | None:
        row = self._connection.execute(
            select(export_jobs).where(export_jobs.c.id == job_id)
        ).first()
        return None if row is None else _job(row)

    def delete(self, job_id: str) -> bool:
        """Forget a job (cancelled or done with); False when there was none."""
        result = self._connection.execute(delete(export_jobs).where(export_jobs.c.id == job_id))
        return bool(result.rowcount)

    def claim(self, job_id: str, *, now: datetime, stale_before: datetime) -> bool:
        """Take over an unfinished job whose last claim is older than `stale_before`.

        The conditional UPDATE makes the claim exclusive: of several processes polling the same
        abandoned job, one gets it.
        """
        result = self._connection.execute(
            update(export_jobs)
            .where(
                export_jobs.c.id == job_id,
                export_jobs.c.status == IN_PROGRESS,
                export_jobs.c.claimed_at < stale_before,
            )
            .values(claimed_at=now)
        )
        return bool(result.rowcount)

    def report_progress(self, job_id: str, *, progress: str, now: datetime) -> None:
        """Say how far the job is; renews the claim, so no other process takes the job over."""
        self._connection.execute(
            update(export_jobs)
            .where(export_jobs.c.id == job_id, export_jobs.c.status == IN_PROGRESS)
            .values(progress=progress[:200], claimed_at=now)
        )

    def complete(self, job_id: str, *, counts: Mapping[str, int], now: datetime) -> None:
        """Mark the job complete (a no-op when it was cancelled meanwhile)."""
        self._connection.execute(
            update(export_jobs)
            .where(export_jobs.c.id == job_id, export_jobs.c.status == IN_PROGRESS)
            .values(
                status=COMPLETE,
                progress=None,
                counts=orjson.dumps(dict(counts)).decode(),
                completed_at=now,
            )
        )


# --- the snapshot of one resource type at a job's transaction time -----------------------------


def _in_compartment(
    resource_type: str,
    compartment: Compartment,
    *,
    patients: Sequence[str] = (),
    after: str | None = None,
) -> ColumnElement[bool]:
    """The current row is in some Patient's compartment (every Patient is in its own), or in
    one of `patients`' when they are given.

    `after` repeats a page's keyset bound inside the subquery, so a merge join of the index
    rows starts at the page rather than at the first row of the type.
    """
    if resource_type == "Patient":
        return resources.c.id.in_(tuple(patients)) if patients else true()
    params = tuple(compartment.get(resource_type, ()))
    if not params:
        return false()
    membership = exists().where(
        search_reference.c.resource_type == resources.c.resource_type,
        search_reference.c.resource_id == resources.c.id,
        search_reference.c.param.in_(params),
        search_reference.c.target_type == "Patient",
    )
    if patients:
        membership = membership.where(search_reference.c.target_id.in_(tuple(patients)))
    if after is not None:
        membership = membership.where(search_reference.c.resource_id > after)
    return membership


def _versions_at(resource_type: str, transaction_time: datetime) -> Select[Any]:
    """(id, body, deleted, last_updated) of each `resource_type` version current at the instant:
    the newest at or before it."""
    later = resource_versions.alias("later")
    return select(
        resource_versions.c.id,
        resource_versions.c.body,
        resource_versions.c.deleted,
        resource_versions.c.last_updated,
    ).where(
        resource_versions.c.resource_type == resource_type,
        resource_versions.c.last_updated <= transaction_time,
        ~exists().where(
            later.c.resource_type == resource_versions.c.resource_type,
            later.c.id == resource_versions.c.id,
            later.c.version > resource_versions.c.version,
            later.c.last_updated <= transaction_time,
        ),
    )


def _matching_versions(
    resource_type: str, versions: Sequence[tuple[str, datetime, str]], criteria: Criteria
) -> set[str]:
    """The ids of `versions` ((id, last_updated, body) of one type) that meet `criteria`.

    They are not current, so the store has no index rows of them: they are indexed, as a write
    would index them, into a private in-memory SQLite database of the same schema, and the same
    condition is run there. Nothing of it outlives the call.
    """
    if not versions:
        return set()
    engine = create_engine("sqlite://")
    try:
        with engine.begin() as connection:
            metadata.create_all(connection, tables=[resources, *_index_tables()])
            connection.execute(
                insert(resources),
                [
                    {
                        "resource_type": resource_type,
                        "id": resource_id,
                        "version": 1,
                        "last_updated": last_updated,
                        "deleted": False,
                        "content_hash": "",
                        "body": body,
                    }
                    for resource_id, last_updated, body in versions
                ],
            )
            SearchIndexWriter(connection).insert_bodies([body for _, _, body in versions])
            query = select(resources.c.id).where(
                resources.c.resource_type == resource_type, criteria
            )
            return set(connection.execute(query).scalars())
    finally:
        engine.dispose()


def _index_tables() -> list[Any]:
    """The search-index tables (every `search_*` table of the schema)."""
    return [table for name, table in metadata.tables.items() if name.startswith("search_")]


def _changed_since_snapshot(job: ExportJob, resource_type: str) -> Select[Any]:
    """(id, last_updated, body) of the snapshot versions of rows written since it (not deletions,
    within `_since`), in id order."""
    at_snapshot = _versions_at(resource_type, job.transaction_time).subquery("at_snapshot")
    query = (
        select(at_snapshot.c.id, at_snapshot.c.last_updated, at_snapshot.c.body)
        .select_from(resources.join(at_snapshot, at_snapshot.c.id == resources.c.id))
        .where(
            resources.c.resource_type == resource_type,
            resources.c.last_updated > job.transaction_time,
            at_snapshot.c.deleted == false(),
        )
    )
    if job.since is not None:
        query = query.where(at_snapshot.c.last_updated >= job.since)
    return query.order_by(at_snapshot.c.id)


def snapshot_count(
    *,
    connection: Connection,
    job: ExportJob,
    resource_type: str,
    compartment: Compartment,
    criteria: Criteria | None = None,
    batch_size: int = 1000,
) -> int:
    """How many resources the job's file of `resource_type` holds.

    Current rows not newer than the snapshot, plus, for rows written since, their versions
    current at it that were not deletions (and, with `criteria`, that meet them).
    """
    current = select(func.count()).where(
        resources.c.resource_type == resource_type,
        resources.c.last_updated <= job.transaction_time,
        resources.c.deleted == false(),
    )
    changed = _changed_since_snapshot(job, resource_type)
    if job.since is not None:
        current = current.where(resources.c.last_updated >= job.since)
    if job.patient_level:
        member = _in_compartment(resource_type, compartment, patients=job.patients)
        current = current.where(member)
        changed = changed.where(member)
    if criteria is not None:
        current = current.where(criteria)
    total = int(connection.execute(current).scalar_one())
    if criteria is None:
        return total + int(
            connection.execute(select(func.count()).select_from(changed.subquery())).scalar_one()
        )
    # The versions must be matched one batch at a time (see `_matching_versions`).
    after: str | None = None
    while True:
        page = changed if after is None else changed.where(resources.c.id > after)
        rows = [tuple(row) for row in connection.execute(page.limit(batch_size))]
        total += len(_matching_versions(resource_type, rows, criteria))
        if len(rows) < batch_size:
            return total
        after = rows[-1][0]


def snapshot_pages(
    *,
    database: Database,
    job: ExportJob,
    resource_type: str,
    compartment: Compartment,
    criteria: Criteria | None = None,
    page_size: int = 1000,
) -> Iterator[list[str]]:
    """The stored bodies of the job's file of `resource_type`, a keyset page at a time.

    One walk over the primary key: a row not newer than the snapshot serves its own body (when
    it meets `criteria`); the rows written since are looked up, a page at a time, in
    `resource_versions`, and their versions matched against `criteria` on their own. Each page
    is read in its own short transaction, so a slow download holds no connection between pages;
    the snapshot instant keeps the pages consistent with one another. A page may come out
    shorter than `page_size` (rows created or deleted after the snapshot, or not matching, drop
    out).
    """
    at = job.transaction_time
    kept = and_(resources.c.last_updated <= at, resources.c.deleted == false())
    if job.since is not None:
        kept = and_(kept, resources.c.last_updated >= job.since)
    if criteria is not None:
        kept = and_(kept, criteria)
    query = select(
        resources.c.id,
        resources.c.version,
        resources.c.last_updated,
        # Only read the body the page serves (a newer one would be read for nothing).
        case((resources.c.last_updated <= at, resources.c.body), else_=None).label("body"),
    ).where(resources.c.resource_type == resource_type, or_(kept, resources.c.last_updated > at))
    after: str | None = None
    while True:
        page_query = query if after is None else query.where(resources.c.id > after)
        if job.patient_level:
            page_query = page_query.where(
                _in_compartment(resource_type, compartment, patients=job.patients, after=after)
            )
        page_query = page_query.order_by(resources.c.id).limit(page_size)
        with database.unit_of_work(write=False) as uow:
            rows = uow.connection.execute(page_query).all()
            # A first version newer than the snapshot was created after it: nothing to look up.
            changed = [row.id for row in rows if row.last_updated > at and row.version > 1]
            older: dict[str, str] = {}
            if changed:
                versions = _versions_at(resource_type, at).where(
                    resource_versions.c.id.in_(changed), resource_versions.c.deleted == false()
                )
                if job.since is not None:
                    versions = versions.where(resource_versions.c.last_updated >= job.since)
                found = uow.connection.execute(versions).all()
                if criteria is not None:
                    matching = _matching_versions(
                        resource_type, [(v.id, v.last_updated, v.body) for v in found], criteria
                    )
                    found = [v for v in found if v.id in matching]
                older = {v.id: v.body for v in found}
        if not rows:
            return
        page = [row.body if row.last_updated <= at else older.get(row.id) for row in rows]
        bodies = [body for body in page if body is not None]
        if bodies:
            yield bodies
        if len(rows) < page_size:
            return
        after = rows[-1].id


# --- Patient/$everything ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EverythingRow:
    resource_type: str
    id: str
    body: str


def everything_page(
    *,
    connection: Connection,
    patient_id: str,
    compartment: Compartment,
    referenced_types: Sequence[str],
    types: Sequence[str] | None,
    since: datetime | None,
    after: tuple[str, str] | None,
    limit: int,
    care_range: tuple[datetime | None, datetime | None] = (None, None),
    care_dates: CareDates | None = None,
) -> list[EverythingRow]:
    """One keyset page, in (type, id) order, of the patient, its compartment, and what those
    reference among `referenced_types` (resources in no compartment: practitioners,
    organizations).

    With a `care_range` (inclusive bounds, either open), compartment resources are kept when one
    of their care dates overlaps it or they have none (`_in_care_range`); only what those kept
    reference is added.
    """
    in_compartment, itself = _compartment_members(patient_id, compartment)
    if care_range != (None, None):
        in_compartment = in_compartment.where(
            _in_care_range(
                search_reference.c.resource_type,
                search_reference.c.resource_id,
                care_range=care_range,
                care_dates=care_dates or {},
            )
        )
    links = search_reference.alias("links")
    member_rows = union(in_compartment, itself).subquery("member_rows")
    referenced = (
        select(links.c.target_type.label("resource_type"), links.c.target_id.label("resource_id"))
        .join(
            member_rows,
            and_(
                links.c.resource_type == member_rows.c.resource_type,
                links.c.resource_id == member_rows.c.resource_id,
            ),
        )
        .where(links.c.target_type.in_(tuple(referenced_types)), links.c.target_id.is_not(None))
    )
    everything = union(in_compartment, itself, referenced).subquery("everything")
    query = (
        select(resources.c.resource_type, resources.c.id, resources.c.body)
        .join(
            everything,
            and_(
                resources.c.resource_type == everything.c.resource_type,
                resources.c.id == everything.c.resource_id,
            ),
        )
        .where(resources.c.deleted == false())
    )
    return _everything_rows(connection, query, types=types, since=since, after=after, limit=limit)


def _compartment_members(
    patient_id: str, compartment: Compartment
) -> tuple[Select[Any, Any], Select[Any, Any]]:
    """(resource_type, resource_id) of every resource in the patient's compartment, and of the
    patient itself."""
    by_type = [
        and_(
            search_reference.c.resource_type == resource_type, search_reference.c.param.in_(params)
        )
        for resource_type, params in sorted(compartment.items())
        if params
    ]
    in_compartment = select(
        search_reference.c.resource_type.label("resource_type"),
        search_reference.c.resource_id.label("resource_id"),
    ).where(
        search_reference.c.target_type == "Patient",
        search_reference.c.target_id == patient_id,
        or_(*by_type) if by_type else false(),
    )
    itself = select(
        literal("Patient").label("resource_type"), literal(patient_id).label("resource_id")
    )
    return in_compartment, itself


def _in_care_range(
    type_column: ColumnElement[str],
    id_column: ColumnElement[str],
    *,
    care_range: tuple[datetime | None, datetime | None],
    care_dates: CareDates,
) -> ColumnElement[bool]:
    """The resource's care date overlaps the range, or it has none.

    Its care date is the first of its type's `care_dates` parameters it has date rows of (a
    Condition's onset, else when it was recorded); a type without care dates is always in.
    """
    start, end = care_range
    dated = {t: params for t, params in care_dates.items() if params}
    branches: list[ColumnElement[bool]] = [type_column.not_in(tuple(dated))]
    for resource_type, params in sorted(dated.items()):
        earlier_missing: list[ColumnElement[bool]] = []
        alternatives: list[ColumnElement[bool]] = []
        for param in params:
            rows = search_date.alias()
            has_rows = exists().where(
                rows.c.resource_type == resource_type,
                rows.c.resource_id == id_column,
                rows.c.param == param,
            )
            overlapping = has_rows
            if start is not None:
                overlapping = overlapping.where(rows.c.high >= start)
            if end is not None:
                overlapping = overlapping.where(rows.c.low <= end)
            alternatives.append(and_(*earlier_missing, overlapping))
            earlier_missing.append(~has_rows)
        alternatives.append(and_(*earlier_missing))  # no care date at all
        branches.append(and_(type_column == resource_type, or_(*alternatives)))
    return or_(*branches)


def every_patients_page(
    *,
    connection: Connection,
    compartment: Compartment,
    referenced_types: Sequence[str],
    types: Sequence[str] | None,
    since: datetime | None,
    after: tuple[str, str] | None,
    limit: int,
    care_range: tuple[datetime | None, datetime | None] = (None, None),
    care_dates: CareDates | None = None,
) -> list[EverythingRow]:
    """`everything_page` for every patient at once (`Patient/$everything`): every Patient, every
    resource in some Patient's compartment (in the care range), and what those reference among
    `referenced_types`.

    One keyset walk over `resources` in (type, id) order with a membership probe per row, so a
    page costs about its own size, not the store's.
    """
    dated = care_range != (None, None)

    def member(type_column: ColumnElement[str], id_column: ColumnElement[str]) -> Criteria:
        """The resource (of a compartment type) is in some Patient's compartment, in range."""
        refs = search_reference.alias()
        by_type = [
            and_(type_column == resource_type, refs.c.param.in_(tuple(params)))
            for resource_type, params in sorted(compartment.items())
            if params
        ]
        condition: Criteria = exists().where(
            refs.c.resource_type == type_column,
            refs.c.resource_id == id_column,
            refs.c.target_type == "Patient",
            or_(*by_type) if by_type else false(),
        )
        if dated:
            condition = and_(
                condition,
                _in_care_range(
                    type_column, id_column, care_range=care_range, care_dates=care_dates or {}
                ),
            )
        return condition

    links = search_reference.alias("links")
    referenced = exists().where(
        links.c.target_type == resources.c.resource_type,
        links.c.target_id == resources.c.id,
        member(links.c.resource_type, links.c.resource_id),
    )
    compartment_types = tuple(t for t, params in compartment.items() if params)
    query = select(resources.c.resource_type, resources.c.id, resources.c.body).where(
        resources.c.deleted == false(),
        or_(
            resources.c.resource_type == "Patient",
            and_(
                resources.c.resource_type.in_(compartment_types),
                member(resources.c.resource_type, resources.c.id),
            ),
            and_(resources.c.resource_type.in_(tuple(referenced_types)), referenced),
        ),
    )
    return _everything_rows(connection, query, types=types, since=since, after=after, limit=limit)


def _everything_rows(
    connection: Connection,
    query: Select[Any],
    *,
    types: Sequence[str] | None,
    since: datetime | None,
    after: tuple[str, str] | None,
    limit: int,
) -> list[EverythingRow]:
    """One page of an $everything query: `_type`, `_since`, after the keyset bound, in order."""
    if types is not None:
        query = query.where(resources.c.resource_type.in_(tuple(types)))
    if since is not None:
        query = query.where(resources.c.last_updated >= since)
    if after is not None:
        after_type, after_id = after
        query = query.where(
            or_(
                resources.c.resource_type > after_type,
                and_(resources.c.resource_type == after_type, resources.c.id > after_id),
            )
        )
    query = query.order_by(resources.c.resource_type, resources.c.id).limit(limit)
    return [EverythingRow(*row) for row in connection.execute(query)]
