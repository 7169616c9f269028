"""The catalog's gRPC servicer: translates between protobuf and the store's
domain values and maps domain errors to status codes. A raw exception never
reaches a client: anything unexpected is logged with an id and answered with
INTERNAL and that id."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import grpc
from cellmesh import keys, platemap
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from services.catalog import domain as d
from services.catalog.store import CatalogStore
from services.common import auth, cppipe, roles, validate
from services.common.s3 import (
    ChecksumMismatch,
    ObjectMissing,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreMisconfigured,
    ObjectStoreRefused,
    sha256_bytes,
)

log = logging.getLogger(__name__)

SERVICE_NAME = catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name
Context = grpc.aio.ServicerContext[Any, Any]

MAX_PIPELINE_NAME = 200
# A ListSites page ends before it passes this many serialized bytes, far
# below the 64 MiB message cap whatever the plate's size.
SITES_PAGE_BYTES = 3_670_016  # 3.5 MiB
WATCH_POLL_SECONDS = 1.0
WATCH_COALESCE_SECONDS = 0.05

_CODES: dict[type[d.CatalogError], grpc.StatusCode] = {
    d.NotFound: grpc.StatusCode.NOT_FOUND,
    d.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    d.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    d.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    d.Unavailable: grpc.StatusCode.UNAVAILABLE,
    d.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def pipeline_key(sha256: str) -> str:
    """Where a pipeline's .cppipe is stored in the object store (by the
    .cppipe's own SHA-256)."""
    return keys.pipeline_key(sha256)


def attachment_key(sha256: str) -> str:
    """Where an attachment is stored: by its SHA-256, once for every pipeline."""
    return keys.attachment_key(sha256)


MAX_ATTACHMENTS = 100
MAX_INLINE_ATTACHMENT_BYTES = 4 * 1024 * 1024
MAX_INLINE_ATTACHMENTS_BYTES = 32 * 1024 * 1024
MAX_STORED_ATTACHMENT_BYTES = 256 * 1024 * 1024


def _stage_inputs_in(names: Sequence[str], attached: Sequence[str]) -> list[str]:
    """The names of files the pipeline expects from an earlier plate stage, checked."""
    out: list[str] = []
    for name in names:
        why = cppipe.check_input_name(name)
        if why:
            raise d.InvalidArgument(why)
        if name in attached or name in out:
            raise d.InvalidArgument(f"stage input {name} is given twice (or is also attached)")
        out.append(name)
    if len(out) > MAX_ATTACHMENTS:
        raise d.InvalidArgument(f"{len(out)} stage inputs; at most {MAX_ATTACHMENTS} are accepted")
    return sorted(out)


@dataclass(frozen=True)
class _AttachmentIn:
    name: str
    content: bytes | None
    ref: types_pb2.ObjectRef | None


