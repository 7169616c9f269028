"""Workers that follow the queue, over the real local mesh (RabbitMQ, the
project's S3 server, the catalog on SQLite, real CellProfiler workers): a
plate arrives, the autoscaler grows the workers to the maximum, the queue
drains, the workers shrink back to the minimum after the cool-down, and no
site ran twice or was handed back because a worker was stopped."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from services.common.s3 import ObjectStore
from services.mesh import microscope
from services.mesh.autoscale import Autoscaler, AutoscaleSettings, CatalogBacklog, LocalBackend
from services.mesh.demo import start_mesh, stop_mesh
from services.mesh.scaling import ScalePolicy
from tests.e2e.meshkit import assert_nothing_lost, catalog_stub, create_generated_plate, options

pytestmark = pytest.mark.e2e

DOWN_COOLDOWN_S = 8.0


async def test_workers_grow_to_the_maximum_and_shrink_to_the_minimum_without_redelivery(
    tmp_path: Path,
) -> None:
    opts = options(tmp_path, workers=1)
    mesh = await start_mesh(opts)
    backend = LocalBackend(mesh, opts)
    settings = AutoscaleSettings(ScalePolicy(1, 3, 1, up_cooldown_s=2, down_cooldown_s=DOWN_COOLDOWN_S), 1.0)
    stop = asyncio.Event()
    try:
        async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(ch)
            scaler = Autoscaler(settings, backend, CatalogBacklog(catalog))
            sites = await create_generated_plate(catalog, tmp_path / "img", "AS1", 2, 6, 2)
            assert len(sites) == 24
            t0 = time.monotonic()
            # The whole plate arrives, then the autoscaler first looks.
            await microscope.acquire(store, catalog, "AS1", sites, 200)
            running = asyncio.create_task(scaler.run(stop))

            most = 1
            complete_at: float | None = None
            deadline = t0 + 240
            while True:
                assert time.monotonic() < deadline, (
                    f"not back to 1 worker: {len(backend.workers())} running, decisions {scaler.decisions}"
                )
                assert not running.done(), running
                mesh.procs.check_alive()  # every worker the autoscaler did not stop is alive
                most = max(most, len(backend.workers()))
                if complete_at is None:
                    request = catalog_pb2.GetPlateProgressRequest(plate="AS1")
                    progress = (await catalog.GetPlateProgress(request)).progress
                    if progress.complete:
                        complete_at = time.monotonic()
                elif len(backend.workers()) == 1 and not backend.stopping:
                    break
                await asyncio.sleep(0.5)
            done_at = time.monotonic()
            stop.set()
            await running

            assert most == 3, f"the workers never reached the maximum: {scaler.decisions}"
            assert backend.started == 2 and backend.stopped == 2
            # Up while the plate waited, down only once what was left fitted into fewer workers.
            ups = [i for i, d in enumerate(scaler.decisions) if d.replicas > d.observation.replicas]
            downs = [i for i, d in enumerate(scaler.decisions) if d.replicas < d.observation.replicas]
            assert ups and downs and max(ups) < min(downs) and scaler.decisions[-1].replicas == 1
            for i in downs:
                assert scaler.decisions[i].observation.demand <= scaler.decisions[i].replicas

            jobs = await assert_nothing_lost(catalog, store, "AS1", 24)
            assert all(j.state == types_pb2.SITE_STATE_DONE for j in jobs)
            assert [j.attempt for j in jobs] == [1] * 24, "a site ran more than once"
            drawn = {(s.well, s.site): s.nuclei for s in sites}
            assert {(j.site.well, j.site.site): j.provenance.object_counts["Nuclei"] for j in jobs} == drawn

            logs = {p.name: p.log_path.read_text() for p in mesh.procs.procs + backend.stopping}
            logs.update(
                {f"cpworker-{i}": (tmp_path / "logs" / f"cpworker-{i}.log").read_text() for i in range(3)}
            )
            for name, text in logs.items():
                if not name.startswith("cpworker-"):
                    continue
                assert "handing a site back" not in text, f"{name} handed a site back"
                assert "redelivered task" not in text, f"{name} got a redelivered task"
            # The two stopped workers took sites, finished them and exited cleanly.
            stopped = dict(backend.exited)
            assert len(stopped) == 2 and all(code == 0 for code in stopped.values()), stopped
            for name in stopped:
                assert "done AS1/" in logs[name], f"{name} never ran a site"
            print(
                f"\nplate of 24 sites: complete after {complete_at - t0:.1f} s, "
                f"back to 1 worker after {done_at - t0:.1f} s; decisions: "
                + "; ".join(f"{d.observation.replicas}->{d.replicas} ({d.reason})" for d in scaler.decisions)
            )
    finally:
        stop.set()
        await backend.close()
        await stop_mesh(mesh)
