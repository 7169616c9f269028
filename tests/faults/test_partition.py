"""A worker cut off by the network while it holds sites: the broker hands its
sites to another worker, and when the link comes back the first worker must
not change what the catalog registered.

Worker A runs in a network namespace of its own (a veth pair, private
addresses) and reaches the broker, catalog and S3 server over that link;
worker B runs on the host. Run alone with `pytest -m faults -k partition`.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from cellmesh.common.v1 import types_pb2
from cellmesh.worker.v1 import worker_pb2, worker_pb2_grpc

from services.common.s3 import ObjectStore
from services.mesh import microscope
from services.mesh.demo import start_mesh, start_worker, stop_mesh
from services.mesh.procs import Proc
from tests.e2e.meshkit import (
    assert_nothing_lost,
    catalog_stub,
    create_generated_plate,
    options,
    wait_complete,
)
from tests.faults.netns import NetnsHost
from tests.faults.servers import PrivateRabbit

pytestmark = pytest.mark.faults

# pika's heartbeat is 30 s: the broker gives up on A's connection within
# about a minute of the cut; the cut lasts well past that.
CUT_SECONDS = 100.0
HOLD_SECONDS = 60  # A's sites take this much longer than usual (failpoint)


async def active_sites(worker: Proc) -> list[worker_pb2.ActiveSite]:
    async with worker.channel() as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        status = await stub.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest(), timeout=5)
        return list(status.active)


async def wait_holding(worker: Proc, count: int, timeout: float = 120) -> list[worker_pb2.ActiveSite]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        active = await active_sites(worker)
        if len(active) >= count:
            return active
        await asyncio.sleep(0.1)
    raise AssertionError(f"{worker.name} never held {count} sites")


async def test_worker_cut_off_by_the_network_never_changes_registered_results(tmp_path: Path) -> None:
    with NetnsHost().running() as ns, PrivateRabbit(host=ns.host_addr).running() as rabbit:
        opts = options(
            tmp_path,
            workers=0,
            amqp_url=rabbit.url,
            host=ns.host_addr,
            tls_hosts=(ns.ns_addr,),
            extra_env={"SITE_LEASE_S": "30"},
        )
        mesh = await start_mesh(opts)
        try:
            # One CellProfiler, two tasks prefetched: A holds two sites.
            worker_a = await start_worker(
                mesh,
                opts,
                0,
                env={"CP_SLOTS": "1", "CELLMESH_FAILPOINT": f"worker.slow_site:{HOLD_SECONDS}"},
                host=ns.ns_addr,
                launcher=ns.launcher,
            )
            async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
                catalog = catalog_stub(ch)
                sites = await create_generated_plate(catalog, tmp_path / "img", "N1", 1, 2, 2)
                await microscope.acquire(store, catalog, "N1", sites, 200)
                held = await wait_holding(worker_a, 2)
                held_sites = {(a.site.well, a.site.site) for a in held}
                await start_worker(mesh, opts, 1)  # B, on the host: takes the other two at once

                ns.cut()
                await asyncio.sleep(CUT_SECONDS)
                ns.heal()

                await wait_complete(catalog, "N1", 300, mesh)
                # A is back on the network and has had the time to do whatever
                # it would still do with its old runs.
                await asyncio.sleep(HOLD_SECONDS / 2)
                jobs = await assert_nothing_lost(
                    catalog, store, "N1", 4
                )  # every registered object's bytes match
                assert all(j.state == types_pb2.SITE_STATE_DONE for j in jobs)

                # Each site is recorded once: its results come from one execution.
                registered: dict[str, str] = {}
                for job in jobs:
                    folders = {r.object.key.rsplit("/", 1)[0] for r in job.results}
                    assert len(folders) == 1, f"{job.site} has results of several runs: {folders}"
                    for r in job.results:
                        registered[r.object.key] = r.object.sha256
                registered_folders = {k.rsplit("/", 1)[0] for k in registered}

                # A's runs of the sites it held stopped when it lost them; nothing
                # of A is registered, and every object of another run lies
                # under a key no record points at.
                log = worker_a.log_path.read_text(errors="replace")
                stopped = re.findall(
                    r"stopped N1/(\w+)/s(\d+) attempt \d+ execution ([0-9a-f]+): .*nothing of it is stored",
                    log,
                )
                assert {(w, int(s)) for w, s, _ in stopped} == held_sites, log[-3000:]
                a_executions = {e for _, _, e in stopped}
                assert not any(e in folder for e in a_executions for folder in registered_folders)
                stored = [obj async for obj, _ in store.list_objects("results/N1/")]
                for obj in stored:
                    folder = obj.key.rsplit("/", 1)[0]
                    if obj.key not in registered:
                        assert folder not in registered_folders, f"{obj.key} lies among registered results"
                assert registered.keys() <= {o.key for o in stored}
        finally:
            await stop_mesh(mesh)
