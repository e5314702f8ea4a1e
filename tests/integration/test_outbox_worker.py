"""The worker on real SQLite and PostgreSQL against a hand-written fake EHR (httpx.MockTransport):
lanes keep each patient's changes in order, two workers never deliver one change twice, and a
pulled-back plan is not pushed again."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select

from service.bootstrap import Services, bootstrap
from service.config import Settings
from service.logs import JsonFormatter, TextFormatter
from service.records.service import parse_record, put_record
from service.store.tables import resources, sync_deliveries
from service.sync import ledger
from service.sync.client import EhrClient
from service.sync.destinations import Destination, parse_destinations
from service.sync.worker import DeliveryWorker, WorkerSettings
from tests import factory

MATCH = "urn:oid:2.16.840.1.113883.3.7777.1"


class FakeEhr:
    """Takes conditional updates one by one (no transactions); records what arrived, in order."""

    def __init__(self) -> None:
        self.arrived: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.rstrip("/").split("/")[-1]
        if path == "metadata":
            kinds = ["Encounter", "Observation", "MedicationAdministration", "AdverseEvent"]
            return httpx.Response(
                200,
                json={
                    "resourceType": "CapabilityStatement",
                    "rest": [
                        {
                            "mode": "server",
                            "resource": [
                                {
                                    "type": t,
                                    "interaction": [{"code": "update"}, {"code": "create"}],
                                    "conditionalUpdate": True,
                                    "updateCreate": True,
                                }
                                for t in kinds
                            ],
                        }
                    ],
                },
            )
        if path == "Patient":
            return httpx.Response(
                200, json={"resourceType": "Bundle", "entry": [{"resource": {"id": "P1"}}]}
            )
        body = orjson.loads(request.content)
        with self.lock:
            self.arrived.append((body["resourceType"], request.url.params.get("identifier", "")))
        new_id = uuid.uuid4().hex
        return httpx.Response(
            201, headers={"Location": f"http://ehr/{body['resourceType']}/{new_id}/_history/1"}
        )


@pytest.fixture
def services(database_url: str) -> Iterator[Services]:
    built = bootstrap(Settings(database_url=database_url, auth_disabled=True))
    yield built
    built.close()


def _destination() -> Destination:
    (found,) = parse_destinations(
        f"""
destinations:
  - name: fake-{uuid.uuid4().hex[:8]}
    base_url: http://ehr/fhir
    send: [Encounter, Observation, MedicationAdministration, AdverseEvent]
    patients: {{match_identifier_system: "{MATCH}"}}
    backfill: false
