"""The composition root: the one place that builds the service's parts from `Settings`.

The API (`service.app.create_app`), the CLI and later the worker all start here; tests build the
same parts with their own settings or database instead of patching internals.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mappings.context import MappingContext
from mappings.terminology import load_terminology
from service.config import Settings
from service.fhir.profile_validation import ProfileValidator, default_validator
from service.fhir.validation import ResourceValidator
from service.records.materialize import Materializer
from service.store.db import Database
from service.store.reads import ResourceReader, resource_reader


@dataclass
class Services:
    """Everything a request handler or command needs, built once per process."""

    settings: Settings
    database: Database
    validator: ResourceValidator
    materializer: Materializer
    reader: ResourceReader
    """Point reads for the FHIR read path (the app's lifespan opens and closes it)."""

    def close(self) -> None:
        self.database.dispose()


def bootstrap(settings: Settings | None = None, *, database: Database | None = None) -> Services:
    settings = settings or Settings()
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    database = database or Database(settings.database_url, pool_size=settings.database_pool_size)
    validator = resource_validator(settings)
    return Services(
        settings=settings,
        database=database,
        validator=validator,
        materializer=materializer(settings, validator=validator),
        reader=resource_reader(database.url, pool_size=settings.database_pool_size),
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
