"""The `infusion-bridge` command: serve the API, migrate, load demo data, import records."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
import uvicorn

from mappings.bundle import map_records, transaction_bundle
from mappings.records import MissingContext
from service.bootstrap import Services, bootstrap, mapping_context, resource_validator
from service.config import Settings
from service.errors import InvalidRecord
from service.records.demo import generate_clinic, to_ndjson
from service.records.models import RecordModel
from service.records.repository import RecordRepository
from service.records.service import (
    ImportSummary,
    LineResult,
    LineStatus,
    import_ndjson,
    parse_record,
)
from service.security.cli import clients_app

app = typer.Typer(
    name="infusion-bridge",
    help="FHIR R4 interoperability service for ketamine infusion clinics.",
    no_args_is_help=True,
    add_completion=False,
)


app.add_typer(clients_app, name="clients")


def _services() -> Services:
    return bootstrap()


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or localhost), where auth may be turned off."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
) -> None:
    """Serve the intake API (and health checks) over HTTP."""
    services = _services()
    if services.settings.auth_disabled and not is_loopback(host):
        typer.secho(
            f"AUTH_DISABLED=true is refused on {host}: authentication may be off only for a "
            "server bound to a loopback address (--host 127.0.0.1).",
            fg=typer.colors.RED,
            err=True,
        )
        services.close()
        raise typer.Exit(2)
    applied, newest = services.database.migration_state()
    if applied != newest:
        typer.secho(
            "The database schema is not current: run `infusion-bridge migrate` first.",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
    with services.database.unit_of_work(write=False) as uow:
        count = RecordRepository(uow.connection).count()
    services.close()
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    auth = "" if services.settings.auth_disabled else ' -H "Authorization: Bearer $TOKEN"'
    typer.echo(
        f"\nInfusion Bridge is serving {count} records on {base}\n"
        + (
            "  authentication OFF (AUTH_DISABLED=true, loopback only)\n"
            if services.settings.auth_disabled
            else "  a token        export TOKEN=$(.venv/bin/infusion-bridge clients token demo "
            "--key var/demo-client-key.pem)\n"
        )
        + f"  API docs       {base}/docs\n"
        f"  a patient      curl{auth} '{base}/api/v1/patients?limit=5'\n"
        f"  FHIR           curl {base}/fhir/metadata\n"
        f"  FHIR search    curl{auth} '{base}/fhir/Observation?code=http://loinc.org|8867-4"
        "&_count=2'\n"
        f"  readiness      curl {base}/readyz\n"
    )
    uvicorn.run(
        "service.app:served_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=services.settings.log_level.lower(),
        access_log=False,  # its lines carry URLs (ids, queries); service.access logs each request
    )


@app.command()
def migrate() -> None:
    """Apply the database migrations to DATABASE_URL (safe to repeat)."""
    services = _services()
    services.database.migrate()
    applied, _ = services.database.migration_state()
    typer.echo(f"database at revision {', '.join(sorted(applied))} ({services.database.backend})")
    services.close()


def _report(batches: Iterable[list[LineResult]], summary: ImportSummary) -> None:
    for batch in batches:
        for result in batch:
            summary.add(result)
            if result.status is LineStatus.rejected:
                typer.echo(orjson.dumps(result.as_json()).decode(), err=True)


@app.command()
def demo(
    seed: Annotated[int, typer.Option(help="Same seed, same clinic.")] = 7,
    patients: Annotated[int, typer.Option(min=1, max=5000, help="Patients to generate.")] = 40,
    as_of: Annotated[
        str | None, typer.Option(help="The clinic's 'today' (YYYY-MM-DD); default today.")
    ] = None,
    export: Annotated[
        Path | None, typer.Option(help="Write the records as intake NDJSON here, not to the DB.")
    ] = None,
    if_empty: Annotated[
        bool, typer.Option("--if-empty", help="Load only into a database with no records.")
    ] = False,
) -> None:
    """Generate a realistic synthetic clinic and load it (or export it as NDJSON)."""
    today = date.fromisoformat(as_of) if as_of else date.today()
    records = generate_clinic(seed=seed, patients=patients, as_of=today)
    if export is not None:
        with export.open("wb") as out:
            for line in to_ndjson(records):
                out.write(line)
        typer.echo(f"wrote {len(records)} records to {export}")
        return
    services = _services()
    if if_empty:
        with services.database.unit_of_work(write=False) as uow:
            if RecordRepository(uow.connection).count() > 0:
                typer.echo("the database already has records: demo data not loaded")
                services.close()
                return
    summary = ImportSummary()
    _report(
        import_ndjson(
            database=services.database,
            materializer=services.materializer,
            lines=list(to_ndjson(records)),
            actor="demo",
            batch_size=services.settings.import_batch_size,
        ),
        summary,
    )
    services.close()
    counts = summary.as_json()
    typer.echo(
        f"demo clinic (seed {seed}, as of {today}): {counts['accepted']} records loaded, "
        f"{counts['created']} new, {counts['updated']} updated, {counts['rejected']} rejected"
    )
    if summary.rejected:
        raise typer.Exit(1)


@app.command("import")
def import_file(
    file: Annotated[Path, typer.Argument(help="Intake NDJSON, one record a line; - for stdin.")],
) -> None:
    """Import intake NDJSON into the database; rejected lines are printed with their errors."""
    lines = _read_lines(file)
    services = _services()
    summary = ImportSummary()
    _report(
        import_ndjson(
            database=services.database,
            materializer=services.materializer,
            lines=lines,
            actor="cli-import",
            batch_size=services.settings.import_batch_size,
        ),
        summary,
    )
    services.close()
    typer.echo(orjson.dumps(summary.as_json()).decode())
    if summary.rejected:
        raise typer.Exit(1)


def _read_lines(file: Path) -> list[bytes]:
    if str(file) == "-":
        return sys.stdin.buffer.read().splitlines()
    if not file.is_file():
        typer.secho(f"no such file: {file}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    return file.read_bytes().splitlines()


@app.command("map")
def map_file(
    file: Annotated[Path, typer.Argument(help="Intake NDJSON, one record a line; - for stdin.")],
    ndjson: Annotated[
        bool, typer.Option("--ndjson", help="One resource per line instead of a Bundle.")
    ] = False,
    base: Annotated[
        str | None, typer.Option(help="FHIR base URL for the Bundle entries' fullUrl.")
    ] = None,
) -> None:
    """Map intake records to FHIR R4 (a transaction Bundle on stdout); no database involved."""
    records: list[RecordModel] = []
    rejected = 0
    for number, raw in enumerate(_read_lines(file), start=1):
        if not raw.strip():
            continue
        try:
            records.append(parse_record(orjson.loads(raw)))
        except orjson.JSONDecodeError as error:
            rejected += 1
            typer.echo(f"line {number}: not valid JSON: {error}", err=True)
        except InvalidRecord as invalid:
            rejected += 1
            typer.echo(f"line {number}: {invalid}", err=True)
    if rejected:
        typer.secho(f"{rejected} invalid records: nothing mapped", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    context = mapping_context(Settings())
    try:
        resources = list(map_records(records, context=context))
    except MissingContext as missing:
        typer.secho(str(missing), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    out = sys.stdout.buffer
    if ndjson:
        for resource in resources:
            out.write(orjson.dumps(resource) + b"\n")
    else:
        bundle = transaction_bundle(resources, base=base)
        out.write(orjson.dumps(bundle, option=orjson.OPT_INDENT_2) + b"\n")
    out.flush()


def _resources_in(data: object) -> list[tuple[str, dict[str, Any]]]:
    """(location prefix, resource) for a resource, a Bundle's entries, or a list of resources."""
    if isinstance(data, list):
        return [(f"[{i}]", r) for i, r in enumerate(data) if isinstance(r, dict)]
    if isinstance(data, dict) and data.get("resourceType") == "Bundle":
        found = [
            (f"Bundle.entry[{i}].resource", e.get("resource"))
            for i, e in enumerate(data.get("entry", []))
        ]
        return [(where, r) for where, r in found if isinstance(r, dict)]
    return [("", data)] if isinstance(data, dict) else []


