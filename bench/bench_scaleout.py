"""Scale-out: the local mesh with 1, 2 and 4 workers on the same generated
plate, beside CellProfiler alone running the same sites as one batch
(`cellprofiler -c -r` over the whole folder).

    .venv/bin/python bench/bench_scaleout.py [--rows 4 --columns 6 --sites 2 --workers 1,2,4]

Per site: *transfers* is the time a worker spends fetching, checking and
storing a site's files (overlapped with another site's CellProfiler run);
*overhead* is workers x wall time / sites minus CellProfiler's mean run time:
the time a CellProfiler slot is not running CellProfiler (dispatch, transfers
not hidden, ramp-up and ramp-down).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cellmesh import pages
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.common import synth  # noqa: E402
from services.common.s3 import ObjectStore  # noqa: E402
from services.mesh import microscope  # noqa: E402
from services.mesh.demo import DemoOptions, start_mesh, stop_mesh  # noqa: E402

PIPELINE = REPO / "examples" / "pipelines" / "nuclei.cppipe"


def cp_python() -> str:
    value = os.environ.get("CP_PYTHON") or (REPO / "var" / "cp_python").read_text().strip()
    return value


def cellprofiler_batch(folder: Path, sites: int) -> float:
    """Seconds per site of one `cellprofiler -c -r` over the whole folder."""
    out = Path(tempfile.mkdtemp(prefix="cp-batch-"))
    t0 = time.perf_counter()
    subprocess.run(
        [
            cp_python(),
            "-m",
            "cellprofiler",
            "-c",
            "-r",
            "-p",
            str(PIPELINE),
            "-i",
            str(folder),
            "-o",
            str(out),
            "-L",
            "WARNING",
        ],
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return elapsed / sites


async def run_mesh(workers: int, rows: int, columns: int, sites_per_well: int, size: int) -> dict[str, float]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"scaleout-{workers}-"))
    options = DemoOptions(
        run_dir=run_dir,
        cp_python=cp_python(),
        workers=workers,
        rows=rows,
        columns=columns,
        sites=sites_per_well,
        size=size,
    )
    mesh = await start_mesh(options)
    try:
        async with mesh.channel() as channel, ObjectStore(mesh.s3) as store:
            catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
            pipeline = await catalog.RegisterPipeline(
                catalog_pb2.RegisterPipelineRequest(name="nuclei", content=PIPELINE.read_bytes())
            )
            await catalog.CreatePlate(
                catalog_pb2.CreatePlateRequest(
                    name="SCALE",
                    channels=list(synth.CHANNELS),
                    layout=catalog_pb2.PlateLayout(rows=rows, columns=columns, sites_per_well=sites_per_well),
                    pipeline_sha256=pipeline.pipeline.ref.sha256,
                    reduce_with_failures=True,
                )
            )
            wells = microscope.plate_wells(rows, columns)
            sites = await asyncio.to_thread(
                microscope.generate_plate, run_dir / "img", "SCALE", wells, sites_per_well, size, 0
            )
            # Upload first, then register everything at once: the clock measures the mesh, not the feed.
            t0 = time.perf_counter()
            await microscope.acquire(store, catalog, "SCALE", sites, images_per_second=10_000)
            while True:
                progress = (
                    await catalog.GetPlateProgress(catalog_pb2.GetPlateProgressRequest(plate="SCALE"))
                ).progress
                if progress.done + progress.failed == progress.total:
                    break
                await asyncio.sleep(0.2)
            wall = time.perf_counter() - t0
            jobs = await pages.all_site_jobs(
                catalog, catalog_pb2.ListSitesRequest(plate="SCALE", with_results=True)
            )
        n = len(jobs)
        run = [j.provenance.run_seconds for j in jobs]
        transfers = [j.provenance.download_seconds + j.provenance.upload_seconds for j in jobs]
        mean_run = statistics.mean(run)
        return {
            "workers": workers,
            "sites": n,
            "failed": progress.failed,
            "wall": wall,
            "sites_per_min": n / wall * 60,
            "cp_mean": mean_run,
            "transfers": statistics.mean(transfers),
            "e2e_overhead": workers * wall / n - mean_run,
        }
    finally:
        await stop_mesh(mesh)
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--columns", type=int, default=6)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    n_sites = args.rows * args.columns * args.sites
    folder = Path(tempfile.mkdtemp(prefix="cp-batch-in-"))
    microscope.generate_plate(
        folder, "SCALE", microscope.plate_wells(args.rows, args.columns), args.sites, args.size, 0
    )
    batch_per_site = cellprofiler_batch(folder, n_sites)
    shutil.rmtree(folder, ignore_errors=True)
    rows = [
        asyncio.run(run_mesh(int(w), args.rows, args.columns, args.sites, args.size))
        for w in args.workers.split(",")
    ]
    cores = os.cpu_count() or 1
    print(f"\n{n_sites} sites of {args.size}x{args.size} px, 2 channels, nuclei pipeline; {cores} cores\n")
    print(
        "| run | sites/min | wall s | CP s/site | transfers s/site (overlapped) | overhead s/site (% of CP) | failed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| CellProfiler alone, one `cellprofiler -c -r` batch | {60 / batch_per_site:.1f} | {batch_per_site * n_sites:.1f} | {batch_per_site:.3f} | – | – | – |"
    )
    for r in rows:
        print(
            f"| mesh, {r['workers']} worker(s) | {r['sites_per_min']:.1f} | {r['wall']:.1f} | {r['cp_mean']:.3f} | "
            f"{r['transfers']:.3f} | "
            f"{r['e2e_overhead']:.3f} ({100 * r['e2e_overhead'] / r['cp_mean']:.1f} %) | {r['failed']:.0f} |"
        )


if __name__ == "__main__":
    main()
