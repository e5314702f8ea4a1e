"""The audit trail: an AuditEvent for every FHIR interaction, intake write and sync action.

Each AuditEvent (FHIR R4) says who (the client id, and its network address), what (the
interaction, the resources or records it touched, the query of a search), when, the outcome
(`0` success, `4` refused, `8` failed), and which patients. They are stored as FHIR resources
(version 1, never changed), indexed for search, and readable through the facade by a client with
`system/AuditEvent.rs`. They never go to the outbox, and reading them is not audited again.

- Writes record their AuditEvent with `record_audit(connection, ...)` on the unit of work of the
  change, before it commits: the change and its audit commit together or not at all.
- Everything else (reads, searches, refusals, failed writes) is recorded by the access
  middleware through `AuditWriter` after the handler answered and before the answer is sent: a
  request whose audit cannot be written is answered 500, without its data. `AuditWriter` commits
  the events of concurrent requests together (one transaction per batch). With
  `AUDIT_READS=async` (the default) a successful read or search does not wait for that commit:
  its event is queued and written by the next group commit, milliseconds later, so a read costs
  no commit of its own (see `AuditWriter` for what that trades).

Each event is built from the parts it shares with the events of the same client, address,
interaction and outcome, serialized once (the stored body is those bytes with meta spliced in,
the hash is theirs), and its index rows taken from those parts: what `audit_event`,
`with_version`, `content_hash` and the generic extraction give, at a fraction of their cost.
Event ids are time-ordered UUIDs (version 7), so the rows go to the end of each index.

Who is asking comes from `REQUEST_AUDIT`, set per request by the access middleware (a context
variable, so the threadpool workers that run handlers see it).

This module must not log patient data, and must not decide what is allowed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

import orjson
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection, select
from sqlalchemy.exc import DataError, IntegrityError

from mappings.context import resource_id
from service.fhir.search_index import IndexRows, cut, date_range, normalize, parse_reference
from service.store.db import Database, pairs_in
from service.store.resources import INDEX_COLUMNS, insert_values, patient_of
from service.store.tables import (
    records,
    resource_versions,
    resources,
    search_date,
    search_reference,
    search_string,
    search_token,
)

log = logging.getLogger(__name__)

AUDIT_TYPE: Final = "AuditEvent"
SUCCESS, REFUSED, FAILED = "0", "4", "8"
CLIENT_SYSTEM: Final = "urn:infusion-bridge:client"
RECORD_SYSTEM: Final = "urn:infusion-bridge:record"
_ACTIONS: Final = {"create": "C", "read": "R", "vread": "R", "update": "U", "patch": "U"}


@dataclass
class RequestAudit:
    """What the audit of one request needs to know; set by the access middleware."""

    client_id: str
    request_id: str
    address: str | None = None
    recorded: bool = False
    """A handler wrote the request's AuditEvent with its change (the middleware writes none)."""


REQUEST_AUDIT: ContextVar[RequestAudit | None] = ContextVar("request_audit", default=None)


@dataclass
class AuditRecord:
    """One AuditEvent to write."""

    subtype: str
    """The FHIR restful interaction (read, search-type, create, ...) or the API operation."""
    outcome: str = SUCCESS
    entities: list[str] = field(default_factory=list)
    """References (`Observation/1/_history/2`) of what was read or written."""
    records: list[str] = field(default_factory=list)
    """Intake records (`session/S-901`)."""
    patients: list[str] = field(default_factory=list)
    """Patient resource ids."""
    query: str | None = None
    description: str | None = None
    client_id: str | None = None
    request_id: str | None = None
    address: str | None = None
    action: str | None = None


def audit_event(record: AuditRecord, *, now: datetime) -> dict[str, Any]:
    """The AuditEvent resource of one record (without meta: the store adds it)."""
    # A copy of its own: `_event` shares its constant parts with every event of its shape.
    event: dict[str, Any] = orjson.loads(orjson.dumps(_event(record, _event_id(), now)))
    return event


