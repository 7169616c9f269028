"""Ingest of the shared real images into the project's S3 server, registered
with the fake catalog on a real gRPC server."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session
from cellmesh.client import CellmeshClient, CellmeshError, ObjectStore, ObjectStoreConfig
from cellmesh.ingest import FileNameParser, Ingester, IngestSummary, StabilityTracker

from tests.client.fake_catalog import ServerThread

BBBC013 = r"Channel(?P<Channel>\d)-(?P<ImageNumber>\d+)-(?P<WellRow>[A-P])-(?P<WellColumn>\d+)\.tif"
BBBC013_MAP = {"1": "GFP", "2": "DNA"}
HUMAN = r"_(?P<Well>[A-P]\d{2})f(?P<Site>\d{2})d(?P<Channel>\d)\.tif$"
HUMAN_README = (
    r"^(?P<Prefix>AS_\d+)_(?P<Plate>\d+)_(?P<Well>[A-P]\d{2})f(?P<Site>\d{2})d(?P<Channel>\d)\.tif$"
)
HUMAN_MAP = {"0": "DNA", "1": "PH3", "2": "cellbody"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def ingest(
    mesh: ServerThread, config: ObjectStoreConfig, folder: Path, parser: FileNameParser, **kw: Any
) -> IngestSummary:
    async with CellmeshClient(mesh.address) as client, ObjectStore(config) as store:
        return await Ingester(client, store, parser, progress=False, **kw).run_once(folder)


async def stored_objects(config: ObjectStoreConfig) -> dict[str, dict[str, Any]]:
    """Every object in the bucket with its metadata, read straight from S3."""
    out: dict[str, dict[str, Any]] = {}
    async with get_session().create_client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region,
        aws_access_key_id=config.access_key,
        aws_secret_access_key=config.secret_key,
    ) as s3:
        listing = await s3.list_objects_v2(Bucket=config.bucket)
        for item in listing.get("Contents", []):
            head = await s3.head_object(Bucket=config.bucket, Key=item["Key"])
            body = await s3.get_object(Bucket=config.bucket, Key=item["Key"])
            async with body["Body"] as stream:
                data = await stream.read()
            out[item["Key"]] = {
                "size": item["Size"],
                "last_modified": item["LastModified"],
                "meta_sha256": head["Metadata"].get("sha256"),
                "sha256": hashlib.sha256(data).hexdigest(),
                "content_type": head["ContentType"],
            }
    return out


@pytest.fixture
def count_puts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys every upload of the client writes, in order."""
    keys: list[str] = []
    original = ObjectStore.upload_bytes

    async def counting(self: ObjectStore, key: str, data: bytes, content_type: str = "") -> Any:
        keys.append(key)
        return await original(self, key, data, content_type or "application/octet-stream")

    monkeypatch.setattr(ObjectStore, "upload_bytes", counting)
    return keys


async def test_example_human(
    mesh: ServerThread, store_config: ObjectStoreConfig, shared_data: Path, count_puts: list[str]
) -> None:
    folder = shared_data / "example_human" / "images"
    mesh.catalog.add_plate("human", ["DNA", "PH3", "cellbody"])
    parser = FileNameParser(HUMAN, plate="human", channel_map=HUMAN_MAP)

    summary = await ingest(mesh, store_config, folder, parser)

    assert (summary.uploaded, summary.created, summary.sites_ready, summary.unmatched) == (3, 3, 1, [])
    images = mesh.catalog.registered("human")
    assert [(i.site.well, i.site.site, i.channel, i.file_name) for i in images] == [
        ("D03", 0, "DNA", "AS_09125_050116030001_D03f00d0.tif"),
        ("D03", 0, "PH3", "AS_09125_050116030001_D03f00d1.tif"),
        ("D03", 0, "cellbody", "AS_09125_050116030001_D03f00d2.tif"),
    ]
    objects = await stored_objects(store_config)
    assert sorted(objects) == [f"images/human/D03/s0/{i.channel}/{i.file_name}" for i in images]
    for image in images:
        local = sha256(folder / image.file_name)
        stored = objects[image.object.key]
        assert image.object.sha256 == stored["sha256"] == stored["meta_sha256"] == local
        assert image.object.size == stored["size"] == (folder / image.file_name).stat().st_size
        assert stored["content_type"] == "image/tiff"

    again = await ingest(mesh, store_config, folder, parser)
    assert (again.uploaded, again.already_registered, again.created) == (0, 3, 0)
    assert len(count_puts) == 3  # only the first run's


async def test_plate_from_the_file_name(
    mesh: ServerThread, store_config: ObjectStoreConfig, shared_data: Path
) -> None:
    mesh.catalog.add_plate("050116030001", ["DNA", "PH3", "cellbody"])
    parser = FileNameParser(HUMAN_README, channel_map=HUMAN_MAP)
    summary = await ingest(mesh, store_config, shared_data / "example_human" / "images", parser)
    assert summary.created == 3
    assert {i.object.key.split("/")[1] for i in mesh.catalog.registered("050116030001")} == {"050116030001"}


