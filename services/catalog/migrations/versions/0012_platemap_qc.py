"""Plates keep a plate map and a QC gate; reports keep their QC verdict.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 19:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("plates") as batch:
        batch.add_column(sa.Column("platemap", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("qc_gate", sa.JSON(), nullable=True))
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("qc", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("qc")
    with op.batch_alter_table("plates") as batch:
        batch.drop_column("qc_gate")
        batch.drop_column("platemap")
