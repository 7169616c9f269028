"""Processing one site: fetch its images and pipeline, run CellProfiler, judge
and store the outputs. Returns an outcome; never talks to the queue.

Failure classes follow the field's own worker: an input problem fails the site
at once, a transient outage is retried without counting an attempt,
CellProfiler's own failures and time-outs are retried up to a limit. An object
store that cannot be used with the worker's settings is not the site's fault:
ObjectStoreMisconfigured propagates to the consumer, which hands the task back.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

from cellmesh import keys
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from services.common import cppipe
from services.common.retry import GaveUp, with_backoff
from services.common.s3 import (
    ChecksumMismatch,
    ObjectExists,
    ObjectMissing,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreRefused,
)
from services.cpworker.inputs import (
    InputsProblem,
    PreparedPipeline,
    channel_path,
    prepare_pipeline,
    run_inputs,
)

log = logging.getLogger(__name__)

FC = types_pb2.FailureClass
T = TypeVar("T")


class RunResultLike(Protocol):
    @property
    def ok(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def seconds(self) -> float: ...
    @property
    def cp_version(self) -> str: ...
    @property
    def timed_out(self) -> bool: ...
    @property
    def outcome(self) -> str: ...


class SiteRunner(Protocol):
    """Runs CellProfiler on one site (warm or cold, see runner.py)."""

    mode: str

    async def start(self) -> str:
        """Brings CellProfiler up; returns its version."""
        ...

    async def run_site(
        self,
        pipeline: Path,
        files: list[Path],
        output_dir: Path,
        timeout: float,
        *,
        input_dir: Path | None = None,
        expected: Mapping[str, Path] | Sequence[Mapping[str, Path]] | None = None,
    ) -> RunResultLike:
        """Runs the site; ``expected`` (image name -> file) is what CellProfiler
        must load, as exactly one image set, or the run is an input problem."""
        ...

    async def close(self) -> None: ...


class OutputJudge(Protocol):
    def __call__(self, output_dir: Path, expected_tables: list[str]) -> tuple[bool, str]: ...


@dataclass
class Failure:
    failure_class: int
    reason: str


@dataclass
class Success:
    results: list[catalog_pb2.ResultFile]
    provenance: catalog_pb2.Provenance


@dataclass
class Phase:
    """What the worker is doing with a site now (for the status RPC)."""

    claim: catalog_pb2.SiteClaim
    name: str = "downloading"
    started_at: float = field(default_factory=time.time)


def result_prefix(claim: catalog_pb2.SiteClaim, execution: str) -> str:
    """Key prefix of one execution's results: the attempt and the execution
    are part of it, so no two executions of a site (a worker cut off by the
    network and the one its task was redelivered to) ever write the same
    object; only files registered in the catalog count, and the others are
    swept (see services/catalog/sweep.py)."""
    s = claim.site
    if claim.scope == types_pb2.PIPELINE_SCOPE_PLATE:
        prefix = keys.stage_results(s.plate, claim.pipeline.sha256)
    else:
        prefix = keys.site_results(s.plate, claim.pipeline.sha256, s.well, s.site)
    return keys.execution_results(prefix, claim.attempt, execution)


def input_file_path(in_dir: Path, name: str) -> Path:
    """Where an input file (an attachment, a plate artifact) goes: its name,
    a relative path inside the Default Input Folder."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"input file name {name!r} is not a relative path inside the input folder")
    return in_dir.joinpath(*parts)


def safe_file_name(image: catalog_pb2.Image) -> str:
    name = Path(image.file_name).name if image.file_name else ""
    if not name or name in (".", ".."):
        suffix = Path(image.object.key).suffix or ".tif"
        name = f"{image.site.well}_s{image.site.site}_{image.channel}{suffix}"
    return name


def check_images(paths: list[Path]) -> str | None:
    """Reads every TIFF; returns what is wrong (unreadable, or of another size
    than the site's other channels), or None."""
    import tifffile

    shapes: dict[Path, tuple[int, ...]] = {}
    for path in paths:
        if path.suffix.lower() not in (".tif", ".tiff"):
            continue
        try:
            data = tifffile.imread(path)
        except Exception as exc:
            return f"image {path.name} cannot be read: {exc}"
        if data.size == 0:
            return f"image {path.name} is empty"
        shapes[path] = tuple(data.shape[-2:])
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{p.name} {s[0]}x{s[1]}" for p, s in shapes.items())
        return f"the site's channel images differ in size: {described}"
    return None


