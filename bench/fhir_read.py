"""FHIR read-by-id throughput of the facade over HTTP, beside a bare Starlette endpoint (ceiling).

Measured: `GET /fhir/{type}/{id}` on `infusion-bridge serve` (uvicorn, one worker) cycling through
~200 resource ids of every stored type from a 20-patient demo clinic, under concurrent keep-alive
load from a separate process: `wrk` when it is installed, otherwise this module's own asyncio load
generator (raw HTTP/1.1 on asyncio streams: an HTTP client library costs more per request than the
ceiling server does, and would measure itself). Requests/s and p50/p95 latency over a fixed
window after a warm-up. Every request carries the demo client's bearer token (`clients demo`);
the per-client rate limit is off. The facade runs as shipped (the token checked and an
AuditEvent written for every read by the group commit that follows it), then with each read
waiting for its AuditEvent's commit, then with reads not audited, then with auth off too: the
last is what the read path itself costs.

Baseline, in the same run: `ceiling_app` below, a bare Starlette route run by the same uvicorn with
the same options (one worker, uvloop and httptools as uvicorn picks them, log level warning),
answering the same paths with the same stored bytes and headers from memory. No middleware, no
dependencies, no database: what Python HTTP costs here. It is measured right after each facade
(the load of a shared machine drifts); the ratio is facade / ceiling (the issue's target: at
least 0.3).

On SQLite (a temporary file) and PostgreSQL (a temporary schema of BENCH_DATABASE_URL; skipped with
the reason when unreachable). Every response is checked before the runs: the facade serves the
stored bytes, and the ceiling serves the facade's bytes and headers.

`audit_cpu()` measures, in-process, the CPU an audited read's AuditEvent costs: built as the
access middleware has it built, and stored by flushes of 1 to 200 events (one commit each).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.postgres import postgres_schema
from service.fhir.api import STORED_TYPES
from service.fhir.errors import FHIR_JSON
from service.store.tables import resources

ROOT = Path(__file__).resolve().parent.parent
PATIENTS = 20
AS_OF = "2026-11-23"
IDS = 200
CONNECTIONS = int(os.environ.get("BENCH_READ_CONNECTIONS", "32"))
SECONDS = 5.0
WARMUP = 1.0
LOADGEN = os.environ.get("BENCH_LOADGEN", "wrk" if shutil.which("wrk") else "python")
CEILING_ENV = "BENCH_CEILING_RESPONSES"
AUTHORIZATION_ENV = "BENCH_AUTHORIZATION"
"""The Authorization header every load generator sends (the ceiling ignores it)."""
COPIED_HEADERS = ("etag", "last-modified", "content-location")
UVICORN_LOG_LEVEL = "warning"


# The ceiling: a bare Starlette endpoint serving the same bytes from memory.

_ceiling: dict[str, tuple[bytes, dict[str, str]]] = {}


@contextlib.asynccontextmanager
async def _load_ceiling(_app: Starlette) -> AsyncIterator[None]:
    with Path(os.environ[CEILING_ENV]).open("rb") as lines:
        for line in lines:
            item = json.loads(line)
            _ceiling[item["path"]] = (item["body"].encode(), item["headers"])
    yield


async def _ceiling_read(request: Request) -> Response:
    found = _ceiling.get(request.url.path)
    if found is None:
        return Response(b'{"resourceType":"OperationOutcome"}', 404, media_type=FHIR_JSON)
    body, headers = found
    return Response(body, media_type=FHIR_JSON, headers=headers)


ceiling_app = Starlette(
    routes=[Route("/fhir/{resource_type}/{resource_id}", _ceiling_read)], lifespan=_load_ceiling
)


# Load generators, each run as a separate process.

WRK_SCRIPT = """
local paths = {}
for line in io.lines(os.getenv("BENCH_PATHS")) do paths[#paths + 1] = line end
wrk.headers["Accept"] = "application/fhir+json"
local authorization = os.getenv("BENCH_AUTHORIZATION")
if authorization and authorization ~= "" then wrk.headers["Authorization"] = authorization end
local requests, i = nil, 0
request = function()
  if requests == nil then
    requests = {}
    for k, path in ipairs(paths) do requests[k] = wrk.format("GET", path) end
  end
  i = i % #requests + 1
  return requests[i]
end
done = function(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    '\\n{"requests": %d, "seconds": %.6f, "p50": %.6f, "p95": %.6f, "errors": %d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e6,
    latency:percentile(95) / 1e6, e.connect + e.read + e.write + e.timeout + e.status))
