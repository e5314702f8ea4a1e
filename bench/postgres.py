"""A throwaway PostgreSQL schema for one benchmark run (BENCH_DATABASE_URL, default local)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text

POSTGRES = os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def postgres_schema() -> Iterator[str | None]:
    """The URL of a fresh schema, dropped afterwards; None (with a message) when unreachable."""
    schema = f"ib_bench_{uuid.uuid4().hex[:8]}"
    engine = create_engine(POSTGRES)
    try:
        with engine.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as error:
        print(f"PostgreSQL skipped: {error}")
        engine.dispose()
        yield None
        return
    try:
        yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
