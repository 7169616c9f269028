"""`python -m services.catalog serve` runs the catalog;
`python -m services.catalog migrate` upgrades its database schema and exits.
Settings come from the environment (see services/catalog/app.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.catalog import app, migrate
from services.common import logs
from services.common.settings import SettingsError, load


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.catalog", description=__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "migrate"))
    args = parser.parse_args(argv)
    try:
        if args.command == "migrate":
            values = load(app.DATABASE_VARS)
            logs.configure(values["LOG_LEVEL"], "catalog")
            asyncio.run(migrate.upgrade(values["DATABASE_URL"]))
            return 0
        settings = app.CatalogSettings.from_env()
    except SettingsError as exc:
        sys.stderr.write(f"catalog: {exc}\n")
        return 2
    logs.configure(settings.log_level, "catalog")
    asyncio.run(app.main(settings))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
