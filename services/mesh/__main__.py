"""`python -m services.mesh demo`: the whole mesh on this machine, one plate
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

from services.common import logs
from services.mesh.demo import DemoOptions, run_demo

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
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
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
    )
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