def _event(record: AuditRecord, event_id: str, now: datetime) -> dict[str, Any]:
    shape = _shape(record)
    event: dict[str, Any] = {
        "resourceType": AUDIT_TYPE,
        "id": event_id,
        "type": shape.type,
        "subtype": shape.subtype,
        "action": shape.action,
        "recorded": now.isoformat(),
        "outcome": record.outcome,
        "agent": shape.agent,
        "source": _SOURCE,
    }
    if record.description:
        event["outcomeDesc"] = record.description[:500]
    entities: list[dict[str, Any]] = []
    for patient in dict.fromkeys(record.patients):
        entities.append({"what": {"reference": f"Patient/{patient}"}} | _PATIENT_ENTITY)
    for reference in dict.fromkeys(record.entities):
        entities.append({"what": {"reference": reference}} | _OBJECT_ENTITY)
    for key in dict.fromkeys(record.records):
        kind, _, external_id = key.partition("/")
        what = {"identifier": {"system": f"{RECORD_SYSTEM}:{kind}", "value": external_id}}
        entities.append({"what": what} | _OBJECT_ENTITY)
    if record.query:  # an empty base64Binary is not allowed
        query = base64.b64encode(record.query.encode()).decode()
        entities.append(_QUERY_ENTITY | {"query": query})
    if record.request_id:
        detail = [{"type": "request-id", "valueString": record.request_id}]
        entities.append(_REQUEST_ENTITY | {"detail": detail})
    if entities:
        event["entity"] = entities
    return event


def _event_id() -> str:
    """A new AuditEvent id: a UUID version 7 (RFC 9562), the time in ms, then 74 random bits.

    Ordered by time, so each new event's rows go to the end of the `resources` key and of the
    index tables' `resource_id` indexes, where the pages of the last events are: a random id
    (uuid4) puts each row on a random page of every index, which cost about three times as much
    CPU as the rows themselves on SQLite once the trail is a few thousand events long.
    """
    random = int.from_bytes(os.urandom(10))
    value = (
        time.time_ns() // 1_000_000 << 80
        | 0x7 << 76
        | (random >> 62 & 0xFFF) << 64
        | 0x2 << 62
        | random & _LOW_62
    )
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_LOW_62: Final = (1 << 62) - 1


def _coding(system: str, code: str) -> dict[str, str]:
    return {"system": system, "code": code}


_ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
_PATIENT_ENTITY: Final = {"type": _coding(_ENTITY_TYPE, "1"), "role": _coding(_OBJECT_ROLE, "1")}
_OBJECT_ENTITY: Final = {"type": _coding(_ENTITY_TYPE, "2"), "role": _coding(_OBJECT_ROLE, "4")}
_QUERY_ENTITY: Final = {"type": _coding(_ENTITY_TYPE, "2"), "role": _coding(_OBJECT_ROLE, "24")}
_REQUEST_ENTITY: Final = {"type": _coding(_ENTITY_TYPE, "4")}
_SOURCE: Final = {
    "observer": {"display": "Infusion Bridge"},
    "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4"}],
}


@dataclass(frozen=True, slots=True)
class _Shape:
    """What the events of one client, address, interaction and outcome have in common."""

    type: dict[str, str]
    subtype: list[dict[str, str]]
    action: str
    agent: list[dict[str, Any]]
    strings: tuple[tuple[str, str, str], ...]
    tokens: tuple[tuple[str, str | None, str | None, str | None], ...]
    """The rows of action, outcome, type and subtype."""


_SHAPES: dict[tuple[str, str | None, str, str | None, str | None], _Shape] = {}


def _shape(record: AuditRecord) -> _Shape:
    key = (record.subtype, record.action, record.outcome, record.client_id, record.address)
    shape = _SHAPES.get(key)
    if shape is None:
        if len(_SHAPES) >= 4096:  # many addresses: start again rather than grow
            _SHAPES.clear()
        shape = _SHAPES[key] = _new_shape(record)
    return shape