def _attachments_in(items: Sequence[catalog_pb2.Attachment]) -> list[_AttachmentIn]:
    """The request's attachments, checked: names, sizes, no name twice."""
    if len(items) > MAX_ATTACHMENTS:
        raise d.InvalidArgument(f"{len(items)} attachments; at most {MAX_ATTACHMENTS} are accepted")
    out: list[_AttachmentIn] = []
    seen: set[str] = set()
    inline = 0
    for item in items:
        why = cppipe.check_input_name(item.name)
        if why:
            raise d.InvalidArgument(why)
        if item.name in seen:
            raise d.InvalidArgument(f"attachment {item.name} is given twice: attach each file once")
        seen.add(item.name)
        kind = item.WhichOneof("source")
        if kind == "content":
            data = bytes(item.content)
            if len(data) > MAX_INLINE_ATTACHMENT_BYTES:
                raise d.InvalidArgument(
                    f"attachment {item.name} is {len(data)} bytes: send files over 4 MiB as an "
                    "object already stored (the client does it for you)"
                )
            inline += len(data)
            out.append(_AttachmentIn(item.name, data, None))
        elif kind == "object":
            ref = item.object
            try:
                validate.check_key(ref.key, f"attachment {item.name}'s object key")
                validate.check_sha256(ref.sha256, f"attachment {item.name}'s object")
                validate.check_size(ref.size, f"attachment {item.name}'s object size")
            except validate.Invalid as exc:
                raise d.InvalidArgument(str(exc)) from None
            if ref.size > MAX_STORED_ATTACHMENT_BYTES:
                raise d.InvalidArgument(
                    f"attachment {item.name} is {ref.size} bytes; at most "
                    f"{MAX_STORED_ATTACHMENT_BYTES // 2**20} MiB are accepted"
                )
            out.append(_AttachmentIn(item.name, None, ref))
        else:
            raise d.InvalidArgument(f"attachment {item.name} has neither content nor object")
    if inline > MAX_INLINE_ATTACHMENTS_BYTES:
        raise d.InvalidArgument(
            f"the attachments' bytes add up to {inline}; at most 32 MiB in one request: "
            "send big files as objects already stored"
        )
    return out


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    """The CatalogService RPCs over a `CatalogStore` and an `ObjectStore`."""

    def __init__(
        self,
        store: CatalogStore,
        objects: ObjectStore,
        watch_poll_seconds: float = WATCH_POLL_SECONDS,
        sites_page_bytes: int = SITES_PAGE_BYTES,
    ) -> None:
        self.store = store
        self.objects = objects
        self.sites_page_bytes = sites_page_bytes
        self._watch_poll = watch_poll_seconds
        self._closing = asyncio.Event()

    def close(self) -> None:
        """Ends progress streams (shutdown)."""
        self._closing.set()
        self.store.changes.wake_all()

    # -- error mapping ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _errors(self, context: Context) -> AsyncIterator[None]:
        try:
            yield
        except Exception as exc:  # every failure becomes a status code
            code, message = _status(exc)
            await context.abort(code, message)

    # -- pipelines ---------------------------------------------------------------------

    async def RegisterPipeline(
        self, request: catalog_pb2.RegisterPipelineRequest, context: Context
    ) -> catalog_pb2.RegisterPipelineResponse:
        async with self._errors(context):
            content = bytes(request.content)
            if not content:
                raise d.InvalidArgument(
                    "content is empty: not a CellProfiler pipeline: first line must be "
                    f"'{cppipe.HEADER}'; send the .cppipe file's bytes"
                )
            if len(content) > cppipe.MAX_PIPELINE_BYTES:
                raise d.InvalidArgument(
                    f"the pipeline is {len(content)} bytes; at most {cppipe.MAX_PIPELINE_BYTES} (4 MiB) are accepted"
                )
            name = request.name.strip()
            if len(name) > MAX_PIPELINE_NAME or any(ord(c) < 32 for c in name):
                raise d.InvalidArgument(
                    f"name must be at most {MAX_PIPELINE_NAME} printable characters, e.g. 'nuclei-v2'"
                )
            attachments = _attachments_in(request.attachments)
            stage_inputs = _stage_inputs_in(request.stage_inputs, [a.name for a in attachments])
            names = [a.name for a in attachments] + stage_inputs
            parsed = cppipe.parse_for_sites(content, input_files=names)
            asked = {
                types_pb2.PIPELINE_SCOPE_SITE: cppipe.SCOPE_SITE,
                types_pb2.PIPELINE_SCOPE_PLATE: cppipe.SCOPE_PLATE,
            }.get(request.scope, "")
            scope_name, scope_reasons = cppipe.decide_scope(parsed, asked)
            scope = d.Scope.PLATE if scope_name == cppipe.SCOPE_PLATE else d.Scope.SITE
            content_sha = sha256_bytes(content)
            stored = [await self._attachment(a) for a in attachments]
            sha = d.pipeline_sha256(content_sha, stored)
            found = await self.store.find_pipeline(sha)
            if found is not None:
                if asked and found.scope != scope:
                    raise d.FailedPrecondition(
                        f"pipeline {sha[:12]} is registered with scope {found.scope.name} already; "
                        "the scope is not part of a pipeline's identity: leave it unset, or register "
                        "a copy of the pipeline (e.g. with another name in its first module's notes)"
                    )
                return catalog_pb2.RegisterPipelineResponse(
                    pipeline=_pipeline(found), already_registered=True
                )
            key = pipeline_key(content_sha)
            await self.objects.put_bytes(key, content, "text/plain; charset=utf-8", if_absent=True)
            info, created = await self.store.add_pipeline(
                d.PipelineInfo(
                    sha256=sha,
                    key=key,
                    name=name or f"pipeline-{sha[:12]}",
                    modules=parsed.module_names,
                    image_names=list(parsed.image_names),
                    tables=parsed.tables,
                    table_files=parsed.table_files,
                    created_at=datetime.now(UTC),
                    attachments=stored,
                    content_sha256=content_sha if stored else "",
                    scope=scope,
                    scope_reasons=scope_reasons,
                    stage_inputs=stage_inputs,
                    group_by=cppipe.grouping_keys(parsed),
                ),
                size=len(content),
            )
            if created:
                log.info(
                    "pipeline %s registered as %s (%s; %d attachments)",
                    info.name,
                    sha[:12],
                    ", ".join(info.image_names),
                    len(stored),
                )
            return catalog_pb2.RegisterPipelineResponse(
                pipeline=_pipeline(info), already_registered=not created
            )

    async def _attachment(self, attachment: _AttachmentIn) -> d.InputFile:
        """Stores an attachment's bytes by their SHA-256 (if not there yet), or
        checks an already stored one's size and SHA-256."""
        if attachment.content is not None:
            data = attachment.content
            sha = sha256_bytes(data)
            stored = await self.objects.put_bytes(attachment_key(sha), data, if_absent=True)
            return d.InputFile(attachment.name, stored.key, stored.size, sha)
        ref = attachment.ref
        assert ref is not None
        try:
            head = await self.objects.head(ref.key)
        except ObjectMissing:
            raise d.InvalidArgument(
                f"attachment {attachment.name}: no object {ref.key} in the object store; upload it first"
            ) from None
        if head.size != ref.size:
            raise d.InvalidArgument(
                f"attachment {attachment.name}: object {ref.key} has {head.size} bytes, not {ref.size}"
            )
        try:
            await self.objects.get_bytes(ref.key, expected_sha256=ref.sha256)
        except ChecksumMismatch as exc:
            raise d.InvalidArgument(f"attachment {attachment.name}: {exc}") from None
        return d.InputFile(attachment.name, ref.key, ref.size, ref.sha256)

    async def GetPipeline(
        self, request: catalog_pb2.GetPipelineRequest, context: Context
    ) -> catalog_pb2.GetPipelineResponse:
        async with self._errors(context):
            return catalog_pb2.GetPipelineResponse(
                pipeline=_pipeline(await self.store.get_pipeline(request.sha256))
            )

    async def ListPipelines(
        self, request: catalog_pb2.ListPipelinesRequest, context: Context
    ) -> catalog_pb2.ListPipelinesResponse:
        async with self._errors(context):
            pipelines = await self.store.list_pipelines()
            return catalog_pb2.ListPipelinesResponse(pipelines=[_pipeline(p) for p in pipelines])

    # -- plates --------------------------------------------------------------------------

    async def CreatePlate(
        self, request: catalog_pb2.CreatePlateRequest, context: Context
    ) -> catalog_pb2.CreatePlateResponse:
        async with self._errors(context):
            layout = None
            if request.HasField("layout"):
                lay = request.layout
                layout = d.Layout(lay.rows, lay.columns, lay.sites_per_well, lay.first_site, list(lay.wells))
            plate_map = None
            if request.HasField("plate_map"):
                plate_map = _platemap_json(request.plate_map, layout)
            gate = _qc_gate_json(request.qc_gate) if request.HasField("qc_gate") else None
            plate = await self.store.create_plate(
                request.name,
                list(request.channels),
                layout,
                request.pipeline_sha256,
                request.reduce_with_failures,
                created_by=caller.name if (caller := auth.current_caller()) is not None else "",
                plate_map=plate_map,
                qc_gate=gate,
            )
            return catalog_pb2.CreatePlateResponse(plate=_plate(plate))

    async def SetPlateMap(
        self, request: catalog_pb2.SetPlateMapRequest, context: Context
    ) -> catalog_pb2.SetPlateMapResponse:
        async with self._errors(context):
            if not request.plate:
                raise d.InvalidArgument("plate is required: the name of the plate the map describes")
            if not request.HasField("plate_map") and not request.HasField("qc_gate"):
                raise d.InvalidArgument("give a plate_map, a qc_gate or both")
            current = await self.store.get_plate(request.plate)
            plate_map = None
            if request.HasField("plate_map"):
                plate_map = _platemap_json(request.plate_map, current.layout)
            gate = _qc_gate_json(request.qc_gate) if request.HasField("qc_gate") else None
            plate = await self.store.set_plate_map(request.plate, plate_map, gate)
            return catalog_pb2.SetPlateMapResponse(plate=_plate(plate))

    async def GetPlate(
        self, request: catalog_pb2.GetPlateRequest, context: Context
    ) -> catalog_pb2.GetPlateResponse:
        async with self._errors(context):
            return catalog_pb2.GetPlateResponse(plate=_plate(await self.store.get_plate(request.name)))

    async def ListPlates(
        self, request: catalog_pb2.ListPlatesRequest, context: Context
    ) -> catalog_pb2.ListPlatesResponse:
        async with self._errors(context):
            return catalog_pb2.ListPlatesResponse(plates=[_plate(p) for p in await self.store.list_plates()])

    async def FinishAcquisition(
        self, request: catalog_pb2.FinishAcquisitionRequest, context: Context
    ) -> catalog_pb2.FinishAcquisitionResponse:
        async with self._errors(context):
            plate, incomplete = await self.store.finish_acquisition(request.plate)
            return catalog_pb2.FinishAcquisitionResponse(
                plate=_plate(plate), incomplete_sites=[_site_ref(s) for s in incomplete]
            )

    async def AddPlatePipeline(
        self, request: catalog_pb2.AddPlatePipelineRequest, context: Context
    ) -> catalog_pb2.AddPlatePipelineResponse:
        async with self._errors(context):
            plate, created = await self.store.add_plate_pipeline(request.plate, request.pipeline_sha256)
            return catalog_pb2.AddPlatePipelineResponse(plate=_plate(plate), site_jobs_created=created)

    # -- images ----------------------------------------------------------------------------

    async def RegisterImages(
        self, request: catalog_pb2.RegisterImagesRequest, context: Context
    ) -> catalog_pb2.RegisterImagesResponse:
        async with self._errors(context):
            images = [
                d.ImageIn(
                    plate=i.site.plate,
                    well=i.site.well,
                    site=i.site.site,
                    channel=i.channel,
                    key=i.object.key,
                    size=i.object.size,
                    sha256=i.object.sha256,
                    file_name=i.file_name,
                    replace=i.replace,
                    metadata=dict(i.metadata),
                )
                for i in request.images
            ]
            outcomes, ready = await self.store.register_images(images)
            return catalog_pb2.RegisterImagesResponse(
                outcomes=[cast("catalog_pb2.RegistrationOutcome.ValueType", int(o)) for o in outcomes],
                sites_ready=ready,
            )

    async def ListImages(
        self, request: catalog_pb2.ListImagesRequest, context: Context
    ) -> catalog_pb2.ListImagesResponse:
        async with self._errors(context):
            images, token = await self.store.list_images(
                request.plate, request.well, request.page_size, request.page_token
            )
            return catalog_pb2.ListImagesResponse(images=[_image(i) for i in images], next_page_token=token)

    # -- scheduler and worker calls -----------------------------------------------------------

    async def ClaimReadySites(
        self, request: catalog_pb2.ClaimReadySitesRequest, context: Context
    ) -> catalog_pb2.ClaimReadySitesResponse:
        async with self._errors(context):
            claims = await self.store.claim_ready_sites(
                request.scheduler_id, request.max_sites, request.lease_seconds
            )
            return catalog_pb2.ClaimReadySitesResponse(claims=[_site_claim(c) for c in claims])

    async def MarkSitesQueued(
        self, request: catalog_pb2.MarkSitesQueuedRequest, context: Context
    ) -> catalog_pb2.MarkSitesQueuedResponse:
        async with self._errors(context):
            marked = await self.store.mark_sites_queued(
                request.scheduler_id, [(s.site_job_id, s.attempt) for s in request.sites]
            )
            return catalog_pb2.MarkSitesQueuedResponse(marked=marked)

    async def StartSiteJob(
        self, request: catalog_pb2.StartSiteJobRequest, context: Context
    ) -> catalog_pb2.StartSiteJobResponse:
        async with self._errors(context):
            decision, detail, execution_id = await self.store.start_site_job(
                request.site_job_id,
                request.attempt,
                request.worker_id,
                request.execution_id,
                request.lease_seconds,
            )
            return catalog_pb2.StartSiteJobResponse(
                decision=cast("catalog_pb2.StartDecision.ValueType", int(decision)),
                detail=detail,
                execution_id=execution_id,
            )

    async def RenewSiteLease(
        self, request: catalog_pb2.RenewSiteLeaseRequest, context: Context
    ) -> catalog_pb2.RenewSiteLeaseResponse:
        async with self._errors(context):
            held = await self.store.renew_site_lease(
                request.site_job_id,
                request.attempt,
                request.worker_id,
                request.lease_seconds,
                request.execution_id,
            )
            return catalog_pb2.RenewSiteLeaseResponse(held=held)

    async def CompleteSiteJob(
        self, request: catalog_pb2.CompleteSiteJobRequest, context: Context
    ) -> catalog_pb2.CompleteSiteJobResponse:
        async with self._errors(context):
            results = [
                d.ResultFile(r.name, r.object.key, r.object.size, r.object.sha256) for r in request.results
            ]
            provenance = _provenance_in(request.provenance) if request.HasField("provenance") else None
            recorded = await self.store.complete_site_job(
                request.site_job_id,
                request.attempt,
                request.worker_id,
                results,
                provenance,
                request.execution_id,
            )
            return catalog_pb2.CompleteSiteJobResponse(recorded=recorded)

    async def FailSiteJob(
        self, request: catalog_pb2.FailSiteJobRequest, context: Context
    ) -> catalog_pb2.FailSiteJobResponse:
        async with self._errors(context):
            try:
                failure = d.FailureClass(request.failure_class)
            except ValueError:
                raise d.InvalidArgument(
                    f"failure_class {request.failure_class} is not a known class"
                ) from None
            result = await self.store.fail_site_job(
                request.site_job_id,
                request.attempt,
                request.worker_id,
                failure,
                request.reason,
                request.final,
                request.execution_id,
            )
            return catalog_pb2.FailSiteJobResponse(
                will_retry=result.will_retry, next_attempt=result.next_attempt, state=_state(result.state)
            )

    async def ListSites(
        self, request: catalog_pb2.ListSitesRequest, context: Context
    ) -> catalog_pb2.ListSitesResponse:
        async with self._errors(context):
            states = []
            for s in request.states:
                try:
                    states.append(d.SiteState(s))
                except ValueError:
                    raise d.InvalidArgument(f"state {s} is not a site state") from None
            page = await self.store.list_sites(
                request.plate,
                request.pipeline_sha256,
                states,
                request.with_results,
                request.page_size,
                request.page_token,
            )
            reply = catalog_pb2.ListSitesResponse()
            used = 0
            for n, job in enumerate(page.jobs):
                message = _site_job(job)
                # A repeated field costs its bytes plus a tag and a length.
                cost = message.ByteSize() + 8
                if n and used + cost > self.sites_page_bytes:
                    reply.next_page_token = page.token_after(n - 1)
                    return reply
                reply.sites.append(message)
                used += cost
            if page.more:
                reply.next_page_token = page.token_after(len(page.jobs) - 1)
            return reply

    async def RequeueSites(
        self, request: catalog_pb2.RequeueSitesRequest, context: Context
    ) -> catalog_pb2.RequeueSitesResponse:
        async with self._errors(context):
            for s in request.sites:
                if s.plate and s.plate != request.plate:
                    raise d.InvalidArgument(
                        f"site {s.well} {s.site} names plate {s.plate!r}, but the request is for {request.plate!r}"
                    )
            count = await self.store.requeue_sites(
                request.plate,
                request.pipeline_sha256,
                [(s.well, s.site) for s in request.sites],
                reduce=request.reduce,
                # A scientist requeues only their own plates (services/common/roles.py).
                owner=caller.name
                if (caller := auth.current_caller()) and caller.role in roles.OWN_PLATES_ONLY
                else None,
            )
            return catalog_pb2.RequeueSitesResponse(requeued=count)

    # -- progress -------------------------------------------------------------------------------

    async def GetPlateProgress(
        self, request: catalog_pb2.GetPlateProgressRequest, context: Context
    ) -> catalog_pb2.GetPlateProgressResponse:
        async with self._errors(context):
            progress = await self.store.get_progress(request.plate, request.pipeline_sha256)
            return catalog_pb2.GetPlateProgressResponse(progress=_progress(progress))

    async def WatchPlateProgress(
        self, request: catalog_pb2.WatchPlateProgressRequest, context: Context
    ) -> AsyncIterator[catalog_pb2.WatchPlateProgressResponse]:
        last: d.Progress | None = None
        while not self._closing.is_set():
            changed = self.store.changes.subscribe(request.plate)
            try:
                progress = await self.store.get_progress(request.plate, request.pipeline_sha256)
            except Exception as exc:
                code, message = _status(exc)
                await context.abort(code, message)
            if progress != last:
                yield catalog_pb2.WatchPlateProgressResponse(progress=_progress(progress))
                last = progress
            if progress.complete or progress.reduce_failed:
                return  # nothing more happens to this plate until someone acts
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self._watch_poll)
                await asyncio.sleep(WATCH_COALESCE_SECONDS)

    # -- reduce ----------------------------------------------------------------------------------

    async def ClaimReducibleRuns(
        self, request: catalog_pb2.ClaimReducibleRunsRequest, context: Context
    ) -> catalog_pb2.ClaimReducibleRunsResponse:
        async with self._errors(context):
            runs = await self.store.claim_reducible_runs(
                request.scheduler_id, request.max_runs, request.lease_seconds
            )
            return catalog_pb2.ClaimReducibleRunsResponse(claims=[_run_claim(r) for r in runs])

    async def MarkRunsQueued(
        self, request: catalog_pb2.MarkRunsQueuedRequest, context: Context
    ) -> catalog_pb2.MarkRunsQueuedResponse:
        async with self._errors(context):
            marked = await self.store.mark_runs_queued(
                request.scheduler_id, [(r.plate, r.pipeline.sha256, r.generation) for r in request.runs]
            )
            return catalog_pb2.MarkRunsQueuedResponse(marked=marked)

    async def RegisterPlateReport(
        self, request: catalog_pb2.RegisterPlateReportRequest, context: Context
    ) -> catalog_pb2.RegisterPlateReportResponse:
        async with self._errors(context):
            if not request.HasField("report"):
                raise d.InvalidArgument("report is required")
            recorded, report = await self.store.register_report(_report_in(request.report))
            return catalog_pb2.RegisterPlateReportResponse(recorded=recorded, report=_report(report))

    async def GetPlateReport(
        self, request: catalog_pb2.GetPlateReportRequest, context: Context
    ) -> catalog_pb2.GetPlateReportResponse:
        async with self._errors(context):
            report = await self.store.get_report(request.plate, request.pipeline_sha256, request.version)
            return catalog_pb2.GetPlateReportResponse(report=_report(report))


