"""Per-site wall time of the three ways to run CellProfiler 4.2.8.1 on a site.

    python bench/bench_cp_modes.py [--sites 10] [--size 512]

Generates N two-channel sites (services/common/synth.py) in one folder and runs
examples/pipelines/nuclei.cppipe on them:

* warm  - WarmRunner: one CellProfiler process, JVM started once, site after site
* cold  - ColdRunner: one `cellprofiler -c -r` process per site (Distributed-CellProfiler)
* batch - one `cellprofiler -c -r -i FOLDER` over all N sites (no per-site results)

and prints a markdown table. Every site's nuclei count is checked against what
was drawn. CellProfiler comes from CP_PYTHON or scripts/install_cellprofiler.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cellprofiler_python() -> Path:
    if os.environ.get("CP_PYTHON"):
        return Path(os.environ["CP_PYTHON"])
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "install_cellprofiler.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def counts_by_image(image_csv: Path) -> list[int]:
    with image_csv.open(newline="") as fh:
        return [int(float(row["Count_Nuclei"])) for row in csv.DictReader(fh)]


async def bench(cp_python: Path, n_sites: int, size: int, work: Path) -> list[tuple[str, float, float, str]]:
    from services.common import synth
    from services.cpworker.runner import ColdRunner, WarmRunner, judge_outputs

    pipeline = REPO / "examples" / "pipelines" / "nuclei.cppipe"
    folder = work / "sites"
    wells = [f"{'ABCDEFGH'[i % 8]}{1 + (i * 5) % 12:02d}" for i in range(n_sites)]
    sites: list[tuple[list[Path], int]] = []
    for well in wells:
        paths = synth.write_site(folder, "P1", well, 1, size=size)
        sites.append(([paths[c] for c in synth.CHANNELS], synth.nuclei_for(well, 1)))

    rows: list[tuple[str, float, float, str]] = []

    async def per_site(runner: WarmRunner | ColdRunner, label: str, note: str) -> None:
        t0 = time.perf_counter()
        for i, (files, drawn) in enumerate(sites):
            out = work / label / str(i)
            result = await runner.run_site(pipeline, files, out, 600)
            ok, why = judge_outputs(out, ("Image.csv", "Nuclei.csv"))
            if not (result.ok and ok):
                raise SystemExit(f"{label} site {i} failed: {result.reason or why}\n{result.stderr_tail}")
            if counts_by_image(out / "Image.csv") != [drawn]:
                raise SystemExit(
                    f"{label} site {i}: counted {counts_by_image(out / 'Image.csv')}, drew {drawn}"
                )
        total = time.perf_counter() - t0
        rows.append((label, total, total / n_sites, note))

    warm = WarmRunner(cp_python)
    t0 = time.perf_counter()
    await warm.start()
    startup = time.perf_counter() - t0
    try:
        await per_site(
            warm, "warm (WarmRunner)", f"after a {startup:.1f} s start (imports + JVM), not counted"
        )
    finally:
        await warm.close()

    await per_site(ColdRunner(cp_python), "cold (ColdRunner, 1 process/site)", "")

    rows.append(await asyncio.to_thread(batch, cp_python, pipeline, folder, work / "batch", sites))
    return rows


def batch(
    cp_python: Path, pipeline: Path, folder: Path, out: Path, sites: list[tuple[list[Path], int]]
) -> tuple[str, float, float, str]:
    from services.cpworker.runner import child_environment, judge_outputs

    n_sites = len(sites)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(cp_python), "-m", "cellprofiler", "-c", "-r", "-p", str(pipeline), "-i", str(folder),
         "-o", str(out), "-d", str(out / "cellmesh_done.txt"), "-L", "WARNING"],
        capture_output=True, text=True, env=child_environment(),
    )  # fmt: skip
    total = time.perf_counter() - t0
    ok, why = judge_outputs(out, ("Image.csv", "Nuclei.csv"))
    if proc.returncode != 0 or not ok:
        raise SystemExit(f"batch failed ({proc.returncode}): {why}\n{proc.stdout[-2000:]}")
    counted = counts_by_image(out / "Image.csv")
    if sorted(counted) != sorted(d for _, d in sites):
        raise SystemExit(f"batch counted {counted}, drew {[d for _, d in sites]}")
    return ("batch (1 `cellprofiler -c -r` over the folder)", total, total / n_sites, "one result set")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    cp_python = cellprofiler_python()
    with tempfile.TemporaryDirectory(prefix="cellmesh-bench-") as tmp:
        rows = asyncio.run(bench(cp_python, args.sites, args.size, Path(tmp)))
    warm_per_site = rows[0][2]
    print(f"CellProfiler 4.2.8.1, {args.sites} sites of {args.size}x{args.size} px, 2 channels, "
          f"examples/pipelines/nuclei.cppipe, {os.cpu_count()} cores\n")  # fmt: skip
    print("| mode | total s | per site s | × warm | note |")
    print("|---|---:|---:|---:|---|")
    for label, total, per, note in rows:
        print(f"| {label} | {total:.2f} | {per:.3f} | {per / warm_per_site:.1f} | {note} |")


if __name__ == "__main__":
    main()