def _new_shape(record: AuditRecord) -> _Shape:
    rest = record.subtype not in ("intake", "import", "sync", "token")
    agent: dict[str, Any] = {
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                    "code": "datacollector" if not rest else "dataprocessor",
                }
            ]
        },
        "who": {"identifier": {"system": CLIENT_SYSTEM, "value": record.client_id or "unknown"}},
        "requestor": True,
    }
    strings: tuple[tuple[str, str, str], ...] = ()
    if record.address:
        address = record.address[:200]
        agent["network"] = {"address": address, "type": "2"}
        strings = (("address", normalize(address), cut(address) or ""),)
    kind = {
        "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
        "code": "rest" if rest else "110100",
        "display": "RESTful Operation" if rest else "Application Activity",
    }
    subtype = {
        "system": "http://hl7.org/fhir/restful-interaction"
        if rest
        else "urn:infusion-bridge:operation",
        "code": record.subtype,
    }
    action = record.action or _ACTIONS.get(record.subtype, "E")
    tokens = (
        ("action", None, cut(action), None),
        ("outcome", None, cut(record.outcome), None),
        ("type", cut(kind["system"]), cut(kind["code"]), normalize(kind["display"])),
        ("subtype", cut(subtype["system"]), cut(subtype["code"]), None),
    )
    return _Shape(kind, [subtype], action, [agent], strings, tokens)


class _Prepared(NamedTuple):
    """One AuditEvent ready to store: its JSON without meta, its hash, and its index rows."""

    id: str
    content: bytes
    """The event serialized without meta (`content_hash` is the hash of these bytes); the
    stored body is these bytes with meta after the id, as `with_version` orders it."""
    digest: str
    rows: IndexRows


def _prepare(record: AuditRecord, *, now: datetime) -> _Prepared:
    """The event of `record`, serialized once, with its index rows from its shape's."""
    event_id = _event_id()
    content = orjson.dumps(_event(record, event_id, now))
    shape = _shape(record)
    patients = dict.fromkeys(record.patients)
    references = dict.fromkeys(record.entities)
    kinds = (bool(patients), bool(references or record.records), bool(record.query))
    tokens = shape.tokens + _entity_tokens(*kinds, bool(record.request_id))
    found: list[tuple[str, str | None, str | None, str | None]] = []
    for reference in (*(f"Patient/{patient}" for patient in patients), *references):
        if reference.startswith("#"):
            continue
        target_type, target_id, url = parse_reference(reference)
        found.append(("entity", target_type, target_id, cut(url)))
        if target_type == "Patient":
            found.append(("patient", target_type, target_id, cut(url)))
    low = now.astimezone(UTC)
    # `recorded` is `now.isoformat()`: to the microsecond, or to the second when that is 0.
    high = low if low.microsecond else low + _SECOND
    rows = IndexRows(
        strings=list(shape.strings),
        tokens=list(tokens),
        dates=[("date", low, high)],
        references=list(dict.fromkeys(found)),
    )
    return _Prepared(event_id, content, hashlib.sha256(content).hexdigest(), rows)


_SECOND: Final = timedelta(microseconds=999_999)


@functools.cache
def _entity_tokens(
    patient: bool, target: bool, query: bool, request: bool
) -> tuple[tuple[str, str | None, str | None, str | None], ...]:
    """The entity-role and entity-type rows of an event with these kinds of entity."""
    present = (
        (patient, _PATIENT_ENTITY),
        (target, _OBJECT_ENTITY),
        (query, _QUERY_ENTITY),
        (request, _REQUEST_ENTITY),
    )
    rows: list[tuple[str, str | None, str | None, str | None]] = []
    for wanted, entity in present:
        for param, element in (("entity-role", "role"), ("entity-type", "type")):
            coding = entity.get(element) if wanted else None
            if coding is not None:
                rows.append((param, cut(coding["system"]), cut(coding["code"]), None))
    return tuple(dict.fromkeys(rows))


