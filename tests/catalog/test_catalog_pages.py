"""ListSites in pages: plate order, every site exactly once, the page size
limits, the byte budget per page and tokens that belong to one listing."""

from __future__ import annotations

import grpc
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from tests.catalog.conftest import Catalog
from tests.catalog.kit import claim_all, new_plate, ready_sites, refused, run_to_done, site_images

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def walk(catalog: Catalog, first: catalog_pb2.ListSitesRequest) -> list[catalog_pb2.ListSitesResponse]:
    """Every page of a listing, following next_page_token to its end."""
    request = catalog_pb2.ListSitesRequest()
    request.CopyFrom(first)
    pages = []
    while True:
        reply = await catalog.stub.ListSites(request)
        pages.append(reply)
        if not reply.next_page_token:
            return pages
        assert reply.sites, "a page followed by a token holds jobs"
        request.page_token = reply.next_page_token


def keys(pages: list[catalog_pb2.ListSitesResponse]) -> list[tuple[str, int]]:
    return [(j.site.well, j.site.site) for p in pages for j in p.sites]


async def test_pages_walk_the_plate_in_order_with_every_site_once(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    # Registered out of plate order, with a two-letter row (AA) after B.
    regs = [
        img
        for w in ("B01", "AA01", "A02", "A01", "B12", "A10")
        for s in (2, 0, 1)
        for img in site_images("P1", w, s, ["DNA", "GFP"])
    ]
    await catalog.stub.RegisterImages(catalog_pb2.RegisterImagesRequest(images=regs))
    expected = [(w, s) for w in ("A01", "A02", "A10", "B01", "B12", "AA01") for s in (0, 1, 2)]

    pages = await walk(catalog, catalog_pb2.ListSitesRequest(plate="P1", page_size=4))
    assert [len(p.sites) for p in pages] == [4, 4, 4, 4, 2]
    assert keys(pages) == expected
    assert pages[-1].next_page_token == ""

    # A page size that divides the plate ends without an empty page.
    pages = await walk(catalog, catalog_pb2.ListSitesRequest(plate="P1", page_size=6))
    assert [len(p.sites) for p in pages] == [6, 6, 6] and keys(pages) == expected

    # A state filter pages over the matching jobs only.
    claims = sorted(await claim_all(catalog.stub), key=lambda c: (c.site.well, c.site.site))
    done = claims[::3]
    for claim in done:
        await run_to_done(catalog.stub, claim)
    pages = await walk(
        catalog,
        catalog_pb2.ListSitesRequest(
            plate="P1", states=[types_pb2.SITE_STATE_DONE], page_size=2, with_results=True
        ),
    )
    assert sorted(keys(pages)) == sorted((c.site.well, c.site.site) for c in done)
    assert keys(pages) == [k for k in expected if k in set(keys(pages))]
    assert all(j.results for p in pages for j in p.sites)


async def test_default_and_largest_page_sizes(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    await ready_sites(catalog.stub, "P1", 600)
    # An old caller that sends no page_size gets the default page and a token.
    first = await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1"))
    assert len(first.sites) == 500 and first.next_page_token
    rest = await catalog.stub.ListSites(
        catalog_pb2.ListSitesRequest(plate="P1", page_token=first.next_page_token)
    )
    assert len(rest.sites) == 100 and not rest.next_page_token
    assert len({(j.site.well, j.site.site) for j in [*first.sites, *rest.sites]}) == 600

    whole = await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1", page_size=2000))
    assert len(whole.sites) == 600 and not whole.next_page_token
    for bad in (2001, -1):
        with refused(INVALID, f"page_size {bad} is out of range", "1 to 2000"):
            await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1", page_size=bad))


async def test_a_page_ends_at_its_byte_budget(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    await ready_sites(catalog.stub, "P1", 40)
    for claim in await claim_all(catalog.stub):
        await run_to_done(catalog.stub, claim)
    request = catalog_pb2.ListSitesRequest(plate="P1", with_results=True, page_size=2000)
    one = (await catalog.stub.ListSites(request)).sites[0].ByteSize()
    budget = one * 7 + one // 2
    catalog.servicer.sites_page_bytes = budget

    pages = await walk(catalog, request)
    assert len(pages) > 1
    assert all(p.ByteSize() <= budget + 16 for p in pages), [p.ByteSize() for p in pages]
    assert all(len(p.sites) >= 6 for p in pages[:-1]), [len(p.sites) for p in pages]
    assert len(keys(pages)) == 40 and len(set(keys(pages))) == 40

    # A single job larger than the budget still comes, one per page.
    catalog.servicer.sites_page_bytes = 1
    pages = await walk(catalog, request)
    assert [len(p.sites) for p in pages] == [1] * 40


async def test_tokens_belong_to_one_listing(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    await new_plate(catalog.stub, "P2", content=None)
    await ready_sites(catalog.stub, "P1", 5)
    await ready_sites(catalog.stub, "P2", 5)
    token = (
        await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1", page_size=2))
    ).next_page_token
    assert token
    with refused(INVALID, "page_token belongs to another plate or pipeline", "'P2'"):
        await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P2", page_token=token))
    images = await catalog.stub.ListImages(catalog_pb2.ListImagesRequest(plate="P1", page_size=1))
    for bad in ("garbage", images.next_page_token, token[:-3]):
        with refused(INVALID, "page_token is not one ListSites issued"):
            await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1", page_token=bad))
