"""circuit breakers

The `circuit_breakers` table: each process holding a circuit breaker (the payment
gateway's, in the payments service) writes its state there at every transition, and
refreshes the row while the circuit is not closed, so `compensa health`, in another
process, can report it. Keyed by circuit and holder (host:pid).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "circuit_breakers",
        sa.Column("circuit", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("circuit", "holder"),
    )
    with op.batch_alter_table("circuit_breakers", schema=None) as batch_op:
        batch_op.create_index("ix_circuit_breakers_updated_at", ["updated_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("circuit_breakers", schema=None) as batch_op:
        batch_op.drop_index("ix_circuit_breakers_updated_at")
    op.drop_table("circuit_breakers")
