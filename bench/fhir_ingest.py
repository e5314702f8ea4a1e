"""Transaction ingest through the facade, in resources/s, beside the bare bulk writes (ceiling).

Measured: `POST /fhir` transaction Bundles of about BENCH_INGEST_ENTRIES (default 200) entries
each: infusion sessions as an EHR would send them, an Encounter with its vital-sign and score
Observations, MedicationAdministration and AdverseEvents, every entry a POST with an
`urn:uuid:` fullUrl that the others reference (cloned from the demo clinic's resources, with the
sending system's identifiers). BENCH_INGEST_BUNDLES (default 40) Bundles are posted by a separate
process over BENCH_INGEST_CONNECTIONS (default 4) concurrent keep-alive connections to
`infusion-bridge serve` (uvicorn, with BENCH_INGEST_WORKERS, default 1 then 2, worker
processes, a fresh store each); resources/s is entries committed over the wall
time, with p50/p95 per Bundle. The issue's target is at least 2,000 resources/s into PostgreSQL.

Baseline, in the same run on a fresh database of the same kind: the rows the store writes for the
same resources (resources, resource_versions, outbox and search-index rows, as
`ResourceRepository.write` makes them) written with one bulk write per table as the store writes
them (`insert_values`: COPY on PostgreSQL, a prepared INSERT's executemany on SQLite), one
transaction per Bundle, one connection: what the SQL alone costs, with no HTTP, parsing,
validation, index extraction, reference rewriting or audit.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.fhir_read import ROOT, UVICORN_LOG_LEVEL, _cli, _environment, _free_port, _process
from bench.fhir_search import AS_OF, TEMPLATE_PATIENTS, _RecordingConnection
from bench.postgres import postgres_schema
from mappings.bundle import map_records
from service.bootstrap import mapping_context
from service.config import Settings
from service.fhir.errors import FHIR_JSON
from service.records.demo import generate_clinic
from service.store.db import Database
from service.store.resources import ResourceRepository, insert_values
from service.store.tables import metadata

ENTRIES = int(os.environ.get("BENCH_INGEST_ENTRIES", "200"))
BUNDLES = int(os.environ.get("BENCH_INGEST_BUNDLES", "40"))
CONNECTIONS = int(os.environ.get("BENCH_INGEST_CONNECTIONS", "4"))
WORKERS = tuple(int(n) for n in os.environ.get("BENCH_INGEST_WORKERS", "1,2").split(","))
"""uvicorn worker processes of the facade, each count measured on a fresh store."""
TYPES = ("Encounter", "Observation", "MedicationAdministration", "AdverseEvent")
SENDER = "http://ehr.example.org/fhir/sid/"
"""The sending system's identifier namespace (the site's own is the service's records')."""
TARGET = 2000.0


def _sessions() -> list[list[dict[str, Any]]]:
    """The demo clinic's sessions: each Encounter with the resources in its context."""
    records = generate_clinic(seed=7, patients=TEMPLATE_PATIENTS, as_of=AS_OF)
    resources = list(map_records(records, context=mapping_context(Settings())))
    sessions: dict[str, list[dict[str, Any]]] = {}
    for resource in resources:
        if resource["resourceType"] == "Encounter":
            sessions[f"Encounter/{resource['id']}"] = [resource]
    for resource in resources:
        if resource["resourceType"] in TYPES[1:]:
            context = resource.get("encounter") or resource.get("context") or {}
            found = sessions.get(context.get("reference", ""))
            if found is not None:
                found.append(resource)
    return [group for group in sessions.values() if len(group) > 1]


def _entry(resource: dict[str, Any], full_urls: dict[str, str]) -> dict[str, Any]:
    text = orjson.dumps(resource).decode()
    for reference, full_url in full_urls.items():
        text = text.replace(f'"reference":"{reference}"', f'"reference":"{full_url}"')
    body: dict[str, Any] = orjson.loads(text)
    key = f"{body['resourceType']}/{body.pop('id')}"
    identifiers = body.get("identifier", [])
    for identifier in identifiers if isinstance(identifiers, list) else [identifiers]:
        identifier["system"] = SENDER + identifier["system"].rsplit("/", 1)[-1]
    return {
        "fullUrl": full_urls[key],
        "resource": body,
        "request": {"method": "POST", "url": body["resourceType"]},
    }


