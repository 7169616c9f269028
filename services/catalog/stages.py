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

**Groups.** A plate stage whose pipeline groups its image sets by metadata
keys (`PipelineRow.group_by`, from its Groups module or LoadData) has one job
per group instead (`SiteJobRow.group_key`: the group's values, `group_key`),
made as soon as a site of the group is known. A site's values are its well,
site and plate for `Well`, `Site` and `Plate`, else its metadata; a site with
no image yet (or whose images do not name the key yet) belongs to no group,
and holds every group's stage until it does (a complete site without the key
is in the group whose value is empty). A group's job runs as soon as every
site of that group is in and no site of the plate may still join it, with
only that group's sites; its files are that group's artifacts. On a plate
with such a stage, gates are kept per job (`SiteJobRow.gate`): a site's job
waits for, and gets the artifacts of, the stage jobs whose group holds its
site, so a group is released, held again (its stage rerun) or broken without
touching the other groups. A plate stage after a grouped one runs per its own
groups (or once) with the artifacts of every group its sites are in; two
groups' files of one name reach it as the last group's.

This module is the catalog's: like store.py, it is the only kind of code that
touches the database, and store.py calls it inside its transactions.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
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


def is_grouped(group_by: Sequence[str] | None, jobs: Sequence[SiteJobRow]) -> bool:
    """Whether a plate stage runs per group: its pipeline groups, and it has
    no job over the whole plate (one made before stages ran per group)."""
    return bool(group_by) and not any(j.group_key is None for j in jobs)


def group_values(
    keys: Sequence[str], plate_name: str, site: SiteRow, complete: bool
) -> dict[str, str] | None:
    """The site's value of each grouping key (see the module's doc), or None
    while a key is unknown (the site is not complete and its images did not
    name it)."""
    metadata = site.site_metadata or {}
    values: dict[str, str] = {}
    for key in keys:
        if key == "Plate":
            value: str | None = plate_name
        elif key == "Well":
            value = site.well
        elif key == "Site":
            value = str(site.site)
        else:
            value = metadata.get(key)
        if value is None:
            if not complete:
                return None
            value = ""
        values[key] = value
    return values


def group_key(values: dict[str, str]) -> str:
    """A group's values as stored in `SiteJobRow.group_key` (JSON, in the
    pipeline's key order)."""
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False)


def group_values_of(key: str | None) -> dict[str, str]:
    """The values a `group_key` holds; empty for the whole plate."""
    return {str(k): str(v) for k, v in json.loads(key).items()} if key else {}


def group_label(key: str | None) -> str:
    """`Batch=B1, Well=A01` for messages; empty for the whole plate."""
    if not key:
        return ""
    return ", ".join(f"{k}={v}" for k, v in group_values_of(key).items())


def site_group_key(keys: Sequence[str], plate_name: str, site: SiteRow) -> str:
    """The group of a complete site."""
    values = group_values(keys, plate_name, site, True)
    assert values is not None
    return group_key(values)


def _combine(gates: Iterable[tuple[Gate, str]]) -> tuple[Gate, str]:
    """BROKEN (with its reason) if any is, else HELD if any is, else OPEN."""
    held = False
    for gate, why in gates:
        if gate == Gate.BROKEN:
            return gate, why
        held = held or gate == Gate.HELD
    return (Gate.HELD, "") if held else (Gate.OPEN, "")