end
"""


def _run_wrk(
    url: str, paths_file: Path, seconds: float, folder: Path, connections: int = CONNECTIONS
) -> dict[str, Any]:
    script = folder / "read.lua"
    script.write_text(WRK_SCRIPT)
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(
        command,
        env=os.environ | {"BENCH_PATHS": str(paths_file)},
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def _connection(
    host: str,
    port: int,
    requests: list[bytes],
    first: int,
    warm_until: float,
    stop_at: float,
    latencies: list[float],
    errors: list[int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    length_header = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
    index = first
    try:
        while time.perf_counter() < stop_at:
            request = requests[index % len(requests)]
            index += 1
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = length_header.search(head)
            await reader.readexactly(int(length[1]) if length else 0)
            if started >= warm_until:
                latencies.append(time.perf_counter() - started)
                if head[9:12] != b"200":
                    errors.append(1)
    finally:
        writer.close()


async def _python_load(
    url: str, paths: list[str], seconds: float, warmup: float, connections: int = CONNECTIONS
) -> dict[str, Any]:
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    authorization = os.environ.get(AUTHORIZATION_ENV)
    headers = f"Host: {host}:{port}\r\nAccept: application/fhir+json\r\n"
    headers += f"Authorization: {authorization}\r\n\r\n" if authorization else "\r\n"
    requests = [f"GET {path} HTTP/1.1\r\n{headers}".encode() for path in paths]
    latencies: list[float] = []
    errors: list[int] = []
    now = time.perf_counter()
    warm_until, stop_at = now + warmup, now + warmup + seconds
    step = max(1, len(paths) // connections)
    await asyncio.gather(
        *(
            _connection(host, port, requests, n * step, warm_until, stop_at, latencies, errors)
            for n in range(connections)
        )
    )
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": seconds,
        "p50": latencies[len(latencies) // 2],
        "p95": latencies[int(len(latencies) * 0.95)],
        "errors": len(errors),
    }


def _load_process(
    url: str, paths_file: Path, seconds: float, warmup: float, connections: int = CONNECTIONS
) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.fhir_read", "load", url, str(paths_file)]
    command += [str(seconds), str(warmup), str(connections)]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=seconds + warmup + 60
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _measure(
    url: str,
    paths_file: Path,
    folder: Path,
    connections: int = CONNECTIONS,
    seconds: float = SECONDS,
) -> dict[str, Any]:
    if LOADGEN == "wrk":
        _run_wrk(url, paths_file, WARMUP, folder, connections)
        result = _run_wrk(url, paths_file, seconds, folder, connections)
    else:
        result = _load_process(url, paths_file, seconds, WARMUP, connections)
    if result["errors"]:
        raise RuntimeError(f"{url}: {result['errors']} failed requests under load")
    return result


# Servers and data.


def _cli() -> str:
    beside = Path(sys.executable).parent / "infusion-bridge"
    found = str(beside) if beside.exists() else shutil.which("infusion-bridge")
    if found is None:
        raise RuntimeError("the infusion-bridge command is not installed (pip install -e .)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _environment(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "IMPORT_"))}
    return env | {"DATABASE_URL": database_url, "LOG_LEVEL": UVICORN_LOG_LEVEL.upper()}


@contextlib.contextmanager
def _process(command: list[str], env: dict[str, str], ready_url: str, log: Path) -> Iterator[None]:
    """A server process, started and waited for; always terminated on the way out."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=output
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command)} not ready in 60 s")
            time.sleep(0.1)
        yield
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _load_clinic(env: dict[str, str]) -> None:
    cli = _cli()
    for args in (["migrate"], ["demo", "--patients", str(PATIENTS), "--as-of", AS_OF]):
        done = subprocess.run([cli, *args], env=env, cwd=ROOT, capture_output=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"infusion-bridge {args[0]} failed: {done.stderr.decode()}")


@contextlib.contextmanager
def _demo_client(env: dict[str, str], folder: Path) -> Iterator[dict[str, str]]:
    """The demo client's bearer token, sent by the load generators (BENCH_AUTHORIZATION) too."""
    key = folder / "demo-client.pem"
    command = [_cli(), "clients", "demo", "--key", str(key)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=120)
    found = re.search(rb"export TOKEN=(\S+)", done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"infusion-bridge clients demo failed: {done.stderr.decode()}")
    authorization = f"Bearer {found[1].decode()}"
    os.environ[AUTHORIZATION_ENV] = authorization
    try:
        yield {"Accept": "application/fhir+json", "Authorization": authorization}
    finally:
        os.environ.pop(AUTHORIZATION_ENV, None)


