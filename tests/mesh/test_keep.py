"""Keeping the built-in object store's files across down and up, on the
project's real S3 server."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

from services.common.s3 import ObjectStore, sha256_bytes
from services.common.settings import S3Settings
from services.mesh import keep


async def test_save_then_restore_into_an_empty_store(tmp_path: Path, s3_settings: S3Settings) -> None:
    objects = {
        "images/P1/A01/s0/DNA/a.tif": b"\x49\x49\x2a\x00" + bytes(range(256)) * 40,
        "results/P1/A01/s0/a1-x/Image.csv": b"ImageNumber,Count_Nuclei\n1,12\n",
        "reports/P1/g1/summary.json": b"{}",
    }
    async with ObjectStore(s3_settings) as store:
        await store.ensure_bucket()
        for key, data in objects.items():
            await store.put_bytes(key, data)
        assert await keep.save(store, tmp_path) == (3, 3)
        # A second save copies nothing it holds already; a deleted object's file goes.
        await store.delete("reports/P1/g1/summary.json")
        assert await keep.save(store, tmp_path) == (2, 0)
    assert not (tmp_path / "objects" / "reports" / "P1" / "g1" / "summary.json").exists()
    index = json.loads((tmp_path / "objects.json").read_text())
    assert index["results/P1/A01/s0/a1-x/Image.csv"]["sha256"] == sha256_bytes(
        objects["results/P1/A01/s0/a1-x/Image.csv"]
    )

    fresh = dataclasses.replace(s3_settings, bucket=f"t-{uuid.uuid4().hex[:12]}")
    async with ObjectStore(fresh) as store:
        await store.ensure_bucket()
        assert await keep.restore(store, tmp_path) == 2
        for key in ("images/P1/A01/s0/DNA/a.tif", "results/P1/A01/s0/a1-x/Image.csv"):
            head = await store.head(key)
            assert head.sha256 == sha256_bytes(objects[key]) and head.size == len(objects[key])
            assert await store.get_bytes(key, head.sha256) == objects[key]


async def test_a_damaged_file_is_left_out(tmp_path: Path, s3_settings: S3Settings) -> None:
    async with ObjectStore(s3_settings) as store:
        await store.ensure_bucket()
        await store.put_bytes("images/P1/A01/s0/DNA/a.tif", b"good bytes")
        await store.put_bytes("images/P1/A01/s0/GFP/b.tif", b"other bytes")
        await keep.save(store, tmp_path)
    (tmp_path / "objects" / "images" / "P1" / "A01" / "s0" / "DNA" / "a.tif").write_bytes(b"bad bytes!")
    fresh = dataclasses.replace(s3_settings, bucket=f"t-{uuid.uuid4().hex[:12]}")
    async with ObjectStore(fresh) as store:
        await store.ensure_bucket()
        assert await keep.restore(store, tmp_path) == 1
        keys = [o.key async for o in store.list_keys("")]
    assert keys == ["images/P1/A01/s0/GFP/b.tif"]


def test_keys_that_are_not_plain_paths_stay_inside(tmp_path: Path) -> None:
    assert keep._path(tmp_path, "images/a.tif") == tmp_path / "objects" / "images" / "a.tif"
    for key in ("../etc/passwd", "/abs", "a//b", "a/./b", ""):
        assert keep._path(tmp_path, key) is None