def store_events(connection: Connection, events: Sequence[_Prepared], *, now: datetime) -> None:
    """Insert AuditEvents as version 1 of new resources, indexed, on the caller's connection.

    One bulk write per table for all of them (`insert_values`).
    """
    if not events:
        return
    meta = _meta(now)
    current, versions = [], []
    strings: list[tuple[Any, ...]] = []
    tokens: list[tuple[Any, ...]] = []
    dates: list[tuple[Any, ...]] = []
    references: list[tuple[Any, ...]] = []
    for event in events:
        body = _stored_body(event, meta)
        current.append((AUDIT_TYPE, event.id, 1, now, False, body, event.digest))
        versions.append((AUDIT_TYPE, event.id, 1, now, False, body))
        head = (AUDIT_TYPE, event.id)
        rows = event.rows
        strings += [head + row for row in rows.strings]
        tokens += [head + row for row in rows.tokens]
        dates += [head + row for row in rows.dates]
        references += [head + row for row in rows.references]
    insert_values(connection, resources, _CURRENT_COLUMNS, current)
    insert_values(connection, resource_versions, _CURRENT_COLUMNS[:-1], versions)
    for table, values in (
        (search_string, strings),
        (search_token, tokens),
        (search_date, dates),
        (search_reference, references),
    ):
        insert_values(connection, table, INDEX_COLUMNS[table], values)


def _meta(now: datetime) -> bytes:
    """The member an event's body gets as version 1, stored at `now`."""
    return b',"meta":{"versionId":"1","lastUpdated":' + orjson.dumps(now.isoformat()) + b"}"


def _stored_body(event: _Prepared, meta: bytes) -> str:
    """The body as `with_version` orders it: the event's JSON with `meta` after its id."""
    split = _ID_AT + len(event.id) + 1  # after the id's closing quote
    return (event.content[:split] + meta + event.content[split:]).decode()


_ID_AT: Final = len(b'{"resourceType":"AuditEvent","id":"')


_CURRENT_COLUMNS = (
    "resource_type",
    "id",
    "version",
    "last_updated",
    "deleted",
    "body",
    "content_hash",
)
"""The columns of an event's `resources` row; its `resource_versions` row has all but the last."""


def audit_index_rows(event: dict[str, Any]) -> IndexRows:
    """The search-index rows of an AuditEvent as `audit_event` builds them, without duplicates.

    What the generic extraction (`service.fhir.search_index.extract`) gives for every shape
    `audit_event` builds, at a tenth of its cost: only elements `audit_event` writes are looked
    at. The writer takes the same rows from each event's shape (`_prepare`); tests check both
    against the generic extraction.
    """
    rows = IndexRows()
    for agent in event.get("agent", ()):
        address = (agent.get("network") or {}).get("address")
        if isinstance(address, str):
            rows.strings.append(("address", normalize(address), cut(address) or ""))
    rows.tokens.append(("action", None, cut(event["action"]), None))
    rows.tokens.append(("outcome", None, cut(event["outcome"]), None))
    kind = event["type"]
    rows.tokens.append(("type", cut(kind["system"]), cut(kind["code"]), normalize(kind["display"])))
    for subtype in event["subtype"]:
        rows.tokens.append(("subtype", cut(subtype["system"]), cut(subtype["code"]), None))
    for entity in event.get("entity", ()):
        for param, element in (("entity-role", "role"), ("entity-type", "type")):
            coding = entity.get(element)
            if coding is not None:
                rows.tokens.append((param, cut(coding["system"]), cut(coding["code"]), None))
        reference = (entity.get("what") or {}).get("reference")
        if isinstance(reference, str) and not reference.startswith("#"):
            target_type, target_id, url = parse_reference(reference)
            rows.references.append(("entity", target_type, target_id, cut(url)))
            if target_type == "Patient":
                rows.references.append(("patient", target_type, target_id, cut(url)))
    rows.dates.append(("date", *date_range(event["recorded"])))
    rows.strings = list(dict.fromkeys(rows.strings))
    rows.tokens = list(dict.fromkeys(rows.tokens))
    rows.references = list(dict.fromkeys(rows.references))
    return rows


def _with_context(record: AuditRecord) -> AuditRecord:
    context = REQUEST_AUDIT.get()
    if context is not None:
        record.client_id = record.client_id or context.client_id
        record.request_id = record.request_id or context.request_id
        record.address = record.address or context.address
    return record


