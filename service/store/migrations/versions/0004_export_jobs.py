"""Bulk Data $export jobs, kept in the database so any API process can answer for them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "export_jobs",
        sa.Column("id", sa.String(36), nullable=False, comment="The job id in the status URL."),
        sa.Column("level", sa.String(16), nullable=False, comment="system or patient"),
        sa.Column(
            "request",
            sa.Text(),
            nullable=False,
            comment="The kick-off request URL, for the manifest.",
        ),
        sa.Column(
            "types", sa.Text(), nullable=False, comment="Comma-separated resource types exported."
        ),
        sa.Column(
            "since",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="_since: lastUpdated at or after it.",
        ),
        sa.Column(
            "transaction_time",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="The snapshot instant: each file serves the versions current at it.",
        ),
        sa.Column("status", sa.String(16), nullable=False, comment="in-progress or complete"),
        sa.Column(
            "progress", sa.String(200), nullable=True, comment="X-Progress while in progress."
        ),
        sa.Column(
            "claimed_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="When a process last took up the job's work; a stale claim is taken over.",
        ),
        sa.Column("counts", sa.Text(), nullable=True, comment="JSON {type: count} once complete."),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export_jobs")),
    )


def downgrade() -> None:
    op.drop_table("export_jobs")
