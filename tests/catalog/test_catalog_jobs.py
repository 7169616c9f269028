"""What workers report: StartSiteJob, CompleteSiteJob, FailSiteJob, and
ListSites/RequeueSites around them."""

from __future__ import annotations

import asyncio
from typing import cast

import grpc
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from tests.catalog.conftest import Catalog
from tests.catalog.kit import claim_all, new_plate, ready_sites, refused, result_file, run_to_done

PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
RUN = catalog_pb2.START_DECISION_RUN
SKIP_DONE = catalog_pb2.START_DECISION_SKIP_DONE
SKIP_STALE = catalog_pb2.START_DECISION_SKIP_STALE
FC = types_pb2


async def start(
    catalog: Catalog, job: int, attempt: int, worker: str = "w1"
) -> catalog_pb2.StartSiteJobResponse:
    return await catalog.stub.StartSiteJob(
        catalog_pb2.StartSiteJobRequest(site_job_id=job, attempt=attempt, worker_id=worker)
    )


async def fail(
    catalog: Catalog, job: int, attempt: int, cls: int, reason: str = "boom", final: bool = False
) -> catalog_pb2.FailSiteJobResponse:
    return await catalog.stub.FailSiteJob(
        catalog_pb2.FailSiteJobRequest(
            site_job_id=job,
            attempt=attempt,
            worker_id="w1",
            failure_class=cast("types_pb2.FailureClass.ValueType", cls),
            reason=reason,
            final=final,
        )
    )


async def one_site(catalog: Catalog) -> catalog_pb2.SiteClaim:
    await new_plate(catalog.stub, "P1")
    await ready_sites(catalog.stub, "P1", 1)
    (claim,) = await claim_all(catalog.stub)
    return claim


async def site(catalog: Catalog, with_results: bool = False) -> catalog_pb2.SiteJob:
    (s,) = (
        await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1", with_results=with_results))
    ).sites
    return s


async def test_start_complete_and_duplicates(catalog: Catalog) -> None:
    claim = await one_site(catalog)
    job, attempt = claim.site_job_id, claim.attempt
    assert (await start(catalog, job, attempt)).decision == RUN
    running = await site(catalog)
    assert (
        running.state == types_pb2.SITE_STATE_RUNNING
        and running.worker_id == "w1"
        and running.HasField("started_at")
    )
    # A redelivery after a worker crash runs again.
    assert (await start(catalog, job, attempt, "w2")).decision == RUN
    request = catalog_pb2.CompleteSiteJobRequest(
        site_job_id=job,
        attempt=attempt,
        worker_id="w2",
        results=[result_file(claim, "Image.csv"), result_file(claim, "Nuclei.csv")],
        provenance=catalog_pb2.Provenance(
            cellprofiler_version="4.2.8.1",
            pipeline_sha256=claim.pipeline.sha256,
            object_counts={"Nuclei": 289},
            mode="warm",
        ),
    )
    assert (await catalog.stub.CompleteSiteJob(request)).recorded
    assert not (await catalog.stub.CompleteSiteJob(request)).recorded
    done = await site(catalog, with_results=True)
    assert done.state == types_pb2.SITE_STATE_DONE and done.HasField("finished_at")
    assert [r.name for r in done.results] == ["Image.csv", "Nuclei.csv"]
    assert done.results[0].object == request.results[0].object
    assert done.provenance.object_counts["Nuclei"] == 289 and done.provenance.mode == "warm"
    assert not (await site(catalog)).results  # only with_results
    reply = await start(catalog, job, attempt)
    assert reply.decision == SKIP_DONE and "done already" in reply.detail
    # Failing a done site changes nothing.
    failed = await fail(catalog, job, attempt, FC.FAILURE_CLASS_CP_PROBLEM)
    assert not failed.will_retry and failed.state == types_pb2.SITE_STATE_DONE
    with refused(grpc.StatusCode.NOT_FOUND, "site job 999999 does not exist"):
        await start(catalog, 999_999, 1)


