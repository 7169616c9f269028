"""Pipelines carry the files they read (attachments), the .cppipe's own
SHA-256 when their identity is a manifest of it and its attachments, and the
names of the files they expect from an earlier plate stage.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 13:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.add_column(sa.Column("content_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("attachments", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("stage_inputs", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.drop_column("stage_inputs")
        batch.drop_column("attachments")
        batch.drop_column("content_sha256")