@app.command()
def validate(
    file: Annotated[
        Path, typer.Argument(help="A FHIR resource, a Bundle, or NDJSON resources; - for stdin.")
    ],
    profile: Annotated[
        str | None, typer.Option(help="Validate against this profile URL, not the claimed ones.")
    ] = None,
) -> None:
    """Validate FHIR R4 resources (structure, profiles, invariants); print an OperationOutcome."""
    lines = _read_lines(file)
    raw = b"\n".join(lines)
    try:
        documents: list[tuple[str, object]] = [("", orjson.loads(raw))]
    except orjson.JSONDecodeError:
        documents = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                documents.append((f"line {number}", orjson.loads(line)))
            except orjson.JSONDecodeError as error:
                typer.secho(
                    f"line {number}: not valid JSON: {error}", fg=typer.colors.RED, err=True
                )
                raise typer.Exit(2) from None
    validator = resource_validator(Settings())
    issues: list[dict[str, Any]] = []
    count = 0
    for prefix, document in documents:
        resources = _resources_in(document)
        if not resources:
            issues.append(
                {
                    "severity": "error",
                    "code": "structure",
                    "diagnostics": f"{prefix}not a FHIR resource",
                }
            )
        for where, resource in resources:
            count += 1
            for issue in validator.issues(resource, profile):
                label = ", ".join(part for part in (prefix, where) if part)
                if label:
                    issue = issue | {"diagnostics": f"{label}: {issue['diagnostics']}"}
                issues.append(issue)
    errors = [i for i in issues if i["severity"] in ("error", "fatal")]
    if not issues:
        issues = [
            {
                "severity": "information",
                "code": "informational",
                "diagnostics": f"{count} resources checked: no issues",
            }
        ]
    outcome = {"resourceType": "OperationOutcome", "issue": issues}
    sys.stdout.buffer.write(orjson.dumps(outcome, option=orjson.OPT_INDENT_2) + b"\n")
    if errors:
        raise typer.Exit(1)


