"""A catalog on a real gRPC server (127.0.0.1, a free port) over the test's
database (SQLite and MariaDB) and a fresh bucket on the project's S3 server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from cellmesh.catalog.v1 import catalog_pb2_grpc

from services.catalog import lifecycle, migrate
from services.catalog.servicer import SERVICE_NAME, CatalogServicer
from services.catalog.store import CatalogStore
from services.common.s3 import ObjectStore
from services.common.server import GrpcServer, Registration
from services.common.settings import S3Settings
from tests import pki as test_pki

if TYPE_CHECKING:
    from cellmesh.catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub


TEST_POLICY = lifecycle.Policy(
    max_attempts=3, retry_base_s=0.01, retry_max_s=0.01, transient_delay_s=0.01, transient_max_delay_s=0.01
)


@dataclass
class Catalog:
    stub: CatalogServiceAsyncStub
    store: CatalogStore
    objects: ObjectStore
    address: str
    database_url: str
    servicer: CatalogServicer


@pytest.fixture
async def catalog(database_url: str, s3_settings: S3Settings) -> AsyncIterator[Catalog]:
    await migrate.upgrade(database_url)
    # Retries come due at once here; tests of the timing set their own policy.
    store = CatalogStore.connect(database_url, policy=TEST_POLICY)
    try:
        async with ObjectStore(s3_settings) as objects:
            await objects.ensure_bucket()
            servicer = CatalogServicer(store, objects, watch_poll_seconds=0.5)
            server = GrpcServer(
                [Registration(catalog_pb2_grpc.add_CatalogServiceServicer_to_server, servicer, SERVICE_NAME)],
                host="127.0.0.1",
                port=0,
                grace_seconds=2,
                auth=test_pki.server_auth("catalog"),
            )
            port = await server.start()
            await server.set_serving(True)
            address = f"127.0.0.1:{port}"
            try:
                async with test_pki.channel(address) as channel:
                    yield Catalog(
                        catalog_pb2_grpc.CatalogServiceStub(channel),
                        store,
                        objects,
                        address,
                        database_url,
                        servicer,
                    )
            finally:
                servicer.close()
                await server.stop()
        # Whatever the test did, every run's kept counts (the database's
        # triggers, migration 0009) equal a count of its jobs.
        assert await store.run_count_mismatches() == []
    finally:
        await store.close()
