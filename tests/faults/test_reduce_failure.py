"""A plate whose reduce kills every reducer that takes it ends with a reason
instead of waiting for ever, and runs again on request. Real processes,
RabbitMQ, S3 server and CellProfiler."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cellmesh.catalog.v1 import catalog_pb2

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


async def test_a_reduce_that_kills_its_reducers_fails_and_runs_again_on_request(tmp_path: Path) -> None:
    env = {"DELIVERY_LIMIT": "2", "REDUCE_DEADLINE_S": "6", "MAX_ATTEMPTS": "2"}
    mesh = await start_mesh(options(tmp_path, workers=1, extra_env=env))
    try:
        reducer = next(p for p in mesh.procs.procs if p.name == "reducer")
        reducer.signal(9)
        while reducer.alive:
            await asyncio.sleep(0.1)
        reducer.env = {**reducer.env, "CELLMESH_FAILPOINT": "reducer.kill_on_reduce"}
        reducer.start()
        async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(ch)
            sites = await create_generated_plate(catalog, tmp_path / "img", "D1", 1, 2, 1)
            await microscope.acquire(store, catalog, "D1", sites, 100)
            deaths = 0
            deadline = time.monotonic() + 240
            while True:
                progress = (
                    await catalog.GetPlateProgress(catalog_pb2.GetPlateProgressRequest(plate="D1"))
                ).progress
                if progress.reduce_failed:
                    break
                assert not progress.complete, "the reduce cannot have succeeded"
                assert time.monotonic() < deadline, (
                    f"the plate wedged after {deaths} reducer deaths: {progress}"
                )
                if not reducer.alive:  # a supervisor would restart it, as Swarm does
                    deaths += 1
                    reducer.start()
                await asyncio.sleep(0.5)
            assert deaths >= 2, deaths
            assert "never registered a report" in progress.reduce_failure_reason
            # `cellmesh follow` ends, with the reason and a non-zero status.
            follow = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "cellmesh.cli",
                    "--catalog",
                    mesh.catalog_addr,
                    "follow",
                    "D1",
                    "--quiet",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, **(mesh.pki.client_env("viewer") if mesh.pki is not None else {})},
            )
            assert follow.returncode != 0 and "the plate's report failed" in follow.stderr, follow.stderr
            # Fixed (no failpoint), and issued again by hand: the report comes.
            reducer.signal(9)
            while reducer.alive:
                await asyncio.sleep(0.1)
            reducer.env = {k: v for k, v in reducer.env.items() if k != "CELLMESH_FAILPOINT"}
            reducer.start()
            await mesh.procs.wait_healthy(reducer)
            await catalog.RequeueSites(catalog_pb2.RequeueSitesRequest(plate="D1", reduce=True))
            done = await wait_complete(catalog, "D1", 120)
            assert done.report_version == 1 and not done.reduce_failed
            await assert_nothing_lost(catalog, store, "D1", 2)
    finally:
        await stop_mesh(mesh)
