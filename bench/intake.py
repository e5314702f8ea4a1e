"""Intake import throughput through `import_ndjson`, beside the bare-storage floor.

Import validates each record, checks its references, upserts it with its history, maps it to FHIR,
validates every resource and stores it with its version history and an outbox row. The baseline
writes the same rows (record bodies and history, the finished resources, their versions and
outbox rows) with plain batched INSERTs in batch transactions on the same database: what storage
alone costs. The ratio shows what everything else adds.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path

import orjson
from sqlalchemy import insert

from bench.postgres import postgres_schema
from mappings.bundle import map_records
from mappings.context import Resource
from service.bootstrap import mapping_context, materializer
from service.config import Settings
from service.records.demo import generate_clinic, to_ndjson
from service.records.service import ImportSummary, import_ndjson, parse_record
from service.store.db import Database
from service.store.tables import outbox, record_changes, records, resource_versions
from service.store.tables import resources as resources_table

PATIENTS = int(os.environ.get("BENCH_PATIENTS", "200"))
BATCH = 500


def _lines() -> list[bytes]:
    clinic = generate_clinic(seed=11, patients=PATIENTS, as_of=date(2026, 11, 23))
    return list(to_ndjson(clinic))


def _import(database: Database, lines: list[bytes]) -> float:
    summary = ImportSummary()
    started = time.perf_counter()
    batches = import_ndjson(
        database=database,
        materializer=materializer(Settings()),
        lines=lines,
        actor="bench",
        batch_size=BATCH,
    )
    for batch in batches:
        for result in batch:
            summary.add(result)
    elapsed = time.perf_counter() - started
    assert summary.rejected == 0, summary.as_json()
    return len(lines) / elapsed


def _bare_insert(database: Database, lines: list[bytes], resources: list[Resource]) -> float:
    now = datetime.now(UTC)
    started = time.perf_counter()
    per_batch = -(-len(resources) // -(-len(lines) // BATCH))
    for number, start in enumerate(range(0, len(lines), BATCH)):
        rows, changes = [], []
        for line in lines[start : start + BATCH]:
            record = orjson.loads(line)
            body = line.decode().rstrip("\n")
            key = {"kind": record["kind"], "external_id": "base-" + record["external_id"]}
            common = {"version": 1, "body": body}
            rows.append(
                key
                | common
                | {
                    "patient_id": None,
                    "course_id": None,
                    "content_hash": hashlib.sha256(line).hexdigest(),
                    "created_at": now,
                    "updated_at": now,
                    "updated_by": "bench",
                }
            )
            changes.append(
                key
                | common
                | {
                    "operation": "create",
                    "changed_at": now,
                    "changed_by": "bench",
                    "request_id": None,
                    "patch": None,
                }
            )
        current, versions, queued = [], [], []
        for resource in resources[number * per_batch : (number + 1) * per_batch]:
            body = orjson.dumps(resource).decode()
            key = {"resource_type": resource["resourceType"], "id": "base-" + resource["id"]}
            row = key | {"version": 1, "last_updated": now, "deleted": False, "body": body}
            current.append(row | {"content_hash": hashlib.sha256(body.encode()).hexdigest()})
            versions.append(row)
            queued.append(
                {
                    "resource_type": key["resource_type"],
                    "resource_id": key["id"],
                    "version": 1,
                    "deleted": False,
                    "patient_id": None,
                    "created_at": now,
                }
            )
        with database.unit_of_work(write=True) as uow:
            uow.connection.execute(insert(records), rows)
            uow.connection.execute(insert(record_changes), changes)
            if current:
                uow.connection.execute(insert(resources_table), current)
                uow.connection.execute(insert(resource_versions), versions)
                uow.connection.execute(insert(outbox), queued)
            uow.commit()
    return len(lines) / (time.perf_counter() - started)


def _measure(
    name: str, url: str, lines: list[bytes], resources: list[Resource]
) -> tuple[str, float, float]:
    database = Database(url)
    database.migrate()
    baseline = _bare_insert(database, lines, resources)
    measured = _import(database, lines)
    database.dispose()
    return name, measured, baseline


def main() -> None:
    lines = _lines()
    context = mapping_context(Settings())
    records_ = [parse_record(orjson.loads(line)) for line in lines]
    mapped = list(map_records(records_, context=context))
    print(
        f"intake import: {len(lines)} demo records ({PATIENTS} patients) -> {len(mapped)} "
        f"FHIR resources, batches of {BATCH}"
    )
    results = []
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'bench.db'}"
        results.append(_measure("SQLite (WAL, synchronous=FULL)", url, lines, mapped))
    with postgres_schema() as postgres_url:
        if postgres_url is not None:
            results.append(_measure("PostgreSQL", postgres_url, lines, mapped))
    per_record = len(mapped) / len(lines)
    print(
        f"{'store':<32} {'import rec/s':>13} {'(resources/s)':>14} {'bare INSERT rec/s':>18} "
        f"{'ratio':>7}"
    )
    for name, measured, baseline in results:
        print(
            f"{name:<32} {measured:>13,.0f} {measured * per_record:>14,.0f} {baseline:>18,.0f} "
            f"{measured / baseline:>7.2f}"
        )
