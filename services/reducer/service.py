"""The reducer's service side: from a (plate, pipeline) run to a registered
plate report.

``Reducer`` does the work for both entry points:

* ``reduce_run(run)`` for the queue consumer (a PlateReduceTask's RunClaim):
  the report of that results generation. If the catalog already holds a
  report of this generation or a newer one, that report is returned and
  nothing is redone (a redelivered or stale task).
* ``reduce_now(plate, …)`` for ``ReducerService.ReducePlate``: the current
  results, even while sites are still running (they are listed as missing).

Both read the sites and their result keys from the catalog (``ListSites`` page by page, with
results; never by listing a bucket), reduce them with
:func:`services.reducer.reduce.reduce_plate`, draw the heatmaps, upload every
file and register the report with its checksums.

Where reports are stored
    ``reports/<plate>/<pipeline_sha256[:12]>/g<generation>/<inputs>/<file>``
    for a run's generation, where ``<inputs>`` is the first 16 hex digits of a
    digest of what the report is made of (every result file's SHA-256, the
    missing sites and their reasons, the reduce options, the CellProfiler Analyst
    image prepend). The same generation
    reduced twice from the same results writes the same keys with the same
    bytes (outputs are deterministic); if the results changed in between, the
    second reduce writes beside the first and never over the objects of a
    report the catalog already registered.

    ``reports/<plate>/<pipeline_sha256[:12]>/ondemand-<UTC time>/<file>`` for
    an on-demand reduce.

Generations of on-demand reports
    The catalog keeps one report per (run, generation), accepts only
    generations from 1 up to the run's current one and never one older than
    its latest report; a generation counts the sites settled so far, so the
    same generation means the same results. An on-demand reduce therefore
    registers generation (latest report's generation + 1): if sites settled
    since the latest report, that is a real generation whose results the
    report shows (or older ones: a later scheduled reduce makes the next
    version either way); if none did, the catalog refuses it as ahead of the
    run, the uploaded files are deleted and the latest report, which shows the
    same results, is returned. Its files live under ``ondemand-<UTC time>/``,
    so they never meet a scheduled reduce's keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import shutil
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from cellmesh import cpa as cpa_names
from cellmesh import keys, pages
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2
from cellmesh.platemap import PlateMap
from cellmesh.reducer.v1 import reducer_pb2, reducer_pb2_grpc

from services.common.retry import GaveUp, with_backoff
from services.common.s3 import ObjectStore, ObjectStoreError, ObjectStoreMisconfigured, StoreGate
from services.reducer import cpa, plots, qcpage
from services.reducer.reduce import (
    FileKind,
    FileRef,
    MissingSite,
    OutputFile,
    ReduceOptions,
    ReduceOutputs,
    SiteInput,
    UnknownFeature,
    reduce_plate,
)

if TYPE_CHECKING:
    from cellmesh.catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub

log = logging.getLogger(__name__)

T = TypeVar("T")

CATALOG_TIMEOUT = 60.0

_KINDS = {
    FileKind.OBJECT_TABLE_PARQUET: catalog_pb2.REPORT_FILE_KIND_OBJECT_TABLE_PARQUET,
    FileKind.OBJECT_TABLE_CSV: catalog_pb2.REPORT_FILE_KIND_OBJECT_TABLE_CSV,
    FileKind.WELL_TABLE: catalog_pb2.REPORT_FILE_KIND_WELL_TABLE,
    FileKind.HEATMAP_PNG: catalog_pb2.REPORT_FILE_KIND_HEATMAP_PNG,
    FileKind.SUMMARY_JSON: catalog_pb2.REPORT_FILE_KIND_SUMMARY_JSON,
    FileKind.QC_TABLE: catalog_pb2.REPORT_FILE_KIND_QC_TABLE,
    FileKind.QC_PLOT_PNG: catalog_pb2.REPORT_FILE_KIND_QC_PLOT_PNG,
    FileKind.QC_PAGE: catalog_pb2.REPORT_FILE_KIND_QC_PAGE,
    FileKind.CPA_DATABASE: catalog_pb2.REPORT_FILE_KIND_CPA_DATABASE,
    FileKind.CPA_PROPERTIES: catalog_pb2.REPORT_FILE_KIND_CPA_PROPERTIES,
}
_CONTENT_TYPES = {
    ".parquet": "application/vnd.apache.parquet",
    ".gz": "application/gzip",
    ".csv": "text/csv",
    ".png": "image/png",
    ".json": "application/json",
    ".sqlite": "application/vnd.sqlite3",
    ".properties": "text/plain",
    ".html": "text/html; charset=utf-8",
}
# Files of a site job that are not per-object tables.
_NOT_TABLES = (
    "Experiment",
    "Object relationships",
    "Relationships",
    "cellmesh_done",
)  # and the worker's done-file


class PlateNotFound(LookupError):
    """The catalog has no such plate."""


class NothingToReduce(RuntimeError):
    """No site of the plate has results yet."""


def _state_name(state: int) -> str:
    return types_pb2.SiteState.Name(state).removeprefix("SITE_STATE_")  # type: ignore[arg-type]


def table_files(results: Sequence[catalog_pb2.ResultFile], tables: Sequence[str]) -> dict[str, FileRef]:
    """A site job's result files that are the pipeline's tables: table -> file.

    ExportToSpreadsheet may put a prefix before every table's file name
    (``MyExpt_Image.csv``); the prefix that names the most tables is used.
    Without a table list, every CSV other than the Experiment and relationship
    files is a table named after its file."""
    by_stem: dict[str, catalog_pb2.ResultFile] = {}
    for r in results:
        name = r.name.rsplit("/", 1)[-1]
        stem, _, ext = name.rpartition(".")
        if stem and ext.lower() in ("csv", "txt", "tsv"):
            by_stem[stem] = r

    def ref(r: catalog_pb2.ResultFile) -> FileRef:
        return FileRef(r.object.key, r.object.sha256, r.object.size)

    if not tables:
        return {s: ref(r) for s, r in by_stem.items() if s not in _NOT_TABLES}
    prefixes = {stem[: -len(t)] for stem in by_stem for t in tables if stem.endswith(t)}
    if not prefixes:
        return {}
    best = max(sorted(prefixes), key=lambda p: (sum(p + t in by_stem for t in tables), -len(p)))
    return {t: ref(by_stem[best + t]) for t in tables if best + t in by_stem}


@dataclass(frozen=True)
class _Run:
    plate: catalog_pb2.Plate
    pipeline_sha256: str
    pipeline_name: str
    tables: list[str]
    sites: list[SiteInput]
    missing: list[MissingSite]
    cp_versions: list[str]

    @property
    def platemap(self) -> PlateMap | None:
        return platemap_of(self.plate)

    @property
    def qc_gate(self) -> dict[str, Any] | None:
        if not self.plate.HasField("qc_gate"):
            return None
        g = self.plate.qc_gate
        return {
            "feature": g.feature,
            "min_z_prime": g.min_z_prime if g.HasField("min_z_prime") else None,
            "max_failed_share": g.max_failed_share if g.HasField("max_failed_share") else None,
            "control_column": g.control_column,
            "dose_column": g.dose_column,
        }


def platemap_of(plate: catalog_pb2.Plate) -> PlateMap | None:
    """The plate's map as the reducer joins it, or None."""
    if not plate.HasField("plate_map"):
        return None
    m = plate.plate_map
    columns = tuple(m.columns)
    return PlateMap(
        columns, {w.well: {c: w.values.get(c, "") for c in columns} for w in m.wells}, m.located_by
    )


