"""An in-memory catalog for the reducer's tests: the calls the reducer makes
(GetPlate, GetPipeline, ListSites, ListImages, GetPlateReport,
RegisterPlateReport), with
the catalog's rules for reports: one report per (run, generation), versions
1, 2, …, a generation must be from 1 up to the run's and not older than the
latest report's. It is not the catalog; the catalog's own tests cover it."""

from __future__ import annotations

from typing import Any

import grpc
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from google.protobuf import timestamp_pb2

Context = grpc.aio.ServicerContext[Any, Any]


class FakeCatalog(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self) -> None:
        self.plates: dict[str, catalog_pb2.Plate] = {}
        self.pipelines: dict[str, catalog_pb2.Pipeline] = {}
        self.jobs: dict[str, list[catalog_pb2.SiteJob]] = {}
        self.generation: dict[str, int] = {}  # plate -> its run's generation
        self.reports: dict[str, list[catalog_pb2.PlateReport]] = {}
        self.list_sites_requests: list[catalog_pb2.ListSitesRequest] = []
        # Small pages, so every reduce walks several of them as on a big plate.
        self.sites_page_size = 5
        self.register_calls = 0
        self.images: dict[str, list[catalog_pb2.Image]] = {}
        self.images_page_size = 5

    async def GetPlate(
        self, request: catalog_pb2.GetPlateRequest, context: Context
    ) -> catalog_pb2.GetPlateResponse:
        if request.name not in self.plates:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no plate {request.name!r}")
        return catalog_pb2.GetPlateResponse(plate=self.plates[request.name])

    async def GetPipeline(
        self, request: catalog_pb2.GetPipelineRequest, context: Context
    ) -> catalog_pb2.GetPipelineResponse:
        if request.sha256 not in self.pipelines:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such pipeline")
        return catalog_pb2.GetPipelineResponse(pipeline=self.pipelines[request.sha256])

    async def ListSites(
        self, request: catalog_pb2.ListSitesRequest, context: Context
    ) -> catalog_pb2.ListSitesResponse:
        self.list_sites_requests.append(request)
        if request.plate not in self.plates:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no plate {request.plate!r}")
        start = int(request.page_token or 0)
        every = self.jobs.get(request.plate, [])
        end = start + self.sites_page_size
        jobs = []
        for job in every[start:end]:
            copy = catalog_pb2.SiteJob()
            copy.CopyFrom(job)
            if not request.with_results:
                copy.ClearField("results")
                copy.ClearField("provenance")
            jobs.append(copy)
        return catalog_pb2.ListSitesResponse(sites=jobs, next_page_token=str(end) if end < len(every) else "")

    async def ListImages(
        self, request: catalog_pb2.ListImagesRequest, context: Context
    ) -> catalog_pb2.ListImagesResponse:
        start = int(request.page_token or 0)
        every = self.images.get(request.plate, [])
        end = start + self.images_page_size
        return catalog_pb2.ListImagesResponse(
            images=every[start:end], next_page_token=str(end) if end < len(every) else ""
        )

    async def GetPlateReport(
        self, request: catalog_pb2.GetPlateReportRequest, context: Context
    ) -> catalog_pb2.GetPlateReportResponse:
        reports = self.reports.get(request.plate, [])
        if not reports:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"plate {request.plate!r} has no report yet")
        return catalog_pb2.GetPlateReportResponse(report=reports[-1])

    async def RegisterPlateReport(
        self, request: catalog_pb2.RegisterPlateReportRequest, context: Context
    ) -> catalog_pb2.RegisterPlateReportResponse:
        self.register_calls += 1
        report = request.report
        if report.generation < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "generation is required")
        reports = self.reports.setdefault(report.plate, [])
        for existing in reports:
            if existing.generation == report.generation:
                return catalog_pb2.RegisterPlateReportResponse(recorded=False, report=existing)
        if report.generation > self.generation[report.plate]:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "generation is ahead of the run")
        if reports and report.generation < reports[-1].generation:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "older than the latest report")
        stored = catalog_pb2.PlateReport()
        stored.CopyFrom(report)
        stored.version = len(reports) + 1
        stored.created_at.CopyFrom(timestamp_pb2.Timestamp(seconds=1_800_000_000 + stored.version))
        reports.append(stored)
        return catalog_pb2.RegisterPlateReportResponse(recorded=True, report=stored)
