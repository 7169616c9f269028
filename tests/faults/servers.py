"""Private servers that fault tests may stop and restart without touching the
machine's shared ones: a RabbitMQ node and a MariaDB server on their own
ports and data folders, and a TCP proxy that can cut a connection path."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import free_port, wait_port


class PrivateRabbit:
    """A RabbitMQ node of its own (≈5 s to start)."""

    def __init__(self, consumer_timeout_ms: int | None = None, host: str = "127.0.0.1") -> None:
        # The server runs as the rabbitmq user: its folders must be its own
        # (pytest's tmp_path is not reachable for it).
        base = Path(tempfile.mkdtemp(prefix="cellmesh-rabbit-"))
        self.base = base
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"cmtest{self.port}@localhost"
        self.host = host
        self.url = f"amqp://guest:guest@{host}:{self.port}/%2F"
        base.mkdir(parents=True, exist_ok=True)
        (base / "enabled_plugins").write_text("[].\n")
        conf = "loopback_users = none\n"
        if consumer_timeout_ms is not None:
            conf += f"consumer_timeout = {consumer_timeout_ms}\n"
        (base / "rabbitmq.conf").write_text(conf)
        with contextlib.suppress(KeyError):
            owner = pwd.getpwnam("rabbitmq")
            for path in (base, base / "enabled_plugins", base / "rabbitmq.conf"):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_NODE_IP_ADDRESS": host,
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
        }

    def start(self) -> None:
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = subprocess.run(
                ["rabbitmqctl", "-n", self.node, "-q", "await_startup", "--timeout", "30"],
                env=self.env,
                capture_output=True,
            )
            if done.returncode == 0:
                wait_port(self.host, self.port, 30)
                return
            time.sleep(0.5)
        raise RuntimeError(f"private RabbitMQ node {self.node} did not start")

    def stop(self) -> None:
        subprocess.run(["rabbitmqctl", "-n", self.node, "-q", "shutdown"], env=self.env, capture_output=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[PrivateRabbit]:
        self.start()
        try:
            yield self
        finally:
            self.stop()
            shutil.rmtree(self.base, ignore_errors=True)


class PrivateMariaDB:
    """A MariaDB server of its own (< 1 s to start)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.datadir = base / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mysql+asyncmy://root:@127.0.0.1:{self.port}/cellmesh"

    def install(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        log = (self.base / "mariadb.log").open("ab")
        self.proc = subprocess.Popen(
            [
                "mariadbd",
                "--no-defaults",
                f"--datadir={self.datadir}",
                f"--socket={self.base / 'sock'}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-grant-tables=0",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_port("127.0.0.1", self.port, 30)

    def create_database(self) -> None:
        subprocess.run(
            [
                "mariadb",
                "-h127.0.0.1",
                f"-P{self.port}",
                "-uroot",
                "-e",
                "CREATE DATABASE IF NOT EXISTS cellmesh",
            ],
            check=True,
            capture_output=True,
        )

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    @contextlib.contextmanager
    def running(self) -> Iterator[PrivateMariaDB]:
        self.install()
        self.start()
        self.create_database()
        try:
            yield self
        finally:
            self.kill()
            shutil.rmtree(self.base, ignore_errors=True)


class TcpProxy:
    """Forwards 127.0.0.1:listen_port to 127.0.0.1:target_port; `cut()` drops
    every connection and refuses new ones until `restore()`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listen_port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.up = True

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.listen_port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        self.up = False
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