def object_counts(output_dir: Path) -> dict[str, int]:
    """Count_<Object> of the site's Image table (first row)."""
    for path in sorted(output_dir.glob("*Image.csv")):
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
        if len(rows) < 2:
            return {}
        header, first = rows[0], rows[1]
        counts = {}
        for name, value in zip(header, first, strict=False):
            if name.startswith("Count_"):
                try:
                    counts[name[len("Count_") :]] = int(float(value))
                except ValueError:
                    continue
        return counts
    return {}


async def gather_or_cancel(*aws: Awaitable[T]) -> list[T]:
    """Like asyncio.gather, but the first failure cancels the others, so no
    transfer goes on writing into a folder that is being removed."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class PipelineCache:
    """Pipelines fetched by SHA-256 once per worker, kept on disk, read and
    bound to the catalog's channels once (services/cpworker/inputs.py)."""

    def __init__(self, store: ObjectStore, folder: Path) -> None:
        self._store = store
        self.folder = folder
        self._lock = asyncio.Lock()
        self._prepared: dict[tuple[str, tuple[str, ...], bool], PreparedPipeline] = {}

    async def get(
        self, ref: object, channels: Sequence[str] = (), per_site: bool = False
    ) -> PreparedPipeline:
        """The pipeline bound to ``channels`` (see inputs.prepare_pipeline).
        Raises InputsProblem if the pipeline cannot be read."""
        # A pipeline with attachments is identified by a manifest; its .cppipe
        # file has a checksum of its own.
        sha = ref.content_sha256 or ref.sha256  # type: ignore[attr-defined]
        key = ref.key  # type: ignore[attr-defined]
        path = self.folder / f"{sha}.cppipe"
        wanted = (sha, tuple(sorted(channels)), per_site)
        async with self._lock:
            if not path.exists():
                await self._store.get_file(key, path, expected_sha256=sha)
            if wanted not in self._prepared:
                self._prepared[wanted] = await asyncio.to_thread(prepare_pipeline, path, wanted[1], per_site)
            return self._prepared[wanted]


class InputFileCache:
    """A run's input files (pipeline attachments, plate artifacts) fetched by
    SHA-256 once per worker, kept on disk and linked into each run's Default
    Input Folder (copied where a hard link cannot be made)."""

    def __init__(self, store: ObjectStore, folder: Path) -> None:
        self._store = store
        self._folder = folder
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, obj: types_pb2.ObjectRef) -> Path:
        path = self._folder / obj.sha256
        lock = self._locks.setdefault(obj.sha256, asyncio.Lock())
        async with lock:
            if not path.exists():
                await self._store.get_file(obj.key, path, expected_sha256=obj.sha256)
        return path

    async def place(self, item: catalog_pb2.InputFile, folder: Path) -> Path:
        """The input file at `folder`/its name."""
        cached = await self.get(item.object)
        target = input_file_path(folder, item.name)
        await asyncio.to_thread(_link_or_copy, cached, target)
        return target


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def input_file_problem(claim: catalog_pb2.SiteClaim, image_names: list[str]) -> str | None:
    """Why the claim's input files cannot be placed next to its images, or None."""
    seen = set(image_names)
    for item in claim.input_files:
        why = cppipe.check_input_name(item.name)
        if why:
            return why
        if item.name in seen:
            return f"input file {item.name} has the name of another input of the site (a channel image?)"
        seen.add(item.name)
    return None


