"""Object storage on aiobotocore: one client per process, checksums on every
transfer, paginated listing. Speaks to any S3 endpoint (the project's loopback
server, LocalStack, AWS)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from services.common.settings import S3Settings

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024


class ObjectStoreError(RuntimeError):
    """The object store could not be reached or refused the request (transient)."""


class ObjectMissing(LookupError):
    """The object does not exist."""


class ChecksumMismatch(ValueError):
    """The object's bytes do not match the expected SHA-256."""


class ObjectExists(RuntimeError):
    """A put that must not overwrite found another object under its key."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)


def _is_precondition_failed(exc: ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "412") or status == 412


def _is_missing(exc: ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


class ObjectStore:
    """`async with ObjectStore(settings) as store:` — one client for the process."""

    def __init__(
        self, settings: S3Settings, connect_timeout: float = 5.0, read_timeout: float = 60.0
    ) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self._config = AioConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=32,
        )
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def __aenter__(self) -> ObjectStore:
        session = get_session()
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                endpoint_url=self.settings.endpoint_url,
                region_name=self.settings.region,
                aws_access_key_id=self.settings.access_key,
                aws_secret_access_key=self.settings.secret_key,
                config=self._config,
            )
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    @contextlib.asynccontextmanager
    async def _errors(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except ClientError as exc:
            if _is_missing(exc):
                raise ObjectMissing(f"{what}: no such object in bucket {self.bucket}") from exc
            raise ObjectStoreError(f"{what}: {exc}") from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise ObjectStoreError(f"{what}: object store unreachable ({exc})") from exc

    async def ensure_bucket(self) -> None:
        async with self._errors(f"create bucket {self.bucket}"):
            try:
                await self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if not _is_missing(exc):
                    raise
            await self._client.create_bucket(Bucket=self.bucket)

    async def ping(self) -> None:
        async with self._errors("ping"):
            await self._client.head_bucket(Bucket=self.bucket)

    async def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        if_absent: bool = False,
    ) -> StoredObject:
        """Stores `data` under `key`. With `if_absent`, the put is conditional
        (If-None-Match: *, on stores that support it): an object already
        under the key is never replaced, and ObjectExists is raised unless it
        holds these very bytes (a put retried after its reply was lost)."""
        digest = sha256_bytes(data)
        condition = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            async with self._errors(f"put {key}"):
                await self._client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    ContentType=content_type,
                    Metadata={"sha256": digest},
                    **condition,
                )
        except ObjectStoreError as exc:
            cause = exc.__cause__
            if not (if_absent and isinstance(cause, ClientError) and _is_precondition_failed(cause)):
                raise
            there = await self.head(key)
            if there.sha256 != digest or there.size != len(data):
                raise ObjectExists(
                    f"put {key}: another object is stored under this key (SHA-256 {there.sha256 or 'unknown'}); "
                    "it was left as it is"
                ) from exc
        return StoredObject(key, len(data), digest)

    async def put_file(
        self,
        key: str,
        path: Path,
        content_type: str = "application/octet-stream",
        if_absent: bool = False,
    ) -> StoredObject:
        data = await asyncio.to_thread(path.read_bytes)
        return await self.put_bytes(key, data, content_type, if_absent=if_absent)

    async def head(self, key: str) -> StoredObject:
        async with self._errors(f"head {key}"):
            reply = await self._client.head_object(Bucket=self.bucket, Key=key)
        return StoredObject(key, int(reply["ContentLength"]), reply.get("Metadata", {}).get("sha256", ""))

    async def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes:
        async with self._errors(f"get {key}"):
            reply = await self._client.get_object(Bucket=self.bucket, Key=key)
            async with reply["Body"] as stream:
                data: bytes = await stream.read()
        if expected_sha256 and sha256_bytes(data) != expected_sha256:
            raise ChecksumMismatch(
                f"{key}: SHA-256 is {sha256_bytes(data)}, the catalog registered {expected_sha256}"
            )
        return data

    async def get_file(self, key: str, path: Path, expected_sha256: str | None = None) -> StoredObject:
        data = await self.get_bytes(key, expected_sha256)
        await asyncio.to_thread(_write_atomically, path, data)
        return StoredObject(key, len(data), sha256_bytes(data))

    async def list_keys(self, prefix: str) -> AsyncIterator[StoredObject]:
        """Every object under `prefix`, page by page (never used on the
        processing path: workers and reducers read keys from the catalog)."""
        async for obj, _modified in self.list_objects(prefix):
            yield obj

    async def list_objects(self, prefix: str) -> AsyncIterator[tuple[StoredObject, datetime]]:
        """Every object under `prefix` with its last-modified time (for the
        maintenance sweep)."""
        paginator = self._client.get_paginator("list_objects_v2")
        async with self._errors(f"list {prefix}"):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield StoredObject(item["Key"], int(item["Size"]), ""), item["LastModified"]

    async def delete(self, key: str) -> None:
        async with self._errors(f"delete {key}"):
            await self._client.delete_object(Bucket=self.bucket, Key=key)
