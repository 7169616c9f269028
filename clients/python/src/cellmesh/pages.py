"""Walking the catalog's paged lists. ``ListSites`` answers one bounded page
at a time (plate order, ``next_page_token`` to continue); these follow the
tokens to the end so that no caller stops at the first page."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from cellmesh.catalog.v1 import catalog_pb2

if TYPE_CHECKING:
    from cellmesh.catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub


async def site_jobs(
    stub: CatalogServiceAsyncStub, request: catalog_pb2.ListSitesRequest, timeout: float | None = None
) -> AsyncIterator[catalog_pb2.SiteJob]:
    """Every job `request` selects, page by page; only one page is held."""
    page = catalog_pb2.ListSitesRequest()
    page.CopyFrom(request)
    while True:
        reply = await stub.ListSites(page, timeout=timeout)
        for job in reply.sites:
            yield job
        if not reply.next_page_token:
            return
        page.page_token = reply.next_page_token


async def all_site_jobs(
    stub: CatalogServiceAsyncStub, request: catalog_pb2.ListSitesRequest, timeout: float | None = None
) -> list[catalog_pb2.SiteJob]:
    """Every job `request` selects, from every page, in plate order."""
    return [job async for job in site_jobs(stub, request, timeout)]


async def image_pages(
    stub: CatalogServiceAsyncStub, request: catalog_pb2.ListImagesRequest, timeout: float | None = None
) -> AsyncIterator[list[catalog_pb2.Image]]:
    """Every image `request` selects, one ListImages page (at most 10,000) at a time."""
    page = catalog_pb2.ListImagesRequest()
    page.CopyFrom(request)
    while True:
        reply = await stub.ListImages(page, timeout=timeout)
        if reply.images:
            yield list(reply.images)
        if not reply.next_page_token:
            return
        page.page_token = reply.next_page_token
