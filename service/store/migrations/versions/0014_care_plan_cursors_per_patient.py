"""Care-plan cursors per patient, for EHRs that search CarePlans only within a patient.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sync_pull_cursors",
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("remote_patient_id", sa.String(64), nullable=False),
        sa.Column("cursor", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("destination", "remote_patient_id", name="pk_sync_pull_cursors"),
    )


def downgrade() -> None:
    op.drop_table("sync_pull_cursors")
