"""A small in-memory catalog (and reducer) for the client's tests, served by a
real grpc.aio server on 127.0.0.1:0 in a thread of its own, so synchronous
tests (the command line runs its own event loop) and asynchronous tests can
both call it.

It follows catalog.proto for the calls the client makes; it is not the
catalog: state transitions, pipelines' validation and the database are the
catalog's own tests' business.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator

import grpc
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2
from cellmesh.reducer.v1 import reducer_pb2, reducer_pb2_grpc

Slot = tuple[str, str, int, str]


class FakeCatalog(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self) -> None:
        self.plates: dict[str, catalog_pb2.Plate] = {}
        self.pipelines: dict[str, catalog_pb2.Pipeline] = {}
        self.images: dict[Slot, catalog_pb2.Image] = {}
        self.register_calls: list[list[catalog_pb2.ImageRegistration]] = []
        self.sites: dict[str, list[catalog_pb2.SiteJob]] = {}
        self.requeue_calls: list[catalog_pb2.RequeueSitesRequest] = []
        self.progress_stream: list[catalog_pb2.PlateProgress] = []
        self.reports: dict[tuple[str, int], catalog_pb2.PlateReport] = {}
        self.list_images_page = 40  # smaller than the client asks for: paging is exercised

    # helpers for tests

    def add_plate(self, name: str, channels: list[str], **kw: object) -> catalog_pb2.Plate:
        plate = catalog_pb2.Plate(name=name, channels=channels, pipeline_sha256=["ab" * 32], **kw)  # type: ignore[arg-type]
        self.plates[name] = plate
        return plate

    def registered(self, plate: str) -> list[catalog_pb2.Image]:
        return [i for slot, i in sorted(self.images.items()) if slot[0] == plate]

    # pipelines

    async def RegisterPipeline(self, request, context):  # type: ignore[no-untyped-def]
        if b"CalculateStatistics" in request.content:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "CalculateStatistics needs every site at once"
            )
        sha = hashlib.sha256(request.content).hexdigest()
        known = sha in self.pipelines
        if not known:
            self.pipelines[sha] = catalog_pb2.Pipeline(
                ref=types_pb2.PipelineRef(sha256=sha, key=f"pipelines/{sha}.cppipe"),
                name=request.name,
                modules=["Images", "Metadata", "NamesAndTypes", "Groups", "IdentifyPrimaryObjects"],
                image_names=["DNA"],
                tables=["Image", "Nuclei"],
            )
        return catalog_pb2.RegisterPipelineResponse(pipeline=self.pipelines[sha], already_registered=known)

    async def ListPipelines(self, request, context):  # type: ignore[no-untyped-def]
        return catalog_pb2.ListPipelinesResponse(pipelines=list(self.pipelines.values()))

    # plates

    async def CreatePlate(self, request, context):  # type: ignore[no-untyped-def]
        if request.name in self.plates:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"plate {request.name} exists")
        if request.pipeline_sha256 not in self.pipelines:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"pipeline {request.pipeline_sha256} is not registered"
            )
        plate = catalog_pb2.Plate(
            name=request.name,
            channels=request.channels,
            pipeline_sha256=[request.pipeline_sha256],
            reduce_with_failures=request.reduce_with_failures,
            sites_known=request.HasField("layout"),
        )
        if request.HasField("layout"):
            plate.layout.CopyFrom(request.layout)
        self.plates[plate.name] = plate
        return catalog_pb2.CreatePlateResponse(plate=plate)

    async def _plate(self, name: str, context) -> catalog_pb2.Plate:  # type: ignore[no-untyped-def]
        if name not in self.plates:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"plate {name} does not exist")
        return self.plates[name]

    async def GetPlate(self, request, context):  # type: ignore[no-untyped-def]
        return catalog_pb2.GetPlateResponse(plate=await self._plate(request.name, context))

    async def ListPlates(self, request, context):  # type: ignore[no-untyped-def]
        return catalog_pb2.ListPlatesResponse(plates=list(self.plates.values()))

    async def FinishAcquisition(self, request, context):  # type: ignore[no-untyped-def]
        plate = await self._plate(request.plate, context)
        plate.acquisition_finished = True
        plate.sites_known = True
        return catalog_pb2.FinishAcquisitionResponse(plate=plate)

    # images

    async def RegisterImages(self, request, context):  # type: ignore[no-untyped-def]
        self.register_calls.append(list(request.images))
        if len(request.images) > 10_000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "at most 10,000 images per call")
        for reg in request.images:  # the whole batch is checked first
            plate = await self._plate(reg.site.plate, context)
            if reg.channel not in plate.channels:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{reg.channel} is not a channel")
            if not reg.object.key or len(reg.object.sha256) != 64 or reg.object.size <= 0:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "object key, size and sha256 are required"
                )
            old = self.images.get((reg.site.plate, reg.site.well, reg.site.site, reg.channel))
            if old is not None and old.object.sha256 != reg.object.sha256 and not reg.replace:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{reg.site.well} has another image")
        outcomes = []
        ready = 0
        for reg in request.images:
            s = reg.site
            slot = (s.plate, s.well, s.site, reg.channel)
            old = self.images.get(slot)
            if old is not None and old.object.sha256 == reg.object.sha256:
                outcomes.append(catalog_pb2.REGISTRATION_OUTCOME_UNCHANGED)
                continue
            outcomes.append(
                catalog_pb2.REGISTRATION_OUTCOME_REPLACED if old else catalog_pb2.REGISTRATION_OUTCOME_CREATED
            )
            self.images[slot] = catalog_pb2.Image(
                site=reg.site, channel=reg.channel, object=reg.object, file_name=reg.file_name
            )
            channels = self.plates[s.plate].channels
            if old is None and all((s.plate, s.well, s.site, c) in self.images for c in channels):
                ready += 1
        for name in {reg.site.plate for reg in request.images}:
            self.plates[name].image_count = sum(1 for slot in self.images if slot[0] == name)
        return catalog_pb2.RegisterImagesResponse(outcomes=outcomes, sites_ready=ready)

    async def ListImages(self, request, context):  # type: ignore[no-untyped-def]
        await self._plate(request.plate, context)
        images = [
            i for i in self.registered(request.plate) if not request.well or i.site.well == request.well
        ]
        start = int(request.page_token or 0)
        size = min(request.page_size or 10_000, self.list_images_page)
        end = start + size
        token = str(end) if end < len(images) else ""
        return catalog_pb2.ListImagesResponse(images=images[start:end], next_page_token=token)

    # sites

    async def ListSites(self, request, context):  # type: ignore[no-untyped-def]
        await self._plate(request.plate, context)
        jobs = self.sites.get(request.plate, [])
        if request.states:
            jobs = [j for j in jobs if j.state in request.states]
        return catalog_pb2.ListSitesResponse(sites=jobs)

    async def RequeueSites(self, request, context):  # type: ignore[no-untyped-def]
        await self._plate(request.plate, context)
        self.requeue_calls.append(request)
        jobs = self.sites.get(request.plate, [])
        if request.sites:
            wanted = {(s.well, s.site) for s in request.sites}
            chosen = [j for j in jobs if (j.site.well, j.site.site) in wanted]
        else:
            chosen = [j for j in jobs if j.state == types_pb2.SITE_STATE_FAILED]
        for job in chosen:
            job.state = types_pb2.SITE_STATE_READY
        return catalog_pb2.RequeueSitesResponse(requeued=len(chosen))

    # progress and reports

    async def GetPlateProgress(self, request, context):  # type: ignore[no-untyped-def]
        await self._plate(request.plate, context)
        last = (
            self.progress_stream[-1]
            if self.progress_stream
            else catalog_pb2.PlateProgress(plate=request.plate)
        )
        return catalog_pb2.GetPlateProgressResponse(progress=last)

    async def WatchPlateProgress(self, request, context):  # type: ignore[no-untyped-def]
        await self._plate(request.plate, context)
        for progress in self.progress_stream:
            await asyncio.sleep(0.01)
            yield catalog_pb2.WatchPlateProgressResponse(progress=progress)

    async def GetPlateReport(self, request, context):  # type: ignore[no-untyped-def]
        await self._plate(request.plate, context)
        versions = [v for (p, v) in self.reports if p == request.plate]
        version = request.version or max(versions, default=0)
        report = self.reports.get((request.plate, version))
        if report is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"plate {request.plate} has no report v{version}")
        return catalog_pb2.GetPlateReportResponse(report=report)


class FakeReducer(reducer_pb2_grpc.ReducerServiceServicer):
    def __init__(self, catalog: FakeCatalog) -> None:
        self.catalog = catalog
        self.calls: list[reducer_pb2.ReducePlateRequest] = []

    async def ReducePlate(self, request, context):  # type: ignore[no-untyped-def]
        self.calls.append(request)
        await self.catalog._plate(request.plate, context)
        version = 1 + max((v for (p, v) in self.catalog.reports if p == request.plate), default=0)
        report = catalog_pb2.PlateReport(
            plate=request.plate, pipeline_sha256="ab" * 32, version=version, wells=2
        )
        self.catalog.reports[(request.plate, version)] = report
        return reducer_pb2.ReducePlateResponse(report=report)


class ServerThread:
    """Serves the fakes on 127.0.0.1:<free port> from an event loop in a
    thread of its own."""

    def __init__(self) -> None:
        self.catalog = FakeCatalog()  # type: ignore[abstract]  # the rest answer UNIMPLEMENTED
        self.reducer = FakeReducer(self.catalog)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self._server = grpc.aio.server()
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server(self.catalog, self._server)
        reducer_pb2_grpc.add_ReducerServiceServicer_to_server(self.reducer, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def start(self) -> ServerThread:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def serve() -> Iterator[ServerThread]:
    server = ServerThread().start()
    try:
        yield server
    finally:
        server.stop()
