"""RegisterImages and ListImages: validation of the whole batch, idempotency,
conflicts and replacement, readiness."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from tests.catalog.conftest import Catalog
from tests.catalog.kit import claim_all, image, new_plate, refused, run_to_done, site_images, wells

INVALID = grpc.StatusCode.INVALID_ARGUMENT
CREATED = catalog_pb2.REGISTRATION_OUTCOME_CREATED
UNCHANGED = catalog_pb2.REGISTRATION_OUTCOME_UNCHANGED
REPLACED = catalog_pb2.REGISTRATION_OUTCOME_REPLACED


def register(images: list[catalog_pb2.ImageRegistration]) -> catalog_pb2.RegisterImagesRequest:
    return catalog_pb2.RegisterImagesRequest(images=images)


async def states(catalog: Catalog, plate: str) -> dict[tuple[str, int], int]:
    sites = (await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate=plate))).sites
    return {(s.site.well, s.site.site): s.state for s in sites}


def with_object(reg: catalog_pb2.ImageRegistration, **fields: object) -> catalog_pb2.ImageRegistration:
    copy = catalog_pb2.ImageRegistration()
    copy.CopyFrom(reg)
    for name, value in fields.items():
        if name in ("key", "sha256", "size"):
            setattr(copy.object, name, value)
        elif name in ("well", "site"):
            setattr(copy.site, name, value)
        else:
            setattr(copy, name, value)
    return copy


BAD_IMAGES = [
    ({"well": "A1"}, "well 'A1' is not like A01..AF48"),
    ({"well": "AG01"}, "well 'AG01' is not like A01..AF48"),
    ({"well": "A49"}, "well 'A49' is not like A01..AF48"),
    ({"well": "a01"}, "well 'a01' is not like A01..AF48"),
    ({"site": -1}, "site -1 is negative"),
    ({"channel": "RFP"}, "channel 'RFP' is not one plate P1 declares (DNA, GFP)"),
    ({"key": "../etc/passwd"}, "contains '..'"),
    ({"key": "/images/a.tif"}, "starts with '/'"),
    ({"key": "images\\a.tif"}, "contains a backslash"),
    ({"key": "k" * 1025}, "at most 1024 are allowed"),
    ({"key": ""}, "object.key is required"),
    ({"sha256": ""}, "checksum is required"),
    ({"sha256": "A" * 64}, "64 lowercase hex digits"),
    ({"size": -1}, "size -1 is negative"),
    ({"file_name": "dir/a.tif"}, "has a folder in it"),
    ({"file_name": ""}, "file_name is required"),
]


@pytest.mark.parametrize(("change", "fragment"), BAD_IMAGES, ids=[f for _c, f in BAD_IMAGES])
async def test_a_bad_image_refuses_the_whole_batch(
    catalog: Catalog, change: dict[str, object], fragment: str
) -> None:
    await new_plate(catalog.stub, "P1")
    good = site_images("P1", "A01", 0, ["DNA", "GFP"])
    bad = with_object(image("P1", "B01", 0, "DNA"), **change)
    with refused(INVALID, "image 2 (", fragment):
        await catalog.stub.RegisterImages(register([*good, bad]))
    plate = (await catalog.stub.GetPlate(catalog_pb2.GetPlateRequest(name="P1"))).plate
    assert plate.image_count == 0
    assert (await catalog.stub.ListImages(catalog_pb2.ListImagesRequest(plate="P1"))).images == []
    assert await states(catalog, "P1") == {}


async def test_batch_limits_and_unknown_plates(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    many = [image("P1", w, s, "DNA") for w in wells(384) for s in range(27)][:10_001]
    with refused(INVALID, "at most 10000 images per call; split the batch"):
        await catalog.stub.RegisterImages(register(many))
    with refused(grpc.StatusCode.NOT_FOUND, "plate 'nope' does not exist; create it with CreatePlate"):
        await catalog.stub.RegisterImages(
            register([*site_images("P1", "A01", 0, ["DNA"]), image("nope", "A01", 0, "DNA")])
        )
    assert (await catalog.stub.GetPlate(catalog_pb2.GetPlateRequest(name="P1"))).plate.image_count == 0
    reply = await catalog.stub.RegisterImages(register([]))
    assert list(reply.outcomes) == [] and reply.sites_ready == 0


async def test_registration_is_idempotent_and_makes_sites_ready(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    dna = [image("P1", w, 0, "DNA") for w in ("A01", "A02")]
    reply = await catalog.stub.RegisterImages(register(dna))
    assert list(reply.outcomes) == [CREATED, CREATED] and reply.sites_ready == 0
    assert await states(catalog, "P1") == {
        ("A01", 0): types_pb2.SITE_STATE_WAITING,
        ("A02", 0): types_pb2.SITE_STATE_WAITING,
    }
    reply = await catalog.stub.RegisterImages(register([*dna, image("P1", "A01", 0, "GFP")]))
    assert list(reply.outcomes) == [UNCHANGED, UNCHANGED, CREATED] and reply.sites_ready == 1
    sites = (await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1"))).sites
    assert [(s.site.well, s.state, s.HasField("ready_at")) for s in sites] == [
        ("A01", types_pb2.SITE_STATE_READY, True),
        ("A02", types_pb2.SITE_STATE_WAITING, False),
    ]
    # The same image twice in one batch is one image.
    twice = [image("P1", "A02", 0, "GFP"), image("P1", "A02", 0, "GFP")]
    reply = await catalog.stub.RegisterImages(register(twice))
    assert list(reply.outcomes) == [CREATED, UNCHANGED] and reply.sites_ready == 1
    plate = (await catalog.stub.GetPlate(catalog_pb2.GetPlateRequest(name="P1"))).plate
    assert plate.image_count == 4


async def test_a_different_image_for_an_occupied_slot(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    await catalog.stub.RegisterImages(register(site_images("P1", "A01", 0, ["DNA", "GFP"])))
    (claim,) = await claim_all(catalog.stub)
    await run_to_done(catalog.stub, claim)
    other = image("P1", "A01", 0, "DNA", content=b"re-imaged", key="images/P1/A01/s0/DNA-2.tif")
    with refused(
        grpc.StatusCode.ALREADY_EXISTS,
        "plate 'P1' well A01 site 0 channel DNA already has a different image",
        "set replace",
    ):
        await catalog.stub.RegisterImages(register([image("P1", "A02", 0, "DNA"), other]))
    assert (await catalog.stub.GetPlate(catalog_pb2.GetPlateRequest(name="P1"))).plate.image_count == 2
    conflicting = [image("P1", "A02", 0, "DNA"), image("P1", "A02", 0, "DNA", content=b"other")]
    with refused(INVALID, "images 0 and 1 are both for plate 'P1' well A02 site 0 channel DNA"):
        await catalog.stub.RegisterImages(register(conflicting))

    reply = await catalog.stub.RegisterImages(register([with_object(other, replace=True)]))
    assert list(reply.outcomes) == [REPLACED]
    (site,) = (
        await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1", with_results=True))
    ).sites
    assert site.state == types_pb2.SITE_STATE_READY and not site.results and site.attempt == 1
    (claim,) = await claim_all(catalog.stub)
    assert claim.attempt == 2
    assert [i.object.key for i in claim.images] == ["images/P1/A01/s0/DNA-2.tif", "images/P1/A01/s0/GFP.tif"]
    images = (await catalog.stub.ListImages(catalog_pb2.ListImagesRequest(plate="P1"))).images
    assert [i.object.sha256 for i in images][0] == other.object.sha256


async def test_concurrent_registrations_never_miss_readiness(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1", channels=("DNA", "GFP", "RFP"))
    sites = wells(40)

    async def send(channel: str) -> None:
        for w in sites:
            await catalog.stub.RegisterImages(register([image("P1", w, 0, channel)]))

    await asyncio.gather(send("DNA"), send("GFP"), send("RFP"))
    assert set((await states(catalog, "P1")).values()) == {types_pb2.SITE_STATE_READY}
    assert len(await claim_all(catalog.stub)) == 40


async def test_layout_and_finished_acquisition_limit_new_sites(catalog: Catalog) -> None:
    layout = catalog_pb2.PlateLayout(rows=8, columns=12, sites_per_well=2, first_site=1, wells=["A01", "B02"])
    await new_plate(catalog.stub, "L", layout=layout)
    with refused(INVALID, "well A02 site 1 is outside plate L's layout"):
        await catalog.stub.RegisterImages(register([image("L", "A02", 1, "DNA")]))
    with refused(INVALID, "well A01 site 0 is outside plate L's layout"):
        await catalog.stub.RegisterImages(register([image("L", "A01", 0, "DNA")]))
    reply = await catalog.stub.RegisterImages(register(site_images("L", "B02", 2, ["DNA", "GFP"])))
    assert reply.sites_ready == 1

    await new_plate(catalog.stub, "Open")
    await catalog.stub.RegisterImages(register([image("Open", "A01", 0, "DNA")]))
    await catalog.stub.FinishAcquisition(catalog_pb2.FinishAcquisitionRequest(plate="Open"))
    with refused(grpc.StatusCode.FAILED_PRECONDITION, "finished its acquisition", "A02 site 0 is a new site"):
        await catalog.stub.RegisterImages(register([image("Open", "A02", 0, "DNA")]))
    # The missing channel of a known site still completes it, and it runs.
    reply = await catalog.stub.RegisterImages(register([image("Open", "A01", 0, "GFP")]))
    assert reply.sites_ready == 1
    assert await states(catalog, "Open") == {("A01", 0): types_pb2.SITE_STATE_READY}


async def test_list_images_pages_in_well_site_channel_order(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    regs = [
        img
        for w in ("B01", "A02", "A01", "AA01")
        for s in (1, 0)
        for img in site_images("P1", w, s, ["GFP", "DNA"])
    ]
    await catalog.stub.RegisterImages(register(regs))
    seen = []
    token = ""
    pages = 0
    while True:
        reply = await catalog.stub.ListImages(
            catalog_pb2.ListImagesRequest(plate="P1", page_size=5, page_token=token)
        )
        seen += [(i.site.well, i.site.site, i.channel) for i in reply.images]
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    assert pages == 4
    expected = [(w, s, c) for w in ("A01", "A02", "B01", "AA01") for s in (0, 1) for c in ("DNA", "GFP")]
    assert seen == expected
    one = await catalog.stub.ListImages(catalog_pb2.ListImagesRequest(plate="P1", well="A02"))
    assert [(i.site.well, i.site.site, i.channel) for i in one.images] == [
        e for e in expected if e[0] == "A02"
    ]
    first = one.images[0]
    assert first.file_name == "A02_s0_DNA.tif" and first.object.size > 0 and first.HasField("registered_at")
    with refused(INVALID, "page_token is not one this catalog issued"):
        await catalog.stub.ListImages(catalog_pb2.ListImagesRequest(plate="P1", page_token="garbage"))
