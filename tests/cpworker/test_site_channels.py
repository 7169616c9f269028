"""Channels reach CellProfiler as the catalog registered them, whatever the
microscope named the files: the whole worker path (object store, SiteProcessor,
the real CellProfiler 4.2.8.1 warm and cold) on ExampleHuman's real site.

ExampleHuman's NamesAndTypes assigns ``…d0.tif`` to DNA, ``…d1.tif`` to PH3 and
``…d2.tif`` to cellbody by file-name rules. These tests register the images
under names those rules would assign to other channels, or under one name for
every channel, and check that the results equal the correctly named run.
"""

from __future__ import annotations

import asyncio
import csv
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from services.common import cppipe
from services.common.s3 import ObjectStore, S3Settings
from services.cpworker.runner import ColdRunner, WarmRunner, judge_outputs
from services.cpworker.site import Failure, Phase, PipelineCache, SiteProcessor, SiteRunner, Success
from tests.cpworker.test_runner import EXAMPLE_HUMAN, SITE_TIMEOUT, cp_python  # noqa: F401
from tests.loaddata import with_loaddata

FC = types_pb2.FailureClass
pytestmark = pytest.mark.asyncio(loop_scope="module")

IMAGES = EXAMPLE_HUMAN / "images"
STEM = "AS_09125_050116030001_D03f00"
#: ExampleHuman's channels and the file that holds each.
CHANNEL_FILES = {"DNA": f"{STEM}d0.tif", "PH3": f"{STEM}d1.tif", "cellbody": f"{STEM}d2.tif"}
TABLES = ["Image.csv", "Nuclei.csv", "Cells.csv", "Cytoplasm.csv", "PH3.csv"]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def runners(cp_python: Path) -> AsyncIterator[dict[str, SiteRunner]]:  # noqa: F811
    warm, cold = WarmRunner(cp_python), ColdRunner(cp_python)
    await warm.start()
    yield {"warm": warm, "cold": cold}
    await warm.close()
    await cold.close()


@pytest_asyncio.fixture(loop_scope="module")
async def store(s3_settings: S3Settings) -> AsyncIterator[ObjectStore]:
    async with ObjectStore(s3_settings) as s:
        await s.ensure_bucket()
        yield s


async def put_pipeline(store: ObjectStore, path: Path) -> types_pb2.PipelineRef:
    stored = await store.put_file(f"pipelines/{path.name}", path)
    return types_pb2.PipelineRef(sha256=stored.sha256, key=stored.key)


async def make_claim(
    store: ObjectStore,
    pipeline: types_pb2.PipelineRef,
    images: dict[str, tuple[Path, str]],
    tables: list[str],
    metadata: dict[str, str] | None = None,
) -> catalog_pb2.SiteClaim:
    """A claim of site D03/0 of plate P1: channel -> (the file's bytes, the name it is registered under)."""
    site = types_pb2.SiteRef(plate="P1", well="D03", site=0)
    claim_images = []
    for channel, (path, file_name) in images.items():
        stored = await store.put_file(f"images/P1/D03/s0/{channel}/{file_name}", path)
        claim_images.append(
            catalog_pb2.Image(
                site=site,
                channel=channel,
                file_name=file_name,
                object=types_pb2.ObjectRef(key=stored.key, size=stored.size, sha256=stored.sha256),
                metadata=metadata or {},
            )
        )
    return catalog_pb2.SiteClaim(
        site_job_id=1, attempt=1, site=site, images=claim_images, pipeline=pipeline, expected_tables=tables
    )


async def run_claim(
    store: ObjectStore, runner: SiteRunner, claim: catalog_pb2.SiteClaim, work: Path
) -> tuple[Success | Failure, dict[str, list[dict[str, str]]]]:
    """Runs the claim; returns the outcome and, on success, the tables it uploaded."""
    processor = SiteProcessor(
        store, PipelineCache(store, work / "pipelines"), judge_outputs, "w1", work, SITE_TIMEOUT
    )
    queue: asyncio.Queue[SiteRunner] = asyncio.Queue()
    queue.put_nowait(runner)
    outcome = await processor.process(claim, queue, Phase(claim), "x1")
    tables: dict[str, list[dict[str, str]]] = {}
    if isinstance(outcome, Success):
        for result in outcome.results:
            if result.name.endswith(".csv"):
                data = await store.get_bytes(result.object.key)
                tables[result.name] = list(csv.DictReader(data.decode().splitlines()))
    return outcome, tables


def correct_images() -> dict[str, tuple[Path, str]]:
    return {channel: (IMAGES / name, name) for channel, name in CHANNEL_FILES.items()}


