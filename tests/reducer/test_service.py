"""The Reducer and ReducerService: from the catalog's sites to a registered
report, with the project's S3 server and real gRPC servers on loopback."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2
from cellmesh.reducer.v1 import reducer_pb2, reducer_pb2_grpc

from services.common.s3 import ObjectStore
from services.common.server import GrpcServer, Registration
from services.common.settings import S3Settings
from services.reducer import testdata
from services.reducer.service import Reducer, ReducerServicer, table_files
from tests import pki as test_pki
from tests.reducer.fake_catalog import FakeCatalog

SHA = hashlib.sha256(b"nuclei pipeline").hexdigest()
FEATURES = ["AreaShape_Area", "Intensity_MeanIntensity_DNA"]
WELLS = ["A01", "A02", "A03", "B01", "B02", "B03"]


@dataclass
class Mesh:
    catalog: FakeCatalog
    store: ObjectStore
    reducer: Reducer
    rpc: reducer_pb2_grpc.ReducerServiceAsyncStub


def nuclei(well: str, site: int) -> np.ndarray:
    """Site s of well w has 2 + s objects with areas 100 w + 10 s + i."""
    w = WELLS.index(well)
    i = np.arange(2 + site, dtype=float)
    return np.column_stack([100 * w + 10 * site + i, 0.25 * i])


async def add_plate(catalog: FakeCatalog, store: ObjectStore, plate: str = "P1") -> None:
    catalog.plates[plate] = catalog_pb2.Plate(name=plate, channels=["DNA"], pipeline_sha256=[SHA])
    catalog.pipelines[SHA] = catalog_pb2.Pipeline(
        ref=types_pb2.PipelineRef(sha256=SHA), name="nuclei", tables=["Image", "Nuclei"]
    )
    jobs = []
    for well in WELLS:
        for site in (1, 2):
            ref = types_pb2.SiteRef(plate=plate, well=well, site=site)
            image_key = f"images/{plate}/{well}/s{site}/DNA/{well}_s{site}.tif"
            catalog.images.setdefault(plate, []).append(
                catalog_pb2.Image(site=ref, channel="DNA", object=types_pb2.ObjectRef(key=image_key))
            )
            if (well, site) == ("B02", 2):
                jobs.append(
                    catalog_pb2.SiteJob(
                        site=ref,
                        state=types_pb2.SITE_STATE_FAILED,
                        failure_class=types_pb2.FAILURE_CLASS_CP_PROBLEM,
                        failure_reason="CellProfiler exited 1: IdentifyPrimaryObjects",
                    )
                )
                continue
            if (well, site) == ("B03", 1):
                jobs.append(catalog_pb2.SiteJob(site=ref, state=types_pb2.SITE_STATE_QUEUED))
                continue
            k = 2 + site
            files = {
                "Image.csv": testdata.image_csv({"Nuclei": k}, metadata={"Metadata_Well": well}),
                "Nuclei.csv": testdata.object_csv(nuclei(well, site), FEATURES),
                "Experiment.csv": b"Key,Value\r\nCellProfiler_Version,4.2.8\r\n",
                "cp.done": b"Complete\n",
            }
            results = []
            for name, data in files.items():
                stored = await store.put_bytes(f"results/{plate}/{SHA[:12]}/{well}/s{site}/a1/{name}", data)
                results.append(
                    catalog_pb2.ResultFile(
                        name=name,
                        object=types_pb2.ObjectRef(key=stored.key, size=stored.size, sha256=stored.sha256),
                    )
                )
            jobs.append(
                catalog_pb2.SiteJob(
                    site=ref,
                    state=types_pb2.SITE_STATE_DONE,
                    results=results,
                    provenance=catalog_pb2.Provenance(cellprofiler_version="4.2.8.1", pipeline_sha256=SHA),
                )
            )
    catalog.jobs[plate] = jobs
    catalog.generation[plate] = 12


@pytest.fixture
async def mesh(s3_settings: S3Settings, tmp_path: Path) -> AsyncIterator[Mesh]:
    catalog = FakeCatalog()
    catalog_server = grpc.aio.server()
    catalog_pb2_grpc.add_CatalogServiceServicer_to_server(catalog, catalog_server)
    port = catalog_server.add_insecure_port("127.0.0.1:0")
    await catalog_server.start()
    async with (
        ObjectStore(s3_settings) as store,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        await store.ensure_bucket()
        reducer = Reducer(catalog_pb2_grpc.CatalogServiceStub(channel), store, work_dir=tmp_path / "work")
        server = GrpcServer(
            [
                Registration(
                    reducer_pb2_grpc.add_ReducerServiceServicer_to_server,
                    ReducerServicer(reducer),
                    reducer_pb2.DESCRIPTOR.services_by_name["ReducerService"].full_name,
                )
            ],
            host="127.0.0.1",
            port=0,
            grace_seconds=1,
            auth=test_pki.server_auth("reducer"),
        )
        reducer_port = await server.start()
        await server.set_serving(True)
        async with test_pki.channel(f"127.0.0.1:{reducer_port}") as reducer_channel:
            await add_plate(catalog, store)
            yield Mesh(catalog, store, reducer, reducer_pb2_grpc.ReducerServiceStub(reducer_channel))
        await server.stop()
    await catalog_server.stop(None)


def run(plate: str = "P1", generation: int = 12) -> catalog_pb2.RunClaim:
    return catalog_pb2.RunClaim(
        plate=plate, pipeline=types_pb2.PipelineRef(sha256=SHA), generation=generation
    )


async def keys(store: ObjectStore, prefix: str) -> list[str]:
    return [o.key async for o in store.list_keys(prefix)]


async def test_reduce_run_stores_and_registers_the_report(mesh: Mesh, tmp_path: Path) -> None:
    report = await mesh.reducer.reduce_run(run())
    assert report.version == 1 and report.generation == 12
    assert report.plate == "P1" and report.pipeline_sha256 == SHA
    assert report.wells == 6 and report.sites == 10
    missing = {(m.site.well, m.site.site): (m.state, m.reason) for m in report.missing_sites}
    assert missing == {
        ("B02", 2): (types_pb2.SITE_STATE_FAILED, "CellProfiler exited 1: IdentifyPrimaryObjects"),
        ("B03", 1): (types_pb2.SITE_STATE_QUEUED, "not done yet (queued)"),
    }
    # Twelve jobs in pages of five: the reducer followed every page token.
    tokens = [r.page_token for r in mesh.catalog.list_sites_requests]
    assert tokens == ["", "5", "10"] and all(r.with_results for r in mesh.catalog.list_sites_requests)

    kinds = {f.name: f.kind for f in report.files}
    assert kinds == {
        "Image.parquet": catalog_pb2.REPORT_FILE_KIND_OBJECT_TABLE_PARQUET,
        "Image.csv.gz": catalog_pb2.REPORT_FILE_KIND_OBJECT_TABLE_CSV,
        "wells_Image.csv": catalog_pb2.REPORT_FILE_KIND_WELL_TABLE,
        "Nuclei.parquet": catalog_pb2.REPORT_FILE_KIND_OBJECT_TABLE_PARQUET,
        "Nuclei.csv.gz": catalog_pb2.REPORT_FILE_KIND_OBJECT_TABLE_CSV,
        "wells_Nuclei.csv": catalog_pb2.REPORT_FILE_KIND_WELL_TABLE,
        "cells_per_well.csv": catalog_pb2.REPORT_FILE_KIND_WELL_TABLE,
        "summary.json": catalog_pb2.REPORT_FILE_KIND_SUMMARY_JSON,
        "heatmap_cells_per_well.png": catalog_pb2.REPORT_FILE_KIND_HEATMAP_PNG,
        "cpa.sqlite": catalog_pb2.REPORT_FILE_KIND_CPA_DATABASE,
        "cpa.properties": catalog_pb2.REPORT_FILE_KIND_CPA_PROPERTIES,
        "qc.html": catalog_pb2.REPORT_FILE_KIND_QC_PAGE,  # without a plate map it says so
    }
    prefix = f"reports/P1/{SHA[:12]}/g12/"
    blobs = {}
    for f in report.files:
        assert f.object.key.startswith(prefix) and f.object.key.endswith("/" + f.name)
        data = await mesh.store.get_bytes(f.object.key)
        assert hashlib.sha256(data).hexdigest() == f.object.sha256 and len(data) == f.object.size
        blobs[f.name] = data
    assert sorted(await keys(mesh.store, prefix)) == sorted(f.object.key for f in report.files)

    wells = pd.read_csv(io.BytesIO(blobs["wells_Nuclei.csv"])).set_index("Metadata_Well")
    for well in WELLS:
        done = [s for s in (1, 2) if (well, s) not in {("B02", 2), ("B03", 1)}]
        rows = np.vstack([nuclei(well, s) for s in done])
        assert wells.loc[well, "Metadata_Object_Count"] == len(rows)
        assert wells.loc[well, "Nuclei_AreaShape_Area"] == np.median(rows[:, 0])
    cells = pd.read_csv(io.BytesIO(blobs["cells_per_well.csv"])).set_index("Metadata_Well")
    assert cells["Count_Nuclei"].to_dict() == {"A01": 7, "A02": 7, "A03": 7, "B01": 7, "B02": 3, "B03": 4}
    assert cells.loc["B02", "Metadata_Sites_Missing"] == 1
    plate = pd.read_parquet(io.BytesIO(blobs["Nuclei.parquet"]))
    assert plate["Metadata_SiteKey"].nunique() == 10 and len(plate) == int(
        wells["Metadata_Object_Count"].sum()
    )
    assert blobs["heatmap_cells_per_well.png"][:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "heatmap_cells_per_well.png").write_bytes(blobs["heatmap_cells_per_well.png"])


async def test_redelivered_or_stale_task_returns_the_registered_report(mesh: Mesh) -> None:
    first = await mesh.reducer.reduce_run(run(generation=12))
    objects = await keys(mesh.store, "reports/")
    again = await mesh.reducer.reduce_run(run(generation=12))
    stale = await mesh.reducer.reduce_run(run(generation=9))
    assert again == first and stale == first
    assert mesh.catalog.register_calls == 1
    assert await keys(mesh.store, "reports/") == objects


async def test_same_results_give_the_same_keys_and_bytes(mesh: Mesh) -> None:
    """A generation reduced twice (e.g. by two reducers at once) writes the
    same objects: no report ever points at bytes that changed under it."""
    first = await mesh.reducer.reduce_run(run(generation=12))
    mesh.catalog.reports.clear()  # as if the first reducer had not registered yet
    second = await mesh.reducer.reduce_run(run(generation=12))
    assert [(f.name, f.object.key, f.object.sha256) for f in second.files] == [
        (f.name, f.object.key, f.object.sha256) for f in first.files
    ]


async def test_reduce_plate_on_demand_with_a_feature_heatmap(mesh: Mesh) -> None:
    reply = await mesh.rpc.ReducePlate(
        reducer_pb2.ReducePlateRequest(plate="P1", heatmap_features=["AreaShape_Area"])
    )
    report = reply.report
    assert report.version == 1 and report.generation == 1  # the latest report's generation + 1
    names = {f.name for f in report.files}
    assert {"heatmap_cells_per_well.png", "heatmap_Nuclei_AreaShape_Area.png"} <= names
    folders = {f.object.key.rsplit("/", 2)[-2] for f in report.files}
    assert len(folders) == 1 and folders.pop().startswith("ondemand-")
    # The scheduler's reduce of the settled run makes the next version.
    scheduled = await mesh.reducer.reduce_run(run(generation=12))
    assert scheduled.version == 2 and scheduled.generation == 12


async def test_on_demand_with_nothing_new_returns_the_latest_report(mesh: Mesh) -> None:
    latest = await mesh.reducer.reduce_run(run(generation=12))
    reply = await mesh.rpc.ReducePlate(reducer_pb2.ReducePlateRequest(plate="P1", pipeline_sha256=SHA))
    assert reply.report == latest
    # What the refused reduce had uploaded is gone again.
    assert sorted(await keys(mesh.store, "reports/")) == sorted(f.object.key for f in latest.files)


async def test_reduce_plate_errors(mesh: Mesh) -> None:
    async def code(request: reducer_pb2.ReducePlateRequest) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.rpc.ReducePlate(request)
        return caught.value.code()

    assert await code(reducer_pb2.ReducePlateRequest()) == grpc.StatusCode.INVALID_ARGUMENT
    assert await code(reducer_pb2.ReducePlateRequest(plate="nope")) == grpc.StatusCode.NOT_FOUND
    unknown = reducer_pb2.ReducePlateRequest(plate="P1", heatmap_features=["Intensity_NoSuchThing"])
    assert await code(unknown) == grpc.StatusCode.INVALID_ARGUMENT
    mesh.catalog.plates["EMPTY"] = catalog_pb2.Plate(name="EMPTY", pipeline_sha256=[SHA])
    mesh.catalog.jobs["EMPTY"] = [
        catalog_pb2.SiteJob(
            site=types_pb2.SiteRef(plate="EMPTY", well="A01", site=1), state=types_pb2.SITE_STATE_RUNNING
        )
    ]
    assert await code(reducer_pb2.ReducePlateRequest(plate="EMPTY")) == grpc.StatusCode.FAILED_PRECONDITION
    assert mesh.catalog.register_calls == 0


def test_result_files_map_to_the_pipeline_tables() -> None:
    def result(name: str) -> catalog_pb2.ResultFile:
        return catalog_pb2.ResultFile(name=name, object=types_pb2.ObjectRef(key=f"k/{name}", sha256="0" * 64))

    results = [result(n) for n in ("MyExpt_Image.csv", "MyExpt_Nuclei.csv", "MyExpt_Experiment.csv", "x.png")]
    mapped = table_files(results, ["Image", "Nuclei", "Cells"])
    assert {t: r.key for t, r in mapped.items()} == {
        "Image": "k/MyExpt_Image.csv",
        "Nuclei": "k/MyExpt_Nuclei.csv",
    }
    plain = [result(n) for n in ("Image.csv", "FilteredNuclei.csv", "Nuclei.csv", "Experiment.csv")]
    assert {t: r.key for t, r in table_files(plain, ["Image", "Nuclei"]).items()} == {
        "Image": "k/Image.csv",
        "Nuclei": "k/Nuclei.csv",
    }
    # Without the pipeline's table list: every CSV but the Experiment file.
    assert set(table_files(plain, [])) == {"Image", "FilteredNuclei", "Nuclei"}


async def test_an_object_store_outage_longer_than_the_budget_fails_the_reduce(
    mesh: Mesh, tmp_path: Path
) -> None:
    """Object-store outages are retried inside the reduce, with backoff, for
    TRANSIENT_BUDGET_S; then the reduce fails with a message saying so."""
    import time
    from dataclasses import replace

    from services.common.retry import GaveUp
    from tests.conftest import free_port

    closed = replace(mesh.store.settings, endpoint_url=f"http://127.0.0.1:{free_port()}")
    async with ObjectStore(closed, connect_timeout=0.5) as unreachable:
        reducer = Reducer(mesh.reducer._catalog, unreachable, tmp_path / "w2", transient_budget=2.0)
        run = catalog_pb2.RunClaim(plate="P1", pipeline=types_pb2.PipelineRef(sha256=SHA), generation=12)
        started = time.monotonic()
        with pytest.raises(GaveUp, match="did not answer for 2 s \\(TRANSIENT_BUDGET_S\\)") as info:
            await reducer.reduce_run(run)
        took = time.monotonic() - started
    assert 1.9 <= took < 15, took
    assert "results/P1/" in str(info.value)  # names what it was fetching
    assert not mesh.catalog.reports.get("P1"), "nothing registered"


async def test_the_plate_map_and_qc_gate_reach_the_registered_report(mesh: Mesh) -> None:
    plate = mesh.catalog.plates["P1"]
    columns = ["Metadata_role", "Metadata_dose"]
    roles = {WELLS[0]: ("negcon", "0"), WELLS[1]: ("negcon", "0"), WELLS[-1]: ("poscon", "3")}
    plate.plate_map.CopyFrom(
        catalog_pb2.PlateMap(
            sha256="ab" * 32,
            source_name="map.csv",
            columns=columns,
            located_by="well column Well",
            wells=[
                catalog_pb2.PlateMapWell(
                    well=w, values=dict(zip(columns, roles.get(w, ("trt", str(1 + i % 2))), strict=True))
                )
                for i, w in enumerate(WELLS)
            ],
        )
    )
    plate.qc_gate.CopyFrom(
        catalog_pb2.QcGate(feature="Nuclei_AreaShape_Area", min_z_prime=0.7, max_failed_share=0.5)
    )
    report = await mesh.reducer.reduce_run(run())
    # Areas 100 w + 10 s + i (see nuclei()): a well's value is the mean of its
    # sites' means; B03 has only site 2 (site 1 is queued).
    neg = [100 * w + (10 + 1.0 + 20 + 1.5) / 2 for w in (0, 1)]
    pos = 100 * 5 + 20 + 1.5
    z = 1 - 3 * (np.std(neg) + 0) / abs(pos - np.mean(neg))
    assert abs(report.qc.z_prime - z) < 1e-12 and 0.67 < z < 0.7
    assert report.qc.gated and not report.qc.passed
    assert list(report.qc.failures) == [f"Z' of Nuclei_AreaShape_Area is {z:.3g}, below 0.7"]
    # 2 of 12 sites missing: within the gate's half.
    assert abs(report.qc.failed_share - 2 / 12) < 1e-12
    kinds = {f.name: f.kind for f in report.files}
    assert kinds["qc.csv"] == catalog_pb2.REPORT_FILE_KIND_QC_TABLE
    assert kinds["qc.html"] == catalog_pb2.REPORT_FILE_KIND_QC_PAGE
    assert kinds["qc_dose_response_Nuclei_AreaShape_Area.png"] == catalog_pb2.REPORT_FILE_KIND_QC_PLOT_PNG
    wells = {f.name: f for f in report.files}["wells_Nuclei.csv"]
    text = (await mesh.store.get_bytes(wells.object.key)).decode()
    assert text.splitlines()[0].startswith("Metadata_Plate,Metadata_Well,Metadata_role,Metadata_dose,")
