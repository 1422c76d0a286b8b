"""Networks: each sandbox's network spec (mode and egress rules, which forks and
wakes keep), the ports it made public, and preview tokens (stored hashed).

Rows made before this revision have no network: they were made without one
(``none``), as their checkpoints were.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.add_column(sa.Column("network", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("public_ports", sa.JSON(), nullable=True))
    op.create_table(
        "preview_tokens",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("sandbox", sa.String(32), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_preview_tokens_sandbox", "preview_tokens", ["sandbox"])


def downgrade() -> None:
    op.drop_index("ix_preview_tokens_sandbox", table_name="preview_tokens")
    op.drop_table("preview_tokens")
    with op.batch_alter_table("sandboxes") as batch:
        batch.drop_column("public_ports")
        batch.drop_column("network")
