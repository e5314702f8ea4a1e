"""FHIR resources with their history, record-to-resource links, and the outbox.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "resources",
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column(
            "content_hash",
            sa.String(64),
            nullable=False,
            comment="SHA-256 without versionId/lastUpdated.",
        ),
        sa.Column(
            "body", sa.Text(), nullable=False, comment="The resource JSON as served, meta included."
        ),
        sa.PrimaryKeyConstraint("resource_type", "id", name=op.f("pk_resources")),
    )
    op.create_table(
        "resource_versions",
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("body", sa.Text(), nullable=True, comment="Null for a deletion."),
        sa.PrimaryKeyConstraint(
            "resource_type", "id", "version", name=op.f("pk_resource_versions")
        ),
    )
    op.create_table(
        "record_resources",
        sa.Column("record_kind", sa.String(16), nullable=False),
        sa.Column("record_id", sa.String(64), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint(
            "record_kind",
            "record_id",
            "resource_type",
            "resource_id",
            name=op.f("pk_record_resources"),
        ),
    )
    op.create_table(
        "outbox",
        sa.Column("id", _ID, autoincrement=True, nullable=False, comment="Delivery order."),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column(
            "patient_id",
            sa.String(64),
            nullable=True,
            comment="Patient resource id, for ordering.",
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("record_resources")
    op.drop_table("resource_versions")
    op.drop_table("resources")
