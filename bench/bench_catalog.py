"""Catalog benchmark on the machine's MariaDB (a scratch database, dropped at
the end). One command, prints markdown tables:

1. images registered per second through the catalog's store, in batches of
   1,000 to 10,000, against the peer: a plain asyncmy INSERT + COMMIT per row
   (and the store with one image per call), measured in the same run;
2. ClaimReadySites latency (10 sites, median of 20) with 10k, 100k and 1M
   images registered, and the ratio 1M / 10k.

    .venv/bin/python bench/bench_catalog.py [--max-images 1000000] [--host 127.0.0.1 --port 3306]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import asyncmy
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.catalog import migrate  # noqa: E402
from services.catalog.domain import ImageIn, PipelineInfo  # noqa: E402
from services.catalog.store import CatalogStore  # noqa: E402
from services.common import validate  # noqa: E402

CHANNELS = ("DNA", "GFP")
SHA = hashlib.sha256(b"bench").hexdigest()


@asynccontextmanager
async def scratch_database(host: str, port: int, user: str, password: str) -> AsyncIterator[str]:
    name = f"cellmesh_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncmy.connect(host=host, port=port, user=user, password=password)
    async with conn.cursor() as cur:
        await cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield f"mysql+asyncmy://{user}:{password}@{host}:{port}/{name}"
    finally:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


def site_stream(plate: str, start_site: int = 0) -> Iterator[list[ImageIn]]:
    """Every channel of site after site: wells of a 1536-well plate, then more
    sites per well."""
    n = start_site
    while True:
        well = validate.well_name((n // 48) % 32, n % 48 + 1)
        site = n // 1536
        yield [
            ImageIn(
                plate=plate,
                well=well,
                site=site,
                channel=c,
                key=f"images/{plate}/{well}/s{site}/{c}.tif",
                size=2_000_000,
                sha256=hashlib.sha256(f"{plate}{n}{c}".encode()).hexdigest(),
                file_name=f"{well}_s{site}_{c}.tif",
            )
            for c in CHANNELS
        ]
        n += 1


def batches(plate: str, total: int, size: int, start_site: int = 0) -> Iterator[list[ImageIn]]:
    sites = site_stream(plate, start_site)
    made = 0
    while made < total:
        batch: list[ImageIn] = []
        while len(batch) < min(size, total - made):
            batch += next(sites)
        made += len(batch)
        yield batch


async def new_store(url: str) -> CatalogStore:
    await migrate.upgrade(url)
    store = CatalogStore.connect(url)
    await store.add_pipeline(
        PipelineInfo(
            SHA,
            f"pipelines/{SHA}.cppipe",
            "bench",
            ["NamesAndTypes"],
            list(CHANNELS),
            ["Image"],
            ["Image.csv"],
            datetime.now(UTC),
        ),
        size=1,
    )
    return store


async def peer_rows_per_second(url_parts: dict[str, object], rows: int) -> float:
    """A plain asyncmy INSERT + COMMIT per row into a table shaped like the catalog's images."""
    conn = await asyncmy.connect(**url_parts)
    async with conn.cursor() as cur:
        await cur.execute(
            "CREATE TABLE peer_images (id BIGINT AUTO_INCREMENT PRIMARY KEY, plate VARCHAR(64), well VARCHAR(4),"
            " site INT, channel VARCHAR(32), `key` VARCHAR(1024), sha256 CHAR(64), size BIGINT,"
            " file_name VARCHAR(255), registered_at DATETIME(6), UNIQUE KEY (plate, well, site, channel))"
            " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
        )
    images = [i for b in batches("peer", rows, rows) for i in b]
    t0 = time.perf_counter()
    async with conn.cursor() as cur:
        for i in images:
            await cur.execute(
                "INSERT INTO peer_images (plate, well, site, channel, `key`, sha256, size, file_name, registered_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (i.plate, i.well, i.site, i.channel, i.key, i.sha256, i.size, i.file_name, datetime.now(UTC)),
            )
            await conn.commit()
    elapsed = time.perf_counter() - t0
    conn.close()
    return len(images) / elapsed


async def store_rate(store: CatalogStore, plate: str, total: int, size: int) -> float:
    await store.create_plate(plate, list(CHANNELS), None, SHA, False)
    work = list(batches(plate, total, size))
    t0 = time.perf_counter()
    for batch in work:
        await store.register_images(batch)
    return total / (time.perf_counter() - t0)