async def _gate_groups(
    session: AsyncSession,
    plate: PlateRow,
    runs: Sequence[Any],
    jobs_of: dict[int, list[SiteJobRow]],
    now: datetime,
) -> None:
    """`gate_stages` on a plate with a stage that runs per group: every site
    carries the gate the stages before a run give it (the stage jobs whose
    group holds it), and each job, a site's or a group stage's, moves by its
    own gate (see the module's doc)."""
    sites = list(await session.scalars(select(SiteRow).where(SiteRow.plate_id == plate.id)))
    counts: dict[int, int] = dict(
        (
            await session.execute(
                select(ImageRow.site_id, func.count(ImageRow.id))
                .join(SiteRow, SiteRow.id == ImageRow.site_id)
                .where(SiteRow.plate_id == plate.id)
                .group_by(ImageRow.site_id)
            )
        )
        .tuples()
        .all()
    )
    complete = {s.id for s in sites if counts.get(s.id, 0) >= len(plate.channels)}
    # After a finished acquisition the incomplete sites have failed: no group holds them.
    present = [s for s in sites if not plate.acquisition_finished or s.id in complete]
    gate_of: dict[int, tuple[Gate, str]] = {s.id: (Gate.OPEN, "") for s in present}
    for run, scope, name, group_by in runs:
        if scope != Scope.PLATE:
            run.gate = int(await _gate_site_jobs(session, plate, run, gate_of, complete, now))
            continue
        jobs = jobs_of[run.id]
        groups: list[tuple[SiteJobRow, list[int]]] = []
        unknown: list[int] = []
        if is_grouped(group_by, jobs):
            members: dict[str, list[int]] = defaultdict(list)
            for s in present:
                values = group_values(group_by, plate.name, s, s.id in complete)
                if values is None:
                    unknown.append(s.id)
                else:
                    members[group_key(values)].append(s.id)
            by_key = {j.group_key: j for j in jobs}
            for key in members:
                if key not in by_key:
                    job = SiteJobRow(**stage_job_row(run.id), group_key=key)
                    session.add(job)
                    by_key[key] = job
                    log.info("plate %s: stage %s has a job for group %s", plate.name, name, group_label(key))
            await session.flush()
            groups = [(job, members.get(str(key), [])) for key, job in by_key.items()]
        else:
            if not jobs:
                jobs.append(SiteJobRow(**stage_job_row(run.id)))
                session.add(jobs[0])
                await session.flush()
            groups = [(jobs[0], [s.id for s in present])]
        summary = []
        for job, covered in groups:
            gate, why = _combine(gate_of[site_id] for site_id in covered)
            old = Gate(job.gate if job.gate is not None else run.gate)
            await _move_stage_job(session, run, job, old, gate, why, now)
            job.gate = int(gate)
            summary.append((gate, why))
            all_in = (
                plate.sites_known
                and any(site_id in complete for site_id in covered)
                and (plate.acquisition_finished or (not unknown and all(i in complete for i in covered)))
            )
            if (
                plate.acquisition_finished
                and not covered
                and job.state in (int(SiteState.WAITING), int(SiteState.READY))
            ):
                # Its sites failed incomplete when the acquisition finished.
                job.state = int(SiteState.FAILED)
                job.failure_class = int(FailureClass.INPUT_PROBLEM)
                job.failure_reason = (
                    f"no site of {group_label(job.group_key)} has every channel "
                    "(the acquisition finished without them)"
                )
                job.finished_at = now
                job.ready_at = None
                run.generation = (run.generation or 0) + 1
            if gate == Gate.OPEN and job.state == int(SiteState.WAITING) and all_in:
                job.state = int(SiteState.READY)
                job.ready_at = now
                log.info(
                    "plate %s: stage %s is ready for %s (every site of it is in)",
                    plate.name,
                    name,
                    group_label(job.group_key) or "the plate",
                )
            after: tuple[Gate, str]
            if gate != Gate.OPEN:
                after = (gate, why)
            elif job.state == int(SiteState.FAILED):
                of = f" for {group_label(job.group_key)}" if job.group_key else ""
                after = (
                    Gate.BROKEN,
                    f"the plate stage {name!r} failed{of}: {job.failure_reason or 'no reason'}; "
                    "requeue that stage to run this again",
                )
            elif job.state != int(SiteState.DONE):
                after = (Gate.HELD, "")
            else:
                after = (Gate.OPEN, "")
            for site_id in covered:
                gate_of[site_id] = after
        for site_id in unknown:
            # In no group yet: nothing of it runs until its group's stage has.
            if gate_of[site_id][0] == Gate.OPEN:
                gate_of[site_id] = (Gate.HELD, "")
        run.gate = int(_combine(summary)[0])


