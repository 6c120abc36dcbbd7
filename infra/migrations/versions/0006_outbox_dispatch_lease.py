"""outbox dispatch lease

Every outbox gets `dispatch_after` and a partial index of its pending rows by saga: a row committed by a process that publishes it
itself right after the commit (outbox/dispatch.py) is leased to that process until
then, and the relay leaves it alone meanwhile. On PostgreSQL the NOTIFY that wakes
the relays now fires only for rows without a lease: waking a relay for a row it may
not take would cost a claim transaction per commit.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 19:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

SERVICES = ("orders", "stock", "payments", "ledger", "saga", "ingest", "dlq")


def upgrade() -> None:
    for service in SERVICES:
        with op.batch_alter_table(f"{service}_outbox") as batch_op:
            batch_op.add_column(sa.Column("dispatch_after", sa.DateTime(timezone=True), nullable=True))
            # A saga's pending rows, read before every dispatch and by the relay's claim.
            batch_op.create_index(
                f"ix_{service}_outbox_pending_correlation",
                ["correlation_id", "id"],
                unique=False,
                postgresql_where=sa.text("sent_at IS NULL"),
                sqlite_where=sa.text("sent_at IS NULL"),
            )
    if op.get_bind().dialect.name == "postgresql":
        for service in SERVICES:
            op.execute(f"DROP TRIGGER IF EXISTS {service}_outbox_notify ON {service}_outbox")
            # NOTIFY folds repeats within a transaction: one hint per transaction still.
            op.execute(
                f"CREATE TRIGGER {service}_outbox_notify AFTER INSERT ON {service}_outbox "
                f"FOR EACH ROW WHEN (NEW.dispatch_after IS NULL) EXECUTE FUNCTION compensa_outbox_notify('{service}')"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for service in SERVICES:
            op.execute(f"DROP TRIGGER IF EXISTS {service}_outbox_notify ON {service}_outbox")
            op.execute(
                f"CREATE TRIGGER {service}_outbox_notify AFTER INSERT ON {service}_outbox "
                f"FOR EACH STATEMENT EXECUTE FUNCTION compensa_outbox_notify('{service}')"
            )
    for service in SERVICES:
        with op.batch_alter_table(f"{service}_outbox") as batch_op:
            batch_op.drop_index(f"ix_{service}_outbox_pending_correlation")
            batch_op.drop_column("dispatch_after")
