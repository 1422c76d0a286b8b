"""Tenants: API keys (stored hashed), an owner on sandboxes and checkpoints, and
tombstones of deleted checkpoints (so the store cannot bring them back), and
on each event the tenant of its sandbox (so a tenant reads only its own).

Rows made before this revision have no tenant: only admin keys see them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "checkpoint_tombstones",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=True),
        sa.Column("deleted", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("sandboxes") as batch:
        batch.add_column(sa.Column("tenant", sa.String(64), nullable=True))
        batch.create_index("ix_sandboxes_tenant", ["tenant"])
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("tenant", sa.String(64), nullable=True))
        batch.create_index("ix_checkpoints_tenant", ["tenant"])
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("tenant", sa.String(64), nullable=True))
        batch.create_index("ix_events_tenant", ["tenant"])


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_index("ix_events_tenant")
        batch.drop_column("tenant")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_index("ix_checkpoints_tenant")
        batch.drop_column("tenant")
    with op.batch_alter_table("sandboxes") as batch:
        batch.drop_index("ix_sandboxes_tenant")
        batch.drop_column("tenant")
    op.drop_table("checkpoint_tombstones")
    op.drop_table("api_keys")
