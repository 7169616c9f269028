"""The CellProfiler Analyst pair of a plate report: names and the rewriting
of its properties file for a copy whose images are elsewhere.

The reducer writes ``cpa.sqlite`` (Per_Image, Per_Object) and
``cpa.properties`` into every report (``services/reducer/cpa.py``). Per_Image
gives each channel's image as a path (``images/<plate>/<well>/s<site>/<channel>``,
the object key without its last part) and a file name; CellProfiler Analyst
opens ``image_url_prepend + path + "/" + file``. So one database serves every
copy of the report: only the prepend differs, the object store's URL of the
bucket (``store_url``) or a local folder the images were downloaded into
(``folder_url``).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

DATABASE = "cpa.sqlite"
PROPERTIES = "cpa.properties"


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
