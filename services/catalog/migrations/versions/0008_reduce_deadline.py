"""Runs count how often their reduce was issued, and keep why it failed.

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-03 20:25:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("reduce_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("reduce_failure_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("reduce_failure_reason")
        batch.drop_column("reduce_attempts")
