"""`python -m services.catalog serve` runs the catalog;
`python -m services.catalog migrate` upgrades its database schema and exits;
`python -m services.catalog sweep [--grace-seconds S] [--dry-run]` deletes
result objects no catalog record points at (see services/catalog/sweep.py).
Settings come from the environment (see services/catalog/app.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.catalog import app, migrate
from services.common import logs
from services.common.s3 import ObjectMissing, ObjectStoreError, ObjectStoreMisconfigured, ObjectStoreRefused
from services.common.settings import SettingsError, load


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.catalog", description=__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "migrate", "sweep"))
    parser.add_argument(
        "--grace-seconds", type=float, help="sweep: only objects older than this (default SWEEP_GRACE_S)"
    )
    parser.add_argument("--dry-run", action="store_true", help="sweep: count orphans, delete nothing")
    args = parser.parse_args(argv)
    try:
        if args.command == "migrate":
            values = load(app.DATABASE_VARS)
            logs.configure(values["LOG_LEVEL"], "catalog")
            asyncio.run(migrate.upgrade(values["DATABASE_URL"]))
            return 0
        settings = app.CatalogSettings.from_env(serving=args.command == "serve")
    except SettingsError as exc:
        sys.stderr.write(f"catalog: {exc}\n")
        return 2
    logs.configure(settings.log_level, "catalog")
    if args.command == "sweep":
        try:
            print(asyncio.run(app.sweep_once(settings, args.grace_seconds, args.dry_run)))
        except (ObjectMissing, ObjectStoreError, ObjectStoreMisconfigured, ObjectStoreRefused) as exc:
            sys.stderr.write(f"catalog: sweep stopped: {exc} (check S3_ENDPOINT_URL and S3_BUCKET)\n")
            return 2
        return 0
    asyncio.run(app.main(settings))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
