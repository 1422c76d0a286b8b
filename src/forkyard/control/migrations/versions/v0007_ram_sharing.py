"""Checkpoints: bytes of RAM chunks each stored first, and bytes it shares with earlier
checkpoints (format v3's accounting, which `forkyard checkpoint show` read from the
manifest alone).

Rows made before this revision have neither (NULL: not known).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("ram_new_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("ram_shared_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("ram_shared_bytes")
        batch.drop_column("ram_new_bytes")
