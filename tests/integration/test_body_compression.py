"""Migration 0015: large resource bodies compressed with lz4 on PostgreSQL, pglz once undone."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from service.store.db import MIGRATIONS, Database

_BODIES = {"resources", "resource_versions", "record_changes"}


def test_bodies_are_compressed_with_lz4_and_back_with_pglz(empty_postgres_url: str) -> None:
    database = Database(empty_postgres_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))

    def compression() -> dict[str, str]:
        with database.engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT c.relname, a.attcompression FROM pg_attribute a "
                    "JOIN pg_class c ON c.oid = a.attrelid "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = current_schema() AND a.attname = 'body'"
                )
            )
            return {name: method for name, method in rows if name in _BODIES}

    try:
        database.migrate()
        assert compression() == dict.fromkeys(_BODIES, "l")
        with database.unit_of_work() as uow:
            config.attributes["connection"] = uow.connection
            command.downgrade(config, "0014")
            uow.commit()
        assert compression() == dict.fromkeys(_BODIES, "p")
    finally:
        database.dispose()
