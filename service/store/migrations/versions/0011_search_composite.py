"""Search index: composite parameters (Observation's `code-value-quantity` and the like).

One row per element a composite selects (the resource, or each `Observation.component`) and
combination of its parts' values, so a search matches both parts on the same element. The rows
of resources stored before this revision are extracted here, as 0003 did for the other tables.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-11
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_TEXT = sa.String().with_variant(postgresql.VARCHAR(collation="C"), "postgresql")
_WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "search_composite",
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("param", sa.String(64), nullable=False),
        sa.Column("system", _TEXT, nullable=True, comment="The first part, a token."),
        sa.Column("code", _TEXT, nullable=False),
        sa.Column("value_system", _TEXT, nullable=True, comment="A token's or quantity's."),
        sa.Column("value_code", _TEXT, nullable=True, comment="A token's, or a quantity's unit."),
        sa.Column("value_number", sa.Float(53), nullable=True, comment="A quantity's value."),
        sa.Column("value_low", _WHEN, nullable=True, comment="A date's, inclusive."),
        sa.Column("value_high", _WHEN, nullable=True, comment="A date's, inclusive."),
        sa.Column("value_text", _TEXT, nullable=True, comment="A string's, folded."),
    )
    op.create_index(
        "ix_search_composite_lookup",
        "search_composite",
        ["resource_type", "param", "code", "system", "resource_id"],
    )
    op.create_index(
        "ix_search_composite_resource",
        "search_composite",
        ["resource_type", "resource_id", "param", "code", "system"],
    )
    _backfill()


def _backfill() -> None:
    # The extraction is the application's own (pure) code, so rows match what writes produce.
    import orjson

    from service.fhir.search_parameters import definitions
    from service.store.resources import SearchIndexWriter
    from service.store.tables import search_composite

    types = sorted(
        resource_type
        for resource_type, parameters in definitions().by_type.items()
        if any(parameter.type == "composite" for parameter in parameters.values())
    )
    connection = op.get_bind()
    writer = SearchIndexWriter(connection)
    for resource_type in types:
        after = ""
        while True:  # keyset pages, so memory stays flat on a large store
            page = connection.execute(
                sa.text(
                    "SELECT id, body FROM resources WHERE resource_type = :t"
                    " AND deleted = false AND id > :i ORDER BY id LIMIT 1000"
                ),
                {"t": resource_type, "i": after},
            ).all()
            if not page:
                break
            batch = [orjson.loads(row.body) for row in page]
            writer.insert(batch, tables={search_composite})
            after = page[-1].id


def downgrade() -> None:
    op.drop_table("search_composite")