# -- errors -------------------------------------------------------------------------------------


#: A status message goes back in a header that gRPC caps at 16 KiB (percent-
#: encoded); messages that quote what the caller sent are shortened to this.
MAX_MESSAGE_CHARS = 1000


def _short_message(message: str) -> str:
    """`message`, its middle left out when it is longer than MAX_MESSAGE_CHARS
    (a quoted value can be megabytes: the caller still learns what is wrong)."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    head, tail = MAX_MESSAGE_CHARS * 7 // 10, MAX_MESSAGE_CHARS * 2 // 10
    return f"{message[:head]} … ({len(message) - head - tail:,} characters left out) … {message[-tail:]}"


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    code, message = _status_of(exc)
    return code, _short_message(message)


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    for kind, code in _CODES.items():
        if isinstance(exc, kind):
            return code, str(exc)
    if isinstance(exc, cppipe.PipelineError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ObjectStoreError):
        return grpc.StatusCode.UNAVAILABLE, f"the object store does not answer ({exc}); retry"
    if isinstance(exc, ObjectStoreMisconfigured):
        return grpc.StatusCode.FAILED_PRECONDITION, f"the catalog's {exc}"
    if isinstance(exc, ObjectStoreRefused):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    error_id = uuid.uuid4().hex[:12]
    log.exception("unexpected error %s", error_id)
    return (
        grpc.StatusCode.INTERNAL,
        f"the catalog failed unexpectedly (error {error_id}); its log has the details",
    )


# -- protobuf <-> domain ----------------------------------------------------------------------------


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts


def _state(state: d.SiteState) -> types_pb2.SiteState.ValueType:
    return cast("types_pb2.SiteState.ValueType", int(state))


def _state_in(value: int) -> d.SiteState | None:
    try:
        return d.SiteState(value)
    except ValueError:
        return None


def _input_file(f: d.InputFile) -> catalog_pb2.InputFile:
    return catalog_pb2.InputFile(
        name=f.name, object=types_pb2.ObjectRef(key=f.key, size=f.size, sha256=f.sha256)
    )


def _pipeline(p: d.PipelineInfo) -> catalog_pb2.Pipeline:
    return catalog_pb2.Pipeline(
        ref=types_pb2.PipelineRef(sha256=p.sha256, key=p.key, content_sha256=p.content_sha256),
        attachments=[_input_file(a) for a in p.attachments],
        stage_inputs=p.stage_inputs,
        name=p.name,
        modules=p.modules,
        image_names=p.image_names,
        tables=p.tables,
        created_at=_ts(p.created_at),
        scope=_scope(p.scope),
        scope_reasons=p.scope_reasons,
        group_by=p.group_by,
    )


def _scope(scope: d.Scope) -> types_pb2.PipelineScope.ValueType:
    return cast("types_pb2.PipelineScope.ValueType", int(scope))


def _plate(p: d.PlateInfo) -> catalog_pb2.Plate:
    layout = None
    if p.layout is not None:
        layout = catalog_pb2.PlateLayout(
            wells=p.layout.wells,
            rows=p.layout.rows,
            columns=p.layout.columns,
            sites_per_well=p.layout.sites_per_well,
            first_site=p.layout.first_site,
        )
    return catalog_pb2.Plate(
        name=p.name,
        channels=p.channels,
        layout=layout,
        sites_known=p.sites_known,
        acquisition_finished=p.acquisition_finished,
        pipeline_sha256=p.pipelines,
        reduce_with_failures=p.reduce_with_failures,
        created_at=_ts(p.created_at),
        image_count=p.image_count,
        plate_map=_platemap(p.plate_map) if p.plate_map else None,
        qc_gate=_qc_gate(p.qc_gate) if p.qc_gate else None,
    )


def _platemap_json(upload: catalog_pb2.PlateMapUpload, layout: d.Layout | None) -> dict[str, Any]:
    """The map as the store keeps it, read against the plate's layout."""
    if not upload.content:
        raise d.InvalidArgument("plate_map.content is empty: give the plate map's CSV file")
    if len(upload.source_name) > 255:
        raise d.InvalidArgument("plate_map.source_name is longer than 255 characters")
    rows, columns = (layout.rows, layout.columns) if layout is not None else (0, 0)
    try:
        parsed = platemap.parse(upload.content, rows=rows, columns=columns)
    except platemap.PlateMapError as exc:
        raise d.InvalidArgument(f"plate map {upload.source_name or ''}: {exc}".replace(" :", ":")) from None
    return {
        "sha256": platemap.sha256(upload.content),
        "source_name": upload.source_name,
        "columns": list(parsed.columns),
        "located_by": parsed.located_by,
        "registered_at": datetime.now(UTC).replace(tzinfo=None).isoformat(),
        "wells": [[w, [v[c] for c in parsed.columns]] for w, v in parsed.wells.items()],
    }


