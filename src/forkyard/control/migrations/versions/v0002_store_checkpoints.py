"""Checkpoints known only from the store (imported, or published elsewhere).

Such a checkpoint has no origin worker in this cluster, so ``worker`` may be NULL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER a column in place
    with op.batch_alter_table("checkpoints") as batch:
        batch.alter_column("worker", existing_type=sa.String(64), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM checkpoints WHERE worker IS NULL")
    with op.batch_alter_table("checkpoints") as batch:
        batch.alter_column("worker", existing_type=sa.String(64), nullable=False)
