"""Fixtures for the real parts: the project's S3 server on loopback, the
machine's MariaDB and RabbitMQ. A test that cannot reach a server it needs
fails with a message that says how to start it; nothing is skipped."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.common.settings import S3Settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CELLMESH_SHARED_DATA", REPO.parent / "shared" / "data"))

MARIADB_HOST = os.environ.get("TEST_MARIADB_HOST", "127.0.0.1")
MARIADB_PORT = int(os.environ.get("TEST_MARIADB_PORT", "3306"))
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout} s")


def require_port(host: str, port: int, what: str, how: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        pytest.fail(f"{what} is not reachable on {host}:{port} ({exc}); start it with: {how}", pytrace=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(
            f"the shared data folder {SHARED_DATA} is missing (set CELLMESH_SHARED_DATA)", pytrace=False
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The project's S3 server (moto server mode) on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.common.s3server", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port("127.0.0.1", port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_settings(s3_endpoint: str) -> S3Settings:
    """A fresh bucket per test on the session's S3 server."""
    return S3Settings(s3_endpoint, f"t-{uuid.uuid4().hex[:12]}", "us-east-1", "test", "test")


@pytest.fixture(scope="session")
def mariadb_server() -> tuple[str, int]:
    require_port(
        MARIADB_HOST,
        MARIADB_PORT,
        "MariaDB",
        'start-stop-daemon --start --oknodo --background --exec "$(command -v mariadbd)"',
    )
    return MARIADB_HOST, MARIADB_PORT


@contextlib.asynccontextmanager
async def fresh_mariadb_database(host: str, port: int) -> AsyncIterator[str]:
    """Creates a database with a unique name on MariaDB; drops it afterwards."""
    import asyncmy

    name = f"cellmesh_t_{uuid.uuid4().hex[:10]}"
    conn = await asyncmy.connect(host=host, port=port, user="root", password="")
    async with conn.cursor() as cur:
        await cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield f"mysql+asyncmy://root:@{host}:{port}/{name}"
    finally:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture
async def mariadb_url(mariadb_server: tuple[str, int]) -> AsyncIterator[str]:
    """A fresh database on the machine's MariaDB."""
    async with fresh_mariadb_database(*mariadb_server) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"


@pytest.fixture(params=["sqlite", "mariadb"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Runs a test once on SQLite and once on the real MariaDB."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"
        return
    async with fresh_mariadb_database(*request.getfixturevalue("mariadb_server")) as url:
        yield url


@pytest.fixture(scope="session")
def amqp_url() -> str:
    require_port("127.0.0.1", 5672, "RabbitMQ", "rabbitmq-server -detached")
    return AMQP_URL


@pytest.fixture
def queue_prefix() -> str:
    """A unique queue-name prefix, so tests never share queues."""
    return f"t{uuid.uuid4().hex[:10]}"
