"""Records and their history.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "records",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("external_id", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=True, comment="The patient's external id."),
        sa.Column("course_id", sa.String(64), nullable=True, comment="The course's external id."),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "content_hash", sa.String(64), nullable=False, comment="SHA-256 of the canonical body."
        ),
        sa.Column(
            "body", sa.Text(), nullable=False, comment="Canonical record JSON, served as stored."
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_records")),
        sa.UniqueConstraint("kind", "external_id", name=op.f("uq_records_kind_external_id")),
    )
    op.create_index(
        op.f("ix_records_kind_patient_id_external_id"),
        "records",
        ["kind", "patient_id", "external_id"],
    )
    op.create_index(
        op.f("ix_records_kind_course_id_external_id"),
        "records",
        ["kind", "course_id", "external_id"],
    )
    op.create_table(
        "record_changes",
        sa.Column("id", _ID, autoincrement=True, nullable=False, comment="Global change sequence."),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("external_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("operation", sa.String(8), nullable=False, comment="create or update"),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("changed_by", sa.String(200), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column(
            "patch",
            sa.Text(),
            nullable=True,
            comment="RFC 6902 JSON Patch from the previous version.",
        ),
        sa.Column("body", sa.Text(), nullable=False, comment="The record as of this version."),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_record_changes")),
        sa.UniqueConstraint(
            "kind",
            "external_id",
            "version",
            name=op.f("uq_record_changes_kind_external_id_version"),
        ),
    )


def downgrade() -> None:
    op.drop_table("record_changes")
    op.drop_index(op.f("ix_records_kind_course_id_external_id"), table_name="records")
    op.drop_index(op.f("ix_records_kind_patient_id_external_id"), table_name="records")
    op.drop_table("records")
