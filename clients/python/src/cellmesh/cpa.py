"""The CellProfiler Analyst pair of a plate report: names and the rewriting
of its properties file for a copy whose images are elsewhere.

The reducer writes ``cpa.sqlite`` (Per_Image, Per_Object) and
``cpa.properties`` into every report (``services/reducer/cpa.py``). Per_Image
gives each channel's image as a path (``images/<plate>/<well>/s<site>/<channel>``,
the object key without its last part) and a file name; CellProfiler Analyst
opens ``image_url_prepend + path + "/" + file``, so the same database serves
a copy whose prepend is the object store's URL of the bucket (``store_url``,
for a bucket that serves reads without a signature) or a local folder the
images were downloaded into (``folder_url``). For a bucket that needs signed requests (the usual case),
``write_presigned`` writes each image's presigned URL into a copy's rows
instead (path and file columns, the file column ending in the signature's
query), which ``cellmesh report --out`` does unless asked for the images.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from urllib.parse import quote, urlsplit

DATABASE = "cpa.sqlite"
PROPERTIES = "cpa.properties"
#: The longest a presigned URL can be valid (SigV4: 7 days).
MAX_PRESIGN_S = 604800


def store_url(endpoint_url: str | None, bucket: str, region: str = "us-east-1") -> str:
    """The URL under which an object store serves `bucket`'s keys (path style
    at an endpoint, virtual-host style on AWS), ending in ``/``."""
    if endpoint_url:
        return f"{endpoint_url.rstrip('/')}/{quote(bucket)}/"
    return f"https://{bucket}.s3.{region}.amazonaws.com/"


def folder_url(folder: Path) -> str:
    """A ``file://`` prepend for images under `folder` (keys as paths below it)."""
    return folder.resolve().as_uri().rstrip("/") + "/"


def rewrite_prepend(text: str, prepend: str) -> str:
    """A properties file's text with ``image_url_prepend`` set to `prepend`."""
    out: list[str] = []
    found = False
    for line in text.split("\n"):
        name, sep, _ = line.partition("=")
        if sep and not line.strip().startswith("#") and name.strip() == "image_url_prepend":
            line = f"image_url_prepend = {prepend}"
            found = True
        out.append(line)
    if not found:
        out.append(f"image_url_prepend = {prepend}")
    return "\n".join(out)


def set_prepend(properties: Path, prepend: str) -> None:
    """Rewrites a properties file's ``image_url_prepend`` in place."""
    properties.write_text(rewrite_prepend(properties.read_text(), prepend))


def image_columns(text: str) -> list[tuple[str, str]]:
    """(path column, file column) per channel, from a properties file's text."""
    found: dict[str, list[str]] = {}
    for line in text.split("\n"):
        name, sep, value = line.partition("=")
        if sep and not line.strip().startswith("#"):
            found[name.strip()] = [v.strip() for v in value.split(",") if v.strip()]
    return list(zip(found.get("image_path_cols", []), found.get("image_file_cols", []), strict=True))


def stored_images(database: Path, columns: list[tuple[str, str]]) -> list[tuple[int, int, str]]:
    """(ImageNumber, channel index, object key) of every image a database names."""
    out: list[tuple[int, int, str]] = []
    with contextlib.closing(sqlite3.connect(database)) as db:
        for i, (path_col, file_col) in enumerate(columns):
            query = f'SELECT ImageNumber, "{path_col}", "{file_col}" FROM Per_Image'
            for number, path, file in db.execute(query):
                if path is not None and file is not None:
                    out.append((int(number), i, f"{path}/{file}"))
    return out


def write_presigned(database: Path, columns: list[tuple[str, str]], urls: dict[tuple[int, int], str]) -> str:
    """Writes presigned URLs into a database copy's path and file columns
    (``prepend + path + "/" + file`` is the URL); returns the prepend."""
    prepend = ""
    rows: list[list[tuple[str, str, int]]] = [[] for _ in columns]
    for (number, i), url in urls.items():
        parts = urlsplit(url)
        base = f"{parts.scheme}://{parts.netloc}/"
        if prepend and base != prepend:
            raise ValueError(f"presigned URLs under two hosts: {prepend} and {base}")
        prepend = base
        path, _, name = parts.path.removeprefix("/").rpartition("/")
        rows[i].append((path, f"{name}?{parts.query}" if parts.query else name, number))
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        for (path_col, file_col), values in zip(columns, rows, strict=True):
            db.executemany(
                f'UPDATE Per_Image SET "{path_col}" = ?, "{file_col}" = ? WHERE ImageNumber = ?', values
            )
    return prepend
