"""Which record a resource came from, looked up by the resource: an index on its type and id.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

_NAME = "ix_record_resources_resource_type_resource_id"


def upgrade() -> None:
    op.create_index(_NAME, "record_resources", ["resource_type", "resource_id"])


def downgrade() -> None:
    op.drop_index(_NAME, "record_resources")
