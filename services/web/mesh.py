"""What the page shows, read through the mesh's typed client (catalog and
reducer over gRPC, files from the object store): plates, well states,
a well's sites, reports, and uploads registered as `cellmesh ingest` does.

Nothing here opens a gRPC channel: `services.web.__main__` makes them with
`services.common.channels` and hands over the client."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import math
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.client import CellmeshClient, CellmeshError, ObjectStore
from cellmesh.common.v1 import types_pb2
from cellmesh.ingest import FileNameParser, Ingester, parse_channel_map

from services.web.thumbs import NotAnImage, thumbnail_png

log = logging.getLogger(__name__)

STATE_NAMES = {
    types_pb2.SITE_STATE_WAITING: "waiting",
    types_pb2.SITE_STATE_READY: "ready",
    types_pb2.SITE_STATE_CLAIMED: "ready",
    types_pb2.SITE_STATE_QUEUED: "queued",
    types_pb2.SITE_STATE_RUNNING: "running",
    types_pb2.SITE_STATE_DONE: "done",
    types_pb2.SITE_STATE_FAILED: "failed",
}
# A well shows the least advanced state of its sites, but a failure first.
_WELL_ORDER = ["waiting", "ready", "queued", "running", "done"]

KIND_NAMES = {
    catalog_pb2.REPORT_FILE_KIND_OBJECT_TABLE_PARQUET: "object_table_parquet",
    catalog_pb2.REPORT_FILE_KIND_OBJECT_TABLE_CSV: "object_table_csv",
    catalog_pb2.REPORT_FILE_KIND_WELL_TABLE: "well_table",
    catalog_pb2.REPORT_FILE_KIND_HEATMAP_PNG: "plot_png",
    catalog_pb2.REPORT_FILE_KIND_SUMMARY_JSON: "summary_json",
    catalog_pb2.REPORT_FILE_KIND_QC_TABLE: "qc_table",
    catalog_pb2.REPORT_FILE_KIND_QC_PLOT_PNG: "plot_png",
    catalog_pb2.REPORT_FILE_KIND_QC_PAGE: "qc_page",
    catalog_pb2.REPORT_FILE_KIND_CPA_DATABASE: "cpa_database",
    catalog_pb2.REPORT_FILE_KIND_CPA_PROPERTIES: "cpa_properties",
}
_WELL_NAME = re.compile(r"^([A-Z]{1,2})(\d{2,3})$")


def row_number(row: str) -> int:
    """ "A" -> 1, "Z" -> 26, "AA" -> 27."""
    return 26 * (ord(row[0]) - 64) + ord(row[1]) - 64 if len(row) == 2 else ord(row) - 64


def row_letters(n: int) -> str:
    return chr(64 + n) if n <= 26 else "A" + chr(64 + n - 26)


def well_state(states: Iterable[str]) -> str:
    """The state a well is drawn in, from its sites' states."""
    seen = list(states)
    if not seen:
        return "none"
    if "failed" in seen:
        return "failed"
    return min(seen, key=_WELL_ORDER.index)


def progress_dict(p: catalog_pb2.PlateProgress) -> dict[str, Any]:
    return {
        "total": p.total,
        "waiting": p.waiting,
        "ready": p.ready,
        "queued": p.queued,
        "running": p.running,
        "done": p.done,
        "failed": p.failed,
        "report_version": p.report_version,
        "complete": p.complete,
        "reduce_failed": p.reduce_failed,
        "reduce_failure_reason": p.reduce_failure_reason,
    }


def plate_dict(plate: catalog_pb2.Plate) -> dict[str, Any]:
    return {
        "name": plate.name,
        "channels": list(plate.channels),
        "rows": plate.layout.rows,
        "columns": plate.layout.columns,
        "sites_per_well": plate.layout.sites_per_well,
        "sites_known": plate.sites_known,
        "acquisition_finished": plate.acquisition_finished,
        "pipelines": list(plate.pipeline_sha256),
        "image_count": plate.image_count,
        "created_at": plate.created_at.ToJsonString() if plate.HasField("created_at") else "",
    }


