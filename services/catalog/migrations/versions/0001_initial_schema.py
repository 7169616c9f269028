"""Initial schema: pipelines, plates, runs, sites, images, site jobs, reports.

Revision ID: 0001
Revises:
Create Date: 2026-11-24 20:26:31.130254
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pipelines",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=1024), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("modules", sa.JSON(), nullable=False),
        sa.Column("image_names", sa.JSON(), nullable=False),
        sa.Column("tables", sa.JSON(), nullable=False),
        sa.Column("table_files", sa.JSON(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime()
            .with_variant(mysql.DATETIME(fsp=6), "mariadb")
            .with_variant(mysql.DATETIME(fsp=6), "mysql"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sha256", name=op.f("uq_pipelines_sha256")),
        mysql_charset="utf8mb4",
        mysql_engine="InnoDB",
    )
    op.create_table(
        "plates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("channels", sa.JSON(), nullable=False),
        sa.Column("layout", sa.JSON(), nullable=True),
        sa.Column("sites_known", sa.Boolean(), nullable=False),
        sa.Column("acquisition_finished", sa.Boolean(), nullable=False),
        sa.Column("reduce_with_failures", sa.Boolean(), nullable=False),
        sa.Column("image_count", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime()
            .with_variant(mysql.DATETIME(fsp=6), "mariadb")
            .with_variant(mysql.DATETIME(fsp=6), "mysql"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", name=op.f("uq_plates_name")),
        mysql_charset="utf8mb4",
        mysql_engine="InnoDB",
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("plate_id", sa.Integer(), nullable=False),
        sa.Column("pipeline_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("reduced_generation", sa.Integer(), nullable=False),
        sa.Column("reduce_claimed_by", sa.String(length=200), nullable=True),
        sa.Column("reduce_claim_generation", sa.Integer(), nullable=False),
        sa.Column(
            "reduce_claim_expires_at",
            sa.DateTime()
            .with_variant(mysql.DATETIME(fsp=6), "mariadb")
            .with_variant(mysql.DATETIME(fsp=6), "mysql"),
            nullable=True,
        ),
        sa.Column("reduce_queued_generation", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime()
            .with_variant(mysql.DATETIME(fsp=6), "mariadb")
            .with_variant(mysql.DATETIME(fsp=6), "mysql"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["pipeline_id"], ["pipelines.id"], name=op.f("fk_runs_pipeline_id_pipelines")
        ),
        sa.ForeignKeyConstraint(["plate_id"], ["plates.id"], name=op.f("fk_runs_plate_id_plates")),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("plate_id", "pipeline_id", name=op.f("uq_runs_plate_id_pipeline_id")),
        mysql_charset="utf8mb4",
        mysql_engine="InnoDB",
    )
    op.create_index(op.f("ix_runs_pipeline_id"), "runs", ["pipeline_id"], unique=False)
    op.create_table(
        "sites",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("plate_id", sa.Integer(), nullable=False),
        sa.Column("well_row", sa.SmallInteger(), nullable=False),
        sa.Column("well_col", sa.SmallInteger(), nullable=False),
        sa.Column("site", sa.Integer(), nullable=False),
        sa.Column("well", sa.String(length=4), nullable=False),
        sa.ForeignKeyConstraint(["plate_id"], ["plates.id"], name=op.f("fk_sites_plate_id_plates")),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "plate_id", "well_row", "well_col", "site", name=op.f("uq_sites_plate_id_well_row_well_col_site")
        ),
        mysql_charset="utf8mb4",
        mysql_engine="InnoDB",
    )
    op.create_table(
        "images",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("site_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=1024), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("file_name", sa.String(length=255), nullable=False),
        sa.Column(
            "registered_at",
            sa.DateTime()
            .with_variant(mysql.DATETIME(fsp=6), "mariadb")
            .with_variant(mysql.DATETIME(fsp=6), "mysql"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_images_site_id_sites")),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("site_id", "channel", name=op.f("uq_images_site_id_channel")),
        mysql_charset="utf8mb4",
        mysql_engine="InnoDB",
    )
    op.create_table(
        "reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("wells", sa.Integer(), nullable=False),
        sa.Column("sites", sa.Integer(), nullable=False),
        sa.Column("missing_sites", sa.JSON(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime()
            .with_variant(mysql.DATETIME(fsp=6), "mariadb")
            .with_variant(mysql.DATETIME(fsp=6), "mysql"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_reports_run_id_runs")),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "generation", name=op.f("uq_reports_run_id_generation")),
        sa.UniqueConstraint("run_id", "version", name=op.f("uq_reports_run_id_version")),
        mysql_charset="utf8mb4",
        mysql_engine="InnoDB",
    )
    op.create_table(
        "site_jobs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column(
            "ready_at",
            sa.DateTime()
            .with_variant(mysql.DATETIME(fsp=6), "mariadb")
            .with_variant(mysql.DATETIME(fsp=6), "mysql"),
            nullable=True,
        ),
        sa.Column("claimed_by", sa.String(length=200), nullable=True),
        sa.Column(
            "claim_expires_at",
            sa.DateTime()
            .with_variant(mysql.DATETIME(fsp=6), "mariadb")
            .with_variant(mysql.DATETIME(fsp=6), "mysql"),
            nullable=True,
        ),
        sa.Column("worker_id", sa.String(length=200), nullable=True),
        sa.Column(
            "started_at",
            sa.DateTime()
            .with_variant(mysql.DATETIME(fsp=6), "mariadb")
            .with_variant(mysql.DATETIME(fsp=6), "mysql"),
            nullable=True,
        ),
        sa.Column(
            "finished_at",
            sa.DateTime()
            .with_variant(mysql.DATETIME(fsp=6), "mariadb")
            .with_variant(mysql.DATETIME(fsp=6), "mysql"),
            nullable=True,
        ),
        sa.Column("failure_class", sa.SmallInteger(), nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("results", sa.JSON(), nullable=True),
        sa.Column("provenance", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_site_jobs_run_id_runs")),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_site_jobs_site_id_sites")),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("site_id", "run_id", name=op.f("uq_site_jobs_site_id_run_id")),
        mysql_charset="utf8mb4",
        mysql_engine="InnoDB",
    )
    op.create_index("ix_site_jobs_run_id_state", "site_jobs", ["run_id", "state"], unique=False)
    # Serves the claim query: the oldest READY jobs first, whatever the table's size.
    op.create_index("ix_site_jobs_state_ready_at", "site_jobs", ["state", "ready_at"], unique=False)


def downgrade() -> None:
    op.drop_table("site_jobs")
    op.drop_table("reports")
    op.drop_table("images")
    op.drop_table("sites")
    op.drop_table("runs")
    op.drop_table("plates")
    op.drop_table("pipelines")
