"""A workflow of two stages through the mesh, checked against the CellProfiler
command line running the same two pipelines: an illumination function
calculated once from every image of the plate (a plate-scope stage), then
the per-site analysis that divides DNA by it."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from services.common.s3 import ObjectStore
from services.mesh import microscope
from services.mesh.demo import start_mesh, stop_mesh
from tests.e2e.meshkit import REPO, assert_nothing_lost, catalog_stub, cp_python, options, wait_complete

pytestmark = pytest.mark.e2e

ILLUM = REPO / "examples" / "pipelines" / "illum_dna.cppipe"
ANALYSIS = REPO / "examples" / "pipelines" / "nuclei_illum.cppipe"
#: Columns that differ between any two runs of CellProfiler.
VOLATILE = ("ExecutionTime_", "PathName_", "URL_", "FileName_", "ModuleError_", "Metadata_")


def cellprofiler(pipeline: Path, images: Path, out: Path) -> None:
    """`cellprofiler -c -r` over a folder, as a lab runs it without the mesh."""
    done = subprocess.run(
        [
            cp_python(),
            "-m",
            "cellprofiler",
            "-c",
            "-r",
            "-p",
            str(pipeline),
            "-i",
            str(images),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_table(ours: bytes, theirs: Path) -> int:
    """Every shared numeric column equal (relative tolerance 1e-9); returns
    how many values were compared."""
    a = pd.read_csv(io.BytesIO(ours))
    b = pd.read_csv(theirs)
    assert len(a) == len(b), theirs.name
    columns = [
        c
        for c in a.columns
        if c in b.columns and not c.startswith(VOLATILE) and pd.api.types.is_numeric_dtype(a[c])
    ]
    assert columns, theirs.name
    np.testing.assert_allclose(
        a[columns].to_numpy(float),
        b[columns].to_numpy(float),
        rtol=1e-9,
        atol=0,
        equal_nan=True,
        err_msg=theirs.name,
    )
    return a[columns].size


async def test_illumination_stage_then_analysis_equal_the_command_line(tmp_path: Path) -> None:
    plate = "IL1"
    sites = await asyncio.to_thread(
        microscope.generate_plate, tmp_path / "microscope", plate, ["A01", "A02"], 2, 256, 3
    )
    mesh = await start_mesh(options(tmp_path / "mesh", workers=2))
    try:
        async with mesh.channel() as channel, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(channel)
            illum = (
                await catalog.RegisterPipeline(
                    catalog_pb2.RegisterPipelineRequest(name="illum", content=ILLUM.read_bytes())
                )
            ).pipeline
            assert illum.scope == types_pb2.PIPELINE_SCOPE_PLATE
            analysis = (
                await catalog.RegisterPipeline(
                    catalog_pb2.RegisterPipelineRequest(
                        name="analysis", content=ANALYSIS.read_bytes(), stage_inputs=["IllumDNA.npy"]
                    )
                )
            ).pipeline
            await catalog.CreatePlate(
                catalog_pb2.CreatePlateRequest(
                    name=plate,
                    channels=["DNA", "GFP"],
                    layout=catalog_pb2.PlateLayout(
                        wells=["A01", "A02"], rows=8, columns=12, sites_per_well=2
                    ),
                    pipeline_sha256=illum.ref.sha256,
                    reduce_with_failures=True,
                )
            )
            await catalog.AddPlatePipeline(
                catalog_pb2.AddPlatePipelineRequest(plate=plate, pipeline_sha256=analysis.ref.sha256)
            )
            await microscope.acquire(store, catalog, plate, sites, 100)
            await wait_complete(catalog, plate, 400, mesh)
            jobs = await assert_nothing_lost(catalog, store, plate, 4)
            assert all(j.state == types_pb2.SITE_STATE_DONE for j in jobs), [j.failure_reason for j in jobs]
            stage = (
                await catalog.ListSites(
                    catalog_pb2.ListSitesRequest(
                        plate=plate, pipeline_sha256=illum.ref.sha256, with_results=True
                    )
                )
            ).sites
            assert len(stage) == 1 and stage[0].state == types_pb2.SITE_STATE_DONE, stage
            artifacts = {r.name: r for r in stage[0].results}
            assert "IllumDNA.npy" in artifacts
            # The analysis ran after the stage, with its file.
            assert all(j.started_at.ToDatetime() >= stage[0].finished_at.ToDatetime() for j in jobs)
            ours_illum = np.load(io.BytesIO(await store.get_bytes(artifacts["IllumDNA.npy"].object.key)))

            # The command line: the stage over the whole folder, the analysis per site.
            everything = tmp_path / "cli" / "all"
            everything.mkdir(parents=True)
            for s in sites:
                for path in s.files.values():
                    shutil.copy(path, everything / path.name)
            await asyncio.to_thread(cellprofiler, ILLUM, everything, tmp_path / "cli" / "illum")
            theirs_illum = np.load(tmp_path / "cli" / "illum" / "IllumDNA.npy")
            np.testing.assert_allclose(ours_illum, theirs_illum, rtol=1e-9, atol=0)
            compared = 0
            by_site = {(j.site.well, j.site.site): j for j in jobs}
            for s in sites:
                folder = tmp_path / "cli" / f"{s.well}_{s.site}"
                folder.mkdir()
                for path in s.files.values():
                    shutil.copy(path, folder / path.name)
                shutil.copy(tmp_path / "cli" / "illum" / "IllumDNA.npy", folder / "IllumDNA.npy")
                out = tmp_path / "cli" / f"out_{s.well}_{s.site}"
                await asyncio.to_thread(cellprofiler, ANALYSIS, folder, out)
                results = {r.name: r for r in by_site[(s.well, s.site)].results}
                for table in ("Image.csv", "Nuclei.csv"):
                    compared += assert_same_table(
                        await store.get_bytes(results[table].object.key), out / table
                    )
                cli_count = pd.read_csv(out / "Image.csv")["Count_Nuclei"].iloc[0]
                assert by_site[(s.well, s.site)].provenance.object_counts["Nuclei"] == cli_count
            assert compared > 100
            report = (await catalog.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate=plate))).report
            assert report.pipeline_sha256 == analysis.ref.sha256 and report.version == 1
    finally:
        await stop_mesh(mesh)
