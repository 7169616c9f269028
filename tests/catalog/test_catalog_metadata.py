"""A site's metadata (the ingest pattern's other named groups): checked,
stored once per site, refused when images of a site disagree, and handed to
ListImages, ListSites and every claim (site runs and plate stages)."""

from __future__ import annotations

import grpc
import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from tests.catalog.conftest import Catalog
from tests.catalog.kit import claim_all, image, new_plate, refused
from tests.catalog.test_catalog_stages import workflow

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def tagged(plate: str, well: str, site: int, channel: str, **metadata: str) -> catalog_pb2.ImageRegistration:
    reg = image(plate, well, site, channel)
    reg.metadata.update(metadata)
    return reg


async def register(catalog: Catalog, *images: catalog_pb2.ImageRegistration) -> None:
    await catalog.stub.RegisterImages(catalog_pb2.RegisterImagesRequest(images=list(images)))


async def test_metadata_is_stored_per_site_and_listed(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    await register(
        catalog,
        tagged("P1", "A01", 0, "DNA", Timepoint="T01", Compound="DMSO"),
        # The second channel says only part of it: the site keeps both keys.
        tagged("P1", "A01", 0, "GFP", Timepoint="T01"),
        tagged("P1", "A02", 0, "DNA", Timepoint="T02", Compound="taxol"),
        tagged("P1", "A02", 0, "GFP", Timepoint="T02", Compound="taxol"),
    )
    images = (await catalog.stub.ListImages(catalog_pb2.ListImagesRequest(plate="P1"))).images
    got = {(i.site.well, i.channel): dict(i.metadata) for i in images}
    assert got == {
        ("A01", "DNA"): {"Timepoint": "T01", "Compound": "DMSO"},
        ("A01", "GFP"): {"Timepoint": "T01", "Compound": "DMSO"},
        ("A02", "DNA"): {"Timepoint": "T02", "Compound": "taxol"},
        ("A02", "GFP"): {"Timepoint": "T02", "Compound": "taxol"},
    }
    sites = (await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1"))).sites
    assert {s.site.well: dict(s.metadata) for s in sites} == {
        "A01": {"Timepoint": "T01", "Compound": "DMSO"},
        "A02": {"Timepoint": "T02", "Compound": "taxol"},
    }
    claims = {c.site.well: c for c in await claim_all(catalog.stub)}
    assert [dict(i.metadata) for i in claims["A02"].images] == [{"Timepoint": "T02", "Compound": "taxol"}] * 2


async def test_a_later_image_adds_keys_and_an_unchanged_one_keeps_them(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    await register(catalog, tagged("P1", "B03", 1, "DNA", Timepoint="T05"))
    await register(catalog, tagged("P1", "B03", 1, "GFP", Timepoint="T05", Compound="DMSO"))
    # Registering the first image again without metadata changes nothing.
    await register(catalog, image("P1", "B03", 1, "DNA"))
    sites = (await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1"))).sites
    assert [dict(s.metadata) for s in sites] == [{"Timepoint": "T05", "Compound": "DMSO"}]


async def test_an_image_that_disagrees_with_its_site_is_refused(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    await register(catalog, tagged("P1", "A01", 0, "DNA", Timepoint="T01"))
    with refused(PRECONDITION, "metadata Timepoint 'T02'", "the site has 'T01'", "well A01 site 0"):
        await register(catalog, tagged("P1", "A01", 0, "GFP", Timepoint="T02"))
    # Nothing of the refused request was kept.
    images = (await catalog.stub.ListImages(catalog_pb2.ListImagesRequest(plate="P1"))).images
    assert [(i.channel, dict(i.metadata)) for i in images] == [("DNA", {"Timepoint": "T01"})]


async def test_images_of_one_request_that_disagree_are_refused(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    with refused(INVALID, "images 0 and 1", "metadata Compound as 'DMSO' and 'taxol'", "well C07 site 2"):
        await register(
            catalog,
            tagged("P1", "C07", 2, "DNA", Compound="DMSO"),
            tagged("P1", "C07", 2, "GFP", Compound="taxol"),
        )
    assert (await catalog.stub.ListImages(catalog_pb2.ListImagesRequest(plate="P1"))).images == []


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ({"2nd": "x"}, "key '2nd' is not a CellProfiler metadata name"),
        ({"Time point": "x"}, "key 'Time point' is not a CellProfiler metadata name"),
        ({"T" * 65: "x"}, "at most 64 characters"),
        ({"Well": "A01"}, "key 'Well' is what the site itself says"),
        ({"Plate": "P9"}, "key 'Plate' is what the site itself says"),
        ({"Site": "3"}, "key 'Site' is what the site itself says"),
        ({"Compound": "a/b"}, "Compound's value 'a/b' has a control character, '/'"),
        ({"Compound": ".."}, "or is '.' or '..'"),
        ({"Compound": "x\n"}, "has a control character"),
        ({"Compound": "x" * 256}, "at most 255 are allowed"),
        ({f"K{n}": "x" for n in range(33)}, "has 33 keys; at most 32"),
    ],
)
async def test_bad_metadata_is_refused_naming_what_to_fix(
    catalog: Catalog, metadata: dict[str, str], fragment: str
) -> None:
    await new_plate(catalog.stub, "P1")
    with refused(INVALID, "image 0 (P1 A01 site 0 DNA)", fragment):
        await register(catalog, tagged("P1", "A01", 0, "DNA", **metadata))


async def test_a_plate_stage_claim_carries_every_site_s_metadata(catalog: Catalog) -> None:
    await workflow(catalog.stub, "W1")
    await register(
        catalog,
        *[
            tagged("W1", w, 0, c, Compound=k)
            for w, k in (("A01", "DMSO"), ("A02", "taxol"))
            for c in ("DNA", "GFP")
        ],
    )
    (stage,) = await claim_all(catalog.stub)
    assert stage.scope == types_pb2.PIPELINE_SCOPE_PLATE
    assert {(i.site.well, i.channel): dict(i.metadata) for i in stage.images} == {
        ("A01", "DNA"): {"Compound": "DMSO"},
        ("A01", "GFP"): {"Compound": "DMSO"},
        ("A02", "DNA"): {"Compound": "taxol"},
        ("A02", "GFP"): {"Compound": "taxol"},
    }
