"""FHIR search latency over a million Observations, beside a bare Starlette endpoint (ceiling).

Measured: the typical clinical query `GET /fhir/Observation?patient=..&code=..&date=ge..` on
`infusion-bridge serve` (uvicorn, one worker), the patient, code and date varied over
QUERIES requests, under concurrent keep-alive load from a separate process (`bench.fhir_read`'s
load generators: `wrk` when installed, else its asyncio one). Requests/s and p50/p95 latency; the
issue's target is p95 under 50 ms with a million Observations stored.

Data: BENCH_OBSERVATIONS (default 1,000,000) vital-sign and score Observations, cloned from the
demo clinic's (what `mappings` produce for its sessions and assessments): each synthetic patient
takes one demo patient's Observations with new ids, its own Patient and Encounter references,
identifiers and a timeline shifted by up to two years. Resources, versions, outbox and index rows
are what `ResourceRepository.write` produces for them: it runs on a connection that records its
INSERTs (worker processes, in parallel), and those rows are bulk-loaded: COPY on PostgreSQL,
batched INSERTs on SQLite, in a few transactions. Generated once per run into a temporary file,
loaded into each store, deleted afterwards; nothing is kept between runs.

Baseline, in the same run: `ceiling_app` below, a bare Starlette route in the same uvicorn
setup answering the same URLs with the Bundle bytes the facade returned for them, from memory.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pickle
import random
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
from sqlalchemy import Dialect, Insert
from sqlalchemy.schema import CreateIndex, DropIndex
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.fhir_read import (
    CONNECTIONS,
    LOADGEN,
    SECONDS,
    UVICORN_LOG_LEVEL,
    WARMUP,
    _cli,
    _environment,
    _free_port,
    _measure,
    _process,
    _rate,
)
from bench.postgres import postgres_schema
from mappings.bundle import map_records
from service.bootstrap import mapping_context
from service.config import Settings
from service.fhir.errors import FHIR_JSON
from service.records.demo import generate_clinic
from service.store.db import Database
from service.store.resources import ResourceRepository
from service.store.tables import metadata

OBSERVATIONS = int(os.environ.get("BENCH_OBSERVATIONS", "1000000"))
SEARCH_CONNECTIONS = tuple(
    int(n) for n in os.environ.get("BENCH_SEARCH_CONNECTIONS", f"1,8,{CONNECTIONS}").split(",")
)
"""Concurrent connections, each level measured in turn (the facade, then the ceiling)."""
QUERIES = 1000
TEMPLATE_PATIENTS = 20
AS_OF = date(2026, 11, 23)
SHIFT_DAYS = 730
CHUNK = 4000
"""Observations per generated batch (one worker task)."""
COMMIT_EVERY = 100_000
CEILING_ENV = "BENCH_SEARCH_RESPONSES"
NAMESPACE = uuid.UUID("5b1c1d52-0a41-4bd6-a2a3-6f1e3c0b9a11")
LOINC = "http://loinc.org"


# --- synthetic Observations ---------------------------------------------------------------------


def _templates() -> list[list[dict[str, Any]]]:
    """The demo clinic's Observations, grouped by patient (patients without any left out)."""
    records = generate_clinic(seed=7, patients=TEMPLATE_PATIENTS, as_of=AS_OF)
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for resource in map_records(records, context=mapping_context(Settings())):
        if resource["resourceType"] == "Observation":
            by_patient.setdefault(resource["subject"]["reference"], []).append(resource)
    return [by_patient[key] for key in sorted(by_patient)]


