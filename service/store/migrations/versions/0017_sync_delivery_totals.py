"""Deliveries that ended, counted per destination, status and latency bucket as they end.

Status and `/metrics` read these few rows instead of aggregating every delivery ever made.
The counts start from what `sync_deliveries` holds.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

_BOUNDS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
"""`service.sync.ledger.LATENCY_BUCKETS_MS` when this revision was written."""
_ENDS = ("delivered", "skipped", "superseded", "echo", "unsupported")


def upgrade() -> None:
    op.create_table(
        "sync_delivery_totals",
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("latency_bucket_ms", sa.Integer(), nullable=False),
        sa.Column("deliveries", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "destination", "status", "latency_bucket_ms", name="pk_sync_delivery_totals"
        ),
    )
    bucket = " ".join(f"WHEN latency_ms <= {bound} THEN {bound}" for bound in _BOUNDS_MS)
    ends = ", ".join(f"'{end}'" for end in _ENDS)
    op.execute(
        "INSERT INTO sync_delivery_totals "
        "(destination, status, latency_bucket_ms, deliveries, latency_ms) "
        "SELECT destination, status, bucket, count(*), coalesce(sum(latency_ms), 0) FROM ("
        f" SELECT destination, status, latency_ms, CASE WHEN status = 'delivered'"
        f" AND latency_ms IS NOT NULL THEN CASE {bucket} ELSE -1 END ELSE -1 END AS bucket"
        f" FROM sync_deliveries WHERE status IN ({ends})"
        ") AS ended GROUP BY destination, status, bucket"
    )


def downgrade() -> None:
    op.drop_table("sync_delivery_totals")
