"""The catalog's store: every SQL statement of the mesh lives here.

One `CatalogStore` per process, on SQLAlchemy's asyncio engine: MariaDB through
asyncmy in production, SQLite through aiosqlite for single-machine runs and
tests. Each public method is one unit of work (one transaction), retried when
MariaDB reports a deadlock or a lock wait timeout.

Concurrency:

* Registrations lock their plates' rows (`SELECT ... FOR UPDATE`, in name
  order) before they look at what is registered, so two registrations of the
  same site never both miss that it became complete.
* Claims take READY jobs (and CLAIMED jobs whose lease ran out) oldest first
  with `SELECT ... FOR UPDATE SKIP LOCKED` on the (state, ready_at) index, so
  two schedulers never get the same job and neither waits for the other.
* Worker calls lock the one job row they change; a run's generation is bumped
  with an atomic `UPDATE ... SET generation = generation + 1`.
* On SQLite every transaction starts with `BEGIN IMMEDIATE` (one writer at a
  time, across processes) and the store serialises its own units of work.

Writes tell `changes` which plates changed, so progress streams wake up at
once instead of at their next poll.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from cellmesh import keys
from sqlalchemy import Table, event, func, insert, or_, select, tuple_, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from services.catalog import lifecycle, stages
from services.catalog.domain import (
    IN_FLIGHT,
    SETTLED,
    AlreadyExists,
    CatalogError,
    Decision,
    FailedPrecondition,
    FailResult,
    FailureClass,
    ImageIn,
    ImageInfo,
    InputFile,
    InvalidArgument,
    Layout,
    MissingSite,
    NotFound,
    Outcome,
    PermissionDenied,
    PipelineInfo,
    PlateInfo,
    Progress,
    Provenance,
    Report,
    ReportFile,
    ResultFile,
    RunClaim,
    Scope,
    SiteClaim,
    SiteJobInfo,
    SiteKey,
    SiteState,
    Unavailable,
)
from services.catalog.models import (
    ImageRow,
    PipelineRow,
    PlateRow,
    ReportRow,
    RunCountsRow,
    RunRow,
    SiteJobRow,
    SiteRow,
)
from services.common import validate
from services.common.backoff import Backoff
from services.common.validate import Invalid

log = logging.getLogger(__name__)

# Deadlocked units of work are retried at once, a little apart (jittered).
DEADLOCK_BACKOFF = Backoff(first_delay=0.01, max_delay=0.1)

T = TypeVar("T")

CHUNK = 1000
MAX_SITES_PER_WELL = 1000
MAX_LAYOUT_SITES = 1_000_000
DEFAULT_LEASE_SECONDS = 60
MAX_LEASE_SECONDS = 3600
MAX_CLAIM_SITES = 1000
MAX_CLAIM_RUNS = 100
MAX_IMAGES_PAGE = 10_000
DEFAULT_SITES_PAGE = 500
MAX_SITES_PAGE = 2000
MAX_ERRORS_LISTED = 5
RETRYABLE_MYSQL_ERRORS = (1205, 1213)  # lock wait timeout, deadlock
UNSETTLED = tuple(s for s in SiteState if s not in SETTLED)

images_t = cast(Table, ImageRow.__table__)
sites_t = cast(Table, SiteRow.__table__)
jobs_t = cast(Table, SiteJobRow.__table__)


def utcnow() -> datetime:
    """Now, as the naive UTC the database stores."""
    return datetime.now(UTC).replace(tzinfo=None)


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def make_engine(url: str, **options: Any) -> AsyncEngine:
    """An engine set up for the catalog: READ COMMITTED on MariaDB; on SQLite
    a folder for the file, WAL, foreign keys and `BEGIN IMMEDIATE`."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30}, **options)

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    options.setdefault("pool_size", 10)
    options.setdefault("max_overflow", 20)
    options.setdefault("pool_pre_ping", True)
    options.setdefault("pool_recycle", 1800)
    return create_async_engine(url, isolation_level="READ COMMITTED", **options)


