"""The FastAPI application factory: intake API, FHIR facade, health checks, error handling."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware import Middleware
from pydantic import TypeAdapter
from starlette.responses import JSONResponse

from service import __doc__ as service_doc
from service.bootstrap import Services, bootstrap
from service.fhir.api import ConformanceResources
from service.fhir.api import build_router as build_fhir_router
from service.fhir.bundles import build_bundle_router
from service.fhir.capabilities import build_capability_router
from service.fhir.export import build_export_router
from service.fhir.profile_validation import default_profiles_dir
from service.fhir.reads import FastReads, build_read_routes
from service.fhir.writes import build_write_router
from service.problems import RequestIdMiddleware, install_error_handlers
from service.records.api import build_router
from service.records.models import RECORD_TYPES
from service.security.access import AccessMiddleware
from service.security.api import build_auth_router, smart_configuration
from service.sync.api import build_sync_router

VERSION = "0.1.0"


def served_app() -> FastAPI:
    """The app `infusion-bridge serve` runs in each worker process (uvicorn's factory)."""
    return create_app(freeze_startup_heap=True)


def create_app(services: Services | None = None, *, freeze_startup_heap: bool = False) -> FastAPI:
    """The ASGI app, built on `services` (from the environment's settings when not given).

    `freeze_startup_heap`, for a process that serves this app alone: what startup loaded (the
    R4 definitions, profiles, compiled FHIRPath) lives as long as the process, so it is kept
    out of the cyclic collector, whose full passes over it took about 130 ms each, a tenth of
    a transaction's CPU and a pause in every request then in flight.
    """
    services = services or bootstrap()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await services.reader.open()
        if services.security.authenticator is not None:
            await run_in_threadpool(services.security.keys.get)  # load (or create) it once
        if freeze_startup_heap:
            gc.collect()
            gc.freeze()
        yield
        await services.security.audit.close()
        await services.reader.close()
        services.close()

    app = FastAPI(
        title="Infusion Bridge",
        version=VERSION,
        summary=service_doc,
        lifespan=lifespan,
    )
    app.state.services = services
    app.add_middleware(RequestIdMiddleware)
    # Inside the request id, in front of everything else (the FHIR read path included).
    app.user_middleware.append(
        Middleware(
            AccessMiddleware,
            authenticator=services.security.authenticator,
            audit=services.security.audit,
            limits=services.security.limits,
            audit_reads=services.settings.audit_reads,
            discovery=smart_configuration,
            public_base_url=services.settings.public_base_url,
        )
    )
    install_error_handlers(app)
    app.include_router(build_auth_router())
    app.include_router(build_router())
    app.state.conformance = ConformanceResources(
        services.settings.profiles_dir or default_profiles_dir()
    )
    # read and vread, the hot path: answered by the innermost middleware (inside the request id)
    # ahead of FastAPI's exception middleware and routing, and routed below for the rest.
    read_parts = {"reader": services.reader, "conformance": app.state.conformance}
    app.user_middleware.append(Middleware(FastReads, **read_parts))
    app.include_router(build_capability_router())
    app.include_router(build_export_router())
    app.include_router(build_fhir_router())
    app.router.routes.extend(build_read_routes(**read_parts))
    app.include_router(build_write_router())
    app.include_router(build_bundle_router())
    app.include_router(build_sync_router(services))

    @app.get("/healthz", tags=["health"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="The database is reachable and migrated")
    async def readyz() -> JSONResponse:
        def check() -> tuple[bool, dict[str, Any]]:
            try:
                services.database.ping()
                applied, newest = services.database.migration_state()
            except Exception as error:  # a readiness probe reports any failure, never raises
                return False, {"database": "unreachable", "error": type(error).__name__}
            current = applied == newest
            return current, {
                "database": "ok",
                "migrations": "current" if current else "pending",
                "applied": sorted(applied),
                "expected": sorted(newest),
            }

        ready, detail = await run_in_threadpool(check)
        return JSONResponse(
            {"status": "ready" if ready else "not ready", **detail},
            status_code=200 if ready else 503,
        )

    _publish_record_schemas(app)
    return app


def _publish_record_schemas(app: FastAPI) -> None:
    """Put the record models in the OpenAPI components the PUT routes refer to.

    The PUT routes read the body themselves (kind and external_id may come from the URL), so
    FastAPI does not see the models; their schemas are added here.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in RECORD_TYPES.values():
            definition = TypeAdapter(model).json_schema(ref_template="#/components/schemas/{model}")
            components.update(definition.pop("$defs", {}))
            components[model.__name__] = definition
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