class SiteProcessor:
    """Everything between taking a site task and reporting its outcome."""

    def __init__(
        self,
        store: ObjectStore,
        pipelines: PipelineCache,
        judge: OutputJudge,
        worker_id: str,
        work_root: Path,
        site_timeout: float,
        transient_budget: float = 120.0,
        stage_timeout: float = 21600.0,
        inputs: InputFileCache | None = None,
    ) -> None:
        self.store = store
        self.pipelines = pipelines
        self.judge = judge
        self.worker_id = worker_id
        self.work_root = work_root
        self.site_timeout = site_timeout
        self.stage_timeout = stage_timeout
        self.transient_budget = transient_budget
        self.inputs = inputs or InputFileCache(store, pipelines.folder / "inputs")

    async def _s3(self, what: str, call: object) -> object:
        return await with_backoff(
            call,  # type: ignore[arg-type]
            what,
            transient=lambda exc: isinstance(exc, ObjectStoreError),
            give_up_after=self.transient_budget,
        )

    async def process(
        self,
        claim: catalog_pb2.SiteClaim,
        runners: asyncio.Queue[SiteRunner],
        phase: Phase,
        execution: str,
    ) -> Success | Failure:
        self.work_root.mkdir(parents=True, exist_ok=True)
        workdir = Path(
            tempfile.mkdtemp(prefix=f"site{claim.site_job_id}-a{claim.attempt}-", dir=self.work_root)
        )
        try:
            return await self._process(claim, runners, phase, workdir, execution)
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)

    async def _process(
        self,
        claim: catalog_pb2.SiteClaim,
        runners: asyncio.Queue[SiteRunner],
        phase: Phase,
        workdir: Path,
        execution: str,
    ) -> Success | Failure:
        """Fetches inputs, waits for a free CellProfiler, runs it, and gives it
        back before storing the outputs: with two tasks per slot, one site's
        transfers overlap another site's CellProfiler run."""
        in_dir, out_dir = workdir / "in", workdir / "out"
        in_dir.mkdir()
        out_dir.mkdir()
        t0 = time.perf_counter()
        # One folder per channel: the catalog's channel, not the file's name,
        # says what it is; a plate stage has a numbered folder per site in it.
        plate_stage = claim.scope == types_pb2.PIPELINE_SCOPE_PLATE
        site_index: dict[tuple[str, int], int] = {}
        for image in claim.images:
            site_index.setdefault((image.site.well, image.site.site), len(site_index))
        files = [
            channel_path(
                in_dir,
                image.channel,
                safe_file_name(image),
                site_index[(image.site.well, image.site.site)] if plate_stage else None,
            )
            for image in claim.images
        ]
        if len(set(files)) != len(files):
            twice = next(p for p in files if files.count(p) > 1)
            return Failure(
                FC.FAILURE_CLASS_INPUT_PROBLEM,
                f"two images of one channel of one site are named {twice.name}",
            )
        for path in files:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            extra = [(f, input_file_path(in_dir, f.name)) for f in claim.input_files]
        except ValueError as exc:
            return Failure(FC.FAILURE_CLASS_BAD_TASK, str(exc))
        problem = input_file_problem(claim, [f.name for f in files])
        if problem:
            return Failure(FC.FAILURE_CLASS_INPUT_PROBLEM, problem)
        try:
            downloads = [
                self._s3(
                    f"download {image.object.key}",
                    partial(self.store.get_file, image.object.key, path, image.object.sha256),
                )
                for image, path in zip(claim.images, files, strict=True)
            ]
            # Input files come from the worker's cache (by SHA-256), linked in.
            placing = [
                self._s3(f"download input file {item.name}", partial(self.inputs.place, item, in_dir))
                for item in claim.input_files
            ]
            channels = sorted({image.channel for image in claim.images})
            pipeline, *_ = await gather_or_cancel(
                self._s3(
                    "download pipeline", partial(self.pipelines.get, claim.pipeline, channels, plate_stage)
                ),
                *downloads,
                *placing,
            )
        except ObjectMissing as exc:
            return Failure(FC.FAILURE_CLASS_INPUT_PROBLEM, f"input missing: {exc}")
        except ObjectStoreRefused as exc:
            return Failure(FC.FAILURE_CLASS_INPUT_PROBLEM, f"input not readable: {exc}")
        except ChecksumMismatch as exc:
            return Failure(FC.FAILURE_CLASS_INPUT_PROBLEM, f"input corrupt: {exc}")
        except GaveUp as exc:
            return Failure(FC.FAILURE_CLASS_TRANSIENT, str(exc))
        except InputsProblem as exc:
            return Failure(FC.FAILURE_CLASS_INPUT_PROBLEM, str(exc))
        problem = await asyncio.to_thread(check_images, files)
        if problem:
            return Failure(FC.FAILURE_CLASS_INPUT_PROBLEM, problem)
        by_site: dict[int, tuple[dict[str, Path], tuple[str, str, int]]] = {}
        site_metadata: dict[int, dict[str, str]] = {}
        for image, path in zip(claim.images, files, strict=True):
            n = site_index[(image.site.well, image.site.site)]
            key = (claim.site.plate, image.site.well, image.site.site)
            by_site.setdefault(n, ({}, key))[0][image.channel] = path
            site_metadata.setdefault(n, {}).update(image.metadata)
        try:
            prepared: PreparedPipeline = pipeline  # type: ignore[assignment]
            inputs = await asyncio.to_thread(
                run_inputs,
                prepared,
                in_dir,
                [by_site[n] for n in sorted(by_site)],
                [p for _f, p in extra],
                [site_metadata[n] for n in sorted(by_site)],
            )
        except InputsProblem as exc:
            return Failure(FC.FAILURE_CLASS_INPUT_PROBLEM, str(exc))
        download_s = time.perf_counter() - t0

        phase.name = "waiting for CellProfiler"
        runner = await runners.get()
        try:
            phase.name = "running"
            # The file list holds the input files too, as with `cellprofiler
            # -i FOLDER`: the pipeline's own rules pick its illumination
            # functions and other files from it.
            result = await runner.run_site(
                prepared.path,
                inputs.files,
                out_dir,
                self.stage_timeout if plate_stage else self.site_timeout,
                input_dir=inputs.input_dir,
                expected=inputs.expected_sets,
            )
        finally:
            runners.put_nowait(runner)
        if not result.ok:
            if result.timed_out:
                cls = FC.FAILURE_CLASS_TIMEOUT
            elif result.outcome == "INPUT_PROBLEM":
                cls = FC.FAILURE_CLASS_INPUT_PROBLEM
            else:
                cls = FC.FAILURE_CLASS_CP_PROBLEM
            return Failure(cls, result.reason or "CellProfiler failed")
        ok, why = await asyncio.to_thread(self.judge, out_dir, list(claim.expected_tables))
        if not ok:
            return Failure(FC.FAILURE_CLASS_OUTPUT_PROBLEM, why)

        phase.name = "uploading"
        t2 = time.perf_counter()
        prefix = result_prefix(claim, execution)
        outputs = sorted(p for p in out_dir.rglob("*") if p.is_file())
        names = [p.relative_to(out_dir).as_posix() for p in outputs]
        try:
            stored = await gather_or_cancel(
                *(
                    self._s3(
                        f"upload {name}",
                        partial(
                            self.store.put_file, f"{prefix}/{name}", path, _content_type(path), if_absent=True
                        ),
                    )
                    for name, path in zip(names, outputs, strict=True)
                )
            )
            results = [
                catalog_pb2.ResultFile(
                    name=name,
                    object=types_pb2.ObjectRef(key=obj.key, size=obj.size, sha256=obj.sha256),  # type: ignore[attr-defined]
                )
                for name, obj in zip(names, stored, strict=True)
            ]
        except GaveUp as exc:
            return Failure(FC.FAILURE_CLASS_TRANSIENT, str(exc))
        except (ObjectExists, ObjectStoreRefused) as exc:
            return Failure(FC.FAILURE_CLASS_OUTPUT_PROBLEM, str(exc))
        upload_s = time.perf_counter() - t2
        provenance = catalog_pb2.Provenance(
            cellprofiler_version=result.cp_version,
            pipeline_sha256=claim.pipeline.sha256,
            input_sha256=[i.object.sha256 for i in claim.images]
            + [f.object.sha256 for f in claim.input_files],
            worker_id=self.worker_id,
            download_seconds=download_s,
            run_seconds=result.seconds,
            upload_seconds=upload_s,
            object_counts=await asyncio.to_thread(object_counts, out_dir),
            mode=runner.mode,
        )
        return Success(results, provenance)


def _content_type(path: Path) -> str:
    return {
        ".csv": "text/csv",
        ".png": "image/png",
        ".tif": "image/tiff",
        ".tiff": "image/tiff",
        ".txt": "text/plain",
    }.get(path.suffix.lower(), "application/octet-stream")
