"""Search parameters that repeat others' rows are answered from those rows and keep none.

`patient` on an Observation is its `subject` rows that name a Patient; `combo-code` is the rows of
`code` and `component-code` (`service.fhir.search_parameters.index_aliases`). Their own rows,
written before this revision, are deleted.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_TABLES = {
    "string": "search_string",
    "token": "search_token",
    "uri": "search_token",
    "date": "search_date",
    "reference": "search_reference",
    "quantity": "search_quantity",
}


def upgrade() -> None:
    from service.fhir.search_parameters import INDEXED_TYPES, definitions, index_aliases

    for resource_type in INDEXED_TYPES:
        for code in index_aliases(resource_type):
            parameter = definitions().by_type[resource_type][code]
            table = sa.table(
                _TABLES[parameter.type], sa.column("resource_type"), sa.column("param")
            )
            op.execute(
                table.delete().where(table.c.resource_type == resource_type, table.c.param == code)
            )


def downgrade() -> None:
    # The rows are rebuilt by a reindex of the affected resources (not done here): searches
    # of an older release on these parameters find nothing until then.
    pass
