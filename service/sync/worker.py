"""The delivery worker (`infusion-bridge worker`): the outbox, delivered to every destination.

Each tick, per destination: refresh the strategies from the EHR's CapabilityStatement when they
are stale, fan new outbox rows out into deliveries, lease due lanes (one patient's changes to one
EHR) and deliver each lane's changes in order, referenced types first, on a small thread pool;
and run the care-plan poll when it is due. Reads and results are short units of work of their
own: no transaction is held open across an HTTP call, and results are written only after the EHR
answered. A crash between the two leaves the changes pending; delivering them again is harmless,
because every write is a conditional update by business identifier, an update of the id the
ledger holds, or a create preceded by a search for the identifier (within the patient matched
in that EHR, for the types searched by patient: some EHRs refuse any other search of them).

Retries: network errors, timeouts, 408, 429 and 5xx postpone the change (and those behind it in
its lane) with exponential backoff and jitter, no sooner than `Retry-After`; after
`max_attempts` it becomes a dead letter. 400, 422 and the like are dead letters at once, with
the EHR's OperationOutcome. 409 and 412 re-read the EHR's resource and write onto it.

Logs carry destinations, resource types and ids, counts and statuses: never resource content.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from sqlalchemy import Connection

from service.records.repository import RecordRepository
from service.records.service import load
from service.security.audit import record_audit
from service.store.db import Database
from service.sync import ledger as store
from service.sync.client import (
    DeliveryError,
    EhrClient,
    PatientNotMatched,
    PermanentFailure,
    TransientFailure,
    VersionConflict,
    location_id,
)
from service.sync.destinations import Destination, Strategy
from service.sync.ledger import Delivery, Key, LedgerEntry
from service.sync.outbound import (
    UnresolvedPatient,
    bundle_full_url,
    business_identifier,
    document_reference,
    identifier_lookup,
    identifier_query,
    referenced_keys,
    remote_version,
    summary_identifier,
    translate,
    translate_json,
)
from service.sync.strategy import EMITTED_TYPES, Plan, choose, plan

log = logging.getLogger("service.sync.worker")

Resource = dict[str, Any]
_RANK = {name: index for index, name in enumerate(EMITTED_TYPES)}


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class WorkerSettings:
    batch_size: int = 200
    """Changes of one lane read and delivered together."""
    bundle_size: int = 100
    lanes_per_tick: int = 64
    concurrency: int = 4
    lease_seconds: float = 60.0
    retry_base_seconds: float = 1.0
    retry_cap_seconds: float = 300.0
    idle_seconds: float = 0.5
    capabilities_ttl_seconds: float = 3600.0


def backoff(
    attempts: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None,
    jitter: Callable[[], float] = random.random,
) -> float:
    """Seconds until the next attempt: exponential, jittered in its upper half, >= Retry-After."""
    delay = min(cap, base * (2 ** max(0, attempts - 1)))
    delay = delay * (0.5 + 0.5 * jitter())
    return float(max(delay, retry_after or 0.0))


@dataclass
class _Work:
    """One change to deliver: the latest pending version of a resource in the lane."""

    delivery: Delivery
    covers: list[Delivery]
    """The deliveries it ends: itself and older pending versions of the same resource."""
    body: Resource | None
    strategy: Strategy


@dataclass
class _Results:
    delivered: list[tuple[_Work, str]] = field(default_factory=list)
    ended: list[tuple[list[Delivery], str, str | None]] = field(default_factory=list)
    dead: list[tuple[list[Delivery], str, Resource | None]] = field(default_factory=list)
    postponed: list[Delivery] = field(default_factory=list)
    postpone_error: str | None = None
    retry_after: float | None = None
    ledger: list[tuple[Key, str, str, str | None, int | None]] = field(default_factory=list)
    """(our key, remote type, remote id, remote version, our version pushed)"""


class _Stop(Exception):
    """A transient failure: the rest of the lane waits."""

    def __init__(self, error: TransientFailure) -> None:
        super().__init__(error.message)
        self.error = error


class DeliveryWorker:
    """Delivers the outbox to the configured destinations (see the module docstring)."""

    def __init__(
        self,
        *,
        database: Database,
        destinations: Sequence[Destination],
        clients: Mapping[str, EhrClient],
        site_system: str,
        settings: WorkerSettings | None = None,
        clock: Callable[[], datetime] = utcnow,
        jitter: Callable[[], float] = random.random,
        care_plans: Any = None,
        worker_id: str | None = None,
    ) -> None:
        self.database = database
        self.destinations = list(destinations)
        self.clients = clients
        self.site_system = site_system
        self.settings = settings or WorkerSettings()
        self.clock = clock
        self.jitter = jitter
        self.care_plans = care_plans
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:12]}"
        self.plans: dict[str, Plan] = {}
        self._planned_at: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.settings.concurrency))
        self._stop = threading.Event()
        self.on_delivered: Callable[[str, Sequence[Delivery], datetime], None] | None = None
        with database.unit_of_work(write=True) as uow:
            store.ensure_destinations(uow.connection, self.destinations)
            uow.commit()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # --- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        log.info("worker started", extra={"worker": self.worker_id})
        self._stop = stop
        while not stop.is_set():
            try:
                done = self.tick()
            except Exception:
                log.exception("worker tick failed")
                done = 0
            if not done:
                stop.wait(self.settings.idle_seconds)
        log.info("worker stopped", extra={"worker": self.worker_id})

    def tick(self) -> int:
        """One round over every destination; how many changes ended."""
        done = 0
        for destination in self.destinations:
            if self._stop.is_set():
                break
            current = self.plan_for(destination)
            if current is None:
                continue
            with self.database.unit_of_work(write=True) as uow:
                store.fan_out(uow.connection, destination, now=self.clock())
                uow.commit()
            with self.database.unit_of_work(write=True) as uow:
                lanes = store.claim_lanes(
                    uow.connection,
                    destination.name,
                    worker=self.worker_id,
                    now=self.clock(),
                    limit=self.settings.lanes_per_tick,
                    lease=timedelta(seconds=self.settings.lease_seconds),
                )
                uow.commit()
            futures = [self._pool.submit(self.deliver_lane, destination, lane) for lane in lanes]
            for future in futures:
                try:
                    done += future.result()
                except Exception:
                    log.exception("lane delivery failed", extra={"destination": destination.name})
            if self.care_plans is not None and destination.care_plan_sync is not None:
                try:
                    done += self.care_plans.poll_if_due(destination, self.clients[destination.name])
                except DeliveryError as error:
                    log.warning(
                        "care-plan poll failed",
                        extra={"destination": destination.name, "error": error.message},
                    )
        return done

    def plan_for(self, destination: Destination, *, force: bool = False) -> Plan | None:
        """The destination's strategies, from a CapabilityStatement at most `ttl` old."""
        name = destination.name
        fresh = time.monotonic() - self._planned_at.get(name, -1e12)
        if not force and name in self.plans and fresh < self.settings.capabilities_ttl_seconds:
            return self.plans[name]
        if not force and name not in self.plans and fresh < 5.0:
            return None  # the last attempt failed moments ago
        self._planned_at[name] = time.monotonic()
        try:
            statement = self.clients[name].capabilities()
        except DeliveryError as error:
            log.warning(
                "capabilities unavailable",
                extra={"destination": name, "error": error.message},
            )
            with self.database.unit_of_work(write=True) as uow:
                store.note_result(uow.connection, name, now=self.clock(), error=error.message)
                uow.commit()
            return self.plans.get(name)
        current = plan(destination, statement)
        self.plans[name] = current
        with self.database.unit_of_work(write=True) as uow:
            store.save_strategies(uow.connection, name, current.as_json(), now=self.clock())
            uow.commit()
        log.info("strategies", extra={"destination": name, "strategies": current.as_json()})
        return current

    # --- one lane -------------------------------------------------------------------------

    def deliver_lane(self, destination: Destination, lane: str) -> int:
        """Deliver a leased lane's due changes; how many ended."""
        try:
            with self.database.unit_of_work(write=False) as uow:
                items = store.pending(
                    uow.connection, destination.name, lane, limit=self.settings.batch_size
                )
            if items and items[0].next_attempt_at <= self.clock():
                results = _LaneRun(self, destination, lane, items).run()
                return self._apply(destination, lane, results)
        except Exception:
            self._release(destination.name, lane)
            raise
        self._release(destination.name, lane)
        return 0

    def _release(self, name: str, lane: str) -> None:
        with self.database.unit_of_work(write=True) as uow:
            store.release_lane(uow.connection, name, lane, worker=self.worker_id)
            uow.commit()

    def _apply(self, destination: Destination, lane: str, results: _Results) -> int:
        name = destination.name
        now = self.clock()
        done = 0
        with self.database.unit_of_work(write=True) as uow:
            connection = uow.connection
            store.record_remotes(
                connection,
                name,
                [
                    store.RemoteEntry(
                        key, remote_type, remote_id, remote_version=version, pushed_version=pushed
                    )
                    for key, remote_type, remote_id, version, pushed in results.ledger
                ],
                now=now,
            )
            by_strategy: dict[str, list[Delivery]] = {}
            for work, strategy in results.delivered:
                by_strategy.setdefault(strategy, []).extend(work.covers)
            for strategy, deliveries in by_strategy.items():
                store.finish(
                    connection, name, deliveries, status=store.DELIVERED, now=now, strategy=strategy
                )
                done += len(deliveries)
            for deliveries, status, error in results.ended:
                store.finish(connection, name, deliveries, status=status, now=now, error=error)
                done += len(deliveries)
            for deliveries, error, outcome in results.dead:
                store.finish(
                    connection,
                    name,
                    deliveries,
                    status=store.DEAD,
                    now=now,
                    error=error,
                    outcome=outcome,
                )
                done += len(deliveries)
            if results.postponed:
                head = results.postponed[0]
                if head.attempts + 1 >= destination.max_attempts:
                    store.finish(
                        connection,
                        name,
                        [head],
                        status=store.DEAD,
                        now=now,
                        error=f"gave up after {head.attempts + 1} attempts: "
                        f"{results.postpone_error}",
                    )
                    rest = results.postponed[1:]
                    until = now
                else:
                    rest = results.postponed
                    until = now + timedelta(
                        seconds=backoff(
                            head.attempts + 1,
                            base=self.settings.retry_base_seconds,
                            cap=self.settings.retry_cap_seconds,
                            retry_after=results.retry_after,
                            jitter=self.jitter,
                        )
                    )
                store.postpone(
                    connection,
                    [d.id for d in rest],
                    until=until,
                    error=results.postpone_error or "",
                )
            _audit_deliveries(connection, name, lane, results)
            store.release_lane(connection, name, lane, worker=self.worker_id)
            failure = results.postpone_error or (results.dead[0][1] if results.dead else None)
            if results.delivered or failure:
                store.note_result(connection, name, now=now, error=failure)
            uow.commit()
        if results.delivered and self.on_delivered is not None:
            self.on_delivered(name, [d for w, _ in results.delivered for d in w.covers], now)
        log.info(
            "lane delivered",
            extra={
                "destination": name,
                "delivered": sum(len(w.covers) for w, _ in results.delivered),
                "dead": sum(len(d) for d, _, _ in results.dead),
                "postponed": len(results.postponed),
            },
        )
        return done


