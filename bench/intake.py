"""Intake import throughput: records/s through `import_ndjson`, beside the bare-storage floor.

The baseline writes the same canonical record bodies (and one history row each) with a plain
batched INSERT in the same batch transactions, on the same database: what storage alone costs.
The ratio shows what validation, reference checks, idempotency and history add on top.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import orjson
from sqlalchemy import create_engine, insert, text

from service.bootstrap import materializer
from service.config import Settings
from service.records.demo import generate_clinic, to_ndjson
from service.records.service import ImportSummary, import_ndjson
from service.store.db import Database
from service.store.tables import record_changes, records

PATIENTS = int(os.environ.get("BENCH_PATIENTS", "200"))
BATCH = 500
POSTGRES = os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


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


def _bare_insert(database: Database, lines: list[bytes]) -> float:
    now = datetime.now(UTC)
    started = time.perf_counter()
    for start in range(0, len(lines), BATCH):
        rows, changes = [], []
        for line in lines[start : start + BATCH]:
            record = orjson.loads(line)
            body = line.decode().rstrip("\n")
            key = {"kind": record["kind"], "external_id": "base-" + record["external_id"]}
            rows.append(
                key
                | {
                    "patient_id": None,
                    "course_id": None,
                    "version": 1,
                    "content_hash": hashlib.sha256(line).hexdigest(),
                    "body": body,
                    "created_at": now,
                    "updated_at": now,
                    "updated_by": "bench",
                }
            )
            changes.append(
                key
                | {
                    "version": 1,
                    "operation": "create",
                    "changed_at": now,
                    "changed_by": "bench",
                    "request_id": None,
                    "patch": None,
                    "body": body,
                }
            )
        with database.unit_of_work(write=True) as uow:
            uow.connection.execute(insert(records), rows)
            uow.connection.execute(insert(record_changes), changes)
            uow.commit()
    return len(lines) / (time.perf_counter() - started)


def _measure(name: str, url: str, lines: list[bytes]) -> tuple[str, float, float]:
    database = Database(url)
    database.migrate()
    baseline = _bare_insert(database, lines)
    measured = _import(database, lines)
    database.dispose()
    return name, measured, baseline


def _postgres_schema() -> tuple[str, str] | None:
    try:
        engine = create_engine(POSTGRES)
        schema = f"ib_bench_{uuid.uuid4().hex[:8]}"
        with engine.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        engine.dispose()
    except Exception as error:
        print(f"PostgreSQL skipped: {error}")
        return None
    return schema, f"{POSTGRES}?options=-csearch_path%3D{schema}"


def main() -> None:
    lines = _lines()
    print(f"intake import: {len(lines)} demo records ({PATIENTS} patients), batches of {BATCH}")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'bench.db'}"
        results.append(_measure("SQLite (WAL, synchronous=FULL)", url, lines))
    postgres = _postgres_schema()
    if postgres is not None:
        schema, url = postgres
        try:
            results.append(_measure("PostgreSQL", url, lines))
        finally:
            engine = create_engine(POSTGRES)
            with engine.begin() as connection:
                connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            engine.dispose()
    print(f"{'store':<32} {'import rec/s':>13} {'bare INSERT rec/s':>18} {'ratio':>7}")
    for name, measured, baseline in results:
        print(f"{name:<32} {measured:>13,.0f} {baseline:>18,.0f} {measured / baseline:>7.2f}")