def _targets(database_url: str) -> list[tuple[str, str]]:
    """~IDS (path, stored body) pairs, the resource types taken in turn."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(resources.c.resource_type, resources.c.id, resources.c.body)
                .where(resources.c.deleted.is_(False))
                .order_by(resources.c.resource_type, resources.c.id)
            ).all()
    finally:
        engine.dispose()
    by_type: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        path = f"/fhir/{row.resource_type}/{row.id}"
        by_type.setdefault(row.resource_type, []).append((path, row.body))
    chooser = random.Random(7)
    for items in by_type.values():
        chooser.shuffle(items)
    chosen: list[tuple[str, str]] = []
    while len(chosen) < IDS and any(by_type.values()):
        for items in by_type.values():
            if items and len(chosen) < IDS:
                chosen.append(items.pop())
    chooser.shuffle(chosen)
    return chosen


def _check(base: str, responses: Path, headers: dict[str, str]) -> None:
    """Every path answers 200 with the facade's bytes and headers."""
    with httpx.Client(base_url=base, timeout=10) as client, responses.open() as lines:
        for line in lines:
            item = json.loads(line)
            response = client.get(item["path"], headers=headers)
            assert response.status_code == 200, (base, item["path"], response.status_code)
            assert response.content == item["body"].encode(), f"{base}{item['path']}: other bytes"
            assert response.headers["content-type"] == FHIR_JSON
            for name, value in item["headers"].items():
                assert response.headers[name] == value, (base, item["path"], name)


def _record(
    facade: str, targets: list[tuple[str, str]], headers: dict[str, str], responses: Path
) -> None:
    """The facade serves the stored bytes; the ceiling will serve those and the same headers."""
    with httpx.Client(base_url=facade, timeout=10) as client, responses.open("w") as out:
        for path, body in targets:
            response = client.get(path, headers=headers)
            assert response.status_code == 200, (path, response.status_code)
            assert response.content == body.encode(), f"{path}: not the stored bytes"
            copied = {name: response.headers[name] for name in COPIED_HEADERS}
            out.write(json.dumps({"path": path, "body": body, "headers": copied}) + "\n")


FACADES = (
    ("facade: token, reads audited (async)", {}),
    ("facade: token, audit before answer", {"AUDIT_READS": "sync"}),
    ("facade: token, reads not audited", {"AUDIT_READS": "off"}),
    ("facade: auth off, not audited", {"AUTH_DISABLED": "true", "AUDIT_READS": "off"}),
)
"""The facade as shipped (a bearer token checked, an AuditEvent per read queued for the group
commit that follows), with each read waiting for its AuditEvent's commit (`AUDIT_READS=sync`),
and without those, to show what the read path itself costs."""
FACADES_ENV = "BENCH_READ_FACADES"
"""Which of `FACADES` to run, by position (`0,2`); all of them when unset."""


def _facades() -> tuple[tuple[str, dict[str, str]], ...]:
    chosen = os.environ.get(FACADES_ENV, "").strip()
    if not chosen:
        return FACADES
    return tuple(FACADES[int(index)] for index in chosen.split(","))


Row = tuple[str, dict[str, Any], dict[str, Any]]
"""(facade, its result, the ceiling's result measured right after it)"""


def _bench_store(database_url: str, folder: Path) -> list[Row]:
    # One client at full speed: its per-client rate limit would answer most requests 429.
    env = _environment(database_url) | {"RATE_LIMIT_PER_MINUTE": "0"}
    _load_clinic(env)
    targets = _targets(database_url)
    assert {path.split("/")[2] for path, _ in targets} == set(STORED_TYPES)
    paths_file = folder / "paths.txt"
    paths_file.write_text("".join(path + "\n" for path, _ in targets))
    facade_port, ceiling_port = _free_port(), _free_port()
    facade = f"http://127.0.0.1:{facade_port}"
    ceiling = f"http://127.0.0.1:{ceiling_port}"
    serve = [_cli(), "serve", "--port", str(facade_port)]
    uvicorn = [sys.executable, "-m", "uvicorn", "bench.fhir_read:ceiling_app"]
    uvicorn += ["--port", str(ceiling_port), "--workers", "1", "--log-level", UVICORN_LOG_LEVEL]
    responses = folder / "responses.ndjson"
    rows: list[Row] = []
    with contextlib.ExitStack() as servers:
        headers = servers.enter_context(_demo_client(env, folder))
        for label, settings in _facades():
            with _process(serve, env | settings, facade + "/readyz", folder / "facade.log"):
                _record(facade, targets, headers, responses)
                if not rows:
                    ceiling_env = env | {CEILING_ENV: str(responses)}
                    log = folder / "ceiling.log"
                    servers.enter_context(
                        _process(uvicorn, ceiling_env, ceiling + targets[0][0], log)
                    )
                    _check(ceiling, responses, headers)
                measured = _measure(facade, paths_file, folder)
            # The ceiling right after each facade: the machine's load drifts between runs.
            rows.append((label, measured, _measure(ceiling, paths_file, folder)))
    return rows


