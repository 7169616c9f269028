"""Measures reduce_plate's peak memory on a generated plate, in a process of
its own: ``python -m tests.reducer.memory_child WELLS OUT_DIR``. Prints JSON:
the peak of Python allocations (tracemalloc, numpy included), the peak of
Arrow's memory pool, and the plate's CSV bytes."""

from __future__ import annotations

import asyncio
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas  # noqa: F401  (pyarrow imports it on first use: a one-time cost, not measured)
import pyarrow as pa

from services.reducer import testdata
from services.reducer.reduce import FileRef, ReduceOptions, SiteInput, reduce_plate
from services.reducer.tables import row_label

SITES = 2
OBJECTS = 300
FEATURES = 20
# Small chunks and row groups, so that the bound shows on a test-sized plate.
OPTIONS = ReduceOptions(chunk_bytes=256 << 10, row_group_bytes=512 << 10, fetch_ahead=4, csv_gzip_level=None)


def main(wells: int, out: Path) -> None:
    rows, cols = {96: (8, 12), 384: (16, 24)}[wells]
    rng = np.random.default_rng(5)
    pool = [testdata.fast_object_csv(OBJECTS, FEATURES, rng) for _ in range(8)]
    names = [f"{row_label(r)}{c + 1:02d}" for r in range(rows) for c in range(cols)]
    sites = [
        SiteInput("M", w, s, {"Image": FileRef(f"{w}/{s}/Image.csv"), "Cells": FileRef(f"{w}/{s}/Cells.csv")})
        for w in names
        for s in range(1, SITES + 1)
    ]
    images = {
        s.well: testdata.image_csv({"Cells": OBJECTS}, metadata={"Metadata_Well": s.well}) for s in sites
    }
    total = 0

    async def fetch(key: str, sha256: str) -> bytes:
        nonlocal total
        well, site, name = key.split("/")
        data = images[well] if name == "Image.csv" else pool[(hash(well) + int(site)) % len(pool)]
        total += len(data)
        return data

    tracemalloc.start()
    result = asyncio.run(reduce_plate(sites, fetch, out, options=OPTIONS))
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        json.dumps(
            {
                "python_peak": python_peak,
                "arrow_peak": pa.default_memory_pool().max_memory(),
                "input_bytes": total,
                "rows": result.tables["Cells"].rows,
            }
        )
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
