"""Object storage on aiobotocore: one client per process, checksums on every
transfer, paginated listing. Speaks to any S3 endpoint (the project's loopback
server, LocalStack, AWS).

Every error of the store is classified here, once (`classify`), into what the
caller should do about it:

- TRANSIENT: throttling, 5xx, connection errors and time-outs. Retry with
  backoff (`ObjectStoreError`).
- MISCONFIGURED: the store cannot be used with these settings (unknown or
  wrong key, access denied, no such bucket, wrong region, a bad endpoint
  URL). Not the site's or the plate's fault, and no retry of one request
  helps: `ObjectStoreMisconfigured` names the setting to fix.
- MISSING: the object is not there (`ObjectMissing`, names the key).
- PRECONDITION: a conditional put found an object under its key.
- REFUSED: the store refused this one request for another reason
  (`ObjectStoreRefused`); not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
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
from botocore import exceptions as bex
from botocore.exceptions import BotoCoreError, ClientError

from services.common.backoff import Backoff
from services.common.retry import sleep_unless
from services.common.settings import S3Settings

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024


class ObjectStoreError(RuntimeError):
    """The object store could not be reached or is overloaded (transient: retry)."""


class ObjectStoreMisconfigured(RuntimeError):
    """The object store cannot be used with these settings; `setting` names
    the one to fix (S3_BUCKET, AWS_ACCESS_KEY_ID, ...)."""

    def __init__(self, message: str, setting: str, key: str = "") -> None:
        super().__init__(message)
        self.setting = setting
        self.key = key  # the object whose request failed, if any (for probes)


class ObjectStoreRefused(RuntimeError):
    """The object store refused this one request (not retried)."""


class ObjectMissing(LookupError):
    """The object does not exist."""


class ChecksumMismatch(ValueError):
    """The object's bytes do not match the expected SHA-256."""


class ObjectExists(RuntimeError):
    """A put that must not overwrite found another object under its key."""


class ErrorClass(enum.Enum):
    TRANSIENT = "transient"
    MISCONFIGURED = "misconfigured"
    MISSING = "missing"
    PRECONDITION = "precondition"
    REFUSED = "refused"


@dataclass(frozen=True)
class Classified:
    """What an object-store error means: its class, the setting to fix (for
    MISCONFIGURED) and the store's own error code."""

    error_class: ErrorClass
    setting: str = ""
    code: str = ""


# Error codes of S3 (and of the S3-compatible stores) that say what to fix.
_SETTING_OF_CODE = {
    "NoSuchBucket": "S3_BUCKET",
    "InvalidBucketName": "S3_BUCKET",
    "InvalidAccessKeyId": "AWS_ACCESS_KEY_ID",
    "NotSignedUp": "AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "AWS_SECRET_ACCESS_KEY",
    "AccessDenied": "AWS_ACCESS_KEY_ID",
    "AllAccessDisabled": "AWS_ACCESS_KEY_ID",
    "AccountProblem": "AWS_ACCESS_KEY_ID",
    "InvalidToken": "AWS_ACCESS_KEY_ID",
    "ExpiredToken": "AWS_ACCESS_KEY_ID",
    "InvalidSecurity": "AWS_ACCESS_KEY_ID",
    "Forbidden": "AWS_ACCESS_KEY_ID",
    "403": "AWS_ACCESS_KEY_ID",
    "AuthorizationHeaderMalformed": "S3_REGION",
    "PermanentRedirect": "S3_REGION",
    "IllegalLocationConstraintException": "S3_REGION",
    "301": "S3_REGION",
    "RequestTimeTooSkewed": "the machine's clock",
}
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "PriorRequestNotComplete",
    }
)
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchUpload", "NoSuchVersion"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})

_TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    bex.EndpointConnectionError,  # includes ConnectTimeoutError
    bex.ConnectionError,
    bex.ReadTimeoutError,
    bex.ConnectionClosedError,
    bex.HTTPClientError,
    bex.ResponseStreamingError,
    bex.IncompleteReadError,
    OSError,
    TimeoutError,
)
_SETTING_OF_EXCEPTION: tuple[tuple[type[BaseException], str], ...] = (
    (bex.NoCredentialsError, "AWS_ACCESS_KEY_ID"),
    (bex.PartialCredentialsError, "AWS_SECRET_ACCESS_KEY"),
    (bex.NoRegionError, "S3_REGION"),
    (bex.InvalidRegionError, "S3_REGION"),
    (bex.UnknownRegionError, "S3_REGION"),
    (bex.InvalidEndpointConfigurationError, "S3_ENDPOINT_URL"),
    (bex.UnknownEndpointError, "S3_ENDPOINT_URL"),
)


