"""CreatePlate, GetPlate, ListPlates, AddPlatePipeline."""

from __future__ import annotations

import grpc
import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from tests.catalog.conftest import Catalog
from tests.catalog.kit import new_plate, pipeline, refused, register_pipeline, site_images

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def create(
    name: str, channels: list[str], sha: str, layout: catalog_pb2.PlateLayout | None = None
) -> catalog_pb2.CreatePlateRequest:
    return catalog_pb2.CreatePlateRequest(name=name, channels=channels, pipeline_sha256=sha, layout=layout)


@pytest.mark.parametrize(
    ("name", "channels", "layout", "fragment"),
    [
        ("bad name!", ["DNA", "GFP"], None, "plate name 'bad name!' is not valid"),
        ("x" * 65, ["DNA", "GFP"], None, "1 to 64 letters"),
        ("P1", [], None, "channels are required"),
        ("P1", ["DNA", "DNA", "GFP"], None, "channel 'DNA' is listed twice"),
        ("P1", ["DNA", "GFP", "1st"], None, "channel '1st' is not valid"),
        (
            "P1",
            ["DNA", "GFP"],
            catalog_pb2.PlateLayout(rows=33, columns=12, sites_per_well=1),
            "rows 33 is out of range",
        ),
        (
            "P1",
            ["DNA", "GFP"],
            catalog_pb2.PlateLayout(rows=8, columns=49, sites_per_well=1),
            "columns 49 is out of range",
        ),
        (
            "P1",
            ["DNA", "GFP"],
            catalog_pb2.PlateLayout(rows=8, columns=12, sites_per_well=0),
            "sites_per_well 0",
        ),
        (
            "P1",
            ["DNA", "GFP"],
            catalog_pb2.PlateLayout(rows=8, columns=12, sites_per_well=1, wells=["A1"]),
            "well 'A1' is not like A01..AF48",
        ),
        (
            "P1",
            ["DNA", "GFP"],
            catalog_pb2.PlateLayout(rows=8, columns=12, sites_per_well=1, wells=["I01"]),
            "outside a plate of 8 rows",
        ),
    ],
)
async def test_invalid_plates_are_refused(
    catalog: Catalog, name: str, channels: list[str], layout: catalog_pb2.PlateLayout | None, fragment: str
) -> None:
    pipe = await register_pipeline(catalog.stub, pipeline())
    with refused(INVALID, fragment):
        await catalog.stub.CreatePlate(create(name, channels, pipe.ref.sha256, layout))
    assert (await catalog.stub.ListPlates(catalog_pb2.ListPlatesRequest())).plates == []


async def test_the_pipeline_must_exist_and_fit_the_channels(catalog: Catalog) -> None:
    with refused(INVALID, "pipeline_sha256 is required"):
        await catalog.stub.CreatePlate(create("P1", ["DNA"], ""))
    with refused(grpc.StatusCode.NOT_FOUND, "register it with RegisterPipeline"):
        await catalog.stub.CreatePlate(create("P1", ["DNA"], "a" * 64))
    pipe = await register_pipeline(catalog.stub, pipeline(images=["DNA", "PH3"]), name="mitosis")
    with refused(
        INVALID,
        f"pipeline mitosis ({pipe.ref.sha256[:12]}) assigns image 'PH3', which plate P1 does not declare; "
        "declare it as a channel or use another pipeline",
    ):
        await catalog.stub.CreatePlate(create("P1", ["DNA", "GFP"], pipe.ref.sha256))
    # Extra channels the pipeline does not use are fine.
    await catalog.stub.CreatePlate(create("P1", ["DNA", "PH3", "Brightfield"], pipe.ref.sha256))
    with refused(grpc.StatusCode.ALREADY_EXISTS, "plate 'P1' exists already"):
        await catalog.stub.CreatePlate(create("P1", ["DNA", "PH3"], pipe.ref.sha256))


