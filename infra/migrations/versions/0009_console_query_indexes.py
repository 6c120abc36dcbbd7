"""console query indexes

Two indexes the operator console's saga list reads by, found with `compensa bench
console` (100,000 sagas, 1,000,000 history rows): sagas of one saga type newest first
(a rare type scanned every saga), and the unfinished sagas by last update, a partial
index the stuck filter and the stuck count read (they scanned every finished saga).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-16 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

#: The terminal statuses as they are today (sagas.state.TERMINAL), frozen here as migrations are.
UNFINISHED = "status NOT IN ('cancelled', 'compensation_failed', 'completed', 'rejected')"


def upgrade() -> None:
    with op.batch_alter_table("saga_instances", schema=None) as batch_op:
        batch_op.create_index("ix_saga_instances_definition_updated", ["definition", "updated_at", "saga_id"], unique=False)
        batch_op.create_index(
            "ix_saga_instances_unfinished_updated",
            ["updated_at", "saga_id"],
            unique=False,
            postgresql_where=sa.text(UNFINISHED),
            sqlite_where=sa.text(UNFINISHED),
        )


def downgrade() -> None:
    with op.batch_alter_table("saga_instances", schema=None) as batch_op:
        batch_op.drop_index("ix_saga_instances_unfinished_updated")
        batch_op.drop_index("ix_saga_instances_definition_updated")
