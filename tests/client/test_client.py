"""The typed client against the fake catalog on a real gRPC server: statuses
surface unchanged, registrations are split, the progress stream, downloads
that verify checksums."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cellmesh import CellmeshClient, CellmeshError, ObjectStore, ObjectStoreConfig, PlateLayout
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.client import download_report
from cellmesh.common.v1 import types_pb2

from tests.client.fake_catalog import ServerThread


async def test_errors_carry_the_status_and_message_unchanged(mesh: ServerThread) -> None:
    async with CellmeshClient(mesh.address) as client:
        with pytest.raises(CellmeshError) as caught:
            await client.get_plate("nope")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert caught.value.message == "plate nope does not exist"
    assert str(caught.value) == "NOT_FOUND: plate nope does not exist"


async def test_unreachable_catalog_is_unavailable() -> None:
    async with CellmeshClient("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(CellmeshError) as caught:
            await client.list_plates()
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


async def test_pipeline_and_plate(mesh: ServerThread, tmp_path: Path) -> None:
    path = tmp_path / "nuclei-v2.cppipe"
    path.write_bytes(b"CellProfiler Pipeline: http://www.cellprofiler.org\nVersion:5\n")
    async with CellmeshClient(mesh.address) as client:
        first = await client.register_pipeline(path)
        again = await client.register_pipeline(path.read_bytes(), "other name")
        assert first.pipeline.name == "nuclei-v2" and not first.already_registered
        assert again.already_registered and again.pipeline.ref.sha256 == first.pipeline.ref.sha256
        plate = await client.create_plate(
            "P1", ["DNA"], first.pipeline.ref.sha256, PlateLayout(rows=8, columns=12, sites_per_well=2)
        )
        assert plate.reduce_with_failures and plate.layout.sites_per_well == 2
        assert [p.name for p in await client.list_plates()] == ["P1"]
        with pytest.raises(CellmeshError) as caught:
            await client.register_pipeline(b"CalculateStatistics", "stats")
        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT


async def test_register_images_is_split_into_calls_of_at_most_10000(mesh: ServerThread) -> None:
    mesh.catalog.add_plate("big", ["DNA"])
    images = [
        catalog_pb2.ImageRegistration(
            site=types_pb2.SiteRef(plate="big", well=f"A{n % 48 + 1:02d}", site=n // 48),
            channel="DNA",
            object=types_pb2.ObjectRef(key=f"images/big/{n}.tif", size=1, sha256=f"{n:064x}"),
            file_name=f"{n}.tif",
        )
        for n in range(10_001)
    ]
    async with CellmeshClient(mesh.address) as client:
        reply = await client.register_images(images)
        assert [len(c) for c in mesh.catalog.register_calls] == [10_000, 1]
        assert len(reply.outcomes) == 10_001 and reply.sites_ready == 10_001
        assert set(reply.outcomes) == {catalog_pb2.REGISTRATION_OUTCOME_CREATED}
        mesh.catalog.list_images_page = 3000
        listed = await client.list_images("big")  # four pages
        assert len(listed) == 10_001
        with pytest.raises(ValueError):
            await client.register_images(images, batch_size=10_001)


async def test_sites_requeue_progress_and_reduce(mesh: ServerThread) -> None:
    mesh.catalog.add_plate("P1", ["DNA"])
    mesh.catalog.sites["P1"] = [
        catalog_pb2.SiteJob(site=types_pb2.SiteRef(plate="P1", well="A01"), state=types_pb2.SITE_STATE_DONE),
        catalog_pb2.SiteJob(
            site=types_pb2.SiteRef(plate="P1", well="A02"),
            state=types_pb2.SITE_STATE_FAILED,
            failure_class=types_pb2.FAILURE_CLASS_INPUT_PROBLEM,
            failure_reason="DNA: not a TIFF",
        ),
    ]
    mesh.catalog.progress_stream = [
        catalog_pb2.PlateProgress(plate="P1", total=2, waiting=2),
        catalog_pb2.PlateProgress(plate="P1", total=2, done=1, failed=1, report_version=1, complete=True),
    ]
    async with CellmeshClient(mesh.address, reducer=mesh.address) as client:
        failed = await client.failed_sites("P1")
        assert [(s.site.well, s.failure_reason) for s in failed] == [("A02", "DNA: not a TIFF")]
        assert len(await client.list_sites("P1")) == 2
        assert await client.requeue("P1") == 1
        assert await client.requeue("P1", [("A01", 0)]) == 1
        assert list(mesh.catalog.requeue_calls[1].sites) == [
            types_pb2.SiteRef(plate="P1", well="A01", site=0)
        ]
        seen = [p async for p in client.watch("P1")]
        assert [p.done for p in seen] == [0, 1] and seen[-1].complete
        assert (await client.progress("P1")).report_version == 1
        report = await client.reduce_now("P1", heatmap_features=["Intensity_MeanIntensity_GFP"])
        assert report.version == 1
        assert list(mesh.reducer.calls[0].heatmap_features) == ["Intensity_MeanIntensity_GFP"]
        assert (await client.report("P1")).version == 1

    async with CellmeshClient(mesh.address) as client:
        with pytest.raises(CellmeshError) as caught:
            await client.reduce_now("P1")
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION


async def test_report_download_verifies_checksums(store_config: ObjectStoreConfig, tmp_path: Path) -> None:
    async with ObjectStore(store_config) as store:
        png = await store.upload_bytes("reports/P1/g1/heatmap.png", b"\x89PNG fake", "image/png")
        csv = await store.upload_bytes("reports/P1/g1/wells.csv", b"well,count\nA01,3\n", "text/csv")
        report = catalog_pb2.PlateReport(
            plate="P1",
            version=1,
            files=[
                catalog_pb2.ReportFile(
                    name="heatmap.png", kind=catalog_pb2.REPORT_FILE_KIND_HEATMAP_PNG, object=png
                ),
                catalog_pb2.ReportFile(
                    name="wells.csv", kind=catalog_pb2.REPORT_FILE_KIND_WELL_TABLE, object=csv
                ),
            ],
        )
        files = await download_report(store, report, tmp_path / "out")
        assert [p.name for _, p in files] == ["heatmap.png", "wells.csv"]
        assert (tmp_path / "out" / "wells.csv").read_bytes() == b"well,count\nA01,3\n"

        bad = catalog_pb2.ReportFile(
            name="wells.csv", object=types_pb2.ObjectRef(key=csv.key, sha256="0" * 64)
        )
        with pytest.raises(CellmeshError) as caught:
            await store.download(bad.object, tmp_path / "bad" / "wells.csv")
        assert caught.value.code is grpc.StatusCode.DATA_LOSS
        assert not (tmp_path / "bad" / "wells.csv").exists()
        assert list((tmp_path / "bad").iterdir()) == []  # no partial file either

        missing = types_pb2.ObjectRef(key="reports/none.png")
        with pytest.raises(CellmeshError) as caught:
            await store.download(missing, tmp_path / "none.png")
        assert caught.value.code is grpc.StatusCode.NOT_FOUND
        assert await store.head("reports/none.png") is None
        head = await store.head(png.key)
        assert head is not None and head.sha256 == png.sha256 and head.size == png.size


def test_object_store_config_from_env() -> None:
    config = ObjectStoreConfig.from_env({"S3_ENDPOINT_URL": "http://s3:9000", "AWS_ACCESS_KEY_ID": "k"})
    assert config == ObjectStoreConfig("cellmesh", "http://s3:9000", "us-east-1", "k", None)
