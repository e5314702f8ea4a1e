"""Delivery to a local EHR over HTTP, in resources/s, and write-to-arrival latency (p50/p95),
beside the EHR's own ingest rate for the same resources posted directly (ceiling).

The EHR is a second `infusion-bridge serve` (uvicorn, one worker, SQLite, its own identifier
systems, auth off) that knows the demo clinic's patients by their EHR identifiers. The clinic is
a BENCH_DELIVERY_PATIENTS-patient (default 10: about 2,300 resources) demo clinic in a SQLite
file; the delivery worker runs in this process (BENCH_DELIVERY_CONCURRENCY lanes at once,
default 4) and sends the Encounters, MedicationAdministrations, Observations, AdverseEvents
and QuestionnaireResponses as transaction Bundles of conditional updates, as it chooses from
the EHR's CapabilityStatement.

1. Throughput: the clinic's outbox (every resource of those types) delivered from a standing
   start; resources/s = deliveries accepted by the EHR over the wall time until the queue is empty.
2. Latency at steady load: with the worker idle-polling, one infusion session written every
   BENCH_DELIVERY_INTERVAL seconds (default 0.2) for BENCH_DELIVERY_SECONDS (default 10); the
   latency of each change is from the write (the outbox row's time) to the EHR's answer.
3. Ceiling, on a fresh EHR process: the same resources, translated the same way, posted directly
   as the same transaction Bundles over as many connections.

The issue's targets: at least 500 resources/s delivered; p95 latency under 1 s at steady load.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
from sqlalchemy import func, select

from bench.fhir_read import _cli, _environment, _free_port, _process
from service.bootstrap import bootstrap, ehr_clients
from service.config import Settings
from service.records.demo import EHR_IDENTIFIER_SYSTEM, generate_clinic
from service.records.models import InfusionSession, Patient
from service.records.service import put_record
from service.store.resources import patient_of
from service.store.tables import resources, sync_deliveries
from service.sync import ledger
from service.sync.destinations import parse_destinations
from service.sync.outbound import bundle_full_url, business_identifier, translate
from service.sync.worker import DeliveryWorker, WorkerSettings

PATIENTS = int(os.environ.get("BENCH_DELIVERY_PATIENTS", "10"))
CONCURRENCY = int(os.environ.get("BENCH_DELIVERY_CONCURRENCY", "4"))
INTERVAL = float(os.environ.get("BENCH_DELIVERY_INTERVAL", "0.2"))
STEADY_SECONDS = float(os.environ.get("BENCH_DELIVERY_SECONDS", "10"))
AS_OF = "2026-11-23"
SITE = "http://infusion-bridge.org/fhir/sid"
TYPES = ["Encounter", "MedicationAdministration", "Observation", "AdverseEvent"]
TYPES += ["QuestionnaireResponse"]


@contextmanager
def _ehr(folder: Path, name: str) -> Iterator[str]:
    env = _environment(f"sqlite:///{folder}/{name}.db") | {
        "SITE_IDENTIFIER_SYSTEM": "http://county-ehr.example/sid",
        "MRN_SYSTEM": EHR_IDENTIFIER_SYSTEM,
        "AUTH_DISABLED": "true",
    }
    import subprocess

    subprocess.run([_cli(), "migrate"], env=env, check=True, capture_output=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with _process(
        [_cli(), "serve", "--port", str(port)], env, f"{base}/readyz", folder / f"{name}.log"
    ):
        yield base


def _register(base: str, patients: list[Patient]) -> None:
    lines = []
    for patient in patients:
        (ehr,) = [i for i in patient.ehr_identifiers if i.system == EHR_IDENTIFIER_SYSTEM]
        lines.append(
            orjson.dumps(
                {
                    "kind": "patient",
                    "external_id": f"EP-{ehr.value}",
                    "mrn": ehr.value,
                    "name": patient.name.model_dump(),
                    "birth_date": patient.birth_date.isoformat(),
                    "sex": patient.sex.value,
                }
            )
        )
    answer = httpx.post(
        f"{base}/api/v1/import",
        content=b"\n".join(lines),
        headers={"Content-Type": "application/x-ndjson"},
        timeout=120,
    )
    answer.raise_for_status()


def _latencies(services: Any, name: str, since: datetime | None = None) -> list[int]:
    with services.database.unit_of_work(write=False) as uow:
        query = select(sync_deliveries.c.latency_ms).where(
            sync_deliveries.c.destination == name,
            sync_deliveries.c.status == "delivered",
        )
        if since is not None:
            query = query.where(sync_deliveries.c.written_at >= since)
        return sorted(int(r[0]) for r in uow.connection.execute(query) if r[0] is not None)


def _pct(values: list[int], p: float) -> float:
    if not values:
        return float("nan")
    return float(values[min(len(values) - 1, round(p * (len(values) - 1)))])


def _wait_drained(services: Any, destination: Any, limit: float = 600) -> None:
    """Until the destination has no pending delivery.

    Asked of the pending rows' index alone, every 20 ms: the full status (a count of every
    delivery by status) ran in the worker's process often enough to take a share of its CPU.
    """
    pending = select(func.count()).where(
        sync_deliveries.c.destination == destination.name,
        sync_deliveries.c.status == ledger.PENDING,
    )
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with services.database.unit_of_work(write=False) as uow:
            if not uow.connection.execute(pending).scalar():
                return
        time.sleep(0.02)
    raise RuntimeError("the delivery queue did not drain")


def _ceiling_bundles(services: Any, base: str) -> list[dict[str, Any]]:
    """The clinic's resources as the worker sends them: one transaction per patient."""
    with services.database.unit_of_work(write=False) as uow:
        rows = uow.connection.execute(
            select(resources.c.body).where(resources.c.resource_type.in_(TYPES))
        )
        bodies = [orjson.loads(r.body) for r in rows]
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for body in bodies:
        by_patient.setdefault(patient_of(body) or "", []).append(body)
    patients = {}
    with services.database.unit_of_work(write=False) as uow:
        for row in uow.connection.execute(
            select(resources.c.id, resources.c.body).where(resources.c.resource_type == "Patient")
        ):
            body = orjson.loads(row.body)
            (value,) = [
                i["value"] for i in body["identifier"] if i["system"] == EHR_IDENTIFIER_SYSTEM
            ]
            found = httpx.get(
                f"{base}/fhir/Patient", params={"identifier": f"{EHR_IDENTIFIER_SYSTEM}|{value}"}
            ).json()
            patients[row.id] = found["entry"][0]["resource"]["id"]
    bundles = []
    for patient, items in by_patient.items():
        keys = frozenset((b["resourceType"], b["id"]) for b in items)
        entries = []
        for body in items:
            resource = translate(
                body,
                remote_id=None,
                remote_of=lambda k: patients.get(k[1]) if k[0] == "Patient" else None,
                identifier_of=lambda k: None,
                in_bundle=keys,
            )
            identifier = business_identifier(body, SITE)
            if identifier is not None and body["resourceType"] != "AdverseEvent":
                query = urlencode({"identifier": f"{identifier['system']}|{identifier['value']}"})
                request = {"method": "PUT", "url": f"{body['resourceType']}?{query}"}
            else:
                resource["id"] = body["id"]
                request = {"method": "PUT", "url": f"{body['resourceType']}/{body['id']}"}
            entries.append(
                {
                    "fullUrl": bundle_full_url((body["resourceType"], body["id"])),
                    "resource": resource,
                    "request": request,
                }
            )
        # One transaction: its urn:uuid references name its own entries (a transaction that
        # refers to an entry it does not hold is refused).
        bundles.append({"resourceType": "Bundle", "type": "transaction", "entry": entries})
        del patient
    return bundles


