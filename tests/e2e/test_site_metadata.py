"""The ingest pattern's other named groups reach CellProfiler: a generated
plate whose file names carry a compound and a timepoint is ingested with a
pattern that names them, runs through the mesh with the real CellProfiler
(a LoadData pipeline, as Distributed-CellProfiler users write them), and
every site's Image table has Metadata_Compound and Metadata_Timepoint with
that site's values, beside Metadata_Well and the nuclei the generator drew."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.client import CellmeshClient, ObjectStoreConfig
from cellmesh.client import ObjectStore as ClientStore
from cellmesh.common.v1 import types_pb2
from cellmesh.ingest import FileNameParser, Ingester

from services.common.s3 import ObjectStore
from services.mesh.demo import start_mesh, stop_mesh
from tests.e2e.meshkit import (
    NUCLEI,
    assert_nothing_lost,
    catalog_stub,
    create_generated_plate,
    options,
    wait_complete,
)
from tests.loaddata import with_loaddata

pytestmark = pytest.mark.e2e

PATTERN = (
    r"^(?P<Well>[A-P]\d{2})_s(?P<Site>\d)_(?P<Channel>DNA|GFP)_(?P<Compound>[a-z]+)_(?P<Timepoint>T\d+)\.tif$"
)
#: What the microscope's file names say about each (well, site).
TAGS = {("A01", 0): ("dmso", "T01"), ("A02", 0): ("taxol", "T01"), ("A02", 1): ("taxol", "T02")}


def loaddata_nuclei() -> bytes:
    """nuclei.cppipe with its input modules replaced by one LoadData
    reading load_data.csv from the Default Input Folder (absolute paths)."""
    return with_loaddata(NUCLEI.read_text()).encode()


async def test_the_pattern_s_groups_are_metadata_columns_of_the_image_table(tmp_path: Path) -> None:
    plate = "MD1"
    mesh = await start_mesh(options(tmp_path / "mesh", workers=1))
    try:
        async with mesh.channel() as channel, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(channel)
            sites = await create_generated_plate(
                catalog, tmp_path / "generated", plate, 1, 2, 2, pipeline=loaddata_nuclei(), size=128
            )
            folder = tmp_path / "microscope"
            folder.mkdir()
            drawn = {}
            for s in sites:
                if (s.well, s.site) not in TAGS:
                    continue  # A01 site 1 never comes: the plate finishes without it
                compound, timepoint = TAGS[(s.well, s.site)]
                drawn[(s.well, s.site)] = s.nuclei
                for channel_name, path in s.files.items():
                    path.rename(folder / f"{s.well}_s{s.site}_{channel_name}_{compound}_{timepoint}.tif")
            config = ObjectStoreConfig(
                bucket=mesh.s3.bucket,
                endpoint_url=mesh.s3.endpoint_url,
                region=mesh.s3.region,
                access_key=mesh.s3.access_key,
                secret_key=mesh.s3.secret_key,
            )
            async with (
                CellmeshClient(mesh.catalog_addr, credentials=mesh.credentials("scientist")) as client,
                ClientStore(config) as objects,
            ):
                summary = await Ingester(
                    client, objects, FileNameParser(PATTERN, plate=plate), progress=False
                ).run_once(folder)
                assert (summary.created, summary.unmatched) == (6, []), summary.lines()
            await catalog.FinishAcquisition(catalog_pb2.FinishAcquisitionRequest(plate=plate))
            await wait_complete(catalog, plate, 300, mesh)
            jobs = await assert_nothing_lost(catalog, store, plate, 4)
            done = {(j.site.well, j.site.site): j for j in jobs if j.state == types_pb2.SITE_STATE_DONE}
            assert set(done) == set(TAGS), [j.failure_reason for j in jobs]
            for key, job in done.items():
                assert dict(job.metadata) == {"Compound": TAGS[key][0], "Timepoint": TAGS[key][1]}
                image = next(r for r in job.results if r.name == "Image.csv")
                (row,) = pd.read_csv(io.BytesIO(await store.get_bytes(image.object.key)), dtype=str).to_dict(
                    "records"
                )
                assert (row["Metadata_Well"], row["Metadata_Site"]) == (key[0], str(key[1]))
                assert (row["Metadata_Compound"], row["Metadata_Timepoint"]) == TAGS[key]
                assert float(row["Count_Nuclei"]) == drawn[key]
    finally:
        await stop_mesh(mesh)
