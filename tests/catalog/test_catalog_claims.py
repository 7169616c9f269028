"""ClaimReadySites and MarkSitesQueued: what a claim carries, atomicity
between schedulers, lease expiry."""

from __future__ import annotations

import asyncio

import grpc
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2

from tests import pki as test_pki
from tests.catalog.conftest import Catalog
from tests.catalog.kit import claim_all, image, new_plate, ready_sites, refused, sha, site_images, wells

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def test_a_claim_carries_the_task(catalog: Catalog) -> None:
    _plate, pipe = await new_plate(catalog.stub, "P1")
    regs = [image("P1", "B03", 2, "GFP", content=b"gfp"), image("P1", "B03", 2, "DNA", content=b"dna")]
    await catalog.stub.RegisterImages(catalog_pb2.RegisterImagesRequest(images=regs))
    (claim,) = await claim_all(catalog.stub, "sched-1")
    assert claim.attempt == 1
    assert claim.site == types_pb2.SiteRef(plate="P1", well="B03", site=2)
    assert claim.pipeline == pipe.ref
    assert list(claim.expected_tables) == ["Image.csv", "Nuclei.csv"]
    assert [(i.channel, i.object.sha256, i.object.size, i.file_name) for i in claim.images] == [
        ("DNA", sha(b"dna"), 3, "B03_s2_DNA.tif"),
        ("GFP", sha(b"gfp"), 3, "B03_s2_GFP.tif"),
    ]
    assert claim.images[0].object.key == "images/P1/B03/s2/DNA.tif"
    assert await claim_all(catalog.stub, "sched-1") == []
    (site,) = (await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1"))).sites
    assert site.state == types_pb2.SITE_STATE_CLAIMED

    marked = await catalog.stub.MarkSitesQueued(
        catalog_pb2.MarkSitesQueuedRequest(
            scheduler_id="sched-1",
            sites=[
                catalog_pb2.QueuedSite(site_job_id=claim.site_job_id, attempt=claim.attempt),
                catalog_pb2.QueuedSite(site_job_id=claim.site_job_id + 1000, attempt=1),
            ],
        )
    )
    assert marked.marked == 1
    (site,) = (await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1"))).sites
    assert site.state == types_pb2.SITE_STATE_QUEUED
    again = await catalog.stub.MarkSitesQueued(
        catalog_pb2.MarkSitesQueuedRequest(
            scheduler_id="sched-1", sites=[catalog_pb2.QueuedSite(site_job_id=claim.site_job_id, attempt=1)]
        )
    )
    assert again.marked == 1  # a replay: the answer of the first call


async def test_claims_are_oldest_first_and_bounded(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    for w in ("C01", "A01", "B01"):
        await catalog.stub.RegisterImages(
            catalog_pb2.RegisterImagesRequest(images=site_images("P1", w, 0, ["DNA", "GFP"]))
        )
    reply = await catalog.stub.ClaimReadySites(
        catalog_pb2.ClaimReadySitesRequest(scheduler_id="s", max_sites=2)
    )
    assert [c.site.well for c in reply.claims] == ["C01", "A01"]
    with refused(INVALID, "max_sites 0 is out of range: ask for 1 to 1000"):
        await catalog.stub.ClaimReadySites(catalog_pb2.ClaimReadySitesRequest(scheduler_id="s", max_sites=0))
    with refused(INVALID, "scheduler_id is required"):
        await catalog.stub.ClaimReadySites(catalog_pb2.ClaimReadySitesRequest(max_sites=1))
    with refused(INVALID, "lease_seconds 7200 is out of range"):
        await catalog.stub.ClaimReadySites(
            catalog_pb2.ClaimReadySitesRequest(scheduler_id="s", max_sites=1, lease_seconds=7200)
        )


async def test_two_schedulers_never_get_the_same_site(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    await ready_sites(catalog.stub, "P1", 200)
    channels = [test_pki.channel(catalog.address, "scheduler") for _ in range(2)]
    stubs = [catalog_pb2_grpc.CatalogServiceStub(c) for c in channels]

    async def scheduler(n: int) -> list[int]:
        got: list[int] = []
        while True:
            reply = await stubs[n % 2].ClaimReadySites(
                catalog_pb2.ClaimReadySitesRequest(scheduler_id=f"s{n}", max_sites=7, lease_seconds=60)
            )
            if not reply.claims:
                return got
            got += [c.site_job_id for c in reply.claims]

    try:
        results = await asyncio.gather(*(scheduler(n) for n in range(4)))
    finally:
        for c in channels:
            await c.close()
    claimed = [job for r in results for job in r]
    assert len(claimed) == 200 and len(set(claimed)) == 200
    assert all(results), "every scheduler got some work"
    for a in range(4):
        for b in range(a + 1, 4):
            assert not set(results[a]) & set(results[b])


async def test_an_expired_lease_is_claimed_again_with_a_new_attempt(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    await ready_sites(catalog.stub, "P1", 2)
    first = await claim_all(catalog.stub, "crashed", lease=1)
    assert [c.attempt for c in first] == [1, 1]
    assert await claim_all(catalog.stub, "other") == []
    await asyncio.sleep(1.3)
    second = await claim_all(catalog.stub, "other")
    assert sorted(c.site_job_id for c in second) == sorted(c.site_job_id for c in first)
    assert [c.attempt for c in second] == [2, 2]
    late = await catalog.stub.MarkSitesQueued(
        catalog_pb2.MarkSitesQueuedRequest(
            scheduler_id="crashed",
            sites=[catalog_pb2.QueuedSite(site_job_id=c.site_job_id, attempt=c.attempt) for c in first],
        )
    )
    assert late.marked == 0
    current = await catalog.stub.MarkSitesQueued(
        catalog_pb2.MarkSitesQueuedRequest(
            scheduler_id="other",
            sites=[catalog_pb2.QueuedSite(site_job_id=c.site_job_id, attempt=c.attempt) for c in second],
        )
    )
    assert current.marked == 2
    # A queued site is not claimed again, however old.
    await asyncio.sleep(0.1)
    assert await claim_all(catalog.stub, "other") == []


async def test_claims_span_plates(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    await new_plate(catalog.stub, "P2", channels=("DNA",))
    await catalog.stub.RegisterImages(
        catalog_pb2.RegisterImagesRequest(
            images=[*site_images("P1", "A01", 0, ["DNA", "GFP"]), image("P2", "A01", 0, "DNA")]
        )
    )
    claims = await claim_all(catalog.stub)
    assert sorted((c.site.plate, len(c.images)) for c in claims) == [("P1", 2), ("P2", 1)]
    assert len(wells(1)) == 1