def record_audit(
    connection: Connection,
    *,
    subtype: str,
    entities: Iterable[str] = (),
    records: Iterable[str] = (),
    patients: Iterable[str | None] = (),
    actor: str | None = None,
    description: str | None = None,
    action: str | None = None,
) -> None:
    """Write the AuditEvent of a change on the change's own connection (before its commit).

    The request's client comes from the access middleware's context; `actor` names who acts
    where there is no request (the CLI's imports).
    """
    record = _with_context(
        AuditRecord(
            subtype=subtype,
            entities=list(entities),
            records=list(records),
            patients=[p for p in patients if p],
            description=description,
            client_id=None if REQUEST_AUDIT.get() is not None else actor,
            action=action,
        )
    )
    store_events(connection, [_prepare(record, now=datetime.now(UTC))], now=datetime.now(UTC))
    context = REQUEST_AUDIT.get()
    if context is not None:
        context.recorded = True


def audit_facade_writes(
    connection: Connection, outcomes: Iterable[Any], *, subtype: str | None = None
) -> None:
    """The AuditEvent of facade writes (`Written` or `Deleted` results; None is skipped).

    One event per call: a single interaction, or every entry of a transaction (`subtype`).
    """
    entities: list[str] = []
    patients: list[str | None] = []
    kinds: list[str] = []
    for outcome in outcomes:
        stored = getattr(outcome, "stored", None)
        if stored is not None:  # Written
            entities.append(f"{stored.resource_type}/{stored.id}/_history/{stored.version}")
            patients.append(patient_of(orjson.loads(stored.body)))
            kinds.append("create" if getattr(outcome, "created", False) else "update")
        elif getattr(outcome, "id", None) is not None:  # Deleted
            entities.append(f"{outcome.resource_type}/{outcome.id}/_history/{outcome.version}")
            patients.append(outcome.id if outcome.resource_type == "Patient" else None)
            kinds.append("delete")
    if not kinds:
        return
    chosen = subtype or kinds[0]
    action = {"create": "C", "update": "U", "delete": "D"}.get(chosen, "E")
    record_audit(connection, subtype=chosen, entities=entities, patients=patients, action=action)


def audit_record_writes(
    connection: Connection, keys: Iterable[tuple[str, str]], *, subtype: str, actor: str
) -> None:
    """The AuditEvent of intake writes: the records (kind, external id) and their patients."""
    wanted = list(dict.fromkeys(keys))
    if not wanted:
        return
    patients: list[str | None] = []
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        rows = connection.execute(
            select(records.c.patient_id)
            .where(pairs_in(records.c.kind, records.c.external_id, chunk))
            .distinct()
        )
        patients += [resource_id("patient", row.patient_id) for row in rows if row.patient_id]
    record_audit(
        connection,
        subtype=subtype,
        records=[f"{kind}/{external_id}" for kind, external_id in wanted],
        patients=patients,
        actor=actor,
        action="U" if subtype == "intake" else "E",
    )


