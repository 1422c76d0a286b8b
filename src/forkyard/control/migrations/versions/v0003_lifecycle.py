"""Lifecycle: labels, timeouts and idle hibernation, the event log.

Sandboxes and checkpoints get ``labels``; sandboxes get their timer fields
(``expires_at`` is absolute, so a restarted control plane keeps every timer);
``events`` is the bounded log of lifecycle events (and of webhook deliveries).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.add_column(sa.Column("labels", sa.JSON(), nullable=False,
                                   server_default=sa.text("'{}'")))
        batch.add_column(sa.Column("timeout_s", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("on_timeout", sa.String(16), nullable=True))
        batch.add_column(sa.Column("idle_hibernate_s", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("auto_wake", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("last_activity", sa.DateTime(timezone=True),
                                   nullable=True))
    op.create_index("ix_sandboxes_expires_at", "sandboxes", ["expires_at"])
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("labels", sa.JSON(), nullable=False,
                                   server_default=sa.text("'{}'")))
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("sandbox", sa.String(32), nullable=True),
        sa.Column("checkpoint", sa.String(64), nullable=True),
        sa.Column("worker", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("delivery", sa.String(16), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index("ix_events_sandbox", "events", ["sandbox"])
    op.create_index("ix_events_kind", "events", ["kind"])


def downgrade() -> None:
    op.drop_table("events")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("labels")
    op.drop_index("ix_sandboxes_expires_at", "sandboxes")
    with op.batch_alter_table("sandboxes") as batch:
        for column in ("last_activity", "auto_wake", "idle_hibernate_s", "on_timeout",
                       "expires_at", "timeout_s", "labels"):
            batch.drop_column(column)
