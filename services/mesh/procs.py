"""Running the mesh's services as local processes: start, wait for health,
stop in order (SIGTERM, a grace period, then SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cellmesh.auth import Credentials, aio_channel
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    grpc_addr: str = ""
    # The operator's credentials of the mesh it belongs to (None: AUTH=off).
    credentials: Credentials | None = None

    def channel(self) -> grpc.aio.Channel:
        """A channel to its gRPC server, as the mesh's operator."""
        return aio_channel(self.grpc_addr, self.credentials)

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
        )
        out.close()

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """The mesh's processes, stopped in reverse start order."""

    log_dir: Path
    base_env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    procs: list[Proc] = field(default_factory=list)
    # What the health checks connect with (None: the mesh runs with AUTH=off).
    credentials: Credentials | None = None

    def start(
        self,
        name: str,
        module: str,
        env: dict[str, str],
        grpc_port: int | None = None,
        args: tuple[str, ...] = (),
        host: str = "127.0.0.1",
        launcher: tuple[str, ...] = (),
    ) -> Proc:
        """Starts `python -m module args` (after `launcher`, e.g. `ip netns
        exec NS`, which must exec the command in place) whose gRPC server
        listens on host:grpc_port."""
        argv = [*launcher, sys.executable, "-m", module, *args]
        proc = Proc(
            name, argv, {**self.base_env, **env}, self.log_dir / f"{name}.log", credentials=self.credentials
        )
        if grpc_port is not None:
            proc.grpc_addr = f"{host}:{grpc_port}"
        proc.start()
        self.procs.append(proc)
        return proc

    async def wait_healthy(self, proc: Proc, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        async with aio_channel(proc.grpc_addr, self.credentials) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not proc.alive:
                    raise RuntimeError(f"{proc.name} exited while starting:\n{proc.log_tail()}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{proc.name} not healthy after {timeout:.0f} s:\n{proc.log_tail()}")

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive:
                code = proc.popen.returncode if proc.popen else None
                raise RuntimeError(f"{proc.name} exited (code {code}):\n{proc.log_tail()}")

    async def stop(self, grace: float = 20.0, keep: tuple[str, ...] = ()) -> None:
        """Stops every process but those named in `keep`, last started first."""
        for proc in reversed(self.procs):
            if proc.name in keep:
                continue
            proc.signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while proc.alive and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if proc.alive:
                log.warning("%s did not stop in %.0f s; killing it", proc.name, grace)
                proc.signal(signal.SIGKILL)
            if proc.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(5)
