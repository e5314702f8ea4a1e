"""Search index: the reference indexes hold the URL too, so that telling this server's targets
from another server's (a relative reference, or an absolute one under this server's base)
reads the indexes alone, not each candidate's row.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

_TABLE = "search_reference"
_LOOKUP = ["resource_type", "param", "target_id", "target_type", "resource_id"]
_RESOURCE = ["resource_type", "resource_id", "param", "target_id", "target_type"]


def _indexes(extra: list[str]) -> None:
    for name, columns in (("lookup", _LOOKUP), ("resource", _RESOURCE)):
        op.drop_index(f"ix_{_TABLE}_{name}", table_name=_TABLE)
        op.create_index(f"ix_{_TABLE}_{name}", _TABLE, [*columns, *extra])


def upgrade() -> None:
    _indexes(["url"])


def downgrade() -> None:
    _indexes([])
