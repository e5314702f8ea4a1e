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

Who is asking comes from `REQUEST_AUDIT`, set per request by the access middleware (a context
variable, so the threadpool workers that run handlers see it).

This module must not log patient data, and must not decide what is allowed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection, select, tuple_
from sqlalchemy.exc import DataError, IntegrityError

from mappings.context import resource_id
from service.fhir.search_index import IndexRows, cut, date_range, normalize, parse_reference
from service.store.db import Database
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
    if record.address:
        agent["network"] = {"address": record.address[:200], "type": "2"}
    entities: list[dict[str, Any]] = []
    for patient in dict.fromkeys(record.patients):
        entities.append(
            {
                "what": {"reference": f"Patient/{patient}"},
                "type": _coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "1"),
                "role": _coding("http://terminology.hl7.org/CodeSystem/object-role", "1"),
            }
        )
    for reference in dict.fromkeys(record.entities):
        entities.append(
            {
                "what": {"reference": reference},
                "type": _coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2"),
                "role": _coding("http://terminology.hl7.org/CodeSystem/object-role", "4"),
            }
        )
    for key in dict.fromkeys(record.records):
        kind, _, external_id = key.partition("/")
        entities.append(
            {
                "what": {"identifier": {"system": f"{RECORD_SYSTEM}:{kind}", "value": external_id}},
                "type": _coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2"),
                "role": _coding("http://terminology.hl7.org/CodeSystem/object-role", "4"),
            }
        )
    if record.query:  # an empty base64Binary is not allowed
        entities.append(
            {
                "type": _coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2"),
                "role": _coding("http://terminology.hl7.org/CodeSystem/object-role", "24"),
                "query": base64.b64encode(record.query.encode()).decode(),
            }
        )
    if record.request_id:
        entities.append(
            {
                "type": _coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "4"),
                "detail": [{"type": "request-id", "valueString": record.request_id}],
            }
        )
    event: dict[str, Any] = {
        "resourceType": AUDIT_TYPE,
        "id": str(uuid.uuid4()),
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest" if rest else "110100",
            "display": "RESTful Operation" if rest else "Application Activity",
        },
        "subtype": [
            {
                "system": "http://hl7.org/fhir/restful-interaction"
                if rest
                else "urn:infusion-bridge:operation",
                "code": record.subtype,
            }
        ],
        "action": record.action or _ACTIONS.get(record.subtype, "E"),
        "recorded": now.isoformat(),
        "outcome": record.outcome,
        "agent": [agent],
        "source": {
            "observer": {"display": "Infusion Bridge"},
            "type": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4",
                }
            ],
        },
    }
    if record.description:
        event["outcomeDesc"] = record.description[:500]
    if entities:
        event["entity"] = entities
    return event


def _coding(system: str, code: str) -> dict[str, str]:
    return {"system": system, "code": code}


def store_events(connection: Connection, events: list[dict[str, Any]], *, now: datetime) -> None:
    """Insert AuditEvents as version 1 of new resources, indexed, on the caller's connection."""
    if not events:
        return
    last_updated = now.isoformat()
    current, versions = [], []
    strings: list[tuple[Any, ...]] = []
    tokens: list[tuple[Any, ...]] = []
    dates: list[tuple[Any, ...]] = []
    references: list[tuple[Any, ...]] = []
    for event in events:
        meta = {"versionId": "1", "lastUpdated": last_updated}
        resource = {"resourceType": AUDIT_TYPE, "id": event["id"], "meta": meta} | {
            k: v for k, v in event.items() if k not in ("resourceType", "id")
        }
        body = orjson.dumps(resource).decode()
        digest = hashlib.sha256(orjson.dumps(event)).hexdigest()
        current.append((AUDIT_TYPE, event["id"], 1, now, False, body, digest))
        versions.append((AUDIT_TYPE, event["id"], 1, now, False, body))
        rows = audit_index_rows(resource)
        head = (AUDIT_TYPE, event["id"])
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

    Hand-written because one is written for every request: the generic extraction
    (`service.fhir.search_index.extract`) evaluates all 22 AuditEvent parameters, about ten
    times the cost of these few lines. Only elements `audit_event` writes are looked at; a test
    checks that this gives what the generic extraction gives for every shape it builds.
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
    store_events(connection, [audit_event(record, now=datetime.now(UTC))], now=datetime.now(UTC))
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
            .where(tuple_(records.c.kind, records.c.external_id).in_(chunk))
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
    search, where `AUDIT_READS=async`) queues it and returns: the group commit that follows, a
    few milliseconds later, writes it. Such events are lost only if the process dies in that
    window. They are bounded: with `backlog` events queued (the database is slow or down), a
    queued write waits like any other, and fails like any other, so a read whose audit cannot
    be written is never answered. A failed commit keeps the queued events and tries again;
    `close()` writes what is left at shutdown.
    """

    def __init__(self, database: Database, *, backlog: int = 10_000, batch: int = 1_000) -> None:
        self._database = database
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None] | None]] = []
        self._backlog = backlog
        self._batch = batch
        self._flushing: asyncio.Task[None] | None = None
        self._in_flight = 0

    async def write(self, record: AuditRecord, *, wait: bool = True) -> None:
        """Commit the record's AuditEvent; with `wait=False`, queue it unless the queue is full."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] | None = None
        if wait or len(self._pending) >= self._backlog:
            future = loop.create_future()
        self._pending.append((audit_event(record, now=datetime.now(UTC)), future))
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
        try:
            await asyncio.wait_for(asyncio.shield(flushing), timeout)
        except TimeoutError:
            flushing.cancel()
            log.error("audit: %d queued events could not be written at shutdown", self.queued)

    async def _flush(self) -> None:
        retry = 0.05
        try:
            while self._pending:
                batch, self._pending = self._pending[: self._batch], self._pending[self._batch :]
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
                    continue
                self._in_flight = 0
                retry = 0.05
                for _, future in batch:
                    if future is not None and not future.done():
                        future.set_result(None)
        finally:
            self._flushing = None

    def _insert(self, events: list[dict[str, Any]]) -> None:
        with self._database.unit_of_work(write=True) as uow:
            store_events(uow.connection, events, now=datetime.now(UTC))
            uow.commit()

    def _insert_each(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write events one per commit; those the database could not be reached for are kept."""
        kept = []
        for event in events:
            try:
                self._insert([event])
            except (IntegrityError, DataError) as error:
                log.error("audit event %s dropped: %s", event["id"], type(error).__name__)
            except Exception as error:  # unreachable again: left for the next commit
                log.error("audit commit failed: %s", type(error).__name__)
                kept.append(event)
        return kept
