"""The BBBC013 workflow as the CellProfiler team wrote it, through the mesh:
the illumination pipeline runs once for the plate (CorrectIlluminationCalculate
over all images) and registers its illumination functions; the analysis
pipeline then runs per site with them and with the plate map it imports
(an attached 1049_Metadata.csv). Every per-site table equals what the
CellProfiler command line gives running the same two pipelines over the
folder (every shared numeric column, relative tolerance 1e-9).

The pipelines are examples/pipelines/bbbc013/{illum,analysis}.cppipe, made by
CellProfiler 4.2 from the originals (make_bbbc013_workflow.py says what and
why). The command line's run takes about 9 minutes on 2 cores; its tables
are cached under ~/.cache/cellmesh keyed by CellProfiler, the pipelines and
the images (CELLMESH_CACHE to move it)."""

from __future__ import annotations

import asyncio
import hashlib
import io
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
            CellmeshClient(mesh.catalog_addr) as client,
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
    finally:
        await stop_mesh(mesh)
