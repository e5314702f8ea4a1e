"""PostgreSQL: large resource bodies compressed with lz4 instead of pglz.

Bodies over about 2 kB (a transaction's AuditEvent naming every entry, a long DocumentReference)
are compressed as they are stored. lz4 took about a fifth less time per insert than pglz for a
52 kB AuditEvent, and stored it smaller. Only values written from now on are affected; a
server built without lz4 keeps pglz. SQLite has no such setting.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_COLUMNS = (("resources", "body"), ("resource_versions", "body"), ("record_changes", "body"))


def _set_compression(method: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    statements = " ".join(
        f"EXECUTE 'ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method}';"
        for table, column in _COLUMNS
    )
    # EXECUTE, so that a server without lz4 raises at run time, where it is caught.
    op.execute(f"DO $$ BEGIN {statements} EXCEPTION WHEN feature_not_supported THEN NULL; END $$")


def upgrade() -> None:
    _set_compression("lz4")


def downgrade() -> None:
    _set_compression("pglz")
