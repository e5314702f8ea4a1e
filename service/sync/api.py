"""The sync admin API under `/api/v1/sync/`, Subscription notifications, and `/metrics`.

Routes parse, call one function of `service.sync.ledger` or `service.sync.care_plans` in a unit
of work, and shape the answer. Nothing here talks to an EHR: a notification that reveals a gap
marks a catch-up poll as due, which the worker runs.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.responses import JSONResponse, Response

from service.bootstrap import Services
from service.sync import ledger as store
from service.sync.care_plans import CarePlanSync, NotificationError
from service.sync.destinations import Destination


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _now() -> datetime:
    return datetime.now(UTC)


def _destination(services: Services, name: str) -> Destination:
    for destination in services.destinations:
        if destination.name == name:
            return destination
    raise HTTPException(404, f"no destination named {name!r}")


class SyncCollector(Collector):
    """Delivery gauges and the write-to-arrival latency histogram, read from the database."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterator[Any]:
        services = self._services
        with services.database.unit_of_work(write=False) as uow:
            rows = store.status(uow.connection, services.destinations, now=_now())
            latency = store.latency_histogram(uow.connection)
        gauges = {
            "queue_depth": ("infusion_bridge_delivery_queue_depth", "Changes waiting"),
            "oldest_pending_age_seconds": (
                "infusion_bridge_delivery_oldest_pending_age_seconds",
                "Age of the oldest waiting change",
            ),
            "delivered": ("infusion_bridge_delivered", "Changes the EHR accepted"),
            "dead_letters": ("infusion_bridge_delivery_dead_letters", "Dead letters"),
            "retrying": ("infusion_bridge_delivery_retrying", "Waiting changes that failed"),
            "open_conflicts": ("infusion_bridge_sync_open_conflicts", "Open care-plan conflicts"),
        }
        for field, (name, documentation) in gauges.items():
            family = GaugeMetricFamily(name, documentation, labels=["destination"])
            for row in rows:
                family.add_metric([row["destination"]], float(row[field] or 0))
            yield family
        success = GaugeMetricFamily(
            "infusion_bridge_delivery_last_success_timestamp_seconds",
            "When the EHR last accepted a change",
            labels=["destination"],
        )
        for row in rows:
            if row["last_success_at"]:
                when = datetime.fromisoformat(row["last_success_at"]).timestamp()
                success.add_metric([row["destination"]], when)
        yield success
        histogram = HistogramMetricFamily(
            "infusion_bridge_delivery_latency_seconds",
            "From the record write to the EHR's acceptance",
            labels=["destination"],
        )
        for name, (cumulative, count, total_ms) in latency.items():
            buckets = [
                (str(bound / 1000), float(value))
                for bound, value in zip(store.LATENCY_BUCKETS_MS, cumulative, strict=True)
            ]
            buckets.append(("+Inf", float(count)))
            histogram.add_metric([name], buckets, total_ms / 1000)
        yield histogram


def build_sync_router(services: Services) -> APIRouter:
    """The routes; reading `services.destinations` here makes a bad destinations file fail fast."""
    _ = services.destinations
    router = APIRouter(tags=["sync"])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SyncCollector(services))
    care_plans = CarePlanSync(database=services.database, materializer=services.materializer)

    @router.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
    async def metrics() -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/api/v1/sync/status", summary="Delivery and sync per destination")
    async def sync_status(services: ServicesDep) -> JSONResponse:
        def read() -> list[dict[str, Any]]:
            with services.database.unit_of_work(write=False) as uow:
                return store.status(uow.connection, services.destinations, now=_now())

        return JSONResponse({"destinations": await run_in_threadpool(read)})

    @router.get("/api/v1/sync/dead-letters", summary="Changes an EHR refused for good")
    async def dead_letters(
        services: ServicesDep,
        destination: Annotated[str | None, Query()] = None,
        after: Annotated[int, Query(ge=0, description="List after this id.")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> JSONResponse:
        def read() -> list[dict[str, Any]]:
            with services.database.unit_of_work(write=False) as uow:
                return store.dead_letters(
                    uow.connection, destination=destination, after=after, limit=limit
                )

        items = await run_in_threadpool(read)
        return JSONResponse({"items": items, "next_after": items[-1]["id"] if items else None})

    async def _act(services: Services, delivery_id: int, action: str) -> JSONResponse:
        def run() -> dict[str, Any] | None:
            with services.database.unit_of_work(write=True) as uow:
                found = store.act_on_dead_letter(uow.connection, delivery_id, action, now=_now())
                uow.commit()
                return found

        found = await run_in_threadpool(run)
        if found is None:
            raise HTTPException(404, f"no dead letter {delivery_id}")
        return JSONResponse(found)

    @router.post("/api/v1/sync/dead-letters/{delivery_id}/retry", summary="Deliver it again")
    async def retry(delivery_id: int, services: ServicesDep) -> JSONResponse:
        return await _act(services, delivery_id, "retry")

    @router.post("/api/v1/sync/dead-letters/{delivery_id}/skip", summary="Give it up")
    async def skip(delivery_id: int, services: ServicesDep) -> JSONResponse:
        return await _act(services, delivery_id, "skip")

    @router.get("/api/v1/sync/conflicts", summary="Care-plan fields changed on both sides")
    async def list_conflicts(
        services: ServicesDep,
        status: Annotated[str | None, Query(pattern="^(open|resolved|all)$")] = "open",
        after: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> JSONResponse:
        def read() -> list[dict[str, Any]]:
            with services.database.unit_of_work(write=False) as uow:
                return store.conflicts(
                    uow.connection,
                    state=None if status == "all" else status,
                    after=after,
                    limit=limit,
                )

        items = await run_in_threadpool(read)
        return JSONResponse({"items": items, "next_after": items[-1]["id"] if items else None})

    @router.post("/api/v1/sync/conflicts/{conflict_id}/resolve", summary="Mark it resolved")
    async def resolve(conflict_id: int, services: ServicesDep) -> JSONResponse:
        def run() -> bool:
            with services.database.unit_of_work(write=True) as uow:
                done = store.resolve_conflict_audited(uow.connection, conflict_id, now=_now())
                uow.commit()
                return done

        if not await run_in_threadpool(run):
            raise HTTPException(404, f"no open conflict {conflict_id}")
        return JSONResponse({"id": conflict_id, "status": "resolved"})

    @router.post(
        "/api/v1/sync/notifications/{destination}",
        summary="FHIR Subscription notifications (R4 Subscriptions Backport)",
    )
    async def notification(destination: str, request: Request) -> JSONResponse:
        target = _destination(services, destination)
        config = target.care_plan_sync
        if config is None:
            raise HTTPException(404, f"{destination} has no care-plan sync")
        if config.notification_token is not None:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {config.notification_token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                raise HTTPException(401, "the notification's Authorization is wrong")
        try:
            bundle = orjson.loads(await request.body())
            result = await run_in_threadpool(care_plans.notify, target, bundle)
        except (orjson.JSONDecodeError, NotificationError) as error:
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "invalid", "diagnostics": str(error)}],
            }
            return JSONResponse(outcome, status_code=400, media_type="application/fhir+json")
        return JSONResponse(result)

    return router