def main() -> None:
    generator = "wrk, 1 thread" if LOADGEN == "wrk" else "asyncio load generator, 1 process"
    print(
        f"\nfhir read: GET /fhir/{{type}}/{{id}} over {IDS} ids of all {len(STORED_TYPES)} stored "
        f"types ({PATIENTS}-patient demo clinic)\n{CONNECTIONS} keep-alive connections "
        f"({generator}), {SECONDS:g} s after a {WARMUP:g} s warm-up\neach server: uvicorn, "
        f"1 worker, log level {UVICORN_LOG_LEVEL}; ceiling: a bare Starlette route serving the "
        f"same bytes from memory,\nmeasured right after each facade; ratio = facade / ceiling"
    )
    results: list[tuple[str, list[Row]]] = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        url = f"sqlite:///{folder / 'bench.db'}"
        results.append(("SQLite (WAL, synchronous=FULL)", _bench_store(url, folder)))
    with postgres_schema() as postgres_url:
        if postgres_url is not None:
            with tempfile.TemporaryDirectory() as name:
                results.append(("PostgreSQL", _bench_store(postgres_url, Path(name))))
    print(
        f"{'store':<32} {'server':<34} {'req/s':>8} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'ceiling':>8} {'ratio':>6}"
    )
    for store, rows in results:
        for index, (server, result, baseline) in enumerate(rows):
            print(
                f"{store if index == 0 else '':<32} {server:<34} {_rate(result):>8,.0f} "
                f"{result['p50'] * 1000:>7.1f} {result['p95'] * 1000:>7.1f} "
                f"{_rate(baseline):>8,.0f} {_rate(result) / _rate(baseline):>6.2f}"
            )


def _rate(result: dict[str, Any]) -> float:
    return float(result["requests"]) / float(result["seconds"])


# The CPU of an audited read's AuditEvent, in-process.

AUDIT_TRAIL = 20_000
"""Events stored before measuring: the cost of an insert grows with the indexes it goes into."""
AUDIT_FLUSHES = (1, 10, 50, 200)


def audit_cpu() -> None:
    """CPU (this process's, not the database server's) per audited read: its AuditEvent built
    as the access middleware has it built (`AuditWriter.write`), then stored in flushes of
    1 to 200 events, each flush one commit, over a trail of 20,000 events; min of 5 repeats."""
    from datetime import UTC, datetime

    from service.security.audit import AuditRecord, _prepare, store_events
    from service.store.db import Database

    def record() -> AuditRecord:
        return AuditRecord(
            subtype="read",
            entities=[f"Observation/{uuid.uuid4()}"],
            patients=[str(uuid.uuid4())],
            client_id="demo",
            request_id=uuid.uuid4().hex,
            address="127.0.0.1",
        )

    def per_event(database: Database, flush: int, flushes: int) -> float:
        records = [[record() for _ in range(flush)] for _ in range(flushes)]
        started = time.process_time()
        for batch in records:
            events = [_prepare(item, now=datetime.now(UTC)) for item in batch]
            with database.unit_of_work(write=True) as uow:
                store_events(uow.connection, events, now=datetime.now(UTC))
                uow.commit()
        return (time.process_time() - started) / (flush * flushes)

    items = [record() for _ in range(2000)]
    built = []
    for _ in range(7):
        started = time.process_time()
        for item in items:
            _prepare(item, now=datetime.now(UTC))
        built.append((time.process_time() - started) / len(items))
    print(f"\naudited read: CPU per AuditEvent (this process), trail of {AUDIT_TRAIL:,} events")
    print(f"{'built (event, JSON, hash, index rows)':<44} {min(built) * 1e6:>8.1f} µs")
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        urls = [("SQLite", f"sqlite:///{folder / 'audit.db'}")]
        postgres_url = stack.enter_context(postgres_schema())
        if postgres_url is not None:
            urls.append(("PostgreSQL", postgres_url))
        for store, url in urls:
            database = Database(url)
            stack.callback(database.dispose)
            database.migrate()
            per_event(database, 1000, AUDIT_TRAIL // 1000)
            for flush in AUDIT_FLUSHES:
                flushes = max(3, 300 // flush)
                cost = min(per_event(database, flush, flushes) for _ in range(5))
                label = f"{store}: built and stored, flushes of {flush}"
                print(f"{label:<44} {cost * 1e6:>8.1f} µs")


if __name__ == "__main__":
    if sys.argv[1:2] == ["load"]:
        target, paths_file, seconds, warmup, connections = sys.argv[2:7]
        paths = Path(paths_file).read_text().split()
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            run = asyncio.run
        outcome = run(_python_load(target, paths, float(seconds), float(warmup), int(connections)))
        print(json.dumps(outcome))
    else:
        main()