def _bundles() -> list[bytes]:
    """BUNDLES transaction Bundles of about ENTRIES entries, consecutive demo sessions each."""
    sessions = _sessions()
    bundles: list[bytes] = []
    index = 0
    while len(bundles) < BUNDLES:
        group: list[dict[str, Any]] = []
        while len(group) < ENTRIES:
            group += sessions[index % len(sessions)]
            index += 1
        group = group[:ENTRIES]
        full_urls = {f"{r['resourceType']}/{r['id']}": f"urn:uuid:{uuid.uuid4()}" for r in group}
        entries = [_entry(resource, full_urls) for resource in group]
        bundles.append(
            orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})
        )
    return bundles


# --- the load generator (a separate process) ----------------------------------------------------


async def _post_all(url: str, bundles: list[bytes], connections: int) -> dict[str, Any]:
    """Every Bundle POSTed once over `connections` keep-alive connections.

    HTTP/1.1 written by hand over asyncio streams, as `bench.fhir_read`'s generator does, so
    the generator's own CPU (about 3 µs per resource) leaves the two cores to the server.
    """
    target = httpx.URL(url)
    host, port = target.host, target.port or 80
    head = (
        f"POST /fhir HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {FHIR_JSON}\r\n"
        f"Accept: {FHIR_JSON}\r\nPrefer: return=minimal\r\n"
    )
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for bundle in bundles:
        queue.put_nowait(f"{head}Content-Length: {len(bundle)}\r\n\r\n".encode() + bundle)
    latencies: list[float] = []
    failures: list[str] = []
    length_header = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 24)
        try:
            while not queue.empty():
                request = queue.get_nowait()
                started = time.perf_counter()
                writer.write(request)
                response = await reader.readuntil(b"\r\n\r\n")
                length = length_header.search(response)
                if length is None:
                    raise RuntimeError(f"a response without Content-Length: {response[:500]!r}")
                body = await reader.readexactly(int(length[1]))
                latencies.append(time.perf_counter() - started)
                if response[9:12] != b"200":
                    failures.append(f"{response[9:12].decode()}: {body[:500].decode()}")
        finally:
            writer.close()

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(connections)))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    latencies.sort()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "p50": latencies[len(latencies) // 2],
        "p95": latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))],
        "failures": failures[:3],
        "failed": len(failures),
    }


def _load_process(url: str, folder: Path, bundles: list[bytes]) -> dict[str, Any]:
    files = []
    for number, bundle in enumerate(bundles):
        path = folder / f"bundle-{number}.json"
        path.write_bytes(bundle)
        files.append(str(path))
    listing = folder / "bundles.txt"
    listing.write_text("\n".join(files))
    command = [sys.executable, "-m", "bench.fhir_ingest", "post", url, str(listing)]
    command.append(str(CONNECTIONS))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"ingest load generator failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["failed"]:
        raise RuntimeError(f"{result['failed']} Bundles failed: {result['failures']}")
    return result


# --- the ceiling: the same rows, bare bulk writes ---------------------------------------------


def _rows(bundles: list[bytes]) -> list[list[tuple[str, list[dict[str, Any]]]]]:
    """Per Bundle, what `ResourceRepository.write` inserts for its resources (ids assigned)."""
    out = []
    now = datetime.now(UTC)
    for bundle in bundles:
        entries = orjson.loads(bundle)["entry"]
        ids = {e["fullUrl"]: f"{e['resource']['resourceType']}/{uuid.uuid4()}" for e in entries}
        text = bundle.decode()
        for full_url, key in ids.items():  # the references rewritten, as the facade does
            text = text.replace(f'"{full_url}"', f'"{key}"')
        resources = []
        for entry in orjson.loads(text)["entry"]:
            resource = entry["resource"] | {"id": entry["fullUrl"].split("/")[1]}
            resources.append({"resourceType": resource["resourceType"], **resource})
        recorder = _RecordingConnection()
        ResourceRepository(recorder).write(resources, now=now)  # type: ignore[arg-type]
        out.append(recorder.inserted)
    return out


def _ceiling(database_url: str, rows: list[list[tuple[str, list[dict[str, Any]]]]]) -> float:
    """Seconds to write every Bundle's rows, one transaction and one bulk write per table each,
    the way the store writes them (`insert_values`: COPY on PostgreSQL, a prepared INSERT's
    executemany on SQLite): the fastest this store knows for these rows."""
    database = Database(database_url)
    try:
        database.migrate()
        tables = {table.name: table for table in metadata.sorted_tables}
        bundles = [
            [
                (tables[name], tuple(values[0]), [tuple(v.values()) for v in values])
                for name, values in bundle
            ]
            for bundle in rows
        ]
        started = time.perf_counter()
        for bundle in bundles:
            with database.unit_of_work() as uow:
                for table, columns, tuples in bundle:
                    insert_values(uow.connection, table, columns, tuples)
                uow.commit()
        return time.perf_counter() - started
    finally:
        database.dispose()