def assert_same_values(got: dict[str, list[dict[str, str]]], want: dict[str, list[dict[str, str]]]) -> None:
    """Every numeric column both runs share, in every table, equal to a relative 1e-9
    (but CellProfiler's own timings, ExecutionTime_*, and Experiment.csv's key-value rows)."""
    assert set(want) <= set(got), f"tables missing: {set(want) - set(got)}"
    for table, want_rows in want.items():
        if table.endswith("Experiment.csv"):
            continue
        got_rows = got[table]
        assert len(got_rows) == len(want_rows), table
        if not want_rows:
            continue
        shared = [c for c in want_rows[0] if c in got_rows[0] and not c.startswith("ExecutionTime_")]
        compared = 0
        for column in shared:
            for i, (g, w) in enumerate(zip(got_rows, want_rows, strict=True)):
                try:
                    gv, wv = float(g[column]), float(w[column])
                except ValueError:
                    continue
                compared += 1
                if math.isnan(wv):
                    assert math.isnan(gv), f"{table} row {i} {column}: {gv} != nan"
                else:
                    assert math.isclose(gv, wv, rel_tol=1e-9, abs_tol=0.0) or gv == wv, (
                        f"{table} row {i} {column}: {gv} != {wv}"
                    )
        assert compared > 0, f"{table}: no numeric values compared"


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, list[dict[str, str]]]]:
    return {}


@pytest.mark.parametrize("mode", ["warm", "cold"])
async def test_correctly_named_site_counts_289_nuclei(
    store: ObjectStore,
    runners: dict[str, SiteRunner],
    reference: dict[str, dict[str, list[dict[str, str]]]],
    tmp_path: Path,
    mode: str,
) -> None:
    pipeline = await put_pipeline(store, EXAMPLE_HUMAN / "ExampleHuman.cppipe")
    claim = await make_claim(store, pipeline, correct_images(), TABLES)
    outcome, tables = await run_claim(store, runners[mode], claim, tmp_path)
    assert isinstance(outcome, Success), outcome
    (row,) = tables["Image.csv"]
    assert int(float(row["Count_Nuclei"])) == 289
    assert int(float(row["Count_PH3"])) == 22
    reference[mode] = tables


@pytest.mark.parametrize("mode", ["warm", "cold"])
async def test_a_file_named_like_another_channel_keeps_its_registered_channel(
    store: ObjectStore,
    runners: dict[str, SiteRunner],
    reference: dict[str, dict[str, list[dict[str, str]]]],
    tmp_path: Path,
    mode: str,
) -> None:
    # The DNA image is registered under the name NamesAndTypes assigns to PH3,
    # the PH3 image under DNA's: CellProfiler must still see DNA as DNA.
    images = {
        "DNA": (IMAGES / CHANNEL_FILES["DNA"], CHANNEL_FILES["PH3"]),
        "PH3": (IMAGES / CHANNEL_FILES["PH3"], CHANNEL_FILES["DNA"]),
        "cellbody": (IMAGES / CHANNEL_FILES["cellbody"], CHANNEL_FILES["cellbody"]),
    }
    pipeline = await put_pipeline(store, EXAMPLE_HUMAN / "ExampleHuman.cppipe")
    claim = await make_claim(store, pipeline, images, TABLES)
    outcome, tables = await run_claim(store, runners[mode], claim, tmp_path)
    assert isinstance(outcome, Success), outcome
    (row,) = tables["Image.csv"]
    assert int(float(row["Count_Nuclei"])) == 289
    assert int(float(row["Count_PH3"])) == 22
    assert_same_values(tables, reference[mode])


@pytest.mark.parametrize("mode", ["warm", "cold"])
async def test_channels_with_one_file_name_do_not_share_a_path(
    store: ObjectStore,
    runners: dict[str, SiteRunner],
    reference: dict[str, dict[str, list[dict[str, str]]]],
    tmp_path: Path,
    mode: str,
) -> None:
    # Every channel's file is called "image.tif" (e.g. one folder per channel
    # on the microscope's side).
    images = {channel: (IMAGES / name, "image.tif") for channel, name in CHANNEL_FILES.items()}
    pipeline = await put_pipeline(store, EXAMPLE_HUMAN / "ExampleHuman.cppipe")
    claim = await make_claim(store, pipeline, images, TABLES)
    outcome, tables = await run_claim(store, runners[mode], claim, tmp_path)
    assert isinstance(outcome, Success), outcome
    assert_same_values(tables, reference[mode])


def loaddata_example_human() -> str:
    """ExampleHuman as Distributed-CellProfiler users write it (tests/loaddata.py)."""
    return with_loaddata((EXAMPLE_HUMAN / "ExampleHuman.cppipe").read_text())


