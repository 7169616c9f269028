"""Nothing stuck, nothing twice: every in-flight state has a deadline, retries
are the catalog's, and a replayed FailSiteJob gets the first call's answer.
Over a real gRPC server on SQLite and MariaDB."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import cast

import grpc
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from tests.catalog.conftest import Catalog
from tests.catalog.kit import claim_all, new_plate, ready_sites, refused, result_file

FC = types_pb2
RUN = catalog_pb2.START_DECISION_RUN
SKIP_STALE = catalog_pb2.START_DECISION_SKIP_STALE


def policy(catalog: Catalog, **changes: float) -> None:
    catalog.store.policy = dataclasses.replace(catalog.store.policy, **changes)  # type: ignore[arg-type]


async def one_site(catalog: Catalog) -> catalog_pb2.SiteClaim:
    await new_plate(catalog.stub, "P1")
    await ready_sites(catalog.stub, "P1", 1)
    (claim,) = await claim_all(catalog.stub)
    return claim


async def queued(catalog: Catalog, claim: catalog_pb2.SiteClaim) -> None:
    reply = await catalog.stub.MarkSitesQueued(
        catalog_pb2.MarkSitesQueuedRequest(
            scheduler_id="s1",
            sites=[catalog_pb2.QueuedSite(site_job_id=claim.site_job_id, attempt=claim.attempt)],
        )
    )
    assert reply.marked == 1


async def start(
    catalog: Catalog, claim: catalog_pb2.SiteClaim, attempt: int, execution: str = "", lease: int = 0
) -> catalog_pb2.StartSiteJobResponse:
    return await catalog.stub.StartSiteJob(
        catalog_pb2.StartSiteJobRequest(
            site_job_id=claim.site_job_id,
            attempt=attempt,
            worker_id="w1",
            execution_id=execution,
            lease_seconds=lease,
        )
    )


async def fail(
    catalog: Catalog, claim: catalog_pb2.SiteClaim, attempt: int, cls: int, execution: str = ""
) -> catalog_pb2.FailSiteJobResponse:
    return await catalog.stub.FailSiteJob(
        catalog_pb2.FailSiteJobRequest(
            site_job_id=claim.site_job_id,
            attempt=attempt,
            worker_id="w1",
            execution_id=execution,
            failure_class=cast("types_pb2.FailureClass.ValueType", cls),
            reason="boom",
        )
    )


async def site(catalog: Catalog) -> catalog_pb2.SiteJob:
    (s,) = (await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1"))).sites
    return s


async def claim_within(catalog: Catalog, seconds: float) -> list[catalog_pb2.SiteClaim]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        claims = await claim_all(catalog.stub)
        if claims:
            return claims
        await asyncio.sleep(0.05)
    return []


async def test_a_task_the_broker_lost_is_issued_again_free_of_charge(catalog: Catalog) -> None:
    # A site queued on the broker whose task never reaches a worker (lost by
    # the broker, or by a retry publish that failed) was QUEUED forever.
    policy(catalog, queue_deadline_s=0.5, max_attempts=2)
    lost = await one_site(catalog)
    await queued(catalog, lost)
    assert await claim_all(catalog.stub) == []  # not before its deadline
    (again,) = await claim_within(catalog, 3.0)
    assert (again.site_job_id, again.attempt) == (lost.site_job_id, 2)
    # The lost task, should it turn up after all, is fenced off.
    assert (await start(catalog, lost, 1)).decision == SKIP_STALE
    assert (await start(catalog, again, 2)).decision == RUN
    # The lost attempt never ran, so it is not charged: with MAX_ATTEMPTS 2 a
    # CellProfiler failure at attempt 2 is still retried.
    reply = await fail(catalog, again, 2, FC.FAILURE_CLASS_CP_PROBLEM)
    assert (reply.will_retry, reply.state) == (True, types_pb2.SITE_STATE_READY)


async def test_a_started_site_whose_worker_never_renews_is_issued_again(catalog: Catalog) -> None:
    # RUNNING without a lease had no deadline: a worker that died before its
    # first renewal left the site to the broker's redelivery alone.
    policy(catalog, start_lease_s=0.5)
    claim = await one_site(catalog)
    await queued(catalog, claim)
    assert (await start(catalog, claim, 1)).decision == RUN
    assert (await site(catalog)).state == types_pb2.SITE_STATE_RUNNING
    (again,) = await claim_within(catalog, 3.0)
    assert again.attempt == 2
    # The abandoned attempt may not record anything any more.
    with refused(grpc.StatusCode.FAILED_PRECONDITION, "attempt 1 is stale, site is at attempt 2"):
        await catalog.stub.CompleteSiteJob(
            catalog_pb2.CompleteSiteJobRequest(
                site_job_id=claim.site_job_id, attempt=1, results=[result_file(claim, "Image.csv")]
            )
        )
    # A worker's own lease is the deadline when it gives one.
    assert (await start(catalog, again, 2, lease=60)).decision == RUN
    assert await claim_within(catalog, 1.0) == []


async def test_a_retry_waits_for_its_backoff(catalog: Catalog) -> None:
    policy(catalog, retry_base_s=1.5, retry_max_s=1.5)
    claim = await one_site(catalog)
    await start(catalog, claim, 1)
    loop = asyncio.get_running_loop()
    began = loop.time()  # before the failure: its not-before time is at least 0.15 s later
    reply = await fail(catalog, claim, 1, FC.FAILURE_CLASS_CP_PROBLEM)
    assert (reply.will_retry, reply.next_attempt, reply.state) == (True, 2, types_pb2.SITE_STATE_READY)
    waiting = await site(catalog)
    (retry,) = await claim_within(catalog, 5.0)
    waited = loop.time() - began
    assert retry.attempt == 2
    # Full jitter within [0.1, 1] of the step: never at once, never past the step.
    assert 0.15 <= waited < 2.5, waited
    assert waiting.state == types_pb2.SITE_STATE_READY and waiting.attempt == 1


async def test_a_replayed_fail_gets_the_first_answer(catalog: Catalog) -> None:
    # The reply of the first call is lost; the worker calls again. The answer
    # must be the first one, even once the retry has been issued.
    claim = await one_site(catalog)
    assert (await start(catalog, claim, 1, execution="e1")).decision == RUN
    first = await fail(catalog, claim, 1, FC.FAILURE_CLASS_CP_PROBLEM, execution="e1")
    assert (first.will_retry, first.next_attempt) == (True, 2)
    assert await fail(catalog, claim, 1, FC.FAILURE_CLASS_CP_PROBLEM, execution="e1") == first
    (retry,) = await claim_within(catalog, 3.0)
    assert await fail(catalog, claim, 1, FC.FAILURE_CLASS_CP_PROBLEM, execution="e1") == first
    assert (await start(catalog, retry, 2, execution="e2")).decision == RUN
    assert await fail(catalog, claim, 1, FC.FAILURE_CLASS_CP_PROBLEM, execution="e1") == first
    # A different call is not a replay: the attempt is stale.
    with refused(grpc.StatusCode.FAILED_PRECONDITION, "attempt 1 is stale"):
        await fail(catalog, claim, 1, FC.FAILURE_CLASS_TIMEOUT, execution="e1")
    # A final answer replays too.
    policy(catalog, max_attempts=2)
    last = await fail(catalog, retry, 2, FC.FAILURE_CLASS_CP_PROBLEM, execution="e2")
    assert (last.will_retry, last.state) == (False, types_pb2.SITE_STATE_FAILED)
    assert await fail(catalog, retry, 2, FC.FAILURE_CLASS_CP_PROBLEM, execution="e2") == last


async def test_transient_failures_have_a_budget(catalog: Catalog) -> None:
    policy(catalog, transient_budget_s=0.6)
    claim = await one_site(catalog)
    attempt = 1
    await start(catalog, claim, attempt)
    reply = await fail(catalog, claim, attempt, FC.FAILURE_CLASS_TRANSIENT)
    assert reply.will_retry and (await site(catalog)).failure_class == FC.FAILURE_CLASS_TRANSIENT
    await asyncio.sleep(0.7)
    (retry,) = await claim_within(catalog, 3.0)
    attempt = retry.attempt
    await start(catalog, retry, attempt)
    reply = await fail(catalog, retry, attempt, FC.FAILURE_CLASS_TRANSIENT)
    # Past the budget the failure takes a real class, charged as an attempt.
    now = await site(catalog)
    assert now.failure_class == FC.FAILURE_CLASS_TIMEOUT, now
    assert "SITE_TRANSIENT_BUDGET_S" in now.failure_reason and "boom" in now.failure_reason
    assert reply.will_retry  # one charged attempt of three


async def test_an_operator_can_free_a_running_site(catalog: Catalog) -> None:
    claim = await one_site(catalog)
    await start(catalog, claim, 1, execution="e1")
    reply = await catalog.stub.RequeueSites(catalog_pb2.RequeueSitesRequest(plate="P1", sites=[claim.site]))
    assert reply.requeued == 1
    renewed = await catalog.stub.RenewSiteLease(
        catalog_pb2.RenewSiteLeaseRequest(
            site_job_id=claim.site_job_id, attempt=1, worker_id="w1", lease_seconds=30, execution_id="e1"
        )
    )
    assert not renewed.held  # its worker stops the run
    (again,) = await claim_all(catalog.stub)
    assert again.attempt == 2


async def test_a_site_that_takes_every_worker_down_fails_for_good(catalog: Catalog) -> None:
    # Workers killed mid-run (out of memory, say) never call FailSiteJob; the
    # lease deadline charges each such attempt, and the last one fails the site.
    policy(catalog, start_lease_s=0.4, max_attempts=2)
    claim = await one_site(catalog)
    await start(catalog, claim, 1)
    (second,) = await claim_within(catalog, 3.0)
    assert second.attempt == 2
    await start(catalog, second, 2)
    await asyncio.sleep(0.5)
    assert await claim_all(catalog.stub) == []
    failed = await site(catalog)
    assert failed.state == types_pb2.SITE_STATE_FAILED
    assert failed.failure_class == FC.FAILURE_CLASS_TIMEOUT
    assert "stopped renewing the lease" in failed.failure_reason


async def test_a_reduce_that_never_reports_fails_instead_of_wedging_the_plate(catalog: Catalog) -> None:
    # A reduce whose task is dead-lettered (reducers killed on it, out of
    # memory) was only logged: the run kept its queued generation and the
    # plate was never claimed again, nor ever complete.
    from tests.catalog.kit import run_to_done
    from tests.catalog.test_catalog_progress import claim_runs, progress, register_report

    policy(catalog, reduce_deadline_s=0.4, max_attempts=2)
    claim = await one_site(catalog)
    await run_to_done(catalog.stub, claim)
    await catalog.stub.FinishAcquisition(catalog_pb2.FinishAcquisitionRequest(plate="P1"))
    for _attempt in (1, 2):
        (run,) = await claim_runs(catalog)
        marked = await catalog.stub.MarkRunsQueued(
            catalog_pb2.MarkRunsQueuedRequest(scheduler_id="s1", runs=[run])
        )
        assert marked.marked == 1
        assert await claim_runs(catalog) == []  # in flight, within its deadline
        await asyncio.sleep(0.5)  # ... and no report came
    assert await claim_runs(catalog) == []  # issued twice: it fails now
    failed = await progress(catalog)
    assert failed.reduce_failed and not failed.complete
    assert "issued 2 times and never registered a report" in failed.reduce_failure_reason
    assert "cellmesh requeue P1 --reduce" in failed.reduce_failure_reason
    # The progress stream ends on it, so `cellmesh follow` does too.
    stream = catalog.stub.WatchPlateProgress(catalog_pb2.WatchPlateProgressRequest(plate="P1"))
    updates = [u.progress async for u in stream]
    assert updates[-1].reduce_failed
    # An operator issues it again, alone; this time a report comes.
    reply = await catalog.stub.RequeueSites(catalog_pb2.RequeueSitesRequest(plate="P1", reduce=True))
    assert reply.requeued == 0
    assert not (await progress(catalog)).reduce_failed
    (run,) = await claim_runs(catalog)
    assert (await register_report(catalog, run)).recorded
    assert (await progress(catalog)).complete
