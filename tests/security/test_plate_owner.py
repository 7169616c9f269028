"""A scientist requeues only the plates they created; an operator any plate.
The catalog on a real TLS server, callers with certificates of the tests' CA."""

from __future__ import annotations

from pathlib import Path

import grpc
from cellmesh.auth import Credentials, aio_channel
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc

from services.common import pki
from tests import pki as test_pki
from tests.catalog.conftest import Catalog, catalog  # noqa: F401  (the fixture)
from tests.e2e.meshkit import NUCLEI


def other_scientist(tmp_path: Path) -> Credentials:
    """A second scientist, "bob", with a certificate of the same CA."""
    local = test_pki.local()
    cert, key = pki.Authority.load(local.folder).issue("scientist", "bob")
    return Credentials(local.ca.read_bytes(), cert, key)


async def requeue(credentials: Credentials, address: str, plate: str) -> grpc.StatusCode:
    async with aio_channel(address, credentials) as channel:
        try:
            await catalog_pb2_grpc.CatalogServiceStub(channel).RequeueSites(
                catalog_pb2.RequeueSitesRequest(plate=plate, reduce=True)
            )
        except grpc.aio.AioRpcError as exc:
            requeue.last = exc.details() or ""  # type: ignore[attr-defined]
            return exc.code()
    return grpc.StatusCode.OK


async def sites(address: str, plate: str) -> list[str]:
    async with test_pki.channel(address) as channel:
        reply = await catalog_pb2_grpc.CatalogServiceStub(channel).ListSites(
            catalog_pb2.ListSitesRequest(plate=plate)
        )
    return [str(job) for job in reply.sites]


async def test_a_scientist_requeues_only_their_own_plates(catalog: Catalog, tmp_path: Path) -> None:  # noqa: F811
    alice = test_pki.credentials("scientist")  # certificate "local-scientist"
    alice_by_token = test_pki.credentials("scientist", token=True)  # token "local-scientist"
    bob = other_scientist(tmp_path)
    operator = test_pki.credentials("operator")
    async with aio_channel(catalog.address, alice) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        sha = (
            await stub.RegisterPipeline(
                catalog_pb2.RegisterPipelineRequest(name="n", content=NUCLEI.read_bytes())
            )
        ).pipeline.ref.sha256
        layout = catalog_pb2.PlateLayout(rows=1, columns=2, sites_per_well=1)
        await stub.CreatePlate(
            catalog_pb2.CreatePlateRequest(
                name="ALICE1", channels=["DNA", "GFP"], pipeline_sha256=sha, layout=layout
            )
        )
    async with aio_channel(catalog.address, operator) as channel:
        await catalog_pb2_grpc.CatalogServiceStub(channel).CreatePlate(
            catalog_pb2.CreatePlateRequest(
                name="OPS1", channels=["DNA", "GFP"], pipeline_sha256=sha, layout=layout
            )
        )
    before = await sites(catalog.address, "ALICE1")

    assert await requeue(bob, catalog.address, "ALICE1") == grpc.StatusCode.PERMISSION_DENIED
    message = requeue.last  # type: ignore[attr-defined]
    assert "created by local-scientist, not bob" in message and "only their own plates" in message
    assert await sites(catalog.address, "ALICE1") == before
    assert await requeue(alice, catalog.address, "OPS1") == grpc.StatusCode.PERMISSION_DENIED

    assert await requeue(alice, catalog.address, "ALICE1") == grpc.StatusCode.OK
    assert await requeue(alice_by_token, catalog.address, "ALICE1") == grpc.StatusCode.OK
    assert await requeue(operator, catalog.address, "ALICE1") == grpc.StatusCode.OK
    assert await requeue(operator, catalog.address, "OPS1") == grpc.StatusCode.OK
    stored = await catalog.store.get_plate("ALICE1")
    assert stored.created_by == "local-scientist"
