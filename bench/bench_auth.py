"""What authentication costs a call: a real catalog gRPC server on loopback
(SQLite in a temporary folder), the same calls in plain text (AUTH=off, the
peer) and with TLS, client certificates and the role check (AUTH=on), by
certificate and by token. Prints a markdown table:

1. ListPlates latency (an empty catalog: the call's own cost), one call at a time (median and p90 of 500);
2. ListPlates throughput with 32 calls in flight (2,000 calls);
3. a new connection and its first call (median of 30): the TLS handshake.

    .venv/bin/python bench/bench_auth.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellmesh.auth import Credentials, aio_channel  # noqa: E402
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc  # noqa: E402

from services.catalog import migrate  # noqa: E402
from services.catalog.servicer import SERVICE_NAME, CatalogServicer  # noqa: E402
from services.catalog.store import CatalogStore  # noqa: E402
from services.common import pki  # noqa: E402
from services.common.auth import MeshAuth  # noqa: E402
from services.common.s3 import ObjectStore  # noqa: E402
from services.common.server import GrpcServer, Registration  # noqa: E402
from services.common.settings import S3Settings  # noqa: E402


async def measure(address: str, credentials: Credentials | None) -> tuple[float, float, float, float]:
    request = catalog_pb2.ListPlatesRequest()
    async with aio_channel(address, credentials) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        for _ in range(50):
            await stub.ListPlates(request)
        one: list[float] = []
        for _ in range(500):
            t0 = time.perf_counter()
            await stub.ListPlates(request)
            one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        left = 2000

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await stub.ListPlates(request)

        await asyncio.gather(*(caller() for _ in range(32)))
        rate = 2000 / (time.perf_counter() - t0)
    fresh: list[float] = []
    for _ in range(30):
        t0 = time.perf_counter()
        async with aio_channel(address, credentials) as channel:
            await catalog_pb2_grpc.CatalogServiceStub(channel).ListPlates(request)
        fresh.append(time.perf_counter() - t0)
    one.sort()
    return statistics.median(one), one[int(len(one) * 0.9)], rate, statistics.median(fresh)


async def server(folder: Path, auth: MeshAuth | None) -> tuple[GrpcServer, CatalogStore, str]:
    url = f"sqlite+aiosqlite:///{folder / 'catalog.db'}"
    await migrate.upgrade(url)
    store = CatalogStore.connect(url)
    servicer = CatalogServicer(store, ObjectStore(S3Settings(None, "unused", "us-east-1", "x", "x")))
    grpc_server = GrpcServer(
        [Registration(catalog_pb2_grpc.add_CatalogServiceServicer_to_server, servicer, SERVICE_NAME)],
        host="127.0.0.1",
        port=0,
        grace_seconds=1,
        auth=auth,
    )
    port = await grpc_server.start()
    return grpc_server, store, f"127.0.0.1:{port}"


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
        folder = Path(tmp)
        keys = pki.local_mesh(folder / "pki")
        rows = []
        for label, auth, creds in (
            ("plain text, no checks (AUTH=off)", None, None),
            (
                "TLS, operator's certificate (AUTH=on)",
                MeshAuth.from_env(keys.service_env("catalog")),
                keys.credentials(),
            ),
            (
                "TLS, client certificate + operator's token",
                MeshAuth.from_env(keys.service_env("catalog")),
                keys.credentials("operator", token=True),
            ),
        ):
            sub = folder / str(len(rows))
            sub.mkdir()
            grpc_server, store, address = await server(sub, auth)
            try:
                median, p90, rate, fresh = await measure(address, creds)
            finally:
                await grpc_server.stop()
                await store.close()
            rows.append((label, median, p90, rate, fresh))
        print(
            "| catalog ListPlates on loopback | median | p90 | 32 in flight | new connection + first call |"
        )
        print("|---|---:|---:|---:|---:|")
        for label, median, p90, rate, fresh in rows:
            print(
                f"| {label} | {median * 1e3:.2f} ms | {p90 * 1e3:.2f} ms | {rate:,.0f} calls/s | {fresh * 1e3:.1f} ms |"
            )


if __name__ == "__main__":
    asyncio.run(main())
