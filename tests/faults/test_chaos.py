"""Chaos: a generated plate through the mesh on MariaDB while random
services (catalog, scheduler, every worker, the reducer) are SIGKILLed, with
their children, and restarted every few seconds. Every site is done exactly
once, its counts equal the nuclei drawn, the report is registered, and
nothing is left in flight."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path

import grpc
import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from services.common.s3 import ObjectStore
from services.mesh import microscope
from services.mesh.demo import start_mesh, stop_mesh
from tests.e2e.meshkit import assert_nothing_lost, catalog_stub, create_generated_plate, options

pytestmark = pytest.mark.faults

VICTIMS = ("catalog", "scheduler", "cpworker-0", "cpworker-1", "reducer")
# Kills before the plate may count as done: a fast machine finishes the plate
# within a few kills, so the loop keeps killing (the plate must stay complete,
# its report registered, nothing run twice) until this many have happened.
MIN_KILLS = 8


async def progress_or_none(catalog: object, plate: str) -> catalog_pb2.PlateProgress | None:
    try:
        reply = await catalog.GetPlateProgress(  # type: ignore[attr-defined]
            catalog_pb2.GetPlateProgressRequest(plate=plate), timeout=5
        )
    except grpc.aio.AioRpcError:
        return None  # the catalog is down right now
    return reply.progress  # type: ignore[no-any-return]


async def test_random_kills_lose_nothing_and_run_nothing_twice(tmp_path: Path, mariadb_url: str) -> None:
    rng = random.Random(20261203)
    env = {
        # Short deadlines, so that what a kill leaves behind is found within the test.
        "QUEUE_DEADLINE_S": "20",
        "START_LEASE_S": "15",
        "SITE_LEASE_S": "15",
        "CLAIM_LEASE_S": "10",
        "MAX_ATTEMPTS": "6",
        "DELIVERY_LIMIT": "20",
    }
    mesh = await start_mesh(options(tmp_path, workers=2, database_url=mariadb_url, extra_env=env))
    kills: list[str] = []
    try:
        procs = {p.name: p for p in mesh.procs.procs}
        async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(ch)
            sites = await create_generated_plate(catalog, tmp_path / "img", "X1", 2, 4, 2)
            # Images arrive over about 16 s, so that kills land while sites are in flight.
            feed = asyncio.create_task(microscope.acquire(store, catalog, "X1", sites, 2))
            deadline = time.monotonic() + 600
            done = None
            while time.monotonic() < deadline:
                await asyncio.sleep(rng.uniform(2.0, 5.0))
                progress = await progress_or_none(catalog, "X1")
                if progress is not None and progress.complete and feed.done() and len(kills) >= MIN_KILLS:
                    done = progress
                    break
                if len(kills) < 25:
                    name = rng.choice(VICTIMS)
                    victim = procs[name]
                    victim.signal(signal.SIGKILL)  # its process group: CellProfiler children too
                    kills.append(name)
                    await asyncio.sleep(rng.uniform(0.2, 1.5))
                    victim.start()
            await feed
            assert done is not None, f"plate not complete after the kills {kills}"
            jobs = await assert_nothing_lost(catalog, store, "X1", 16)
            assert all(j.state == types_pb2.SITE_STATE_DONE for j in jobs), [
                (j.site.well, j.site.site, j.failure_reason)
                for j in jobs
                if j.state != types_pb2.SITE_STATE_DONE
            ]
            drawn = {(s.well, s.site): s.nuclei for s in sites}
            assert {(j.site.well, j.site.site): j.provenance.object_counts["Nuclei"] for j in jobs} == drawn
            # Nothing in flight, the report registered, over every site.
            assert (done.queued, done.running, done.ready, done.waiting) == (0, 0, 0, 0), done
            report = (await catalog.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate="X1"))).report
            assert report.sites == 16 and report.version >= 1
    finally:
        print("killed, in order:", " ".join(kills))
        await stop_mesh(mesh)
