"""The BBBC013 workflow as the CellProfiler team wrote it, through the mesh:
the illumination pipeline runs once for the plate (CorrectIlluminationCalculate
over all images) and registers its illumination functions; the analysis
pipeline then runs per site with them and with the plate map it imports
(an attached 1049_Metadata.csv). Every per-site table equals what the
CellProfiler command line gives running the same two pipelines over the
folder (every shared numeric column, relative tolerance 1e-9).

The plate is created with its plate map (1049_Metadata.csv) and a QC gate:
the report's per-well and per-object tables carry the map's dose and control
columns; its Z'-factor and V-factor of every measurement equal what
CellProfiler's CalculateStatistics functions (in CellProfiler's environment)
give for the command line's own per-image values (its Image table's features
and per-image object means), to 1e-6; the gate (Z' of the GFP translocation
ratio at least 0.9) fails and says so; the QC page shows the ratio's
dose-response.

The pipelines are examples/pipelines/bbbc013/{illum,analysis}.cppipe, made by
CellProfiler 4.2 from the originals (make_bbbc013_workflow.py says what and
why). The command line's run takes about 9 minutes on 2 cores; its tables
are cached under ~/.cache/cellmesh keyed by CellProfiler, the pipelines and
the images (CELLMESH_CACHE to move it)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.client import CellmeshClient
from cellmesh.common.v1 import types_pb2

from services.common.s3 import ObjectStore
from services.mesh import microscope
from services.mesh.demo import BBBC013_NAME, start_mesh, stop_mesh
from tests.e2e.meshkit import REPO, assert_nothing_lost, catalog_stub, cp_python, options, wait_complete
from tests.e2e.test_bbbc013 import cellprofiler_z_and_v

pytestmark = pytest.mark.e2e

WORKFLOW = REPO / "examples" / "pipelines" / "bbbc013"
ILLUM = WORKFLOW / "illum.cppipe"
ANALYSIS = WORKFLOW / "analysis.cppipe"
TABLES = ("Image.csv", "Nuclei.csv", "PropCells.csv", "DistanceCells.csv", "DistCytoplasm.csv")
CHANNELS = {"1": "rawGFP", "2": "rawDNA"}  # the analysis pipeline's image names
# Columns that are not the site's measurements: timings, where the files
# were, and the run's structure (the command line runs 48 image sets in one
# group, the mesh one per site: Group_Index and Group_Length differ by design).
VOLATILE = ("ExecutionTime_", "PathName_", "URL_", "FileName_", "ModuleError_", "Group_Index", "Group_Length")


def command_line_reference(images: Path) -> Path:
    """`cellprofiler -c -r` of both pipelines over the folder, as the lab runs
    it without the mesh; cached by what it is made from."""
    key = hashlib.sha256()
    key.update(
        subprocess.run(
            [cp_python(), "-c", "import cellprofiler; print(cellprofiler.__version__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.encode()
    )
    for path in [ILLUM, ANALYSIS, *sorted(images.iterdir())]:
        key.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    cache = Path(os.environ.get("CELLMESH_CACHE", Path.home() / ".cache" / "cellmesh"))
    done = cache / "bbbc013-workflow-reference" / key.hexdigest()[:16]
    if (done / "analysis" / "Image.csv").exists():
        return done
    scratch = done.with_name(done.name + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    folder = scratch / "in"
    folder.mkdir(parents=True)
    for path in images.iterdir():
        if path.suffix != ".mat":  # the analysis loads .npy functions, the ones the stage makes
            shutil.copy(path, folder / path.name)
    run(ILLUM, images, scratch / "illum")
    for made in (scratch / "illum").glob("*.npy"):
        shutil.copy(made, folder / made.name)
    run(ANALYSIS, folder, scratch / "analysis")
    shutil.rmtree(done, ignore_errors=True)
    scratch.rename(done)
    return done


def run(pipeline: Path, images: Path, out: Path) -> None:
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
        timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def bbbc013_sites(images: Path) -> list[microscope.SiteImages]:
    wells: dict[str, dict[str, Path]] = {}
    for path in sorted(images.iterdir()):
        m = BBBC013_NAME.match(path.name)
        if m:
            wells.setdefault(f"{m['WellRow']}{m['WellColumn']}", {})[CHANNELS[m["Channel"]]] = path
    return [microscope.SiteImages(well, 0, -1, files) for well, files in sorted(wells.items())]


async def test_bbbc013_illumination_then_analysis_equal_the_command_line(
    tmp_path: Path, shared_data: Path
) -> None:
    images = shared_data / "bbbc013_translocation_plate" / "images"
    reference = await asyncio.to_thread(command_line_reference, images)
    sites = bbbc013_sites(images)
    assert len(sites) == 48
    mesh = await start_mesh(options(tmp_path, workers=2))
    try:
        async with (
            mesh.channel() as channel,
            ObjectStore(mesh.s3) as store,
            CellmeshClient(mesh.catalog_addr, credentials=mesh.credentials("scientist")) as client,
        ):
            catalog = catalog_stub(channel)
            illum = (await client.register_pipeline(ILLUM, "ExampleSBSIllumination")).pipeline
            assert illum.scope == types_pb2.PIPELINE_SCOPE_PLATE
            analysis = (
                await client.register_pipeline(
                    ANALYSIS,
                    "ExampleSBS",
                    attachments=[images / "1049_Metadata.csv"],
                    stage_inputs=["Channel1ILLUM.npy", "Channel2ILLUM.npy"],
                    store=store,
                )
            ).pipeline
            assert analysis.scope == types_pb2.PIPELINE_SCOPE_SITE
            await catalog.CreatePlate(
                catalog_pb2.CreatePlateRequest(
                    name="BBBC013",
                    channels=list(CHANNELS.values()),
                    layout=catalog_pb2.PlateLayout(
                        wells=[s.well for s in sites], rows=8, columns=12, sites_per_well=1
                    ),
                    pipeline_sha256=illum.ref.sha256,
                    reduce_with_failures=True,
                    plate_map=catalog_pb2.PlateMapUpload(
                        content=(images / "1049_Metadata.csv").read_bytes(), source_name="1049_Metadata.csv"
                    ),
                    qc_gate=catalog_pb2.QcGate(
                        feature="Nuclei_Math_Ratio1", min_z_prime=0.9, max_failed_share=0.05
                    ),
                )
            )
            await catalog.AddPlatePipeline(
                catalog_pb2.AddPlatePipelineRequest(plate="BBBC013", pipeline_sha256=analysis.ref.sha256)
            )
            await microscope.acquire(store, catalog, "BBBC013", sites, 200)
            await wait_complete(catalog, "BBBC013", 1800, mesh)
            jobs = await assert_nothing_lost(catalog, store, "BBBC013", 48)
            failed = [
                f"{j.site.well}: {j.failure_reason}" for j in jobs if j.state != types_pb2.SITE_STATE_DONE
            ]
            assert not failed, failed[:3]

            # The stage ran once and registered the plate's illumination functions.
            (stage,) = (
                await catalog.ListSites(
                    catalog_pb2.ListSitesRequest(
                        plate="BBBC013", pipeline_sha256=illum.ref.sha256, with_results=True
                    )
                )
            ).sites
            artifacts = {r.name: r for r in stage.results}
            assert {"Channel1ILLUM.npy", "Channel2ILLUM.npy"} <= set(artifacts)
            for name in ("Channel1ILLUM.npy", "Channel2ILLUM.npy"):
                ours = np.load(io.BytesIO(await store.get_bytes(artifacts[name].object.key)))
                np.testing.assert_allclose(ours, np.load(reference / "illum" / name), rtol=1e-9, atol=0)

            # Every per-site table equals the command line's row for that well.
            compared = 0
            theirs = {t: pd.read_csv(reference / "analysis" / t) for t in TABLES}
            image_numbers = dict(
                zip(
                    theirs["Image.csv"]["Metadata_WellRow"]
                    + theirs["Image.csv"]["Metadata_WellColumn"].map(lambda c: f"{int(c):02d}"),
                    theirs["Image.csv"]["ImageNumber"],
                    strict=True,
                )
            )
            for job in jobs:
                number = image_numbers[job.site.well]
                results = {r.name: r for r in job.results}
                for table in TABLES:
                    ours = pd.read_csv(io.BytesIO(await store.get_bytes(results[table].object.key)))
                    want = theirs[table][theirs[table]["ImageNumber"] == number].reset_index(drop=True)
                    assert len(ours) == len(want), (job.site.well, table)
                    columns = [
                        c
                        for c in ours.columns
                        if c in want.columns
                        and c != "ImageNumber"
                        and not c.startswith(VOLATILE)
                        and pd.api.types.is_numeric_dtype(ours[c])
                        and pd.api.types.is_numeric_dtype(want[c])
                    ]
                    np.testing.assert_allclose(
                        ours[columns].to_numpy(float),
                        want[columns].to_numpy(float),
                        rtol=1e-9,
                        atol=0,
                        equal_nan=True,
                        err_msg=f"{job.site.well} {table}",
                    )
                    compared += ours[columns].size
                # The plate map came in through the attached CSV.
                image = pd.read_csv(io.BytesIO(await store.get_bytes(results["Image.csv"].object.key)))
                assert "Metadata_SBS_Doses" in image.columns
            assert compared > 100_000, compared

            # The analysis' report: the plate map in its tables, and its QC.
            report = (
                await catalog.GetPlateReport(
                    catalog_pb2.GetPlateReportRequest(plate="BBBC013", pipeline_sha256=analysis.ref.sha256)
                )
            ).report
            files = {f.name: f for f in report.files}

            async def report_file(name: str) -> bytes:
                return await store.get_bytes(files[name].object.key)

            sbs = pd.read_csv(images / "1049_Metadata.csv")
            sbs.index = sbs["Row"] + sbs["Column"].map(lambda c: f"{int(c):02d}")
            for table in (
                "wells_Image.csv",
                "wells_Nuclei.csv",
                "wells_DistCytoplasm.csv",
                "cells_per_well.csv",
            ):
                wells = pd.read_csv(io.BytesIO(await report_file(table))).set_index("Metadata_Well")
                assert len(wells) == 48, table
                assert (wells["Metadata_SBS_Doses"] == sbs.loc[wells.index, "SBS_Doses"]).all(), table
                assert (wells["Metadata_SBS_Controls"] == sbs.loc[wells.index, "SBS_Controls"]).all(), table
            cells = pd.read_parquet(io.BytesIO(await report_file("PropCells.parquet")))
            assert (
                cells["Metadata_SBS_Controls"].to_numpy()
                == sbs.loc[cells["Metadata_Well"], "SBS_Controls"].to_numpy()
            ).all()

            # Z' and V of the command line's own per-image values, by CellProfiler's functions.
            image = theirs["Image.csv"]
            image.index = image["Metadata_WellRow"] + image["Metadata_WellColumn"].map(
                lambda c: f"{int(c):02d}"
            )
            ours = pd.read_csv(io.BytesIO(await report_file("qc.csv"))).set_index("feature")
            source = {}
            for feature in ours.index:
                obj, _, name = feature.partition("_")
                column = name if obj == "Image" else f"Mean_{obj}_{name}"
                if column in image.columns and not any(v in feature for v in VOLATILE):
                    source[feature] = column
            assert len(source) > 1000 and "Nuclei_Math_Ratio1" in source, len(source)
            wells = sorted(image.index)
            z, v = cellprofiler_z_and_v(
                tmp_path,
                sbs.loc[wells, "SBS_Controls"].to_numpy(float),
                sbs.loc[wells, "SBS_Doses"].to_numpy(float),
                image.loc[wells, list(source.values())].to_numpy(float),
            )
            np.testing.assert_allclose(
                ours.loc[list(source), "z_prime"].to_numpy(float), z, rtol=0, atol=1e-6
            )
            np.testing.assert_allclose(
                ours.loc[list(source), "v_factor"].to_numpy(float), v, rtol=0, atol=1e-6
            )
            ratio = ours.loc["Nuclei_Math_Ratio1", "z_prime"]
            assert 0.4 < ratio < 0.9, ratio
            assert report.qc.gated and not report.qc.passed
            assert list(report.qc.failures) == [f"Z' of Nuclei_Math_Ratio1 is {ratio:.3g}, below 0.9"]
            summary = json.loads(await report_file("summary.json"))
            assert (
                summary["qc"]["dose_column"] == "Metadata_SBS_Doses"
                and summary["qc"]["gate"]["passed"] is False
            )
            page = (await report_file("qc.html")).decode()
            assert "<img src='qc_dose_response_Nuclei_Math_Ratio1.png'" in page and "FAILED" in page
            png = await report_file("qc_dose_response_Nuclei_Math_Ratio1.png")
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        await stop_mesh(mesh)