def error_code(exc: ClientError) -> tuple[str, int | None]:
    """The store's error code and HTTP status of a ClientError."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, (int(status) if status is not None else None)


def classify(exc: BaseException, *, bucket_call: bool = False) -> Classified:
    """What an error of the object store (or of botocore talking to it)
    means. `bucket_call` says the request was about the bucket itself
    (HeadBucket, CreateBucket): a bare 404 then means there is no bucket,
    not a missing object."""
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        if code in _PRECONDITION_CODES or status == 412:
            return Classified(ErrorClass.PRECONDITION, code=code)
        if code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
            return Classified(ErrorClass.TRANSIENT, code=code)
        if code in _SETTING_OF_CODE:
            return Classified(ErrorClass.MISCONFIGURED, _SETTING_OF_CODE[code], code)
        if code in _MISSING_CODES or status == 404:
            if bucket_call:
                return Classified(ErrorClass.MISCONFIGURED, "S3_BUCKET", code)
            return Classified(ErrorClass.MISSING, code=code)
        if status == 403:
            return Classified(ErrorClass.MISCONFIGURED, "AWS_ACCESS_KEY_ID", code)
        if status == 301:
            return Classified(ErrorClass.MISCONFIGURED, "S3_REGION", code)
        return Classified(ErrorClass.REFUSED, code=code)
    for kind, setting in _SETTING_OF_EXCEPTION:
        if isinstance(exc, kind):
            return Classified(ErrorClass.MISCONFIGURED, setting, type(exc).__name__)
    if isinstance(exc, ValueError) and "endpoint" in str(exc).lower():
        # botocore: "Invalid endpoint: <url>" when the client is created.
        return Classified(ErrorClass.MISCONFIGURED, "S3_ENDPOINT_URL", type(exc).__name__)
    if isinstance(exc, bex.ParamValidationError):
        return Classified(ErrorClass.REFUSED, code=type(exc).__name__)
    if isinstance(exc, (*_TRANSIENT_EXCEPTIONS, BotoCoreError)):
        return Classified(ErrorClass.TRANSIENT, code=type(exc).__name__)
    return Classified(ErrorClass.REFUSED, code=type(exc).__name__)


def _store_said(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        message = str(exc.response.get("Error", {}).get("Message", "")) or "no message"
        return f"{code or status} ({message})"
    return f"{type(exc).__name__}: {exc}"


def misconfiguration_message(what: str, setting: str, exc: BaseException, settings: S3Settings) -> str:
    """A message that says which setting to fix and what it holds now
    (never the secret key itself)."""
    where = settings.endpoint_url or "AWS S3"
    fix = {
        "S3_BUCKET": f"bucket {settings.bucket!r} does not exist at {where} or is no valid bucket name: "
        "create it, or set S3_BUCKET to the mesh's bucket",
        "AWS_ACCESS_KEY_ID": f"access key {settings.access_key!r} is unknown to {where} or may not use "
        f"bucket {settings.bucket!r}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to a key that may "
        "read and write it (or grant this key access)",
        "AWS_SECRET_ACCESS_KEY": f"the secret key does not belong to access key {settings.access_key!r}: "
        "set AWS_SECRET_ACCESS_KEY to that key's secret",
        "S3_REGION": f"bucket {settings.bucket!r} is not in region {settings.region!r}: set S3_REGION to "
        "the bucket's region",
        "S3_ENDPOINT_URL": f"S3_ENDPOINT_URL={settings.endpoint_url!r} is not an S3 endpoint URL: set it "
        "to e.g. http://host:9000 (empty for AWS)",
        "the machine's clock": "the machine's clock differs from the store's by more than 15 minutes: "
        "set the clock right (NTP)",
    }.get(setting, f"check {setting}")
    return f"object store misconfigured ({what}: the store said {_store_said(exc)}): {fix}"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)


class _PreconditionFailed(ObjectStoreRefused):
    """A conditional put found an object under its key (put_bytes decides)."""


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
        self._unusable: ObjectStoreMisconfigured | None = None

    async def __aenter__(self) -> ObjectStore:
        session = get_session()
        try:
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
        except (ValueError, BotoCoreError) as exc:
            # A client that cannot even be made (a malformed endpoint URL, an
            # unknown region): every call says so, so that a service can stay
            # up, unhealthy, with the message, instead of crashing in a loop.
            found = classify(exc)
            if found.error_class is not ErrorClass.MISCONFIGURED:
                raise
            self._unusable = ObjectStoreMisconfigured(
                misconfiguration_message("creating the S3 client", found.setting, exc, self.settings),
                found.setting,
            )
            log.error("%s", self._unusable)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def error(self, what: str, exc: BaseException, *, bucket_call: bool = False, key: str = "") -> Exception:
        """The exception a failed request raises, by `classify`."""
        found = classify(exc, bucket_call=bucket_call)
        if found.error_class is ErrorClass.MISCONFIGURED:
            return ObjectStoreMisconfigured(
                misconfiguration_message(what, found.setting, exc, self.settings), found.setting, key
            )
        if found.error_class is ErrorClass.MISSING:
            return ObjectMissing(f"{what}: no such object in bucket {self.bucket}")
        if found.error_class is ErrorClass.TRANSIENT:
            return ObjectStoreError(f"{what}: object store unreachable or busy ({_store_said(exc)})")
        if found.error_class is ErrorClass.PRECONDITION:
            return _PreconditionFailed(f"{what}: an object is stored under this key already")
        return ObjectStoreRefused(f"{what}: the object store refused it: {_store_said(exc)}")

    @contextlib.asynccontextmanager
    async def _errors(self, what: str, *, bucket_call: bool = False, key: str = "") -> AsyncIterator[None]:
        if self._unusable is not None:
            raise self._unusable
        try:
            yield
        except (ClientError, BotoCoreError, OSError, TimeoutError, ValueError) as exc:
            if isinstance(exc, ValueError) and not isinstance(exc, BotoCoreError | ClientError):
                if classify(exc).error_class is not ErrorClass.MISCONFIGURED:
                    raise
            raise self.error(what, exc, bucket_call=bucket_call, key=key) from exc

    async def ensure_bucket(self) -> None:
        async with self._errors(f"create bucket {self.bucket}", bucket_call=True):
            try:
                await self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                code, status = error_code(exc)
                if not (code in ("404", "NoSuchBucket", "NotFound") or status == 404):
                    raise
            await self._client.create_bucket(Bucket=self.bucket)

    async def ping(self) -> None:
        """Raises unless the bucket answers: ObjectStoreMisconfigured (naming
        the setting) or ObjectStoreError (unreachable)."""
        async with self._errors(f"head bucket {self.bucket}", bucket_call=True):
            await self._client.head_bucket(Bucket=self.bucket)

    async def probe(self, key: str = "") -> None:
        """`ping`, then, given the key whose request failed, asks for that
        object too (a missing object is an answer): a store that answers
        HeadBucket but refuses objects is not taken for usable."""
        await self.ping()
        if key:
            with contextlib.suppress(ObjectMissing):
                await self.head(key)

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
            async with self._errors(f"put {key}", key=key):
                await self._client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    ContentType=content_type,
                    Metadata={"sha256": digest},
                    **condition,
                )
        except _PreconditionFailed as exc:
            if not if_absent:
                raise ObjectStoreRefused(str(exc)) from exc
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
        async with self._errors(f"head {key}", key=key):
            reply = await self._client.head_object(Bucket=self.bucket, Key=key)
        return StoredObject(key, int(reply["ContentLength"]), reply.get("Metadata", {}).get("sha256", ""))

    async def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes:
        async with self._errors(f"get {key}", key=key):
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
        async with self._errors(f"delete {key}", key=key):
            await self._client.delete_object(Bucket=self.bucket, Key=key)


class StoreGate:
    """Whether a service may take work that needs the object store: closed
    (with the reason, naming the setting to fix) once the store turns out
    unusable, open again once a probe gets an answer. Consumers stop taking
    tasks while it is closed; `on_change(open)` hears of every change (for
    gRPC health)."""

    def __init__(self, store: ObjectStore, probe_interval: float = 15.0) -> None:
        self.store = store
        self.probe_interval = probe_interval
        self.problem = ""
        self._key = ""
        self.closed = asyncio.Event()

    def close(self, exc: ObjectStoreMisconfigured | ObjectStoreError) -> None:
        message = str(exc)
        if isinstance(exc, ObjectStoreError):
            message = f"object store unreachable ({exc}): check S3_ENDPOINT_URL and the network"
        if message != self.problem:
            log.error("NOT_SERVING, taking no task: %s (probing every %.0f s)", message, self.probe_interval)
        self.problem = message
        self._key = getattr(exc, "key", "") or self._key
        self.closed.set()

    async def check(self) -> bool:
        """Probes once; False (and closed) if the store cannot be used."""
        try:
            await self.store.probe(self._key)
        except (ObjectStoreMisconfigured, ObjectStoreError) as exc:
            self.close(exc)
            return False
        if self.problem:
            log.info("the object store answers again: SERVING, taking tasks")
        self.problem, self._key = "", ""
        self.closed.clear()
        return True

    async def wait_open(self, stop: asyncio.Event) -> None:
        """Probes every `probe_interval` (jittered, 0.5-1x) until the store answers or `stop`."""
        interval = Backoff(self.probe_interval, self.probe_interval, self.probe_interval / 2)
        while self.problem and not stop.is_set():
            await sleep_unless(stop, interval.delay(0))
            if not stop.is_set():
                await self.check()
