"""Search index: string, token, date, reference and quantity rows per current resource.

The rows of resources stored before this revision are extracted here, so search sees every
resource from the first start on this schema.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TEXT = sa.String().with_variant(postgresql.VARCHAR(collation="C"), "postgresql")


def _index_table(name: str, *columns: sa.Column[object], lookup: tuple[str, ...]) -> None:
    op.create_table(
        name,
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("param", sa.String(64), nullable=False),
        *columns,
    )
    op.create_index(f"ix_{name}_lookup", name, ["resource_type", "param", *lookup, "resource_id"])
    op.create_index(f"ix_{name}_resource", name, ["resource_type", "resource_id", "param"])


def upgrade() -> None:
    _index_table(
        "search_string",
        sa.Column("value", _TEXT, nullable=False, comment="Case- and accent-folded."),
        sa.Column("exact", _TEXT, nullable=False, comment="As written, for :exact."),
        lookup=("value",),
    )
    _index_table(
        "search_token",
        sa.Column("system", _TEXT, nullable=True),
        sa.Column("code", _TEXT, nullable=True),
        sa.Column("text", _TEXT, nullable=True, comment="Display or text, folded, for :text."),
        lookup=("code", "system"),
    )
    _index_table(
        "search_date",
        sa.Column("low", sa.DateTime(timezone=True), nullable=False, comment="Inclusive."),
        sa.Column("high", sa.DateTime(timezone=True), nullable=False, comment="Inclusive."),
        lookup=("low", "high"),
    )
    _index_table(
        "search_reference",
        sa.Column("target_type", sa.String(64), nullable=True),
        sa.Column("target_id", sa.String(64), nullable=True),
        sa.Column("url", _TEXT, nullable=True, comment="Absolute URL or canonical, as written."),
        lookup=("target_id", "target_type"),
    )
    op.create_index("ix_search_reference_target", "search_reference", ["target_type", "target_id"])
    _index_table(
        "search_quantity",
        sa.Column("value", sa.Float(53), nullable=False),
        sa.Column("system", _TEXT, nullable=True),
        sa.Column("code", _TEXT, nullable=True),
        lookup=("value",),
    )
    op.create_index(
        "ix_resources_resource_type_last_updated", "resources", ["resource_type", "last_updated"]
    )
    _backfill()


def _backfill() -> None:
    # The extraction is the application's own (pure) code, so rows match what writes produce.
    from service.store.resources import SearchIndexWriter

    connection = op.get_bind()
    writer = SearchIndexWriter(connection)
    after = ("", "")
    while True:  # keyset pages, so memory stays flat on a large store
        page = connection.execute(
            sa.text(
                "SELECT resource_type, id, body FROM resources WHERE deleted = false"
                " AND (resource_type > :t OR (resource_type = :t AND id > :i))"
                " ORDER BY resource_type, id LIMIT 1000"
            ),
            {"t": after[0], "i": after[1]},
        ).all()
        if not page:
            return
        writer.insert_bodies([row.body for row in page])
        after = (page[-1].resource_type, page[-1].id)


def downgrade() -> None:
    op.drop_index("ix_resources_resource_type_last_updated", "resources")
    for name in (
        "search_quantity",
        "search_reference",
        "search_string",
        "search_token",
        "search_date",
    ):
        op.drop_table(name)
