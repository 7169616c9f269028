"""A typed, thin Python client for a cellmesh.

Everything here talks to the mesh's public contracts only: the catalog's and
the reducer's gRPC services (through the generated stubs in this package) and
the S3-compatible object store that holds images and reports. It does not
import the services, so it installs on a lab machine on its own::

    import asyncio
    from cellmesh import CellmeshClient

    async def main() -> None:
        async with CellmeshClient("127.0.0.1:50051") as mesh:
            plate = await mesh.get_plate("BR00121431")
            async for progress in mesh.watch(plate.name):
                print(progress.done, "of", progress.total, "sites done")

    asyncio.run(main())

Every failed call raises `CellmeshError` with the gRPC status and the
service's message, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mimetypes
import os
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from cellmesh import keys, pages
from cellmesh.auth import Credentials, aio_channel
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2
from cellmesh.reducer.v1 import reducer_pb2, reducer_pb2_grpc

__all__ = [
    "DEFAULT_CATALOG",
    "DEFAULT_REDUCER",
    "MAX_IMAGES_PER_CALL",
    "CellmeshClient",
    "CellmeshError",
    "ObjectStore",
    "ObjectStoreConfig",
    "StoredObject",
    "download_report",
    "sha256_bytes",
    "MAX_INLINE_ATTACHMENT_BYTES",
    "sha256_file",
]

DEFAULT_CATALOG = "127.0.0.1:50051"
DEFAULT_REDUCER = "127.0.0.1:50054"
# RegisterImages takes at most this many images per call (see catalog.proto).
MAX_IMAGES_PER_CALL = 10_000
#: Attachments up to this size travel in RegisterPipeline; bigger ones go through the object store.
MAX_INLINE_ATTACHMENT_BYTES = 4 * 1024 * 1024
# The services accept and send messages up to 64 MiB (a plate's site list
# with results can be large).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHUNK = 1024 * 1024

T = TypeVar("T")


class CellmeshError(Exception):
    """A call to the mesh failed.

    `code` is the gRPC status (e.g. `grpc.StatusCode.NOT_FOUND`) and `message`
    the service's explanation, both as the service sent them. Problems with the
    object store are reported the same way: UNAVAILABLE when it cannot be
    reached, NOT_FOUND for a missing object, DATA_LOSS for a checksum mismatch.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


async def _rpc(call: Awaitable[T]) -> T:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise CellmeshError(exc.code(), exc.details() or "") from exc


def _site_ref(plate: str, site: types_pb2.SiteRef | tuple[str, int]) -> types_pb2.SiteRef:
    if isinstance(site, types_pb2.SiteRef):
        return site
    well, number = site
    return types_pb2.SiteRef(plate=plate, well=well, site=number)


