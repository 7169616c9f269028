"""Every run keeps the count of its jobs in each state, maintained by the
database itself: triggers on site_jobs update one `run_counts` row per run in
the same transaction as the job's change, so GetPlateProgress and its
watchers read one row instead of counting every job of the plate.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 19:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from services.catalog.counts_ddl import STATES, create_triggers, drop_triggers

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

def upgrade() -> None:
    op.create_table(
        "run_counts",
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        *(sa.Column(name, sa.Integer(), nullable=False, server_default="0") for name, _ in STATES),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    # Existing runs start with their jobs counted.
    columns = ", ".join(name for name, _ in STATES)
    counts = ", ".join(
        f"(SELECT COUNT(*) FROM site_jobs j WHERE j.run_id = r.id AND j.state = {value})" for _, value in STATES
    )
    op.execute(f"INSERT INTO run_counts (run_id, {columns}) SELECT r.id, {counts} FROM runs r")
    create_triggers(op)


def downgrade() -> None:
    drop_triggers(op)
    op.drop_table("run_counts")
