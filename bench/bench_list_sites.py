"""Plate-sized reads on the machine's MariaDB (a scratch database, dropped at
the end), through a real catalog gRPC server on loopback. One command, prints
a markdown table with the peer side by side: the same calls on a 96-well ×
1-site plate and on a 1,536-well × 16-site plate (5 channels each):

1. GetPlateProgress latency (median of 40, the two plates called in turn);
2. WatchPlateProgress update latency: a site is requeued, how long until the
   stream shows it (median of 10);
3. a full ListSites walk with result files, as the reducer does it (default
   pages of 500): pages, median and p90 latency per page, and the reducer's
   peak Python memory (tracemalloc) while it walks and keeps each site's
   inputs;
4. the same walk in pages of 96 jobs (the small plate's size), so that pages
   of equal size are compared: median, first tenth and last tenth.

    .venv/bin/python bench/bench_list_sites.py [--host 127.0.0.1 --port 3306]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

from cellmesh.auth import aio_channel
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2
from sqlalchemy import update

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_catalog import scratch_database, table  # noqa: E402
from services.catalog import migrate  # noqa: E402
from services.catalog.domain import ImageIn, Layout, PipelineInfo  # noqa: E402
from services.catalog.models import SiteJobRow  # noqa: E402
from services.catalog.servicer import CatalogServicer  # noqa: E402
from services.catalog.store import CatalogStore  # noqa: E402
from services.common import pki, validate  # noqa: E402
from services.common.auth import MeshAuth  # noqa: E402
from services.common.s3 import ObjectStore  # noqa: E402
from services.common.server import GrpcServer, Registration  # noqa: E402
from services.common.settings import S3Settings  # noqa: E402
from services.reducer.service import Reducer  # noqa: E402

CHANNELS = ("DNA", "GFP", "ER", "RNA", "Mito")
SHA = hashlib.sha256(b"bench list sites").hexdigest()
TABLES = ("Image", "Nuclei", "Cells", "Cytoplasm")


async def load_plate(store: CatalogStore, name: str, rows: int, columns: int, sites: int) -> int:
    """A plate with a layout, every channel of every site registered in
    batches of 5,000, and every job done with five result files."""
    await store.create_plate(name, list(CHANNELS), Layout(rows, columns, sites, 0), SHA, False)
    batch: list[ImageIn] = []
    count = 0
    for r in range(rows):
        for c in range(1, columns + 1):
            well = validate.well_name(r, c)
            for s in range(sites):
                for ch in CHANNELS:
                    batch.append(
                        ImageIn(
                            plate=name,
                            well=well,
                            site=s,
                            channel=ch,
                            key=f"images/{name}/{well}/s{s}/{ch}.tif",
                            size=2_000_000,
                            sha256=hashlib.sha256(f"{name}{well}{s}{ch}".encode()).hexdigest(),
                            file_name=f"{well}_s{s}_{ch}.tif",
                        )
                    )
                count += 1
                if len(batch) >= 5000:
                    await store.register_images(batch)
                    batch = []
    if batch:
        await store.register_images(batch)
    # The jobs as a worker leaves them: done, with result files (set in one
    # statement; this benchmark is about reading them back).
    results = [
        {"name": f"{t}.csv", "key": f"results/{name}/x/{t}.csv", "size": 123_456, "sha256": "a" * 64}
        for t in TABLES
    ] + [{"name": "cp.done", "key": f"results/{name}/x/cp.done", "size": 9, "sha256": "b" * 64}]
    async with store.engine.begin() as conn:
        await conn.execute(
            update(SiteJobRow).values(
                state=int(types_pb2.SITE_STATE_DONE),
                attempt=1,
                results=results,
                provenance={"cellprofiler_version": "4.2.8.1", "pipeline_sha256": SHA},
            )
        )
    return count


async def progress_latencies(
    stub: catalog_pb2_grpc.CatalogServiceAsyncStub, plates: list[str], calls: int = 40
) -> list[float]:
    """Median GetPlateProgress latency per plate, the plates called in turn
    (after a few calls each to warm up), so that both see the same machine."""
    times: dict[str, list[float]] = {p: [] for p in plates}
    for n in range(calls + 5):
        for plate in plates:
            t0 = time.perf_counter()
            await stub.GetPlateProgress(catalog_pb2.GetPlateProgressRequest(plate=plate))
            if n >= 5:
                times[plate].append((time.perf_counter() - t0) * 1000)
    return [statistics.median(times[p]) for p in plates]


async def watch_latency(
    stub: catalog_pb2_grpc.CatalogServiceAsyncStub, plate: str, wells: list[str]
) -> float:
    stream = stub.WatchPlateProgress(catalog_pb2.WatchPlateProgressRequest(plate=plate))
    first = await stream.read()
    assert isinstance(first, catalog_pb2.WatchPlateProgressResponse)
    done = first.progress.done
    times = []
    for well in wells:
        t0 = time.perf_counter()
        await stub.RequeueSites(
            catalog_pb2.RequeueSitesRequest(
                plate=plate, sites=[types_pb2.SiteRef(plate=plate, well=well, site=0)]
            )
        )
        while True:
            msg = await stream.read()
            assert isinstance(msg, catalog_pb2.WatchPlateProgressResponse)
            if msg.progress.done < done:
                done = msg.progress.done
                break
        times.append((time.perf_counter() - t0) * 1000)
    stream.cancel()
    return statistics.median(times)


class TimedStub:
    """The catalog stub as the reducer sees it, timing each ListSites page."""

    def __init__(self, stub: catalog_pb2_grpc.CatalogServiceAsyncStub) -> None:
        self._stub = stub
        self.pages: list[float] = []

    async def ListSites(self, request: catalog_pb2.ListSitesRequest, timeout: float | None = None) -> object:
        t0 = time.perf_counter()
        reply = await self._stub.ListSites(request, timeout=timeout)
        self.pages.append((time.perf_counter() - t0) * 1000)
        return reply

    def __getattr__(self, name: str) -> object:
        return getattr(self._stub, name)


async def walk(
    stub: catalog_pb2_grpc.CatalogServiceAsyncStub, plate: str
) -> tuple[int, int, float, float, float]:
    timed = TimedStub(stub)
    reducer = Reducer(timed, ObjectStore(S3Settings(None, "unused", "us-east-1", "x", "x")))  # type: ignore[arg-type]
    tracemalloc.start()
    run = await reducer._load(plate, SHA)
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    pages = timed.pages
    p90 = statistics.quantiles(pages, n=10)[-1] if len(pages) > 1 else pages[0]
    return len(run.sites), len(pages), statistics.median(pages), p90, peak / 2**20


async def equal_pages(
    stub: catalog_pb2_grpc.CatalogServiceAsyncStub, plate: str, size: int
) -> tuple[float, float, float]:
    """A walk in pages of `size` (the small plate's whole plate): the median
    page, and the first and last tenth's medians (a keyset cursor costs the
    same at the end as at the start)."""
    request = catalog_pb2.ListSitesRequest(plate=plate, with_results=True, page_size=size)
    times = []
    while True:
        t0 = time.perf_counter()
        reply = await stub.ListSites(request)
        times.append((time.perf_counter() - t0) * 1000)
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    tenth = max(1, len(times) // 10)
    return statistics.median(times), statistics.median(times[:tenth]), statistics.median(times[-tenth:])


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3306)
    parser.add_argument("--user", default="root")
    parser.add_argument("--password", default="")
    args, _unknown = parser.parse_known_args()
    started = time.perf_counter()
    async with scratch_database(args.host, args.port, args.user, args.password) as url:
        await migrate.upgrade(url)
        store = CatalogStore.connect(url)
        await store.add_pipeline(
            PipelineInfo(
                SHA,
                f"pipelines/{SHA}.cppipe",
                "bench",
                ["NamesAndTypes"],
                list(CHANNELS),
                list(TABLES),
                [f"{t}.csv" for t in TABLES],
                datetime.now(UTC),
            ),
            size=1,
        )
        servicer = CatalogServicer(store, ObjectStore(S3Settings(None, "unused", "us-east-1", "x", "x")))
        # The catalog as the mesh runs it: TLS, certificates, roles checked on every call.
        keys = pki.local_mesh(Path(tempfile.mkdtemp(prefix="bench-pki-")))
        auth = MeshAuth.from_env(keys.service_env("catalog"))
        server = GrpcServer(
            [Registration(catalog_pb2_grpc.add_CatalogServiceServicer_to_server, servicer, "catalog")],
            host="127.0.0.1",
            port=0,
            grace_seconds=1,
            auth=auth,
        )
        port = await server.start()
        rows: list[tuple[str, ...]] = []
        measured: list[tuple[float, float, float, float]] = []
        try:
            async with aio_channel(
                f"127.0.0.1:{port}",
                keys.credentials("operator"),
                options=[("grpc.max_receive_message_length", 64 * 2**20)],
            ) as channel:
                stub = catalog_pb2_grpc.CatalogServiceStub(channel)
                shapes = (("SMALL", 8, 12, 1), ("LARGE", 32, 48, 16))
                loads = []
                for name, r, c, s in shapes:
                    t0 = time.perf_counter()
                    loads.append((await load_plate(store, name, r, c, s), time.perf_counter() - t0))
                progresses = await progress_latencies(stub, [name for name, *_ in shapes])
                for (name, r, c, s), (n, load), progress in zip(shapes, loads, progresses, strict=True):
                    watch = await watch_latency(stub, name, [validate.well_name(0, k) for k in range(1, 11)])
                    sites, pages, page_ms, page_p90, peak = await walk(stub, name)
                    same, head, tail = await equal_pages(stub, name, 96)
                    measured.append((progress, watch, same, peak))
                    rows.append(
                        (
                            f"{r * c} wells × {s} ({n:,} sites, {n * len(CHANNELS):,} images, loaded in {load:.0f} s)",
                            f"{progress:.1f}",
                            f"{watch:.0f}",
                            f"{pages}",
                            f"{page_ms:.0f} / {page_p90:.0f}",
                            f"{same:.1f} (first {head:.1f}, last {tail:.1f})",
                            f"{peak:.1f}",
                        )
                    )
                    assert sites == n - 10, (sites, n)  # every site but the requeued ones
        finally:
            servicer.close()
            await server.stop()
            await store.close()
    print("### Plate-sized reads (MariaDB, catalog over gRPC on loopback)\n")
    print(
        table(
            (
                "plate",
                "GetPlateProgress ms",
                "WatchPlateProgress update ms",
                "ListSites pages",
                "reducer's walk: ms per 500-job page (median / p90)",
                "ms per 96-job page (first / last tenth)",
                "reducer peak MiB while walking",
            ),
            rows,
        )
    )
    small, large = measured
    print(
        f"\nlarge / small: GetPlateProgress {large[0] / small[0]:.2f}x, watch update {large[1] / small[1]:.2f}x, "
        f"ListSites per 96-job page {large[2] / small[2]:.2f}x (goal: each <= 1.5x); "
        f"reducer memory {large[3]:.1f} MiB for {len(CHANNELS)} channels × 24,576 sites"
    )
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    asyncio.run(main())