class _LaneRun:
    """Delivering one lane's batch: read, translate, send, and collect the results."""

    def __init__(
        self, worker: DeliveryWorker, destination: Destination, lane: str, items: list[Delivery]
    ) -> None:
        self.worker = worker
        self.destination = destination
        self.name = destination.name
        self.lane = lane
        self.items = items
        self.client = worker.clients[destination.name]
        self.plan = worker.plans[destination.name]
        self.results = _Results()
        self.remote: dict[Key, LedgerEntry] = {}
        self.identifiers: dict[Key, dict[str, str] | None] = {}
        self.bodies: dict[Key, Resource] = {}
        self.current: dict[Key, Resource] = {}
        self.record_keys: dict[Key, tuple[str, str]] = {}
        self.records: dict[tuple[str, str], Any] = {}

    # reading -------------------------------------------------------------------------------

    def _prepare(self) -> list[_Work]:
        latest: dict[Key, list[Delivery]] = {}
        for item in self.items:
            latest.setdefault(item.key, []).append(item)
        with self.worker.database.unit_of_work(write=False) as uow:
            connection = uow.connection
            heads = [chain[-1] for chain in latest.values()]
            self.bodies = store.version_bodies(
                connection, [(d.resource_type, d.resource_id, d.version) for d in heads]
            )
            wanted: set[Key] = {d.key for d in heads}
            for body in self.bodies.values():
                wanted |= referenced_keys(body)
            if not self.lane.count("/"):
                wanted.add(("Patient", self.lane))
            # Heads still current are not read and parsed again: only their identifiers are
            # wanted, and their stored versions were just read.
            self.current = store.current_bodies(
                connection,
                wanted,
                known={
                    d.key: (d.version, self.bodies[d.key]) for d in heads if d.key in self.bodies
                },
            )
            for key, body in self.current.items():
                self.identifiers[key] = business_identifier(body, self.worker.site_system)
            # Records are read only for what may go in the readable summary.
            fallback = [d.key for d in heads if self._may_be_summarized(d.resource_type)]
            self.record_keys = store.records_of(connection, fallback) if fallback else {}
            wanted_records = set(self.record_keys.values())
            if wanted_records:
                found = RecordRepository(connection).get_many(wanted_records)
                self.records = {key: load(stored) for key, stored in found.items()}
            wanted |= {_document_key(record) for record in wanted_records}
            self.remote = store.ledger(connection, self.name, wanted)
        work = []
        for chain in latest.values():
            head = chain[-1]
            work.append(
                _Work(
                    delivery=head,
                    covers=chain,
                    body=self.bodies.get(head.key),
                    strategy=self.plan.of(head.resource_type),
                )
            )
        work.sort(key=lambda w: (_RANK.get(w.delivery.resource_type, 99), w.delivery.id))
        return work

    # the run -------------------------------------------------------------------------------

    def run(self) -> _Results:
        work = self._prepare()
        bundle: list[_Work] = []
        documents: dict[tuple[str, str], list[_Work]] = {}
        remaining = list(work)
        try:
            while remaining:
                item = remaining.pop(0)
                if self._ended(item):
                    continue
                strategy = self._effective_strategy(item)
                if strategy is Strategy.document_reference:
                    record_key = self.record_keys.get(item.delivery.key)
                    if record_key is None or record_key not in self.records:
                        self.results.ended.append(
                            (item.covers, store.UNSUPPORTED, "no record to summarize")
                        )
                    else:
                        documents.setdefault(record_key, []).append(item)
                    continue
                if strategy is Strategy.transaction and item.body is not None:
                    bundle.append(item)
                    if len(bundle) >= self.worker.settings.bundle_size:
                        self._send_bundle(bundle)
                        bundle = []
                    continue
                if bundle:
                    self._send_bundle(bundle)
                    bundle = []
                self._send_single(item, strategy)
            if bundle:
                self._send_bundle(bundle)
                bundle = []
            for record_key, items in documents.items():
                self._send_document(record_key, items)
        except _Stop as stop:
            settled = {d.id for w, _ in self.results.delivered for d in w.covers}
            settled |= {d.id for covers, _, _ in self.results.ended for d in covers}
            settled |= {d.id for covers, _, _ in self.results.dead for d in covers}
            self._postpone([w for w in work if w.delivery.id not in settled], stop.error)
        return self.results

    def _ended(self, item: _Work) -> bool:
        """Handled without a request: an echo of a pulled change, or a type not delivered."""
        entry = self.remote.get(item.delivery.key)
        if entry is not None and entry.origin_version == item.delivery.version:
            self.results.ended.append((item.covers, store.ECHO, None))
            return True
        if item.strategy is Strategy.unsupported:
            if item.delivery.resource_type == "Patient":
                try:
                    self._patient(item.delivery.resource_id)
                except PermanentFailure as error:
                    self.results.dead.append((item.covers, error.message, error.outcome))
                    return True
                self.results.delivered.append((item, "matched"))
                return True
            self.results.ended.append(
                (item.covers, store.UNSUPPORTED, "the EHR cannot take this resource type")
            )
            return True
        return False

    def _may_be_summarized(self, resource_type: str) -> bool:
        """Whether a change of this type may reach the EHR in the readable summary."""
        if self.plan.of(resource_type) is Strategy.document_reference:
            return True
        return resource_type == "Observation" and self._encounters_only_found()

    def _encounters_only_found(self) -> bool:
        """The EHR takes no Encounters from us: vital signs go on one it has, if any."""
        return (
            not self.plan.capabilities.of("Encounter").writable
            and self.plan.of("Encounter") is Strategy.unsupported
        )

    def _effective_strategy(self, item: _Work) -> Strategy:
        """Vital signs need an encounter the EHR knows; without one they go in the summary."""
        if (
            item.delivery.resource_type != "Observation"
            or item.body is None
            or item.strategy is Strategy.document_reference
            or not self._encounters_only_found()
        ):
            return item.strategy
        encounter = item.body.get("encounter")
        if not isinstance(encounter, dict):
            return item.strategy
        reference = str(encounter.get("reference", ""))
        key = tuple(reference.split("/", 1))
        if len(key) != 2:
            return item.strategy
        if (key[0], key[1]) in self.remote:
            return item.strategy
        found = self._find_encounter(item.body)
        if found is not None:
            self.remote[(key[0], key[1])] = LedgerEntry("Encounter", found, None, None, None)
            self.results.ledger.append(((key[0], key[1]), "Encounter", found, None, None))
            return item.strategy
        return Strategy.document_reference

    def _find_encounter(self, body: Resource) -> str | None:
        support = self.plan.capabilities.of("Encounter")
        when = str(body.get("effectiveDateTime", ""))[:10]
        if "search-type" not in support.interactions or not when:
            return None
        subject = self._remote_of(("Patient", self.lane)) if "/" not in self.lane else None
        if subject is None:
            return None
        try:
            found = self.client.search(
                "Encounter", [("patient", f"Patient/{subject}"), ("date", when)]
            )
        except TransientFailure as error:
            raise _Stop(error) from None
        except DeliveryError:
            return None
        return str(found[0]["id"]) if len(found) == 1 else None

    # references ----------------------------------------------------------------------------

    def _patient(self, patient_id: str) -> str:
        key = ("Patient", patient_id)
        entry = self.remote.get(key)
        if entry is not None:
            return entry.remote_id
        body = self.current.get(key)
        system = self.destination.patients.match_identifier_system
        values = [
            i.get("value")
            for i in (body or {}).get("identifier", [])
            if isinstance(i, dict) and i.get("system") == system and i.get("value")
        ]
        try:
            for value in values:
                found = self.client.search("Patient", [("identifier", f"{system}|{value}")])
                ids = sorted({str(r.get("id")) for r in found})
                if len(ids) > 1:
                    raise PermanentFailure(f"{len(ids)} Patients in the EHR have the identifier")
                if ids:
                    return self._remember(key, "Patient", ids[0], None, None)
            if self.destination.patients.create_missing and body is not None:
                resource = translate(
                    body,
                    remote_id=None,
                    remote_of=lambda k: None,
                    identifier_of=lambda k: None,
                )
                identifier = business_identifier(body, self.worker.site_system)
                response = (
                    self.client.conditional_update(resource, identifier)
                    if identifier
                    else self.client.create(resource)
                )
                remote_id, version = location_id(response, _json_or_none(response))
                return self._remember(key, "Patient", remote_id, version, None)
        except TransientFailure as error:
            raise _Stop(error) from None
        if body is None:
            raise PatientNotMatched("the patient's Patient resource is not stored")
        if not values:
            raise PatientNotMatched(f"the patient has no identifier in {system}")
        raise PatientNotMatched(f"no Patient in the EHR has the patient's identifier in {system}")

    def _remember(
        self, key: Key, remote_type: str, remote_id: str, version: str | None, pushed: int | None
    ) -> str:
        before = self.remote.get(key)
        self.remote[key] = LedgerEntry(
            remote_type,
            remote_id,
            version,
            pushed,
            before.origin_version if before else None,
        )
        self.results.ledger.append((key, remote_type, remote_id, version, pushed))
        return remote_id

    def _remote_of(self, key: Key) -> str | None:
        if key[0] == "Patient":
            try:
                return self._patient(key[1])
            except PatientNotMatched:
                return None
        entry = self.remote.get(key)
        return entry.remote_id if entry else None

    def _translate(self, item: _Work) -> Resource:
        assert item.body is not None
        entry = self.remote.get(item.delivery.key)
        try:
            return translate(
                item.body,
                remote_id=entry.remote_id if entry else None,
                remote_of=self._remote_of,
                identifier_of=self.identifiers.get,
            )
        except UnresolvedPatient:
            raise PatientNotMatched(
                "no Patient in the EHR matches the patient this resource names"
            ) from None

    # sending -------------------------------------------------------------------------------

    def _send_bundle(self, items: list[_Work]) -> None:
        keys = frozenset(item.delivery.key for item in items)
        entries = []
        ready: list[_Work] = []
        for item in items:
            try:
                entries.append(self._bundle_entry(item, in_bundle=keys))
            except PermanentFailure as error:
                self.results.dead.append((item.covers, error.message, error.outcome))
                continue
            ready.append(item)
        if not entries:
            return
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        try:
            answer = self.client.transaction(bundle)
        except TransientFailure as error:
            raise _Stop(error) from None
        except (PermanentFailure, VersionConflict) as error:
            if len(ready) == 1:
                self._send_single(ready[0], Strategy.conditional_update)
                return
            outcome = getattr(error, "outcome", None) or {}
            log.info(
                "transaction refused (%s %s): sending its entries one by one",
                error.status,
                [i.get("expression") for i in outcome.get("issue", [])][:3],
                extra={"destination": self.name, "status": error.status},
            )
            for item in ready:
                self._send_bundle([item])
            return
        responses = answer.get("entry") or []
        for item, response in zip(ready, responses, strict=False):
            status = (response.get("response") or {}) if isinstance(response, dict) else {}
            try:
                remote_id, version = remote_version(status)
            except TransientFailure:
                remote_id, version = self._remote_id_fallback(item)
            self._remember(
                item.delivery.key,
                item.delivery.resource_type,
                remote_id,
                version,
                item.delivery.version,
            )
            self.results.delivered.append((item, Strategy.transaction.value))

    def _remote_id_fallback(self, item: _Work) -> tuple[str, str | None]:
        entry = self.remote.get(item.delivery.key)
        if entry is not None:
            return entry.remote_id, None
        identifier = self.identifiers.get(item.delivery.key)
        if item.body is not None and identifier is None:
            identifier = business_identifier(item.body, self.worker.site_system)
        if identifier is not None:
            found = self._search_identifier(item.delivery.resource_type, identifier)
            if found:
                return found[0], None
        raise _Stop(TransientFailure("the transaction's answer names no resource id"))

    def _bundle_entry(self, item: _Work, *, in_bundle: frozenset[Key]) -> Resource:
        """The transaction entry of one change, its resource already JSON (translated once)."""
        key = item.delivery.key
        assert item.body is not None
        entry = self.remote.get(key)
        support = self.plan.capabilities.of(key[0])
        identifier = business_identifier(item.body, self.worker.site_system)
        own_id = None
        if entry is not None:
            request = {"method": "PUT", "url": f"{key[0]}/{entry.remote_id}"}
        elif identifier is not None and support.conditional_update and support.identifier_search:
            query = identifier_query(identifier)
            request = {"method": "PUT", "url": f"{key[0]}?{query}"}
        elif support.idempotent_put:
            own_id = key[1]
            request = {"method": "PUT", "url": f"{key[0]}/{key[1]}"}
        else:
            request = {"method": "POST", "url": key[0]}
        try:
            resource = translate_json(
                item.body,
                remote_id=entry.remote_id if entry else None,
                remote_of=self._remote_of,
                identifier_of=self.identifiers.get,
                in_bundle=in_bundle,
                id_last=own_id,
            )
        except UnresolvedPatient:
            raise PatientNotMatched(
                "no Patient in the EHR matches the patient this resource names"
            ) from None
        return {
            "fullUrl": bundle_full_url(key),
            "resource": orjson.Fragment(resource),
            "request": request,
        }

    def _send_single(self, item: _Work, strategy: Strategy) -> None:
        delivery = item.delivery
        try:
            if delivery.deleted or item.body is None:
                self._delete(item)
                return
            resource = self._translate(item)
            identifier = business_identifier(item.body, self.worker.site_system)
            remote_id, version = self._write(
                delivery.resource_type, delivery.key, resource, identifier, strategy
            )
            self._remember(
                delivery.key, delivery.resource_type, remote_id, version, delivery.version
            )
            self.results.delivered.append((item, strategy.value))
        except TransientFailure as error:
            raise _Stop(error) from None
        except PermanentFailure as error:
            self.results.dead.append((item.covers, error.message, error.outcome))

    def _write(
        self,
        resource_type: str,
        key: Key,
        resource: Resource,
        identifier: dict[str, str] | None,
        strategy: Strategy,
    ) -> tuple[str, str | None]:
        """Write one resource the way `strategy` says; (remote id, remote version)."""
        support = self.plan.capabilities.of(resource_type)
        entry = self.remote.get(key)
        by_identifier = identifier is not None and support.identifier_search
        try:
            if (
                strategy in (Strategy.transaction, Strategy.conditional_update)
                and identifier is not None
                and by_identifier
                and support.conditional_update
            ):
                response = self.client.conditional_update(resource, identifier)
                return location_id(response, _json_or_none(response))
            remote_id = entry.remote_id if entry else None
            if remote_id is None and identifier is not None and by_identifier:
                found = self._search_identifier(resource_type, identifier)
                remote_id = found[0] if found else None
            if (
                remote_id is None
                and support.idempotent_put
                and resource_type != "DocumentReference"
            ):
                remote_id = key[1]  # our own id: repeating the PUT cannot duplicate
            if remote_id is not None:
                if "update" not in support.interactions:
                    return remote_id, entry.remote_version if entry else None
                response = self.client.update({**resource, "id": remote_id})
                return location_id(response, _json_or_none(response))
            response = self.client.create(resource)
            return location_id(response, _json_or_none(response))
        except VersionConflict:
            return self._reconcile(resource_type, resource, identifier)

    def _reconcile(
        self, resource_type: str, resource: Resource, identifier: dict[str, str] | None
    ) -> tuple[str, str | None]:
        """409/412: find the EHR's copy again and write onto its current version."""
        candidates = self._search_identifier(resource_type, identifier) if identifier else []
        if not candidates and resource.get("id"):
            candidates = [str(resource["id"])]
        if not candidates:
            raise TransientFailure("the EHR reported a conflict and holds no copy to reconcile")
        remote_id = candidates[0]
        current = self.client.read(resource_type, remote_id)
        version = ((current or {}).get("meta") or {}).get("versionId")
        headers = {"If-Match": f'W/"{version}"'} if version else None
        try:
            response = self.client.request(
                "PUT",
                f"{resource_type}/{remote_id}",
                body={**resource, "id": remote_id},
                headers=headers,
            )
        except VersionConflict as error:
            raise TransientFailure(f"still conflicting after a re-read ({error.status})") from None
        return location_id(response, _json_or_none(response))

    def _search_identifier(self, resource_type: str, identifier: dict[str, str]) -> list[str]:
        """The EHR's ids of the resource with `identifier`, within the lane's matched patient."""
        patient = self.remote.get(("Patient", self.lane)) if "/" not in self.lane else None
        params = identifier_lookup(
            resource_type,
            identifier,
            patient=patient.remote_id if patient is not None else None,
            support=self.plan.capabilities.of(resource_type),
        )
        found = self.client.search(resource_type, params)
        return sorted({str(r["id"]) for r in found if "id" in r})

    def _delete(self, item: _Work) -> None:
        key = item.delivery.key
        entry = self.remote.get(key)
        support = self.plan.capabilities.of(key[0])
        if entry is None:
            self.results.delivered.append((item, "nothing-to-delete"))
            return
        if "delete" not in support.interactions:
            self.results.ended.append((item.covers, store.UNSUPPORTED, "the EHR takes no deletes"))
            return
        self.client.delete(entry.remote_type, entry.remote_id)
        self.results.delivered.append((item, "delete"))

    def _send_document(self, record_key: tuple[str, str], items: list[_Work]) -> None:
        record = self.records[record_key]
        key = _document_key(record_key)
        identifier = summary_identifier(self.worker.site_system, *record_key)
        try:
            subject = self._patient(self.lane) if "/" not in self.lane else None
            if subject is None:
                raise PatientNotMatched("the summary has no patient to file it under")
            encounter = None
            for item in items:
                ref = (item.body or {}).get("encounter") or (item.body or {}).get("context")
                if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                    parts = ref["reference"].split("/")
                    found = self.remote.get((parts[0], parts[-1])) if len(parts) == 2 else None
                    if found is not None:
                        encounter = {"reference": f"Encounter/{found.remote_id}"}
            resource = document_reference(
                record=record,
                identifier=identifier,
                subject={"reference": f"Patient/{subject}"},
                encounter=encounter,
                author_display="Infusion Bridge",
            )
            entry = self.remote.get(key)
            if entry is not None:
                resource["id"] = entry.remote_id
            doc_strategy = choose(
                "DocumentReference", self.plan.capabilities, dict(self.destination.strategy)
            )
            remote_id, version = self._write(
                "DocumentReference", key, resource, identifier, doc_strategy
            )
        except TransientFailure as error:
            raise _Stop(error) from None
        except PermanentFailure as error:
            for item in items:
                self.results.dead.append((item.covers, error.message, error.outcome))
            return
        self._remember(key, "DocumentReference", remote_id, version, None)
        for item in items:
            self.results.delivered.append((item, Strategy.document_reference.value))

    def _postpone(self, work: list[_Work], error: TransientFailure) -> None:
        seen: set[int] = set()
        postponed: list[Delivery] = []
        for item in work:
            for delivery in item.covers:
                if delivery.id not in seen:
                    seen.add(delivery.id)
                    postponed.append(delivery)
        postponed.sort(key=lambda d: d.id)
        self.results.postponed = postponed
        self.results.postpone_error = error.message
        self.results.retry_after = error.retry_after


def _document_key(record_key: tuple[str, str]) -> Key:
    return ("DocumentReference", str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(record_key))))


def _json_or_none(response: httpx.Response) -> Resource | None:
    if not response.content:
        return None
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _audit_deliveries(
    connection: Connection, destination: str, lane: str, results: _Results
) -> None:
    """Delivery is a sync action: its AuditEvent commits with the ledger's record of it."""
    delivered = [d for work, _ in results.delivered for d in work.covers]
    dead = [d for deliveries, _, _ in results.dead for d in deliveries]
    if not delivered and not dead:
        return
    record_audit(
        connection,
        subtype="sync",
        entities=[
            f"{d.resource_type}/{d.resource_id}/_history/{d.version}" for d in delivered + dead
        ],
        patients=[None if "/" in lane else lane],
        actor="worker",
        description=f"delivered {len(delivered)} to {destination}; {len(dead)} dead letters",
    )
