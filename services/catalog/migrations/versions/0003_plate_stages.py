"""Plate-scope stages: a pipeline's scope, a run's gate, and site jobs that
belong to a whole plate (no site).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 13:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.add_column(sa.Column("scope", sa.SmallInteger(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("scope_reasons", sa.JSON(), nullable=True))
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("gate", sa.SmallInteger(), nullable=False, server_default="1"))
    with op.batch_alter_table("site_jobs") as batch:
        batch.alter_column(
            "site_id",
            existing_type=sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=True,
        )


def downgrade() -> None:
    with op.batch_alter_table("site_jobs") as batch:
        batch.alter_column(
            "site_id",
            existing_type=sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
        )
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("gate")
    with op.batch_alter_table("pipelines") as batch:
        batch.drop_column("scope_reasons")
        batch.drop_column("scope")