class AuditWriter:
    """Writes the AuditEvents of reads and refusals, those of concurrent requests in one commit.

    `write(record)` returns once the event is committed. `write(record, wait=False)` (a read or
    search, where `AUDIT_READS=async`) queues it and returns: the group commit that follows
    writes it, once `gather` events are queued or `linger` (20 ms) after the oldest of them,
    whichever comes first (and at once when an event waits, or at `close()`), so that under
    load a commit carries hundreds of events, not a handful. Such events are lost only if the
    process dies in that window. They are bounded: with `backlog` events queued (the database
    is slow or down), a queued write waits like any other, and fails like any other, so a read
    whose audit cannot be written is never answered. A failed commit keeps the queued events
    and tries again; `close()` writes what is left at shutdown.
    """

    def __init__(
        self,
        database: Database,
        *,
        backlog: int = 10_000,
        batch: int = 1_000,
        gather: int = 200,
        linger: float = 0.02,
    ) -> None:
        self._database = database
        self._pending: list[tuple[_Prepared, asyncio.Future[None] | None]] = []
        self._backlog = backlog
        self._batch = batch
        self._gather = gather
        self._linger = linger
        self._oldest = 0.0
        """When the oldest pending event was queued (the loop's clock)."""
        self._hurry = False
        """The pending events are to be written without lingering (one waits, or enough)."""
        self._wake: asyncio.Future[None] | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._in_flight = 0

    async def write(self, record: AuditRecord, *, wait: bool = True) -> None:
        """Commit the record's AuditEvent; with `wait=False`, queue it unless the queue is full."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] | None = None
        if wait or len(self._pending) >= self._backlog:
            future = loop.create_future()
        if not self._pending:
            self._oldest = loop.time()
        self._pending.append((_prepare(record, now=datetime.now(UTC)), future))
        if future is not None or len(self._pending) >= self._gather:
            self._hurry_up()
        if self._flushing is None:
            self._flushing = loop.create_task(self._flush())
        if future is not None:
            await future

    @property
    def queued(self) -> int:
        """Events not yet committed (waiting, or in the commit under way)."""
        return len(self._pending) + self._in_flight

    async def close(self, *, timeout: float = 10.0) -> None:
        """Write every queued event (at shutdown), giving up after `timeout` seconds."""
        flushing = self._flushing
        if flushing is None:
            return
        self._hurry_up()
        try:
            await asyncio.wait_for(asyncio.shield(flushing), timeout)
        except TimeoutError:
            flushing.cancel()
            log.error("audit: %d queued events could not be written at shutdown", self.queued)

    async def _flush(self) -> None:
        retry = 0.05
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                # Queued events wait for more (up to `gather`, `linger` after the oldest), so a
                # commit writes enough rows to be worth its cost; a waiting event does not.
                wait = self._oldest + self._linger - loop.time()
                if wait > 0 and not self._hurry:
                    self._wake = loop.create_future()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake, wait)
                    self._wake = None
                self._hurry = False
                batch, self._pending = self._pending[: self._batch], self._pending[self._batch :]
                if self._pending:  # the rest have waited since this one was taken
                    self._oldest = loop.time()
                    self._hurry = True
                self._in_flight = len(batch)
                try:
                    await run_in_threadpool(self._insert, [event for event, _ in batch])
                except Exception as error:  # every waiter learns its audit failed
                    self._in_flight = 0
                    log.error("audit commit failed: %s", type(error).__name__)
                    for _, future in batch:
                        if future is not None and not future.done():
                            future.set_exception(error)
                    queued = [event for event, future in batch if future is None]
                    if queued and isinstance(error, IntegrityError | DataError):
                        # Something in the batch cannot be stored: write the others one by one.
                        kept = await run_in_threadpool(self._insert_each, queued)
                        self._pending[:0] = [(event, None) for event in kept]
                    elif queued:  # the database is unreachable: keep them, try again
                        self._pending[:0] = [(event, None) for event in queued]
                        await asyncio.sleep(retry)
                        retry = min(retry * 2, 5.0)
                        self._hurry = True  # they have waited long enough
                    continue
                self._in_flight = 0
                retry = 0.05
                for _, future in batch:
                    if future is not None and not future.done():
                        future.set_result(None)
        finally:
            self._flushing = None

    def _hurry_up(self) -> None:
        self._hurry = True
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _insert(self, events: list[_Prepared]) -> None:
        with self._database.unit_of_work(write=True) as uow:
            store_events(uow.connection, events, now=datetime.now(UTC))
            uow.commit()

    def _insert_each(self, events: list[_Prepared]) -> list[_Prepared]:
        """Write events one per commit; those the database could not be reached for are kept."""
        kept = []
        for event in events:
            try:
                self._insert([event])
            except (IntegrityError, DataError) as error:
                log.error("audit event %s dropped: %s", event.id, type(error).__name__)
            except Exception as error:  # unreachable again: left for the next commit
                log.error("audit commit failed: %s", type(error).__name__)
                kept.append(event)
        return kept
