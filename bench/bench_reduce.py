"""Reducer benchmark: ``reduce_plate`` beside a naive pandas reduce, same plates, same run.

    .venv/bin/python bench/bench_reduce.py            # 96, 384 and 1,536 wells
    .venv/bin/python bench/bench_reduce.py --quick    # a small smoke run

Each plate is generated per-site tables as CellProfiler's ExportToSpreadsheet
writes them: an ``Image.csv`` (one row, ``Count_Cells``, metadata) and a
``Cells.csv`` object table (``ImageNumber, ObjectNumber`` and 50 numeric
features) per site. The object tables are drawn from a pool of 16 distinct
files so that generating them does not dominate the run; the reducers parse
every site's bytes all the same. Sites are served from memory (no network).

Peers, each run in its own child process so that peak memory is its own
(peak RSS from ``getrusage``; "above start" subtracts the RSS the child had
after importing everything and building the pool):

* ``reduce_plate``: the reducer (Parquet + gzip CSV of both tables,
  per-well medians and counts, cells per well, summary);
* ``reduce_plate (Parquet only)``: the same without the CSV copies;
* ``naive pandas``: ``pandas.read_csv`` of every file, ``pandas.concat``,
  ``groupby([Metadata_Plate, Metadata_Well]).median()`` plus counts, and the
  concatenated Cells table written to Parquet.

Prints a markdown table. The 1,536-well plate keeps 9 sites per well but has
250 objects per site instead of 1,000, to keep the whole run within about ten
minutes on two cores. CPU seconds count every thread of the child.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

POOL = 16
FEATURES = 50


@dataclass(frozen=True)
class Case:
    wells: int
    sites: int
    objects: int

    @property
    def shape(self) -> tuple[int, int]:
        return {96: (8, 12), 384: (16, 24), 1536: (32, 48)}[self.wells]


FULL = [Case(96, 9, 1000), Case(384, 9, 1000), Case(1536, 9, 250)]
QUICK = [Case(96, 2, 200), Case(384, 2, 200)]
METHODS = ("reduce_plate", "reduce_plate_parquet", "naive")
LABELS = {
    "reduce_plate": "reduce_plate",
    "reduce_plate_parquet": "reduce_plate (Parquet only)",
    "naive": "naive pandas",
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(method: str, case: Case, out: Path) -> dict[str, float]:
    import numpy as np
    import pandas as pd

    from services.reducer import testdata
    from services.reducer.reduce import FileRef, ReduceOptions, SiteInput, reduce_plate
    from services.reducer.tables import row_label

    rng = np.random.default_rng(7)
    pool = [testdata.fast_object_csv(case.objects, FEATURES, rng) for _ in range(POOL)]
    rows, cols = case.shape
    wells = [f"{row_label(r)}{c + 1:02d}" for r in range(rows) for c in range(cols)]
    sites = [(w, s) for w in wells for s in range(1, case.sites + 1)]

    def image(well: str, site: int) -> bytes:
        return testdata.image_csv(
            {"Cells": case.objects},
            metadata={"Metadata_Well": well, "Metadata_Site": site, "Metadata_Plate": "BENCH"},
            features={"Intensity_MeanIntensity_DNA": 0.1 + site / 100},
        )

    def blob(key: str) -> bytes:
        _, well, site, name = key.split("/")
        if name == "Image.csv":
            return image(well, int(site))
        return pool[hash((well, site)) % POOL]

    async def fetch(key: str, sha256: str) -> bytes:
        return blob(key)

    start_rss = _rss_mb()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    n_rows = 0
    if method.startswith("reduce_plate"):
        inputs = [
            SiteInput(
                "BENCH",
                w,
                s,
                {"Image": FileRef(f"r/{w}/{s}/Image.csv"), "Cells": FileRef(f"r/{w}/{s}/Cells.csv")},
            )
            for w, s in sites
        ]
        options = ReduceOptions(write_csv=method == "reduce_plate")
        result = asyncio.run(reduce_plate(inputs, fetch, out, options=options))
        n_rows = result.tables["Cells"].rows
    else:
        cells, images = [], []
        for w, s in sites:
            for name, bucket in (("Cells.csv", cells), ("Image.csv", images)):
                df = pd.read_csv(io.BytesIO(blob(f"r/{w}/{s}/{name}")))
                df["Metadata_Plate"], df["Metadata_Well"], df["Metadata_Site"] = "BENCH", w, s
                bucket.append(df)
        for name, frames in (("Cells", cells), ("Image", images)):
            table = pd.concat(frames, ignore_index=True)
            frames.clear()
            strata = ["Metadata_Plate", "Metadata_Well"]
            features = [
                c
                for c in table.columns
                if not c.startswith("Metadata_") and c not in ("ImageNumber", "ObjectNumber")
            ]
            grouped = table.groupby(strata)
            medians = grouped[features].median()
            medians.insert(0, "Metadata_Object_Count", grouped.size())
            medians.to_csv(out / f"wells_{name}.csv")
            table.to_parquet(out / f"{name}.parquet")
            if name == "Cells":
                n_rows = len(table)
            del table
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    return {"seconds": seconds, "cpu": cpu, "peak_mb": _peak_mb(), "start_mb": start_rss, "rows": n_rows}


def run_case(method: str, case: Case, timeout: float) -> dict[str, float] | str:
    with tempfile.TemporaryDirectory(prefix="bench-reduce-") as tmp:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            method,
            str(case.wells),
            str(case.sites),
            str(case.objects),
            tmp,
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return f"over {timeout:.0f} s"
        if done.returncode != 0:
            return (
                f"failed ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})"
            )
        result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small plates, for a smoke run")
    parser.add_argument(
        "--child", nargs=5, metavar=("METHOD", "WELLS", "SITES", "OBJECTS", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per case and peer")
    args = parser.parse_args()
    if args.child:
        method, wells, sites, objects, out = args.child
        result = child(method, Case(int(wells), int(sites), int(objects)), Path(out))
        print(json.dumps(result))
        return

    cases = QUICK if args.quick else FULL
    print(f"cellmesh reducer benchmark — {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}")
    print()
    print(
        "| wells | sites/well | objects/site | object rows | peer | time (s) | CPU (s) | peak RSS (MB) | RSS above start (MB) |"
    )
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    started = time.perf_counter()
    for case in cases:
        for method in METHODS:
            r = run_case(method, case, args.timeout)
            rows = case.wells * case.sites * case.objects
            head = f"| {case.wells} | {case.sites} | {case.objects} | {rows:,} | {LABELS[method]} "
            if isinstance(r, str):
                print(head + f"| {r} | | | |")
            else:
                print(
                    head
                    + f"| {r['seconds']:.1f} | {r['cpu']:.1f} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['start_mb']:.0f} |"
                )
            sys.stdout.flush()
    print()
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
