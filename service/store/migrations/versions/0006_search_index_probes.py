"""Search index: each table's per-resource index also covers the values a search compares.

A search probes the index rows of each candidate resource for every parameter but the one the
candidates come from (an EXISTS on resource type, id and parameter). With the values in the index
that probe reads the index alone, and an index whose leading columns are the candidate's never
loses, in the planner's eyes, to the lookup index scanning every row of a parameter (SQLite has
no statistics to tell them apart).

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None

_LOOKUP = {
    "search_string": ("value",),
    "search_token": ("code", "system"),
    "search_date": ("low", "high"),
    "search_reference": ("target_id", "target_type"),
    "search_quantity": ("value",),
}


def upgrade() -> None:
    for table, lookup in _LOOKUP.items():
        op.drop_index(f"ix_{table}_resource", table_name=table)
        op.create_index(
            f"ix_{table}_resource", table, ["resource_type", "resource_id", "param", *lookup]
        )


def downgrade() -> None:
    for table in _LOOKUP:
        op.drop_index(f"ix_{table}_resource", table_name=table)
        op.create_index(f"ix_{table}_resource", table, ["resource_type", "resource_id", "param"])
