"""Plate stages per group: a plate-scope job may cover one group of sites
(`site_jobs.group_key`), and each job keeps the gate it last ran under
(`site_jobs.gate`), so stages gate and release a plate group by group.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 19:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from services.catalog.counts_ddl import create_triggers

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("site_jobs") as batch:
        batch.add_column(sa.Column("group_key", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("gate", sa.SmallInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("site_jobs") as batch:
        batch.drop_column("gate")
        batch.drop_column("group_key")
    # SQLite rebuilt site_jobs without the run counts' triggers.
    create_triggers(op)
