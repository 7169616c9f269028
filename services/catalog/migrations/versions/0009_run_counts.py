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

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The count columns, with the integer of the SiteState they count.
STATES = (
    ("waiting", 1),
    ("ready", 2),
    ("claimed", 3),
    ("queued", 4),
    ("running", 5),
    ("done", 6),
    ("failed", 7),
)
TRIGGERS = ("run_counts_on_run", "run_counts_on_job_insert", "run_counts_on_job_update", "run_counts_on_job_delete")


def _sets(row: str, sign: str) -> str:
    """`waiting = waiting + (NEW.state = 1), …`: both dialects read a comparison as 0 or 1."""
    return ", ".join(f"{name} = {name} {sign} ({row}.state = {value})" for name, value in STATES)


def _bodies() -> dict[str, list[str]]:
    add_new = f"UPDATE run_counts SET {_sets('NEW', '+')} WHERE run_id = NEW.run_id"
    drop_old = f"UPDATE run_counts SET {_sets('OLD', '-')} WHERE run_id = OLD.run_id"
    return {
        "run_counts_on_run": ["INSERT INTO run_counts (run_id) VALUES (NEW.id)"],
        "run_counts_on_job_insert": [add_new],
        "run_counts_on_job_update": [drop_old, add_new],
        "run_counts_on_job_delete": [drop_old],
    }


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
    mysql = op.get_bind().dialect.name == "mysql"
    bodies = _bodies()
    events = {
        "run_counts_on_run": ("INSERT", "runs", ""),
        "run_counts_on_job_insert": ("INSERT", "site_jobs", ""),
        "run_counts_on_job_update": ("UPDATE", "site_jobs", "NEW.state <> OLD.state OR NEW.run_id <> OLD.run_id"),
        "run_counts_on_job_delete": ("DELETE", "site_jobs", ""),
    }
    for name, (event, table, when) in events.items():
        statements = bodies[name]
        if mysql:
            body = "; ".join(statements) + ";"
            if when:
                body = f"IF {when} THEN {body} END IF;"
            op.execute(f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW BEGIN {body} END")
        else:
            of = " OF state, run_id" if event == "UPDATE" else ""
            condition = f" WHEN {when}" if when else ""
            body = "; ".join(statements) + ";"
            op.execute(f"CREATE TRIGGER {name} AFTER {event}{of} ON {table} FOR EACH ROW{condition} BEGIN {body} END")


def downgrade() -> None:
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("run_counts")