def _platemap(m: dict[str, Any]) -> catalog_pb2.PlateMap:
    columns = list(m["columns"])
    return catalog_pb2.PlateMap(
        sha256=m["sha256"],
        source_name=m.get("source_name", ""),
        columns=columns,
        located_by=m.get("located_by", ""),
        registered_at=_ts(datetime.fromisoformat(m["registered_at"])),
        wells=[
            catalog_pb2.PlateMapWell(well=w, values=dict(zip(columns, values, strict=True)))
            for w, values in m["wells"]
        ],
    )


def _qc_gate_json(g: catalog_pb2.QcGate) -> dict[str, Any]:
    problems = []
    if g.HasField("min_z_prime"):
        if not math.isfinite(g.min_z_prime) or g.min_z_prime > 1:
            problems.append(f"qc_gate.min_z_prime {g.min_z_prime} is not a number up to 1 (Z' is at most 1)")
        if not g.feature:
            problems.append("qc_gate.min_z_prime needs qc_gate.feature: the feature whose Z' is checked")
    if g.HasField("max_failed_share") and not 0 <= g.max_failed_share <= 1:
        problems.append(f"qc_gate.max_failed_share {g.max_failed_share} is not a share from 0 to 1")
    for name, value in (
        ("feature", g.feature),
        ("control_column", g.control_column),
        ("dose_column", g.dose_column),
    ):
        if len(value) > 200 or any(ord(ch) < 32 for ch in value):
            problems.append(f"qc_gate.{name} is longer than 200 characters or holds control characters")
    if problems:
        raise d.InvalidArgument("; ".join(problems))
    return {
        "feature": g.feature,
        "min_z_prime": g.min_z_prime if g.HasField("min_z_prime") else None,
        "max_failed_share": g.max_failed_share if g.HasField("max_failed_share") else None,
        "control_column": g.control_column,
        "dose_column": g.dose_column,
    }


