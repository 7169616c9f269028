"""A generated plate through the whole mesh with real CellProfiler, then its
report opened the way CellProfiler Analyst opens it: from the object store
(image_url_prepend at the store) and from a local copy made by
`cellmesh report --out DIR --images`, and with presigned URLs (`--presign`)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from cellmesh import cpa as cpa_names
from cellmesh import pages
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from services.common.s3 import ObjectStore
from services.common.settings import S3Settings
from services.mesh import microscope
from services.mesh.demo import start_mesh, stop_mesh
from tests.e2e.meshkit import catalog_stub, create_generated_plate, options, wait_complete
from tests.reducer import cpa_reader

pytestmark = pytest.mark.e2e

PLATE = "CPA1"


def read_pair(properties: Path) -> tuple[cpa_reader.Properties, dict[tuple[str, int], int], list[list[str]]]:
    """(properties, objects per (well, site), every image set's opened files),
    read as CellProfiler Analyst reads them."""
    props = cpa_reader.load(properties)
    assert props.unrecognized == []
    db = cpa_reader.connect(props)
    image_table, object_table = props.str("image_table"), props.str("object_table")
    image_cols = cpa_reader.columns(db, image_table)
    object_cols = cpa_reader.columns(db, object_table)
    for key in ("image_id", "plate_id", "well_id"):
        assert props.str(key) in image_cols, key
    for key in ("image_id", "object_id", "cell_x_loc", "cell_y_loc"):
        assert props.str(key) in object_cols, key
    for col in props.list("image_path_cols") + props.list("image_file_cols"):
        assert col in image_cols, col
    assert cpa_reader.classifier_columns(db, props), "Classifier has features to learn from"
    image_id, object_id = props.str("image_id"), props.str("object_id")
    per_site: dict[tuple[str, int], int] = {}
    opened: list[list[str]] = []
    for number, plate, well, site in db.execute(
        f"SELECT {image_id}, {props.str('plate_id')}, {props.str('well_id')}, Image_Metadata_Site "
        f"FROM {image_table}"
    ).fetchall():
        assert plate == PLATE
        (n,) = db.execute(
            f"SELECT COUNT({object_id}) FROM {object_table} WHERE {image_id} = ? "
            f"AND {props.str('cell_x_loc')} IS NOT NULL",
            (number,),
        ).fetchone()
        per_site[(well, int(site))] = n
        paths = cpa_reader.image_paths(db, props, number)
        opened.append([cpa_reader.open_image(props, p) for p in paths])
    db.close()
    return props, per_site, opened


def allow_anonymous_reads(s3: S3Settings) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=s3.region,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
    )
    statement = {
        "Effect": "Allow",
        "Principal": "*",
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{s3.bucket}/images/*",
    }
    client.put_bucket_policy(
        Bucket=s3.bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [statement]})
    )


def sha256_file(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


async def test_cellprofiler_analyst_finds_every_well_and_object(tmp_path: Path) -> None:
    mesh = await start_mesh(options(tmp_path, workers=1))
    try:
        async with mesh.channel() as channel, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(channel)
            sites = await create_generated_plate(catalog, tmp_path / "img", PLATE, rows=2, columns=3, sites=2)
            await microscope.acquire(store, catalog, PLATE, sites, images_per_second=40)
            progress = await wait_complete(catalog, PLATE, timeout=300, mesh=mesh)
            assert progress.done == 12 and progress.failed == 0
            drawn = {(s.well, s.site): s.nuclei for s in sites}
            report = (await catalog.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate=PLATE))).report
            kinds = {f.kind: f for f in report.files}
            assert kinds[catalog_pb2.REPORT_FILE_KIND_CPA_DATABASE].name == cpa_names.DATABASE
            assert kinds[catalog_pb2.REPORT_FILE_KIND_CPA_PROPERTIES].name == cpa_names.PROPERTIES
            registered = {}
            async for page in pages.image_pages(catalog, catalog_pb2.ListImagesRequest(plate=PLATE)):
                for image in page:
                    registered[image.object.key.rsplit("/", 1)[-1]] = image.object.sha256

            # 1. The pair as stored, its images read from the object store by URL
            #    without a signature: a bucket whose policy lets anyone read images.
            await asyncio.to_thread(allow_anonymous_reads, mesh.s3)
            stored = tmp_path / "stored"
            stored.mkdir()
            for kind in (
                catalog_pb2.REPORT_FILE_KIND_CPA_DATABASE,
                catalog_pb2.REPORT_FILE_KIND_CPA_PROPERTIES,
            ):
                f = kinds[kind]
                (stored / f.name).write_bytes(await store.get_bytes(f.object.key, f.object.sha256))
            props, per_site, opened = await asyncio.to_thread(read_pair, stored / cpa_names.PROPERTIES)
            assert str(props.get("image_url_prepend")).startswith(mesh.s3.endpoint_url or "-")
            assert props.get("plate_shape") == [2, 3]
            assert per_site == drawn
            for files in opened:  # urlretrieve fetched each over HTTP into a temporary file
                assert len(files) == 2
                assert {await asyncio.to_thread(sha256_file, f) for f in files} <= set(registered.values())

            # 2. `cellmesh report --out DIR --images`: the local copy.
            local = tmp_path / "report"
            env = {
                **os.environ,
                "HOME": str(tmp_path / "home"),
                "S3_ENDPOINT_URL": mesh.s3.endpoint_url or "",
                "S3_BUCKET": mesh.s3.bucket,
                "S3_REGION": mesh.s3.region,
                "AWS_ACCESS_KEY_ID": mesh.s3.access_key or "",
                "AWS_SECRET_ACCESS_KEY": mesh.s3.secret_key or "",
                **(mesh.pki.client_env("scientist") if mesh.pki is not None else {}),
            }
            cli = [sys.executable, "-m", "cellmesh.cli", "--catalog", mesh.catalog_addr]
            done = await asyncio.to_thread(
                subprocess.run,
                [*cli, "report", PLATE, "--out", str(local), "--images"],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            assert done.returncode == 0, done.stderr
            assert "24 image(s) written" in done.stdout, done.stdout
            props, per_site, opened = await asyncio.to_thread(read_pair, local / cpa_names.PROPERTIES)
            assert str(props.get("image_url_prepend")).startswith("file://")
            assert per_site == drawn
            for files in opened:
                for f in files:
                    assert Path(f).is_relative_to(local), f
                    assert await asyncio.to_thread(sha256_file, f) == registered[Path(f).name]

            # 3. Without --images: each image's own presigned URL in the copy's database.
            signed = tmp_path / "signed"
            done = await asyncio.to_thread(
                subprocess.run,
                [*cli, "report", PLATE, "--out", str(signed), "--presign", "600"],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            assert done.returncode == 0, done.stderr
            props, per_site, opened = await asyncio.to_thread(read_pair, signed / cpa_names.PROPERTIES)
            assert per_site == drawn
            hashes = [await asyncio.to_thread(sha256_file, f) for files in opened for f in files]
            assert len(hashes) == 24 and set(hashes) == set(registered.values())
    finally:
        await stop_mesh(mesh)


async def test_example_human_objects_in_one_per_object_table(tmp_path: Path, shared_data: Path) -> None:
    """The CellProfiler team's ExampleHuman site (289 nuclei and cells, 22 PH3
    objects, three channels): one Per_Object table joined by object number,
    as ExportToDatabase's single object table has it."""
    folder = shared_data / "example_human"
    mesh = await start_mesh(options(tmp_path, workers=1))
    try:
        async with mesh.channel() as channel, ObjectStore(mesh.s3) as store:
            catalog = catalog_stub(channel)
            pipeline = await catalog.RegisterPipeline(
                catalog_pb2.RegisterPipelineRequest(
                    name="ExampleHuman", content=(folder / "ExampleHuman.cppipe").read_bytes()
                )
            )
            channels = ["DNA", "PH3", "cellbody"]
            await catalog.CreatePlate(
                catalog_pb2.CreatePlateRequest(
                    name="AS_09125",
                    channels=channels,
                    pipeline_sha256=pipeline.pipeline.ref.sha256,
                    layout=catalog_pb2.PlateLayout(wells=["D03"], rows=8, columns=12, sites_per_well=1),
                )
            )
            regs, shas = [], {}
            for channel_index, name in enumerate(channels):
                path = folder / "images" / f"AS_09125_050116030001_D03f00d{channel_index}.tif"
                stored = await store.put_file(f"images/AS_09125/D03/s0/{name}/{path.name}", path)
                shas[name] = stored.sha256
                regs.append(
                    catalog_pb2.ImageRegistration(
                        site=types_pb2.SiteRef(plate="AS_09125", well="D03", site=0),
                        channel=name,
                        object=types_pb2.ObjectRef(key=stored.key, size=stored.size, sha256=stored.sha256),
                        file_name=path.name,
                    )
                )
            await catalog.RegisterImages(catalog_pb2.RegisterImagesRequest(images=regs))
            await wait_complete(catalog, "AS_09125", timeout=300, mesh=mesh)
            report = (
                await catalog.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate="AS_09125"))
            ).report
            pair = tmp_path / "pair"
            pair.mkdir()
            for f in report.files:
                if f.name in (cpa_names.DATABASE, cpa_names.PROPERTIES):
                    (pair / f.name).write_bytes(await store.get_bytes(f.object.key, f.object.sha256))
            await asyncio.to_thread(allow_anonymous_reads, mesh.s3)
            props = await asyncio.to_thread(cpa_reader.load, pair / cpa_names.PROPERTIES)
            assert props.get("plate_type") == "96" and props.list("image_names") == channels
            db = cpa_reader.connect(props)
            assert db.execute("SELECT ImageNumber, Image_Metadata_Well FROM Per_Image").fetchall() == [
                (1, "D03")
            ]
            located = {
                obj: db.execute(
                    f"SELECT COUNT(*) FROM Per_Object WHERE {obj}_Location_Center_X IS NOT NULL"
                ).fetchone()[0]
                for obj in ("Nuclei", "Cells", "PH3")
            }
            assert located == {"Nuclei": 289, "Cells": 289, "PH3": 22}
            assert db.execute("SELECT MAX(ObjectNumber), COUNT(*) FROM Per_Object").fetchone() == (289, 289)
            paths = cpa_reader.image_paths(db, props, 1)
            db.close()
            for name, path in zip(channels, paths, strict=True):
                opened = await asyncio.to_thread(cpa_reader.open_image, props, path)
                assert await asyncio.to_thread(sha256_file, opened) == shas[name]
    finally:
        await stop_mesh(mesh)