class CellmeshClient:
    """The catalog (and optionally the reducer) of one mesh.

    `async with CellmeshClient("host:50051", reducer="host:50054") as mesh:`.
    `timeout` bounds every call except `watch` (seconds; None waits forever).
    `credentials` (`cellmesh.auth.Credentials`: the mesh's CA, your
    certificate or token) are needed by every mesh that runs with TLS; None
    talks plain text.
    """

    def __init__(
        self,
        catalog: str = DEFAULT_CATALOG,
        reducer: str | None = None,
        *,
        timeout: float | None = 120.0,
        channel: grpc.aio.Channel | None = None,
        reducer_channel: grpc.aio.Channel | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        """`channel` and `reducer_channel`, when given, are used instead of
        opening plain ones to the addresses (a service passes the channels
        its own helper made); `close` closes them either way."""
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self.catalog_address = catalog
        self.reducer_address = reducer
        self.timeout = timeout
        self._channel = channel or aio_channel(catalog, credentials, options)
        self._catalog = catalog_pb2_grpc.CatalogServiceStub(self._channel)
        if reducer_channel is None and reducer:
            reducer_channel = aio_channel(reducer, credentials, options)
        self._reducer_channel = reducer_channel
        self._reducer = (
            reducer_pb2_grpc.ReducerServiceStub(self._reducer_channel) if self._reducer_channel else None
        )

    async def __aenter__(self) -> CellmeshClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connections (cancelling calls still under way)."""
        await self._channel.close()
        if self._reducer_channel is not None:
            await self._reducer_channel.close()

    # Pipelines

    async def register_pipeline(
        self,
        pipeline: str | os.PathLike[str] | bytes,
        name: str | None = None,
        attachments: Iterable[str | os.PathLike[str] | tuple[str, str | os.PathLike[str] | bytes]] = (),
        store: ObjectStore | None = None,
        stage_inputs: Iterable[str] = (),
        scope: str = "",
    ) -> catalog_pb2.RegisterPipelineResponse:
        """Registers a CellProfiler pipeline (a .cppipe path, or its bytes) and
        the files it reads besides the channel images.

        The name defaults to the file's name without `.cppipe`. Each attachment
        is a path (the pipeline reads it under the file's name) or a pair
        (name, path or bytes), e.g. ``("illum/Channel1ILLUM.mat", path)``;
        every run finds it in its Default Input Folder under that name. Files
        over 4 MiB are uploaded to ``attachments/<sha256>`` with `store` first
        (needed then), the others travel in the request. Registering the same
        content with the same attachments again returns the known pipeline
        with `already_registered` set. `scope` is "" (decided from the
        modules: a pipeline with CorrectIlluminationCalculate "All",
        CalculateStatistics, MakeProjection or TrackObjects runs once per
        plate), "site" or "plate". `stage_inputs` names the files it reads that
        an earlier plate stage writes. A pipeline that reads a file that is not
        attached is refused with INVALID_ARGUMENT. The pipeline's identity is
        `response.pipeline.ref.sha256`.
        """
        scopes = {"": types_pb2.PIPELINE_SCOPE_UNSPECIFIED, "site": types_pb2.PIPELINE_SCOPE_SITE}
        scopes["plate"] = types_pb2.PIPELINE_SCOPE_PLATE
        if scope not in scopes:
            raise ValueError(
                f"scope {scope!r} is not one of: site, plate (or empty to decide from the modules)"
            )
        if isinstance(pipeline, bytes):
            content = pipeline
            if name is None:
                raise ValueError("a name is needed when the pipeline is given as bytes")
        else:
            path = Path(pipeline)
            content = await asyncio.to_thread(path.read_bytes)
            if name is None:
                name = path.stem
        attached = [await self._attachment(item, store) for item in attachments]
        request = catalog_pb2.RegisterPipelineRequest(
            name=name,
            content=content,
            attachments=attached,
            stage_inputs=list(stage_inputs),
            scope=scopes[scope],
        )
        return await _rpc(self._catalog.RegisterPipeline(request, timeout=self.timeout))

    async def _attachment(
        self,
        item: str | os.PathLike[str] | tuple[str, str | os.PathLike[str] | bytes],
        store: ObjectStore | None,
    ) -> catalog_pb2.Attachment:
        if isinstance(item, tuple):
            attachment_name, source = item
        else:
            attachment_name, source = Path(item).name, item
        data = source if isinstance(source, bytes) else await asyncio.to_thread(Path(source).read_bytes)
        if len(data) <= MAX_INLINE_ATTACHMENT_BYTES:
            return catalog_pb2.Attachment(name=attachment_name, content=data)
        if store is None:
            raise ValueError(
                f"attachment {attachment_name} is {len(data)} bytes: files over 4 MiB go through the "
                "object store; pass store=ObjectStore(...)"
            )
        digest = sha256_bytes(data)
        key = keys.attachment_key(digest)
        there = await store.head(key)
        if there is not None and there.size == len(data) and there.sha256 == digest:
            ref = types_pb2.ObjectRef(key=key, size=len(data), sha256=digest)
        else:
            ref = await store.upload_bytes(key, data)
        return catalog_pb2.Attachment(name=attachment_name, object=ref)

    async def get_pipeline(self, sha256: str) -> catalog_pb2.Pipeline:
        """Returns one pipeline by its SHA-256."""
        request = catalog_pb2.GetPipelineRequest(sha256=sha256)
        reply = await _rpc(self._catalog.GetPipeline(request, timeout=self.timeout))
        return reply.pipeline

    async def list_pipelines(self) -> list[catalog_pb2.Pipeline]:
        """Every registered pipeline, newest first."""
        reply = await _rpc(
            self._catalog.ListPipelines(catalog_pb2.ListPipelinesRequest(), timeout=self.timeout)
        )
        return list(reply.pipelines)

    # Plates

    async def create_plate(
        self,
        name: str,
        channels: Sequence[str],
        pipeline_sha256: str,
        layout: catalog_pb2.PlateLayout | None = None,
        reduce_with_failures: bool = True,
        plate_map: Path | None = None,
        qc_gate: catalog_pb2.QcGate | None = None,
    ) -> catalog_pb2.Plate:
        """Creates a plate.

        `channels` are the image names the pipeline's NamesAndTypes uses (e.g.
        ["DNA", "GFP"]); a site is processed once every channel is registered.
        `layout` (e.g. `PlateLayout(rows=8, columns=12, sites_per_well=4)`)
        tells the mesh which sites to expect, so the plate is reduced as soon
        as they are all done; without it, call `finish_acquisition` when the
        last image is registered. With `reduce_with_failures=False` the report
        waits until every site succeeded (failed sites must be requeued).
        `plate_map` is a plate map CSV (see `cellmesh.platemap`), `qc_gate`
        when the plate's reports count as failed QC.
        """
        request = catalog_pb2.CreatePlateRequest(
            name=name,
            channels=list(channels),
            layout=layout,
            pipeline_sha256=pipeline_sha256,
            reduce_with_failures=reduce_with_failures,
            plate_map=_platemap_upload(plate_map) if plate_map is not None else None,
            qc_gate=qc_gate,
        )
        reply = await _rpc(self._catalog.CreatePlate(request, timeout=self.timeout))
        return reply.plate

    async def set_plate_map(
        self, plate: str, plate_map: Path | None = None, qc_gate: catalog_pb2.QcGate | None = None
    ) -> catalog_pb2.Plate:
        """Registers (or replaces) a plate's map and/or QC gate. A bad map is
        INVALID_ARGUMENT saying what to fix (checked here first, then by the
        catalog against the plate's layout)."""
        request = catalog_pb2.SetPlateMapRequest(
            plate=plate,
            plate_map=_platemap_upload(plate_map) if plate_map is not None else None,
            qc_gate=qc_gate,
        )
        reply = await _rpc(self._catalog.SetPlateMap(request, timeout=self.timeout))
        return reply.plate

    async def get_plate(self, name: str) -> catalog_pb2.Plate:
        """Returns one plate by name (NOT_FOUND if there is none)."""
        request = catalog_pb2.GetPlateRequest(name=name)
        reply = await _rpc(self._catalog.GetPlate(request, timeout=self.timeout))
        return reply.plate

    async def list_plates(self) -> list[catalog_pb2.Plate]:
        """Every plate, newest first."""
        reply = await _rpc(self._catalog.ListPlates(catalog_pb2.ListPlatesRequest(), timeout=self.timeout))
        return list(reply.plates)

    async def finish_acquisition(self, plate: str) -> catalog_pb2.FinishAcquisitionResponse:
        """Declares that no more images will arrive for `plate`.

        The plate is reduced once every registered site is done. The response
        lists the sites the layout expected that still miss channels.
        """
        request = catalog_pb2.FinishAcquisitionRequest(plate=plate)
        return await _rpc(self._catalog.FinishAcquisition(request, timeout=self.timeout))

    async def add_pipeline(self, plate: str, pipeline_sha256: str) -> catalog_pb2.AddPlatePipelineResponse:
        """Runs another registered pipeline on every site of `plate`."""
        request = catalog_pb2.AddPlatePipelineRequest(plate=plate, pipeline_sha256=pipeline_sha256)
        return await _rpc(self._catalog.AddPlatePipeline(request, timeout=self.timeout))

    # Images

    async def register_images(
        self,
        images: Iterable[catalog_pb2.ImageRegistration],
        batch_size: int = MAX_IMAGES_PER_CALL,
    ) -> catalog_pb2.RegisterImagesResponse:
        """Registers images already uploaded to the object store.

        Calls RegisterImages with at most `batch_size` (≤ 10,000) images each
        and returns one response: an outcome per image in the order given
        (CREATED, UNCHANGED or REPLACED) and the number of sites that became
        ready. Each call is checked as a whole by the catalog, but when a
        later call is refused the earlier ones stay registered; registering
        them again is harmless (UNCHANGED).
        """
        if not 1 <= batch_size <= MAX_IMAGES_PER_CALL:
            raise ValueError(f"batch_size must be 1 to {MAX_IMAGES_PER_CALL}")
        pending = list(images)
        total = catalog_pb2.RegisterImagesResponse()
        for start in range(0, len(pending), batch_size):
            request = catalog_pb2.RegisterImagesRequest(images=pending[start : start + batch_size])
            reply = await _rpc(self._catalog.RegisterImages(request, timeout=self.timeout))
            total.outcomes.extend(reply.outcomes)
            total.sites_ready += reply.sites_ready
        return total

    async def list_images(self, plate: str, well: str = "") -> list[catalog_pb2.Image]:
        """Every image registered for `plate` (or one of its wells), in
        (well, site, channel) order, fetched page by page."""
        images: list[catalog_pb2.Image] = []
        token = ""
        while True:
            request = catalog_pb2.ListImagesRequest(
                plate=plate, well=well, page_size=MAX_IMAGES_PER_CALL, page_token=token
            )
            reply = await _rpc(self._catalog.ListImages(request, timeout=self.timeout))
            images.extend(reply.images)
            token = reply.next_page_token
            if not token:
                return images

    # Sites

    async def list_sites(
        self,
        plate: str,
        states: Iterable[types_pb2.SiteState.ValueType] = (),
        pipeline_sha256: str = "",
        with_results: bool = False,
    ) -> list[catalog_pb2.SiteJob]:
        """A plate's site jobs in plate order (well row, column, site),
        optionally only those in `states` (e.g.
        `[SiteState.SITE_STATE_FAILED]`). The pipeline defaults to the plate's
        first one. `with_results` adds result files and provenance. Walks
        every page; `iter_sites` yields them without holding the plate."""
        return [job async for job in self.iter_sites(plate, states, pipeline_sha256, with_results)]

    async def iter_sites(
        self,
        plate: str,
        states: Iterable[types_pb2.SiteState.ValueType] = (),
        pipeline_sha256: str = "",
        with_results: bool = False,
        page_size: int = 0,
    ) -> AsyncIterator[catalog_pb2.SiteJob]:
        """The same jobs as `list_sites`, one ListSites page (`page_size`,
        default the catalog's 500) at a time."""
        request = catalog_pb2.ListSitesRequest(
            plate=plate,
            pipeline_sha256=pipeline_sha256,
            states=list(states),
            with_results=with_results,
            page_size=page_size,
        )
        try:
            async for job in pages.site_jobs(self._catalog, request, self.timeout):
                yield job
        except grpc.aio.AioRpcError as exc:
            raise CellmeshError(exc.code(), exc.details() or "") from exc

    async def failed_sites(self, plate: str, pipeline_sha256: str = "") -> list[catalog_pb2.SiteJob]:
        """The plate's sites that failed for good, each with its failure class
        and reason."""
        return await self.list_sites(plate, [types_pb2.SITE_STATE_FAILED], pipeline_sha256)

    async def requeue(
        self,
        plate: str,
        sites: Iterable[types_pb2.SiteRef | tuple[str, int]] | None = None,
        pipeline_sha256: str = "",
        reduce: bool = False,
    ) -> int:
        """Puts sites back to READY so they run again: every FAILED site, or
        the given ones (as `SiteRef`s or `("A01", 0)` pairs; a running one is
        taken from its worker). With `reduce`, a failed reduce is issued again
        (alone, when no sites are given). Returns how many sites were requeued."""
        refs = [_site_ref(plate, s) for s in sites or ()]
        request = catalog_pb2.RequeueSitesRequest(
            plate=plate, pipeline_sha256=pipeline_sha256, sites=refs, reduce=reduce
        )
        reply = await _rpc(self._catalog.RequeueSites(request, timeout=self.timeout))
        return reply.requeued

    # Progress and reports

    async def progress(self, plate: str, pipeline_sha256: str = "") -> catalog_pb2.PlateProgress:
        """The plate's site counts by state, now."""
        request = catalog_pb2.GetPlateProgressRequest(plate=plate, pipeline_sha256=pipeline_sha256)
        reply = await _rpc(self._catalog.GetPlateProgress(request, timeout=self.timeout))
        return reply.progress

    async def watch(self, plate: str, pipeline_sha256: str = "") -> AsyncIterator[catalog_pb2.PlateProgress]:
        """Yields the plate's progress now and each time it changes; ends when
        the report of the plate's latest results is registered.

        `async for p in mesh.watch("P1"): print(p.done, p.failed, p.total)`.
        Leaving the loop early hangs up.
        """
        request = catalog_pb2.WatchPlateProgressRequest(plate=plate, pipeline_sha256=pipeline_sha256)
        call = self._catalog.WatchPlateProgress(request)
        try:
            async for message in call:
                yield message.progress
        except grpc.aio.AioRpcError as exc:
            raise CellmeshError(exc.code(), exc.details() or "") from exc
        finally:
            call.cancel()

    async def report(
        self, plate: str, version: int = 0, pipeline_sha256: str = ""
    ) -> catalog_pb2.PlateReport:
        """The plate's report: the latest version unless `version` is given.
        NOT_FOUND while there is none yet."""
        request = catalog_pb2.GetPlateReportRequest(
            plate=plate, pipeline_sha256=pipeline_sha256, version=version
        )
        reply = await _rpc(self._catalog.GetPlateReport(request, timeout=self.timeout))
        return reply.report

    async def reduce_now(
        self, plate: str, pipeline_sha256: str = "", heatmap_features: Sequence[str] = ()
    ) -> catalog_pb2.PlateReport:
        """Asks the reducer for a new report of the plate's current results,
        even if some sites are not done yet (they are listed as missing).
        `heatmap_features` adds heatmaps, e.g. "Intensity_MeanIntensity_GFP".
        Needs the reducer's address."""
        if self._reducer is None:
            raise CellmeshError(grpc.StatusCode.FAILED_PRECONDITION, "no reducer address given")
        request = reducer_pb2.ReducePlateRequest(
            plate=plate, pipeline_sha256=pipeline_sha256, heatmap_features=list(heatmap_features)
        )
        reply = await _rpc(self._reducer.ReducePlate(request, timeout=self.timeout))
        return reply.report


# Object store


def sha256_bytes(data: bytes) -> str:
    """Lowercase hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Lowercase hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ObjectStoreConfig:
    """Where the mesh keeps its files: an S3 bucket (AWS, MinIO, the
    project's local server...). Keys left unset come from the usual AWS
    places (~/.aws/credentials, instance roles)."""

    bucket: str = "cellmesh"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ObjectStoreConfig:
        """Reads S3_ENDPOINT_URL, S3_BUCKET (default cellmesh), S3_REGION
        (default us-east-1), AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."""
        source = os.environ if env is None else env
        return cls(
            bucket=source.get("S3_BUCKET") or "cellmesh",
            endpoint_url=source.get("S3_ENDPOINT_URL") or None,
            region=source.get("S3_REGION") or "us-east-1",
            access_key=source.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=source.get("AWS_SECRET_ACCESS_KEY") or None,
        )

    @classmethod
    def discover(cls, env: Mapping[str, str] | None = None) -> ObjectStoreConfig:
        """The environment (`from_env`) when any of its S3 variables is set,
        else the object store of the mesh `cellmesh up` started (its file,
        see `cellmesh.meshconfig`), else the defaults."""
        from cellmesh import meshconfig

        source = os.environ if env is None else env
        if meshconfig.s3_from_environment(source):
            return cls.from_env(source)
        mesh = meshconfig.load(source)
        return cls.from_env(mesh.s3_env() if mesh is not None else source)


@dataclass(frozen=True)
class StoredObject:
    """An object as the store describes it; `sha256` is the one recorded in
    its metadata at upload ("" if it has none)."""

    key: str
    size: int
    sha256: str


def _store_error(what: str, exc: BaseException) -> CellmeshError:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            return CellmeshError(grpc.StatusCode.NOT_FOUND, f"{what}: no such object or bucket ({code})")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return CellmeshError(grpc.StatusCode.PERMISSION_DENIED, f"{what}: {exc}")
        return CellmeshError(grpc.StatusCode.UNKNOWN, f"{what}: {exc}")
    return CellmeshError(grpc.StatusCode.UNAVAILABLE, f"{what}: object store unreachable ({exc})")


class ObjectStore:
    """`async with ObjectStore(config) as store:` — uploads with a SHA-256 in
    the object's metadata, downloads that verify it."""

    def __init__(self, config: ObjectStoreConfig, max_connections: int = 32) -> None:
        self.config = config
        self.bucket = config.bucket
        self._max_connections = max_connections
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def __aenter__(self) -> ObjectStore:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        config = AioConfig(
            connect_timeout=10,
            read_timeout=120,
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=self._max_connections,
        )
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=self.config.endpoint_url,
                region_name=self.config.region,
                aws_access_key_id=self.config.access_key,
                aws_secret_access_key=self.config.secret_key,
                config=config,
            )
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    @contextlib.asynccontextmanager
    async def _errors(self, what: str) -> AsyncIterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError, OSError) as exc:
            raise _store_error(what, exc) from exc

    async def ensure_bucket(self) -> None:
        """Creates the bucket if it does not exist."""
        from botocore.exceptions import ClientError

        async with self._errors(f"create bucket {self.bucket}"):
            try:
                await self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) not in (
                    "404",
                    "NoSuchBucket",
                    "NotFound",
                ):
                    raise
            await self._client.create_bucket(Bucket=self.bucket)

    async def head(self, key: str) -> StoredObject | None:
        """The object at `key`, or None if there is none."""
        from botocore.exceptions import ClientError

        async with self._errors(f"head {key}"):
            try:
                reply = await self._client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        metadata = reply.get("Metadata", {})
        return StoredObject(key, int(reply["ContentLength"]), str(metadata.get("sha256", "")))

    async def upload_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> types_pb2.ObjectRef:
        """Stores `data` at `key` with its SHA-256 in the object's metadata;
        returns the reference to register."""
        digest = sha256_bytes(data)
        async with self._errors(f"put {key}"):
            await self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                Metadata={"sha256": digest},
            )
        return types_pb2.ObjectRef(key=key, size=len(data), sha256=digest)

    async def upload_file(self, path: Path, key: str, content_type: str | None = None) -> types_pb2.ObjectRef:
        """Stores a file at `key` (see `upload_bytes`)."""
        data = await asyncio.to_thread(path.read_bytes)
        kind = content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return await self.upload_bytes(key, data, kind)

    async def presign(self, key: str, expires_s: int) -> str:
        """A URL that reads `key` without credentials for `expires_s` seconds
        (SigV4: at most 7 days)."""
        url = await self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
        )
        return str(url)

    async def download(self, ref: types_pb2.ObjectRef, path: Path) -> Path:
        """Fetches the object `ref` names into `path`, checking its size and
        SHA-256 against `ref`; a mismatch (DATA_LOSS) leaves no file behind."""
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        digest = hashlib.sha256()
        size = 0
        try:
            async with self._errors(f"get {ref.key}"):
                reply = await self._client.get_object(Bucket=self.bucket, Key=ref.key)
                async with reply["Body"] as stream:
                    with part.open("wb") as fh:
                        while chunk := await stream.read(CHUNK):
                            digest.update(chunk)
                            size += len(chunk)
                            fh.write(chunk)
            if ref.sha256 and digest.hexdigest() != ref.sha256:
                raise CellmeshError(
                    grpc.StatusCode.DATA_LOSS,
                    f"{ref.key}: SHA-256 is {digest.hexdigest()}, the catalog registered {ref.sha256}",
                )
            if ref.size and size != ref.size:
                raise CellmeshError(
                    grpc.StatusCode.DATA_LOSS, f"{ref.key}: {size} bytes, the catalog registered {ref.size}"
                )
            part.replace(path)
        finally:
            part.unlink(missing_ok=True)
        return path


