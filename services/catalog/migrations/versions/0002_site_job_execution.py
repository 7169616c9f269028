"""Site jobs remember which execution holds their attempt, and the results of
their earlier runs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 20:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("site_jobs") as batch:
        batch.add_column(sa.Column("execution_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("past_results", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("site_jobs") as batch:
        batch.drop_column("past_results")
        batch.drop_column("execution_id")
