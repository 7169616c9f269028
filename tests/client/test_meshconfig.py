"""Where the client finds the mesh: a flag, then the environment, then the
file `cellmesh up` writes, then the defaults."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cellmesh import meshconfig
from cellmesh.cli import build_parser, main, resolve_addresses, resolve_credentials
from cellmesh.client import DEFAULT_CATALOG, DEFAULT_REDUCER, ObjectStoreConfig

from services.common.server import GrpcServer
from tests import pki as test_pki
from tests.conftest import free_port

MESH_VARS = (
    "CELLMESH_CATALOG",
    "CELLMESH_REDUCER",
    "CELLMESH_CONFIG",
    "CELLMESH_CA",
    "CELLMESH_CERT",
    "CELLMESH_KEY",
    "CELLMESH_TOKEN",
    "CELLMESH_TOKEN_FILE",
    *meshconfig.S3_ENV_NAMES,
)


def write_config(path: Path, **fields: object) -> Path:
    data = {
        "catalog": "127.0.0.1:41001",
        "reducer": "127.0.0.1:41002",
        "s3": {
            "endpoint_url": "http://127.0.0.1:41003",
            "bucket": "from-file",
            "region": "eu-west-1",
            "access_key_id": "file-key",
            "secret_access_key": "file-secret",
        },
        "state_dir": "/nowhere",
        "pid": 1,
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No mesh variable set; the config directory is a temporary one."""
    for name in MESH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "cellmesh" / "mesh.json"


def test_config_path_lookup(tmp_path: Path) -> None:
    assert meshconfig.config_path({"CELLMESH_CONFIG": str(tmp_path / "m.json")}) == tmp_path / "m.json"
    assert (
        meshconfig.config_path({"XDG_CONFIG_HOME": str(tmp_path), "HOME": "/h"})
        == tmp_path / "cellmesh" / "mesh.json"
    )
    assert meshconfig.config_path({"HOME": "/h"}) == Path("/h/.config/cellmesh/mesh.json")


def test_addresses_flag_then_environment_then_file_then_default(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def addresses(*argv: str) -> tuple[str, str, str]:
        args = build_parser().parse_args([*argv, "plate", "list"])
        used = resolve_addresses(args)
        return args.catalog, args.reducer, used

    assert addresses() == (DEFAULT_CATALOG, DEFAULT_REDUCER, "")
    write_config(clean_env)
    assert addresses() == ("127.0.0.1:41001", "127.0.0.1:41002", str(clean_env))
    monkeypatch.setenv("CELLMESH_CATALOG", "env-host:1")
    assert addresses() == ("env-host:1", "127.0.0.1:41002", "")
    assert addresses("--catalog", "flag-host:2", "--reducer", "flag-host:3") == (
        "flag-host:2",
        "flag-host:3",
        "",
    )


def test_credentials_from_the_environment_else_the_file(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("ca", "op", "op-key", "mine", "mine-key"):
        (tmp_path / name).write_bytes(name.encode())
    assert resolve_credentials() is None  # no file, nothing set: plain text
    write_config(clean_env, ca=str(tmp_path / "ca"), cert=str(tmp_path / "op"), key=str(tmp_path / "op-key"))
    from_file = resolve_credentials()
    assert from_file is not None and (from_file.ca, from_file.cert, from_file.key) == (
        b"ca",
        b"op",
        b"op-key",
    )
    monkeypatch.setenv("CELLMESH_TOKEN", "cm_x")
    with_token = resolve_credentials()
    assert with_token is not None and with_token.token == "cm_x" and with_token.cert == b"op"
    monkeypatch.setenv("CELLMESH_CA", str(tmp_path / "ca"))
    monkeypatch.setenv("CELLMESH_CERT", str(tmp_path / "mine"))
    monkeypatch.setenv("CELLMESH_KEY", str(tmp_path / "mine-key"))
    from_env = resolve_credentials()
    assert from_env is not None and (from_env.cert, from_env.token) == (b"mine", "cm_x")
    monkeypatch.setenv("CELLMESH_CERT", str(tmp_path / "gone"))
    with pytest.raises(meshconfig.MeshConfigError, match="cannot read .*gone"):
        resolve_credentials()


def test_object_store_from_the_file_unless_the_environment_names_one(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ObjectStoreConfig.discover() == ObjectStoreConfig()
    write_config(clean_env)
    assert ObjectStoreConfig.discover() == ObjectStoreConfig(
        bucket="from-file",
        endpoint_url="http://127.0.0.1:41003",
        region="eu-west-1",
        access_key="file-key",
        secret_key="file-secret",
    )
    # One variable set: the whole object store comes from the environment,
    # never the file's keys with another endpoint.
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://elsewhere:9000")
    assert ObjectStoreConfig.discover() == ObjectStoreConfig(endpoint_url="http://elsewhere:9000")


def test_config_written_for_its_owner_only(tmp_path: Path) -> None:
    config = meshconfig.MeshConfig(
        tmp_path / "sub" / "mesh.json", "a:1", "b:2", {"bucket": "x", "secret_access_key": "s"}, "/st", 7
    )
    config.write()
    assert (config.path.stat().st_mode & 0o777) == 0o600
    assert meshconfig.load({"CELLMESH_CONFIG": str(config.path)}) == config


def test_broken_file_says_which_and_what_to_do(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.parent.mkdir(parents=True)
    clean_env.write_text("{not json")
    assert main(["plate", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: FAILED_PRECONDITION: {clean_env} is not valid JSON")
    assert "run `cellmesh up` again" in err


def test_unreachable_mesh_from_the_file_points_at_it(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(clean_env, catalog=f"127.0.0.1:{free_port()}")
    assert main(["plate", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: ")
    assert f"the address comes from {clean_env}, written by `cellmesh up`" in err
    assert "`cellmesh status`" in err


def test_up_without_the_services_says_what_to_do() -> None:
    # An interpreter where the services' package cannot be imported, as on a
    # lab laptop with only the client installed.
    code = "\n".join(
        [
            "import sys",
            "sys.modules['services'] = None",
            "from cellmesh.cli import main",
            "sys.exit(main(['up']))",
        ]
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: FAILED_PRECONDITION: `cellmesh up` needs the cellmesh services")
    assert "make setup" in proc.stderr


async def test_a_mesh_with_tls_called_without_credentials_says_what_to_set(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = GrpcServer([], "127.0.0.1", 0, 1, auth=test_pki.server_auth("catalog"))
    port = await server.start()
    try:
        code = await asyncio.to_thread(main, ["--catalog", f"127.0.0.1:{port}", "plate", "list"])
    finally:
        await server.stop()
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: UNAVAILABLE:"), err
    assert "set CELLMESH_CA, CELLMESH_CERT and CELLMESH_KEY" in err