def _number(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


#: Columns of CellProfiler's tables that describe the run, not the cells.
BOOKKEEPING = (
    "FileName_", "PathName_", "URL_", "MD5Digest_", "Metadata_", "ExecutionTime_", "ModuleError_",
    "Channel_", "Frame_", "Series_", "Scaling_", "Height_", "Width_", "Group_",
)  # fmt: skip


def numeric_columns(row: Mapping[str, str], prefix: str = "") -> dict[str, float]:
    """The row's measurements: every column holding a finite number, except
    CellProfiler's bookkeeping (image and object numbers, file names, module
    timings), also after a table's `prefix` (the reducer's well tables name
    columns `Image_Count_Nuclei`)."""
    out: dict[str, float] = {}
    for name, raw in row.items():
        bare = name.removeprefix(prefix) if prefix else name
        if not name or name.startswith(BOOKKEEPING) or bare.startswith(BOOKKEEPING):
            continue
        if bare in ("ImageNumber", "ObjectNumber"):
            continue
        value = _number(raw)
        if value is not None:
            out[name] = value
    return out


@dataclass(frozen=True)
class UploadResult:
    """What an upload did (the ingest's summary)."""

    files: int
    lines: list[str]
    created: int
    replaced: int
    unchanged: int
    sites_ready: int
    unmatched: list[dict[str, str]]
    conflicts: list[dict[str, str]]


class MeshReader:
    """The page's view of one mesh."""

    def __init__(
        self,
        client: CellmeshClient,
        store: ObjectStore,
        presigner: Any,
        cache_dir: Path,
        *,
        thumbnail_px: int = 256,
        presign_seconds: int = 3600,
        uploader: Callable[[str], CellmeshClient] | None = None,
    ) -> None:
        self.client = client
        # With AUTH=on: a client that calls as the user whose token it gets
        # (uploads register images in the user's name, never the page's).
        self._uploader = uploader
        self.store = store
        self._presigner = presigner
        self.cache_dir = cache_dir
        self.thumbnail_px = thumbnail_px
        self.presign_seconds = presign_seconds
        self._tables: OrderedDict[str, list[dict[str, str]]] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    # Files, by content.

    async def fetch(self, ref: types_pb2.ObjectRef) -> Path:
        """The object `ref` names (a table, a summary), from the cache or the
        store (checked against its registered SHA-256)."""
        path = self.cache_dir / "objects" / ref.sha256
        if path.exists():
            return path
        lock = self._locks.setdefault(ref.sha256, asyncio.Lock())
        async with lock:
            if not path.exists():
                await self.store.download(ref, path)
        self._locks.pop(ref.sha256, None)
        return path

    async def table(self, ref: types_pb2.ObjectRef) -> list[dict[str, str]]:
        """A CSV object's rows (cached by checksum)."""
        cached = self._tables.get(ref.sha256)
        if cached is not None:
            self._tables.move_to_end(ref.sha256)
            return cached
        path = await self.fetch(ref)
        text = await asyncio.to_thread(path.read_text, errors="replace")
        rows = list(csv.DictReader(io.StringIO(text)))
        self._tables[ref.sha256] = rows
        while len(self._tables) > 256:
            self._tables.popitem(last=False)
        return rows

    def presign(self, key: str, file_name: str = "") -> str:
        params: dict[str, str] = {"Bucket": self.store.bucket, "Key": key}
        if file_name:
            params["ResponseContentDisposition"] = f'attachment; filename="{file_name}"'
        return str(
            self._presigner.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=self.presign_seconds
            )
        )

    def presign_inline(self, key: str) -> str:
        return str(
            self._presigner.generate_presigned_url(
                "get_object", Params={"Bucket": self.store.bucket, "Key": key}, ExpiresIn=self.presign_seconds
            )
        )

    # Plates.

    async def plates(self) -> list[dict[str, Any]]:
        plates = await self.client.list_plates()
        progress = await asyncio.gather(*(self._progress_or_none(p.name) for p in plates))
        return [{**plate_dict(p), "progress": g} for p, g in zip(plates, progress, strict=True)]

    async def _progress_or_none(self, plate: str) -> dict[str, Any] | None:
        try:
            return progress_dict(await self.client.progress(plate))
        except CellmeshError as exc:
            if exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                return None
            raise

    async def plate(self, name: str) -> dict[str, Any]:
        plate = await self.client.get_plate(name)
        return {**plate_dict(plate), "progress": await self._progress_or_none(name)}

    async def wells(self, plate_name: str) -> dict[str, Any]:
        """Every well's state, and the plate's shape to draw them in."""
        plate = await self.client.get_plate(plate_name)
        sites: dict[str, list[str]] = {}
        async for job in self.client.iter_sites(plate_name):
            sites.setdefault(job.site.well, []).append(STATE_NAMES.get(job.state, "waiting"))
        for well in plate.layout.wells:
            sites.setdefault(well, [])
        rows, columns = plate.layout.rows or 8, plate.layout.columns or 12
        for well in sites:
            m = _WELL_NAME.match(well)
            if m:
                rows = max(rows, row_number(m.group(1)))
                columns = max(columns, int(m.group(2)))
        wells = {
            well: {"state": well_state(states), "sites": len(states), "done": states.count("done")}
            for well, states in sites.items()
        }
        return {
            "rows": rows,
            "columns": columns,
            "row_names": [row_letters(r) for r in range(1, rows + 1)],
            "wells": wells,
        }

    # A well.

    async def well(self, plate_name: str, well: str) -> dict[str, Any]:
        images = await self.client.list_images(plate_name, well)
        jobs: list[catalog_pb2.SiteJob] = []
        # Jobs come in plate order: the walk stops after the well's last site.
        async for job in self.client.iter_sites(plate_name, with_results=True, page_size=100):
            if job.site.well == well:
                jobs.append(job)
            elif jobs:
                break  # the event loop closes the walk
        if not images and not jobs:
            raise CellmeshError(
                grpc.StatusCode.NOT_FOUND, f"plate {plate_name} has no images or sites in well {well}"
            )
        by_site: dict[int, dict[str, Any]] = {}
        for image in images:
            entry = by_site.setdefault(image.site.site, {"site": image.site.site, "images": []})
            entry["images"].append(
                {
                    "channel": image.channel,
                    "file_name": image.file_name,
                    "sha256": image.object.sha256,
                    "size": image.object.size,
                    "thumbnail": f"/thumbnails/{plate_name}/{well}/{image.site.site}/{image.channel}.png",
                    "download": self.presign(image.object.key, image.file_name),
                }
            )
            entry["metadata"] = dict(image.metadata)
        for job in jobs:
            entry = by_site.setdefault(job.site.site, {"site": job.site.site, "images": []})
            entry.update(await self._job(job))
        return {"plate": plate_name, "well": well, "sites": [by_site[k] for k in sorted(by_site)]}

    async def _job(self, job: catalog_pb2.SiteJob) -> dict[str, Any]:
        p = job.provenance
        out: dict[str, Any] = {
            "state": STATE_NAMES.get(job.state, "waiting"),
            "attempt": job.attempt,
            "failure_class": types_pb2.FailureClass.Name(job.failure_class) if job.failure_class else "",
            "failure_reason": job.failure_reason,
            "worker_id": job.worker_id,
            "execution_id": job.execution_id,
            "metadata": dict(job.metadata),
            "results": [
                {"name": r.name, "size": r.object.size, "download": self.presign(r.object.key, r.name)}
                for r in job.results
            ],
            "measurements": {},
            "provenance": {},
        }
        if job.HasField("provenance"):
            out["provenance"] = {
                "cellprofiler_version": p.cellprofiler_version,
                "pipeline_sha256": p.pipeline_sha256,
                "input_sha256": list(p.input_sha256),
                "worker_id": p.worker_id,
                "mode": p.mode,
                "download_seconds": round(p.download_seconds, 3),
                "run_seconds": round(p.run_seconds, 3),
                "upload_seconds": round(p.upload_seconds, 3),
                "object_counts": dict(p.object_counts),
            }
        image_table = next((r for r in job.results if r.name.endswith("Image.csv")), None)
        if image_table is not None:
            rows = await self.table(image_table.object)
            if rows:
                out["measurements"] = numeric_columns(rows[0])
        return out

    async def thumbnail(self, plate_name: str, well: str, site: int, channel: str) -> bytes:
        """The PNG thumbnail of one registered image (cached by its checksum)."""
        images = await self.client.list_images(plate_name, well)
        image = next((i for i in images if i.site.site == site and i.channel == channel), None)
        if image is None:
            raise CellmeshError(
                grpc.StatusCode.NOT_FOUND,
                f"plate {plate_name} has no {channel} image for well {well} site {site}",
            )
        cached = self.cache_dir / "thumbnails" / f"{image.object.sha256}-{self.thumbnail_px}.png"
        if cached.exists():
            return await asyncio.to_thread(cached.read_bytes)
        # The image itself is not kept: only its thumbnail is.
        source = self.cache_dir / "partial" / f"{image.object.sha256}-{id(image)}"
        try:
            await self.store.download(image.object, source)
            data = await asyncio.to_thread(source.read_bytes)
        finally:
            source.unlink(missing_ok=True)
        try:
            png = await asyncio.to_thread(thumbnail_png, data, self.thumbnail_px)
        except NotAnImage as exc:
            raise CellmeshError(grpc.StatusCode.FAILED_PRECONDITION, f"{image.file_name}: {exc}") from exc
        cached.parent.mkdir(parents=True, exist_ok=True)
        part = cached.with_name(cached.name + ".part")
        await asyncio.to_thread(part.write_bytes, png)
        part.replace(cached)
        return png

    # Reports.

    async def report(self, plate_name: str) -> dict[str, Any]:
        report = await self.client.report(plate_name)
        files = []
        summary: Any = None
        for f in report.files:
            kind = KIND_NAMES.get(f.kind, "file")
            suffix = Path(f.name).suffix.lower()
            if suffix in (".png", ".svg"):
                kind = "plot_png"  # heatmaps, QC plots: every picture of the report is shown
            entry = {
                "name": f.name,
                "kind": kind,
                "size": f.object.size,
                "download": self.presign(f.object.key, Path(f.name).name),
            }
            if kind == "plot_png" or suffix in (".html", ".pdf"):
                entry["view"] = self.presign_inline(f.object.key)
            files.append(entry)
            if kind == "summary_json":
                path = await self.fetch(f.object)
                text = await asyncio.to_thread(path.read_text, errors="replace")
                try:
                    summary = json.loads(text)
                except ValueError:
                    summary = None
        return {
            "plate": report.plate,
            "version": report.version,
            "wells": report.wells,
            "sites": report.sites,
            "created_at": report.created_at.ToJsonString() if report.HasField("created_at") else "",
            "files": files,
            "summary": summary,
            "missing_sites": [
                {
                    "well": m.site.well,
                    "site": m.site.site,
                    "state": STATE_NAMES.get(m.state, ""),
                    "reason": m.reason,
                }
                for m in report.missing_sites
            ],
        }

    async def features(self, plate_name: str) -> dict[str, Any]:
        """Per-well values of every measurement of the report's well tables,
        as {"features": [...], "values": {feature: {well: value}}}."""
        report = await self.client.report(plate_name)
        values: dict[str, dict[str, float]] = {}
        for f in report.files:
            if f.kind != catalog_pb2.REPORT_FILE_KIND_WELL_TABLE or not f.name.endswith(".csv"):
                continue
            stem = Path(f.name).stem.removeprefix("wells_")
            for row in await self.table(f.object):
                well = row.get("Metadata_Well", "")
                if not well:
                    continue
                for column, value in numeric_columns(row, f"{stem}_").items():
                    values.setdefault(f"{stem}: {column}", {})[well] = value
        return {"version": report.version, "features": sorted(values), "values": values}

    # Uploads.

    async def upload(
        self,
        plate_name: str,
        files: list[tuple[str, bytes]],
        pattern: str,
        channel_map: str,
        site: int,
        token: str = "",
    ) -> UploadResult:
        """Registers a small plate's images the way `cellmesh ingest` does:
        the files land in a folder of their own, then the client's Ingester
        reads their names, uploads and registers them; with AUTH=on as the
        user whose `token` came with them."""
        if not files:
            raise CellmeshError(grpc.StatusCode.INVALID_ARGUMENT, "no files in the upload: drop image files")
        if self._uploader is None:
            return await self._upload(self.client, plate_name, files, pattern, channel_map, site)
        if not token:
            raise CellmeshError(
                grpc.StatusCode.UNAUTHENTICATED,
                "an upload registers images in your name: give your token (a scientist's or an operator's)",
            )
        async with self._uploader(token) as client:
            return await self._upload(client, plate_name, files, pattern, channel_map, site)

    async def _upload(
        self,
        client: CellmeshClient,
        plate_name: str,
        files: list[tuple[str, bytes]],
        pattern: str,
        channel_map: str,
        site: int,
    ) -> UploadResult:
        try:
            parser = FileNameParser(
                pattern, plate=plate_name, site=site, channel_map=parse_channel_map(channel_map)
            )
        except ValueError as exc:
            raise CellmeshError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        await client.get_plate(plate_name)  # NOT_FOUND (or who may not) before anything is written
        folder = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="upload-", dir=self._upload_root()))
        try:
            seen: set[str] = set()
            for name, data in files:
                base = Path(name.replace("\\", "/")).name
                if base in ("", ".", "..") or base.startswith("."):
                    raise CellmeshError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"file name {name!r} cannot be used: rename it"
                    )
                if base in seen:
                    raise CellmeshError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"two files are named {base}: upload one folder's files with distinct names",
                    )
                seen.add(base)
                await asyncio.to_thread((folder / base).write_bytes, data)
            ingester = Ingester(client, self.store, parser, progress=False)
            summary = await ingester.run_once(folder)
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, True)
        return UploadResult(
            files=len(files),
            lines=summary.lines(),
            created=summary.created,
            replaced=summary.replaced,
            unchanged=summary.unchanged + summary.already_registered,
            sites_ready=summary.sites_ready,
            unmatched=[{"file": u.path.name, "reason": u.reason} for u in summary.unmatched],
            conflicts=[{"file": u.path.name, "reason": u.reason} for u in summary.conflicts],
        )

    def _upload_root(self) -> Path:
        root = self.cache_dir / "uploads"
        root.mkdir(parents=True, exist_ok=True)
        return root
