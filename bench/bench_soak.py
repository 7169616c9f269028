"""Soak: a generated plate through the local mesh while a CellProfiler worker
is killed (SIGKILL) and restarted every few seconds. Reports sites/minute,
redelivered tasks, duplicates absorbed and sites lost (must be 0), beside the
same plate with no kills, measured in the same run.

    .venv/bin/python bench/bench_soak.py [--rows 16 --columns 24 --sites 4 --kill-every 5 --max-minutes 30]

Bounded: it stops killing when the plate completes and gives up after
--max-minutes. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from cellmesh import pages
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.common import synth  # noqa: E402
from services.common.s3 import ObjectStore  # noqa: E402
from services.mesh import microscope  # noqa: E402
from services.mesh.demo import DemoOptions, start_mesh, stop_mesh  # noqa: E402


def cp_python() -> str:
    return os.environ.get("CP_PYTHON") or (REPO / "var" / "cp_python").read_text().strip()


async def soak(args: argparse.Namespace, kill_every: float) -> dict[str, float]:
    run_dir = Path(tempfile.mkdtemp(prefix="soak-"))
    opts = DemoOptions(run_dir=run_dir, cp_python=cp_python(), workers=args.workers, size=args.size)
    mesh = await start_mesh(opts)
    kills = 0
    try:
        async with mesh.channel() as channel, ObjectStore(mesh.s3) as store:
            catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
            pipeline = await catalog.RegisterPipeline(
                catalog_pb2.RegisterPipelineRequest(
                    name="nuclei", content=(REPO / "examples/pipelines/nuclei.cppipe").read_bytes()
                )
            )
            await catalog.CreatePlate(
                catalog_pb2.CreatePlateRequest(
                    name="SOAK",
                    channels=list(synth.CHANNELS),
                    layout=catalog_pb2.PlateLayout(
                        rows=args.rows, columns=args.columns, sites_per_well=args.sites
                    ),
                    pipeline_sha256=pipeline.pipeline.ref.sha256,
                    reduce_with_failures=True,
                )
            )
            wells = microscope.plate_wells(args.rows, args.columns)
            sites = await asyncio.to_thread(
                microscope.generate_plate, run_dir / "img", "SOAK", wells, args.sites, args.size, 0
            )
            t0 = time.perf_counter()
            await microscope.acquire(store, catalog, "SOAK", sites, images_per_second=10_000)
            deadline = t0 + args.max_minutes * 60
            next_kill = time.perf_counter() + kill_every if kill_every else float("inf")
            rng = random.Random(0)
            while True:
                progress = (
                    await catalog.GetPlateProgress(catalog_pb2.GetPlateProgressRequest(plate="SOAK"))
                ).progress
                if progress.complete:
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"soak did not finish in {args.max_minutes} min: {progress}")
                if time.perf_counter() >= next_kill:
                    victim = rng.choice([p for p in mesh.procs.procs if p.name.startswith("cpworker")])
                    if victim.popen is not None and victim.popen.poll() is None:
                        os.kill(victim.popen.pid, signal.SIGKILL)
                        await asyncio.to_thread(victim.popen.wait)
                        kills += 1
                    victim.start()  # back at once; it warms up and takes tasks again
                    next_kill = time.perf_counter() + kill_every
                await asyncio.sleep(0.2)
            wall = time.perf_counter() - t0
            jobs = await pages.all_site_jobs(
                catalog, catalog_pb2.ListSitesRequest(plate="SOAK", with_results=True)
            )
        logs = "".join(
            p.log_path.read_text(errors="replace") for p in mesh.procs.procs if p.name.startswith("cpworker")
        )
        done = [j for j in jobs if j.state == types_pb2.SITE_STATE_DONE and j.results]
        drawn = {(s.well, s.site): s.nuclei for s in sites}
        wrong = sum(
            1 for j in done if j.provenance.object_counts.get("Nuclei") != drawn[(j.site.well, j.site.site)]
        )
        return {
            "sites": len(sites),
            "wall": wall,
            "sites_per_min": len(sites) / wall * 60,
            "kills": kills,
            "redelivered": logs.count("redelivered task:"),
            "duplicates": logs.count("skipping "),
            "failed": sum(1 for j in jobs if j.state == types_pb2.SITE_STATE_FAILED),
            "lost": len(sites) - len(done),
            "wrong_counts": wrong,
        }
    finally:
        await stop_mesh(mesh)
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--columns", type=int, default=24)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=5.0)
    parser.add_argument("--max-minutes", type=float, default=30.0)
    args = parser.parse_args()
    calm = asyncio.run(soak(args, 0))
    chaos = asyncio.run(soak(args, args.kill_every))
    print(
        f"\n{calm['sites']:.0f} sites ({args.rows * args.columns} wells x {args.sites}), {args.workers} workers, "
        f"{args.size} px, nuclei pipeline\n"
    )
    print(
        "| run | sites/min | wall s | worker kills | redelivered | duplicates absorbed | failed | lost | counts wrong |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in (("no faults", calm), (f"a worker killed every {args.kill_every:g} s", chaos)):
        print(
            f"| {name} | {r['sites_per_min']:.0f} | {r['wall']:.0f} | {r['kills']:.0f} | {r['redelivered']:.0f} | "
            f"{r['duplicates']:.0f} | {r['failed']:.0f} | {r['lost']:.0f} | {r['wrong_counts']:.0f} |"
        )


if __name__ == "__main__":
    main()
