"""A plate stage per group through the mesh, against the CellProfiler
command line: a generated plate whose file names carry a `Batch` (two
batches, ingested with it as site metadata), an illumination stage whose
Groups module groups by Batch (CorrectIlluminationCalculate "All: Across
cycles"), then the per-site analysis that divides DNA by the function.

Each batch's function must be the command line's over that batch's files
only, calculated as soon as that batch was in (the other batch still
incomplete); each site's tables must be the command line's analysis with its
own batch's function (and differ with the other one); and a rerun of one
batch's stage must run that batch's analysis again, and only that, into a
new report version."""

from __future__ import annotations

import asyncio
import io
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cellmesh import keys
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2

from services.common.s3 import ObjectStore
from services.mesh import microscope
from services.mesh.demo import Mesh, start_mesh, stop_mesh
from tests.e2e.meshkit import assert_nothing_lost, catalog_stub, options, wait_complete
from tests.e2e.test_workflow import ANALYSIS, ILLUM, VOLATILE, assert_same_table, cellprofiler

pytestmark = pytest.mark.e2e

S = types_pb2
PLATE = "GB1"
#: Two batches of two wells; the microscope names each file with its batch.
BATCH = {"A01": "B1", "A02": "B1", "A03": "B2", "A04": "B2"}


def grouped_illum() -> bytes:
    """illum_dna.cppipe with its Metadata module reading the batch from the
    file name and its Groups module grouping by it: one illumination
    function per batch, as CellProfiler would calculate it."""
    text = ILLUM.read_text()
    start = text.index("Metadata:[module_num:2")
    end = text.index("\n\n", start)
    block = text[start:end]
    block = block.replace("Extract metadata?:No", "Extract metadata?:Yes")
    regex = next(
        line for line in block.splitlines() if "Regular expression to extract from file name:" in line
    )
    block = block.replace(regex, r"    Regular expression to extract from file name:_(?P<Batch>B[0-9])\.tif$")
    text = text[:start] + block + text[end:]
    start = text.index("Groups:[module_num:4")
    end = text.index("\n\n", start)
    head = text[start:end].splitlines()[0]
    groups = "\n".join(
        [
            head,
            "    Do you want to group your images?:Yes",
            "    grouping metadata count:1",
            "    Metadata category:Batch",
        ]
    )
    return (text[:start] + groups + text[end:]).encode()


async def upload(
    store: ObjectStore,
    catalog: catalog_pb2_grpc.CatalogServiceAsyncStub,
    files: list[tuple[microscope.SiteImages, str, Path]],
) -> None:
    """Uploads and registers each (site, channel, file) with its batch as metadata."""
    regs = []
    for site, channel, path in files:
        stored = await store.put_file(keys.image_key(PLATE, site.well, site.site, channel, path.name), path)
        regs.append(
            catalog_pb2.ImageRegistration(
                site=S.SiteRef(plate=PLATE, well=site.well, site=site.site),
                channel=channel,
                object=S.ObjectRef(key=stored.key, size=stored.size, sha256=stored.sha256),
                file_name=path.name,
                metadata={"Batch": BATCH[site.well]},
            )
        )
    await catalog.RegisterImages(catalog_pb2.RegisterImagesRequest(images=regs))


async def jobs_of(
    catalog: catalog_pb2_grpc.CatalogServiceAsyncStub, sha: str, with_results: bool = True
) -> list[catalog_pb2.SiteJob]:
    reply = await catalog.ListSites(
        catalog_pb2.ListSitesRequest(plate=PLATE, pipeline_sha256=sha, with_results=with_results)
    )
    return list(reply.sites)


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float, mesh: Mesh) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mesh.procs.check_alive()
        if await check():
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"not after {timeout} s: {what}")


def tables_differ(ours: bytes, theirs: Path) -> bool:
    a = pd.read_csv(io.BytesIO(ours))
    b = pd.read_csv(theirs)
    columns = [
        c
        for c in a.columns
        if c in b.columns and not c.startswith(VOLATILE) and pd.api.types.is_numeric_dtype(a[c])
    ]
    if len(a) != len(b):
        return True
    return not np.allclose(
        a[columns].to_numpy(float), b[columns].to_numpy(float), rtol=1e-9, atol=0, equal_nan=True
    )