"""
    )
    return found


def _worker(services: Services, target: Destination, ehr: FakeEhr) -> DeliveryWorker:
    return DeliveryWorker(
        database=services.database,
        destinations=[target],
        clients={target.name: EhrClient(target, transport=httpx.MockTransport(ehr))},
        site_system=services.settings.site_identifier_system,
        settings=WorkerSettings(batch_size=3, concurrency=2, lanes_per_tick=2),
    )


def _write(services: Services, record: dict[str, Any]) -> None:
    with services.database.unit_of_work() as uow:
        put_record(
            uow=uow, record=parse_record(record), materializer=services.materializer, actor="t"
        )


def test_two_workers_deliver_each_change_once_and_each_patient_in_order(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service")
    target = _destination()
    ehr = FakeEhr()
    workers = [_worker(services, target, ehr) for _ in range(2)]
    clinics = [factory.clinic() for _ in range(4)]
    for clinic in clinics:
        clinic.patient["ehr_identifiers"] = [{"system": MATCH, "value": uuid.uuid4().hex}]
        for record in clinic.records():
            _write(services, record)
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    for thread in threads:
        thread.start()
    try:
        # A deadline, not a count of polls: on a loaded machine delivery takes longer.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with services.database.unit_of_work(write=False) as uow:
                (row,) = ledger.status(uow.connection, [target], now=ledger_now())
            if row["queue_depth"] == 0 and row["delivered"]:
                break
            stop.wait(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        for worker in workers:
            worker.close()
    assert row["queue_depth"] == 0
    assert row["dead_letters"] == 0
    # The counts that status and /metrics read, kept as the two workers ended deliveries
    # concurrently, are those of the deliveries themselves.
    with services.database.unit_of_work(write=False) as uow:
        scanned = uow.connection.execute(
            select(sync_deliveries.c.status, sync_deliveries.c.latency_ms).where(
                sync_deliveries.c.destination == target.name
            )
        ).all()
        (row,) = ledger.status(uow.connection, [target], now=ledger_now())
        histogram = ledger.latency_histogram(uow.connection)[target.name]
    latencies = [latency for status, latency in scanned if status == ledger.DELIVERED]
    assert row["delivered"] == len(latencies) > 0
    assert row["echoes_suppressed"] + row["unsupported"] + row["superseded"] == sum(
        status in (ledger.ECHO, ledger.UNSUPPORTED, ledger.SUPERSEDED) for status, _ in scanned
    )
    within = [sum(latency <= bound for latency in latencies) for bound in ledger.LATENCY_BUCKETS_MS]
    assert histogram == (within, len(latencies), float(sum(latencies)))
    identifiers = [i for _, i in ehr.arrived]
    assert len(identifiers) == len(set(identifiers)), "a change arrived twice"
    for clinic in clinics:
        session = clinic.session["external_id"]
        mine = [t for t, i in ehr.arrived if f"|{session}/" in i]
        # Referenced types first: the Encounter before what is filed on it.
        assert mine[0] == "Encounter"
        assert "MedicationAdministration" in mine
    # Every delivery is audited, in the transaction that records it, naming what went.
    with services.database.unit_of_work(write=False) as uow:
        bodies = uow.connection.execute(
            select(resources.c.body).where(resources.c.resource_type == "AuditEvent")
        ).scalars()
        audited = [
            event
            for event in map(orjson.loads, bodies)
            if event["subtype"][0]["code"] == "sync"
            and event["agent"][0]["who"]["identifier"]["value"] == "worker"
        ]
    assert audited
    named = {e["what"]["reference"] for event in audited for e in event.get("entity", [])}
    assert any(reference.startswith("Encounter/") for reference in named)
    # The worker's log lines name the destination, and no patient.
    lines = [f.format(r) for r in caplog.records for f in (TextFormatter(), JsonFormatter())]
    assert any(f"destination={target.name}" in line for line in lines)
    for clinic in clinics:
        patient = clinic.patient
        for private in (patient["mrn"], patient["birth_date"], patient["name"]["family"]):
            assert not [line for line in lines if private in line]


def ledger_now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def test_ledger_entries_recorded_together_are_those_recorded_in_turn(services: Services) -> None:
    """`record_remotes` (a delivered batch's entries in one statement) leaves what
    `record_remote` one after another leaves, a None keeping the version there was."""
    from datetime import UTC, datetime

    one, together = f"one-{uuid.uuid4().hex[:8]}", f"together-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    first, second = ("Observation", uuid.uuid4().hex), ("Encounter", uuid.uuid4().hex)
    steps = [
        [ledger.RemoteEntry(first, "Observation", "r1", remote_version="1", pushed_version=1)],
        [
            ledger.RemoteEntry(first, "Observation", "r1", pushed_version=2),
            ledger.RemoteEntry(second, "Encounter", "e1", remote_version="3"),
            ledger.RemoteEntry(second, "Encounter", "e2", origin_version=4),
        ],
    ]
    with services.database.unit_of_work() as uow:
        for batch in steps:
            for entry in batch:
                ledger.record_remote(
                    uow.connection,
                    one,
                    entry.key,
                    remote_type=entry.remote_type,
                    remote_id=entry.remote_id,
                    remote_version=entry.remote_version,
                    pushed_version=entry.pushed_version,
                    origin_version=entry.origin_version,
                    now=now,
                )
            ledger.record_remotes(uow.connection, together, batch, now=now)
        uow.commit()
    with services.database.unit_of_work(write=False) as uow:
        rows = {
            name: ledger.ledger(uow.connection, name, [first, second]) for name in (one, together)
        }
    assert rows[one] == rows[together]
    assert rows[one][first] == ledger.LedgerEntry("Observation", "r1", "1", 2, None)
    assert rows[one][second] == ledger.LedgerEntry("Encounter", "e2", "3", None, 4)
