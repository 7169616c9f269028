"""The whole path — object store → catalog → scheduler → RabbitMQ → workers →
object store + catalog → reducer — with real servers and real CellProfiler."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from services.common.s3 import ObjectStore
from services.mesh import microscope
from services.mesh.demo import start_mesh, stop_mesh
from tests.e2e.meshkit import assert_nothing_lost, catalog_stub, options, wait_complete

pytestmark = pytest.mark.e2e


async def test_generated_plate_counts_equal_drawn_nuclei(tmp_path: Path) -> None:
    """Two workers, sites completing out of order: every site done once,
    nuclei counted = nuclei drawn, the report's per-well counts = the truth."""
    opts = options(tmp_path, workers=2, rows=2, columns=3, sites=2, rate=30.0)
    mesh = await start_mesh(opts)
    try:
        async with mesh.channel() as channel, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(channel)
            pipeline = await catalog.RegisterPipeline(
                catalog_pb2.RegisterPipelineRequest(
                    name="nuclei",
                    content=(Path(__file__).parents[2] / "examples/pipelines/nuclei.cppipe").read_bytes(),
                )
            )
            await catalog.CreatePlate(
                catalog_pb2.CreatePlateRequest(
                    name="E2E1",
                    channels=["DNA", "GFP"],
                    layout=catalog_pb2.PlateLayout(rows=2, columns=3, sites_per_well=2),
                    pipeline_sha256=pipeline.pipeline.ref.sha256,
                    reduce_with_failures=True,
                )
            )
            wells = microscope.plate_wells(2, 3)
            sites = microscope.generate_plate(tmp_path / "img", "E2E1", wells, 2, 256, seed=3)
            await microscope.acquire(store, catalog, "E2E1", sites, images_per_second=40)
            progress = await wait_complete(catalog, "E2E1", timeout=300, mesh=mesh)
            assert progress.done == 12 and progress.failed == 0
            jobs = await assert_nothing_lost(catalog, store, "E2E1", 12)
            drawn = {(s.well, s.site): s.nuclei for s in sites}
            counted = {(j.site.well, j.site.site): j.provenance.object_counts["Nuclei"] for j in jobs}
            assert counted == drawn
            workers = {j.provenance.worker_id for j in jobs}
            assert len(workers) == 2, f"both workers should have taken sites: {workers}"
            report = (await catalog.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate="E2E1"))).report
            assert report.version == 1 and report.wells == 6 and report.sites == 12
            per_well = next(f for f in report.files if f.kind == catalog_pb2.REPORT_FILE_KIND_WELL_TABLE)
            assert per_well is not None
            png = [f for f in report.files if f.kind == catalog_pb2.REPORT_FILE_KIND_HEATMAP_PNG]
            assert png and (await store.get_bytes(png[0].object.key))[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        await stop_mesh(mesh)


async def test_example_human_site_through_the_mesh(tmp_path: Path, shared_data: Path) -> None:
    """The CellProfiler team's ExampleHuman site and pipeline: 289 nuclei, 22 PH3."""
    folder = shared_data / "example_human"
    mesh = await start_mesh(options(tmp_path, workers=1))
    try:
        async with mesh.channel() as channel, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(channel)
            pipeline = await catalog.RegisterPipeline(
                catalog_pb2.RegisterPipelineRequest(
                    name="ExampleHuman", content=(folder / "ExampleHuman.cppipe").read_bytes()
                )
            )
            await catalog.CreatePlate(
                catalog_pb2.CreatePlateRequest(
                    name="AS_09125",
                    channels=["DNA", "PH3", "cellbody"],
                    pipeline_sha256=pipeline.pipeline.ref.sha256,
                    layout=catalog_pb2.PlateLayout(wells=["D03"], rows=8, columns=12, sites_per_well=1),
                )
            )
            regs = []
            for channel_index, name in enumerate(["DNA", "PH3", "cellbody"]):
                path = folder / "images" / f"AS_09125_050116030001_D03f00d{channel_index}.tif"
                stored = await store.put_file(f"images/AS_09125/D03/s0/{name}/{path.name}", path)
                regs.append(
                    catalog_pb2.ImageRegistration(
                        site=types_pb2.SiteRef(plate="AS_09125", well="D03", site=0),
                        channel=name,
                        object=types_pb2.ObjectRef(key=stored.key, size=stored.size, sha256=stored.sha256),
                        file_name=path.name,
                    )
                )
            await catalog.RegisterImages(catalog_pb2.RegisterImagesRequest(images=regs))
            await wait_complete(catalog, "AS_09125", timeout=300, mesh=mesh)
            (job,) = await assert_nothing_lost(catalog, store, "AS_09125", 1)
            assert job.state == types_pb2.SITE_STATE_DONE, job.failure_reason
            assert job.provenance.object_counts["Nuclei"] == 289
            assert job.provenance.object_counts["PH3"] == 22
            assert job.provenance.cellprofiler_version.startswith("4.2.8")
            image_csv = next(r for r in job.results if r.name.endswith("Image.csv"))
            rows = list(csv.DictReader(io.StringIO((await store.get_bytes(image_csv.object.key)).decode())))
            assert float(rows[0]["Count_Cells"]) == 289
    finally:
        await stop_mesh(mesh)