async def test_each_batch_s_illumination_stage_runs_on_its_own_sites_and_feeds_only_them(
    tmp_path: Path,
) -> None:
    generated = await asyncio.to_thread(
        microscope.generate_plate, tmp_path / "generated", PLATE, list(BATCH), 2, 256, 5
    )
    sites = []
    folder = tmp_path / "microscope"
    folder.mkdir()
    for s in generated:
        files = {}
        for name, path in s.files.items():
            files[name] = path.rename(folder / f"{s.well}_s{s.site}_{name}_{BATCH[s.well]}.tif")
        sites.append(microscope.SiteImages(s.well, s.site, s.nuclei, files))
    illum_text = grouped_illum()
    mesh = await start_mesh(options(tmp_path / "mesh", workers=2))
    try:
        async with mesh.channel() as channel, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(channel)
            illum = (
                await catalog.RegisterPipeline(
                    catalog_pb2.RegisterPipelineRequest(name="illum-by-batch", content=illum_text)
                )
            ).pipeline
            assert illum.scope == S.PIPELINE_SCOPE_PLATE and list(illum.group_by) == ["Batch"]
            analysis = (
                await catalog.RegisterPipeline(
                    catalog_pb2.RegisterPipelineRequest(
                        name="analysis", content=ANALYSIS.read_bytes(), stage_inputs=["IllumDNA.npy"]
                    )
                )
            ).pipeline
            await catalog.CreatePlate(
                catalog_pb2.CreatePlateRequest(
                    name=PLATE,
                    channels=["DNA", "GFP"],
                    layout=catalog_pb2.PlateLayout(wells=list(BATCH), rows=8, columns=12, sites_per_well=2),
                    pipeline_sha256=illum.ref.sha256,
                    reduce_with_failures=True,
                )
            )
            await catalog.AddPlatePipeline(
                catalog_pb2.AddPlatePipelineRequest(plate=PLATE, pipeline_sha256=analysis.ref.sha256)
            )
            # Every site's DNA (so every site's batch is known), then B1's GFP only.
            await upload(store, catalog, [(s, "DNA", s.files["DNA"]) for s in sites])
            await upload(store, catalog, [(s, "GFP", s.files["GFP"]) for s in sites if BATCH[s.well] == "B1"])

            async def b1_analysed() -> bool:
                jobs = await jobs_of(catalog, analysis.ref.sha256, False)
                done = [j for j in jobs if j.state == S.SITE_STATE_DONE]
                return len(done) == 4

            await until("B1's analysis done", b1_analysed, 300, mesh)
            stage = {j.metadata["Batch"]: j for j in await jobs_of(catalog, illum.ref.sha256)}
            assert stage["B1"].state == S.SITE_STATE_DONE
            assert stage["B2"].state == S.SITE_STATE_WAITING  # its GFP is not in yet
            early = {(j.site.well, j.site.site): j for j in await jobs_of(catalog, analysis.ref.sha256)}
            assert {k for k, j in early.items() if j.state == S.SITE_STATE_DONE} == {
                (w, n) for w in ("A01", "A02") for n in (0, 1)
            }

            await upload(store, catalog, [(s, "GFP", s.files["GFP"]) for s in sites if BATCH[s.well] == "B2"])
            await wait_complete(catalog, PLATE, 300, mesh)
            jobs = await assert_nothing_lost(catalog, store, PLATE, 8)
            assert all(j.state == S.SITE_STATE_DONE for j in jobs), [j.failure_reason for j in jobs]
            stage = {j.metadata["Batch"]: j for j in await jobs_of(catalog, illum.ref.sha256)}
            assert set(stage) == {"B1", "B2"} and all(j.state == S.SITE_STATE_DONE for j in stage.values())
            for job in jobs:
                # Released only after its own batch's function existed.
                assert job.started_at.ToDatetime() >= stage[BATCH[job.site.well]].finished_at.ToDatetime()
            ours = {
                b: np.load(
                    io.BytesIO(
                        await store.get_bytes(
                            next(r for r in j.results if r.name == "IllumDNA.npy").object.key
                        )
                    )
                )
                for b, j in stage.items()
            }

            # The command line, batch by batch: the stage over that batch's files, the analysis per site.
            cli = tmp_path / "cli"
            theirs: dict[str, Path] = {}
            for batch in ("B1", "B2"):
                inputs = cli / f"in_{batch}"
                inputs.mkdir(parents=True)
                for s in sites:
                    if BATCH[s.well] == batch:
                        for path in s.files.values():
                            shutil.copy(path, inputs / path.name)
                await asyncio.to_thread(
                    cellprofiler_bytes, illum_text, inputs, cli / f"illum_{batch}", tmp_path
                )
                theirs[batch] = cli / f"illum_{batch}" / "IllumDNA.npy"
                np.testing.assert_allclose(ours[batch], np.load(theirs[batch]), rtol=1e-9, atol=0)
            # The two batches' functions are not the same: each comes from its own sites only.
            assert not np.allclose(ours["B1"], ours["B2"], rtol=1e-6, atol=0)

            compared = 0
            by_site = {(j.site.well, j.site.site): j for j in jobs}
            for s in sites:
                batch = BATCH[s.well]
                results = {r.name: r for r in by_site[(s.well, s.site)].results}
                for use in (batch, "B2" if batch == "B1" else "B1"):
                    if use != batch and s.site != 0:
                        continue  # the other batch's function, once per well, to show it would differ
                    inputs = cli / f"{s.well}_{s.site}_{use}"
                    inputs.mkdir()
                    for path in s.files.values():
                        shutil.copy(path, inputs / path.name)
                    shutil.copy(theirs[use], inputs / "IllumDNA.npy")
                    out = cli / f"out_{s.well}_{s.site}_{use}"
                    await asyncio.to_thread(cellprofiler, ANALYSIS, inputs, out)
                    ours_nuclei = await store.get_bytes(results["Nuclei.csv"].object.key)
                    if use == batch:
                        for table in ("Image.csv", "Nuclei.csv"):
                            compared += assert_same_table(
                                await store.get_bytes(results[table].object.key), out / table
                            )
                    else:
                        assert tables_differ(ours_nuclei, out / "Nuclei.csv"), (s.well, s.site)
            assert compared > 100
            report = (await catalog.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate=PLATE))).report
            assert report.pipeline_sha256 == analysis.ref.sha256 and report.version == 1

            # B2's stage again: B2's analysis runs again into report version 2; B1's results stay.
            first = {(j.site.well, j.site.site): [r.object.key for r in j.results] for j in jobs}
            reply = await catalog.RequeueSites(
                catalog_pb2.RequeueSitesRequest(
                    plate=PLATE,
                    pipeline_sha256=illum.ref.sha256,
                    sites=[S.SiteRef(plate=PLATE, well="A03", site=1)],
                )
            )
            assert reply.requeued == 1

            async def second_report() -> bool:
                progress = (
                    await catalog.GetPlateProgress(catalog_pb2.GetPlateProgressRequest(plate=PLATE))
                ).progress
                return bool(progress.complete and progress.report_version == 2)

            await until("report version 2", second_report, 300, mesh)
            again = {
                (j.site.well, j.site.site): j for j in await assert_nothing_lost(catalog, store, PLATE, 8)
            }
            stage2 = {j.metadata["Batch"]: j for j in await jobs_of(catalog, illum.ref.sha256)}
            assert (
                stage2["B1"].attempt == stage["B1"].attempt
                and stage2["B2"].attempt == stage["B2"].attempt + 1
            )
            for key, job in again.items():
                now = [r.object.key for r in job.results]
                if BATCH[key[0]] == "B1":
                    assert now == first[key] and job.attempt == by_site[key].attempt
                else:
                    assert set(now).isdisjoint(first[key]) and job.attempt == by_site[key].attempt + 1
                    assert job.started_at.ToDatetime() >= stage2["B2"].finished_at.ToDatetime()
    finally:
        await stop_mesh(mesh)


def cellprofiler_bytes(pipeline: bytes, images: Path, out: Path, tmp: Path) -> None:
    path = tmp / "grouped_illum.cppipe"
    path.write_bytes(pipeline)
    cellprofiler(path, images, out)
