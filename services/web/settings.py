"""The web service's settings, read once from the environment."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common.auth import MeshAuth
from services.common.settings import (
    COMMON_VARS,
    S3_VARS,
    S3Settings,
    Var,
    load,
    port,
    positive_float,
    positive_int,
)

VARS = (
    *COMMON_VARS,
    *S3_VARS,
    Var("GRPC_PORT", "50056", port, "the port of the service's gRPC health"),
    Var("HTTP_HOST", "0.0.0.0", help="the address the page is served on"),
    Var("HTTP_PORT", "8080", port, "the port the page is served on"),
    Var("CATALOG_ADDR", "127.0.0.1:50051", help="host:port of the catalog"),
    Var("REDUCER_ADDR", "", help="host:port of the reducer (empty: no 'reduce now')"),
    Var(
        "S3_PUBLIC_ENDPOINT_URL",
        "",
        help="the object store's address as browsers reach it, for download links (empty: S3_ENDPOINT_URL)",
    ),
    Var("PRESIGN_SECONDS", "3600", positive_int, "how long a download link is valid"),
    Var("THUMBNAIL_PX", "256", positive_int, "the longer side of a thumbnail, in pixels"),
    Var("CACHE_DIR", str(Path(tempfile.gettempdir()) / "cellmesh-web"), help="thumbnails and tables kept"),
    Var("MAX_UPLOAD_MB", "512", positive_int, "the largest upload the page takes, in MB"),
    Var("CALL_TIMEOUT_S", "60", positive_float, "seconds each catalog call may take"),
)


@dataclass(frozen=True)
class WebSettings:
    """Everything the web service needs, from the environment."""

    log_level: str
    grpc_host: str
    grpc_port: int
    grace_seconds: float
    http_host: str
    http_port: int
    catalog_addr: str
    reducer_addr: str
    s3: S3Settings
    s3_public_endpoint_url: str
    presign_seconds: int
    thumbnail_px: int
    cache_dir: Path
    max_upload_bytes: int
    call_timeout: float
    # The web service's certificate (role `web`: reads), None with AUTH=off.
    auth: MeshAuth | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WebSettings:
        v = load(VARS, env)
        s3 = S3Settings.from_env(env)
        return cls(
            log_level=v["LOG_LEVEL"],
            grpc_host=v["GRPC_HOST"],
            grpc_port=v["GRPC_PORT"],
            grace_seconds=v["GRACE_SECONDS"],
            http_host=v["HTTP_HOST"],
            http_port=v["HTTP_PORT"],
            catalog_addr=v["CATALOG_ADDR"],
            reducer_addr=v["REDUCER_ADDR"],
            s3=s3,
            s3_public_endpoint_url=v["S3_PUBLIC_ENDPOINT_URL"] or (s3.endpoint_url or ""),
            presign_seconds=v["PRESIGN_SECONDS"],
            thumbnail_px=v["THUMBNAIL_PX"],
            cache_dir=Path(v["CACHE_DIR"]),
            max_upload_bytes=v["MAX_UPLOAD_MB"] * 1024 * 1024,
            auth=MeshAuth.from_settings(v),
            call_timeout=v["CALL_TIMEOUT_S"],
        )
