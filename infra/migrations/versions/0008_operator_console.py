"""operator console

The operator console's tables and indexes: `operators` (console accounts, tokens
stored hashed, role viewer or operator), `audit_log` (one row per operator action from
the console or the CLI), and the indexes its pages read by: sagas newest first across
statuses and by id prefix, a failure group's dead letters newest first.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-15 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "operators",
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("key_salt", sa.String(length=32), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_signin_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id"),
    )
    with op.batch_alter_table("operators", schema=None) as batch_op:
        batch_op.create_index("ix_operators_name", ["name"], unique=False)

    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("via", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("saga_id", sa.String(length=64), nullable=True),
        sa.Column("targets", sa.Text(), nullable=False),
        sa.Column("parameters", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index("ix_audit_log_actor", ["actor", "id"], unique=False)
        batch_op.create_index("ix_audit_log_action", ["action", "id"], unique=False)
        batch_op.create_index("ix_audit_log_saga", ["saga_id", "id"], unique=False)

    with op.batch_alter_table("saga_instances", schema=None) as batch_op:
        batch_op.create_index("ix_saga_instances_updated", ["updated_at", "saga_id"], unique=False)
        batch_op.create_index(
            "ix_saga_instances_id_prefix", ["saga_id"], unique=False, postgresql_ops={"saga_id": "varchar_pattern_ops"}
        )
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.create_index("ix_dead_letters_group", ["queue", "reason_class", "type", "last_failure_at", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.drop_index("ix_dead_letters_group")
    with op.batch_alter_table("saga_instances", schema=None) as batch_op:
        batch_op.drop_index("ix_saga_instances_id_prefix")
        batch_op.drop_index("ix_saga_instances_updated")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_saga")
        batch_op.drop_index("ix_audit_log_action")
        batch_op.drop_index("ix_audit_log_actor")
    op.drop_table("audit_log")
    with op.batch_alter_table("operators", schema=None) as batch_op:
        batch_op.drop_index("ix_operators_name")
    op.drop_table("operators")
