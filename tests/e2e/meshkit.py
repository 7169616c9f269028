"""Helpers for tests that run the whole mesh as separate processes against
the real MariaDB or SQLite, RabbitMQ, the project's S3 server and CellProfiler."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from cellmesh import pages
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2

from services.common import synth
from services.common.s3 import ObjectStore, sha256_bytes
from services.mesh import microscope
from services.mesh.demo import DemoOptions, Mesh

REPO = Path(__file__).resolve().parents[2]


def cp_python() -> str:
    """CellProfiler's environment: CP_PYTHON, var/cp_python, or the (cached) installer."""
    value = os.environ.get("CP_PYTHON") or ""
    if not value and (REPO / "var" / "cp_python").exists():
        value = (REPO / "var" / "cp_python").read_text().strip()
    if not value:
        out = subprocess.run(
            ["bash", str(REPO / "scripts" / "install_cellprofiler.sh")],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = out.stdout.strip().splitlines()
        value = lines[-1] if out.returncode == 0 and lines else ""
    if not value or not Path(value).exists():
        pytest.fail(
            "CellProfiler is not installed: run `make setup` (scripts/install_cellprofiler.sh)", pytrace=False
        )
    return value


def options(tmp: Path, **kw: object) -> DemoOptions:
    return DemoOptions(run_dir=tmp, cp_python=cp_python(), **kw)  # type: ignore[arg-type]


async def wait_complete(
    catalog: catalog_pb2_grpc.CatalogServiceAsyncStub, plate: str, timeout: float, mesh: Mesh | None = None
) -> catalog_pb2.PlateProgress:
    """Polls until every site is settled and the report of the latest
    generation is registered."""
    deadline = time.monotonic() + timeout
    progress = catalog_pb2.PlateProgress()
    while time.monotonic() < deadline:
        if mesh is not None:
            mesh.procs.check_alive()
        progress = (await catalog.GetPlateProgress(catalog_pb2.GetPlateProgressRequest(plate=plate))).progress
        if progress.complete:
            return progress
        await asyncio.sleep(0.5)
    raise AssertionError(f"plate {plate} not complete after {timeout} s: {progress}")


async def assert_nothing_lost(
    catalog: catalog_pb2_grpc.CatalogServiceAsyncStub, store: ObjectStore, plate: str, expected_sites: int
) -> list[catalog_pb2.SiteJob]:
    """Every site is done or failed-with-reason exactly once, and every result
    file listed exists with its checksum."""
    sites = list(
        await pages.all_site_jobs(catalog, catalog_pb2.ListSitesRequest(plate=plate, with_results=True))
    )
    keys = [(j.site.well, j.site.site) for j in sites]
    assert len(keys) == len(set(keys)) == expected_sites, f"{len(keys)} site jobs for {expected_sites} sites"
    for job in sites:
        assert job.state in (types_pb2.SITE_STATE_DONE, types_pb2.SITE_STATE_FAILED), job
        if job.state == types_pb2.SITE_STATE_FAILED:
            assert job.failure_reason, f"{job.site} failed without a reason"
            continue
        assert job.results, f"{job.site} is done without result files"
        for result in job.results:
            data = await store.get_bytes(result.object.key)
            assert sha256_bytes(data) == result.object.sha256, result.object.key
            assert len(data) == result.object.size
    return sites


def catalog_stub(channel: grpc.aio.Channel) -> catalog_pb2_grpc.CatalogServiceAsyncStub:
    return catalog_pb2_grpc.CatalogServiceStub(channel)


NUCLEI = REPO / "examples" / "pipelines" / "nuclei.cppipe"


async def create_generated_plate(
    catalog: catalog_pb2_grpc.CatalogServiceAsyncStub,
    folder: Path,
    plate: str,
    rows: int,
    columns: int,
    sites: int,
    pipeline: bytes | None = None,
    size: int = 256,
    seed: int = 0,
) -> list[microscope.SiteImages]:
    """Registers the pipeline (nuclei.cppipe by default), creates a plate with
    its layout, and generates its images (not yet registered)."""
    reply = await catalog.RegisterPipeline(
        catalog_pb2.RegisterPipelineRequest(name="pipeline", content=pipeline or NUCLEI.read_bytes())
    )
    await catalog.CreatePlate(
        catalog_pb2.CreatePlateRequest(
            name=plate,
            channels=list(synth.CHANNELS),
            layout=catalog_pb2.PlateLayout(rows=rows, columns=columns, sites_per_well=sites),
            pipeline_sha256=reply.pipeline.ref.sha256,
            reduce_with_failures=True,
        )
    )
    wells = microscope.plate_wells(rows, columns)
    return await asyncio.to_thread(microscope.generate_plate, folder, plate, wells, sites, size, seed)
