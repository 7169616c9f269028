"""Workflows of stages: plate-scope runs and the gates they put on the runs
after them.

A plate runs its pipelines in workflow order (`RunRow.position`). A run of a
site-scope pipeline has a job per site; a run of a plate-scope pipeline (a
*plate stage*, e.g. an illumination function calculated from every image)
has one job, with no site, over every site of the plate. The stage's result
files are the plate's *artifacts*: every run after it finds them in its
Default Input Folder, so none of its jobs may run before they exist.

Each run has a gate (`domain.Gate`), recomputed after every change that can
move it (`gate_stages`):

- OPEN: every plate stage before it is done. Its jobs run as usual.
- HELD: a plate stage before it is not done yet (or runs again). Its jobs
  wait; when the gate closes on jobs that ran already, with artifacts now
  stale, they go back to waiting and their results become past results
  (still registered, never overwritten), so they run again and the run gets
  a new report version.
- BROKEN: a plate stage before it failed for good. Its jobs fail as input
  problems that name the stage, so the plate settles instead of waiting for
  ever; requeueing the stage reopens the gate.

A plate stage itself becomes READY once its own gate is open and every site
the plate will have is in: the plate's sites are known (a declared layout or
a finished acquisition) and each has all its channels (after a finished
acquisition, the incomplete sites have failed and the stage runs without them).

This module is the catalog's: like store.py, it is the only kind of code that
touches the database, and store.py calls it inside its transactions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.catalog.domain import FailureClass, Gate, ResultFile, Scope, SiteState
from services.catalog.models import ImageRow, PipelineRow, PlateRow, RunRow, SiteJobRow, SiteRow

log = logging.getLogger(__name__)


def gates(runs: Sequence[tuple[Scope, SiteState | None]]) -> list[Gate]:
    """The gate of each run, given (scope, state of its stage job) in
    workflow order (the state is None for site-scope runs)."""
    gate = Gate.OPEN
    out = []
    for scope, stage_state in runs:
        out.append(gate)
        if scope == Scope.PLATE and gate == Gate.OPEN:
            if stage_state == SiteState.FAILED:
                gate = Gate.BROKEN
            elif stage_state != SiteState.DONE:
                gate = Gate.HELD
    return out


def stage_job_row(run_id: int) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "site_id": None,
        "state": int(SiteState.WAITING),
        "attempt": 0,
        "ready_at": None,
        "failure_class": 0,
    }


async def has_stages(session: AsyncSession, plate_id: int) -> bool:
    found = await session.scalar(
        select(RunRow.id)
        .join(PipelineRow, PipelineRow.id == RunRow.pipeline_id)
        .where(RunRow.plate_id == plate_id, PipelineRow.scope == int(Scope.PLATE))
        .limit(1)
    )
    return found is not None


async def gate_stages(session: AsyncSession, plate: PlateRow, now: datetime) -> None:
    """Brings every run's gate and every plate stage's readiness up to date
    (see the module's doc). Does nothing on a plate without plate stages."""
    if not await has_stages(session, plate.id):
        return
    runs = (
        await session.execute(
            select(RunRow, PipelineRow.scope, PipelineRow.name)
            .join(PipelineRow, PipelineRow.id == RunRow.pipeline_id)
            .where(RunRow.plate_id == plate.id)
            .order_by(RunRow.position)
            .with_for_update(of=RunRow)
        )
    ).all()
    stage_jobs = {
        job.run_id: job
        for job in await session.scalars(
            select(SiteJobRow)
            .where(SiteJobRow.run_id.in_([r.id for r, _s, _n in runs]), SiteJobRow.site_id.is_(None))
            .with_for_update()
        )
    }
    gate = Gate.OPEN
    why = ""
    for run, scope, name in runs:
        await _apply_gate(session, plate, run, Scope(scope), gate, why, now)
        if scope != Scope.PLATE:
            continue
        job = stage_jobs.get(run.id)
        if job is None:  # a stage run always has its job; made here if an older catalog had none
            job = SiteJobRow(**stage_job_row(run.id))
            session.add(job)
            await session.flush()
        if gate == Gate.OPEN and job.state == int(SiteState.WAITING) and await plate_all_in(session, plate):
            job.state = int(SiteState.READY)
            job.ready_at = now
            log.info("plate %s: stage %s is ready (every site is in)", plate.name, name)
        if gate == Gate.OPEN:
            if job.state == int(SiteState.FAILED):
                gate = Gate.BROKEN
                why = (
                    f"the plate stage {name!r} failed: {job.failure_reason or 'no reason'}; "
                    "requeue that stage to run this again"
                )
            elif job.state != int(SiteState.DONE):
                gate = Gate.HELD


async def _apply_gate(
    session: AsyncSession, plate: PlateRow, run: RunRow, scope: Scope, gate: Gate, why: str, now: datetime
) -> None:
    old = Gate(run.gate)
    run.gate = int(gate)
    if gate == Gate.HELD:
        if old != Gate.HELD:
            # The artifacts its jobs ran with are gone or about to change.
            count = await reset_jobs(
                session,
                now,
                SiteJobRow.run_id == run.id,
                SiteJobRow.state != int(SiteState.WAITING),
                state=SiteState.WAITING,
            )
            if count:
                log.info(
                    "plate %s: %d job(s) of run %d wait for a stage before them again",
                    plate.name,
                    count,
                    run.id,
                )
        else:
            # Sites whose channels came in since (registration made them READY).
            await session.execute(
                update(SiteJobRow)
                .where(SiteJobRow.run_id == run.id, SiteJobRow.state == int(SiteState.READY))
                .values(state=int(SiteState.WAITING), ready_at=None)
                .execution_options(synchronize_session=False)
            )
        return
    if gate == Gate.BROKEN:
        result = await session.execute(
            update(SiteJobRow)
            .where(
                SiteJobRow.run_id == run.id,
                SiteJobRow.state.in_([int(SiteState.WAITING), int(SiteState.READY)]),
            )
            .values(
                state=int(SiteState.FAILED),
                failure_class=int(FailureClass.INPUT_PROBLEM),
                failure_reason=why,
                finished_at=now,
                ready_at=None,
            )
            .execution_options(synchronize_session=False)
        )
        failed = int(getattr(result, "rowcount", 0) or 0)
        if failed:
            await session.execute(
                update(RunRow)
                .where(RunRow.id == run.id)
                .values(generation=RunRow.generation + failed)
                .execution_options(synchronize_session=False)
            )
        return
    if old == Gate.OPEN:
        return
    if old == Gate.BROKEN:
        await reset_jobs(
            session,
            now,
            SiteJobRow.run_id == run.id,
            SiteJobRow.state != int(SiteState.DONE),
            state=SiteState.WAITING,
        )
    if scope == Scope.SITE:
        released = await release_complete_sites(session, plate, run.id, now)
        log.info("plate %s: run %d released, %d site(s) ready", plate.name, run.id, released)


async def release_complete_sites(session: AsyncSession, plate: PlateRow, run_id: int, now: datetime) -> int:
    """WAITING jobs of a run whose site has every channel go to READY."""
    complete = (
        select(ImageRow.site_id)
        .join(SiteRow, SiteRow.id == ImageRow.site_id)
        .where(SiteRow.plate_id == plate.id)
        .group_by(ImageRow.site_id)
        .having(func.count(ImageRow.id) >= len(plate.channels))
    )
    ids = list(
        await session.scalars(
            select(SiteJobRow.id).where(
                SiteJobRow.run_id == run_id,
                SiteJobRow.state == int(SiteState.WAITING),
                SiteJobRow.site_id.in_(complete),
            )
        )
    )
    for start in range(0, len(ids), 1000):
        await session.execute(
            update(SiteJobRow)
            .where(SiteJobRow.id.in_(ids[start : start + 1000]))
            .values(state=int(SiteState.READY), ready_at=now)
            .execution_options(synchronize_session=False)
        )
    return len(ids)


async def plate_all_in(session: AsyncSession, plate: PlateRow) -> bool:
    """Whether every site the plate will have is in (see the module's doc)."""
    if not plate.sites_known:
        return False
    complete = await session.scalar(
        select(ImageRow.site_id)
        .join(SiteRow, SiteRow.id == ImageRow.site_id)
        .where(SiteRow.plate_id == plate.id)
        .group_by(ImageRow.site_id)
        .having(func.count(ImageRow.id) >= len(plate.channels))
        .limit(1)
    )
    if complete is None:
        return False
    if plate.acquisition_finished:
        return True
    incomplete = await session.scalar(
        select(SiteRow.id)
        .outerjoin(ImageRow, ImageRow.site_id == SiteRow.id)
        .where(SiteRow.plate_id == plate.id)
        .group_by(SiteRow.id)
        .having(func.count(ImageRow.id) < len(plate.channels))
        .limit(1)
    )
    return incomplete is None


async def complete_site_ids(session: AsyncSession, plate: PlateRow) -> list[int]:
    """The plate's sites that have every channel, in plate order."""
    return list(
        await session.scalars(
            select(SiteRow.id)
            .join(ImageRow, ImageRow.site_id == SiteRow.id)
            .where(SiteRow.plate_id == plate.id)
            .group_by(SiteRow.id, SiteRow.well_row, SiteRow.well_col, SiteRow.site)
            .having(func.count(ImageRow.id) >= len(plate.channels))
            .order_by(SiteRow.well_row, SiteRow.well_col, SiteRow.site)
        )
    )


async def artifacts_before(session: AsyncSession, plate_id: int, position: int) -> list[ResultFile]:
    """The result files of the done plate stages before `position`, by name
    (a later stage's file of the same name wins)."""
    rows = await session.execute(
        select(SiteJobRow.results)
        .join(RunRow, RunRow.id == SiteJobRow.run_id)
        .join(PipelineRow, PipelineRow.id == RunRow.pipeline_id)
        .where(
            RunRow.plate_id == plate_id,
            RunRow.position < position,
            PipelineRow.scope == int(Scope.PLATE),
            SiteJobRow.site_id.is_(None),
            SiteJobRow.state == int(SiteState.DONE),
        )
        .order_by(RunRow.position)
    )
    found: dict[str, ResultFile] = {}
    for (results,) in rows:
        for r in results or []:
            found[str(r["name"])] = ResultFile(**r)
    return list(found.values())


async def reset_jobs(
    session: AsyncSession, now: datetime, *where: Any, state: SiteState = SiteState.READY
) -> int:
    """Puts the matching jobs back to `state` (READY, or WAITING when they
    must wait for a stage). Results they had stay registered as past results:
    their objects are never swept, and a report made from them stays
    readable. Returns how many jobs moved."""
    count = 0
    for job in await session.scalars(select(SiteJobRow).where(*where).with_for_update()):
        if job.results:
            job.past_results = [*(job.past_results or []), *job.results]
        job.state = int(state)
        job.ready_at = now if state == SiteState.READY else None
        job.claimed_by = None
        job.claim_expires_at = None
        job.execution_id = None
        job.failure_class = int(FailureClass.UNSPECIFIED)
        job.failure_reason = None
        job.finished_at = None
        job.results = None
        job.provenance = None
        # A fresh set of attempts (the number itself goes on, to fence off old tasks).
        job.free_attempts = job.attempt
        job.transient_since = None
        count += 1
    return count