# --- EHR delivery (service.sync) --------------------------------------------------------------


@app.command()
def worker(
    once: Annotated[
        bool, typer.Option("--once", help="One round over the destinations, then exit.")
    ] = False,
    destination: Annotated[
        list[str] | None, typer.Option(help="Only this destination (repeatable).")
    ] = None,
) -> None:
    """Deliver the outbox to the EHR destinations and pull care plans back (DESTINATIONS_FILE)."""
    import gc
    import signal
    import threading

    from service.bootstrap import delivery_worker
    from service.sync.destinations import DestinationsError

    services = _services()
    try:
        runner = delivery_worker(services, only=destination or ())
    except DestinationsError as error:
        typer.secho(str(error), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        if not runner.destinations:
            typer.echo("no destinations (DESTINATIONS_FILE): nothing to deliver", err=True)
            if not once:
                stop.wait()
        elif once:
            typer.echo(f"{runner.tick()} changes ended")
        else:
            typer.echo(f"worker {runner.worker_id}: {len(runner.destinations)} destination(s)")
            # As the served app does: what startup loaded stays out of the cyclic collector.
            gc.collect()
            gc.freeze()
            runner.run(stop)
    finally:
        runner.close()
        for client in runner.clients.values():
            client.close()
        services.close()


sync_app = typer.Typer(help="Delivery status, dead letters and care-plan pulls.")
app.add_typer(sync_app, name="sync")


def _echo_json(data: object) -> None:
    typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


@sync_app.command("status")
def sync_status(
    dead_letters: Annotated[bool, typer.Option("--dead-letters", help="List them too.")] = False,
) -> None:
    """Per destination: queue depth, oldest pending, last success, failures, dead letters."""
    from datetime import UTC, datetime

    from service.sync import ledger

    services = _services()
    with services.database.unit_of_work(write=False) as uow:
        data: dict[str, object] = {
            "destinations": ledger.status(
                uow.connection, services.destinations, now=datetime.now(UTC)
            )
        }
        if dead_letters:
            data["dead_letters"] = ledger.dead_letters(uow.connection, limit=1000)
    services.close()
    _echo_json(data)


def _dead_letter_action(delivery_id: int, action: str) -> None:
    from datetime import UTC, datetime

    from service.sync import ledger

    services = _services()
    with services.database.unit_of_work(write=True) as uow:
        done = ledger.act_on_dead_letter(
            uow.connection, delivery_id, action, now=datetime.now(UTC), actor="cli"
        )
        uow.commit()
    services.close()
    if not done:
        typer.secho(f"no dead letter {delivery_id}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"dead letter {delivery_id}: {'queued again' if action == 'retry' else 'skipped'}")


@sync_app.command("retry")
def sync_retry(delivery_id: Annotated[int, typer.Argument(help="The dead letter's id.")]) -> None:
    """Queue a dead letter again (it is delivered in its lane's order)."""
    _dead_letter_action(delivery_id, "retry")


@sync_app.command("skip")
def sync_skip(delivery_id: Annotated[int, typer.Argument(help="The dead letter's id.")]) -> None:
    """Give a dead letter up."""
    _dead_letter_action(delivery_id, "skip")


@sync_app.command("pull")
def sync_pull(name: Annotated[str, typer.Argument(help="The destination.")]) -> None:
    """Pull the destination's changed care plans now."""
    from service.bootstrap import ehr_clients
    from service.sync.care_plans import CarePlanSync

    services = _services()
    found = [d for d in services.destinations if d.name == name]
    if not found:
        typer.secho(f"no destination named {name!r}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    clients = ehr_clients(found)
    try:
        changed = CarePlanSync(database=services.database, materializer=services.materializer).poll(
            found[0], clients[name]
        )
    finally:
        clients[name].close()
        services.close()
    typer.echo(f"{changed} course(s) changed from {name}")


@app.command()
def destinations(
    check: Annotated[
        bool, typer.Option("--check", help="Read each EHR's CapabilityStatement now.")
    ] = False,
) -> None:
    """List the EHR destinations of DESTINATIONS_FILE and the strategy per resource type."""
    from service.bootstrap import ehr_clients
    from service.sync import ledger
    from service.sync.client import DeliveryError
    from service.sync.strategy import plan

    services = _services()
    with services.database.unit_of_work(write=False) as uow:
        states = {
            d.name: ledger.destination_state(uow.connection, d.name) for d in services.destinations
        }
    out = []
    for destination in services.destinations:
        state = states.get(destination.name)
        strategies: object = orjson.loads(state.strategies) if state and state.strategies else {}
        if check:
            client = ehr_clients([destination])[destination.name]
            try:
                strategies = plan(destination, client.capabilities()).as_json()
            except DeliveryError as error:
                strategies = {"error": error.message}
            finally:
                client.close()
        out.append(
            {
                "name": destination.name,
                "base_url": destination.base,
                "auth": destination.auth.type,
                "send": list(destination.send) or "all",
                "patients": destination.patients.model_dump(),
                "overrides": {k: v.value for k, v in destination.strategy.items()},
                "care_plan_sync": destination.care_plan_sync.model_dump()
                if destination.care_plan_sync
                else None,
                "rate_limit_per_second": destination.rate_limit_per_second,
                "strategies": strategies,
            }
        )
    services.close()
    _echo_json(out)


def main() -> None:
    app()