class ChangeFeed:
    """In-process notifications of plate changes, for progress streams."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def subscribe(self, plate: str) -> asyncio.Event:
        """An event set at the next change of `plate`; take it before reading."""
        return self._events.setdefault(plate, asyncio.Event())

    def wake_all(self) -> None:
        self.notify(list(self._events))

    def notify(self, plates: Iterable[str]) -> None:
        for plate in set(plates):
            event_ = self._events.pop(plate, None)
            if event_ is not None:
                event_.set()


def _invalid(problems: list[str], total: int | None = None) -> InvalidArgument:
    shown = problems[:MAX_ERRORS_LISTED]
    more = (total or len(problems)) - len(shown)
    text = "; ".join(shown)
    if more > 0:
        text += f"; and {more} more"
    return InvalidArgument(text)


def _pipeline_label(p: PipelineRow) -> str:
    return f"{p.name} ({p.sha256[:12]})"


def _site_label(well: str, site: int) -> str:
    return f"{well} site {site}"


def _plural(items: Sequence[str], one: str, many: str) -> str:
    return one if len(items) == 1 else many


def _quoted(items: Iterable[str]) -> str:
    return ", ".join(f"'{i}'" for i in items)


class CatalogStore:
    """The catalog's domain operations over the database."""

    def __init__(
        self, engine: AsyncEngine, max_attempts: int = 3, policy: lifecycle.Policy | None = None
    ) -> None:
        self.engine = engine
        self.policy = policy or lifecycle.Policy(max_attempts=max_attempts)
        self.max_attempts = self.policy.max_attempts
        self.changes = ChangeFeed()
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._sqlite = engine.dialect.name == "sqlite"
        self._sqlite_lock = asyncio.Lock()

    @classmethod
    def connect(
        cls,
        url: str,
        max_attempts: int = 3,
        policy: lifecycle.Policy | None = None,
        **engine_options: Any,
    ) -> CatalogStore:
        return cls(make_engine(url, **engine_options), max_attempts, policy)

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        """Raises Unavailable unless the database answers."""

        async def work(session: AsyncSession) -> None:
            await session.execute(select(1))

        await self._run(work, retries=0)

    # -- units of work ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _serialised(self) -> AsyncIterator[None]:
        if self._sqlite:
            async with self._sqlite_lock:
                yield
        else:
            yield

    async def _run(self, work: Callable[[AsyncSession], Awaitable[T]], retries: int = 3) -> T:
        """Runs `work` in one transaction; retries deadlocks; maps a database
        that does not answer to Unavailable."""
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._serialised(), self._sessions() as session, session.begin():
                    return await work(session)
            except (OperationalError, InterfaceError, PoolTimeout) as exc:
                if attempt <= retries and self._retryable(exc):
                    log.info("retrying a unit of work after %s", _short(exc))
                    await asyncio.sleep(DEADLOCK_BACKOFF.delay(attempt))
                    continue
                if isinstance(exc, OperationalError) and self._retryable(exc):
                    raise Unavailable(f"the catalog database is busy ({_short(exc)}); retry") from exc
                raise Unavailable(f"the catalog database does not answer ({_short(exc)}); retry") from exc

    def _retryable(self, exc: DBAPIError | PoolTimeout) -> bool:
        orig = getattr(exc, "orig", None)
        code = orig.args[0] if orig is not None and getattr(orig, "args", None) else None
        if code in RETRYABLE_MYSQL_ERRORS:
            return True
        return self._sqlite and "database is locked" in str(exc)

    # -- pipelines ---------------------------------------------------------------

    async def find_pipeline(self, sha256: str) -> PipelineInfo | None:
        async def work(session: AsyncSession) -> PipelineInfo | None:
            row = await self._pipeline_row(session, sha256)
            return None if row is None else _pipeline_info(row)

        return await self._run(work)

    async def get_pipeline(self, sha256: str) -> PipelineInfo:
        _check(validate.check_sha256, sha256, "pipeline sha256")
        found = await self.find_pipeline(sha256)
        if found is None:
            raise NotFound(f"no pipeline has SHA-256 {sha256}; register it with RegisterPipeline")
        return found

    async def add_pipeline(self, info: PipelineInfo, size: int) -> tuple[PipelineInfo, bool]:
        """Records a pipeline stored at `info.key`; (pipeline, created). The same
        SHA-256 registered before returns the first registration."""

        async def work(session: AsyncSession) -> tuple[PipelineInfo, bool]:
            row = await self._pipeline_row(session, info.sha256)
            if row is not None:
                return _pipeline_info(row), False
            row = PipelineRow(
                sha256=info.sha256,
                name=info.name,
                key=info.key,
                size=size,
                modules=info.modules,
                image_names=info.image_names,
                tables=info.tables,
                table_files=info.table_files,
                created_at=utcnow(),
                content_sha256=info.content_sha256 or None,
                attachments=[_input_file_json(a) for a in info.attachments] or None,
                stage_inputs=list(info.stage_inputs) or None,
                scope=int(info.scope),
                scope_reasons=list(info.scope_reasons),
                group_by=list(info.group_by) or None,
            )
            session.add(row)
            await session.flush()
            return _pipeline_info(row), True

        try:
            return await self._run(work)
        except IntegrityError:
            # Registered at the same moment by another call.
            return await self.get_pipeline(info.sha256), False

    async def list_pipelines(self) -> list[PipelineInfo]:
        async def work(session: AsyncSession) -> list[PipelineInfo]:
            rows = await session.scalars(
                select(PipelineRow).order_by(PipelineRow.created_at.desc(), PipelineRow.id.desc())
            )
            return [_pipeline_info(r) for r in rows]

        return await self._run(work)

    async def _pipeline_row(self, session: AsyncSession, sha256: str) -> PipelineRow | None:
        row: PipelineRow | None = await session.scalar(
            select(PipelineRow).where(PipelineRow.sha256 == sha256)
        )
        return row

    async def _require_pipeline(self, session: AsyncSession, sha256: str) -> PipelineRow:
        if not sha256:
            raise InvalidArgument("pipeline_sha256 is required: register a pipeline and give its SHA-256")
        _check(validate.check_sha256, sha256, "pipeline_sha256")
        row = await self._pipeline_row(session, sha256)
        if row is None:
            raise NotFound(f"no pipeline has SHA-256 {sha256}; register it with RegisterPipeline first")
        return row

    # -- plates ------------------------------------------------------------------

    async def create_plate(
        self,
        name: str,
        channels: Sequence[str],
        layout: Layout | None,
        pipeline_sha256: str,
        reduce_with_failures: bool,
        created_by: str = "",
        plate_map: dict[str, Any] | None = None,
        qc_gate: dict[str, Any] | None = None,
    ) -> PlateInfo:
        """`plate_map` and `qc_gate` come checked (the servicer reads the
        map with cellmesh.platemap against the layout)."""
        _check(validate.check_plate_name, name)
        channels = _check_channels(channels)
        expected = _layout_sites(layout) if layout is not None else []

        async def work(session: AsyncSession) -> PlateInfo:
            pipeline = await self._require_pipeline(session, pipeline_sha256)
            _check_pipeline_fits(pipeline, channels, name)
            existing = await session.scalar(select(PlateRow).where(PlateRow.name == name))
            if existing is not None:
                first = await session.scalar(
                    select(RunRow.pipeline_id).where(RunRow.plate_id == existing.id, RunRow.position == 0)
                )
                if (
                    list(existing.channels) == list(channels)
                    and existing.layout == (None if layout is None else _layout_json(layout))
                    and bool(existing.reduce_with_failures) == reduce_with_failures
                    and first == pipeline.id
                    and _map_sha(existing.platemap) == _map_sha(plate_map)
                    and existing.qc_gate == qc_gate
                ):
                    # The same request again (its reply was lost): the plate it made.
                    return await self._plate_info(session, existing)
                raise AlreadyExists(
                    f"plate {name!r} exists already, with other settings; choose another name or use GetPlate"
                )
            now = utcnow()
            plate = PlateRow(
                name=name,
                channels=list(channels),
                layout=None if layout is None else _layout_json(layout),
                sites_known=layout is not None,
                acquisition_finished=False,
                reduce_with_failures=reduce_with_failures,
                image_count=0,
                created_at=now,
                created_by=created_by[:200] or None,
                platemap=plate_map,
                qc_gate=qc_gate,
            )
            session.add(plate)
            await session.flush()
            run = RunRow(plate_id=plate.id, pipeline_id=pipeline.id, position=0, created_at=now)
            session.add(run)
            await session.flush()
            site_ids = await self._insert_sites(session, plate.id, expected) if expected else {}
            if pipeline.scope == int(Scope.PLATE):
                if not pipeline.group_by:  # a grouped stage gets a job per group as they come
                    await self._insert_jobs(session, [stages.stage_job_row(run.id)])
            elif expected:
                await self._insert_jobs(
                    session,
                    [
                        _job_row(run.id, sid, SiteState.WAITING, None)
                        for sid in (site_ids[s] for s in expected)
                    ],
                )
            await stages.gate_stages(session, plate, now)
            return await self._plate_info(session, plate)

        try:
            info = await self._run(work)
        except IntegrityError as exc:
            raise AlreadyExists(f"plate {name!r} exists already; choose another name") from exc
        self.changes.notify([name])
        return info

    async def set_plate_map(
        self, name: str, plate_map: dict[str, Any] | None, qc_gate: dict[str, Any] | None
    ) -> PlateInfo:
        """Replaces a plate's map and/or QC gate (None keeps the current one).
        Both come checked: the servicer reads the map against the plate's layout."""

        async def work(session: AsyncSession) -> PlateInfo:
            plate = await self._require_plate(session, name, lock=True)
            if plate_map is not None:
                plate.platemap = plate_map
            if qc_gate is not None:
                plate.qc_gate = qc_gate
            await session.flush()
            return await self._plate_info(session, plate)

        info = await self._run(work)
        self.changes.notify([name])
        return info

    async def get_plate(self, name: str) -> PlateInfo:
        async def work(session: AsyncSession) -> PlateInfo:
            return await self._plate_info(session, await self._require_plate(session, name))

        return await self._run(work)

    async def list_plates(self) -> list[PlateInfo]:
        async def work(session: AsyncSession) -> list[PlateInfo]:
            plates = list(
                await session.scalars(
                    select(PlateRow).order_by(PlateRow.created_at.desc(), PlateRow.id.desc())
                )
            )
            pipelines: dict[int, list[str]] = defaultdict(list)
            rows = await session.execute(
                select(RunRow.plate_id, PipelineRow.sha256)
                .join(PipelineRow, PipelineRow.id == RunRow.pipeline_id)
                .order_by(RunRow.plate_id, RunRow.position)
            )
            for plate_id, sha in rows:
                pipelines[plate_id].append(sha)
            return [_plate_info(p, pipelines[p.id]) for p in plates]

        return await self._run(work)

    async def add_plate_pipeline(self, plate_name: str, pipeline_sha256: str) -> tuple[PlateInfo, int]:
        """Adds a run of another pipeline: a job for every known site (READY
        where every channel is in). Returns (plate, jobs created)."""

        async def work(session: AsyncSession) -> tuple[PlateInfo, int]:
            plate = await self._require_plate(session, plate_name, lock=True)
            pipeline = await self._require_pipeline(session, pipeline_sha256)
            runs = list(await session.scalars(select(RunRow).where(RunRow.plate_id == plate.id)))
            stage = await session.scalar(
                select(PipelineRow)
                .join(RunRow, RunRow.pipeline_id == PipelineRow.id)
                .where(RunRow.plate_id == plate.id, PipelineRow.scope == int(Scope.PLATE))
                .limit(1)
            )
            _check_pipeline_fits(pipeline, plate.channels, plate.name, stage)
            if any(r.pipeline_id == pipeline.id for r in runs):
                raise AlreadyExists(
                    f"pipeline {_pipeline_label(pipeline)} already runs on plate {plate.name!r}"
                )
            now = utcnow()
            run = RunRow(
                plate_id=plate.id,
                pipeline_id=pipeline.id,
                position=max((r.position for r in runs), default=-1) + 1,
                created_at=now,
            )
            session.add(run)
            await session.flush()
            if pipeline.scope == int(Scope.PLATE):
                if not pipeline.group_by:  # a grouped stage gets a job per group as they come
                    await self._insert_jobs(session, [stages.stage_job_row(run.id)])
                await stages.gate_stages(session, plate, now)
                return await self._plate_info(session, plate), 1
            present = await self._channels_by_site(session, plate.id)
            jobs = []
            failed = 0
            for site_id, have in present.items():
                if len(have) == len(plate.channels):
                    jobs.append(_job_row(run.id, site_id, SiteState.READY, now))
                elif plate.acquisition_finished:
                    row = _job_row(run.id, site_id, SiteState.FAILED, None)
                    row.update(
                        failure_class=int(FailureClass.INPUT_PROBLEM),
                        failure_reason=_missing_reason(plate.channels, have),
                        finished_at=now,
                    )
                    jobs.append(row)
                    failed += 1
                else:
                    jobs.append(_job_row(run.id, site_id, SiteState.WAITING, None))
            await self._insert_jobs(session, jobs)
            if failed:
                run.generation = failed
            await stages.gate_stages(session, plate, now)
            return await self._plate_info(session, plate), len(jobs)

        result = await self._run(work)
        self.changes.notify([plate_name])
        return result

    async def finish_acquisition(self, plate_name: str) -> tuple[PlateInfo, list[SiteKey]]:
        """No more images will come: sites missing channels fail for good
        (INPUT_PROBLEM). Returns the plate and its incomplete sites."""

        async def work(session: AsyncSession) -> tuple[PlateInfo, list[SiteKey]]:
            plate = await self._require_plate(session, plate_name, lock=True)
            plate.acquisition_finished = True
            plate.sites_known = True
            present = await self._channels_by_site(session, plate.id, incomplete_only=len(plate.channels))
            by_reason: dict[str, list[int]] = defaultdict(list)
            for site_id, have in present.items():
                by_reason[_missing_reason(plate.channels, have)].append(site_id)
            now = utcnow()
            runs = list(await session.scalars(select(RunRow).where(RunRow.plate_id == plate.id)))
            for run in runs:
                failed = 0
                for reason, site_ids in by_reason.items():
                    for part in chunks(site_ids):
                        result = await session.execute(
                            update(SiteJobRow)
                            .where(
                                SiteJobRow.run_id == run.id,
                                SiteJobRow.site_id.in_(part),
                                SiteJobRow.state == int(SiteState.WAITING),
                            )
                            .values(
                                state=int(SiteState.FAILED),
                                failure_class=int(FailureClass.INPUT_PROBLEM),
                                failure_reason=reason,
                                finished_at=now,
                            )
                            .execution_options(synchronize_session=False)
                        )
                        failed += _rowcount(result)
                if failed:
                    await self._bump_generation(session, run.id, failed)
            await stages.gate_stages(session, plate, now)
            found: list[tuple[int, int, int, str]] = []
            for part in chunks(list(present)):
                rows = await session.execute(
                    select(SiteRow.well_row, SiteRow.well_col, SiteRow.site, SiteRow.well).where(
                        SiteRow.id.in_(part)
                    )
                )
                found += [(r, c, s, w) for r, c, s, w in rows]
            incomplete = [SiteKey(plate.name, w, s) for _r, _c, s, w in sorted(found)]
            return await self._plate_info(session, plate), incomplete

        result = await self._run(work)
        self.changes.notify([plate_name])
        return result

    async def _require_plate(self, session: AsyncSession, name: str, lock: bool = False) -> PlateRow:
        if not name:
            raise InvalidArgument("plate is required (the plate's name)")
        query = select(PlateRow).where(PlateRow.name == name)
        if lock:
            query = query.with_for_update()
        plate: PlateRow | None = await session.scalar(query)
        if plate is None:
            raise NotFound(f"plate {name!r} does not exist; create it with CreatePlate")
        return plate

    async def _plate_info(self, session: AsyncSession, plate: PlateRow) -> PlateInfo:
        shas = await session.scalars(
            select(PipelineRow.sha256)
            .join(RunRow, RunRow.pipeline_id == PipelineRow.id)
            .where(RunRow.plate_id == plate.id)
            .order_by(RunRow.position)
        )
        return _plate_info(plate, list(shas))

    async def _channels_by_site(
        self, session: AsyncSession, plate_id: int, incomplete_only: int = 0
    ) -> dict[int, set[str]]:
        """{site id: channels registered} for every site of a plate (or only
        those with fewer than `incomplete_only` channels)."""
        query = (
            select(SiteRow.id, ImageRow.channel)
            .select_from(SiteRow)
            .outerjoin(ImageRow, ImageRow.site_id == SiteRow.id)
            .where(SiteRow.plate_id == plate_id)
        )
        if incomplete_only:
            counts = (
                select(SiteRow.id)
                .select_from(SiteRow)
                .outerjoin(ImageRow, ImageRow.site_id == SiteRow.id)
                .where(SiteRow.plate_id == plate_id)
                .group_by(SiteRow.id)
                .having(func.count(ImageRow.id) < incomplete_only)
            )
            ids = list(await session.scalars(counts))
            present: dict[int, set[str]] = {i: set() for i in ids}
            for part in chunks(ids):
                rows = await session.execute(
                    select(ImageRow.site_id, ImageRow.channel).where(ImageRow.site_id.in_(part))
                )
                for site_id, channel in rows:
                    present[site_id].add(channel)
            return present
        everything: dict[int, set[str]] = {}
        for site_id, channel in await session.execute(query):
            have = everything.setdefault(site_id, set())
            if channel is not None:
                have.add(channel)
        return everything

    async def _insert_sites(
        self,
        session: AsyncSession,
        plate_id: int,
        sites: Sequence[tuple[int, int, int]],
        metadata: dict[tuple[int, int, int], dict[str, str]] | None = None,
    ) -> dict[tuple[int, int, int], int]:
        """Inserts (row, column, site) sites, with their metadata if given;
        returns their ids."""
        ids: dict[tuple[int, int, int], int] = {}
        for part in chunks(sites, 5000):
            rows = [
                {
                    "plate_id": plate_id,
                    "well_row": r,
                    "well_col": c,
                    "site": s,
                    "well": validate.well_name(r, c),
                    "metadata": (metadata or {}).get((r, c, s)) or None,
                }
                for r, c, s in part
            ]
            result = await session.execute(
                insert(sites_t).returning(
                    sites_t.c.id, sites_t.c.well_row, sites_t.c.well_col, sites_t.c.site
                ),
                rows,
            )
            for site_id, r, c, s in result:
                ids[(r, c, s)] = site_id
        return ids

    async def _insert_jobs(self, session: AsyncSession, jobs: list[dict[str, Any]]) -> None:
        for part in chunks(jobs, 5000):
            await session.execute(insert(jobs_t), list(part))

    async def _bump_generation(self, session: AsyncSession, run_id: int, by: int = 1) -> None:
        await session.execute(
            update(RunRow)
            .where(RunRow.id == run_id)
            # New results: a reduce that failed on the old ones may be tried again.
            .values(generation=RunRow.generation + by, reduce_failure_reason=None)
            .execution_options(synchronize_session=False)
        )

    # -- images ------------------------------------------------------------------

    async def register_images(self, images: Sequence[ImageIn]) -> tuple[list[Outcome], int]:
        """Registers a batch in one transaction after checking all of it.
        Returns one outcome per image and the number of sites that became ready."""
        try:
            validate.check_batch_size(len(images))
        except Invalid as exc:
            raise InvalidArgument(str(exc)) from None
        if not images:
            return [], 0
        parsed = _check_images(images)

        async def work(session: AsyncSession) -> tuple[list[Outcome], int]:
            names = sorted({i.plate for i in images})
            plates: dict[str, PlateRow] = {}
            for part in chunks(names):
                rows = await session.scalars(
                    select(PlateRow).where(PlateRow.name.in_(part)).order_by(PlateRow.name).with_for_update()
                )
                plates.update({p.name: p for p in rows})
            missing = [n for n in names if n not in plates]
            if missing:
                raise NotFound(
                    f"{_plural(missing, 'plate', 'plates')} {_quoted(missing)} "
                    f"{_plural(missing, 'does', 'do')} not exist; create {_plural(missing, 'it', 'them')} with CreatePlate"
                )
            _check_against_plates(images, parsed, plates)
            outcomes: list[Outcome] = [Outcome.CREATED] * len(images)
            ready = 0
            for name in names:
                plate = plates[name]
                indexes = [i for i, img in enumerate(images) if img.plate == name]
                ready += await self._register_plate_images(session, plate, images, parsed, indexes, outcomes)
            return outcomes, ready

        result = await self._run(work)
        self.changes.notify({i.plate for i in images})
        return result

    async def _register_plate_images(
        self,
        session: AsyncSession,
        plate: PlateRow,
        images: Sequence[ImageIn],
        parsed: list[tuple[int, int]],
        indexes: list[int],
        outcomes: list[Outcome],
    ) -> int:
        now = utcnow()
        keys = sorted({(*parsed[i], images[i].site) for i in indexes})
        site_ids = await self._site_ids(session, plate.id, keys)
        existing: dict[int, dict[str, tuple[int, str]]] = defaultdict(dict)
        for part in chunks(list(site_ids.values())):
            rows = await session.execute(
                select(ImageRow.site_id, ImageRow.channel, ImageRow.id, ImageRow.sha256).where(
                    ImageRow.site_id.in_(part)
                )
            )
            for site_id, channel, image_id, sha in rows:
                existing[site_id][channel] = (image_id, sha)

        known_metadata: dict[int, dict[str, str]] = {}
        for part in chunks(list(site_ids.values())):
            for site_id, meta in await session.execute(
                select(SiteRow.id, SiteRow.site_metadata).where(SiteRow.id.in_(part))
            ):
                known_metadata[site_id] = dict(meta or {})
        metadata = _site_metadata(plate.name, images, parsed, indexes, site_ids, known_metadata)

        # Decide every image before writing anything.
        conflicts: list[str] = []
        first_in_batch: dict[tuple[int, int, int, str], int] = {}
        creates: list[int] = []
        replaces: list[tuple[int, int]] = []  # (batch index, image id)
        for i in indexes:
            img = images[i]
            key = (*parsed[i], img.site)
            slot = (*key, img.channel)
            label = f"plate {plate.name!r} well {img.well} site {img.site} channel {img.channel}"
            earlier = first_in_batch.get(slot)
            if earlier is not None:
                if images[earlier].sha256 == img.sha256:
                    outcomes[i] = Outcome.UNCHANGED
                    continue
                raise InvalidArgument(
                    f"images {earlier} and {i} are both for {label} with different content; send one of them"
                )
            first_in_batch[slot] = i
            site_id = site_ids.get(key)
            registered = existing[site_id].get(img.channel) if site_id is not None else None
            if registered is None:
                outcomes[i] = Outcome.CREATED
                creates.append(i)
            elif registered[1] == img.sha256:
                outcomes[i] = Outcome.UNCHANGED
            elif img.replace:
                outcomes[i] = Outcome.REPLACED
                replaces.append((i, registered[0]))
            else:
                conflicts.append(
                    f"{label} already has a different image (SHA-256 {registered[1][:12]}…); "
                    "set replace to overwrite it"
                )
        if conflicts:
            raise AlreadyExists(
                "; ".join(conflicts[:MAX_ERRORS_LISTED])
                + (
                    f"; and {len(conflicts) - MAX_ERRORS_LISTED} more"
                    if len(conflicts) > MAX_ERRORS_LISTED
                    else ""
                )
            )
        new_keys = sorted({(*parsed[i], images[i].site) for i in creates} - set(site_ids))
        if new_keys and plate.acquisition_finished:
            r, c, s = new_keys[0]
            raise FailedPrecondition(
                f"plate {plate.name!r} finished its acquisition; {validate.well_name(r, c)} site {s} "
                "is a new site (images may only replace or complete known sites)"
            )

        # Write.
        new_ids = await self._insert_sites(session, plate.id, new_keys, metadata) if new_keys else {}
        site_ids.update(new_ids)
        for key, meta in metadata.items():
            site_id = site_ids[key]
            if site_id not in new_ids.values() and meta != known_metadata.get(site_id, {}):
                await session.execute(
                    update(SiteRow)
                    .where(SiteRow.id == site_id)
                    .values(site_metadata=meta)
                    .execution_options(synchronize_session=False)
                )
        if creates:
            image_rows = [
                {
                    "site_id": site_ids[(*parsed[i], images[i].site)],
                    "channel": images[i].channel,
                    "key": images[i].key,
                    "sha256": images[i].sha256,
                    "size": images[i].size,
                    "file_name": images[i].file_name,
                    "registered_at": now,
                }
                for i in creates
            ]
            for image_part in chunks(image_rows, 5000):
                await session.execute(insert(images_t), list(image_part))
        for i, image_id in replaces:
            img = images[i]
            await session.execute(
                update(ImageRow)
                .where(ImageRow.id == image_id)
                .values(
                    key=img.key, sha256=img.sha256, size=img.size, file_name=img.file_name, registered_at=now
                )
                .execution_options(synchronize_session=False)
            )
        if creates:
            plate.image_count = plate.image_count + len(creates)

        # Readiness.
        n_channels = len(plate.channels)
        gained: dict[int, set[str]] = defaultdict(set)
        for i in creates:
            gained[site_ids[(*parsed[i], images[i].site)]].add(images[i].channel)
        newly_complete_old: list[int] = []
        newly_complete_new: list[int] = []
        incomplete_new: list[int] = []
        new_site_ids = set(new_ids.values())
        for site_id, channels in gained.items():
            before = len(existing[site_id]) if site_id not in new_site_ids else 0
            after = before + len(channels)
            if site_id in new_site_ids:
                (newly_complete_new if after == n_channels else incomplete_new).append(site_id)
            elif after == n_channels and before < n_channels:
                newly_complete_old.append(site_id)
        replaced_complete = sorted(
            {
                site_ids[(*parsed[i], images[i].site)]
                for i, _ in replaces
                if len(existing[site_ids[(*parsed[i], images[i].site)]])
                + len(gained.get(site_ids[(*parsed[i], images[i].site)], ()))
                == n_channels
            }
        )
        if new_site_ids:
            run_ids = list(
                await session.scalars(
                    select(RunRow.id)
                    .join(PipelineRow, PipelineRow.id == RunRow.pipeline_id)
                    .where(RunRow.plate_id == plate.id, PipelineRow.scope != int(Scope.PLATE))
                )
            )
            jobs = [_job_row(r, s, SiteState.READY, now) for r in run_ids for s in newly_complete_new]
            jobs += [_job_row(r, s, SiteState.WAITING, None) for r in run_ids for s in incomplete_new]
            await self._insert_jobs(session, jobs)
        for part in chunks(newly_complete_old):
            await _reset_jobs(
                session,
                now,
                SiteJobRow.site_id.in_(part),
                SiteJobRow.state.in_([int(SiteState.WAITING), int(SiteState.FAILED)]),
            )
        for part in chunks(replaced_complete):
            await _reset_jobs(session, now, SiteJobRow.site_id.in_(part))
        if replaced_complete and await stages.has_stages(session, plate.id):
            # A plate stage that ran with a replaced image runs again (and
            # the stages after it, see stages.gate_stages).
            await stages.rerun_stages_of(session, plate, replaced_complete, now)
        await stages.gate_stages(session, plate, now)
        return len(newly_complete_old) + len(newly_complete_new)

    async def _site_ids(
        self, session: AsyncSession, plate_id: int, keys: Sequence[tuple[int, int, int]]
    ) -> dict[tuple[int, int, int], int]:
        found: dict[tuple[int, int, int], int] = {}
        for part in chunks(keys):
            rows = await session.execute(
                select(SiteRow.id, SiteRow.well_row, SiteRow.well_col, SiteRow.site).where(
                    SiteRow.plate_id == plate_id,
                    tuple_(SiteRow.well_row, SiteRow.well_col, SiteRow.site).in_(list(part)),
                )
            )
            for site_id, r, c, s in rows:
                found[(r, c, s)] = site_id
        return found

    async def list_images(
        self, plate_name: str, well: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ImageInfo], str]:
        if page_size < 0:
            raise InvalidArgument(
                f"page_size {page_size} is negative; give 1 to {MAX_IMAGES_PAGE} or 0 for the default"
            )
        size = min(page_size or MAX_IMAGES_PAGE, MAX_IMAGES_PAGE)
        position = _decode_token(page_token) if page_token else None
        where_well = _check(validate.parse_well, well) if well else None

        async def work(session: AsyncSession) -> tuple[list[ImageInfo], str]:
            plate = await self._require_plate(session, plate_name)
            order = (SiteRow.well_row, SiteRow.well_col, SiteRow.site, ImageRow.channel)
            query = (
                select(
                    SiteRow.well,
                    SiteRow.site,
                    ImageRow,
                    SiteRow.well_row,
                    SiteRow.well_col,
                    SiteRow.site_metadata,
                )
                .join(ImageRow, ImageRow.site_id == SiteRow.id)
                .where(SiteRow.plate_id == plate.id)
                .order_by(*order)
                .limit(size + 1)
            )
            if where_well is not None:
                query = query.where(SiteRow.well_row == where_well[0], SiteRow.well_col == where_well[1])
            if position is not None:
                query = query.where(tuple_(*order) > tuple_(*position))
            rows = (await session.execute(query)).all()
            images = [
                ImageInfo(
                    plate.name,
                    w,
                    s,
                    img.channel,
                    img.key,
                    img.size,
                    img.sha256,
                    img.file_name,
                    img.registered_at,
                    dict(meta or {}),
                )
                for w, s, img, _r, _c, meta in rows[:size]
            ]
            token = ""
            if len(rows) > size:
                w, s, img, r, c, _meta = rows[size - 1]
                token = _encode_token([r, c, s, img.channel])
            return images, token

        return await self._run(work)

    # -- claims ------------------------------------------------------------------

    async def claim_ready_sites(
        self, scheduler_id: str, max_sites: int, lease_seconds: int = 0
    ) -> list[SiteClaim]:
        """Claims up to `max_sites` jobs, each with a new attempt number: first
        in-flight jobs whose deadline passed (a claim never queued, a task the
        broker lost, a worker that stopped renewing its lease), then READY
        jobs whose not-before time has come, oldest first."""
        if not scheduler_id:
            raise InvalidArgument("scheduler_id is required (who claims, for status and logs)")
        if not 1 <= max_sites <= MAX_CLAIM_SITES:
            raise InvalidArgument(
                f"max_sites {max_sites} is out of range: ask for 1 to {MAX_CLAIM_SITES} sites"
            )
        lease = _lease(lease_seconds)

        async def work(session: AsyncSession) -> tuple[list[SiteClaim], set[str]]:
            now = utcnow()
            oldest_first = (SiteJobRow.ready_at, SiteJobRow.id)
            overdue = (
                await session.execute(
                    select(SiteJobRow.id, SiteJobRow.state, SiteJobRow.attempt, SiteJobRow.free_attempts)
                    # Every in-flight state has a deadline (services/catalog/lifecycle.py).
                    .where(
                        SiteJobRow.state.in_([int(s) for s in IN_FLIGHT]),
                        SiteJobRow.claim_expires_at < now,
                    )
                    .order_by(SiteJobRow.claim_expires_at, SiteJobRow.id)
                    .limit(max_sites)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            # A running attempt whose worker vanished counts; once every attempt
            # went that way, the site fails instead of taking worker after worker down.
            spent = [
                row.id
                for row in overdue
                if row.state == int(SiteState.RUNNING)
                and row.attempt - (row.free_attempts or 0) >= self.policy.max_attempts
            ]
            vanished = await self._fail_vanished(session, spent, now) if spent else set()
            expired = [row.id for row in overdue if row.id not in spent]
            free = [row.id for row in overdue if lifecycle.reissue_is_free(SiteState(row.state))]
            ready: list[int] = []
            if len(expired) < max_sites:
                ready = list(
                    await session.scalars(
                        select(SiteJobRow.id)
                        .where(SiteJobRow.state == int(SiteState.READY), SiteJobRow.ready_at <= now)
                        .order_by(*oldest_first)
                        .limit(max_sites - len(expired))
                        .with_for_update(skip_locked=True)
                    )
                )
            ids = expired + ready
            if not ids:
                return [], vanished
            if expired:
                log.info(
                    "%d site jobs passed their deadline (%d never started); issuing them again",
                    len(expired),
                    len(free),
                )
            if free:
                await session.execute(
                    update(SiteJobRow)
                    .where(SiteJobRow.id.in_(free))
                    .values(free_attempts=SiteJobRow.free_attempts + 1)
                    .execution_options(synchronize_session=False)
                )
            await session.execute(
                update(SiteJobRow)
                .where(SiteJobRow.id.in_(ids))
                .values(
                    state=int(SiteState.CLAIMED),
                    claimed_by=scheduler_id[:200],
                    claim_expires_at=now + timedelta(seconds=lease),
                    attempt=SiteJobRow.attempt + 1,
                    execution_id=None,
                )
                .execution_options(synchronize_session=False)
            )
            # Primary-key lookups only: a join here lets the planner walk a
            # whole run's jobs, and the claim would slow down as plates grow.
            jobs = (
                await session.execute(
                    select(
                        SiteJobRow.id,
                        SiteJobRow.attempt,
                        SiteJobRow.site_id,
                        SiteJobRow.run_id,
                        SiteJobRow.group_key,
                    )
                    .where(SiteJobRow.id.in_(ids))
                    .order_by(*oldest_first)
                )
            ).all()
            # A plate stage's job has no site: it gets every complete site of
            # its plate (of its group, when it runs per group).
            stage_sites: dict[int, list[int]] = {}
            runs = {}
            files: dict[int, list[tuple[list[str], str | None, list[dict[str, Any]]]]] = {}
            for run_id in {j.run_id for j in jobs}:
                runs[run_id] = (
                    await session.execute(
                        select(
                            PlateRow.name,
                            PlateRow.channels,
                            PipelineRow.sha256,
                            PipelineRow.key,
                            PipelineRow.table_files,
                            PipelineRow.content_sha256,
                            PipelineRow.attachments,
                            PipelineRow.scope,
                            PipelineRow.group_by,
                            RunRow.plate_id,
                            RunRow.position,
                        )
                        .select_from(RunRow)
                        .join(PlateRow, PlateRow.id == RunRow.plate_id)
                        .join(PipelineRow, PipelineRow.id == RunRow.pipeline_id)
                        .where(RunRow.id == run_id)
                    )
                ).one()
                run = runs[run_id]
                files[run_id] = (
                    await stages.stage_files(session, run.plate_id, run.position) if run.position > 0 else []
                )
                if run.scope == int(Scope.PLATE):
                    plate_row = await session.get(PlateRow, run.plate_id)
                    assert plate_row is not None
                    stage_sites[run_id] = await stages.complete_site_ids(session, plate_row)
            site_ids = {j.site_id for j in jobs if j.site_id is not None}
            for ids in stage_sites.values():
                site_ids.update(ids)
            sites: dict[int, SiteRow] = {}
            for part in chunks(sorted(site_ids)):
                for site in await session.scalars(select(SiteRow).where(SiteRow.id.in_(part))):
                    sites[site.id] = site
            images = await self._images_of_sites(session, list(sites))
            claims = []
            for job in jobs:
                run = runs[job.run_id]
                order = {c: n for n, c in enumerate(run.channels)}
                if job.site_id is not None:
                    covered = [job.site_id]
                elif job.group_key is None:
                    covered = stage_sites[job.run_id]
                else:
                    covered = [
                        sid
                        for sid in stage_sites[job.run_id]
                        if stages.site_group_key(run.group_by or [], run.name, sites[sid]) == job.group_key
                    ]
                claim_images = [
                    ImageInfo(
                        run.name,
                        sites[sid].well,
                        sites[sid].site,
                        i.channel,
                        i.key,
                        i.size,
                        i.sha256,
                        i.file_name,
                        i.registered_at,
                        dict(sites[sid].site_metadata or {}),
                    )
                    for sid in covered
                    for i in sorted(images.get(sid, []), key=lambda i: order.get(i.channel, len(order)))
                ]
                artifacts = stages.artifacts_for(files[job.run_id], run.name, [sites[sid] for sid in covered])
                if job.site_id is None:
                    key = SiteKey(run.name, "", 0)
                else:
                    key = SiteKey(run.name, sites[job.site_id].well, sites[job.site_id].site)
                claims.append(
                    SiteClaim(
                        site_job_id=job.id,
                        attempt=job.attempt,
                        site=key,
                        images=claim_images,
                        pipeline_sha256=run.sha256,
                        pipeline_key=run.key,
                        expected_tables=list(run.table_files),
                        pipeline_content_sha256=run.content_sha256 or "",
                        scope=Scope(run.scope),
                        input_files=_claim_inputs(run.attachments, artifacts),
                    )
                )
            return claims, {r.name for r in runs.values()} | vanished

        claims, plates = await self._run(work)
        self.changes.notify(plates)
        return claims

    async def _fail_vanished(self, session: AsyncSession, job_ids: list[int], now: datetime) -> set[str]:
        plates: set[str] = set()
        for job_id in job_ids:
            job = await session.get(SiteJobRow, job_id)
            assert job is not None
            job.state = int(SiteState.FAILED)
            job.failure_class = int(FailureClass.TIMEOUT)
            job.failure_reason = (
                f"attempt {job.attempt}: its worker ({job.worker_id or 'unknown'}) stopped renewing the "
                f"lease, and so did every attempt before it ({self.policy.max_attempts} in all): "
                "workers killed while running it (out of memory?) or cut off"
            )
            job.finished_at = now
            job.claim_expires_at = None
            log.error("site job %d failed for good: %s", job_id, job.failure_reason)
            run = await session.get(RunRow, job.run_id)
            assert run is not None
            await self._bump_generation(session, run.id)
            if job.site_id is None:
                await self._gate_plate(session, run.plate_id, now)
            plates.add(str(await session.scalar(select(PlateRow.name).where(PlateRow.id == run.plate_id))))
        return plates

    async def _images_of_sites(
        self, session: AsyncSession, site_ids: Sequence[int]
    ) -> dict[int, list[ImageRow]]:
        found: dict[int, list[ImageRow]] = defaultdict(list)
        for part in chunks(sorted(set(site_ids))):
            for img in await session.scalars(select(ImageRow).where(ImageRow.site_id.in_(part))):
                found[img.site_id].append(img)
        return found

    async def mark_sites_queued(self, scheduler_id: str, sites: Sequence[tuple[int, int]]) -> int:
        """CLAIMED jobs whose attempt matches go to QUEUED; returns how many are
        queued at that attempt (a replay counts the jobs it queued before)."""
        if not sites:
            return 0
        wanted = dict(sites)

        async def work(session: AsyncSession) -> tuple[int, set[str]]:
            matched: list[int] = []
            already = 0
            plates: set[str] = set()
            for part in chunks(sorted(wanted)):
                rows = await session.execute(
                    select(SiteJobRow.id, SiteJobRow.attempt, SiteJobRow.run_id, SiteJobRow.state)
                    .where(
                        SiteJobRow.id.in_(part),
                        SiteJobRow.state.in_([int(SiteState.CLAIMED), int(SiteState.QUEUED)]),
                    )
                    .with_for_update()
                )
                run_ids: set[int] = set()
                for job_id, attempt, run_id, state in rows:
                    if wanted[job_id] != attempt:
                        continue
                    if state == int(SiteState.QUEUED):
                        already += 1  # queued by this same call before: a replay
                        continue
                    matched.append(job_id)
                    run_ids.add(run_id)
                if run_ids:
                    names = await session.scalars(
                        select(PlateRow.name)
                        .join(RunRow, RunRow.plate_id == PlateRow.id)
                        .where(RunRow.id.in_(sorted(run_ids)))
                    )
                    plates.update(names)
            for part in chunks(matched):
                await session.execute(
                    update(SiteJobRow)
                    .where(SiteJobRow.id.in_(part))
                    .values(
                        state=int(SiteState.QUEUED),
                        claim_expires_at=lifecycle.queued_deadline(utcnow(), self.policy),
                    )
                    .execution_options(synchronize_session=False)
                )
            return len(matched) + already, plates

        marked, plates = await self._run(work)
        self.changes.notify(plates)
        return marked

    # -- worker calls ----------------------------------------------------------------

    async def _lock_job(self, session: AsyncSession, job_id: int) -> tuple[SiteJobRow, RunRow, str]:
        job: SiteJobRow | None = await session.get(SiteJobRow, job_id, with_for_update=True)
        if job is None:
            raise NotFound(f"site job {job_id} does not exist")
        run = await session.get(RunRow, job.run_id)
        assert run is not None
        plate = await session.scalar(select(PlateRow.name).where(PlateRow.id == run.plate_id))
        return job, run, str(plate)

    async def _gate_plate(self, session: AsyncSession, plate_id: int, now: datetime) -> None:
        plate = await session.get(PlateRow, plate_id, with_for_update=True)
        assert plate is not None
        await stages.gate_stages(session, plate, now)

    async def start_site_job(
        self, job_id: int, attempt: int, worker_id: str, execution_id: str = "", lease_seconds: int = 0
    ) -> tuple[Decision, str, str]:
        """Tells a worker whether to run the task it received, and under which
        execution. A task redelivered while an earlier execution of the same
        attempt may still be alive (its worker cut off, not dead) starts a new
        execution that takes the attempt over: from then on only the newest
        execution may renew, complete or fail it, so the two can never both be
        recorded, and their result keys differ. The same call replayed (same
        execution id) gets the same answer. A started job must renew its lease
        within `lease_seconds` (0: the catalog's default), or it is issued again."""
        execution_id = _check_execution(execution_id) or secrets.token_hex(8)
        if lease_seconds:
            lease_seconds = _lease(lease_seconds)

        async def work(session: AsyncSession) -> tuple[Decision, str, str, str]:
            job, _run, plate = await self._lock_job(session, job_id)
            state = SiteState(job.state)
            if state == SiteState.DONE:
                return (
                    Decision.SKIP_DONE,
                    f"site job {job_id} is done already (attempt {job.attempt})",
                    "",
                    plate,
                )
            if state == SiteState.FAILED:
                return (
                    Decision.SKIP_STALE,
                    f"site job {job_id} failed for good: {job.failure_reason or ''}",
                    "",
                    plate,
                )
            if attempt < job.attempt:
                return (
                    Decision.SKIP_STALE,
                    f"attempt {attempt} is stale, site is at attempt {job.attempt}",
                    "",
                    plate,
                )
            if attempt > job.attempt:
                raise FailedPrecondition(
                    f"attempt {attempt} of site job {job_id} was never issued; the site is at attempt {job.attempt}"
                )
            if state not in IN_FLIGHT:
                return (
                    Decision.SKIP_STALE,
                    f"site job {job_id} was requeued after attempt {attempt} was issued; it is {state.name}",
                    "",
                    plate,
                )
            if state == SiteState.RUNNING and job.execution_id == execution_id:
                return Decision.RUN, f"run attempt {attempt} (started before)", execution_id, plate
            detail = f"run attempt {attempt}"
            if state == SiteState.RUNNING and job.execution_id:
                detail += (
                    f", taking it over from execution {job.execution_id} on {job.worker_id or 'a worker'}"
                )
                log.warning(
                    "site job %d attempt %d: execution %s takes over from %s (%s)",
                    job_id,
                    attempt,
                    execution_id,
                    job.execution_id,
                    job.worker_id,
                )
            now = utcnow()
            job.state = int(SiteState.RUNNING)
            job.started_at = now
            job.worker_id = worker_id[:200] or None
            job.execution_id = execution_id
            job.claim_expires_at = lifecycle.start_deadline(now, lease_seconds, self.policy)
            return Decision.RUN, detail, execution_id, plate

        decision, detail, execution, plate = await self._run(work)
        self.changes.notify([plate])
        return decision, detail, execution

    async def renew_site_lease(
        self, job_id: int, attempt: int, worker_id: str, lease_seconds: int, execution_id: str = ""
    ) -> bool:
        """Extends the lease of a running attempt; False if that attempt is not
        running any more, or another execution took it over (then the worker
        stops the run and records nothing)."""
        if not 5 <= lease_seconds <= 3600:
            raise InvalidArgument(f"lease_seconds {lease_seconds} is out of range: give 5 to 3600")
        execution_id = _check_execution(execution_id)

        async def work(session: AsyncSession) -> bool:
            job, _run, _plate = await self._lock_job(session, job_id)
            if job.state != int(SiteState.RUNNING) or job.attempt != attempt:
                return False
            if execution_id and job.execution_id != execution_id:
                return False
            job.claim_expires_at = utcnow() + timedelta(seconds=lease_seconds)
            job.worker_id = worker_id[:200] or job.worker_id
            return True

        return await self._run(work)

    async def complete_site_job(
        self,
        job_id: int,
        attempt: int,
        worker_id: str,
        results: Sequence[ResultFile],
        provenance: Provenance | None,
        execution_id: str = "",
    ) -> bool:
        """Records a successful attempt. True if it is recorded for this
        execution (a replay of the call that recorded it answers True again),
        False if the site was done already by an earlier attempt or a call
        without an execution id. Another execution's result is refused: a
        registered result is never replaced."""
        problems = _check_results(results)
        if problems:
            raise _invalid(problems)
        execution_id = _check_execution(execution_id)

        async def work(session: AsyncSession) -> tuple[bool, str]:
            job, run, plate = await self._lock_job(session, job_id)
            state = SiteState(job.state)
            await self._check_result_scope(session, job, run, plate, results)
            _check_holder(job, job_id, attempt, execution_id)
            if state == SiteState.DONE:
                # The same execution again is a replay of the call that recorded it.
                replay = bool(execution_id) and job.execution_id == execution_id and attempt == job.attempt
                return replay, plate
            if attempt != job.attempt:
                raise FailedPrecondition(f"attempt {attempt} is stale, site is at attempt {job.attempt}")
            if state == SiteState.FAILED:
                raise FailedPrecondition(
                    f"site job {job_id} failed for good before attempt {attempt} completed "
                    f"({job.failure_reason or 'no reason'}); requeue it to run again"
                )
            if state not in IN_FLIGHT:
                raise FailedPrecondition(
                    f"site job {job_id} was requeued after attempt {attempt} was issued; attempt {attempt} is stale"
                )
            now = utcnow()
            job.state = int(SiteState.DONE)
            job.finished_at = now
            job.worker_id = worker_id[:200] or job.worker_id
            job.failure_class = int(FailureClass.UNSPECIFIED)
            job.failure_reason = None
            job.claim_expires_at = None
            job.transient_since = None
            job.results = [
                {"name": r.name, "key": r.key, "size": r.size, "sha256": r.sha256} for r in results
            ]
            job.provenance = None if provenance is None else _provenance_json(provenance)
            await self._bump_generation(session, run.id)
            if job.site_id is None:
                await self._gate_plate(session, run.plate_id, now)
            return True, plate

        recorded, plate = await self._run(work)
        self.changes.notify([plate])
        return recorded

    async def _check_result_scope(
        self, session: AsyncSession, job: SiteJobRow, run: RunRow, plate: str, results: Sequence[ResultFile]
    ) -> None:
        """A result must lie under its own site's (or plate stage's) prefix."""
        sha = str(await session.scalar(select(PipelineRow.sha256).where(PipelineRow.id == run.pipeline_id)))
        if job.site_id is None:
            scope = keys.stage_results(plate, sha)
        else:
            site = await session.get(SiteRow, job.site_id)
            assert site is not None
            scope = keys.site_results(plate, sha, site.well, site.site)
        stray = [r for r in results if keys.outside(r.key, scope)]
        if stray:
            raise _invalid(
                [f"result {r.name!r} key {r.key!r} lies outside its site's results {scope}…" for r in stray]
            )

    async def fail_site_job(
        self,
        job_id: int,
        attempt: int,
        worker_id: str,
        failure_class: FailureClass,
        reason: str,
        final: bool,
        execution_id: str = "",
    ) -> FailResult:
        """Records a failed attempt and decides whether it is retried."""
        if failure_class == FailureClass.UNSPECIFIED:
            raise InvalidArgument(
                "failure_class is required: INPUT_PROBLEM, TRANSIENT, CP_PROBLEM, TIMEOUT, OUTPUT_PROBLEM or BAD_TASK"
            )
        execution_id = _check_execution(execution_id)

        async def work(session: AsyncSession) -> tuple[FailResult, str]:
            job, run, plate = await self._lock_job(session, job_id)
            state = SiteState(job.state)
            last = job.last_failure or {}
            if (
                execution_id
                and last.get("execution") == execution_id
                and last.get("attempt") == attempt
                and last.get("class") == int(failure_class)
            ):
                # A replay of the call that recorded this failure (its reply was
                # lost): the first call's answer, whatever happened since.
                return (
                    FailResult(bool(last["will_retry"]), int(last["next_attempt"]), SiteState(last["state"])),
                    plate,
                )
            if state != SiteState.DONE:
                _check_holder(job, job_id, attempt, execution_id)
            if state in SETTLED:
                return FailResult(False, job.attempt, state), plate
            if attempt != job.attempt:
                raise FailedPrecondition(f"attempt {attempt} is stale, site is at attempt {job.attempt}")
            if state not in IN_FLIGHT:
                raise FailedPrecondition(
                    f"site job {job_id} was requeued after attempt {attempt} was issued; attempt {attempt} is stale"
                )
            now = utcnow()
            counters = lifecycle.Counters(job.attempt, job.free_attempts or 0, job.transient_since)
            decision = lifecycle.on_fail(
                counters, failure_class, reason[:10_000] or failure_class.name, final, now, self.policy
            )
            job.failure_class = int(decision.failure_class)
            job.failure_reason = decision.reason[:10_000]
            job.worker_id = worker_id[:200] or job.worker_id
            job.claim_expires_at = None
            job.free_attempts = decision.free_attempts
            job.transient_since = decision.transient_since
            job.state = int(decision.state)
            result = FailResult(decision.will_retry, job.attempt + 1, decision.state)
            if decision.will_retry:
                # Back to READY with a not-before time: the scheduler issues the
                # retry like any other ready job, with the next attempt number.
                job.ready_at = decision.ready_at
            else:
                result = FailResult(False, job.attempt, SiteState.FAILED)
                job.finished_at = now
                await self._bump_generation(session, run.id)
                if job.site_id is None:
                    await self._gate_plate(session, run.plate_id, now)
            job.last_failure = {
                "execution": execution_id,
                "attempt": attempt,
                "class": int(failure_class),
                "will_retry": result.will_retry,
                "next_attempt": result.next_attempt,
                "state": int(result.state),
            }
            return result, plate

        result, plate = await self._run(work)
        self.changes.notify([plate])
        return result

    # -- site lists and requeue -------------------------------------------------------

    async def _resolve_run(
        self, session: AsyncSession, plate_name: str, pipeline_sha256: str, lock_plate: bool = False
    ) -> tuple[PlateRow, RunRow, PipelineRow]:
        plate = await self._require_plate(session, plate_name, lock=lock_plate)
        query = (
            select(RunRow, PipelineRow)
            .join(PipelineRow, PipelineRow.id == RunRow.pipeline_id)
            .where(RunRow.plate_id == plate.id)
        )
        if pipeline_sha256:
            _check(validate.check_sha256, pipeline_sha256, "pipeline_sha256")
            query = query.where(PipelineRow.sha256 == pipeline_sha256)
        else:
            # The first site-scope stage: a workflow's plate stages (an
            # illumination function) come before the analysis users follow.
            query = query.order_by(PipelineRow.scope == int(Scope.PLATE), RunRow.position).limit(1)
        found = (await session.execute(query)).first()
        if found is None:
            if await self._pipeline_row(session, pipeline_sha256) is None:
                raise NotFound(
                    f"no pipeline has SHA-256 {pipeline_sha256}; register it with RegisterPipeline"
                )
            raise NotFound(
                f"pipeline {pipeline_sha256[:12]} does not run on plate {plate.name!r}; add it with AddPlatePipeline"
            )
        run, pipeline = found
        return plate, run, pipeline

    async def list_sites(
        self,
        plate_name: str,
        pipeline_sha256: str = "",
        states: Sequence[SiteState] = (),
        with_results: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> SitesPage:
        """One page of a run's site jobs in plate order (well row, column,
        site). The cursor is the last job's (row, column, site): each page is
        an index range on the site table, whatever page it is."""
        if page_size < 0 or page_size > MAX_SITES_PAGE:
            raise InvalidArgument(
                f"page_size {page_size} is out of range; give 1 to {MAX_SITES_PAGE} "
                f"or 0 for the default ({DEFAULT_SITES_PAGE})"
            )
        size = page_size or DEFAULT_SITES_PAGE
        position = _decode_sites_token(page_token) if page_token else None

        async def work(session: AsyncSession) -> SitesPage:
            plate, run, pipeline = await self._resolve_run(session, plate_name, pipeline_sha256)
            if position is not None and position[0] != run.id:
                raise InvalidArgument(
                    f"page_token belongs to another plate or pipeline than plate {plate.name!r} "
                    f"pipeline {pipeline.sha256[:12]}; start again without a page_token"
                )
            columns = (
                SiteJobRow,
                SiteRow.well,
                SiteRow.site,
                SiteRow.well_row,
                SiteRow.well_col,
                SiteRow.site_metadata,
            )
            if pipeline.scope == int(Scope.PLATE):
                # A plate stage's jobs (one, or one per group) have no site.
                query = select(*columns).outerjoin(SiteRow, SiteRow.id == SiteJobRow.site_id)
                query = query.where(SiteJobRow.run_id == run.id).order_by(SiteJobRow.id).limit(size + 1)
            else:
                # Driven by the sites' (plate, row, column, site) index, in
                # its order, each joined on site_jobs (site, run): a page
                # reads its own rows, never the rest of the plate.
                query = (
                    select(*columns)
                    .select_from(SiteRow)
                    .join(SiteJobRow, (SiteJobRow.site_id == SiteRow.id) & (SiteJobRow.run_id == run.id))
                    .where(SiteRow.plate_id == plate.id)
                    .order_by(SiteRow.well_row, SiteRow.well_col, SiteRow.site)
                    .limit(size + 1)
                )
            if position is not None:
                _run_id, r, c, n = position
                # Spelled out (not a row comparison) so MariaDB uses the
                # (plate, row, column, site) index as a range.
                query = query.where(
                    SiteRow.well_row >= r,
                    or_(
                        SiteRow.well_row > r,
                        SiteRow.well_col > c,
                        (SiteRow.well_col == c) & (SiteRow.site > n),
                    ),
                )
            if states:
                query = query.where(SiteJobRow.state.in_([int(s) for s in states]))
            rows = (await session.execute(query)).all()
            scope = Scope(pipeline.scope or Scope.SITE)
            jobs = [
                _job_info(
                    job,
                    SiteKey(plate.name, well or "", site or 0),
                    pipeline.sha256,
                    with_results,
                    scope,
                    # A group stage's job: its group's values.
                    dict(meta or {}) if job.site_id is not None else stages.group_values_of(job.group_key),
                )
                for job, well, site, _r, _c, meta in rows[:size]
            ]
            positions = [(r or 0, c or 0, site or 0) for _job, _w, site, r, c, _m in rows[:size]]
            return SitesPage(jobs, positions, run.id, len(rows) > size)

        return await self._run(work)

    async def registered_result_keys(self, plate_name: str) -> set[str] | None:
        """Every result object key a site job of the plate points at, now or
        before a requeue; None if there is no such plate."""

        async def work(session: AsyncSession) -> set[str] | None:
            plate_id = await session.scalar(select(PlateRow.id).where(PlateRow.name == plate_name))
            if plate_id is None:
                return None
            keys: set[str] = set()
            rows = await session.execute(
                select(SiteJobRow.results, SiteJobRow.past_results)
                .join(RunRow, RunRow.id == SiteJobRow.run_id)
                .where(RunRow.plate_id == plate_id)
            )
            for results, past in rows:
                for r in [*(results or []), *(past or [])]:
                    keys.add(str(r["key"]))
            return keys

        return await self._run(work)

    async def requeue_sites(
        self,
        plate_name: str,
        pipeline_sha256: str = "",
        sites: Sequence[tuple[str, int]] = (),
        reduce: bool = False,
        owner: str | None = None,
    ) -> int:
        """Puts the given sites' jobs (default: every FAILED job) back to READY,
        keeping their attempt so that tasks already out are skipped as stale.
        A named site that is running is taken from its worker the same way.
        With `reduce`, a failed reduce is issued again too (and, with no
        sites named, only that). With `owner`, only a plate `owner` created
        (PermissionDenied otherwise)."""
        keys = []
        for well, site in sites:
            keys.append((*_check(validate.parse_well, well), _check(validate.check_site, site)))

        async def work(session: AsyncSession) -> tuple[int, str]:
            plate, run, pipeline = await self._resolve_run(
                session, plate_name, pipeline_sha256, lock_plate=True
            )
            if owner is not None and plate.created_by != owner:
                raise PermissionDenied(
                    f"plate {plate.name!r} was created by {plate.created_by or 'someone not recorded'},"
                    f" not {owner}: a scientist may requeue only their own plates; ask an operator"
                )
            if reduce:
                if pipeline.scope == int(Scope.PLATE):
                    raise FailedPrecondition(
                        f"plate {plate.name!r}: pipeline {_pipeline_label(pipeline)} is a plate stage; "
                        "it has no reduce (requeue the stage itself)"
                    )
                await session.refresh(run, with_for_update=True)
                run.reduce_failure_reason = None
                run.reduce_attempts = 0
                run.reduce_claim_generation = 0
                run.reduce_claim_expires_at = None
                if not keys:
                    return 0, plate.name
            if pipeline.scope == int(Scope.PLATE):
                return await self._requeue_stage(session, plate, run, pipeline, keys), plate.name
            query = (
                select(SiteJobRow, SiteRow.well, SiteRow.site)
                .join(SiteRow, SiteRow.id == SiteJobRow.site_id)
                .where(SiteJobRow.run_id == run.id)
                .with_for_update(of=SiteJobRow)
            )
            if keys:
                site_ids = await self._site_ids(session, plate.id, keys)
                unknown = [
                    validate.well_name(r, c) + f" site {s}" for r, c, s in keys if (r, c, s) not in site_ids
                ]
                if unknown:
                    raise NotFound(f"plate {plate.name!r} has no {', '.join(unknown[:MAX_ERRORS_LISTED])}")
                query = query.where(SiteJobRow.site_id.in_(list(site_ids.values())))
            else:
                query = query.where(SiteJobRow.state == int(SiteState.FAILED))
            rows = (await session.execute(query)).all()
            running = [_site_label(w, s) for job, w, s in rows if job.state == int(SiteState.RUNNING)]
            if running:
                # Freed by hand (a worker wedged on it): the attempt it runs is
                # fenced off; its worker's next renewal is refused and it stops.
                log.warning(
                    "plate %s: requeueing %s while running; the running attempt is abandoned",
                    plate.name,
                    ", ".join(running[:MAX_ERRORS_LISTED]),
                )
            counts = await self._channel_counts(session, [job.site_id for job, _w, _s in rows])
            complete = [job for job, _w, _s in rows if counts.get(job.site_id, 0) == len(plate.channels)]
            if keys:
                incomplete = [
                    _site_label(w, s)
                    for job, w, s in rows
                    if counts.get(job.site_id, 0) < len(plate.channels)
                ]
                if incomplete:
                    raise FailedPrecondition(
                        f"plate {plate.name!r}: {', '.join(incomplete[:MAX_ERRORS_LISTED])} "
                        f"{_plural(incomplete, 'misses', 'miss')} channels; register them first"
                    )
            now = utcnow()
            for part in chunks([job.id for job in complete]):
                await _reset_jobs(session, now, SiteJobRow.id.in_(part))
            await stages.gate_stages(session, plate, now)
            return len(complete), plate.name

        count, plate = await self._run(work)
        self.changes.notify([plate])
        return count

    async def _requeue_stage(
        self,
        session: AsyncSession,
        plate: PlateRow,
        run: RunRow,
        pipeline: PipelineRow,
        keys: Sequence[tuple[int, int, int]],
    ) -> int:
        """A plate stage's job runs again, done or failed (a stage that runs
        per group: every group's job, or, with sites named, the jobs of the
        groups that hold them); the stages after it wait for its new
        artifacts and run again too, for those groups only."""
        jobs = list(
            await session.scalars(
                select(SiteJobRow)
                .where(SiteJobRow.run_id == run.id, SiteJobRow.site_id.is_(None))
                .order_by(SiteJobRow.id)
                .with_for_update()
            )
        )
        grouped = stages.is_grouped(pipeline.group_by, jobs)
        if keys:
            if not grouped:
                raise InvalidArgument(
                    f"pipeline {_pipeline_label(pipeline)} is a plate stage of plate {plate.name!r} "
                    "that runs once over the whole plate: it has no sites of its own; requeue it without sites"
                )
            site_ids = await self._site_ids(session, plate.id, keys)
            unknown = [
                validate.well_name(r, c) + f" site {s}" for r, c, s in keys if (r, c, s) not in site_ids
            ]
            if unknown:
                raise NotFound(f"plate {plate.name!r} has no {', '.join(unknown[:MAX_ERRORS_LISTED])}")
            sites = list(
                await session.scalars(select(SiteRow).where(SiteRow.id.in_(list(site_ids.values()))))
            )
            wanted = {stages.site_group_key(pipeline.group_by or [], plate.name, s) for s in sites}
            jobs = [j for j in jobs if j.group_key in wanted]
            if not jobs:
                raise FailedPrecondition(
                    f"the plate stage {_pipeline_label(pipeline)} of plate {plate.name!r} has no job yet "
                    f"for {', '.join(sorted(stages.group_label(k) for k in wanted))}; it has not run for them"
                )
        settled = [j for j in jobs if j.state in (int(SiteState.DONE), int(SiteState.FAILED))]
        if not settled or (keys and len(settled) < len(jobs)):
            busy = [j for j in jobs if j not in settled]
            state = "missing" if not jobs else SiteState((busy or jobs)[0].state).name
            which = f" for {stages.group_label((busy or jobs)[0].group_key)}" if jobs and grouped else ""
            raise FailedPrecondition(
                f"the plate stage {_pipeline_label(pipeline)} of plate {plate.name!r} is {state}{which}; "
                "only a done or failed stage is requeued"
            )
        now = utcnow()
        count = await stages.reset_jobs(
            session, now, SiteJobRow.id.in_([j.id for j in settled]), state=SiteState.WAITING
        )
        await stages.gate_stages(session, plate, now)
        return count

    async def _channel_counts(self, session: AsyncSession, site_ids: Sequence[int]) -> dict[int, int]:
        counts: dict[int, int] = {}
        for part in chunks(sorted(set(site_ids))):
            rows = await session.execute(
                select(ImageRow.site_id, func.count())
                .where(ImageRow.site_id.in_(part))
                .group_by(ImageRow.site_id)
            )
            counts.update({site_id: n for site_id, n in rows})
        return counts

    # -- progress -----------------------------------------------------------------

    async def get_progress(self, plate_name: str, pipeline_sha256: str = "") -> Progress:
        async def work(session: AsyncSession) -> Progress:
            plate, run, pipeline = await self._resolve_run(session, plate_name, pipeline_sha256)
            # One row, kept by the database's triggers (migration 0009): the
            # cost does not grow with the plate.
            row = await session.get(RunCountsRow, run.id)
            counts: dict[int, int] = defaultdict(int)
            if row is not None:
                counts.update({int(state): n for state, n in _kept_counts(row).items()})
            version = await session.scalar(
                select(func.max(ReportRow.version)).where(ReportRow.run_id == run.id)
            )
            total = sum(counts.values())
            unsettled = sum(counts[int(s)] for s in UNSETTLED)
            return Progress(
                plate=plate.name,
                pipeline_sha256=pipeline.sha256,
                total=total,
                waiting=counts[int(SiteState.WAITING)],
                ready=counts[int(SiteState.READY)] + counts[int(SiteState.CLAIMED)],
                queued=counts[int(SiteState.QUEUED)],
                running=counts[int(SiteState.RUNNING)],
                done=counts[int(SiteState.DONE)],
                failed=counts[int(SiteState.FAILED)],
                report_version=version or 0,
                reduce_failed=bool(run.reduce_failure_reason) and run.reduced_generation < run.generation,
                reduce_failure_reason=run.reduce_failure_reason or "",
                complete=bool(
                    plate.sites_known
                    and total > 0
                    and unsettled == 0
                    and run.generation > 0
                    # A plate stage has no report: its files are the plate's artifacts.
                    and (pipeline.scope == int(Scope.PLATE) or run.reduced_generation >= run.generation)
                ),
            )

        return await self._run(work)

    async def run_count_mismatches(self) -> list[str]:
        """Runs whose kept counts (`run_counts`, kept by triggers) differ from a
        count of their jobs, described; empty when every count is right. For
        tests and for an operator's check after a manual change of the database."""

        async def work(session: AsyncSession) -> list[str]:
            kept = {row.run_id: row for row in await session.scalars(select(RunCountsRow))}
            counted: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
            for run_id, state, n in await session.execute(
                select(SiteJobRow.run_id, SiteJobRow.state, func.count()).group_by(
                    SiteJobRow.run_id, SiteJobRow.state
                )
            ):
                counted[run_id][state] = n
            problems = []
            for run_id in await session.scalars(select(RunRow.id)):
                row = kept.get(run_id)
                if row is None:
                    problems.append(f"run {run_id} has no kept counts")
                    continue
                have = _kept_counts(row)
                want = {s: counted[run_id][int(s)] for s in SiteState}
                if have != want:
                    problems.append(f"run {run_id}: kept {have}, counted {want}")
            return problems

        return await self._run(work)

    # -- reduce --------------------------------------------------------------------

    async def claim_reducible_runs(
        self, scheduler_id: str, max_runs: int, lease_seconds: int = 0
    ) -> list[RunClaim]:
        """Claims runs whose sites are all settled and whose latest generation
        has not been reduced, nor queued for reduction within the reduce
        deadline. A reduce issued `max_attempts` times without a report fails
        (PlateProgress.reduce_failed) instead of being issued forever."""
        if not scheduler_id:
            raise InvalidArgument("scheduler_id is required (who claims, for status and logs)")
        if not 1 <= max_runs <= MAX_CLAIM_RUNS:
            raise InvalidArgument(f"max_runs {max_runs} is out of range: ask for 1 to {MAX_CLAIM_RUNS} runs")
        lease = _lease(lease_seconds)

        async def work(session: AsyncSession) -> tuple[list[RunClaim], set[str]]:
            now = utcnow()
            open_claim = or_(RunRow.reduce_claim_expires_at.is_(None), RunRow.reduce_claim_expires_at < now)
            candidates = list(
                await session.scalars(
                    select(RunRow.id)
                    .join(PlateRow, PlateRow.id == RunRow.plate_id)
                    .join(PipelineRow, PipelineRow.id == RunRow.pipeline_id)
                    .where(
                        PlateRow.sites_known.is_(True),
                        PipelineRow.scope != int(Scope.PLATE),
                        RunRow.generation > RunRow.reduced_generation,
                        RunRow.reduce_failure_reason.is_(None),
                        open_claim,
                    )
                    .order_by(RunRow.id)
                )
            )
            if not candidates:
                return [], set()
            claims: list[RunClaim] = []
            failed_plates: set[str] = set()
            for part in chunks(candidates, 200):
                if len(claims) >= max_runs:
                    break
                runs = list(
                    await session.scalars(
                        select(RunRow)
                        .where(RunRow.id.in_(part))
                        .order_by(RunRow.id)
                        .with_for_update(skip_locked=True)
                    )
                )
                for run in runs:
                    if len(claims) >= max_runs:
                        break
                    live = run.reduce_claim_expires_at is not None and run.reduce_claim_expires_at >= now
                    if live or run.generation <= run.reduced_generation or run.reduce_failure_reason:
                        continue
                    # Existence checks on the (run_id, state) index: they stop at
                    # the first row, however large the run.
                    if await self._run_has(session, run.id, UNSETTLED):
                        continue
                    plate = await session.get(PlateRow, run.plate_id)
                    pipeline = await session.get(PipelineRow, run.pipeline_id)
                    assert plate is not None and pipeline is not None
                    if not plate.reduce_with_failures and await self._run_has(
                        session, run.id, [SiteState.FAILED]
                    ):
                        continue
                    if run.reduce_claim_generation == run.generation:
                        # Issued before and its deadline passed with no report.
                        if run.reduce_attempts >= self.policy.max_attempts:
                            run.reduce_failure_reason = (
                                f"the reduce of generation {run.generation} was issued {run.reduce_attempts} "
                                "times and never registered a report (reducers killed on it, out of memory, "
                                "or its task dead-lettered); see the reducer's log, then "
                                f"`cellmesh requeue {plate.name} --reduce`"
                            )
                            run.reduce_claim_expires_at = None
                            log.error("plate %s: %s", plate.name, run.reduce_failure_reason)
                            failed_plates.add(plate.name)
                            continue
                        log.warning(
                            "plate %s: the reduce of generation %d passed its deadline; issuing it again",
                            plate.name,
                            run.generation,
                        )
                        run.reduce_attempts += 1
                    else:
                        run.reduce_attempts = 1
                    run.reduce_claimed_by = scheduler_id[:200]
                    run.reduce_claim_generation = run.generation
                    run.reduce_claim_expires_at = now + timedelta(seconds=lease)
                    claims.append(RunClaim(plate.name, pipeline.sha256, pipeline.key, run.generation))
            return claims, failed_plates

        claims, failed_plates = await self._run(work)
        self.changes.notify(failed_plates)
        return claims

    async def _run_has(self, session: AsyncSession, run_id: int, states: Sequence[SiteState]) -> bool:
        found = await session.scalar(
            select(SiteJobRow.id)
            .where(SiteJobRow.run_id == run_id, SiteJobRow.state.in_([int(s) for s in states]))
            .limit(1)
        )
        return found is not None

    async def mark_runs_queued(self, scheduler_id: str, runs: Sequence[tuple[str, str, int]]) -> int:
        """Records that reduce tasks of these (plate, pipeline, generation) are
        on the queue; returns how many are (a replay counts them again)."""

        async def work(session: AsyncSession) -> int:
            marked = 0
            for plate_name, sha, generation in runs:
                try:
                    _plate, run, _pipeline = await self._resolve_run(session, plate_name, sha)
                except NotFound:
                    continue
                await session.refresh(run, with_for_update=True)
                if run.reduce_claim_generation != generation:
                    continue
                if generation >= run.reduce_queued_generation:
                    # First queued, or issued again after its deadline (a replay
                    # of this call lands here too, and only moves the deadline on).
                    run.reduce_queued_generation = generation
                    # The deadline of the reduce in flight: a report by then, or it is issued again.
                    run.reduce_claim_expires_at = utcnow() + timedelta(seconds=self.policy.reduce_deadline_s)
                    marked += 1
            return marked

        return await self._run(work)

    async def register_report(self, report: Report) -> tuple[bool, Report]:
        """Registers a plate report with the next version of its run; the same
        generation twice returns the first one (recorded False, unless it is
        the same report again: a replay)."""
        _check_report(report)

        async def work(session: AsyncSession) -> tuple[bool, Report]:
            plate, run, pipeline = await self._resolve_run(session, report.plate, report.pipeline_sha256)
            scope = keys.run_reports(plate.name, pipeline.sha256)
            stray = [f for f in report.files if keys.outside(f.key, scope)]
            if stray:
                raise _invalid(
                    [
                        f"report file {f.name!r} key {f.key!r} lies outside its run's reports {scope}…"
                        for f in stray
                    ]
                )
            await session.refresh(run, with_for_update=True)
            existing = await session.scalar(
                select(ReportRow).where(ReportRow.run_id == run.id, ReportRow.generation == report.generation)
            )
            if existing is not None:
                # The same files again is a replay of the call that registered
                # them (its reply was lost): that call's answer. Another
                # report of the generation is told it was not recorded.
                replay = [(f["name"], f["key"], f["sha256"]) for f in existing.files or []] == [
                    (f.name, f.key, f.sha256) for f in report.files
                ]
                return replay, _report(existing, plate.name, pipeline.sha256)
            if report.generation > run.generation:
                raise FailedPrecondition(
                    f"generation {report.generation} is ahead of plate {plate.name!r}'s run, which is at "
                    f"generation {run.generation}; report a generation from ClaimReducibleRuns"
                )
            if report.generation < run.reduced_generation:
                raise FailedPrecondition(
                    f"generation {report.generation} is older than the latest report's generation "
                    f"{run.reduced_generation}; nothing was registered"
                )
            latest = await session.scalar(
                select(func.max(ReportRow.version)).where(ReportRow.run_id == run.id)
            )
            row = ReportRow(
                run_id=run.id,
                version=(latest or 0) + 1,
                generation=report.generation,
                files=[
                    {"name": f.name, "kind": f.kind, "key": f.key, "size": f.size, "sha256": f.sha256}
                    for f in report.files
                ],
                wells=report.wells,
                sites=report.sites,
                missing_sites=[
                    {"well": m.well, "site": m.site, "state": int(m.state or 0), "reason": m.reason}
                    for m in report.missing_sites
                ],
                created_at=utcnow(),
                qc=report.qc,
            )
            session.add(row)
            run.reduced_generation = report.generation
            if run.reduce_claim_generation <= report.generation:
                run.reduce_claim_expires_at = None
            await session.flush()
            return True, _report(row, plate.name, pipeline.sha256)

        try:
            recorded, stored = await self._run(work)
        except IntegrityError:
            # The same generation registered at the same moment by another reducer.
            return False, await self._report_of_generation(report)
        self.changes.notify([report.plate])
        return recorded, stored

    async def _report_of_generation(self, report: Report) -> Report:
        async def work(session: AsyncSession) -> Report:
            plate, run, pipeline = await self._resolve_run(session, report.plate, report.pipeline_sha256)
            row = await session.scalar(
                select(ReportRow).where(ReportRow.run_id == run.id, ReportRow.generation == report.generation)
            )
            if row is None:
                raise FailedPrecondition("the report could not be registered; retry")
            return _report(row, plate.name, pipeline.sha256)

        return await self._run(work)

    async def get_report(self, plate_name: str, pipeline_sha256: str = "", version: int = 0) -> Report:
        if version < 0:
            raise InvalidArgument(f"version {version} is negative; give a version or 0 for the latest")

        async def work(session: AsyncSession) -> Report:
            plate, run, pipeline = await self._resolve_run(session, plate_name, pipeline_sha256)
            query = select(ReportRow).where(ReportRow.run_id == run.id)
            if version:
                query = query.where(ReportRow.version == version)
            else:
                query = query.order_by(ReportRow.version.desc()).limit(1)
            row = await session.scalar(query)
            if row is None:
                label = _pipeline_label(pipeline)
                if version:
                    latest = await session.scalar(
                        select(func.max(ReportRow.version)).where(ReportRow.run_id == run.id)
                    )
                    raise NotFound(
                        f"plate {plate.name} has no report version {version} for pipeline {label}"
                        + (f" (the latest is {latest})" if latest else " (it has no report yet)")
                    )
                raise NotFound(f"plate {plate.name} has no report yet for pipeline {label}")
            return _report(row, plate.name, pipeline.sha256)

        return await self._run(work)


# -- helpers -----------------------------------------------------------------------


def _kept_counts(row: RunCountsRow) -> dict[SiteState, int]:
    """A `run_counts` row as jobs per state (its columns are the states' names)."""
    return {state: getattr(row, state.name.lower()) for state in SiteState}


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0][:300]


def _check(check: Callable[..., T], *args: Any) -> T:
    try:
        return check(*args)
    except Invalid as exc:
        raise InvalidArgument(str(exc)) from None


def _check_execution(execution_id: str) -> str:
    if len(execution_id) > 64 or not all(c.isalnum() or c in "-_" for c in execution_id):
        raise InvalidArgument(
            f"execution_id {execution_id[:80]!r} is not valid: use up to 64 letters, digits, '-' or '_'"
        )
    return execution_id


def _check_holder(job: SiteJobRow, job_id: int, attempt: int, execution_id: str) -> None:
    """Refuses a call from an execution that no longer holds the job's attempt
    (another execution took it over after a redelivery)."""
    if execution_id and attempt == job.attempt and job.execution_id and job.execution_id != execution_id:
        raise FailedPrecondition(
            f"execution {execution_id} of site job {job_id} attempt {attempt} was taken over by "
            f"execution {job.execution_id} ({job.worker_id or 'another worker'}); its outcome is not recorded"
        )


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def _lease(lease_seconds: int) -> int:
    if lease_seconds == 0:
        return DEFAULT_LEASE_SECONDS
    if not 1 <= lease_seconds <= MAX_LEASE_SECONDS:
        raise InvalidArgument(
            f"lease_seconds {lease_seconds} is out of range: give 1 to {MAX_LEASE_SECONDS}, or 0 for {DEFAULT_LEASE_SECONDS}"
        )
    return lease_seconds


def _check_channels(channels: Sequence[str]) -> list[str]:
    if not channels:
        raise InvalidArgument("channels are required: list the channels every site has, e.g. ['DNA', 'GFP']")
    seen: set[str] = set()
    for channel in channels:
        _check(validate.check_channel_name, channel)
        if channel in seen:
            raise InvalidArgument(f"channel {channel!r} is listed twice; list each channel once")
        seen.add(channel)
    return list(channels)


def _check_pipeline_fits(
    pipeline: PipelineRow, channels: Sequence[str], plate: str, after_stage: PipelineRow | None = None
) -> None:
    """Every image name the pipeline assigns is a channel of the plate, or,
    for a stage after a plate stage, may be one of that stage's files (an
    illumination function): which file is checked when the site runs."""
    if pipeline.stage_inputs and after_stage is None:
        raise InvalidArgument(
            f"pipeline {_pipeline_label(pipeline)} reads {', '.join(pipeline.stage_inputs)} from an earlier "
            f"plate stage, and plate {plate} runs no plate-scope stage before it: create the plate with "
            "the plate stage and add this pipeline after it (AddPlatePipeline), or register it with the "
            "files attached"
        )
    missing = [n for n in pipeline.image_names if n not in channels]
    if missing and after_stage is not None and pipeline.scope != int(Scope.PLATE):
        return
    if missing:
        names = _quoted(missing)
        raise InvalidArgument(
            f"pipeline {_pipeline_label(pipeline)} assigns {_plural(missing, 'image', 'images')} {names}, "
            f"which plate {plate} does not declare; declare {_plural(missing, 'it as a channel', 'them as channels')} "
            "or use another pipeline"
        )


def _layout_sites(layout: Layout) -> list[tuple[int, int, int]]:
    """Every (row, column, site) a layout expects; raises InvalidArgument."""
    if not 1 <= layout.rows <= validate.MAX_ROWS:
        raise InvalidArgument(
            f"layout rows {layout.rows} is out of range: give 1 to {validate.MAX_ROWS} (8 for 96 wells, 16 for 384, 32 for 1536)"
        )
    if not 1 <= layout.columns <= validate.MAX_COLUMNS:
        raise InvalidArgument(
            f"layout columns {layout.columns} is out of range: give 1 to {validate.MAX_COLUMNS} (12, 24 or 48)"
        )
    if not 1 <= layout.sites_per_well <= MAX_SITES_PER_WELL:
        raise InvalidArgument(
            f"layout sites_per_well {layout.sites_per_well} is out of range: give 1 to {MAX_SITES_PER_WELL}"
        )
    if layout.first_site < 0:
        raise InvalidArgument(
            f"layout first_site {layout.first_site} is negative: sites are numbered from 0 or 1"
        )
    if layout.wells:
        wells: list[tuple[int, int]] = []
        for well in layout.wells:
            r, c = _check(validate.parse_well, well)
            if r >= layout.rows or c > layout.columns:
                raise InvalidArgument(
                    f"layout well {well} is outside a plate of {layout.rows} rows x {layout.columns} columns"
                )
            if (r, c) in wells:
                raise InvalidArgument(f"layout well {well} is listed twice; list each well once")
            wells.append((r, c))
    else:
        wells = [(r, c) for r in range(layout.rows) for c in range(1, layout.columns + 1)]
    if len(wells) * layout.sites_per_well > MAX_LAYOUT_SITES:
        raise InvalidArgument(f"the layout expects more than {MAX_LAYOUT_SITES} sites; split the plate")
    sites = range(layout.first_site, layout.first_site + layout.sites_per_well)
    return [(r, c, s) for r, c in wells for s in sites]


def _layout_json(layout: Layout) -> dict[str, Any]:
    return {
        "rows": layout.rows,
        "columns": layout.columns,
        "sites_per_well": layout.sites_per_well,
        "first_site": layout.first_site,
        "wells": list(layout.wells),
    }


def _layout(data: dict[str, Any] | None) -> Layout | None:
    if data is None:
        return None
    return Layout(
        rows=int(data["rows"]),
        columns=int(data["columns"]),
        sites_per_well=int(data["sites_per_well"]),
        first_site=int(data["first_site"]),
        wells=list(data.get("wells") or []),
    )


class _LayoutCheck:
    """Is a (row, column, site) one a plate's layout expects?"""

    def __init__(self, layout: Layout) -> None:
        self.sites = range(layout.first_site, layout.first_site + layout.sites_per_well)
        self.wells = {validate.parse_well(w) for w in layout.wells} if layout.wells else None
        self.rows, self.columns = layout.rows, layout.columns

    def __call__(self, row: int, col: int, site: int) -> bool:
        if site not in self.sites:
            return False
        if self.wells is not None:
            return (row, col) in self.wells
        return row < self.rows and col <= self.columns


def _check_images(images: Sequence[ImageIn]) -> list[tuple[int, int]]:
    """Checks every image's own fields; returns each one's (row, column)."""
    problems: list[str] = []
    parsed: list[tuple[int, int]] = []
    for n, img in enumerate(images):
        try:
            if not img.plate:
                raise Invalid("site.plate is required (the plate's name)")
            rc = validate.parse_well(img.well)
            validate.check_site(img.site)
            if not img.channel:
                raise Invalid("channel is required")
            validate.check_key(img.key, "object.key")
            scope = keys.plate_images(img.plate)
            if keys.outside(img.key, scope):
                raise Invalid(
                    f"object.key {img.key!r} lies outside plate {img.plate}'s images: store it under "
                    f"{scope}… (e.g. {keys.image_key(img.plate, img.well, img.site, img.channel or 'CH', img.file_name or 'f.tif')})"
                )
            validate.check_sha256(img.sha256, "object.sha256")
            validate.check_size(img.size, "object.size")
            validate.check_file_name(img.file_name)
            validate.check_metadata(img.metadata)
        except Invalid as exc:
            where = f"image {n} ({img.plate or '?'} {img.well or '?'} site {img.site} {img.channel or '?'})"
            problems.append(f"{where}: {exc}")
            rc = (0, 0)
        parsed.append(rc)
    if problems:
        raise _invalid(problems)
    return parsed


def _site_metadata(
    plate: str,
    images: Sequence[ImageIn],
    parsed: list[tuple[int, int]],
    indexes: list[int],
    site_ids: dict[tuple[int, int, int], int],
    known: dict[int, dict[str, str]],
) -> dict[tuple[int, int, int], dict[str, str]]:
    """The metadata of every site the images bring any for: what the site has,
    plus the keys it gains. Two images of the request that disagree on a key
    are refused (INVALID_ARGUMENT), and so is a value other than the one the
    site has (FAILED_PRECONDITION), naming the key and both values."""
    out: dict[tuple[int, int, int], dict[str, str]] = {}
    given_by: dict[tuple[int, int, int, str], int] = {}
    stored_conflicts: list[str] = []
    for i in indexes:
        img = images[i]
        if not img.metadata:
            continue
        key = (*parsed[i], img.site)
        site_id = site_ids.get(key)
        stored = known.get(site_id, {}) if site_id is not None else {}
        meta = out.setdefault(key, dict(stored))
        for name, value in sorted(img.metadata.items()):
            earlier = given_by.get((*key, name))
            if earlier is not None and images[earlier].metadata[name] != value:
                raise InvalidArgument(
                    f"images {earlier} and {i} of plate {plate!r} well {img.well} site {img.site} give "
                    f"metadata {name} as {images[earlier].metadata[name]!r} and {value!r}: every image "
                    "of a site must agree; fix the file names or the pattern"
                )
            given_by.setdefault((*key, name), i)
            if name in stored and stored[name] != value:
                stored_conflicts.append(
                    f"image {i} gives plate {plate!r} well {img.well} site {img.site} metadata {name} "
                    f"{value!r}, but the site has {stored[name]!r} from its earlier images"
                )
                continue
            meta[name] = value
    if stored_conflicts:
        raise FailedPrecondition(
            "; ".join(stored_conflicts[:MAX_ERRORS_LISTED])
            + (
                f"; and {len(stored_conflicts) - MAX_ERRORS_LISTED} more"
                if len(stored_conflicts) > MAX_ERRORS_LISTED
                else ""
            )
            + " (a site's metadata never changes: register the images under the values the site has)"
        )
    for meta in out.values():
        if len(meta) > validate.MAX_METADATA_KEYS:
            raise InvalidArgument(
                f"plate {plate!r}: a site would have {len(meta)} metadata keys; at most "
                f"{validate.MAX_METADATA_KEYS} are allowed"
            )
    return out


def _check_against_plates(
    images: Sequence[ImageIn], parsed: list[tuple[int, int]], plates: dict[str, PlateRow]
) -> None:
    problems: list[str] = []
    channels = {name: set(p.channels) for name, p in plates.items()}
    layouts = {
        name: _LayoutCheck(lay) for name, p in plates.items() if (lay := _layout(p.layout)) is not None
    }
    for n, img in enumerate(images):
        plate = plates[img.plate]
        if img.channel not in channels[img.plate]:
            where = f"image {n} ({img.plate} {img.well} site {img.site} {img.channel})"
            problems.append(
                f"{where}: channel {img.channel!r} is not one plate {plate.name} declares ({', '.join(plate.channels)})"
            )
            continue
        in_layout = layouts.get(img.plate)
        if in_layout is not None and not in_layout(*parsed[n], img.site):
            where = f"image {n} ({img.plate} {img.well} site {img.site} {img.channel})"
            problems.append(
                f"{where}: well {img.well} site {img.site} is outside plate {plate.name}'s layout"
            )
    if problems:
        raise _invalid(problems)


def _missing_reason(channels: Sequence[str], have: set[str]) -> str:
    if not have:
        return "never imaged"
    missing = [c for c in channels if c not in have]
    return f"missing channel(s) {', '.join(missing)}"


def _job_row(run_id: int, site_id: int, state: SiteState, ready_at: datetime | None) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "site_id": site_id,
        "state": int(state),
        "attempt": 0,
        "ready_at": ready_at,
        "failure_class": 0,
    }


async def _reset_jobs(session: AsyncSession, now: datetime, *where: Any) -> None:
    """Puts the matching jobs back to READY (see stages.reset_jobs)."""
    await stages.reset_jobs(session, now, *where)


def _pipeline_info(row: PipelineRow) -> PipelineInfo:
    return PipelineInfo(
        sha256=row.sha256,
        key=row.key,
        name=row.name,
        modules=list(row.modules),
        image_names=list(row.image_names),
        tables=list(row.tables),
        table_files=list(row.table_files),
        created_at=row.created_at,
        attachments=_input_files(row.attachments),
        content_sha256=row.content_sha256 or "",
        stage_inputs=list(row.stage_inputs or []),
        scope=Scope(row.scope or Scope.SITE),
        scope_reasons=list(row.scope_reasons or []),
        group_by=list(row.group_by or []),
    )


def _claim_inputs(attachments: list[dict[str, Any]] | None, artifacts: list[ResultFile]) -> list[InputFile]:
    """A claim's input files: the pipeline's attachments, then the earlier plate
    stages' artifacts; an attachment wins over an artifact of the same name."""
    files = _input_files(attachments)
    names = {f.name for f in files}
    return files + [InputFile(f.name, f.key, f.size, f.sha256) for f in artifacts if f.name not in names]


def _input_file_json(f: InputFile) -> dict[str, Any]:
    return {"name": f.name, "key": f.key, "size": f.size, "sha256": f.sha256}


def _input_files(value: list[dict[str, Any]] | None) -> list[InputFile]:
    return [InputFile(str(f["name"]), str(f["key"]), int(f["size"]), str(f["sha256"])) for f in value or []]


def _plate_info(plate: PlateRow, pipelines: list[str]) -> PlateInfo:
    return PlateInfo(
        name=plate.name,
        channels=list(plate.channels),
        layout=_layout(plate.layout),
        sites_known=plate.sites_known,
        acquisition_finished=plate.acquisition_finished,
        pipelines=pipelines,
        reduce_with_failures=plate.reduce_with_failures,
        created_at=plate.created_at,
        image_count=plate.image_count,
        created_by=plate.created_by or "",
        plate_map=plate.platemap,
        qc_gate=plate.qc_gate,
    )


def _map_sha(plate_map: dict[str, Any] | None) -> str | None:
    return None if plate_map is None else str(plate_map.get("sha256"))


def _provenance_json(p: Provenance) -> dict[str, Any]:
    return {
        "cellprofiler_version": p.cellprofiler_version,
        "pipeline_sha256": p.pipeline_sha256,
        "input_sha256": list(p.input_sha256),
        "worker_id": p.worker_id,
        "download_seconds": p.download_seconds,
        "run_seconds": p.run_seconds,
        "upload_seconds": p.upload_seconds,
        "object_counts": dict(p.object_counts),
        "mode": p.mode,
    }


def _job_info(
    job: SiteJobRow,
    site: SiteKey,
    sha: str,
    with_results: bool,
    scope: Scope = Scope.SITE,
    metadata: dict[str, str] | None = None,
) -> SiteJobInfo:
    results = [ResultFile(**r) for r in (job.results or [])] if with_results else []
    provenance = Provenance(**job.provenance) if with_results and job.provenance else None
    return SiteJobInfo(
        id=job.id,
        site=site,
        pipeline_sha256=sha,
        state=SiteState(job.state),
        attempt=job.attempt,
        failure_class=FailureClass(job.failure_class),
        failure_reason=job.failure_reason or "",
        worker_id=job.worker_id or "",
        ready_at=job.ready_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        results=results,
        provenance=provenance,
        execution_id=job.execution_id or "",
        scope=scope,
        metadata=metadata or {},
    )


def _check_results(results: Sequence[ResultFile]) -> list[str]:
    problems: list[str] = []
    for n, r in enumerate(results):
        try:
            if not r.name:
                raise Invalid(f"result {n} has no name (its path in the output folder, e.g. 'Image.csv')")
            validate.check_key(r.key, f"result {r.name!r} key")
            validate.check_sha256(r.sha256, f"result {r.name!r} sha256")
            validate.check_size(r.size, f"result {r.name!r} size")
        except Invalid as exc:
            problems.append(str(exc))
    return problems


def _check_report(report: Report) -> None:
    problems: list[str] = []
    if report.generation < 1:
        problems.append("generation is required: give the generation from the RunClaim being reduced")
    if report.wells < 0 or report.sites < 0:
        problems.append("wells and sites must not be negative")
    for n, f in enumerate(report.files):
        try:
            if not f.name:
                raise Invalid(f"file {n} has no name")
            validate.check_key(f.key, f"file {f.name!r} key")
            validate.check_sha256(f.sha256, f"file {f.name!r} sha256")
            validate.check_size(f.size, f"file {f.name!r} size")
        except Invalid as exc:
            problems.append(str(exc))
    for m in report.missing_sites:
        try:
            validate.check_well(m.well)
            validate.check_site(m.site)
        except Invalid as exc:
            problems.append(f"missing site: {exc}")
    if problems:
        raise _invalid(problems)


def _report(row: ReportRow, plate: str, sha: str) -> Report:
    return Report(
        plate=plate,
        pipeline_sha256=sha,
        generation=row.generation,
        files=[ReportFile(**f) for f in row.files],
        wells=row.wells,
        sites=row.sites,
        missing_sites=[
            MissingSite(
                m["well"],
                int(m["site"]),
                SiteState(m["state"]) if m.get("state") else None,
                m.get("reason", ""),
            )
            for m in row.missing_sites
        ],
        version=row.version,
        created_at=row.created_at,
        qc=row.qc,
    )


@dataclass(frozen=True)
class SitesPage:
    """A page of ListSites: the jobs, each one's (row, column, site), the
    run they belong to, and whether more follow the last one."""

    jobs: list[SiteJobInfo]
    positions: list[tuple[int, int, int]]
    run_id: int
    more: bool

    def token_after(self, index: int) -> str:
        """The page token that continues after jobs[index]."""
        return _encode_token(["sites", self.run_id, *self.positions[index]])


def _decode_sites_token(token: str) -> tuple[int, int, int, int]:
    try:
        padded = token + "=" * (-len(token) % 4)
        position = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if (
            isinstance(position, list)
            and len(position) == 5
            and position[0] == "sites"
            and all(isinstance(v, int) and not isinstance(v, bool) for v in position[1:])
        ):
            return position[1], position[2], position[3], position[4]
    except (ValueError, UnicodeDecodeError):
        pass
    raise InvalidArgument("page_token is not one ListSites issued; pass next_page_token unchanged")


def _encode_token(position: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


def _decode_token(token: str) -> list[Any]:
    try:
        padded = token + "=" * (-len(token) % 4)
        position = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if (
            isinstance(position, list)
            and len(position) == 4
            and all(isinstance(v, int) for v in position[:3])
            and isinstance(position[3], str)
        ):
            return position
    except (ValueError, UnicodeDecodeError):
        pass
    raise InvalidArgument("page_token is not one this catalog issued; pass next_page_token unchanged")


__all__ = [
    "AlreadyExists",
    "CatalogError",
    "CatalogStore",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "Unavailable",
    "make_engine",
]