def _qc_gate(g: dict[str, Any]) -> catalog_pb2.QcGate:
    out = catalog_pb2.QcGate(
        feature=g.get("feature", ""),
        control_column=g.get("control_column", ""),
        dose_column=g.get("dose_column", ""),
    )
    if g.get("min_z_prime") is not None:
        out.min_z_prime = float(g["min_z_prime"])
    if g.get("max_failed_share") is not None:
        out.max_failed_share = float(g["max_failed_share"])
    return out


def _qc_json(q: catalog_pb2.PlateQc) -> dict[str, Any]:
    return {
        "gated": q.gated,
        "passed": q.passed,
        "failures": list(q.failures),
        "z_prime": q.z_prime if q.HasField("z_prime") else None,
        "failed_share": q.failed_share,
    }


def _qc(q: dict[str, Any]) -> catalog_pb2.PlateQc:
    out = catalog_pb2.PlateQc(
        gated=bool(q.get("gated")),
        passed=bool(q.get("passed")),
        failures=list(q.get("failures") or []),
        failed_share=float(q.get("failed_share") or 0.0),
    )
    if q.get("z_prime") is not None:
        out.z_prime = float(q["z_prime"])
    return out


def _site_ref(s: d.SiteKey) -> types_pb2.SiteRef:
    return types_pb2.SiteRef(plate=s.plate, well=s.well, site=s.site)


