"""A worker whose object store cannot be used with its settings: it says which
setting to fix, takes no site and charges none an attempt; once the store is
right it goes on by itself. Real processes: catalog, scheduler, RabbitMQ, the
project's S3 server and CellProfiler."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2
from cellmesh.reducer.v1 import reducer_pb2, reducer_pb2_grpc
from cellmesh.worker.v1 import worker_pb2, worker_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.s3 import ObjectStore
from services.mesh import microscope
from services.mesh.demo import Mesh, start_mesh, stop_mesh
from services.mesh.procs import Proc, free_port
from tests.e2e.meshkit import catalog_stub, cp_python, create_generated_plate, options

pytestmark = pytest.mark.faults


def start_worker_unwaited(mesh: Mesh, tmp: Path, env: dict[str, str]) -> Proc:
    port = free_port()
    return mesh.procs.start(
        "cpworker-misconfigured",
        "services.cpworker",
        {
            **mesh.env,
            **mesh.service_env("cpworker"),
            "CATALOG_ADDR": mesh.catalog_addr,
            "GRPC_PORT": str(port),
            "CP_PYTHON": cp_python(),
            "WORK_DIR": str(tmp / "work"),
            **env,
        },
        port,
    )


async def worker_state(worker: Proc) -> tuple[int, str]:
    """(health status, not_serving_reason) of the worker."""
    async with worker.channel() as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        status = await worker_pb2_grpc.WorkerServiceStub(channel).GetWorkerStatus(
            worker_pb2.GetWorkerStatusRequest(), timeout=5
        )
    return health.status, status.not_serving_reason


async def wait_reason(worker: Proc, contains: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        assert worker.alive, f"the worker exited:\n{worker.log_tail()}"
        try:
            last = await worker_state(worker)
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.5)
            continue
        if contains in last[1]:
            assert last[0] == health_pb2.HealthCheckResponse.NOT_SERVING
            return last[1]
        await asyncio.sleep(0.3)
    raise AssertionError(f"worker never said {contains!r}: {last}\n{worker.log_tail()}")


async def copy_bucket(source: ObjectStore, target: ObjectStore) -> None:
    await target.ensure_bucket()
    async for obj in source.list_keys(""):
        await target.put_bytes(obj.key, await source.get_bytes(obj.key))


async def drop_bucket(store: ObjectStore) -> None:
    keys = [obj.key async for obj in store.list_keys("")]
    for key in keys:
        await store.delete(key)
    await store._client.delete_bucket(Bucket=store.bucket)


async def one_site(catalog: object, plate: str) -> catalog_pb2.SiteJob:
    reply = await catalog.ListSites(catalog_pb2.ListSitesRequest(plate=plate))  # type: ignore[attr-defined]
    (job,) = reply.sites
    return job  # type: ignore[no-any-return]


async def wait_done(catalog: object, plate: str, worker: Proc, timeout: float = 180) -> catalog_pb2.SiteJob:
    """The site's job once it is DONE (the report is not waited for: this
    worker writes its results to a bucket of its own)."""
    deadline = time.monotonic() + timeout
    job = await one_site(catalog, plate)
    while time.monotonic() < deadline and job.state != types_pb2.SITE_STATE_DONE:
        assert worker.alive, worker.log_tail()
        assert job.state != types_pb2.SITE_STATE_FAILED, job
        await asyncio.sleep(0.5)
        job = await one_site(catalog, plate)
    assert job.state == types_pb2.SITE_STATE_DONE, f"{job}\n{worker.log_tail()}"
    return job


async def test_worker_with_a_missing_bucket_waits_and_resumes(tmp_path: Path) -> None:
    mesh = await start_mesh(options(tmp_path / "mesh"), workers=0)
    bucket = f"wb-{uuid.uuid4().hex[:10]}"
    try:
        worker = start_worker_unwaited(mesh, tmp_path, {"S3_BUCKET": bucket, "PROBE_INTERVAL_S": "1"})
        # 1. It starts, says which setting is wrong, and stays up, NOT_SERVING.
        reason = await wait_reason(worker, "S3_BUCKET")
        assert bucket in reason, reason
        assert "S3_BUCKET" in worker.log_path.read_text(), "the log names the setting"

        async with (
            mesh.channel() as channel,
            ObjectStore(mesh.s3) as store,
            ObjectStore(replace(mesh.s3, bucket=bucket)) as workers_store,
        ):
            catalog = catalog_stub(channel)
            sites = await create_generated_plate(catalog, tmp_path / "img1", "M1", 1, 1, 1, size=128)
            await microscope.acquire(store, catalog, "M1", sites, 200)
            await asyncio.sleep(6)  # the task waits in the queue: nobody takes it
            job = await one_site(catalog, "M1")
            assert job.state == types_pb2.SITE_STATE_QUEUED, job
            assert worker.alive

            # 2. The bucket appears (with the mesh's objects): the worker goes on by itself.
            await copy_bucket(store, workers_store)
            job = await wait_done(catalog, "M1", worker)
            assert job.attempt == 1, job
            health, reason = await worker_state(worker)
            assert health == health_pb2.HealthCheckResponse.SERVING and reason == ""

            # 3. The bucket goes away while the worker serves: the site it takes
            # is handed back unrun, not failed, and no attempt is charged.
            await drop_bucket(workers_store)
            sites = await create_generated_plate(catalog, tmp_path / "img2", "M2", 1, 1, 1, size=128)
            await microscope.acquire(store, catalog, "M2", sites, 200)
            reason = await wait_reason(worker, "S3_BUCKET")
            assert "NoSuchBucket" in reason and bucket in reason, reason
            await asyncio.sleep(3)
            job = await one_site(catalog, "M2")
            assert job.state != types_pb2.SITE_STATE_FAILED and not job.failure_reason, job
            assert job.attempt == 1, job

            # 4. Fixed again: the same attempt runs and the site is done.
            await copy_bucket(store, workers_store)
            job = await wait_done(catalog, "M2", worker)
            assert job.attempt == 1, job
            assert "handing" in worker.log_path.read_text()
    finally:
        await stop_mesh(mesh)


async def reducer_health(reducer: Proc) -> int:
    async with reducer.channel() as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


async def reducer_refusal(reducer: Proc, plate: str) -> grpc.aio.AioRpcError:
    async with reducer.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await reducer_pb2_grpc.ReducerServiceStub(channel).ReducePlate(
                reducer_pb2.ReducePlateRequest(plate=plate), timeout=30
            )
    return info.value


async def wait_until(
    what: str, check: Callable[[], Awaitable[bool]], proc: Proc, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.alive, f"{proc.name} exited:\n{proc.log_tail()}"
        with contextlib.suppress(grpc.aio.AioRpcError):
            if await check():
                return
        await asyncio.sleep(0.3)
    raise AssertionError(f"{what} did not happen in {timeout} s:\n{proc.log_tail()}")


async def test_reducer_with_a_missing_bucket_waits_and_resumes(tmp_path: Path) -> None:
    mesh = await start_mesh(options(tmp_path / "mesh"), workers=1)
    bucket = f"rb-{uuid.uuid4().hex[:10]}"
    try:
        usual = next(p for p in mesh.procs.procs if p.name == "reducer")
        usual.signal(signal.SIGTERM)
        usual.popen.wait(30)  # type: ignore[union-attr]
        port = free_port()
        reducer = mesh.procs.start(
            "reducer-misconfigured",
            "services.reducer",
            {
                **mesh.env,
                **mesh.service_env("reducer"),
                "CATALOG_ADDR": mesh.catalog_addr,
                "GRPC_PORT": str(port),
                "S3_BUCKET": bucket,
                "PROBE_INTERVAL_S": "1",
            },
            port,
        )
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

        async def is_not_serving() -> bool:
            # NOT_SERVING because of the store (it also starts NOT_SERVING,
            # before its first probe has told it anything).
            closed = "S3_BUCKET" in reducer.log_path.read_text()
            return closed and await reducer_health(reducer) == not_serving

        await wait_until("NOT_SERVING", is_not_serving, reducer)
        refusal = await reducer_refusal(reducer, "R1")
        assert refusal.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "S3_BUCKET" in (refusal.details() or "") and bucket in (refusal.details() or "")
        assert "S3_BUCKET" in reducer.log_path.read_text()

        async with (
            mesh.channel() as channel,
            ObjectStore(mesh.s3) as store,
            ObjectStore(replace(mesh.s3, bucket=bucket)) as reducers_store,
        ):
            catalog = catalog_stub(channel)

            async def reported(plate: str) -> bool:
                progress = (
                    await catalog.GetPlateProgress(catalog_pb2.GetPlateProgressRequest(plate=plate))
                ).progress
                return bool(progress.complete)

            # 1. The plate's site is done, its reduce waits: the reducer takes no task.
            sites = await create_generated_plate(catalog, tmp_path / "img1", "R1", 1, 1, 1, size=128)
            await microscope.acquire(store, catalog, "R1", sites, 200)
            job = await wait_done(catalog, "R1", proc_named(mesh, "cpworker-0"))
            await asyncio.sleep(4)
            assert not await reported("R1")

            # 2. The bucket appears with the mesh's objects: the reducer goes on by itself.
            await copy_bucket(store, reducers_store)
            await wait_until("the report of R1", lambda: reported("R1"), reducer)
            assert await reducer_health(reducer) == health_pb2.HealthCheckResponse.SERVING

            # 3. The bucket goes away: the reduce task it takes is handed back, not failed.
            await drop_bucket(reducers_store)
            sites = await create_generated_plate(catalog, tmp_path / "img2", "R2", 1, 1, 1, size=128)
            await microscope.acquire(store, catalog, "R2", sites, 200)
            job = await wait_done(catalog, "R2", proc_named(mesh, "cpworker-0"))
            assert job.attempt == 1
            await wait_until("NOT_SERVING again", is_not_serving, reducer)
            assert "handing the reduce of plate R2 back" in reducer.log_path.read_text()

            # 4. Fixed again: the same task is reduced.
            await copy_bucket(store, reducers_store)
            await wait_until("the report of R2", lambda: reported("R2"), reducer)
    finally:
        await stop_mesh(mesh)


def proc_named(mesh: Mesh, name: str) -> Proc:
    return next(p for p in mesh.procs.procs if p.name == name)
