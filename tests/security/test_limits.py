"""Request sizes per RPC and users' call rates (services/common/limits.py):
unit tests of the token bucket, and the catalog on a real TLS server over
SQLite with a low rate, called with certificates of the tests' CA."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc

from services.catalog import migrate
from services.catalog.servicer import SERVICE_NAME, CatalogServicer
from services.catalog.store import CatalogStore
from services.common import limits
from services.common.limits import Limits, RateLimiter
from services.common.s3 import ObjectStore
from services.common.server import GrpcServer, Registration
from services.common.settings import COMMON_VARS, S3Settings, SettingsError, load
from tests import pki as test_pki
from tests.security.test_role_table import every_rpc

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_bucket_gives_its_burst_then_its_rate() -> None:
    now = [100.0]
    limiter = RateLimiter(per_second=2, burst=3, clock=lambda: now[0])
    assert [limiter.take("ann") for _ in range(3)] == [0, 0, 0]
    assert limiter.take("ann") == pytest.approx(0.5)
    assert limiter.take("bob") == 0  # a bucket per caller
    now[0] += 0.5
    assert limiter.take("ann") == 0
    assert limiter.take("ann") > 0
    now[0] += 60
    assert [limiter.take("ann") for _ in range(3)] == [0, 0, 0]  # never more than the burst
    assert limiter.take("ann") > 0
    assert RateLimiter(per_second=0, burst=1).take("ann") == 0  # 0: no limit


def test_the_limits_name_real_rpcs_and_the_settings_are_checked() -> None:
    assert set(limits.REQUEST_LIMITS) <= every_rpc()
    assert limits.user_facing("/cellmesh.catalog.v1.CatalogService/ListPlates")
    assert not limits.user_facing("/cellmesh.catalog.v1.CatalogService/ClaimReadySites")
    assert Limits.from_settings(load(COMMON_VARS, {"AUTH": "off"})) == Limits(100.0, 500)
    with pytest.raises(SettingsError, match="RATE_LIMIT_PER_S"):
        load(COMMON_VARS, {"RATE_LIMIT_PER_S": "-1"})


@pytest.fixture
async def address(tmp_path: Path, s3_settings: S3Settings) -> AsyncIterator[str]:
    """A catalog over TLS whose users may make 3 calls at once, then 2 a second."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"
    await migrate.upgrade(url)
    store = CatalogStore.connect(url)
    async with ObjectStore(s3_settings) as objects:
        await objects.ensure_bucket()
        servicer = CatalogServicer(store, objects)
        server = GrpcServer(
            [Registration(catalog_pb2_grpc.add_CatalogServiceServicer_to_server, servicer, SERVICE_NAME)],
            host="127.0.0.1",
            port=0,
            grace_seconds=1,
            auth=test_pki.server_auth(),
            limits=Limits(rate_per_s=2, rate_burst=3),
        )
        port = await server.start()
        await server.set_serving(True)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            servicer.close()
            await server.stop()
            await store.close()


async def status(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        status.details = exc.details() or ""  # type: ignore[attr-defined]
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_user_past_the_rate_is_told_when_to_retry_and_services_are_not_limited(address: str) -> None:
    async with (
        test_pki.channel(address, "operator") as operator,
        test_pki.channel(address, "viewer", token=True) as viewer,
        test_pki.channel(address, "scheduler") as scheduler,
    ):
        ops, views, sched = (catalog_pb2_grpc.CatalogServiceStub(c) for c in (operator, viewer, scheduler))
        request = catalog_pb2.ListPlatesRequest()
        assert [await status(ops.ListPlates(request)) for _ in range(3)] == [grpc.StatusCode.OK] * 3
        assert await status(ops.ListPlates(request)) == EXHAUSTED
        details = status.details  # type: ignore[attr-defined]
        assert "too many calls from operator" in details and "retry in" in details, details
        # Another user has a bucket of their own; the mesh's services none.
        assert await status(views.ListPlates(request)) == grpc.StatusCode.OK
        assert [await status(sched.ListPlates(request)) for _ in range(10)] == [grpc.StatusCode.OK] * 10


async def test_a_request_over_its_rpcs_size_is_refused_and_stores_nothing(address: str) -> None:
    async with test_pki.channel(address, "scheduler") as channel:  # not rate-limited
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        # A read takes 1 MiB at most.
        code = await status(stub.GetPlate(catalog_pb2.GetPlateRequest(name="P" * (2 * 1024 * 1024))))
        details = status.details  # type: ignore[attr-defined]
        assert code == EXHAUSTED and "GetPlate takes at most 1.0 MiB" in details, details
    async with test_pki.channel(address, "operator") as channel:  # 3 calls: its burst
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        # The same bytes fit a registration of images (16 MiB): refused for what they say instead.
        big = catalog_pb2.RegisterImagesRequest(
            images=[catalog_pb2.ImageRegistration(channel="x" * (2 * 1024 * 1024))]
        )
        code = await status(stub.RegisterImages(big))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, status.details  # type: ignore[attr-defined]
        # The refusal quotes the 2 MiB value shortened, so that it fits gRPC's status header.
        assert "characters left out" in status.details  # type: ignore[attr-defined]
        # Past the largest limit, the server does not even read it.
        huge = catalog_pb2.RegisterPipelineRequest(name="big", content=b"x" * (41 * 1024 * 1024))
        assert await status(stub.RegisterPipeline(huge)) == EXHAUSTED
        # 5 MiB is over RegisterPipeline's .cppipe limit but under the RPC's: the catalog says why.
        five = catalog_pb2.RegisterPipelineRequest(name="big", content=b"x" * (5 * 1024 * 1024))
        assert await status(stub.RegisterPipeline(five)) == grpc.StatusCode.INVALID_ARGUMENT
        assert "4 MiB" in status.details  # type: ignore[attr-defined]
        reply = await stub.ListPipelines(catalog_pb2.ListPipelinesRequest())
        assert list(reply.pipelines) == []