def _image(i: d.ImageInfo) -> catalog_pb2.Image:
    return catalog_pb2.Image(
        site=types_pb2.SiteRef(plate=i.plate, well=i.well, site=i.site),
        channel=i.channel,
        object=types_pb2.ObjectRef(key=i.key, size=i.size, sha256=i.sha256),
        file_name=i.file_name,
        registered_at=_ts(i.registered_at),
        metadata=dict(i.metadata),
    )


def _site_claim(c: d.SiteClaim) -> catalog_pb2.SiteClaim:
    return catalog_pb2.SiteClaim(
        site_job_id=c.site_job_id,
        attempt=c.attempt,
        site=_site_ref(c.site),
        images=[_image(i) for i in c.images],
        pipeline=types_pb2.PipelineRef(
            sha256=c.pipeline_sha256, key=c.pipeline_key, content_sha256=c.pipeline_content_sha256
        ),
        expected_tables=c.expected_tables,
        input_files=[_input_file(f) for f in c.input_files],
        scope=_scope(c.scope),
    )


def _provenance_in(p: catalog_pb2.Provenance) -> d.Provenance:
    return d.Provenance(
        cellprofiler_version=p.cellprofiler_version,
        pipeline_sha256=p.pipeline_sha256,
        input_sha256=list(p.input_sha256),
        worker_id=p.worker_id,
        download_seconds=p.download_seconds,
        run_seconds=p.run_seconds,
        upload_seconds=p.upload_seconds,
        object_counts=dict(p.object_counts),
        mode=p.mode,
    )


