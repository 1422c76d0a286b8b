"""Initial schema: workers, sandboxes, checkpoints, archives.

Revision ID: 0001
Revises:
Create Date: 2026-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("registered", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), nullable=True),
        sa.Column("running", sa.Integer(), nullable=False),
        sa.Column("free_memory_mb", sa.Integer(), nullable=False),
        sa.Column("max_sandboxes", sa.Integer(), nullable=False),
        sa.Column("cached_bases", sa.JSON(), nullable=False),
        sa.Column("checkpoints", sa.JSON(), nullable=False),
        sa.Column("images", sa.JSON(), nullable=False),
    )
    op.create_table(
        "sandboxes",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("worker", sa.String(64), sa.ForeignKey("workers.name"), nullable=True),
        sa.Column("image", sa.String(64), nullable=True),
        sa.Column("image_ref", sa.String(200), nullable=True),
        sa.Column("memory_mb", sa.Integer(), nullable=True),
        sa.Column("cpus", sa.Integer(), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.Column("parent_checkpoint", sa.String(64), nullable=True),
        sa.Column("last_checkpoint", sa.String(64), nullable=True),
        sa.Column("recoverable_from", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_sandboxes_state", "sandboxes", ["state"])
    op.create_index("ix_sandboxes_worker", "sandboxes", ["worker"])
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("sandbox", sa.String(32), nullable=False),
        sa.Column("worker", sa.String(64), sa.ForeignKey("workers.name"), nullable=False),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("base", sa.String(64), nullable=False),
        sa.Column("changed_bytes", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_checkpoints_sandbox", "checkpoints", ["sandbox"])
    op.create_index("ix_checkpoints_worker", "checkpoints", ["worker"])
    op.create_index("ix_checkpoints_state", "checkpoints", ["state"])
    op.create_table(
        "archives",
        sa.Column(
            "checkpoint_id", sa.String(64),
            sa.ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True,
        ),
        sa.Column("store_url", sa.Text(), nullable=False),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=True),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("archives")
    op.drop_table("checkpoints")
    op.drop_table("sandboxes")
    op.drop_table("workers")
