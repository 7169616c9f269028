"""Sites keep their metadata (the ingest pattern's other named groups, e.g.
Timepoint or Compound), which pipelines see as Metadata_<name>; pipelines
keep the metadata keys their Groups module groups by.

Revision ID: 0006
Revises: 0007
Create Date: 2026-12-03 19:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sites") as batch:
        batch.add_column(sa.Column("metadata", sa.JSON(), nullable=True))
    with op.batch_alter_table("pipelines") as batch:
        batch.add_column(sa.Column("group_by", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.drop_column("group_by")
    with op.batch_alter_table("sites") as batch:
        batch.drop_column("metadata")