def _provenance(p: d.Provenance) -> catalog_pb2.Provenance:
    return catalog_pb2.Provenance(
        cellprofiler_version=p.cellprofiler_version,
        pipeline_sha256=p.pipeline_sha256,
        input_sha256=p.input_sha256,
        worker_id=p.worker_id,
        download_seconds=p.download_seconds,
        run_seconds=p.run_seconds,
        upload_seconds=p.upload_seconds,
        object_counts=p.object_counts,
        mode=p.mode,
    )


def _result_files(results: Sequence[d.ResultFile]) -> list[catalog_pb2.ResultFile]:
    return [
        catalog_pb2.ResultFile(
            name=r.name, object=types_pb2.ObjectRef(key=r.key, size=r.size, sha256=r.sha256)
        )
        for r in results
    ]


def _site_job(j: d.SiteJobInfo) -> catalog_pb2.SiteJob:
    return catalog_pb2.SiteJob(
        id=j.id,
        site=_site_ref(j.site),
        pipeline_sha256=j.pipeline_sha256,
        state=_state(j.state),
        attempt=j.attempt,
        failure_class=cast("types_pb2.FailureClass.ValueType", int(j.failure_class)),
        failure_reason=j.failure_reason,
        worker_id=j.worker_id,
        execution_id=j.execution_id,
        ready_at=_ts(j.ready_at),
        started_at=_ts(j.started_at),
        finished_at=_ts(j.finished_at),
        results=_result_files(j.results),
        provenance=None if j.provenance is None else _provenance(j.provenance),
        scope=_scope(j.scope),
        metadata=dict(j.metadata),
    )


