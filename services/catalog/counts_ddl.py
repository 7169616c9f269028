"""The triggers that keep `run_counts` (each run's jobs per state), for the
migrations: 0009 creates them, and a migration that rebuilds `site_jobs` on
SQLite (Alembic's batch mode copies the table, and its triggers go with the
old one) creates them again with `create_triggers`."""

from __future__ import annotations

from typing import Any

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
TRIGGERS = (
    "run_counts_on_run",
    "run_counts_on_job_insert",
    "run_counts_on_job_update",
    "run_counts_on_job_delete",
)


def _sets(row: str, sign: str) -> str:
    """`waiting = waiting + (NEW.state = 1), …`: both dialects read a comparison as 0 or 1."""
    return ", ".join(f"{name} = {name} {sign} ({row}.state = {value})" for name, value in STATES)


def trigger_statements(mysql: bool) -> list[str]:
    """CREATE TRIGGER statements for MariaDB (`mysql`) or SQLite."""
    add_new = f"UPDATE run_counts SET {_sets('NEW', '+')} WHERE run_id = NEW.run_id"
    drop_old = f"UPDATE run_counts SET {_sets('OLD', '-')} WHERE run_id = OLD.run_id"
    triggers = {
        "run_counts_on_run": ("INSERT", "runs", "", ["INSERT INTO run_counts (run_id) VALUES (NEW.id)"]),
        "run_counts_on_job_insert": ("INSERT", "site_jobs", "", [add_new]),
        "run_counts_on_job_update": (
            "UPDATE",
            "site_jobs",
            "NEW.state <> OLD.state OR NEW.run_id <> OLD.run_id",
            [drop_old, add_new],
        ),
        "run_counts_on_job_delete": ("DELETE", "site_jobs", "", [drop_old]),
    }
    statements = []
    for name, (event, table, when, body_statements) in triggers.items():
        body = "; ".join(body_statements) + ";"
        if mysql:
            if when:
                body = f"IF {when} THEN {body} END IF;"
            statements.append(f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW BEGIN {body} END")
        else:
            of = " OF state, run_id" if event == "UPDATE" else ""
            condition = f" WHEN {when}" if when else ""
            statements.append(
                f"CREATE TRIGGER {name} AFTER {event}{of} ON {table} FOR EACH ROW{condition} BEGIN {body} END"
            )
    return statements


def drop_triggers(op: Any) -> None:
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")


def create_triggers(op: Any) -> None:
    """(Re)creates the triggers (dropping any left) in the migration's database."""
    drop_triggers(op)
    for statement in trigger_statements(op.get_bind().dialect.name == "mysql"):
        op.execute(statement)
