"""Bulk Data $export jobs belong to the client that started them.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "export_jobs",
        sa.Column(
            "client_id",
            sa.String(200),
            nullable=True,
            comment="The client that started the job; only it sees the status and files.",
        ),
    )


def downgrade() -> None:
    op.drop_column("export_jobs", "client_id")