async def test_bbbc013_plate_and_a_rerun_that_uploads_nothing(
    mesh: ServerThread, store_config: ObjectStoreConfig, shared_data: Path, count_puts: list[str]
) -> None:
    folder = shared_data / "bbbc013_translocation_plate" / "images"
    mesh.catalog.add_plate("sbs", ["GFP", "DNA"])
    parser = FileNameParser(BBBC013, plate="sbs", channel_map=BBBC013_MAP)

    summary = await ingest(mesh, store_config, folder, parser, batch_size=40)

    assert (summary.uploaded, summary.created, summary.sites_ready) == (96, 96, 48)
    assert sorted(u.path.name for u in summary.unmatched) == [
        "1049_Metadata.csv",
        "Channel1ILLUM.mat",
        "Channel2ILLUM.mat",
    ]
    assert all(u.reason == "does not match the pattern" for u in summary.unmatched)
    assert [len(c) for c in mesh.catalog.register_calls] == [40, 40, 16]

    images = mesh.catalog.registered("sbs")
    assert len(images) == 96 and len({i.site.well for i in images}) == 48
    name = re.compile(r"Channel(\d)-\d+-([A-D])-(\d\d)\.tif")
    for image in images:
        m = name.fullmatch(image.file_name)
        assert m is not None
        assert image.site.well == m.group(2) + m.group(3)
        assert image.site.site == 0
        assert image.channel == BBBC013_MAP[m.group(1)]
        assert image.object.key == f"images/sbs/{image.site.well}/s0/{image.channel}/{image.file_name}"
        assert image.object.sha256 == sha256(folder / image.file_name)
    before = await stored_objects(store_config)
    assert set(before) == {i.object.key for i in images}
    assert all(o["meta_sha256"] == o["sha256"] for o in before.values())
    calls = len(mesh.catalog.register_calls)

    await asyncio.sleep(1.1)  # S3 times have one-second resolution: a new PUT would show
    again = await ingest(mesh, store_config, folder, parser)

    assert (again.uploaded, again.already_registered, again.created, again.sites_ready) == (0, 96, 0, 0)
    assert len(again.unmatched) == 3  # still reported
    assert len(count_puts) == 96
    assert len(mesh.catalog.register_calls) == calls  # not even a no-op registration
    after = await stored_objects(store_config)
    assert {k: v["last_modified"] for k, v in after.items()} == {
        k: v["last_modified"] for k, v in before.items()
    }


async def test_stored_but_not_registered_is_registered_without_uploading(
    mesh: ServerThread, store_config: ObjectStoreConfig, shared_data: Path, count_puts: list[str]
) -> None:
    folder = shared_data / "example_human" / "images"
    mesh.catalog.add_plate("human", ["DNA", "PH3", "cellbody"])
    parser = FileNameParser(HUMAN, plate="human", channel_map=HUMAN_MAP)
    await ingest(mesh, store_config, folder, parser)
    mesh.catalog.images.clear()  # e.g. the first run was stopped between upload and registration

    again = await ingest(mesh, store_config, folder, parser)

    assert (again.uploaded, again.already_stored, again.created, again.sites_ready) == (0, 3, 3, 1)
    assert len(count_puts) == 3