@pytest.mark.parametrize("mode", ["warm", "cold"])
async def test_a_loaddata_pipeline_gives_the_values_of_the_namesandtypes_one(
    store: ObjectStore,
    runners: dict[str, SiteRunner],
    reference: dict[str, dict[str, list[dict[str, str]]]],
    tmp_path: Path,
    mode: str,
) -> None:
    text = loaddata_example_human()
    parsed = cppipe.parse_for_sites(text.encode())  # registration accepts it
    assert parsed.loaddata == ("load_data.csv",)
    assert parsed.image_names == ()
    assert parsed.table_files == TABLES or set(TABLES) <= set(parsed.table_files)
    path = tmp_path / "ExampleHuman_LoadData.cppipe"
    path.write_text(text)
    pipeline = await put_pipeline(store, path)
    # Named like nothing NamesAndTypes knows: LoadData's CSV says which is which.
    images = {channel: (IMAGES / name, f"{channel.lower()}.tif") for channel, name in CHANNEL_FILES.items()}
    # The site's metadata (the ingest pattern's other groups) reaches the Image table.
    claim = await make_claim(store, pipeline, images, TABLES, {"Timepoint": "T07", "Compound": "DMSO"})
    outcome, tables = await run_claim(store, runners[mode], claim, tmp_path / "run")
    assert isinstance(outcome, Success), outcome
    (row,) = tables["Image.csv"]
    assert (row["Metadata_Plate"], row["Metadata_Well"], row["Metadata_Site"]) == ("P1", "D03", "0")
    assert (row["Metadata_Timepoint"], row["Metadata_Compound"]) == ("T07", "DMSO")
    assert row["FileName_DNA"] == "dna.tif"
    assert_same_values(tables, reference[mode])


@pytest.mark.parametrize("mode", ["warm", "cold"])
async def test_a_site_that_forms_no_image_set_is_an_input_problem(
    store: ObjectStore, runners: dict[str, SiteRunner], tmp_path: Path, mode: str
) -> None:
    # ExampleHuman's Images module keeps image files only: a DNA file
    # registered as "DNA.txt" is left out, so no image set forms.
    images = correct_images()
    images["DNA"] = (IMAGES / CHANNEL_FILES["DNA"], "DNA.txt")
    pipeline = await put_pipeline(store, EXAMPLE_HUMAN / "ExampleHuman.cppipe")
    claim = await make_claim(store, pipeline, images, TABLES)
    outcome, _ = await run_claim(store, runners[mode], claim, tmp_path)
    assert isinstance(outcome, Failure), outcome
    assert outcome.failure_class == FC.FAILURE_CLASS_INPUT_PROBLEM, outcome
    assert "no image set" in outcome.reason and "DNA <- DNA.txt" in outcome.reason, outcome.reason


async def test_a_loaddata_image_that_is_not_there_is_an_input_problem(
    store: ObjectStore, runners: dict[str, SiteRunner], tmp_path: Path
) -> None:
    # The CSV names every channel of the site; a channel file removed after the
    # download (as if the CSV named a file that is not there) is reported by name.
    text = loaddata_example_human().replace("Name of the file:load_data.csv", "Name of the file:sub/ld.csv")
    text = text.replace(
        "Input data file location:Default Input Folder|", "Input data file location:Default Input Folder|"
    )
    path = tmp_path / "ld.cppipe"
    path.write_text(text)
    pipeline = await put_pipeline(store, path)
    claim = await make_claim(store, pipeline, correct_images(), TABLES)
    warm = runners["warm"]

    class Vanishing:
        """Removes the DNA file just before CellProfiler runs."""

        mode = "warm"

        async def start(self) -> str:
            return await warm.start()

        async def run_site(self, pipeline: Path, files: list[Path], output_dir: Path, timeout: float, **kw):  # type: ignore[no-untyped-def]
            (kw["input_dir"] / "DNA").joinpath(CHANNEL_FILES["DNA"]).unlink()
            assert (kw["input_dir"] / "sub" / "ld.csv").is_file()
            return await warm.run_site(pipeline, files, output_dir, timeout, **kw)

        async def close(self) -> None: ...

    processor = SiteProcessor(
        store, PipelineCache(store, tmp_path / "p"), judge_outputs, "w1", tmp_path, SITE_TIMEOUT
    )
    queue: asyncio.Queue[SiteRunner] = asyncio.Queue()
    queue.put_nowait(Vanishing())  # type: ignore[arg-type]
    outcome = await processor.process(claim, queue, Phase(claim), "x1")
    assert isinstance(outcome, Failure), outcome
    assert outcome.failure_class == FC.FAILURE_CLASS_INPUT_PROBLEM, outcome
    assert CHANNEL_FILES["DNA"] in outcome.reason, outcome.reason
