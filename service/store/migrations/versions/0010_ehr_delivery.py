"""EHR delivery and care-plan sync: destinations' cursors, deliveries, lanes, ledger, conflicts.

Revision ID: 0010
Revises: 0007
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0007"
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sync_destinations",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("outbox_cursor", sa.BigInteger(), nullable=False),
        sa.Column("strategies", sa.Text(), nullable=True),
        sa.Column("capabilities_at", _When, nullable=True),
        sa.Column("care_plan_cursor", sa.String(64), nullable=True),
        sa.Column("last_pull_at", _When, nullable=True),
        sa.Column("pull_requested", sa.Boolean(), nullable=False),
        sa.Column("subscription_events", sa.BigInteger(), nullable=True),
        sa.Column("last_notification_at", _When, nullable=True),
        sa.Column("last_success_at", _When, nullable=True),
        sa.Column("last_failure_at", _When, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_sync_destinations"),
    )
    op.create_table(
        "sync_deliveries",
        sa.Column("id", _Id, autoincrement=True, nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("lane", sa.String(140), nullable=False),
        sa.Column("outbox_id", sa.BigInteger(), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("strategy", sa.String(32), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _When, nullable=False),
        sa.Column("written_at", _When, nullable=False),
        sa.Column("finished_at", _When, nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sync_deliveries"),
        sa.UniqueConstraint(
            "destination", "outbox_id", name="uq_sync_deliveries_destination_outbox_id"
        ),
    )
    op.create_index(
        "ix_sync_deliveries_destination_lane_status_id",
        "sync_deliveries",
        ["destination", "lane", "status", "id"],
    )
    op.create_index(
        "ix_sync_deliveries_destination_status_id",
        "sync_deliveries",
        ["destination", "status", "id"],
    )
    op.create_table(
        "sync_lanes",
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("lane", sa.String(140), nullable=False),
        sa.Column("next_due", _When, nullable=True),
        sa.Column("leased_until", _When, nullable=True),
        sa.Column("leased_by", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("destination", "lane", name="pk_sync_lanes"),
    )
    op.create_index("ix_sync_lanes_destination_next_due", "sync_lanes", ["destination", "next_due"])
    op.create_table(
        "sync_ledger",
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("remote_type", sa.String(64), nullable=False),
        sa.Column("remote_id", sa.String(64), nullable=False),
        sa.Column("remote_version", sa.String(64), nullable=True),
        sa.Column("pushed_version", sa.Integer(), nullable=True),
        sa.Column("origin_version", sa.Integer(), nullable=True),
        sa.Column("updated_at", _When, nullable=False),
        sa.PrimaryKeyConstraint(
            "destination", "resource_type", "resource_id", name="pk_sync_ledger"
        ),
    )
    op.create_index(
        "ix_sync_ledger_destination_remote_type_remote_id",
        "sync_ledger",
        ["destination", "remote_type", "remote_id"],
    )
    op.create_table(
        "sync_conflicts",
        sa.Column("id", _Id, autoincrement=True, nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("record_kind", sa.String(16), nullable=False),
        sa.Column("record_id", sa.String(64), nullable=False),
        sa.Column("field", sa.String(200), nullable=False),
        sa.Column("clinic_value", sa.Text(), nullable=True),
        sa.Column("ehr_value", sa.Text(), nullable=True),
        sa.Column("base_value", sa.Text(), nullable=True),
        sa.Column("remote_version", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("detected_at", _When, nullable=False),
        sa.Column("resolved_at", _When, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sync_conflicts"),
    )
    op.create_index("ix_sync_conflicts_status_id", "sync_conflicts", ["status", "id"])


def downgrade() -> None:
    for table in (
        "sync_conflicts",
        "sync_ledger",
        "sync_lanes",
        "sync_deliveries",
        "sync_destinations",
    ):
        op.drop_table(table)
