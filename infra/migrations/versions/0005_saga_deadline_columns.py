"""saga deadline columns

A saga's single active deadline moves from its own table, `saga_deadlines`, onto the
saga row: `saga_instances.deadline_at`, `deadline_kind`, `deadline_step` and
`deadline_attempt`, all NULL when the saga has none. A transition then writes its
state and deadline with one statement instead of three (UPDATE, DELETE, INSERT). The
sweep reads the partial index `ix_saga_instances_deadline_due`. Every deadline row is
copied onto its saga; the downgrade copies them back.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 18:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("saga_instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("deadline_kind", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("deadline_step", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("deadline_attempt", sa.Integer(), nullable=True))
        batch_op.create_index(
            "ix_saga_instances_deadline_due",
            ["deadline_at"],
            unique=False,
            postgresql_where=sa.text("deadline_at IS NOT NULL"),
            sqlite_where=sa.text("deadline_at IS NOT NULL"),
        )

    # Correlated subqueries: the same statement on SQLite and PostgreSQL.
    op.execute(
        """
        UPDATE saga_instances SET
            deadline_at = (SELECT d.due_at FROM saga_deadlines d WHERE d.saga_id = saga_instances.saga_id),
            deadline_kind = (SELECT d.kind FROM saga_deadlines d WHERE d.saga_id = saga_instances.saga_id),
            deadline_step = (SELECT d.step FROM saga_deadlines d WHERE d.saga_id = saga_instances.saga_id),
            deadline_attempt = (SELECT d.attempt FROM saga_deadlines d WHERE d.saga_id = saga_instances.saga_id)
        WHERE saga_id IN (SELECT saga_id FROM saga_deadlines)
        """
    )

    with op.batch_alter_table("saga_deadlines", schema=None) as batch_op:
        batch_op.drop_index("ix_saga_deadlines_due")
    op.drop_table("saga_deadlines")


def downgrade() -> None:
    op.create_table(
        "saga_deadlines",
        sa.Column("saga_id", sa.String(length=64), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("step", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("saga_id"),
    )
    with op.batch_alter_table("saga_deadlines", schema=None) as batch_op:
        batch_op.create_index("ix_saga_deadlines_due", ["due_at"], unique=False)

    op.execute(
        """
        INSERT INTO saga_deadlines (saga_id, due_at, kind, step, attempt)
        SELECT saga_id, deadline_at, deadline_kind, deadline_step, deadline_attempt
        FROM saga_instances WHERE deadline_at IS NOT NULL
        """
    )

    with op.batch_alter_table("saga_instances", schema=None) as batch_op:
        batch_op.drop_index("ix_saga_instances_deadline_due")
        batch_op.drop_column("deadline_attempt")
        batch_op.drop_column("deadline_step")
        batch_op.drop_column("deadline_kind")
        batch_op.drop_column("deadline_at")