def _progress(p: d.Progress) -> catalog_pb2.PlateProgress:
    return catalog_pb2.PlateProgress(
        plate=p.plate,
        pipeline_sha256=p.pipeline_sha256,
        total=p.total,
        waiting=p.waiting,
        ready=p.ready,
        queued=p.queued,
        running=p.running,
        done=p.done,
        failed=p.failed,
        report_version=p.report_version,
        complete=p.complete,
        reduce_failed=p.reduce_failed,
        reduce_failure_reason=p.reduce_failure_reason,
    )


def _run_claim(r: d.RunClaim) -> catalog_pb2.RunClaim:
    return catalog_pb2.RunClaim(
        plate=r.plate,
        pipeline=types_pb2.PipelineRef(sha256=r.pipeline_sha256, key=r.pipeline_key),
        generation=r.generation,
    )


def _report_in(r: catalog_pb2.PlateReport) -> d.Report:
    return d.Report(
        plate=r.plate,
        pipeline_sha256=r.pipeline_sha256,
        generation=r.generation,
        files=[
            d.ReportFile(f.name, int(f.kind), f.object.key, f.object.size, f.object.sha256) for f in r.files
        ],
        wells=r.wells,
        sites=r.sites,
        missing_sites=[
            d.MissingSite(m.site.well, m.site.site, _state_in(m.state), m.reason) for m in r.missing_sites
        ],
        qc=_qc_json(r.qc) if r.HasField("qc") else None,
    )


def _report(r: d.Report) -> catalog_pb2.PlateReport:
    return catalog_pb2.PlateReport(
        plate=r.plate,
        pipeline_sha256=r.pipeline_sha256,
        version=r.version,
        files=[
            catalog_pb2.ReportFile(
                name=f.name,
                kind=cast("catalog_pb2.ReportFileKind.ValueType", f.kind),
                object=types_pb2.ObjectRef(key=f.key, size=f.size, sha256=f.sha256),
            )
            for f in r.files
        ],
        wells=r.wells,
        sites=r.sites,
        missing_sites=[
            catalog_pb2.MissingSite(
                site=types_pb2.SiteRef(plate=r.plate, well=m.well, site=m.site),
                state=_state(m.state) if m.state is not None else types_pb2.SITE_STATE_UNSPECIFIED,
                reason=m.reason,
            )
            for m in r.missing_sites
        ],
        created_at=_ts(r.created_at),
        generation=r.generation,
        qc=_qc(r.qc) if r.qc else None,
    )
