"""`cellmesh pipeline register --attach` and the client's attachments, against
the real catalog (SQLite and MariaDB) and the project's S3 server: small files
travel in the request, big ones through the object store, once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cellmesh.cli import main
from cellmesh.client import CellmeshClient, ObjectStore, ObjectStoreConfig

from services.common.s3 import sha256_bytes
from services.common.settings import S3Settings
from tests import pki as test_pki
from tests.catalog.kit import pipeline
from tests.client.test_real_catalog import catalog_address  # noqa: F401  (the fixture)

IMPORT = (
    "Metadata",
    [
        ("Extract metadata?", "Yes"),
        ("Metadata extraction method", "Import from file"),
        ("Metadata file location", "Default Input Folder|"),
        ("Match file and image metadata", "[]"),
        ("Metadata file name", "1049_Metadata.csv"),
    ],
)


async def test_register_with_attachments(
    catalog_address: str,  # noqa: F811
    s3_settings: S3Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in (
        ("S3_ENDPOINT_URL", s3_settings.endpoint_url or ""),
        ("S3_BUCKET", s3_settings.bucket),
        ("AWS_ACCESS_KEY_ID", s3_settings.access_key),
        ("AWS_SECRET_ACCESS_KEY", s3_settings.secret_key),
    ):
        monkeypatch.setenv(name, value)
    cppipe = tmp_path / "import.cppipe"
    cppipe.write_bytes(pipeline(images=("DNA",), extra=[IMPORT]))
    csv = tmp_path / "1049_Metadata.csv"
    csv.write_text("Row,Column,SBS_Doses\nA,01,0.5\n")
    big = tmp_path / "model.bin"
    big.write_bytes(b"m" * (5 * 1024 * 1024))

    async def cellmesh(*args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, ["--catalog", catalog_address, *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = await cellmesh("pipeline", "register", str(cppipe), "--name", "import")
    assert code == 1
    assert "`Metadata` (module 6) setting 'Metadata file name' imports 1049_Metadata.csv" in err
    assert "attach it with --attach 1049_Metadata.csv" in err

    args = ["pipeline", "register", str(cppipe), "--name", "import", "--attach", str(csv)]
    code, out, err = await cellmesh(*args, "--attach", f"models/worm.bin={big}")
    assert code == 0, err
    assert "registered: pipeline import" in out
    assert f"attached  1049_Metadata.csv ({csv.stat().st_size} bytes" in out
    assert "attached  models/worm.bin (5242880 bytes" in out
    code, again, err = await cellmesh(*args, "--attach", f"models/worm.bin={big}")
    assert code == 0 and again.startswith("already registered: pipeline import")

    code, _, err = await cellmesh("pipeline", "register", str(cppipe), "--attach", str(tmp_path / "nope.csv"))
    assert code == 1 and "no such file to attach" in err

    async with CellmeshClient(catalog_address, credentials=test_pki.credentials("scientist")) as client:
        (p,) = await client.list_pipelines()
        by_name = {a.name: a.object for a in p.attachments}
        assert by_name["models/worm.bin"].key == f"attachments/{sha256_bytes(big.read_bytes())}"
        assert by_name["1049_Metadata.csv"].sha256 == sha256_bytes(csv.read_bytes())
        with pytest.raises(ValueError, match="files over 4 MiB go through the object store"):
            await client.register_pipeline(cppipe, "x", [csv, ("m.bin", big)])
        async with ObjectStore(ObjectStoreConfig.from_env()) as store:
            reply = await client.register_pipeline(
                cppipe, "x", [("1049_Metadata.csv", csv.read_bytes()), ("models/worm.bin", big)], store
            )
        assert reply.already_registered and reply.pipeline.ref.sha256 == p.ref.sha256
