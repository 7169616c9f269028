"""The Swarm backend of the autoscaler against a fake Docker client (no Docker
engine runs here): it reads and sets the service's replica count the way the
`docker` package's Service objects do, and says what to fix when it cannot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from cellmesh.auth import sync_channel
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.mesh.autoscale import (
    Autoscaler,
    AutoscaleSettings,
    Backlog,
    SwarmBackend,
    Throughput,
    parse_range,
)
from services.mesh.scaling import ScalePolicy
from tests import pki as test_pki
from tests.conftest import free_port


class FakeService:
    def __init__(self, replicas: int | None, refuse: bool = False) -> None:
        mode: dict[str, Any] = {"Global": {}} if replicas is None else {"Replicated": {"Replicas": replicas}}
        self.attrs: dict[str, Any] = {"Spec": {"Name": "cellmesh_cpworker", "Mode": mode}}
        self.refuse = refuse
        self.reloads = 0
        self.scaled: list[int] = []

    def reload(self) -> None:
        self.reloads += 1

    def scale(self, replicas: int) -> bool:
        # docker's Service.scale updates the spec's Replicated.Replicas.
        if self.refuse:
            return False
        self.scaled.append(replicas)
        self.attrs["Spec"]["Mode"]["Replicated"]["Replicas"] = replicas
        return True


class FakeServices:
    def __init__(self, services: dict[str, FakeService]) -> None:
        self._services = services

    def get(self, name: str) -> FakeService:
        if name not in self._services:
            raise docker.errors.NotFound(f"service {name} not found")
        return self._services[name]


class FakeClient:
    def __init__(self, **services: FakeService) -> None:
        self.services = FakeServices(services)


class FakeBacklog:
    def __init__(self, *readings: tuple[int, int]) -> None:
        self.readings = list(readings)

    async def read(self) -> Backlog:
        waiting, running = self.readings.pop(0)
        return Backlog(waiting, running)


async def test_reads_and_scales_the_service_replicas() -> None:
    service = FakeService(2)
    backend = SwarmBackend(FakeClient(cellmesh_cpworker=service), "cellmesh_cpworker")
    assert await backend.replicas() == 2
    assert service.reloads == 1  # a fresh spec, not a cached one
    await backend.scale_to(5)
    assert service.scaled == [5]
    assert await backend.replicas() == 5


async def test_the_autoscaler_drives_swarm_up_and_down() -> None:
    service = FakeService(1)
    backend = SwarmBackend(FakeClient(cellmesh_cpworker=service), "cellmesh_cpworker")
    now = [0.0]
    scaler = Autoscaler(
        AutoscaleSettings(ScalePolicy(1, 6, 2, up_cooldown_s=0, down_cooldown_s=30), 1.0),
        backend,
        FakeBacklog((20, 0), (3, 6), (0, 1), (0, 1)),  # type: ignore[arg-type]
        clock=lambda: now[0],
    )
    assert (await scaler.step()).replicas == 6  # 20 sites, 2 slots each, at most 6
    now[0] = 10
    assert (await scaler.step()).replicas == 6  # 9 sites still want 5: hold
    now[0] = 20
    assert (await scaler.step()).replicas == 6  # fits in fewer workers for 10 s only: hold
    now[0] = 51
    assert (await scaler.step()).replicas == 1
    assert service.scaled == [6, 1]


async def test_a_missing_service_says_which_setting_to_fix() -> None:
    backend = SwarmBackend(FakeClient(), "cellmesh_cpworker")
    with pytest.raises(RuntimeError, match="AUTOSCALE_SERVICE"):
        await backend.replicas()


async def test_a_global_service_cannot_be_scaled() -> None:
    backend = SwarmBackend(FakeClient(w=FakeService(None)), "w")
    with pytest.raises(RuntimeError, match="not replicated"):
        await backend.replicas()


async def test_a_refused_scale_is_an_error() -> None:
    backend = SwarmBackend(FakeClient(w=FakeService(1, refuse=True)), "w")
    with pytest.raises(RuntimeError, match="did not scale w to 3"):
        await backend.scale_to(3)


def test_settings_from_the_environment() -> None:
    s = AutoscaleSettings.from_env(
        {
            "AUTOSCALE_MIN": "2",
            "AUTOSCALE_MAX": "8",
            "AUTOSCALE_UP_COOLDOWN_S": "5",
            "AUTOSCALE_DOWN_COOLDOWN_S": "120",
            "AUTOSCALE_INTERVAL_S": "3",
            "CP_SLOTS": "2",
        }
    )
    assert s.policy == ScalePolicy(2, 8, 2, 5.0, 120.0) and s.interval_s == 3.0
    with pytest.raises(ValueError, match="AUTOSCALE_MIN/AUTOSCALE_MAX"):
        AutoscaleSettings.from_env({"AUTOSCALE_MIN": "4", "AUTOSCALE_MAX": "2"})


@pytest.mark.parametrize("text", ["3", "a:b", "1:", "2:1", "0:0", "-1:2"])
def test_bad_ranges_say_what_to_give(text: str) -> None:
    with pytest.raises(ValueError, match="MIN"):
        parse_range(text)


def test_a_range() -> None:
    assert parse_range("1:3") == (1, 3)
    assert parse_range("0:2") == (0, 2)


def test_the_swarm_autoscaler_without_an_engine_stays_not_serving_and_says_why(tmp_path: Path) -> None:
    """`python -m services.mesh.autoscale` (the stack's autoscaler) started
    where no Docker Engine answers: it keeps trying, its health is
    NOT_SERVING, its log names the socket, and SIGTERM stops it cleanly."""
    port = free_port()
    env = {
        **os.environ,
        "GRPC_PORT": str(port),
        "GRPC_HOST": "127.0.0.1",
        "CATALOG_ADDR": f"127.0.0.1:{free_port()}",
        "DOCKER_HOST": f"unix://{tmp_path / 'no-docker.sock'}",
        "AUTOSCALE_INTERVAL_S": "0.5",
        **test_pki.service_env("autoscaler"),
    }
    log_path = tmp_path / "autoscaler.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.mesh.autoscale"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while "does not answer yet" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        assert "/var/run/docker.sock mounted" in log_path.read_text()
        with sync_channel(f"127.0.0.1:{port}", test_pki.credentials("operator")) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_throughput_from_the_catalogs_counts() -> None:
    t = Throughput(window_s=60)
    assert t.add(0, {("P1", "a"): 5}) == 0.0  # one look: nothing to compare yet
    assert t.add(10, {("P1", "a"): 15}) == 1.0
    # A new plate counts from its first look; a plate that completed drops out.
    assert t.add(20, {("P2", "a"): 100}) == 0.5
    assert t.add(30, {("P2", "a"): 130}) == 40 / 30
    # Only the last minute counts (from the last look before it).
    assert t.add(100, {("P2", "a"): 200}) == 70 / 70
    assert t.add(200, {("P2", "a"): 200}) == 0.0
