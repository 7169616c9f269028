"""Site jobs count their free attempts (transient failures, lost tasks) apart
from the charged ones, remember when a run of transient failures began, and
keep the outcome of their last failed attempt so a replayed FailSiteJob gets
the same answer.

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-03 19:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("site_jobs") as batch:
        batch.add_column(sa.Column("free_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("transient_since", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("last_failure", sa.JSON(), nullable=True))
        batch.create_index("ix_site_jobs_state_expires", ["state", "claim_expires_at"])


def downgrade() -> None:
    with op.batch_alter_table("site_jobs") as batch:
        batch.drop_index("ix_site_jobs_state_expires")
        batch.drop_column("last_failure")
        batch.drop_column("transient_since")
        batch.drop_column("free_attempts")