class Reducer:
    """Reduces plates into registered reports. `catalog` is an async
    CatalogService stub, `store` an open ObjectStore; `work_dir` holds each
    reduce's files until they are uploaded."""

    def __init__(
        self,
        catalog: CatalogServiceAsyncStub,
        store: ObjectStore,
        work_dir: Path | None = None,
        options: ReduceOptions | None = None,
        max_concurrent: int = 1,
        transient_budget: float = 300.0,
        image_url_prepend: str | None = None,
    ) -> None:
        self.transient_budget = transient_budget
        #: Where CellProfiler Analyst finds the images (default: the store's URL of the bucket).
        self.image_url_prepend = (
            image_url_prepend
            if image_url_prepend is not None
            else cpa_names.store_url(
                store.settings.endpoint_url, store.settings.bucket, store.settings.region
            )
        )
        self._catalog = catalog
        self._store = store
        self._work_dir = work_dir or Path(tempfile.gettempdir()) / "cellmesh-reducer"
        self._options = options or ReduceOptions()
        self._slots = asyncio.Semaphore(max_concurrent)

    async def reduce_run(self, run: catalog_pb2.RunClaim) -> catalog_pb2.PlateReport:
        """The report of a run's generation (for PlateReduceTask). Catalog
        errors propagate unchanged, so the caller can tell transient ones
        apart; object-store outages are retried for up to `transient_budget`
        seconds per request (then GaveUp), an unusable store raises
        ObjectStoreMisconfigured."""
        existing = await self._latest_report(run.plate, run.pipeline.sha256)
        if existing is not None and existing.generation >= run.generation:
            log.info(
                "plate %s generation %d: report v%d (generation %d) is there already",
                run.plate,
                run.generation,
                existing.version,
                existing.generation,
            )
            return existing
        async with self._slots:
            info = await self._load(run.plate, run.pipeline.sha256)
            return await self._reduce(info, run.generation, f"g{run.generation}", (), "")

    async def reduce_now(
        self, plate: str, pipeline_sha256: str = "", heatmap_features: Sequence[str] = ()
    ) -> catalog_pb2.PlateReport:
        """Reduces a plate's current results into a new report version (or
        returns the latest report if no site settled since it was made)."""
        async with self._slots:
            info = await self._load(plate, pipeline_sha256)
            if not info.sites:
                raise NothingToReduce(f"no site of plate {plate} has results yet")
            latest = await self._latest_report(plate, info.pipeline_sha256)
            generation = (latest.generation if latest is not None else 0) + 1
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            return await self._reduce(
                info, generation, f"ondemand-{stamp}", tuple(heatmap_features), f"on demand {stamp}"
            )

    async def _latest_report(self, plate: str, pipeline_sha256: str) -> catalog_pb2.PlateReport | None:
        try:
            reply = await self._catalog.GetPlateReport(
                catalog_pb2.GetPlateReportRequest(plate=plate, pipeline_sha256=pipeline_sha256),
                timeout=CATALOG_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return reply.report

    async def _load(self, plate_name: str, pipeline_sha256: str) -> _Run:
        try:
            plate = (
                await self._catalog.GetPlate(
                    catalog_pb2.GetPlateRequest(name=plate_name), timeout=CATALOG_TIMEOUT
                )
            ).plate
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise PlateNotFound(f"no plate named {plate_name!r}") from exc
            raise
        sha = pipeline_sha256 or (plate.pipeline_sha256[0] if plate.pipeline_sha256 else "")
        if not sha:
            raise NothingToReduce(f"plate {plate_name} has no pipeline")
        name, tables = sha[:12], []
        try:
            pipeline = (
                await self._catalog.GetPipeline(
                    catalog_pb2.GetPipelineRequest(sha256=sha), timeout=CATALOG_TIMEOUT
                )
            ).pipeline
            name, tables = pipeline.name or name, list(pipeline.tables)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        sites: list[SiteInput] = []
        missing: list[MissingSite] = []
        versions: set[str] = set()
        # Page by page: only the small per-site inputs are kept, never a
        # whole plate of catalog messages.
        async for job in self._site_jobs(plate_name, sha):
            s = job.site
            state = _state_name(job.state)
            if job.state != types_pb2.SITE_STATE_DONE:
                reason = job.failure_reason or f"not done yet ({state.lower()})"
                missing.append(MissingSite(s.plate or plate_name, s.well, s.site, state, reason))
                continue
            files = table_files(job.results, tables)
            if not files:
                missing.append(MissingSite(s.plate or plate_name, s.well, s.site, state, "no result tables"))
                continue
            sites.append(SiteInput(s.plate or plate_name, s.well, s.site, files))
            if job.provenance.cellprofiler_version:
                versions.add(job.provenance.cellprofiler_version)
        return _Run(plate, sha, name, tables, sites, missing, sorted(versions))

    async def _site_jobs(self, plate_name: str, sha: str) -> AsyncIterator[catalog_pb2.SiteJob]:
        """Every site job of the plate's run, in plate order, one ListSites
        page at a time."""
        request = catalog_pb2.ListSitesRequest(plate=plate_name, pipeline_sha256=sha, with_results=True)
        async for job in pages.site_jobs(self._catalog, request, CATALOG_TIMEOUT):
            yield job

    async def _reduce(
        self, info: _Run, generation: int, folder: str, features: tuple[str, ...], on_demand: str
    ) -> catalog_pb2.PlateReport:
        """Reduces, uploads and registers. `on_demand` is the request's time
        for an on-demand reduce, empty for a run's generation."""
        plate = info.plate.name
        options = dataclasses.replace(
            self._options,
            require_features=features,
            labels={
                **dict(self._options.labels),
                "pipeline_sha256": info.pipeline_sha256,
                "pipeline_name": info.pipeline_name,
                "generation": generation,
                "on_demand": bool(on_demand),
                "cellprofiler_versions": info.cp_versions,
            },
        )
        if not on_demand:
            folder = f"{folder}/{_inputs_digest(info, options, self.image_url_prepend)}"
        prefix = f"{keys.run_reports(plate, info.pipeline_sha256)}{folder}"
        when = on_demand or f"generation {generation}"
        await asyncio.to_thread(self._work_dir.mkdir, parents=True, exist_ok=True)
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=f"{plate}-", dir=self._work_dir))
        try:
            started = time.perf_counter()
            outputs = await reduce_plate(
                info.sites,
                self._fetch,
                work / "out",
                missing=info.missing,
                options=options,
                platemap=info.platemap,
                qc_gate=info.qc_gate,
            )
            files = outputs.files + await asyncio.to_thread(_draw, outputs, info, features, when)
            files += await self._cpa(outputs, info, work)
            stored: list[catalog_pb2.ReportFile] = []
            for f in files:
                obj = await self._s3(
                    f"upload {prefix}/{f.name}",
                    lambda f=f: self._store.put_file(f"{prefix}/{f.name}", f.path, _content_type(f.name)),  # type: ignore[misc]
                )
                stored.append(
                    catalog_pb2.ReportFile(
                        name=f.name,
                        kind=_KINDS[f.kind],
                        object=types_pb2.ObjectRef(key=obj.key, size=obj.size, sha256=obj.sha256),
                    )
                )
            log.info(
                "reduced plate %s (%s): %d wells, %d sites, %d missing in %.1f s",
                plate,
                when,
                len(outputs.wells),
                outputs.sites,
                len(outputs.missing),
                time.perf_counter() - started,
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        report = catalog_pb2.PlateReport(
            plate=plate,
            pipeline_sha256=info.pipeline_sha256,
            files=stored,
            wells=len(outputs.wells),
            sites=outputs.sites,
            missing_sites=[
                catalog_pb2.MissingSite(
                    site=types_pb2.SiteRef(plate=m.plate, well=m.well, site=m.site),
                    state=types_pb2.SiteState.Value(f"SITE_STATE_{m.state}"),
                    reason=m.reason,
                )
                for m in outputs.missing
            ],
            generation=generation,
        )
        verdict = outputs.qc.verdict if outputs.qc is not None else None
        if verdict is not None:
            report.qc.CopyFrom(
                catalog_pb2.PlateQc(
                    gated=True,
                    passed=bool(verdict["passed"]),
                    failures=list(verdict["failures"]),
                    failed_share=float(verdict["failed_share"]),
                )
            )
            if verdict["z_prime"] is not None:
                report.qc.z_prime = float(verdict["z_prime"])
        try:
            reply = await self._catalog.RegisterPlateReport(
                catalog_pb2.RegisterPlateReportRequest(report=report), timeout=CATALOG_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            # Ahead of the run (nothing settled since the latest report) or
            # older than a report registered meanwhile: the latest one stands.
            latest = await self._latest_report(plate, info.pipeline_sha256)
            if latest is None or (not on_demand and latest.generation < generation):
                raise
            log.info(
                "plate %s (%s): %s; the latest report v%d stands", plate, when, exc.details(), latest.version
            )
            if on_demand:
                await self._discard(stored)
            return latest
        if not reply.recorded:
            log.info(
                "plate %s generation %d was registered before (v%d); kept that report",
                plate,
                generation,
                reply.report.version,
            )
            if on_demand:
                await self._discard(stored)
        return reply.report

    async def _cpa(self, outputs: ReduceOutputs, info: _Run, work: Path) -> list[OutputFile]:
        """The CellProfiler Analyst database and properties of a reduce
        (services/reducer/cpa.py), with the plate's images from the catalog,
        page by page. Tables CPA cannot hold (too many columns) or an SQLite
        error leave the pair out, with a warning; catalog errors fail the
        reduce."""
        image_table = str(outputs.summary.get("image_table", "Image"))
        if image_table not in outputs.tables:
            log.info("plate %s: no %s table, so no CellProfiler Analyst database", outputs.plate, image_table)
            return []
        layout = info.plate.layout
        inp = cpa.CpaInput(
            plate=outputs.plate,
            out_dir=outputs.out_dir,
            image_table=image_table,
            object_tables=[t for t in outputs.tables if t != image_table],
            features=outputs.features,
            channels=list(info.plate.channels),
            rows=layout.rows,
            columns=layout.columns,
            location_object=outputs.count_object,
            image_url_prepend=self.image_url_prepend,
        )
        started = time.perf_counter()
        writer = await asyncio.to_thread(cpa.CpaWriter, inp, work)
        try:
            request = catalog_pb2.ListImagesRequest(plate=info.plate.name)
            async for page in pages.image_pages(self._catalog, request, CATALOG_TIMEOUT):
                images = [cpa.StoredImage(i.site.well, i.site.site, i.channel, i.object.key) for i in page]
                await asyncio.to_thread(writer.add_images, images)
            summary = await asyncio.to_thread(writer.finish)
        except (cpa.CpaError, sqlite3.Error, OSError) as exc:
            # The rest of the report stands without it.
            log.warning("plate %s: no CellProfiler Analyst database: %s", outputs.plate, exc)
            return []
        finally:
            await asyncio.to_thread(writer.close)
        log.info(
            "plate %s: CellProfiler Analyst database of %d image sets, %d objects (%d columns) in %.1f s",
            outputs.plate,
            summary.images,
            summary.objects,
            summary.object_columns,
            time.perf_counter() - started,
        )
        if summary.images_missing:
            log.warning(
                "plate %s: image sets without a stored image: %s", outputs.plate, summary.images_missing
            )
        return [
            OutputFile(cpa_names.DATABASE, FileKind.CPA_DATABASE, writer.db_path),
            OutputFile(cpa_names.PROPERTIES, FileKind.CPA_PROPERTIES, writer.properties_path),
        ]

    async def _discard(self, files: Sequence[catalog_pb2.ReportFile]) -> None:
        """Deletes uploaded files no report refers to (best effort)."""
        for f in files:
            try:
                await self._store.delete(f.object.key)
            except ObjectStoreError as exc:
                log.warning("could not delete %s: %s", f.object.key, exc)

    async def _fetch(self, key: str, sha256: str) -> bytes:
        # reduce_plate checks the SHA-256 itself.
        return await self._s3(f"download {key}", lambda: self._store.get_bytes(key))

    async def _s3(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """An object-store request, retried through outages for up to the
        transient budget; then GaveUp with what failed and for how long."""
        try:
            return await with_backoff(
                call,
                what,
                transient=lambda exc: isinstance(exc, ObjectStoreError),
                first_delay=0.5,
                max_delay=15.0,
                give_up_after=self.transient_budget,
            )
        except GaveUp as exc:
            raise GaveUp(
                f"the object store did not answer for {self.transient_budget:.0f} s "
                f"(TRANSIENT_BUDGET_S): {exc}"
            ) from exc


def _inputs_digest(info: _Run, options: ReduceOptions, image_url_prepend: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"cpa image_url_prepend {image_url_prepend}\n".encode())
    for s in sorted(info.sites, key=lambda s: (s.well, s.site)):
        for table, ref in sorted(s.tables.items()):
            digest.update(f"{s.well}/{s.site}/{table}/{ref.key}/{ref.sha256}\n".encode())
    for m in sorted(info.missing, key=lambda m: (m.well, m.site)):
        digest.update(f"missing {m.well}/{m.site}/{m.state}/{m.reason}\n".encode())
    digest.update(repr(sorted((k, repr(v)) for k, v in vars(options).items())).encode())
    if info.plate.HasField("plate_map"):
        digest.update(f"platemap {info.plate.plate_map.sha256}\n".encode())
    digest.update(f"qc gate {sorted((info.qc_gate or {}).items())}\n".encode())
    return digest.hexdigest()[:16]


def _content_type(name: str) -> str:
    return _CONTENT_TYPES.get("." + name.rsplit(".", 1)[-1].lower(), "application/octet-stream")


def _draw(outputs: ReduceOutputs, info: _Run, features: Sequence[str], when: str) -> list[OutputFile]:
    """The cells-per-well heatmap and one heatmap per requested feature."""
    layout = info.plate.layout
    shape = (layout.rows, layout.columns) if layout.rows > 0 and layout.columns > 0 else None
    versions = ", ".join(info.cp_versions) or "unknown"
    subtitle = (
        f"pipeline {info.pipeline_name} ({info.pipeline_sha256[:12]}) · CellProfiler {versions} · {when}"
    )
    missing = list(outputs.missing_per_well)
    drawn: list[OutputFile] = []
    labels = qcpage.well_labels(info.platemap, outputs.qc)

    def save(name: str, fig: Any, kind: FileKind = FileKind.HEATMAP_PNG) -> None:
        path = outputs.out_dir / name
        path.write_bytes(plots.png_bytes(fig))
        drawn.append(OutputFile(name, kind, path))

    if outputs.count_object is not None:
        fig = plots.plate_heatmap(
            outputs.cells_per_well,
            title=f"{outputs.plate} — {outputs.count_object} per well\n{subtitle}",
            label=f"{outputs.count_object} per well (sum over sites)",
            wells_with_missing=missing,
            shape=shape,
            well_labels=labels,
        )
        save("heatmap_cells_per_well.png", fig)
    for feature in features:
        table, column, values = outputs.well_values(feature)
        fig = plots.plate_heatmap(
            values,
            title=f"{outputs.plate} — median {column}\n{subtitle}",
            label=f"median of {column} per well",
            wells_with_missing=missing,
            shape=shape,
            value_format="{:.3g}",
            robust=True,
            well_labels=labels,
        )
        save(f"heatmap_{column}.png", fig)
    if outputs.qc is not None:
        drawn += qcpage.draw(outputs, outputs.qc, shape, subtitle, labels)
    return drawn


class ReducerServicer(reducer_pb2_grpc.ReducerServiceServicer):
    """ReducerService: reduce a plate now, on demand."""

    def __init__(self, reducer: Reducer, gate: StoreGate | None = None) -> None:
        self._reducer = reducer
        self._gate = gate

    async def ReducePlate(
        self, request: reducer_pb2.ReducePlateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> reducer_pb2.ReducePlateResponse:
        if not request.plate:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "plate is required")
        if self._gate is not None and self._gate.problem:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"the reducer cannot reduce now: {self._gate.problem}"
            )
        code, message = grpc.StatusCode.INTERNAL, ""
        try:
            report = await self._reducer.reduce_now(
                request.plate, request.pipeline_sha256, list(request.heatmap_features)
            )
            return reducer_pb2.ReducePlateResponse(report=report)
        except PlateNotFound as exc:
            code, message = grpc.StatusCode.NOT_FOUND, str(exc)
        except NothingToReduce as exc:
            code, message = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        except UnknownFeature as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except (ObjectStoreError, GaveUp) as exc:
            code, message = grpc.StatusCode.UNAVAILABLE, f"object store: {exc}"
        except ObjectStoreMisconfigured as exc:
            if self._gate is not None:
                self._gate.close(exc)
            code, message = grpc.StatusCode.FAILED_PRECONDITION, f"the reducer's {exc}"
        except grpc.aio.AioRpcError as exc:
            passed = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}
            code = exc.code() if exc.code() in passed else grpc.StatusCode.UNAVAILABLE
            message = f"catalog: {exc.code().name}: {exc.details()}"
        except Exception as exc:
            log.exception("on-demand reduce of plate %s failed", request.plate)
            code, message = grpc.StatusCode.INTERNAL, f"reduce failed: {type(exc).__name__}: {exc}"
        await context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises
