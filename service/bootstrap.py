"""The composition root: the one place that builds the service's parts from `Settings`.

The API (`service.app.create_app`), the CLI and later the worker all start here; tests build the
same parts with their own settings or database instead of patching internals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from service.config import Settings
from service.store.db import Database


@dataclass
class Services:
    """Everything a request handler or command needs, built once per process."""

    settings: Settings
    database: Database

    def close(self) -> None:
        self.database.dispose()


def bootstrap(settings: Settings | None = None, *, database: Database | None = None) -> Services:
    settings = settings or Settings()
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    database = database or Database(settings.database_url, pool_size=settings.database_pool_size)
    return Services(settings=settings, database=database)
