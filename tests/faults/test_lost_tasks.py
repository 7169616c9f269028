"""Whatever the broker loses, the catalog finds: site tasks dropped from the
queue (a purge here; in production a lost dead-letter, a failed publish of a
retry, a broker that lost its disk) are issued again once their queue
deadline passes, over real processes, RabbitMQ, S3 server and CellProfiler."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from services.common.amqp import AmqpConnection
from services.common.s3 import ObjectStore
from services.mesh import microscope
from services.mesh.demo import start_mesh, stop_mesh
from tests.e2e.meshkit import (
    assert_nothing_lost,
    catalog_stub,
    create_generated_plate,
    options,
    wait_complete,
)

pytestmark = pytest.mark.faults


async def test_tasks_the_broker_lost_are_issued_again(tmp_path: Path) -> None:
    mesh = await start_mesh(options(tmp_path, workers=1, extra_env={"QUEUE_DEADLINE_S": "10"}))
    try:
        worker = next(p for p in mesh.procs.procs if p.name == "cpworker-0")
        worker.signal(signal.SIGTERM)  # no worker: the tasks wait on the broker
        deadline = time.monotonic() + 60
        while worker.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not worker.alive
        async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(ch)
            sites = await create_generated_plate(catalog, tmp_path / "img", "L1", 2, 2, 1)
            await microscope.acquire(store, catalog, "L1", sites, 100)
            deadline = time.monotonic() + 60
            while True:
                jobs = (await catalog.ListSites(catalog_pb2.ListSitesRequest(plate="L1"))).sites
                if all(j.state == types_pb2.SITE_STATE_QUEUED for j in jobs) and len(jobs) == 4:
                    break
                assert time.monotonic() < deadline, [types_pb2.SiteState.Name(j.state) for j in jobs]
                await asyncio.sleep(0.2)
            conn = AmqpConnection(mesh.env["AMQP_URL"], mesh.topology, "test")
            await conn.connect()
            try:
                assert await conn.purge_queue(mesh.topology.queue("sites")) == 4  # all four tasks lost
            finally:
                await conn.close()
            worker.start()
            await wait_complete(catalog, "L1", 300)
            jobs = await assert_nothing_lost(catalog, store, "L1", 4)
            assert all(j.state == types_pb2.SITE_STATE_DONE for j in jobs)
            # Each issued again with a new attempt that fences off the lost one
            # (once, or more if the restarted worker took longer than the queue
            # deadline to take it: a loaded machine), and recorded once.
            assert all(j.attempt >= 2 for j in jobs), [j.attempt for j in jobs]
            drawn = {(s.well, s.site): s.nuclei for s in sites}
            assert {(j.site.well, j.site.site): j.provenance.object_counts["Nuclei"] for j in jobs} == drawn
    finally:
        await stop_mesh(mesh)