async def test_stale_attempts_are_skipped_and_refused(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    await ready_sites(catalog.stub, "P1", 1)
    (old,) = await claim_all(catalog.stub, lease=1)
    await asyncio.sleep(1.2)
    (new,) = await claim_all(catalog.stub)
    assert (new.site_job_id, new.attempt) == (old.site_job_id, 2)
    reply = await start(catalog, old.site_job_id, 1)
    assert reply.decision == SKIP_STALE and "attempt 1 is stale, site is at attempt 2" in reply.detail
    with refused(PRECONDITION, "attempt 1 is stale, site is at attempt 2"):
        await catalog.stub.CompleteSiteJob(
            catalog_pb2.CompleteSiteJobRequest(
                site_job_id=old.site_job_id, attempt=1, results=[result_file(old, "Image.csv")]
            )
        )
    with refused(PRECONDITION, "attempt 1 is stale, site is at attempt 2"):
        await fail(catalog, old.site_job_id, 1, FC.FAILURE_CLASS_CP_PROBLEM)
    with refused(PRECONDITION, "attempt 3 of site job", "never issued"):
        await start(catalog, old.site_job_id, 3)
    await run_to_done(catalog.stub, new)
    assert (await site(catalog)).state == types_pb2.SITE_STATE_DONE


async def test_bad_results_are_refused(catalog: Catalog) -> None:
    claim = await one_site(catalog)
    await start(catalog, claim.site_job_id, claim.attempt)
    bad = result_file(claim, "Image.csv")
    bad.object.sha256 = ""
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "result 'Image.csv' sha256 checksum is required"):
        await catalog.stub.CompleteSiteJob(
            catalog_pb2.CompleteSiteJobRequest(
                site_job_id=claim.site_job_id, attempt=claim.attempt, results=[bad]
            )
        )
    assert (await site(catalog)).state == types_pb2.SITE_STATE_RUNNING