def _post_direct(base: str, bundles: list[dict[str, Any]]) -> tuple[float, int]:
    client = httpx.Client(timeout=120)
    count = sum(len(b["entry"]) for b in bundles)

    def post(bundle: dict[str, Any]) -> None:
        answer = client.post(
            f"{base}/fhir",
            content=orjson.dumps(bundle),
            headers={"Content-Type": "application/fhir+json"},
        )
        answer.raise_for_status()

    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(post, bundles))
    elapsed = time.monotonic() - started
    client.close()
    return count / elapsed, count


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        records = generate_clinic(
            seed=7, patients=PATIENTS, as_of=datetime.fromisoformat(AS_OF).date()
        )
        services = bootstrap(
            Settings(database_url=f"sqlite:///{folder}/clinic.db", auth_disabled=True)
        )
        services.database.migrate()
        patients = [r for r in records if isinstance(r, Patient)]
        with _ehr(folder, "ehr") as base, _ehr(folder, "ceiling") as ceiling_base:
            _register(base, patients)
            _register(ceiling_base, patients)
            (destination,) = parse_destinations(
                f"""
destinations:
  - name: bench-ehr
    base_url: {base}/fhir
    send: [{", ".join(TYPES)}]
    patients: {{match_identifier_system: "{EHR_IDENTIFIER_SYSTEM}"}}
"""
            )
            worker = DeliveryWorker(
                database=services.database,
                destinations=[destination],
                clients=ehr_clients([destination]),
                site_system=SITE,
                settings=WorkerSettings(
                    concurrency=CONCURRENCY, idle_seconds=0.02, lanes_per_tick=CONCURRENCY * 4
                ),
            )
            worker.plan_for(destination)
            for record in records:
                with services.database.unit_of_work() as uow:
                    put_record(
                        uow=uow, record=record, materializer=services.materializer, actor="bench"
                    )
            with services.database.unit_of_work() as uow:
                queued = ledger.fan_out(
                    uow.connection, destination, now=datetime.now(UTC), limit=1_000_000
                )
                uow.commit()
            stop = threading.Event()
            runner = threading.Thread(target=worker.run, args=(stop,), daemon=True)
            started = time.monotonic()
            runner.start()
            _wait_drained(services, destination)
            elapsed = time.monotonic() - started
            with services.database.unit_of_work(write=False) as uow:
                (row,) = ledger.status(uow.connection, [destination], now=datetime.now(UTC))
            delivered = row["delivered"]
            # Steady load: sessions re-written (a changed dose) one at a time.
            sessions = [r for r in records if isinstance(r, InfusionSession) and r.total_dose_mg]
            steady_from = datetime.now(UTC) - timedelta(milliseconds=5)
            end = time.monotonic() + STEADY_SECONDS
            index = 0
            while time.monotonic() < end:
                session = sessions[index % len(sessions)]
                changed = session.model_copy(
                    update={
                        "rate_mg_per_hour": round(
                            (session.rate_mg_per_hour or 50) + 0.5 + index % 7, 1
                        )
                    }
                )
                with services.database.unit_of_work() as uow:
                    put_record(
                        uow=uow, record=changed, materializer=services.materializer, actor="bench"
                    )
                index += 1
                time.sleep(INTERVAL)
            _wait_drained(services, destination)
            stop.set()
            runner.join(30)
            worker.close()
            steady = _latencies(services, destination.name, steady_from)
            ceiling_rate, ceiling_count = _post_direct(
                ceiling_base, _ceiling_bundles(services, ceiling_base)
            )
        services.close()
    result = {
        "benchmark": "fhir_delivery",
        "patients": PATIENTS,
        "queued": queued,
        "delivered": delivered,
        "delivered_per_second": round(delivered / elapsed, 1),
        "steady_writes": index,
        "steady_changes": len(steady),
        "latency_ms_p50": _pct(steady, 0.50),
        "latency_ms_p95": _pct(steady, 0.95),
        "ceiling_resources": ceiling_count,
        "ceiling_per_second": round(ceiling_rate, 1),
        "ratio": round(delivered / elapsed / ceiling_rate, 2),
    }
    print(json.dumps(result))
    print(
        f"delivery: {result['delivered_per_second']} resources/s delivered "
        f"(EHR direct ingest ceiling {result['ceiling_per_second']}/s, "
        f"ratio {result['ratio']}); write-to-arrival p50 {result['latency_ms_p50']} ms, "
        f"p95 {result['latency_ms_p95']} ms over {len(steady)} changes at steady load"
    )


if __name__ == "__main__":
    main()