async def test_a_layout_creates_a_waiting_job_for_every_expected_site(catalog: Catalog) -> None:
    layout = catalog_pb2.PlateLayout(rows=16, columns=24, sites_per_well=3, first_site=1)
    plate, pipe = await new_plate(catalog.stub, "L384", layout=layout)
    assert plate.sites_known and not plate.acquisition_finished
    assert plate.layout == layout and list(plate.pipeline_sha256) == [pipe.ref.sha256]
    sites = (await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="L384", page_size=2000))).sites
    assert len(sites) == 384 * 3
    assert {s.state for s in sites} == {types_pb2.SITE_STATE_WAITING}
    assert [(s.site.well, s.site.site) for s in sites[:4]] == [("A01", 1), ("A01", 2), ("A01", 3), ("A02", 1)]
    assert (sites[-1].site.well, sites[-1].site.site) == ("P24", 3)

    listed = catalog_pb2.PlateLayout(rows=8, columns=12, sites_per_well=2, wells=["B03", "A01"])
    await new_plate(catalog.stub, "Listed", layout=listed)
    sites = (await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="Listed"))).sites
    assert [(s.site.well, s.site.site) for s in sites] == [("A01", 0), ("A01", 1), ("B03", 0), ("B03", 1)]


async def test_get_and_list_plates(catalog: Catalog) -> None:
    with refused(grpc.StatusCode.NOT_FOUND, "plate 'nope' does not exist; create it with CreatePlate"):
        await catalog.stub.GetPlate(catalog_pb2.GetPlateRequest(name="nope"))
    await new_plate(catalog.stub, "first")
    await new_plate(catalog.stub, "second")
    names = [p.name for p in (await catalog.stub.ListPlates(catalog_pb2.ListPlatesRequest())).plates]
    assert names == ["second", "first"]
    got = (await catalog.stub.GetPlate(catalog_pb2.GetPlateRequest(name="first"))).plate
    assert got.name == "first" and list(got.channels) == ["DNA", "GFP"] and not got.HasField("layout")


async def test_add_plate_pipeline_runs_it_on_every_known_site(catalog: Catalog) -> None:
    plate, first = await new_plate(catalog.stub, "P1")
    regs = site_images("P1", "A01", 0, ["DNA", "GFP"]) + site_images("P1", "A02", 0, ["DNA"])
    await catalog.stub.RegisterImages(catalog_pb2.RegisterImagesRequest(images=regs))
    second = await register_pipeline(catalog.stub, pipeline(note="second"), name="second")
    reply = await catalog.stub.AddPlatePipeline(
        catalog_pb2.AddPlatePipelineRequest(plate="P1", pipeline_sha256=second.ref.sha256)
    )
    assert reply.site_jobs_created == 2
    assert list(reply.plate.pipeline_sha256) == [first.ref.sha256, second.ref.sha256]
    sites = (
        await catalog.stub.ListSites(
            catalog_pb2.ListSitesRequest(plate="P1", pipeline_sha256=second.ref.sha256)
        )
    ).sites
    assert [(s.site.well, s.state) for s in sites] == [
        ("A01", types_pb2.SITE_STATE_READY),
        ("A02", types_pb2.SITE_STATE_WAITING),
    ]
    with refused(grpc.StatusCode.ALREADY_EXISTS, "already runs on plate 'P1'"):
        await catalog.stub.AddPlatePipeline(
            catalog_pb2.AddPlatePipelineRequest(plate="P1", pipeline_sha256=second.ref.sha256)
        )
    other = await register_pipeline(catalog.stub, pipeline(images=["DNA", "RFP"]), name="rfp")
    with refused(INVALID, "assigns image 'RFP', which plate P1 does not declare"):
        await catalog.stub.AddPlatePipeline(
            catalog_pb2.AddPlatePipelineRequest(plate="P1", pipeline_sha256=other.ref.sha256)
        )
    # A new site gets a job in both runs.
    await catalog.stub.RegisterImages(
        catalog_pb2.RegisterImagesRequest(images=site_images("P1", "A03", 0, ["DNA", "GFP"]))
    )
    for sha in (first.ref.sha256, second.ref.sha256):
        sites = (
            await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1", pipeline_sha256=sha))
        ).sites
        assert [s.site.well for s in sites] == ["A01", "A02", "A03"]
    with refused(grpc.StatusCode.NOT_FOUND, "does not run on plate 'P1'; add it with AddPlatePipeline"):
        await catalog.stub.ListSites(
            catalog_pb2.ListSitesRequest(plate="P1", pipeline_sha256=other.ref.sha256)
        )