async def test_other_content_for_a_registered_site_is_a_conflict_unless_replaced(
    mesh: ServerThread, store_config: ObjectStoreConfig, shared_data: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "images"
    shutil.copytree(shared_data / "example_human" / "images", folder)
    mesh.catalog.add_plate("human", ["DNA", "PH3", "cellbody"])
    parser = FileNameParser(HUMAN, plate="human", channel_map=HUMAN_MAP)
    await ingest(mesh, store_config, folder, parser)
    changed = folder / "AS_09125_050116030001_D03f00d1.tif"
    changed.write_bytes(changed.read_bytes() + b"\0")

    conflict = await ingest(mesh, store_config, folder, parser)
    assert (conflict.uploaded, conflict.created, conflict.replaced) == (0, 0, 0)
    assert [c.path for c in conflict.conflicts] == [changed]
    assert mesh.catalog.images[("human", "D03", 0, "PH3")].object.sha256 != sha256(changed)

    replaced = await ingest(mesh, store_config, folder, parser, replace=True)
    assert (replaced.uploaded, replaced.replaced, replaced.already_registered) == (1, 1, 2)
    assert mesh.catalog.images[("human", "D03", 0, "PH3")].object.sha256 == sha256(changed)
    objects = await stored_objects(store_config)
    assert objects[f"images/human/D03/s0/PH3/{changed.name}"]["sha256"] == sha256(changed)


async def test_channels_the_plate_does_not_have_are_reported(
    mesh: ServerThread, store_config: ObjectStoreConfig, shared_data: Path
) -> None:
    mesh.catalog.add_plate("gfp-only", ["GFP"])
    parser = FileNameParser(BBBC013, plate="gfp-only", channel_map=BBBC013_MAP)
    summary = await ingest(mesh, store_config, shared_data / "bbbc013_translocation_plate" / "images", parser)
    assert summary.created == 48
    dna = [u for u in summary.unmatched if u.path.name.startswith("Channel2-")]
    assert len(dna) == 48
    assert dna[0].reason == "channel 'DNA' is not one of plate gfp-only's (GFP)"


async def test_unknown_plate_is_not_found(
    mesh: ServerThread, store_config: ObjectStoreConfig, shared_data: Path
) -> None:
    parser = FileNameParser(HUMAN, plate="nope", channel_map=HUMAN_MAP)
    with pytest.raises(CellmeshError) as caught:
        await ingest(mesh, store_config, shared_data / "example_human" / "images", parser)
    assert caught.value.code.name == "NOT_FOUND"
    assert caught.value.message == "plate nope does not exist"
    assert await stored_objects(store_config) == {}


async def test_watching_takes_files_once_they_stop_growing(
    mesh: ServerThread, store_config: ObjectStoreConfig, shared_data: Path, tmp_path: Path
) -> None:
    source = shared_data / "example_human" / "images"
    names = sorted(p.name for p in source.iterdir())
    folder = tmp_path / "microscope"
    folder.mkdir()
    mesh.catalog.add_plate("human", ["DNA", "PH3", "cellbody"])
    parser = FileNameParser(HUMAN, plate="human", channel_map=HUMAN_MAP)
    async with CellmeshClient(mesh.address) as client, ObjectStore(store_config) as store:
        ingester = Ingester(client, store, parser, progress=False)
        tracker = StabilityTracker()

        # a scan by scan account: two complete files, one being written
        shutil.copy(source / names[0], folder)
        shutil.copy(source / names[1], folder)
        growing = folder / names[2]
        data = (source / names[2]).read_bytes()
        growing.write_bytes(data[:1000])
        first = await ingester.run_once(folder, tracker)
        assert (first.uploaded, first.not_ready) == (0, 3)  # nothing seen twice yet
        with growing.open("ab") as fh:
            fh.write(data[1000:5000])
        second = await ingester.run_once(folder, tracker)
        assert (second.uploaded, second.created, second.not_ready, second.sites_ready) == (2, 2, 1, 0)
        with growing.open("ab") as fh:
            fh.write(data[5000:])
        third = await ingester.run_once(folder, tracker)
        assert (third.uploaded, third.not_ready) == (0, 1)  # it grew again
        fourth = await ingester.run_once(folder, tracker)
        assert (fourth.uploaded, fourth.created, fourth.sites_ready) == (1, 1, 1)
        fifth = await ingester.run_once(folder, tracker)
        assert (fifth.images, fifth.uploaded, fifth.not_ready) == (
            0,
            0,
            0,
        )  # handled files are not read again

    assert mesh.catalog.images[("human", "D03", 0, "cellbody")].object.sha256 == sha256(source / names[2])


async def test_watch_loop_until_stopped(
    mesh: ServerThread, store_config: ObjectStoreConfig, shared_data: Path, tmp_path: Path
) -> None:
    source = shared_data / "bbbc013_translocation_plate" / "images"
    folder = tmp_path / "microscope"
    folder.mkdir()
    mesh.catalog.add_plate("sbs", ["GFP", "DNA"])
    parser = FileNameParser(BBBC013, plate="sbs", channel_map=BBBC013_MAP)
    passes: list[IngestSummary] = []
    stop = asyncio.Event()
    async with CellmeshClient(mesh.address) as client, ObjectStore(store_config) as store:
        ingester = Ingester(client, store, parser, progress=False)
        watching = asyncio.create_task(ingester.watch(folder, 0.05, stop, passes.append))
        for name in ("Channel1-01-A-01.tif", "Channel2-01-A-01.tif", "Channel1-02-A-02.tif", "notes.txt"):
            await asyncio.sleep(0.1)
            shutil.copy(source / name if name != "notes.txt" else source / "1049_Metadata.csv", folder / name)
        for _ in range(100):
            if len(mesh.catalog.images) == 3 and any(p.unmatched for p in passes):
                break
            await asyncio.sleep(0.05)
        stop.set()
        total = await asyncio.wait_for(watching, 10)

    assert (total.uploaded, total.created, total.sites_ready) == (3, 3, 1)
    assert [u.path.name for u in total.unmatched] == ["notes.txt"]  # reported once, not at every scan
    assert len(passes) > 3
