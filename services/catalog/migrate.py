"""Schema migrations: `upgrade(url)` brings a catalog database to the newest
revision (Alembic, sharing the catalog's async engine)."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection

from services.catalog.store import make_engine

log = logging.getLogger(__name__)


class _QuietPrimaryKeyName(logging.Filter):
    """MariaDB names every primary key PRIMARY; Alembic's version table asks
    for another name and the driver logs the server's note. Nothing to fix."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "ignored for PRIMARY key" not in record.getMessage()


MIGRATIONS = Path(__file__).with_name("migrations")
LOCK_NAME = "cellmesh-catalog-migrate"
LOCK_TIMEOUT_S = 120


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


async def upgrade(url: str, revision: str = "head") -> None:
    """Upgrades the database at `url`. On MariaDB a named lock makes
    replicas that start together migrate one after the other."""
    config = alembic_config(url)
    engine = make_engine(url)
    quiet = _QuietPrimaryKeyName()
    driver_log = logging.getLogger("asyncmy")
    driver_log.addFilter(quiet)
    try:
        async with engine.connect() as connection:
            mysql = connection.dialect.name == "mysql"
            if mysql:
                got = await connection.scalar(
                    text("SELECT GET_LOCK(:name, :timeout)"), {"name": LOCK_NAME, "timeout": LOCK_TIMEOUT_S}
                )
                if got != 1:
                    raise RuntimeError(f"another process holds the migration lock {LOCK_NAME!r}; try again")
            try:

                def run(sync_connection: Connection) -> None:
                    config.attributes["connection"] = sync_connection
                    command.upgrade(config, revision)

                await connection.run_sync(run)
                await connection.commit()
            finally:
                if mysql:
                    await connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": LOCK_NAME})
        log.info("catalog database is at revision %s", revision)
    finally:
        driver_log.removeFilter(quiet)
        await engine.dispose()


async def current(url: str) -> str | None:
    """The database's revision, None if it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        async with engine.connect() as connection:

            def read(sync_connection: Connection) -> str | None:
                return MigrationContext.configure(sync_connection).get_current_revision()

            return await connection.run_sync(read)
    finally:
        await engine.dispose()
