"""Nothing lost: real services as separate processes, real faults (kill
signals, stopped servers, cut connections, bad files and messages).

Each test ends by checking, from the catalog and the object store, that every
site is done or failed-with-reason exactly once and every result file listed
exists with its checksum. Run alone with `pytest -m faults`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2
from cellmesh.worker.v1 import worker_pb2, worker_pb2_grpc

from services.common.amqp import AmqpConnection
from services.common.s3 import ObjectStore
from services.mesh import microscope
from services.mesh.demo import Mesh, start_mesh, stop_mesh
from services.mesh.procs import Proc
from tests.e2e.meshkit import (
    NUCLEI,
    assert_nothing_lost,
    catalog_stub,
    create_generated_plate,
    options,
    wait_complete,
)
from tests.faults.servers import PrivateMariaDB, PrivateRabbit, TcpProxy

pytestmark = pytest.mark.faults


def proc(mesh: Mesh, name: str) -> Proc:
    return next(p for p in mesh.procs.procs if p.name == name)


async def wait_worker_running(mesh: Mesh, name: str, timeout: float = 120) -> None:
    """Waits until the worker reports a site in CellProfiler."""
    deadline = time.monotonic() + timeout
    async with mesh.channel(proc(mesh, name).grpc_addr) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        while time.monotonic() < deadline:
            status = await stub.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest(), timeout=5)
            if any(a.phase == "running" for a in status.active):
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never ran a site")


async def restart(p: Proc, env: dict[str, str] | None = None) -> None:
    if env is not None:
        p.env = {**p.env, **env}
    p.start()


async def test_worker_killed_mid_site_is_redelivered_and_done_once(tmp_path: Path) -> None:
    mesh = await start_mesh(options(tmp_path, workers=2))
    try:
        async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(ch)
            sites = await create_generated_plate(catalog, tmp_path / "img", "K1", 2, 3, 2)
            feed = asyncio.create_task(microscope.acquire(store, catalog, "K1", sites, 100))
            await wait_worker_running(mesh, "cpworker-0")
            victim = proc(mesh, "cpworker-0")
            assert victim.popen is not None
            os.kill(victim.popen.pid, signal.SIGKILL)  # the worker only; its CellProfiler child sees EOF
            await feed
            await restart(victim)
            await wait_complete(catalog, "K1", 300, None)
            jobs = await assert_nothing_lost(catalog, store, "K1", 12)
            assert all(j.state == types_pb2.SITE_STATE_DONE for j in jobs)
            drawn = {(s.well, s.site): s.nuclei for s in sites}
            assert {(j.site.well, j.site.site): j.provenance.object_counts["Nuclei"] for j in jobs} == drawn
    finally:
        await stop_mesh(mesh)


async def test_scheduler_killed_between_publish_and_record(tmp_path: Path) -> None:
    opts = options(tmp_path, workers=1, extra_env={"CLAIM_LEASE_S": "3"})
    mesh = await start_mesh(opts)
    try:
        sched = proc(mesh, "scheduler")
        sched.signal(signal.SIGTERM)
        await asyncio.sleep(1)
        await restart(sched, {"CELLMESH_FAILPOINT": "scheduler.after_publish"})
        async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(ch)
            sites = await create_generated_plate(catalog, tmp_path / "img", "S1", 1, 3, 2)
            await microscope.acquire(store, catalog, "S1", sites, 200)
            assert sched.popen is not None
            await asyncio.to_thread(sched.popen.wait, 60)
            assert sched.popen.returncode == -signal.SIGKILL
            env = dict(sched.env)
            env.pop("CELLMESH_FAILPOINT")
            sched.env = env
            await restart(sched)
            await wait_complete(catalog, "S1", 300, mesh)
            jobs = await assert_nothing_lost(catalog, store, "S1", 6)
            assert all(j.state == types_pb2.SITE_STATE_DONE for j in jobs)
            # The tasks published before the kill were either run by a worker
            # (a claimed site may start) or, once their lease ran out, claimed
            # again with a newer attempt and the older task skipped as stale:
            # either way each site has exactly one recorded result.
            assert all(len({r.object.key.rsplit("/", 2)[0] for r in j.results}) == 1 for j in jobs)
    finally:
        await stop_mesh(mesh)


async def test_catalog_stopped_while_workers_finish(tmp_path: Path) -> None:
    mesh = await start_mesh(options(tmp_path, workers=2))
    try:
        async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(ch)
            sites = await create_generated_plate(catalog, tmp_path / "img", "C1", 2, 3, 1)
            await microscope.acquire(store, catalog, "C1", sites, 200)
            await wait_worker_running(mesh, "cpworker-0")
            cat = proc(mesh, "catalog")
            cat.signal(signal.SIGKILL)
            await asyncio.sleep(8)  # workers finish sites and must hold their results
            await restart(cat)
            await mesh.procs.wait_healthy(cat)
            await wait_complete(catalog, "C1", 300, mesh)
            jobs = await assert_nothing_lost(catalog, store, "C1", 6)
            assert all(j.state == types_pb2.SITE_STATE_DONE for j in jobs)
    finally:
        await stop_mesh(mesh)


async def test_rabbitmq_restarted_with_tasks_queued_and_in_flight(tmp_path: Path) -> None:
    with PrivateRabbit().running() as rabbit:
        mesh = await start_mesh(options(tmp_path, workers=1, amqp_url=rabbit.url))
        try:
            async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
                catalog = catalog_stub(ch)
                sites = await create_generated_plate(catalog, tmp_path / "img", "R1", 2, 4, 1)
                await microscope.acquire(store, catalog, "R1", sites, 200)
                await wait_worker_running(mesh, "cpworker-0")
                await asyncio.to_thread(rabbit.stop)
                await asyncio.sleep(3)
                await asyncio.to_thread(rabbit.start)
                await wait_complete(catalog, "R1", 300, mesh)
                jobs = await assert_nothing_lost(catalog, store, "R1", 8)
                assert all(j.state == types_pb2.SITE_STATE_DONE for j in jobs)
        finally:
            await stop_mesh(mesh)


async def test_mariadb_restarted_under_load(tmp_path: Path) -> None:
    with PrivateMariaDB(tmp_path / "mariadb").running() as db:
        mesh = await start_mesh(options(tmp_path, workers=2, database_url=db.url))
        try:
            async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
                catalog = catalog_stub(ch)
                sites = await create_generated_plate(catalog, tmp_path / "img", "M1", 2, 3, 2)
                feed = asyncio.create_task(microscope.acquire(store, catalog, "M1", sites, 20))
                await wait_worker_running(mesh, "cpworker-0")
                db.kill()
                await asyncio.sleep(3)
                db.start()
                await feed
                await wait_complete(catalog, "M1", 300, mesh)
                jobs = await assert_nothing_lost(catalog, store, "M1", 12)
                assert all(j.state == types_pb2.SITE_STATE_DONE for j in jobs)
        finally:
            await stop_mesh(mesh)


async def test_object_store_unreachable_for_a_while(tmp_path: Path) -> None:
    from tests.conftest import free_port

    s3_port = free_port()
    proxy = TcpProxy(s3_port)
    await proxy.start()
    mesh = await start_mesh(
        options(
            tmp_path, workers=1, s3_port=s3_port, service_s3_endpoint=f"http://127.0.0.1:{proxy.listen_port}"
        )
    )
    try:
        async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(ch)
            sites = await create_generated_plate(catalog, tmp_path / "img", "O1", 2, 3, 1)
            await microscope.acquire(store, catalog, "O1", sites, 200)
            await wait_worker_running(mesh, "cpworker-0")
            proxy.cut()
            await asyncio.sleep(10)
            proxy.restore()
            await wait_complete(catalog, "O1", 300, mesh)
            jobs = await assert_nothing_lost(catalog, store, "O1", 6)
            assert all(j.state == types_pb2.SITE_STATE_DONE for j in jobs)
            # An outage burns no attempt.
            assert max(j.attempt for j in jobs) == 1
    finally:
        await stop_mesh(mesh)
        await proxy.close()


async def test_bad_images_fail_once_as_input_problems(tmp_path: Path) -> None:
    mesh = await start_mesh(options(tmp_path, workers=1))
    try:
        async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(ch)
            sites = await create_generated_plate(catalog, tmp_path / "img", "B1", 1, 4, 1)
            by_well = {s.well: s for s in sites}
            by_well["A01"].files["DNA"].write_bytes(b"II*\x00" + os.urandom(2000))  # corrupt TIFF
            data = by_well["A02"].files["GFP"].read_bytes()
            by_well["A02"].files["GFP"].write_bytes(data[: len(data) // 3])  # truncated
            import numpy as np
            import tifffile

            tifffile.imwrite(by_well["A03"].files["GFP"], np.zeros((100, 100), np.uint16))  # wrong size
            await microscope.acquire(store, catalog, "B1", sites, 200)
            await wait_complete(catalog, "B1", 300, mesh)
            jobs = {j.site.well: j for j in await assert_nothing_lost(catalog, store, "B1", 4)}
            for well in ("A01", "A02", "A03"):
                job = jobs[well]
                assert job.state == types_pb2.SITE_STATE_FAILED
                assert job.failure_class == types_pb2.FAILURE_CLASS_INPUT_PROBLEM, job
                assert job.attempt == 1, "an input problem wastes no retry"
            assert "differ in size" in jobs["A03"].failure_reason
            assert jobs["A04"].state == types_pb2.SITE_STATE_DONE
            report = (await catalog.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate="B1"))).report
            assert {m.site.well for m in report.missing_sites} == {"A01", "A02", "A03"}
    finally:
        await stop_mesh(mesh)


async def test_time_limit_retries_then_fails_and_the_worker_survives(tmp_path: Path) -> None:
    mesh = await start_mesh(
        options(tmp_path, workers=1, extra_env={"SITE_TIMEOUT_S": "0.3", "MAX_ATTEMPTS": "2"})
    )
    try:
        async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(ch)
            sites = await create_generated_plate(catalog, tmp_path / "img", "T1", 1, 2, 1)
            await microscope.acquire(store, catalog, "T1", sites, 200)
            await wait_complete(catalog, "T1", 300, mesh)
            jobs = await assert_nothing_lost(catalog, store, "T1", 2)
            for job in jobs:
                assert job.state == types_pb2.SITE_STATE_FAILED
                assert job.failure_class == types_pb2.FAILURE_CLASS_TIMEOUT
                assert job.attempt == 2
                assert "time limit" in job.failure_reason
            mesh.procs.check_alive()
            conn = AmqpConnection(mesh.env["AMQP_URL"], mesh.topology, "test")
            await conn.connect()
            try:
                deadline = time.monotonic() + 30
                while await conn.queue_depth(mesh.topology.parked_queue) < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                assert await conn.queue_depth(mesh.topology.parked_queue) == 2
            finally:
                await conn.close()
    finally:
        await stop_mesh(mesh)


async def test_malformed_message_is_dead_lettered_and_parked(tmp_path: Path) -> None:
    mesh = await start_mesh(options(tmp_path, workers=1))
    try:
        conn = AmqpConnection(mesh.env["AMQP_URL"], mesh.topology, "test")
        await conn.connect()
        try:
            await conn.publish(mesh.topology.exchange, "sites", b"\xff\x00not a task")
            await conn.publish(mesh.topology.exchange, "sites", b"")
            deadline = time.monotonic() + 30
            while await conn.queue_depth(mesh.topology.parked_queue) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.3)
            assert await conn.queue_depth(mesh.topology.parked_queue) == 2
            assert await conn.queue_depth(mesh.topology.queue("sites")) == 0
        finally:
            await conn.close()
        mesh.procs.check_alive()
        # The worker still takes real work.
        async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(ch)
            sites = await create_generated_plate(catalog, tmp_path / "img", "G1", 1, 1, 1)
            await microscope.acquire(store, catalog, "G1", sites, 200)
            await wait_complete(catalog, "G1", 300, mesh)
            (job,) = await assert_nothing_lost(catalog, store, "G1", 1)
            assert job.state == types_pb2.SITE_STATE_DONE
    finally:
        await stop_mesh(mesh)


async def test_sigterm_to_every_service_loses_nothing(tmp_path: Path) -> None:
    """A rolling restart: each service gets SIGTERM and comes back."""
    mesh = await start_mesh(options(tmp_path, workers=2))
    try:
        async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(ch)
            sites = await create_generated_plate(catalog, tmp_path / "img", "U1", 2, 3, 2)
            feed = asyncio.create_task(microscope.acquire(store, catalog, "U1", sites, 30))
            await wait_worker_running(mesh, "cpworker-0")
            for name in ("cpworker-0", "scheduler", "reducer", "cpworker-1", "catalog"):
                p = proc(mesh, name)
                p.signal(signal.SIGTERM)
                assert p.popen is not None
                await asyncio.to_thread(p.popen.wait, 60)
                assert p.popen.returncode == 0, (
                    f"{name} exited {p.popen.returncode} on SIGTERM:\n{p.log_tail()}"
                )
                await restart(p)
                await mesh.procs.wait_healthy(p, timeout=180)
            await feed
            await wait_complete(catalog, "U1", 300, mesh)
            jobs = await assert_nothing_lost(catalog, store, "U1", 12)
            assert all(j.state == types_pb2.SITE_STATE_DONE for j in jobs)
    finally:
        await stop_mesh(mesh)


async def test_long_site_outlives_the_consumer_timeout_without_running_twice(tmp_path: Path) -> None:
    """A site longer than the broker's consumer timeout (5 s here; RabbitMQ
    enforces it on a one-minute tick, so the site takes 75 s): the worker
    takes a lease and acks early, the channel is not closed under it, and the
    site runs once."""
    with PrivateRabbit(consumer_timeout_ms=5000).running() as rabbit:
        opts = options(
            tmp_path,
            workers=1,
            amqp_url=rabbit.url,
            extra_env={
                "ACK_EARLY_AFTER_S": "2",
                "SITE_LEASE_S": "30",
                "CELLMESH_FAILPOINT": "worker.slow_site:75",
            },
        )
        mesh = await start_mesh(opts)
        try:
            async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
                catalog = catalog_stub(ch)
                sites = await create_generated_plate(catalog, tmp_path / "img", "L1", 1, 1, 1)
                await microscope.acquire(store, catalog, "L1", sites, 200)
                await wait_complete(catalog, "L1", 300, mesh)
                (job,) = await assert_nothing_lost(catalog, store, "L1", 1)
                assert job.state == types_pb2.SITE_STATE_DONE
                assert job.attempt == 1, "the site ran more than once"
            log = proc(mesh, "cpworker-0").log_path.read_text()
            assert "task acknowledged early" in log
            assert "PRECONDITION_FAILED" not in log and "redelivered task" not in log
        finally:
            await stop_mesh(mesh)


async def test_worker_dying_after_an_early_ack_loses_nothing(tmp_path: Path) -> None:
    """The lease guards an acknowledged site: the worker dies, the lease runs
    out, the site is claimed again and done by another attempt."""
    opts = options(
        tmp_path,
        workers=1,
        extra_env={
            "ACK_EARLY_AFTER_S": "1",
            "SITE_LEASE_S": "6",
            "CLAIM_LEASE_S": "5",
            "CELLMESH_FAILPOINT": "worker.slow_site:30",
        },
    )
    mesh = await start_mesh(opts)
    try:
        async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(ch)
            sites = await create_generated_plate(catalog, tmp_path / "img", "L2", 1, 1, 1)
            await microscope.acquire(store, catalog, "L2", sites, 200)
            worker = proc(mesh, "cpworker-0")
            deadline = time.monotonic() + 60
            while "task acknowledged early" not in worker.log_path.read_text():
                assert time.monotonic() < deadline, "the worker never took the lease"
                await asyncio.sleep(0.2)
            assert worker.popen is not None
            os.kill(worker.popen.pid, signal.SIGKILL)
            await asyncio.to_thread(worker.popen.wait)
            env = dict(worker.env)
            env.pop("CELLMESH_FAILPOINT")
            worker.env = env
            await restart(worker)
            await wait_complete(catalog, "L2", 300, mesh)
            (job,) = await assert_nothing_lost(catalog, store, "L2", 1)
            assert job.state == types_pb2.SITE_STATE_DONE
            assert job.attempt == 2, "the site should have been claimed again after its lease ran out"
    finally:
        await stop_mesh(mesh)


async def test_missing_object_and_failing_pipeline_get_their_failure_classes(tmp_path: Path) -> None:
    """A registered image whose object is not in the store fails at once as an
    input problem; a pipeline that CellProfiler cannot run (a module reads an
    image nothing provides) fails as a CellProfiler problem after its retries;
    the other sites go on."""
    mesh = await start_mesh(options(tmp_path, workers=1, extra_env={"MAX_ATTEMPTS": "2"}))
    try:
        async with mesh.channel() as ch, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(ch)
            sites = await create_generated_plate(catalog, tmp_path / "img", "X1", 1, 3, 1)
            gone = next(s for s in sites if s.well == "A02")
            await microscope.acquire(store, catalog, "X1", [s for s in sites if s is not gone], 200)
            regs = [
                catalog_pb2.ImageRegistration(
                    site=types_pb2.SiteRef(plate="X1", well="A02", site=0),
                    channel=channel,
                    object=types_pb2.ObjectRef(
                        key=f"images/X1/A02/s0/{channel}/never-uploaded.tif", size=10, sha256="ab" * 32
                    ),
                    file_name=f"X1_A02_s0_{channel}.tif",
                )
                for channel in gone.files
            ]
            await catalog.RegisterImages(catalog_pb2.RegisterImagesRequest(images=regs))
            await wait_complete(catalog, "X1", 300, mesh)
            jobs = {j.site.well: j for j in await assert_nothing_lost(catalog, store, "X1", 3)}
            assert jobs["A02"].state == types_pb2.SITE_STATE_FAILED
            assert jobs["A02"].failure_class == types_pb2.FAILURE_CLASS_INPUT_PROBLEM
            assert jobs["A02"].attempt == 1 and "missing" in jobs["A02"].failure_reason
            assert jobs["A01"].state == jobs["A03"].state == types_pb2.SITE_STATE_DONE

            broken = NUCLEI.read_text().replace(
                "Select the input image:DNA", "Select the input image:NotAnImage", 1
            )
            assert "NotAnImage" in broken
            sites = await create_generated_plate(
                catalog, tmp_path / "img2", "X2", 1, 2, 1, pipeline=broken.encode()
            )
            await microscope.acquire(store, catalog, "X2", sites, 200)
            await wait_complete(catalog, "X2", 300, mesh)
            for job in await assert_nothing_lost(catalog, store, "X2", 2):
                assert job.state == types_pb2.SITE_STATE_FAILED
                assert job.failure_class == types_pb2.FAILURE_CLASS_CP_PROBLEM, job
                assert job.attempt == 2, "retried up to MAX_ATTEMPTS"
            mesh.procs.check_alive()
    finally:
        await stop_mesh(mesh)
