"""The built-in object store's files kept across `cellmesh down` and `up`.

The project's S3 server (moto) holds everything in memory. When the local
mesh stops, after every service but the S3 server has stopped (nothing writes
any more), the supervisor copies the bucket's objects to
`STATE_DIR/objects/<key>` with an index of sizes and SHA-256s
(`objects.json`); the next `up` puts them back before the catalog starts.
Objects are written once and never changed (docs/architecture.md), so a save
copies only objects it does not hold yet and drops the files of objects that
are gone (the catalog's sweep deletes unregistered results).
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import os
from pathlib import Path
from typing import Any

from services.common.s3 import ObjectStore, sha256_bytes

log = logging.getLogger(__name__)

OBJECTS = "objects"
INDEX = "objects.json"


def _path(folder: Path, key: str) -> Path | None:
    """Where `key` is kept, or None for a key that is not a plain relative path."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return None
    return folder / OBJECTS / Path(*parts)


def read_index(folder: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def save(store: ObjectStore, folder: Path) -> tuple[int, int]:
    """Copies the bucket to `folder`; returns (objects kept, objects copied now)."""
    index = read_index(folder)
    kept: dict[str, dict[str, Any]] = {}
    copied = 0
    async for obj in store.list_keys(""):
        path = _path(folder, obj.key)
        if path is None:
            log.warning("not kept: object key %r is not a plain path", obj.key)
            continue
        known = index.get(obj.key)
        if known and known.get("size") == obj.size and path.is_file() and path.stat().st_size == obj.size:
            kept[obj.key] = known
            continue
        data = await store.get_bytes(obj.key)
        await asyncio.to_thread(_write, path, data)
        kept[obj.key] = {"size": len(data), "sha256": sha256_bytes(data)}
        copied += 1
    for key in set(index) - set(kept):
        path = _path(folder, key)
        if path is not None:
            path.unlink(missing_ok=True)
    await asyncio.to_thread(_write, folder / INDEX, json.dumps(kept, indent=0).encode())
    return len(kept), copied


async def restore(store: ObjectStore, folder: Path) -> int:
    """Puts every kept object back into the (empty) bucket; returns how many.
    A file whose bytes no longer match its SHA-256 is left out and logged."""
    restored = 0
    for key, entry in read_index(folder).items():
        path = _path(folder, key)
        if path is None:
            continue
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            log.error("kept object %s cannot be read (%s): left out", key, exc.strerror)
            continue
        if sha256_bytes(data) != entry.get("sha256"):
            log.error("kept object %s does not match its SHA-256 any more: left out", key)
            continue
        await store.put_bytes(key, data, mimetypes.guess_type(key)[0] or "application/octet-stream")
        restored += 1
    return restored
