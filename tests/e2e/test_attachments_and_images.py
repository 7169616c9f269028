"""Pipelines that read attached files, and pipelines that only save images,
through the whole mesh with real servers and real CellProfiler.

* A generated plate's pipeline imports a plate map (an attached CSV) with
  Metadata and divides DNA by an attached illumination function (a .npy the
  test makes, assigned by NamesAndTypes, applied by CorrectIlluminationApply):
  the exported Image.csv carries the plate map's column per well, and each
  nucleus' corrected intensity is its raw intensity divided by the function.
  Without its attachments the same pipeline is refused at registration.
* A pipeline without ExportToSpreadsheet saves DNA as .tiff and as .npy: every
  file it writes is stored, registered with its checksum and listed per site.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from services.common import synth
from services.common.s3 import ObjectStore, sha256_bytes
from services.mesh import microscope
from services.mesh.demo import start_mesh, stop_mesh
from tests.e2e.meshkit import NUCLEI, assert_nothing_lost, catalog_stub, options, wait_complete

pytestmark = pytest.mark.e2e

ILLUM_VALUE = 2.0
SIZE = 256


def _block(text: str, name: str) -> tuple[int, int]:
    """(start, end) of the first module called `name` (its header to the blank line after it)."""
    start = text.index(f"\n{name}:[") + 1
    end = text.find("\n\n", start)
    return start, (len(text) if end == -1 else end + 1)


def _replace_block(text: str, name: str, header_and_settings: str) -> str:
    start, end = _block(text, name)
    return text[:start] + header_and_settings + text[end:]


def _settings_after(text: str, name: str, settings: list[tuple[str, str]], rev: int, new: str) -> str:
    """Inserts module `new` (with settings) after module `name`."""
    _, end = _block(text, name)
    header = (
        f"{new}:[module_num:0|svn_version:'Unknown'|variable_revision_number:{rev}|show_window:False|"
        "notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]\n"
    )
    body = "".join(f"    {k}:{v}\n" for k, v in settings)
    return text[:end] + "\n" + header + body + text[end:]


def _renumber(text: str) -> str:
    count = 0

    def one(match: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"[module_num:{count}|"

    text = re.sub(r"\[module_num:\d+\|", one, text)
    return re.sub(r"ModuleCount:\d+", f"ModuleCount:{count}", text)


def _header(text: str, name: str) -> str:
    start, _ = _block(text, name)
    return text[start : text.index("\n", start) + 1]


def reading_pipeline() -> bytes:
    """nuclei.cppipe that imports plate_map.csv and divides DNA by illum_DNA.npy."""
    text = NUCLEI.read_text(encoding="utf-8")
    text = text.replace(
        "    Filter images?:Images only\n",
        "    Filter images?:Custom\n",
    )
    start, end = _block(text, "Images")
    images = text[start:end]
    images = re.sub(
        r"    Select the rule criteria:.*\n",
        lambda _m: '    Select the rule criteria:or (extension does istif) (file does endwith ".npy")\n',
        images,
    )
    text = text[:start] + images + text[end:]

    def method(kind: str, match: str, file_name: str, location: str) -> str:
        return (
            f"    Metadata extraction method:{kind}\n"
            "    Metadata source:File name\n"
            "    Regular expression to extract from file name:^(?P<Plate>[^_]+)_(?P<Well>[A-P][0-9]{2})_s(?P<Site>[0-9]+)_\n"
            "    Regular expression to extract from folder name:(?P<Date>[0-9]{4}_[0-9]{2}_[0-9]{2})$\n"
            "    Extract metadata from:All images\n"
            '    Select the filtering criteria:and (file does contain "")\n'
            f"    Metadata file location:{location}\n"
            f"    Match file and image metadata:{match}\n"
            "    Use case insensitive matching?:No\n"
            f"    Metadata file name:{file_name}\n"
            "    Does cached metadata exist?:No\n"
        )

    metadata = (
        _header(text, "Metadata")
        + "    Extract metadata?:Yes\n"
        + "    Metadata data type:Text\n"
        + "    Metadata types:{}\n"
        + "    Extraction method count:2\n"
        + method("Extract from file/folder names", "[]", "", "Elsewhere...|")
        + method(
            "Import from file",
            "[{'Image Metadata': 'Well', 'CSV Metadata': 'Well'}]",
            "plate_map.csv",
            "Default Input Folder|",
        )
    )
    text = _replace_block(text, "Metadata", metadata)
    text = text.replace("    Assignments count:2\n", "    Assignments count:3\n")
    start, end = _block(text, "NamesAndTypes")
    nat = (
        text[start:end].rstrip("\n")
        + "\n"
        + (
            '    Select the rule criteria:and (file does startwith "illum") (file does endwith ".npy")\n'
            "    Name to assign these images:IllumDNA\n"
            "    Name to assign these objects:Cell\n"
            "    Select the image type:Illumination function\n"
            "    Set intensity range from:Image metadata\n"
            "    Maximum intensity:255.0\n"
        )
    )
    text = text[:start] + nat + text[end:]
    text = _settings_after(
        text,
        "Groups",
        [
            ("Select the input image", "DNA"),
            ("Name the output image", "CorrDNA"),
            ("Select the illumination function", "IllumDNA"),
            ("Select how the illumination function is applied", "Divide"),
            ("Set output image values less than 0 equal to 0?", "No"),
            ("Set output image values greater than 1 equal to 1?", "No"),
        ],
        5,
        "CorrectIlluminationApply",
    )
    text = text.replace(
        "    Select images to measure:DNA, GFP\n", "    Select images to measure:DNA, CorrDNA, GFP\n"
    )
    return _renumber(text).encode()


def images_only_pipeline() -> bytes:
    """nuclei.cppipe without ExportToSpreadsheet, saving DNA as .tiff and as .npy."""
    text = NUCLEI.read_text(encoding="utf-8")
    start, _ = _block(text, "ExportToSpreadsheet")
    text = text[:start]

    def save(fmt: str, suffix: str, depth: str) -> str:
        return (
            "SaveImages:[module_num:0|svn_version:'Unknown'|variable_revision_number:15|show_window:False|"
            "notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]\n"
            "    Select the type of image to save:Image\n"
            "    Select the image to save:DNA\n"
            "    Select method for constructing file names:From image filename\n"
            "    Select image name for file prefix:DNA\n"
            "    Enter single file name:OrigBlue\n"
            "    Number of digits:4\n"
            "    Append a suffix to the image file name?:Yes\n"
            f"    Text to append to the image name:{suffix}\n"
            f"    Saved file format:{fmt}\n"
            "    Output file location:Default Output Folder|\n"
            f"    Image bit depth:{depth}\n"
            "    Overwrite existing files without warning?:Yes\n"
            "    When to save:Every cycle\n"
            "    Record the file and path information to the saved image?:No\n"
            "    Create subfolders in the output folder?:No\n"
            "    Base image folder:Elsewhere...|\n"
            "    How to save the series:T (Time)\n"
        )

    text += save("tiff", "_copy", "16-bit integer") + "\n" + save("npy", "_array", "32-bit floating point")
    return _renumber(text).encode()


async def _register(
    catalog: object, content: bytes, attachments: list[catalog_pb2.Attachment]
) -> catalog_pb2.RegisterPipelineResponse:
    return await catalog.RegisterPipeline(  # type: ignore[attr-defined,no-any-return]
        catalog_pb2.RegisterPipelineRequest(name="e2e", content=content, attachments=attachments)
    )


async def test_a_pipeline_reads_its_attached_csv_and_illumination_function(tmp_path: Path) -> None:
    rows, columns, sites_per_well = 1, 3, 1
    wells = microscope.plate_wells(rows, columns)
    treatments = {well: f"compound-{n}" for n, well in enumerate(wells)}
    plate_map = "Well,Treatment\n" + "".join(f"{w},{t}\n" for w, t in treatments.items())
    buffer = io.BytesIO()
    np.save(buffer, np.full((SIZE, SIZE), ILLUM_VALUE, dtype=np.float32))
    illum = buffer.getvalue()
    content = reading_pipeline()
    mesh = await start_mesh(options(tmp_path, workers=1))
    try:
        async with mesh.channel() as channel, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _register(catalog, content, [])
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = refused.value.details() or ""
            assert "`Metadata` (module 2) setting 'Metadata file name' imports plate_map.csv" in details
            assert "attach it with --attach plate_map.csv" in details
            assert "assigns IllumDNA to an illumination function" in details

            reply = await _register(
                catalog,
                content,
                [
                    catalog_pb2.Attachment(name="plate_map.csv", content=plate_map.encode()),
                    catalog_pb2.Attachment(name="illum.npy", content=illum),
                ],
            )
            pipeline = reply.pipeline
            assert list(pipeline.image_names) == ["DNA", "GFP"]
            assert {a.name for a in pipeline.attachments} == {"plate_map.csv", "illum.npy"}
            await catalog.CreatePlate(
                catalog_pb2.CreatePlateRequest(
                    name="ATT1",
                    channels=list(synth.CHANNELS),
                    layout=catalog_pb2.PlateLayout(rows=rows, columns=columns, sites_per_well=sites_per_well),
                    pipeline_sha256=pipeline.ref.sha256,
                    reduce_with_failures=True,
                )
            )
            generated = await asyncio.to_thread(
                microscope.generate_plate, tmp_path / "img", "ATT1", wells, sites_per_well, SIZE, 5
            )
            await microscope.acquire(store, catalog, "ATT1", generated, images_per_second=40)
            progress = await wait_complete(catalog, "ATT1", timeout=300, mesh=mesh)
            jobs = await assert_nothing_lost(catalog, store, "ATT1", len(wells))
            assert progress.done == len(wells), [j.failure_reason for j in jobs]
            drawn = {(s.well, s.site): s.nuclei for s in generated}
            for job in jobs:
                assert job.provenance.object_counts["Nuclei"] == drawn[(job.site.well, job.site.site)]
                assert sha256_bytes(illum) in job.provenance.input_sha256
                files = {r.name: r.object for r in job.results}
                image = list(
                    csv.DictReader(io.StringIO((await store.get_bytes(files["Image.csv"].key)).decode()))
                )
                assert image[0]["Metadata_Treatment"] == treatments[job.site.well]
                assert image[0]["Metadata_Well"] == job.site.well
                nuclei = list(
                    csv.DictReader(io.StringIO((await store.get_bytes(files["Nuclei.csv"].key)).decode()))
                )
                assert nuclei
                for row in nuclei:
                    raw = float(row["Intensity_MeanIntensity_DNA"])
                    corrected = float(row["Intensity_MeanIntensity_CorrDNA"])
                    assert corrected == pytest.approx(raw / ILLUM_VALUE, rel=1e-5)
    finally:
        await stop_mesh(mesh)


async def test_a_pipeline_that_only_saves_images(tmp_path: Path) -> None:
    rows, columns, sites_per_well = 1, 2, 2
    mesh = await start_mesh(options(tmp_path, workers=1))
    try:
        async with mesh.channel() as channel, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(channel)
            pipeline = (await _register(catalog, images_only_pipeline(), [])).pipeline
            assert list(pipeline.tables) == [] and pipeline.modules[-1] == "SaveImages"
            await catalog.CreatePlate(
                catalog_pb2.CreatePlateRequest(
                    name="IMG1",
                    channels=list(synth.CHANNELS),
                    layout=catalog_pb2.PlateLayout(rows=rows, columns=columns, sites_per_well=sites_per_well),
                    pipeline_sha256=pipeline.ref.sha256,
                    reduce_with_failures=True,
                )
            )
            wells = microscope.plate_wells(rows, columns)
            generated = await asyncio.to_thread(
                microscope.generate_plate, tmp_path / "img", "IMG1", wells, sites_per_well, SIZE, 7
            )
            await microscope.acquire(store, catalog, "IMG1", generated, images_per_second=40)
            deadline = asyncio.get_running_loop().time() + 300
            while True:
                progress = (
                    await catalog.GetPlateProgress(catalog_pb2.GetPlateProgressRequest(plate="IMG1"))
                ).progress
                if progress.done + progress.failed == len(generated):
                    break
                assert asyncio.get_running_loop().time() < deadline, progress
                mesh.procs.check_alive()
                await asyncio.sleep(0.5)
            jobs = await assert_nothing_lost(catalog, store, "IMG1", len(generated))
            assert progress.done == len(generated), [j.failure_reason for j in jobs]
            by_site = {(s.well, s.site): s for s in generated}
            for job in jobs:
                assert job.state == types_pb2.SITE_STATE_DONE
                stem = f"IMG1_{job.site.well}_s{job.site.site}_DNA"
                files = {r.name: r.object for r in job.results}
                assert set(files) == {f"{stem}_copy.tiff", f"{stem}_array.npy", "cellmesh_done.txt"}, files
                for ref in files.values():
                    assert ref.key.startswith(f"results/IMG1/{pipeline.ref.sha256[:12]}/{job.site.well}/")
                    assert ref.size > 0 and len(ref.sha256) == 64
                array = np.load(io.BytesIO(await store.get_bytes(files[f"{stem}_array.npy"].key)))
                drawn = by_site[(job.site.well, job.site.site)]
                assert array.shape == (SIZE, SIZE)
                import tifffile

                original = tifffile.imread(drawn.files["DNA"]).astype(np.float64)
                scale = 255.0 if original.max() <= 255 else 65535.0
                assert np.allclose(array, original / scale, atol=1e-6)
                saved = tifffile.imread(io.BytesIO(await store.get_bytes(files[f"{stem}_copy.tiff"].key)))
                assert saved.shape == (SIZE, SIZE)
            # The plate still settles: its report has no tables to gather (the
            # worker's done-file is not one) and lists every site's files as they are.
            await wait_complete(catalog, "IMG1", timeout=120, mesh=mesh)
            report = (await catalog.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate="IMG1"))).report
            # (and the QC page, which says the plate has no plate map)
            assert [f.name for f in report.files] == ["summary.json", "qc.html"]
            assert {m.reason for m in report.missing_sites} == {"no result tables"}
    finally:
        await stop_mesh(mesh)