def _new_id(patient: int, old: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{patient}/{old}"))


def _patient_id(patient: int) -> str:
    return _new_id(patient, "Patient")


def _shift(patient: int) -> timedelta:
    return timedelta(days=random.Random(patient).randrange(SHIFT_DAYS))


def _shifted(value: str, shift: timedelta) -> str:
    day = date.fromisoformat(value[:10]) - shift
    return day.isoformat() + value[10:]


def _clone(template: dict[str, Any], patient: int) -> dict[str, Any]:
    """One demo Observation as synthetic patient `patient`'s: ids, references, dates changed."""
    resource: dict[str, Any] = orjson.loads(orjson.dumps(template))
    resource["id"] = _new_id(patient, resource["id"])
    resource["subject"] = {"reference": f"Patient/{_patient_id(patient)}"}
    for element in ("encounter", "basedOn", "derivedFrom"):
        value = resource.get(element)
        for target in value if isinstance(value, list) else [value] if value else []:
            kind, _, old = target["reference"].partition("/")
            target["reference"] = f"{kind}/{_new_id(patient, old)}"
    for identifier in resource.get("identifier", []):
        identifier["value"] = f"B{patient:06d}-{identifier['value']}"
    shift = _shift(patient)
    resource["effectiveDateTime"] = _shifted(resource["effectiveDateTime"], shift)
    return resource


def _plan(templates: list[list[dict[str, Any]]]) -> list[tuple[int, int]]:
    """(synthetic patient, how many of its template's Observations) up to OBSERVATIONS in all."""
    plan, total, patient = [], 0, 0
    while total < OBSERVATIONS:
        size = min(len(templates[patient % len(templates)]), OBSERVATIONS - total)
        plan.append((patient, size))
        total += size
        patient += 1
    return plan


class _RecordingConnection:
    """Stands in for a Connection: selects find nothing, INSERTs are kept (table, rows)."""

    class dialect:  # noqa: N801 - stands in for the attribute: no dialect the store speaks
        name = "recording"

    def __init__(self) -> None:
        self.inserted: list[tuple[str, list[dict[str, Any]]]] = []

    def execute(self, statement: Any, parameters: Any = None) -> Any:
        if isinstance(statement, Insert):
            self.inserted.append((statement.table.name, list(parameters)))  # type: ignore[attr-defined]
            return None
        return []


_worker_templates: list[list[dict[str, Any]]] = []


def _init_worker() -> None:
    _worker_templates.extend(_templates())


def _generate_chunk(chunk: Sequence[tuple[int, int]]) -> bytes:
    """The store's rows for a few synthetic patients' Observations, pickled and compressed."""
    batch = []
    for patient, size in chunk:
        template = _worker_templates[patient % len(_worker_templates)]
        batch += [_clone(resource, patient) for resource in template[:size]]
    recorder = _RecordingConnection()
    ResourceRepository(recorder).write(batch, now=datetime.now(UTC))  # type: ignore[arg-type]
    tables: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = {}
    for name, rows in recorder.inserted:
        columns = list(rows[0])
        found = tables.setdefault(name, (columns, []))
        found[1].extend(tuple(row[c] for c in columns) for row in rows)
    return zlib.compress(pickle.dumps(tables, protocol=pickle.HIGHEST_PROTOCOL), 1)


def _chunks(plan: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    current: list[tuple[int, int]] = []
    size = 0
    for item in plan:
        current.append(item)
        size += item[1]
        if size >= CHUNK:
            yield current
            current, size = [], 0
    if current:
        yield current


def _generate(path: Path, plan: list[tuple[int, int]]) -> None:
    """Every batch's rows into `path`, length-prefixed, generated on every core."""
    processes = os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    with (
        path.open("wb") as out,
        context.Pool(processes, initializer=_init_worker) as pool,
    ):
        for blob in pool.imap(_generate_chunk, _chunks(plan)):
            out.write(len(blob).to_bytes(8, "big"))
            out.write(blob)


def _batches(path: Path) -> Iterator[dict[str, tuple[list[str], list[tuple[Any, ...]]]]]:
    with path.open("rb") as source:
        while head := source.read(8):
            tables: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = pickle.loads(
                zlib.decompress(source.read(int.from_bytes(head, "big")))
            )
            yield tables


# --- loading ------------------------------------------------------------------------------------


def _load(database_url: str, rows_file: Path) -> float:
    """Migrate, then bulk-load the generated rows; the seconds it took.

    The loaded tables' secondary indexes are dropped first and built again from the same
    definitions once the rows are in (sorting once beats a million random B-tree inserts).
    """
    started = time.perf_counter()
    database = Database(database_url)
    try:
        database.migrate()
        dialect = database.engine.dialect
        indexes = [index for table in metadata.sorted_tables for index in table.indexes]
        raw = database.engine.raw_connection()
        try:
            driver: Any = raw.driver_connection
            postgres = database.backend == "postgresql"
            if not postgres:
                driver.execute("PRAGMA cache_size=-1000000")
                driver.execute("BEGIN")
            names = {table.name for table in metadata.sorted_tables}
            for index in indexes:
                if index.table is not None and index.table.name in names:
                    driver.execute(str(DropIndex(index).compile(dialect=dialect)))
            (_copy_postgres if postgres else _insert_sqlite)(driver, rows_file, dialect)
            for index in indexes:
                driver.execute(str(CreateIndex(index).compile(dialect=dialect)))
            driver.commit() if postgres else driver.execute("COMMIT")
            if postgres:
                driver.autocommit = True
                driver.execute("VACUUM ANALYZE")
        finally:
            raw.close()
    finally:
        database.dispose()
    return time.perf_counter() - started


def _copy_postgres(driver: Any, rows_file: Path, _dialect: Dialect) -> None:
    with driver.cursor() as cursor:
        for tables in _batches(rows_file):
            for name, (columns, rows) in tables.items():
                with cursor.copy(f"COPY {name} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)


def _insert_sqlite(driver: Any, rows_file: Path, dialect: Dialect) -> None:
    """Batched INSERTs, each value bound the way SQLAlchemy binds it (UtcDateTime: naive UTC)."""
    loaded = 0
    for tables in _batches(rows_file):
        for name, (columns, rows) in tables.items():
            table = metadata.tables[name]
            processors = [table.c[column].type.bind_processor(dialect) for column in columns]
            if any(processors):
                rows = [
                    tuple(v if f is None else f(v) for f, v in zip(processors, row, strict=True))
                    for row in rows
                ]
            marks = ", ".join("?" for _ in columns)
            sql = f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({marks})"
            driver.executemany(sql, rows)
        loaded += len(tables["resources"][1])
        if loaded >= COMMIT_EVERY:
            driver.execute("COMMIT")
            driver.execute("BEGIN")
            loaded = 0


# --- the queries and the ceiling ----------------------------------------------------------------


def _queries(templates: list[list[dict[str, Any]]], plan: list[tuple[int, int]]) -> list[str]:
    """QUERIES search URLs: a stored patient, one of its codes, a date within its timeline."""
    chooser = random.Random(11)
    paths = []
    for _ in range(QUERIES):
        patient, size = plan[chooser.randrange(len(plan))]
        stored = templates[patient % len(templates)][:size]
        observation = chooser.choice(stored)
        code = observation["code"]["coding"][0]
        dates = sorted(o["effectiveDateTime"][:10] for o in stored)
        since = _shifted(dates[chooser.randrange(len(dates))], _shift(patient))
        params = [
            ("patient", _patient_id(patient)),
            ("code", f"{code['system']}|{code['code']}"),
            ("date", f"ge{since}"),
        ]
        paths.append(f"/fhir/Observation?{urlencode(params)}")
    return paths


_ceiling: dict[str, bytes] = {}


@contextlib.asynccontextmanager
async def _load_ceiling(_app: Starlette) -> AsyncIterator[None]:
    with Path(os.environ[CEILING_ENV]).open("rb") as lines:
        for line in lines:
            item = json.loads(line)
            _ceiling[item["path"]] = item["body"].encode()
    yield


async def _ceiling_search(request: Request) -> Response:
    body = _ceiling.get(f"{request.url.path}?{request.url.query}")
    if body is None:
        return Response(b'{"resourceType":"OperationOutcome"}', 404, media_type=FHIR_JSON)
    return Response(body, media_type=FHIR_JSON)


ceiling_app = Starlette(
    routes=[Route("/fhir/{resource_type}", _ceiling_search)], lifespan=_load_ceiling
)


def _bench_store(
    database_url: str, rows_file: Path, paths: list[str], folder: Path
) -> tuple[float, int, list[tuple[int, dict[str, Any], dict[str, Any]]]]:
    loading = _load(database_url, rows_file)
    # Token checks and the per-client rate limit are off (loopback only): this measures
    # search, not authentication or throttling of one client.
    env = _environment(database_url) | {"AUTH_DISABLED": "true", "RATE_LIMIT_PER_MINUTE": "0"}
    paths_file = folder / "paths.txt"
    paths_file.write_text("".join(path + "\n" for path in paths))
    facade_port, ceiling_port = _free_port(), _free_port()
    facade = f"http://127.0.0.1:{facade_port}"
    ceiling = f"http://127.0.0.1:{ceiling_port}"
    serve = [_cli(), "serve", "--port", str(facade_port)]
    matched = 0
    with _process(serve, env, facade + "/readyz", folder / "facade.log"):
        responses = folder / "responses.ndjson"
        with httpx.Client(base_url=facade, timeout=30) as client, responses.open("w") as out:
            for path in paths:
                response = client.get(path, headers={"Accept": "application/fhir+json"})
                assert response.status_code == 200, (path, response.status_code, response.text)
                bundle = response.json()
                assert "OperationOutcome" not in response.text, (path, response.text[:500])
                matched += len(bundle.get("entry", []))
                out.write(json.dumps({"path": path, "body": response.text}) + "\n")
        uvicorn = [sys.executable, "-m", "uvicorn", "bench.fhir_search:ceiling_app"]
        uvicorn += ["--port", str(ceiling_port), "--workers", "1", "--log-level", UVICORN_LOG_LEVEL]
        ceiling_env = env | {CEILING_ENV: str(responses)}
        with _process(uvicorn, ceiling_env, ceiling + paths[0], folder / "ceiling.log"):
            with httpx.Client(base_url=ceiling, timeout=10) as client:
                for path in paths[:50]:
                    assert client.get(path).status_code == 200, path
            levels = [
                (
                    connections,
                    _measure(facade, paths_file, folder, connections),
                    _measure(ceiling, paths_file, folder, connections),
                )
                for connections in SEARCH_CONNECTIONS
            ]
    return loading, matched, levels


def main() -> None:
    generator = "wrk, 1 thread" if LOADGEN == "wrk" else "asyncio load generator, 1 process"
    print(
        f"\nfhir search: GET /fhir/Observation?patient=..&code=..&date=ge.. ({QUERIES} queries), "
        f"{OBSERVATIONS:,} Observations stored\n"
        f"{', '.join(map(str, SEARCH_CONNECTIONS))} keep-alive connections "
        f"({generator}), {SECONDS:g} s after a {WARMUP:g} s warm-up\neach server: uvicorn, "
        f"1 worker, log level {UVICORN_LOG_LEVEL}; ratio = facade / ceiling; target p95 < 50 ms"
    )
    templates = _templates()
    plan = _plan(templates)
    paths = _queries(templates, plan)
    results: list[tuple[str, float, int, list[tuple[int, dict[str, Any], dict[str, Any]]]]] = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        rows_file = folder / "rows.bin"
        started = time.perf_counter()
        _generate(rows_file, plan)
        print(
            f"generated {OBSERVATIONS:,} Observations ({len(plan):,} patients) and the rows "
            f"ResourceRepository.write makes of them in {time.perf_counter() - started:.0f} s "
            f"({os.cpu_count()} processes, {rows_file.stat().st_size / 1e6:,.0f} MB compressed)"
        )
        sqlite = folder / "sqlite"
        sqlite.mkdir()
        url = f"sqlite:///{sqlite / 'search.db'}"
        results.append(
            ("SQLite (WAL, synchronous=FULL)", *_bench_store(url, rows_file, paths, sqlite))
        )
        for item in sqlite.iterdir():
            item.unlink()
        with postgres_schema() as postgres_url:
            if postgres_url is not None:
                postgres = folder / "postgres"
                postgres.mkdir()
                results.append(
                    ("PostgreSQL", *_bench_store(postgres_url, rows_file, paths, postgres))
                )
    print(
        f"{'store':<32} {'conns':>5} {'server':<32} {'req/s':>8} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'ratio':>6} {'p95<50ms':>8}"
    )
    for store, _loading, _matched, levels in results:
        for connections, measured, baseline in levels:
            ratio = _rate(measured) / _rate(baseline)
            met = "yes" if measured["p95"] < 0.050 else "NO"
            for label, server, result, shown, target in (
                (store, "facade (infusion-bridge serve)", measured, ratio, met),
                ("", "ceiling: bare Starlette, memory", baseline, 1.0, ""),
            ):
                print(
                    f"{label:<32} {connections:>5} {server:<32} {_rate(result):>8,.0f} "
                    f"{result['p50'] * 1000:>7.1f} {result['p95'] * 1000:>7.1f} {shown:>6.2f} "
                    f"{target:>8}"
                )
            store = ""
    for store, loading, matched, _levels in results:
        print(
            f"{store}: loaded in {loading:.0f} s (migrate, bulk load, indexes); "
            f"{matched / QUERIES:.1f} matches per query on average"
        )


if __name__ == "__main__":
    main()