async def registration(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    async with scratch_database(args.host, args.port, args.user, args.password) as url:
        store = await new_store(url)
        try:
            name = url.rsplit("/", 1)[1]
            parts = {
                "host": args.host,
                "port": args.port,
                "user": args.user,
                "password": args.password,
                "db": name,
            }
            peer = await peer_rows_per_second(parts, args.single_rows)
            rows.append(("peer: asyncmy INSERT + COMMIT per row", f"{args.single_rows:,}", f"{peer:,.0f}"))
            single = await store_rate(store, "single", args.single_rows // 2, 1)
            rows.append(("catalog store, 1 image per call", f"{args.single_rows // 2:,}", f"{single:,.0f}"))
            for size in (1_000, 5_000, 10_000):
                total = max(size * 5, 50_000)
                rate = await store_rate(store, f"batch{size}", total, size)
                rows.append((f"catalog store, batches of {size:,}", f"{total:,}", f"{rate:,.0f}"))
        finally:
            await store.close()
    return rows


async def settle(store: CatalogStore, timeout: float = 60.0) -> None:
    """Waits until InnoDB has written back the bulk load (dirty pages below 2 %
    of the buffer pool), so that claims are timed in steady state and not
    against the write-back of a million fresh rows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with store.engine.connect() as conn:
            status = dict(
                (await conn.execute(text("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_pages_%'")))
                .tuples()
                .all()
            )
        if int(status["Innodb_buffer_pool_pages_dirty"]) < 0.02 * int(
            status["Innodb_buffer_pool_pages_total"]
        ):
            return
        await asyncio.sleep(1)


async def claim_latency(store: CatalogStore, repeats: int) -> tuple[float, float]:
    times = []
    for n in range(repeats + 1):
        t0 = time.perf_counter()
        claims = await store.claim_ready_sites("bench", 10, 600)
        elapsed = time.perf_counter() - t0
        assert len(claims) == 10 and all(len(c.images) == len(CHANNELS) for c in claims)
        if n:  # the first one warms the connection pool
            times.append(elapsed * 1000)
    return statistics.median(times), statistics.quantiles(times, n=10)[-1]


async def claims(args: argparse.Namespace) -> tuple[list[tuple[str, str, str, str, str]], str]:
    levels = [n for n in (10_000, 100_000, 1_000_000) if n <= args.max_images]
    rows: list[tuple[str, str, str, str, str]] = []
    plan = ""
    async with scratch_database(args.host, args.port, args.user, args.password) as url:
        store = await new_store(url)
        try:
            await store.create_plate("big", list(CHANNELS), None, SHA, False)
            loaded = 0
            for level in levels:
                t0 = time.perf_counter()
                for batch in batches("big", level - loaded, 10_000, start_site=loaded // len(CHANNELS)):
                    await store.register_images(batch)
                load_s = time.perf_counter() - t0
                rate = (level - loaded) / load_s
                loaded = level
                async with store.engine.connect() as conn:
                    await conn.execute(text("ANALYZE TABLE site_jobs, images, sites"))
                await settle(store)
                median, p90 = await claim_latency(store, args.repeats)
                rows.append(
                    (
                        f"{level:,}",
                        f"{level // len(CHANNELS):,}",
                        f"{median:.2f}",
                        f"{p90:.2f}",
                        f"{rate:,.0f}",
                    )
                )
            async with store.engine.connect() as conn:
                explained = await conn.execute(
                    text(
                        "EXPLAIN SELECT id FROM site_jobs WHERE state = 2 ORDER BY ready_at, id LIMIT 10 FOR UPDATE SKIP LOCKED"
                    )
                )
                row = explained.mappings().first()
                plan = (
                    f"type={row['type']}, key={row['key']}, rows={row['rows']}, extra={row['Extra']}"
                    if row
                    else ""
                )
        finally:
            await store.close()
    return rows, plan


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3306)
    parser.add_argument("--user", default="root")
    parser.add_argument("--password", default="")
    parser.add_argument("--max-images", type=int, default=1_000_000)
    parser.add_argument("--single-rows", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=20)
    args, _unknown = parser.parse_known_args()
    started = time.perf_counter()

    print("### Registering images (MariaDB, one transaction per call)\n")
    reg = await registration(args)
    print(table(("method", "images", "images/s"), reg))
    peer = float(reg[0][2].replace(",", ""))
    best = max(float(r[2].replace(",", "")) for r in reg[2:])
    print(f"\nbatched / peer: {best / peer:.1f}x (goal: >= 10,000 images/s batched)\n")

    print("### ClaimReadySites latency (10 sites per claim, every site READY)\n")
    rows, plan = await claims(args)
    print(table(("images", "sites", "median ms", "p90 ms", "load images/s"), rows))
    if len(rows) >= 2:
        ratio = float(rows[-1][2]) / float(rows[0][2])
        print(f"\nratio {rows[-1][0]} / {rows[0][0]} images: {ratio:.2f} (goal: <= 2)")
    print(f"\nclaim query plan: {plan}")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    asyncio.run(main())
