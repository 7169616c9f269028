"""A site's input files (pipeline attachments) on the worker: fetched once per
worker by checksum from the project's S3 server, placed in the run's Default
Input Folder, checked before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from services.common.s3 import ChecksumMismatch, ObjectStore, sha256_bytes
from services.common.settings import S3Settings
from services.cpworker.site import InputFileCache, input_file_problem


def item(name: str, data: bytes, sha: str | None = None) -> catalog_pb2.InputFile:
    digest = sha or sha256_bytes(data)
    return catalog_pb2.InputFile(
        name=name,
        object=types_pb2.ObjectRef(key=f"attachments/{sha256_bytes(data)}", size=len(data), sha256=digest),
    )


async def test_input_files_are_fetched_once_and_checked(s3_settings: S3Settings, tmp_path: Path) -> None:
    data = b"Well,Treatment\nA01,DMSO\n"
    async with ObjectStore(s3_settings) as store:
        await store.ensure_bucket()
        await store.put_bytes(f"attachments/{sha256_bytes(data)}", data, if_absent=True)
        cache = InputFileCache(store, tmp_path / "cache")
        first = await cache.place(item("maps/plate_map.csv", data), tmp_path / "run1")
        assert first == tmp_path / "run1" / "maps" / "plate_map.csv" and first.read_bytes() == data
        await store.delete(f"attachments/{sha256_bytes(data)}")
        second = await cache.place(item("plate_map.csv", data), tmp_path / "run2")  # from the cache
        assert second.read_bytes() == data
        assert second.stat().st_ino == (tmp_path / "cache" / sha256_bytes(data)).stat().st_ino  # a hard link

        other = b"other bytes"
        await store.put_bytes(f"attachments/{sha256_bytes(other)}", other, if_absent=True)
        with pytest.raises(ChecksumMismatch):
            await cache.place(item("x.csv", other, sha="0" * 64), tmp_path / "run3")
        assert not (tmp_path / "cache" / ("0" * 64)).exists()


def test_input_file_names_are_checked_against_the_site() -> None:
    claim = catalog_pb2.SiteClaim(input_files=[item("plate_map.csv", b"x")])
    assert input_file_problem(claim, ["P1_A01_s0_DNA.tif"]) is None
    assert "has the name of another input" in (input_file_problem(claim, ["plate_map.csv"]) or "")
    bad = catalog_pb2.SiteClaim(input_files=[item("../escape.csv", b"x")])
    assert "must be a path relative to the Default Input Folder" in (input_file_problem(bad, []) or "")