async def claim_due(catalog: Catalog, timeout: float = 3.0) -> catalog_pb2.SiteClaim:
    """The one site whose retry comes due (the test policy's delays are tiny)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        claims = await claim_all(catalog.stub)
        if claims:
            (claim,) = claims
            return claim
        assert asyncio.get_running_loop().time() < deadline, "no retry came due"
        await asyncio.sleep(0.02)


async def test_failures_retry_up_to_max_attempts(catalog: Catalog) -> None:
    claim = await one_site(catalog)
    job = claim.site_job_id
    await start(catalog, job, 1)
    transient = await fail(catalog, job, 1, FC.FAILURE_CLASS_TRANSIENT, "object store unreachable")
    # The catalog retries it: READY again, issued with the next attempt, free of charge.
    assert (transient.will_retry, transient.next_attempt, transient.state) == (
        True,
        2,
        types_pb2.SITE_STATE_READY,
    )
    assert (await claim_due(catalog)).attempt == 2
    assert (await start(catalog, job, 1)).decision == SKIP_STALE
    assert (await start(catalog, job, 2)).decision == RUN
    retry = await fail(catalog, job, 2, FC.FAILURE_CLASS_CP_PROBLEM, "module IdentifyPrimaryObjects failed")
    assert (retry.will_retry, retry.next_attempt, retry.state) == (True, 3, types_pb2.SITE_STATE_READY)
    waiting = await site(catalog)
    assert waiting.attempt == 2 and waiting.failure_class == FC.FAILURE_CLASS_CP_PROBLEM
    assert waiting.failure_reason == "module IdentifyPrimaryObjects failed"
    assert (await claim_due(catalog)).attempt == 3
    assert (await start(catalog, job, 3)).decision == RUN
    retry = await fail(catalog, job, 3, FC.FAILURE_CLASS_TIMEOUT, "ran 600 s")
    assert (retry.will_retry, retry.next_attempt) == (True, 4)
    assert (await claim_due(catalog)).attempt == 4
    assert (await start(catalog, job, 4)).decision == RUN
    # The third charged failure (the transient one was free) is the last.
    last = await fail(
        catalog, job, 4, FC.FAILURE_CLASS_OUTPUT_PROBLEM, "expected table Nuclei.csv is missing"
    )
    assert (last.will_retry, last.next_attempt, last.state) == (False, 4, types_pb2.SITE_STATE_FAILED)
    failed = await site(catalog)
    assert (
        failed.state == types_pb2.SITE_STATE_FAILED
        and failed.failure_class == FC.FAILURE_CLASS_OUTPUT_PROBLEM
    )
    assert failed.failure_reason == "expected table Nuclei.csv is missing" and failed.HasField("finished_at")
    reply = await start(catalog, job, 4)
    assert reply.decision == SKIP_STALE and "failed for good" in reply.detail


async def test_some_failures_are_final_at_once(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    await ready_sites(catalog.stub, "P1", 3)
    claims = await claim_all(catalog.stub)
    for claim in claims:
        await start(catalog, claim.site_job_id, 1)
    input_problem = await fail(
        catalog, claims[0].site_job_id, 1, FC.FAILURE_CLASS_INPUT_PROBLEM, "checksum mismatch"
    )
    bad_task = await fail(catalog, claims[1].site_job_id, 1, FC.FAILURE_CLASS_BAD_TASK, "unreadable task")
    final = await fail(
        catalog, claims[2].site_job_id, 1, FC.FAILURE_CLASS_CP_PROBLEM, "dead-lettered", final=True
    )
    for reply in (input_problem, bad_task, final):
        assert (reply.will_retry, reply.state) == (False, types_pb2.SITE_STATE_FAILED)
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "failure_class is required"):
        await fail(catalog, claims[0].site_job_id, 1, FC.FAILURE_CLASS_UNSPECIFIED)


async def test_requeue(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    await ready_sites(catalog.stub, "P1", 3)
    a, b, c = await claim_all(catalog.stub)
    for claim in (a, b, c):
        await start(catalog, claim.site_job_id, 1)
    await fail(catalog, a.site_job_id, 1, FC.FAILURE_CLASS_INPUT_PROBLEM, "unreadable")
    await run_to_done(catalog.stub, b)
    with refused(grpc.StatusCode.NOT_FOUND, "plate 'P1' has no H01 site 0"):
        await catalog.stub.RequeueSites(
            catalog_pb2.RequeueSitesRequest(
                plate="P1", sites=[types_pb2.SiteRef(plate="P1", well="H01", site=0)]
            )
        )
    # Default: every FAILED site.
    assert (await catalog.stub.RequeueSites(catalog_pb2.RequeueSitesRequest(plate="P1"))).requeued == 1
    sites = {s.id: s for s in (await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1"))).sites}
    again = sites[a.site_job_id]
    assert again.state == types_pb2.SITE_STATE_READY and again.attempt == 1 and again.failure_reason == ""
    # The old task of a requeued site is stale; the new claim has a new attempt.
    assert (await start(catalog, a.site_job_id, 1)).decision == SKIP_STALE
    # A done site can be run again on request.
    assert (
        await catalog.stub.RequeueSites(catalog_pb2.RequeueSitesRequest(plate="P1", sites=[b.site]))
    ).requeued == 1
    claims = {cl.site_job_id: cl.attempt for cl in await claim_all(catalog.stub)}
    assert claims == {a.site_job_id: 2, b.site_job_id: 2}
    ready = (
        await catalog.stub.ListSites(
            catalog_pb2.ListSitesRequest(plate="P1", states=[types_pb2.SITE_STATE_RUNNING])
        )
    ).sites
    assert [s.id for s in ready] == [c.site_job_id]


async def renew(
    catalog: Catalog, job: int, attempt: int, seconds: int = 5
) -> catalog_pb2.RenewSiteLeaseResponse:
    return await catalog.stub.RenewSiteLease(
        catalog_pb2.RenewSiteLeaseRequest(
            site_job_id=job, attempt=attempt, worker_id="w1", lease_seconds=seconds
        )
    )


async def test_a_lapsed_lease_of_a_running_site_lets_it_be_claimed_again(catalog: Catalog) -> None:
    claim = await one_site(catalog)
    assert (await start(catalog, claim.site_job_id, claim.attempt)).decision == RUN
    # A running site without a lease belongs to the broker: never reclaimed.
    assert await claim_all(catalog.stub) == []
    assert (await renew(catalog, claim.site_job_id, claim.attempt, seconds=5)).held
    assert await claim_all(catalog.stub) == [], "a live lease must not be claimed"
    await asyncio.sleep(5.5)
    (again,) = await claim_all(catalog.stub)
    assert again.site_job_id == claim.site_job_id and again.attempt == claim.attempt + 1
    # The old attempt has lost its lease and cannot record a result.
    assert not (await renew(catalog, claim.site_job_id, claim.attempt)).held
    with refused(PRECONDITION, "stale"):
        await catalog.stub.CompleteSiteJob(
            catalog_pb2.CompleteSiteJobRequest(
                site_job_id=claim.site_job_id,
                attempt=claim.attempt,
                worker_id="w1",
                results=[result_file(claim, "Image.csv")],
            )
        )


async def test_lease_of_a_finished_site_is_not_held_and_bad_lengths_are_refused(catalog: Catalog) -> None:
    claim = await one_site(catalog)
    await run_to_done(catalog.stub, claim)
    assert not (await renew(catalog, claim.site_job_id, claim.attempt)).held
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "lease_seconds"):
        await renew(catalog, claim.site_job_id, claim.attempt, seconds=1)
    with refused(grpc.StatusCode.NOT_FOUND, "does not exist"):
        await renew(catalog, 999_999, 1)


async def test_a_redelivered_attempt_runs_as_a_new_execution_and_only_it_is_recorded(
    catalog: Catalog,
) -> None:
    """A worker cut off by the network keeps running its site while the broker
    redelivers the task to another worker at the same attempt: the second
    execution takes the attempt over, and the first can no longer renew,
    complete or fail it."""
    claim = await one_site(catalog)
    job, attempt = claim.site_job_id, claim.attempt

    async def start_as(execution: str, worker: str) -> catalog_pb2.StartSiteJobResponse:
        return await catalog.stub.StartSiteJob(
            catalog_pb2.StartSiteJobRequest(
                site_job_id=job, attempt=attempt, worker_id=worker, execution_id=execution
            )
        )

    first = await start_as("aaaa1111", "wA")
    assert first.decision == RUN and first.execution_id == "aaaa1111"
    replay = await start_as("aaaa1111", "wA")
    assert replay.decision == RUN and replay.execution_id == "aaaa1111"
    second = await start_as("bbbb2222", "wB")
    assert second.decision == RUN and second.execution_id == "bbbb2222"
    assert "taking it over from execution aaaa1111 on wA" in second.detail
    assert (await site(catalog)).execution_id == "bbbb2222"

    async def renew(execution: str) -> catalog_pb2.RenewSiteLeaseResponse:
        return await catalog.stub.RenewSiteLease(
            catalog_pb2.RenewSiteLeaseRequest(
                site_job_id=job, attempt=attempt, worker_id="wB", lease_seconds=30, execution_id=execution
            )
        )

    assert not (await renew("aaaa1111")).held
    assert (await renew("bbbb2222")).held

    async def complete(execution: str, name: str) -> catalog_pb2.CompleteSiteJobResponse:
        return await catalog.stub.CompleteSiteJob(
            catalog_pb2.CompleteSiteJobRequest(
                site_job_id=job,
                attempt=attempt,
                worker_id="w",
                results=[result_file(claim, name)],
                execution_id=execution,
            )
        )

    with refused(PRECONDITION, "execution aaaa1111", "taken over by execution bbbb2222 (wB)"):
        await complete("aaaa1111", "A.csv")
    with refused(PRECONDITION, "taken over by execution bbbb2222"):
        await catalog.stub.FailSiteJob(
            catalog_pb2.FailSiteJobRequest(
                site_job_id=job,
                attempt=attempt,
                worker_id="wA",
                failure_class=FC.FAILURE_CLASS_CP_PROBLEM,
                reason="late",
                execution_id="aaaa1111",
            )
        )
    assert (await complete("bbbb2222", "B.csv")).recorded
    assert (await complete("bbbb2222", "B.csv")).recorded  # a replay: the first call's answer
    # The cut-off execution finishing late never replaces what was recorded.
    with refused(PRECONDITION, "taken over by execution bbbb2222"):
        await complete("aaaa1111", "A.csv")
    done = await site(catalog, with_results=True)
    assert done.state == types_pb2.SITE_STATE_DONE and [r.name for r in done.results] == ["B.csv"]
    # Without an execution id the catalog picks one.
    claim2 = await one_site_more(catalog)
    reply = await start(catalog, claim2.site_job_id, claim2.attempt)
    assert reply.decision == RUN and len(reply.execution_id) == 16
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "execution_id", "is not valid"):
        await catalog.stub.StartSiteJob(
            catalog_pb2.StartSiteJobRequest(
                site_job_id=claim2.site_job_id, attempt=claim2.attempt, execution_id="../x"
            )
        )


async def one_site_more(catalog: Catalog) -> catalog_pb2.SiteClaim:
    await new_plate(catalog.stub, "P2")
    await ready_sites(catalog.stub, "P2", 1)
    (claim,) = await claim_all(catalog.stub)
    return claim


async def test_a_replayed_fail_or_complete_gets_the_first_calls_outcome(catalog: Catalog) -> None:
    """A call whose reply was lost is retried by the worker: the replay gets
    the first call's answer, even after the retry was issued."""
    claim = await one_site(catalog)
    job = claim.site_job_id
    await catalog.stub.StartSiteJob(
        catalog_pb2.StartSiteJobRequest(site_job_id=job, attempt=1, worker_id="w", execution_id="e1")
    )
    request = catalog_pb2.FailSiteJobRequest(
        site_job_id=job,
        attempt=1,
        worker_id="w",
        failure_class=FC.FAILURE_CLASS_CP_PROBLEM,
        reason="segfault",
        execution_id="e1",
    )
    first = await catalog.stub.FailSiteJob(request)
    assert first.will_retry and first.next_attempt == 2 and first.state == types_pb2.SITE_STATE_READY
    assert await catalog.stub.FailSiteJob(request) == first
    assert (await claim_due(catalog)).attempt == 2
    assert await catalog.stub.FailSiteJob(request) == first
    # Another execution's late failure of attempt 1 is still stale.
    with refused(PRECONDITION, "attempt 1 is stale, site is at attempt 2"):
        await catalog.stub.FailSiteJob(
            catalog_pb2.FailSiteJobRequest(
                site_job_id=job,
                attempt=1,
                worker_id="w",
                failure_class=FC.FAILURE_CLASS_CP_PROBLEM,
                reason="late",
                execution_id="e0",
            )
        )
    await catalog.stub.StartSiteJob(
        catalog_pb2.StartSiteJobRequest(site_job_id=job, attempt=2, worker_id="w", execution_id="e2")
    )
    complete = catalog_pb2.CompleteSiteJobRequest(
        site_job_id=job,
        attempt=2,
        worker_id="w",
        results=[result_file(claim, "Image.csv")],
        execution_id="e2",
    )
    assert (await catalog.stub.CompleteSiteJob(complete)).recorded
    assert (await catalog.stub.CompleteSiteJob(complete)).recorded
