"""The catalog as a process and as a gRPC server: health, reflection,
`migrate` then `serve` on a fresh database, a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.catalog import migrate
from services.common.settings import S3Settings
from tests import pki as test_pki
from tests.catalog.conftest import Catalog
from tests.conftest import REPO, free_port

SERVICE = "cellmesh.catalog.v1.CatalogService"


async def health(address: str, service: str = "") -> int:
    async with test_pki.channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return int(reply.status)


async def test_health_and_reflection_list_the_service(catalog: Catalog) -> None:
    assert await health(catalog.address, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    async with test_pki.channel(catalog.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for reply in call for s in reply.list_services_response.service]
    assert SERVICE in names and "grpc.health.v1.Health" in names


def environment(database_url: str, s3: S3Settings, port: int, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("S3_", "DATABASE_URL", "GRPC_", "AWS_", "TLS_", "AUTH"))
    }
    env.update(
        DATABASE_URL=database_url,
        GRPC_HOST="127.0.0.1",
        GRPC_PORT=str(port),
        S3_ENDPOINT_URL=s3.endpoint_url or "",
        S3_BUCKET=s3.bucket,
        S3_REGION=s3.region,
        AWS_ACCESS_KEY_ID=s3.access_key,
        AWS_SECRET_ACCESS_KEY=s3.secret_key,
        GRACE_SECONDS="3",
        **test_pki.service_env("catalog"),
        **extra,
    )
    return env


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def catalog_process(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.catalog", *args], env=env, cwd=REPO, stderr=subprocess.PIPE
    )


async def wait_for(address: str, status: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = await health(address)
            if last == status:
                return
        except grpc.aio.AioRpcError as exc:
            last = exc.code()
        await asyncio.sleep(0.1)
    raise AssertionError(f"health of {address} is {last}, not {status}, after {timeout} s")


async def test_migrate_then_serve_then_stop(
    database_url: str, s3_settings: S3Settings, processes: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    env = environment(database_url, s3_settings, port, CATALOG_MIGRATE_ON_START="0")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.catalog", "migrate"],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert await migrate.current(database_url) == "0012"

    proc = catalog_process(env, "serve")
    processes.append(proc)
    address = f"127.0.0.1:{port}"
    await wait_for(address, health_pb2.HealthCheckResponse.SERVING)
    async with test_pki.channel(address) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        assert (await stub.ListPlates(catalog_pb2.ListPlatesRequest())).plates == []
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert proc.stderr is not None
    log = proc.stderr.read().decode()
    assert "SERVING" in log and "gRPC server stopped" in log


async def test_not_serving_until_the_object_store_answers(
    sqlite_url: str, s3_settings: S3Settings, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    port = free_port()
    dead = S3Settings(f"http://127.0.0.1:{free_port()}", "b", "us-east-1", "k", "s")
    proc = catalog_process(environment(sqlite_url, dead, port), "serve")
    processes.append(proc)
    address = f"127.0.0.1:{port}"
    await wait_for(address, health_pb2.HealthCheckResponse.NOT_SERVING)
    await asyncio.sleep(1.5)
    assert await health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def test_missing_settings_are_reported_together(s3_settings: S3Settings) -> None:
    env = environment("sqlite+aiosqlite:///x.db", s3_settings, 0, MAX_ATTEMPTS="zero")
    del env["AWS_ACCESS_KEY_ID"]
    done = subprocess.run(
        [sys.executable, "-m", "services.catalog", "serve"],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 2
    err = done.stderr.decode()
    assert "AWS_ACCESS_KEY_ID is not set" in err and "MAX_ATTEMPTS='zero' is not valid" in err
