"""The catalog's tables.

    pipelines   one row per .cppipe content and attachments (their SHA-256 is its identity)
    plates      name, channels, optional layout, acquisition state
    runs        one per (plate, pipeline): results generation, reduce bookkeeping
    sites       one per (plate, well, site) the catalog knows of, with its metadata
    images      one per (site, channel)
    site_jobs   one per (run, site) of a site-scope run, one per plate-scope run
                (site_id NULL): the state machine the scheduler and workers drive
    reports     plate reports, versioned per run

Timestamps are naive UTC. States and failure classes are stored as the
integers of the protobuf enums (`cellmesh.common.v1.SiteState`, `FailureClass`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Microsecond timestamps on MariaDB (its DATETIME keeps whole seconds by default).
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# A 64-bit key that is still SQLite's auto-incrementing INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
}
TABLE_OPTIONS: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: Timestamp}


class PipelineRow(Base):
    __tablename__ = "pipelines"
    __table_args__ = (TABLE_OPTIONS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    modules: Mapped[list[str]] = mapped_column(JSON)
    image_names: Mapped[list[str]] = mapped_column(JSON)
    tables: Mapped[list[str]] = mapped_column(JSON)
    table_files: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime]
    # The .cppipe's own SHA-256 when the pipeline has attachments (then
    # `sha256` is the manifest's); NULL when it is `sha256`.
    content_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The files it reads: [{"name", "key", "size", "sha256"}] by name; NULL: none.
    attachments: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    # Names of files it expects from an earlier plate stage; NULL: none.
    stage_inputs: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    # `domain.Scope`: one run per site, or one per plate (a plate stage).
    scope: Mapped[int] = mapped_column(SmallInteger, default=1, server_default="1")
    scope_reasons: Mapped[list[str] | None] = mapped_column(JSON)
    # The metadata keys its Groups module groups by (`cppipe.grouping_keys`); NULL: none.
    group_by: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)


class PlateRow(Base):
    __tablename__ = "plates"
    __table_args__ = (TABLE_OPTIONS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    channels: Mapped[list[str]] = mapped_column(JSON)
    layout: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    sites_known: Mapped[bool] = mapped_column(Boolean, default=False)
    acquisition_finished: Mapped[bool] = mapped_column(Boolean, default=False)
    reduce_with_failures: Mapped[bool] = mapped_column(Boolean, default=False)
    image_count: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime]
    # Who created it (the caller's token or certificate name; None before
    # migration 0009 or with AUTH=off): a scientist may requeue only their own.
    created_by: Mapped[str | None] = mapped_column(String(200))
    # The plate map ({"sha256", "source_name", "columns", "located_by",
    # "registered_at", "wells": [[well, [value per column]], ...]}); NULL: none.
    platemap: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The QC gate of its reports (domain.PlateInfo.qc_gate); NULL: none.
    qc_gate: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class RunRow(Base):
    """A (plate, pipeline) run. `generation` grows each time one of its sites
    settles; `reduced_generation` is the generation of its latest report."""

    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("plate_id", "pipeline_id"),
        TABLE_OPTIONS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    plate_id: Mapped[int] = mapped_column(ForeignKey("plates.id"))
    pipeline_id: Mapped[int] = mapped_column(ForeignKey("pipelines.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    reduced_generation: Mapped[int] = mapped_column(Integer, default=0)
    reduce_claimed_by: Mapped[str | None] = mapped_column(String(200))
    reduce_claim_generation: Mapped[int] = mapped_column(Integer, default=0)
    reduce_claim_expires_at: Mapped[datetime | None]
    reduce_queued_generation: Mapped[int] = mapped_column(Integer, default=0)
    # Times the reduce of `reduce_claim_generation` was issued, and why it
    # failed for good when it did (see services/catalog/lifecycle.py).
    reduce_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reduce_failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    # `domain.Gate`: whether the plate-scope stages before this run let its
    # jobs run (see CatalogStore._gate_stages).
    gate: Mapped[int] = mapped_column(SmallInteger, default=1, server_default="1")


class RunCountsRow(Base):
    """How many jobs of a run are in each state. Written only by the database's
    triggers on `site_jobs` and `runs` (migration 0009), in the transaction
    that changes a job; the catalog reads it and never writes it."""

    __tablename__ = "run_counts"
    __table_args__ = (TABLE_OPTIONS,)

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    waiting: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    ready: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    claimed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    queued: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    running: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class SiteRow(Base):
    __tablename__ = "sites"
    __table_args__ = (
        UniqueConstraint("plate_id", "well_row", "well_col", "site"),
        TABLE_OPTIONS,
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    plate_id: Mapped[int] = mapped_column(ForeignKey("plates.id"))
    well_row: Mapped[int] = mapped_column(SmallInteger)
    well_col: Mapped[int] = mapped_column(SmallInteger)
    site: Mapped[int] = mapped_column(Integer)
    well: Mapped[str] = mapped_column(String(4))
    # The site's other metadata ({"Timepoint": "T01", ...}, from the ingest
    # pattern's other groups); NULL: none. (`metadata` is taken by SQLAlchemy.)
    site_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)


class ImageRow(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("site_id", "channel"),
        TABLE_OPTIONS,
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    channel: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    file_name: Mapped[str] = mapped_column(String(255))
    registered_at: Mapped[datetime]


class SiteJobRow(Base):
    """One site processed with one pipeline. The (state, ready_at) index serves
    the claim query: the oldest READY jobs first, whatever the table's size."""

    __tablename__ = "site_jobs"
    __table_args__ = (
        UniqueConstraint("site_id", "run_id"),
        Index("ix_site_jobs_state_ready_at", "state", "ready_at"),
        Index("ix_site_jobs_run_id_state", "run_id", "state"),
        # The deadline scan of ClaimReadySites: in-flight jobs past their deadline.
        Index("ix_site_jobs_state_expires", "state", "claim_expires_at"),
        TABLE_OPTIONS,
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    # None for the one job of a plate-scope run (a plate stage).
    site_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id"))
    state: Mapped[int] = mapped_column(SmallInteger)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    ready_at: Mapped[datetime | None]
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claim_expires_at: Mapped[datetime | None]
    worker_id: Mapped[str | None] = mapped_column(String(200))
    # The execution that holds the current attempt (see StartSiteJob): a site
    # redelivered while an earlier execution may still run gets a new one.
    execution_id: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    failure_class: Mapped[int] = mapped_column(SmallInteger, default=0)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    # Attempts that do not count toward MAX_ATTEMPTS (see services/catalog/lifecycle.py).
    free_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When the current run of transient failures began (None: not in one).
    transient_since: Mapped[datetime | None]
    # The last failed attempt's call and answer, for replays of FailSiteJob.
    last_failure: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    results: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # Results of earlier runs of the site (before a requeue or a replaced
    # image): still registered, so the object sweep keeps them.
    past_results: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # A plate stage's job for one group of sites: the group's values of the
    # pipeline's grouping keys (`stages.group_key`); NULL: the whole plate,
    # or a site's job.
    group_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    # `domain.Gate` the job was last given on a plate whose stages group
    # (`stages.gate_stages`); NULL: the run's gate.
    gate: Mapped[int | None] = mapped_column(SmallInteger, nullable=True)


class ReportRow(Base):
    __tablename__ = "reports"
    __table_args__ = (
        UniqueConstraint("run_id", "version"),
        UniqueConstraint("run_id", "generation"),
        TABLE_OPTIONS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    version: Mapped[int] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(Integer)
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    wells: Mapped[int] = mapped_column(Integer)
    sites: Mapped[int] = mapped_column(Integer)
    missing_sites: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime]
    # The report's QC verdict (domain.Report.qc); NULL: not gated.
    qc: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