async def download_report(
    store: ObjectStore, report: catalog_pb2.PlateReport, folder: Path
) -> list[tuple[catalog_pb2.ReportFile, Path]]:
    """Fetches every file of a plate report into `folder` (heatmaps, tables,
    summary), each checked against its registered SHA-256. Returns the files
    with where they were written."""
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    out: list[tuple[catalog_pb2.ReportFile, Path]] = []
    for item in report.files:
        name = Path(item.name).name or Path(item.object.key).name
        if name in ("", ".", ".."):
            raise CellmeshError(grpc.StatusCode.DATA_LOSS, f"report file with an unusable name {item.name!r}")
        out.append((item, await store.download(item.object, folder / name)))
    return out


def _platemap_upload(path: Path) -> catalog_pb2.PlateMapUpload:
    """A plate map file as the catalog takes it, read and checked first (wells
    against the largest plate; the catalog checks them against the layout)."""
    from cellmesh import platemap

    content = Path(path).read_bytes()
    try:
        platemap.parse(content, columns=48)
    except platemap.PlateMapError as exc:
        raise CellmeshError(grpc.StatusCode.INVALID_ARGUMENT, f"plate map {Path(path).name}: {exc}") from None
    return catalog_pb2.PlateMapUpload(content=content, source_name=Path(path).name)
