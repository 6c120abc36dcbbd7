"""inbox digest

Every inbox gets a `digest` column: the sha256 of a processed message's type,
version, correlation id and payload. A delivery whose id is in the inbox with another
digest is a reused message id, refused (dead-lettered) instead of skipped as a
duplicate. Rows from before have no digest and are trusted as before.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 16:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SERVICES = ("orders", "stock", "payments", "ledger", "saga", "ingest", "dlq")


def upgrade() -> None:
    for service in SERVICES:
        with op.batch_alter_table(f"{service}_inbox") as batch_op:
            batch_op.add_column(sa.Column("digest", sa.String(length=64), nullable=True))


def downgrade() -> None:
    for service in SERVICES:
        with op.batch_alter_table(f"{service}_inbox") as batch_op:
            batch_op.drop_column("digest")