# --- running ------------------------------------------------------------------------------------


def _migrate(env: dict[str, str]) -> None:
    done = subprocess.run([_cli(), "migrate"], env=env, cwd=ROOT, capture_output=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"infusion-bridge migrate failed: {done.stderr.decode()}")


def _bench_store(
    facade_url: str, bundles: list[bytes], folder: Path, workers: int
) -> dict[str, Any]:
    # Token checks and the per-client rate limit are off (loopback only): this measures
    # ingest, not authentication or throttling of one client.
    env = _environment(facade_url) | {"AUTH_DISABLED": "true", "RATE_LIMIT_PER_MINUTE": "0"}
    _migrate(env)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    serve = [_cli(), "serve", "--port", str(port), "--workers", str(workers)]
    with _process(serve, env, base + "/readyz", folder / f"facade-{workers}.log"):
        # One Bundle first, checked: every entry created.
        response = httpx.post(
            base + "/fhir", content=bundles[0], headers={"Content-Type": FHIR_JSON}, timeout=300
        )
        assert response.status_code == 200, response.text[:2000]
        statuses = {entry["response"]["status"] for entry in response.json()["entry"]}
        assert statuses == {"201 Created"}, statuses
        return _load_process(base, folder, bundles)


def main() -> None:
    bundles = _bundles()
    total = BUNDLES * ENTRIES
    print(
        f"\nfhir ingest: POST /fhir transaction Bundles, {BUNDLES} of {ENTRIES} entries "
        f"({', '.join(TYPES)}; urn:uuid references)\n{CONNECTIONS} concurrent connections "
        f"(asyncio streams, 1 process); facade: uvicorn, {' and '.join(map(str, WORKERS))} worker "
        f"processes, log level {UVICORN_LOG_LEVEL}, a fresh store each\n"
        "ceiling: the same rows written as the store writes them in bulk (COPY on PostgreSQL), "
        "one transaction per Bundle, one connection; "
        f"ratio = facade / ceiling; target {TARGET:,.0f} resources/s into PostgreSQL"
    )
    rows = _rows(bundles)
    results: list[tuple[str, list[tuple[int, dict[str, Any]]], float]] = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        levels = [
            (n, _bench_store(f"sqlite:///{folder / f'facade-{n}.db'}", bundles, folder, n))
            for n in WORKERS
        ]
        ceiling = _ceiling(f"sqlite:///{folder / 'ceiling.db'}", rows)
        results.append(("SQLite (WAL, synchronous=FULL)", levels, ceiling))
    with postgres_schema() as ceiling_url, tempfile.TemporaryDirectory() as name:
        if ceiling_url is not None:
            levels = []
            for n in WORKERS:
                with postgres_schema() as facade_url:
                    assert facade_url is not None
                    levels.append((n, _bench_store(facade_url, bundles, Path(name), n)))
            results.append(("PostgreSQL", levels, _ceiling(ceiling_url, rows)))
    print(
        f"{'store':<32} {'path':<40} {'resources/s':>12} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'ratio':>6} {'target':>7}"
    )
    for store, levels, ceiling_seconds in results:
        ceiling_rate = total / ceiling_seconds
        for workers, measured in levels:
            rate = total / measured["seconds"]
            met = ("yes" if rate >= TARGET else "NO") if store == "PostgreSQL" else ""
            path = f"facade, {workers} worker{'s' if workers > 1 else ''}"
            print(
                f"{store:<32} {path:<40} {rate:>12,.0f} "
                f"{measured['p50'] * 1000:>8.0f} {measured['p95'] * 1000:>8.0f} "
                f"{rate / ceiling_rate:>6.2f} {met:>7}"
            )
            store = ""
        print(
            f"{'':<32} {'ceiling: bulk writes, same rows':<40} {ceiling_rate:>12,.0f} "
            f"{'':>8} {'':>8} {1.0:>6.2f}"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["post"]:
        target, listing, connections = sys.argv[2:5]
        payloads = [Path(line).read_bytes() for line in Path(listing).read_text().split()]
        print(json.dumps(asyncio.run(_post_all(target, payloads, int(connections)))))
    else:
        main()
