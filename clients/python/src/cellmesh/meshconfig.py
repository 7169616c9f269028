"""Where the mesh is, when nothing on the command line or in the environment
says it: the file `cellmesh up` writes.

Lookup order, for each setting: a command-line flag (`--catalog`,
`--reducer`), then the environment (`CELLMESH_CATALOG`, `CELLMESH_REDUCER`;
the object store as a whole from `S3_ENDPOINT_URL`, `S3_BUCKET`,
`AWS_ACCESS_KEY_ID`... as soon as one of them is set), then this file, then
the built-in defaults. The file is `CELLMESH_CONFIG` if set, else
`$XDG_CONFIG_HOME/cellmesh/mesh.json` (`~/.config/cellmesh/mesh.json`).

Its content (JSON, readable by its owner only since it holds the object
store's keys)::

    {"catalog": "127.0.0.1:40123", "reducer": "127.0.0.1:40127",
     "s3": {"endpoint_url": "http://127.0.0.1:40119", "bucket": "cellmesh",
            "region": "us-east-1", "access_key_id": "...", "secret_access_key": "..."},
     "ca": ".../pki/ca.pem", "cert": ".../pki/operator.pem", "key": ".../pki/operator.key",
     "state_dir": "/home/me/.local/share/cellmesh", "pid": 12345}

`ca`, `cert` and `key` are the mesh's CA and the user's certificate (the
operator's: who ran `cellmesh up` runs the mesh); `CELLMESH_CA`,
`CELLMESH_CERT`, `CELLMESH_KEY`, `CELLMESH_TOKEN` override them
(`cellmesh.auth`). A mesh run with AUTH=off has none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellmesh.auth import Credentials

__all__ = ["MeshConfig", "MeshConfigError", "config_path", "load"]

#: Environment variables that, when any is set, make the object store come
#: from the environment alone (never half from the file, half from the environment).
S3_ENV_NAMES = ("S3_ENDPOINT_URL", "S3_BUCKET", "S3_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class MeshConfigError(ValueError):
    """The file exists but cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class MeshConfig:
    """A running local mesh, as `cellmesh up` recorded it."""

    path: Path
    catalog: str = ""
    reducer: str = ""
    s3: Mapping[str, str] = field(default_factory=dict)
    state_dir: str = ""
    pid: int = 0
    ca: str = ""
    cert: str = ""
    key: str = ""

    @classmethod
    def from_json(cls, path: Path, data: Any) -> MeshConfig:
        if not isinstance(data, dict):
            raise MeshConfigError(f"{path}: not a JSON object; remove it or run `cellmesh up` again")
        s3 = data.get("s3") or {}
        if not isinstance(s3, dict):
            raise MeshConfigError(f"{path}: 's3' is not an object; remove it or run `cellmesh up` again")
        try:
            pid = int(data.get("pid") or 0)
        except (TypeError, ValueError):
            raise MeshConfigError(f"{path}: 'pid' is not a number") from None
        return cls(
            path=path,
            catalog=str(data.get("catalog") or ""),
            reducer=str(data.get("reducer") or ""),
            s3={str(k): str(v) for k, v in s3.items() if v is not None},
            state_dir=str(data.get("state_dir") or ""),
            pid=pid,
            ca=str(data.get("ca") or ""),
            cert=str(data.get("cert") or ""),
            key=str(data.get("key") or ""),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "catalog": self.catalog,
            "reducer": self.reducer,
            "s3": dict(self.s3),
            "state_dir": self.state_dir,
            "pid": self.pid,
            **({"ca": self.ca, "cert": self.cert, "key": self.key} if self.ca else {}),
        }

    def s3_env(self) -> dict[str, str]:
        """The object store as the environment variables the client and services read."""
        names = {
            "endpoint_url": "S3_ENDPOINT_URL",
            "bucket": "S3_BUCKET",
            "region": "S3_REGION",
            "access_key_id": "AWS_ACCESS_KEY_ID",
            "secret_access_key": "AWS_SECRET_ACCESS_KEY",
        }
        return {env: self.s3[key] for key, env in names.items() if self.s3.get(key)}

    def credentials(self) -> Credentials | None:
        """The mesh's CA and the user's certificate, None when the mesh runs
        without TLS; MeshConfigError when a file it names cannot be read."""
        if not self.ca:
            return None
        try:
            return Credentials.from_files(self.ca, self.cert or None, self.key or None)
        except OSError as exc:
            raise MeshConfigError(
                f"{self.path}: cannot read {exc.filename} ({exc.strerror}); run `cellmesh up` again"
            ) from None

    def write(self) -> None:
        """Writes the file (mode 0600: it holds the object store's keys), atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_json(), fh, indent=2)
            fh.write("\n")
        os.replace(tmp, self.path)


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """`CELLMESH_CONFIG`, else `$XDG_CONFIG_HOME/cellmesh/mesh.json`, else
    `~/.config/cellmesh/mesh.json`."""
    env = os.environ if env is None else env
    if env.get("CELLMESH_CONFIG"):
        return Path(env["CELLMESH_CONFIG"]).expanduser()
    base = Path(env["XDG_CONFIG_HOME"]).expanduser() if env.get("XDG_CONFIG_HOME") else None
    if base is None:
        home = env.get("HOME") or str(Path.home())
        base = Path(home) / ".config"
    return base / "cellmesh" / "mesh.json"


def load(env: Mapping[str, str] | None = None) -> MeshConfig | None:
    """The file's settings, or None when there is no file."""
    path = config_path(env)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MeshConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MeshConfigError(
            f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); remove it or run `cellmesh up` again"
        ) from None
    return MeshConfig.from_json(path, data)


def s3_from_environment(env: Mapping[str, str]) -> bool:
    """True when the environment says where the object store is."""
    return any(env.get(name) for name in S3_ENV_NAMES)