async def _move_stage_job(
    session: AsyncSession, run: RunRow, job: SiteJobRow, old: Gate, gate: Gate, why: str, now: datetime
) -> None:
    """A group stage's job under its new gate, as `_apply_gate` moves a run's jobs."""
    if gate == Gate.HELD:
        if old != Gate.HELD and job.state != int(SiteState.WAITING):
            await reset_jobs(session, now, SiteJobRow.id == job.id, state=SiteState.WAITING)
        elif job.state == int(SiteState.READY):
            job.state = int(SiteState.WAITING)
            job.ready_at = None
    elif gate == Gate.BROKEN:
        if job.state in (int(SiteState.WAITING), int(SiteState.READY)):
            job.state = int(SiteState.FAILED)
            job.failure_class = int(FailureClass.INPUT_PROBLEM)
            job.failure_reason = why
            job.finished_at = now
            job.ready_at = None
            run.generation = (run.generation or 0) + 1
    elif old == Gate.BROKEN and job.state != int(SiteState.DONE):
        await reset_jobs(session, now, SiteJobRow.id == job.id, state=SiteState.WAITING)


async def _gate_site_jobs(
    session: AsyncSession,
    plate: PlateRow,
    run: RunRow,
    gate_of: dict[int, tuple[Gate, str]],
    complete: set[int],
    now: datetime,
) -> Gate:
    """Moves each job of a site-scope run by its site's gate; returns the
    run's overall gate (BROKEN, else HELD, if any job's is)."""
    rows = (
        await session.execute(
            select(SiteJobRow.id, SiteJobRow.site_id, SiteJobRow.gate).where(SiteJobRow.run_id == run.id)
        )
    ).all()
    moves: dict[tuple[Gate, Gate, str], list[tuple[int, int]]] = defaultdict(list)
    seen = []
    for job_id, site_id, job_gate in rows:
        if site_id not in gate_of:
            continue  # failed when the acquisition finished incomplete
        gate, why = gate_of[site_id]
        seen.append((gate, why))
        old = Gate(job_gate if job_gate is not None else run.gate)
        if old == gate == Gate.OPEN and job_gate is not None:
            continue
        moves[(old, gate, why)].append((job_id, site_id))
    for (old, gate, why), jobs in moves.items():
        for start in range(0, len(jobs), 1000):
            part = jobs[start : start + 1000]
            ids = [j for j, _s in part]
            if gate == Gate.HELD:
                if old != Gate.HELD:
                    await reset_jobs(
                        session,
                        now,
                        SiteJobRow.id.in_(ids),
                        SiteJobRow.state != int(SiteState.WAITING),
                        state=SiteState.WAITING,
                    )
                else:
                    await session.execute(
                        update(SiteJobRow)
                        .where(SiteJobRow.id.in_(ids), SiteJobRow.state == int(SiteState.READY))
                        .values(state=int(SiteState.WAITING), ready_at=None)
                        .execution_options(synchronize_session=False)
                    )
            elif gate == Gate.BROKEN:
                result = await session.execute(
                    update(SiteJobRow)
                    .where(
                        SiteJobRow.id.in_(ids),
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
                run.generation = (run.generation or 0) + int(getattr(result, "rowcount", 0) or 0)
            else:
                if old == Gate.BROKEN:
                    await reset_jobs(
                        session,
                        now,
                        SiteJobRow.id.in_(ids),
                        SiteJobRow.state != int(SiteState.DONE),
                        state=SiteState.WAITING,
                    )
                if old != Gate.OPEN:
                    ready = [j for j, s in part if s in complete]
                    if ready:
                        await session.execute(
                            update(SiteJobRow)
                            .where(SiteJobRow.id.in_(ready), SiteJobRow.state == int(SiteState.WAITING))
                            .values(state=int(SiteState.READY), ready_at=now)
                            .execution_options(synchronize_session=False)
                        )
            await session.execute(
                update(SiteJobRow)
                .where(SiteJobRow.id.in_(ids))
                .values(gate=int(gate))
                .execution_options(synchronize_session=False)
            )
    return _combine(seen)[0]


async def stage_files(
    session: AsyncSession, plate_id: int, position: int
) -> list[tuple[list[str], str | None, list[dict[str, Any]]]]:
    """(grouping keys, group key, result files) of every done plate-stage
    job before `position`, in workflow order."""
    rows = await session.execute(
        select(PipelineRow.group_by, SiteJobRow.group_key, SiteJobRow.results)
        .join(RunRow, RunRow.id == SiteJobRow.run_id)
        .join(PipelineRow, PipelineRow.id == RunRow.pipeline_id)
        .where(
            RunRow.plate_id == plate_id,
            RunRow.position < position,
            PipelineRow.scope == int(Scope.PLATE),
            SiteJobRow.site_id.is_(None),
            SiteJobRow.state == int(SiteState.DONE),
        )
        .order_by(RunRow.position, SiteJobRow.id)
    )
    return [(list(g or []), k, list(r or [])) for g, k, r in rows]


def artifacts_for(
    files: Sequence[tuple[list[str], str | None, list[dict[str, Any]]]],
    plate_name: str,
    sites: Sequence[SiteRow],
) -> list[ResultFile]:
    """The artifacts a run over `sites` gets from `stage_files`: those of
    every whole-plate stage job and of every group job whose group holds one
    of the sites, by name (a later file of the same name wins)."""
    found: dict[str, ResultFile] = {}
    keys: dict[tuple[str, ...], set[str]] = {}
    for group_by, key, results in files:
        if key is not None:
            if tuple(group_by) not in keys:
                keys[tuple(group_by)] = {site_group_key(group_by, plate_name, s) for s in sites}
            if key not in keys[tuple(group_by)]:
                continue
        for r in results:
            found[str(r["name"])] = ResultFile(**r)
    return list(found.values())


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
    found = (
        await session.execute(
            select(RunRow, PipelineRow.scope, PipelineRow.name, PipelineRow.group_by)
            .join(PipelineRow, PipelineRow.id == RunRow.pipeline_id)
            .where(RunRow.plate_id == plate.id)
            .order_by(RunRow.position)
            .with_for_update(of=RunRow)
        )
    ).all()
    jobs_of: dict[int, list[SiteJobRow]] = defaultdict(list)
    for job in await session.scalars(
        select(SiteJobRow)
        .where(SiteJobRow.run_id.in_([r.id for r, *_ in found]), SiteJobRow.site_id.is_(None))
        .order_by(SiteJobRow.id)
        .with_for_update()
    ):
        jobs_of[job.run_id].append(job)
    if any(
        scope == Scope.PLATE and is_grouped(group_by, jobs_of[run.id]) for run, scope, _n, group_by in found
    ):
        await _gate_groups(session, plate, found, jobs_of, now)
        return
    runs = [(run, scope, name) for run, scope, name, _g in found]
    stage_jobs = {run_id: jobs[0] for run_id, jobs in jobs_of.items() if jobs}
    gate = Gate.OPEN
    why = ""
    for run, scope, name in runs:
        await _apply_gate(session, plate, run, Scope(scope), gate, why, now)
        if scope != Scope.PLATE:
            continue
        existing = stage_jobs.get(run.id)
        if existing is not None:
            job = existing
        else:  # a stage run always has its job; made here if an older catalog had none
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


async def rerun_stages_of(
    session: AsyncSession, plate: PlateRow, site_ids: Sequence[int], now: datetime
) -> int:
    """Every plate-stage job that ran over one of `site_ids` (a whole-plate
    job, or a group job whose group holds one) goes back to waiting; the
    runs after it follow at the next `gate_stages`. Returns how many moved."""
    found = (
        await session.execute(
            select(SiteJobRow.id, SiteJobRow.group_key, PipelineRow.group_by)
            .join(RunRow, RunRow.id == SiteJobRow.run_id)
            .join(PipelineRow, PipelineRow.id == RunRow.pipeline_id)
            .where(
                RunRow.plate_id == plate.id,
                SiteJobRow.site_id.is_(None),
                SiteJobRow.state != int(SiteState.WAITING),
            )
        )
    ).all()
    if not found:
        return 0
    sites = list(await session.scalars(select(SiteRow).where(SiteRow.id.in_(list(site_ids)))))
    ids = [
        job_id
        for job_id, key, group_by in found
        if key is None or key in {site_group_key(group_by or [], plate.name, s) for s in sites}
    ]
    if not ids:
        return 0
    return await reset_jobs(session, now, SiteJobRow.id.in_(ids), state=SiteState.WAITING)


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
