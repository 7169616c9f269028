"""`python -m services.mesh up|down|status`: a local mesh for your own plates,
kept running until `down` (services/mesh/up.py).

`python -m services.mesh demo`: the whole mesh on this machine, one plate
through it, and a summary checked against the plate's ground truth.

Starts the project's S3 server, the catalog (SQLite unless --database-url),
the scheduler, N CellProfiler workers and the reducer as local processes,
feeds a generated plate the way a microscope would, follows its progress and
prints where the report is. Ctrl-C stops every process cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from cellmesh.meshconfig import config_path

from services.common import logs
from services.common.settings import S3Settings, SettingsError
from services.mesh.autoscale import AutoscaleSettings, parse_range
from services.mesh.demo import DemoOptions, run_demo
from services.mesh.up import AMQP_URL_ENV, DATABASE_URL_ENV, UpOptions, default_state_dir, down, status, up

log = logging.getLogger("services.mesh")

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.mesh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a whole plate through a local mesh")
    demo.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="CellProfiler workers (default: one per core)",
    )
    demo.add_argument(
        "--autoscale",
        type=_range,
        default=None,
        metavar="MIN:MAX",
        help="scale the workers between MIN and MAX with the backlog (instead of --workers; AUTOSCALE_* settings)",
    )
    demo.add_argument(
        "--mode", choices=("warm", "cold"), default="warm", help="warm CellProfiler or one process per site"
    )
    demo.add_argument("--rows", type=int, default=8, help="well rows of the generated plate (8 = 96 wells)")
    demo.add_argument("--columns", type=int, default=12, help="well columns of the generated plate")
    demo.add_argument("--sites", type=int, default=2, help="sites per well")
    demo.add_argument("--size", type=int, default=512, help="image side in pixels")
    demo.add_argument("--rate", type=float, default=40.0, help="images the 'microscope' delivers per second")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--example",
        choices=("generated", "bbbc013"),
        default="generated",
        help="bbbc013: the real BBBC013 half plate from ../shared/data instead of a generated one",
    )
    demo.add_argument(
        "--database-url", default="", help="catalog database (default: SQLite in the run folder)"
    )
    demo.add_argument(
        "--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    )
    demo.add_argument(
        "--run-dir", type=Path, default=None, help="where logs and the report go (default var/runs/TIME)"
    )
    demo.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    demo.add_argument(
        "--web-port", type=int, default=0, metavar="P", help="the web page's port (default: a free one)"
    )
    demo.add_argument(
        "--no-auth",
        action="store_true",
        help="run every service with AUTH=off: plain text, no certificates, no roles (default: TLS and roles,"
        " with a throw-away CA made for the mesh)",
    )

    state_help = "where the mesh keeps its catalog, logs and pids (default: $CELLMESH_STATE_DIR, else %s)"
    config_help = "the file the cellmesh command reads to find the mesh (default: $CELLMESH_CONFIG, else %s)"
    up = sub.add_parser(
        "up",
        help="start the local mesh and keep it running",
        description="Start the local mesh (the project's S3 server, the catalog on SQLite, the scheduler, "
        "CellProfiler workers, the reducer) in the background and keep it running until `down`; "
        "print where it is and write the file the cellmesh command reads.",
    )
    up.add_argument(
        "--workers", type=_positive, default=1, help="CellProfiler workers (default 1; one per core at most)"
    )
    up.add_argument(
        "--autoscale",
        type=_range,
        default=None,
        metavar="MIN:MAX",
        help="scale the workers between MIN and MAX with the backlog (instead of --workers); cool-downs and "
        "interval from AUTOSCALE_UP_COOLDOWN_S (15), AUTOSCALE_DOWN_COOLDOWN_S (60), AUTOSCALE_INTERVAL_S (5)",
    )
    up.add_argument(
        "--mode",
        choices=("warm", "cold"),
        default="warm",
        help="warm CellProfiler (default) or one process per site",
    )
    up.add_argument(
        "--database-url",
        default=os.environ.get(DATABASE_URL_ENV, ""),
        metavar="URL",
        help="the catalog's database, e.g. mysql+asyncmy://user:password@127.0.0.1:3306/cellmesh "
        "(default: SQLite in the state dir)",
    )
    up.add_argument(
        "--amqp-url",
        default=os.environ.get(AMQP_URL_ENV) or "amqp://guest:guest@127.0.0.1:5672/%2F",
        metavar="URL",
        help="RabbitMQ (default: the local one, guest/guest)",
    )
    up.add_argument(
        "--s3-endpoint",
        default=None,
        metavar="URL",
        help="an S3-compatible store of yours instead of the built-in one (moto, kept in the state dir at down; '' for AWS S3); "
        "its keys come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    )
    up.add_argument(
        "--s3-bucket", default=None, metavar="B", help="the bucket in that store (default cellmesh)"
    )
    up.add_argument("--s3-region", default="us-east-1", metavar="R", help="(default us-east-1)")
    up.add_argument("--state-dir", type=Path, default=None, help=state_help % default_state_dir())
    up.add_argument("--config", type=Path, default=None, help=config_help % config_path())
    up.add_argument("--foreground", action="store_true", help="stay in the foreground until Ctrl-C")
    up.add_argument(
        "--web-port", type=int, default=0, metavar="P", help="the web page's port (default: a free one)"
    )
    up.add_argument(
        "--no-auth",
        action="store_true",
        help="run every service with AUTH=off: plain text, no certificates, no roles (default: TLS and roles,"
        " with a throw-away CA made for the mesh)",
    )
    up.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="give up starting after S seconds (600)",
    )
    down = sub.add_parser("down", help="stop the local mesh, every process of it")
    down.add_argument("--state-dir", type=Path, default=None, help=state_help % default_state_dir())
    down.add_argument("--config", type=Path, default=None, help=config_help % config_path())
    down.add_argument(
        "--grace", type=float, default=300.0, metavar="S",
        help="seconds the mesh gets to stop in order (and keep the built-in store's files) before what is left is killed (300)",
    )  # fmt: skip
    status = sub.add_parser("status", help="what the local mesh runs, and where")
    status.add_argument("--state-dir", type=Path, default=None, help=state_help % default_state_dir())
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} workers: give at least 1")
    return value


def _range(text: str) -> tuple[int, int]:
    try:
        return parse_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _state_dir(args: argparse.Namespace) -> Path:
    return (args.state_dir or default_state_dir()).expanduser().resolve()


def main_local(args: argparse.Namespace) -> int:
    """up, down, status."""
    state_dir = _state_dir(args)
    if args.command == "status":
        return status(state_dir)
    config = (args.config or config_path()).expanduser().resolve()
    if args.command == "down":
        return down(state_dir, config, grace=args.grace)
    cp_python = os.environ.get("CP_PYTHON") or _read(REPO / "var" / "cp_python")
    if not cp_python:
        print("error: CellProfiler is not installed: run `make setup` (or set CP_PYTHON)", file=sys.stderr)
        return 2
    s3 = None
    if args.s3_endpoint is not None or args.s3_bucket is not None:
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if not key or not secret:
            print(
                "error: an external object store (--s3-endpoint/--s3-bucket) needs its keys in"
                " AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                file=sys.stderr,
            )
            return 2
        s3 = S3Settings(args.s3_endpoint or None, args.s3_bucket or "cellmesh", args.s3_region, key, secret)
    options = UpOptions(
        state_dir=state_dir,
        config=config,
        cp_python=cp_python,
        workers=args.workers,
        mode=args.mode,
        database_url=args.database_url,
        amqp_url=args.amqp_url,
        s3=s3,
        startup_timeout=args.startup_timeout,
        autoscale=args.autoscale,
        web_port=args.web_port,
        auth=not args.no_auth,
    )
    if args.autoscale is not None:
        try:  # the settings the supervisor will read, checked before it starts
            low, high = args.autoscale
            AutoscaleSettings.from_env({**os.environ, "AUTOSCALE_MIN": str(low), "AUTOSCALE_MAX": str(high)})
        except (ValueError, SettingsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return up(options, foreground=args.foreground)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.command in ("up", "down", "status"):
        return main_local(args)
    logs.configure("INFO", "mesh")
    run_dir = args.run_dir or REPO / "var" / "runs" / time.strftime("%Y%m%d-%H%M%S")
    cp_python = os.environ.get("CP_PYTHON") or _read(REPO / "var" / "cp_python")
    if not cp_python:
        print("error: CellProfiler is not installed: run `make setup` (or set CP_PYTHON)", file=sys.stderr)
        return 2
    options = DemoOptions(
        run_dir=run_dir,
        cp_python=cp_python,
        workers=args.workers,
        mode=args.mode,
        rows=args.rows,
        columns=args.columns,
        sites=args.sites,
        size=args.size,
        rate=args.rate,
        seed=args.seed,
        example=args.example,
        database_url=args.database_url,
        amqp_url=args.amqp_url,
        shared_data=Path(os.environ.get("CELLMESH_SHARED_DATA", REPO.parent / "shared" / "data")),
        web_port=args.web_port,
        auth=not args.no_auth,
    )
    if args.autoscale is not None:
        low, high = args.autoscale
        try:
            options.autoscale = AutoscaleSettings.from_env(
                {**os.environ, "AUTOSCALE_MIN": str(low), "AUTOSCALE_MAX": str(high)}
            )
        except (ValueError, SettingsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        summary = asyncio.run(run_demo(options))
    except KeyboardInterrupt:
        print("\nstopped; every process of the mesh was shut down", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if summary.get("ok") else 1


def _read(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    return ""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
