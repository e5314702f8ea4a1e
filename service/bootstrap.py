"""The composition root: the one place that builds the service's parts from `Settings`.

The API (`service.app.create_app`), the CLI and later the worker all start here; tests build the
same parts with their own settings or database instead of patching internals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx

from mappings.context import MappingContext
from mappings.terminology import load_terminology
from service.config import Settings
from service.fhir.profile_validation import ProfileValidator, default_validator
from service.fhir.validation import ResourceValidator
from service.logs import configure_logging
from service.records.materialize import Materializer
from service.security.access import Limits
from service.security.audit import AuditWriter
from service.security.authorization import (
    Authenticator,
    ClientRegistry,
    ExternalIssuer,
    JwksCache,
    KeyRing,
    TokenService,
)
from service.store.db import Database
from service.store.reads import ResourceReader, resource_reader
from service.sync.client import EhrClient
from service.sync.destinations import Destination, load_destinations
from service.sync.worker import DeliveryWorker, WorkerSettings


@dataclass
class Services:
    """Everything a request handler or command needs, built once per process."""

    settings: Settings
    database: Database
    validator: ResourceValidator
    materializer: Materializer
    reader: ResourceReader
    """Point reads for the FHIR read path (the app's lifespan opens and closes it)."""
    security: Security

    @cached_property
    def destinations(self) -> tuple[Destination, ...]:
        """The EHR destinations of `DESTINATIONS_FILE` (read once; DestinationsError if bad)."""
        return load_destinations(self.settings.destinations_file)

    def close(self) -> None:
        self.security.http.close()
        self.database.dispose()


@dataclass
class Security:
    """The authorization server, the token check, the audit trail and the request limits."""

    clients: ClientRegistry
    tokens: TokenService
    authenticator: Authenticator | None
    """None when AUTH_DISABLED: every request acts as the all-scopes `local` client."""
    audit: AuditWriter
    limits: Limits
    keys: KeyRing
    http: httpx.Client


def security(
    settings: Settings, *, database: Database, http: httpx.Client | None = None
) -> Security:
    """The security parts from settings; `http` fetches JWK Sets (tests give a mock transport)."""
    http = http or httpx.Client(follow_redirects=False)
    keys = KeyRing(database=database, key_file=settings.auth_signing_key_file)
    jwks = JwksCache(http)
    clients = ClientRegistry(database)
    external: tuple[ExternalIssuer, ...] = ()
    if settings.auth_external_issuer:
        assert settings.auth_external_jwks_url
        assert settings.auth_external_audience
        external = (
            ExternalIssuer(
                issuer=settings.auth_external_issuer,
                jwks_url=settings.auth_external_jwks_url,
                audience=settings.auth_external_audience,
            ),
        )
    return Security(
        clients=clients,
        tokens=TokenService(
            database=database,
            registry=clients,
            jwks=jwks,
            keys=keys,
            issuer=settings.auth_issuer,
            lifetime_seconds=settings.auth_token_lifetime_seconds,
        ),
        authenticator=None
        if settings.auth_disabled
        else Authenticator(issuer=settings.auth_issuer, keys=keys, jwks=jwks, external=external),
        audit=AuditWriter(database),
        limits=Limits(
            max_body_bytes=settings.max_body_bytes,
            request_timeout_seconds=settings.request_timeout_seconds,
            rate_per_minute=settings.rate_limit_per_minute,
            burst=settings.rate_limit_burst,
        ),
        keys=keys,
        http=http,
    )


def bootstrap(
    settings: Settings | None = None,
    *,
    database: Database | None = None,
    http: httpx.Client | None = None,
) -> Services:
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)
    database = database or Database(
        settings.database_url,
        pool_size=settings.database_pool_size,
        statement_timeout=settings.database_statement_timeout_seconds,
    )
    validator = resource_validator(settings)
    return Services(
        settings=settings,
        database=database,
        validator=validator,
        materializer=materializer(settings, validator=validator),
        reader=resource_reader(
            database.url,
            pool_size=settings.database_pool_size,
            timeout=settings.database_statement_timeout_seconds,
        ),
        security=security(settings, database=database, http=http),
    )


def mapping_context(settings: Settings) -> MappingContext:
    """The site's mapping context: identifier systems, organization, terminology overrides."""
    overrides = _read_overrides(settings.terminology_overrides)
    return MappingContext(
        identifier_system=settings.site_identifier_system,
        mrn_system=settings.mrn_system,
        organization_name=settings.organization_name,
        terminology=load_terminology(overrides),
    )


def resource_validator(settings: Settings | None = None) -> ResourceValidator:
    """Structure and profiles: what every resource version must pass before it is stored."""
    folder = (settings or Settings()).profiles_dir
    return ResourceValidator(ProfileValidator(folder) if folder else default_validator())


def materializer(settings: Settings, *, validator: ResourceValidator | None = None) -> Materializer:
    """Maps and validates the resources of each record write (the API's, the CLI's, tests')."""
    validator = validator or resource_validator(settings)
    return Materializer(context=mapping_context(settings), validate=validator.errors)


def _read_overrides(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and data.get("resourceType") == "Bundle":
        return [entry["resource"] for entry in data.get("entry", [])]
    return data if isinstance(data, list) else [data]


def ehr_clients(
    destinations: Sequence[Destination], *, transport: httpx.BaseTransport | None = None
) -> dict[str, EhrClient]:
    """One FHIR client per destination (tests pass a transport of their own)."""
    return {d.name: EhrClient(d, transport=transport) for d in destinations}


def delivery_worker(
    services: Services,
    *,
    clients: dict[str, EhrClient] | None = None,
    only: Sequence[str] = (),
) -> DeliveryWorker:
    """The outbox worker and its care-plan sync, on the destinations of `services`."""
    from service.sync.care_plans import CarePlanSync

    settings = services.settings
    # httpx logs every URL at INFO, and a search URL can carry a patient's identifier.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    destinations = [d for d in services.destinations if not only or d.name in only]
    clients = clients or ehr_clients(destinations)
    return DeliveryWorker(
        database=services.database,
        destinations=destinations,
        clients=clients,
        site_system=settings.site_identifier_system,
        settings=WorkerSettings(
            batch_size=settings.worker_batch_size,
            concurrency=settings.worker_concurrency,
            lease_seconds=settings.worker_lease_seconds,
            retry_base_seconds=settings.worker_retry_base_seconds,
            retry_cap_seconds=settings.worker_retry_cap_seconds,
            idle_seconds=settings.worker_idle_seconds,
        ),
        care_plans=CarePlanSync(
            database=services.database,
            materializer=services.materializer,
        ),
    )
