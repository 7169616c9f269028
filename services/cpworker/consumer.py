"""The worker's queue side: takes site tasks with manual acks, one per
CellProfiler slot, and acks a task only once its outcome is recorded in the
catalog (results stored and registered, or the failure recorded: whether and
when a failed site runs again is the catalog's decision). A redelivered task
of a site already done is acked without running again.

A worker whose object store cannot be used with its settings (no such bucket,
unknown key, access denied...) hands the task back unrun (no attempt charged,
nothing recorded), goes NOT_SERVING with a message naming the setting, takes
no task and probes the store every `probe_interval` seconds until it answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2
from cellmesh.tasks.v1 import tasks_pb2
from google.protobuf.message import DecodeError

from services.common.amqp import (
    AmqpConnection,
    Delivery,
    Topology,
    consume_until_stopped,
)
from services.common.retry import with_backoff
from services.common.s3 import ObjectStoreMisconfigured, StoreGate
from services.cpworker.site import Failure, Phase, SiteProcessor, SiteRunner, Success

log = logging.getLogger(__name__)

FC = types_pb2.FailureClass
SITE_TASK_TYPE = "cellmesh.tasks.v1.SiteTask"
GUARD_TICK_S = 1.0  # how often a running site's guard looks at its claim


@dataclass
class WorkerStats:
    sites_done: int = 0
    sites_failed: int = 0
    duplicates_skipped: int = 0
    redelivered: int = 0
    runs_abandoned: int = 0


async def _failpoint_slow_site() -> None:
    """Fault injection for tests: CELLMESH_FAILPOINT=worker.slow_site:SECONDS
    makes every site take that much longer, like a long CellProfiler run."""
    failpoint = os.environ.get("CELLMESH_FAILPOINT", "")
    if failpoint.startswith("worker.slow_site:"):
        seconds = float(failpoint.split(":", 1)[1])
        log.warning("failpoint worker.slow_site: holding the site %.0f s", seconds)
        await asyncio.sleep(seconds)


class SiteConsumer:
    def __init__(
        self,
        catalog: catalog_pb2_grpc.CatalogServiceAsyncStub,
        processor: SiteProcessor,
        runners: list[SiteRunner],
        amqp_url: str,
        topology: Topology,
        worker_id: str,
        ack_early_after: float = 1200.0,
        lease_seconds: int = 120,
        renew_every: float | None = None,
        probe_interval: float = 15.0,
        on_serving: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self._on_serving = on_serving
        self.gate = StoreGate(processor.store, probe_interval)
        self._pause = asyncio.Event()
        self.ack_early_after = ack_early_after
        self.lease_seconds = lease_seconds
        self.renew_every = lease_seconds / 3 if renew_every is None else renew_every
        self.catalog = catalog
        self.processor = processor
        self.amqp_url = amqp_url
        self.topology = topology
        self.worker_id = worker_id
        self.slots = len(runners)
        self._runners: asyncio.Queue[SiteRunner] = asyncio.Queue()
        for runner in runners:
            self._runners.put_nowait(runner)
        self.stats = WorkerStats()
        self.active: dict[int, Phase] = {}
        self.draining = False
        self._inflight: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()

    async def run(self, stop: asyncio.Event, grace_seconds: float) -> None:
        """Consumes until `stop`; then takes no new site, lets the current ones
        finish for up to `grace_seconds`, and hands the rest back. While the
        object store cannot be used, consumes nothing and probes it."""
        self._stop = stop

        async def drain(conn: AmqpConnection, tag: str) -> None:
            await self._drain(conn, tag, grace_seconds)

        while not stop.is_set():
            if self.store_problem:
                await self._set_serving(False)
                await self.gate.wait_open(stop)
                continue
            await self._set_serving(True)
            pause = self._pause = asyncio.Event()
            relay = asyncio.create_task(self._relay_stop(stop, pause))
            try:
                # Two tasks per CellProfiler: the second one's transfers overlap the first one's run.
                await consume_until_stopped(
                    self.amqp_url,
                    self.topology,
                    f"cpworker {self.worker_id}",
                    self.topology.queue("sites"),
                    2 * self.slots,
                    self._on_task,
                    pause,
                    on_stop=drain,
                )
            finally:
                relay.cancel()
                await asyncio.gather(relay, return_exceptions=True)

    @staticmethod
    async def _relay_stop(stop: asyncio.Event, pause: asyncio.Event) -> None:
        await stop.wait()
        pause.set()

    def on_serving(self, callback: Callable[[bool], Awaitable[None]]) -> None:
        """`callback(serving)` hears when the worker starts or stops taking sites (gRPC health)."""
        self._on_serving = callback

    async def _set_serving(self, serving: bool) -> None:
        if self._on_serving is not None:
            await self._on_serving(serving)

    @property
    def store_problem(self) -> str:
        """Why the worker takes no task now (the object store cannot be used); "" when it does."""
        return self.gate.problem

    async def check_store(self) -> bool:
        """Probes the object store once (at start); False, with the reason in
        `store_problem` and the log, if it cannot be used."""
        return await self.gate.check()

    async def _drain(self, conn: AmqpConnection, tag: str, grace_seconds: float) -> None:
        # Stopping (SIGTERM), or pausing because the object store cannot be used.
        self.draining = self._stop.is_set()
        await conn.cancel(tag)
        if self._inflight:
            log.info("draining: %d site(s) in progress, %.0f s to finish", len(self._inflight), grace_seconds)
            _, pending = await asyncio.wait(set(self._inflight), timeout=grace_seconds)
            for task in pending:
                task.cancel()  # the handler hands its delivery back
            if pending:
                await asyncio.wait(pending, timeout=10)

    async def _on_task(self, delivery: Delivery) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._inflight.add(task)
        try:
            await self._handle(delivery)
        except asyncio.CancelledError:
            log.warning("handing a site back to the queue (shutting down)")
            delivery.requeue()
        except Exception:
            log.exception("unexpected error while handling a site task; handing it back")
            delivery.requeue()
        finally:
            self._inflight.discard(task)

    async def _catalog(self, what: str, call: object) -> object:
        """Catalog calls are retried through outages for as long as the
        worker runs: the task stays unacked until its outcome is recorded."""
        return await with_backoff(call, what, max_delay=5.0, stop=self._stop)  # type: ignore[arg-type]

    async def _handle(self, delivery: Delivery) -> None:
        try:
            site_task = tasks_pb2.SiteTask.FromString(delivery.body)
            claim = site_task.claim
            if claim.site_job_id <= 0 or not claim.images or not claim.pipeline.sha256:
                raise DecodeError("not a site task: no site job, images or pipeline")
        except DecodeError as exc:
            log.error(
                "unreadable task (%d bytes, type %r): %s; dead-lettering it",
                len(delivery.body),
                delivery.properties.type,
                exc,
            )
            delivery.reject()
            return
        if self.draining:
            log.warning(
                "handing a site back to the queue (it arrived after this worker stopped taking sites)"
            )
            delivery.requeue()
            return
        if self.store_problem:
            delivery.requeue()
            return
        site = f"{claim.site.plate}/{claim.site.well}/s{claim.site.site} attempt {claim.attempt}"
        # This handling of the delivery is an execution of its own: a
        # redelivered task whose first execution may still be alive elsewhere
        # must be told apart from it.
        execution = secrets.token_hex(8)
        if delivery.redelivered:
            self.stats.redelivered += 1
            log.info("redelivered task: %s (delivery count %d)", site, delivery.delivery_count)
        try:
            start = await self._catalog(
                "starting a site job",
                lambda: self.catalog.StartSiteJob(
                    catalog_pb2.StartSiteJobRequest(
                        site_job_id=claim.site_job_id,
                        attempt=claim.attempt,
                        worker_id=self.worker_id,
                        execution_id=execution,
                        lease_seconds=self.lease_seconds,
                    ),
                    timeout=30,
                ),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                log.error("site job %d is unknown to the catalog; dead-lettering the task", claim.site_job_id)
                delivery.reject()
                return
            raise
        decision = start.decision  # type: ignore[attr-defined]
        if decision != catalog_pb2.START_DECISION_RUN:
            self.stats.duplicates_skipped += 1
            log.info("skipping %s: %s", site, start.detail or catalog_pb2.StartDecision.Name(decision))  # type: ignore[attr-defined]
            delivery.ack()
            return
        execution = start.execution_id or execution  # type: ignore[attr-defined]
        site = f"{site} execution {execution}"

        phase = Phase(claim)
        self.active[claim.site_job_id] = phase
        try:
            try:
                outcome = await self._run_guarded(claim, execution, delivery, phase, site)
            except ObjectStoreMisconfigured as exc:
                # Not the site's fault: nothing recorded, no attempt charged; the
                # task goes back for a worker whose store works (a redelivered
                # task runs as a new execution of the same attempt).
                log.warning("handing %s back unrun: the object store cannot be used", site)
                delivery.requeue()
                self.gate.close(exc)
                self._pause.set()
                return
            if outcome is None:
                return
            phase.name = "registering"
            if isinstance(outcome, Success):
                await self._complete(claim, execution, outcome, site)
                delivery.ack()
            else:
                await self._fail(claim, execution, outcome, site, delivery)
        finally:
            self.active.pop(claim.site_job_id, None)

    async def _run_guarded(
        self, claim: catalog_pb2.SiteClaim, execution: str, delivery: Delivery, phase: Phase, site: str
    ) -> Success | Failure | None:
        """Runs the site while a guard watches that this execution still holds
        it; when it does not (see `_guard`), the run is cancelled, CellProfiler
        stopped, nothing uploaded or recorded, and None returned."""

        async def work() -> Success | Failure:
            await _failpoint_slow_site()
            return await self.processor.process(claim, self._runners, phase, execution)

        running = asyncio.create_task(work())
        lost: list[str] = []
        guard = asyncio.create_task(self._guard(claim, execution, delivery, site, running, lost))
        try:
            return await running
        except asyncio.CancelledError:
            if not lost:
                raise  # the worker is stopping: the handler hands the task back
            self.stats.runs_abandoned += 1
            log.warning("stopped %s: %s; nothing of it is stored or recorded", site, lost[0])
            if not delivery.settled:
                # Still open only when the catalog gave the attempt to someone
                # else: this task is obsolete.
                delivery.ack()
            return None
        finally:
            guard.cancel()
            await asyncio.gather(guard, return_exceptions=True)

    async def _guard(
        self,
        claim: catalog_pb2.SiteClaim,
        execution: str,
        delivery: Delivery,
        site: str,
        running: asyncio.Task[Success | Failure],
        lost: list[str],
    ) -> None:
        """Keeps the site's claim and stops the run when the claim is gone.

        - While the task is unacknowledged, the broker holds the site for this
          worker; if the connection under it closes, the broker hands the site
          to another worker, so this run stops.
        - Every third of `lease_seconds` the execution renews its lease in the
          catalog. A site that runs longer than `ack_early_after` (kept below
          the broker's consumer timeout) has its task acknowledged once it
          holds a lease: from then on the lease alone guards it.
        - When the catalog answers that the attempt is no longer this
          execution's (another execution took it over, or it was requeued),
          or the lease could not be renewed for `lease_seconds` (so another
          worker may have it now), the run stops.
        """
        request = catalog_pb2.RenewSiteLeaseRequest(
            site_job_id=claim.site_job_id,
            attempt=claim.attempt,
            worker_id=self.worker_id,
            lease_seconds=self.lease_seconds,
            execution_id=execution,
        )
        try:
            reason = await self._watch_claim(request, delivery, site)
        except Exception as exc:  # a guard that cannot watch must not leave the run unguarded
            log.exception("the guard of %s failed", site)
            reason = f"its guard failed ({exc})"
        lost.append(reason)
        running.cancel()

    async def _watch_claim(
        self, request: catalog_pb2.RenewSiteLeaseRequest, delivery: Delivery, site: str
    ) -> str:
        """Returns why the claim is gone, once it is (see `_guard`)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        next_renewal = started + self.renew_every
        lease_until: float | None = None
        reason = ""
        while not reason:
            await asyncio.sleep(GUARD_TICK_S)
            now = loop.time()
            if not delivery.settled and not delivery.channel_open:
                reason = "the broker connection under it closed, so the broker hands it to another worker"
                break
            if lease_until is not None and now > lease_until:
                reason = f"its lease could not be renewed for {self.lease_seconds} s"
                break
            if now < next_renewal:
                continue
            next_renewal = now + self.renew_every
            try:
                reply = await self.catalog.RenewSiteLease(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                log.warning("could not renew the lease of %s: %s", site, exc.details())
                continue
            if not reply.held:
                reason = "the catalog says this execution no longer holds the attempt"
                break
            lease_until = loop.time() + self.lease_seconds
            if not delivery.settled and now - started >= self.ack_early_after:
                delivery.ack()
                log.info("%s runs long: lease taken, task acknowledged early", site)
        return reason

    async def _complete(
        self, claim: catalog_pb2.SiteClaim, execution: str, outcome: Success, site: str
    ) -> None:
        request = catalog_pb2.CompleteSiteJobRequest(
            site_job_id=claim.site_job_id,
            attempt=claim.attempt,
            worker_id=self.worker_id,
            results=outcome.results,
            provenance=outcome.provenance,
            execution_id=execution,
        )
        try:
            await self._catalog(
                "recording a done site", lambda: self.catalog.CompleteSiteJob(request, timeout=30)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.warning("result of %s not recorded: %s", site, exc.details())
            return
        self.stats.sites_done += 1
        counts = ", ".join(f"{k}={v}" for k, v in sorted(outcome.provenance.object_counts.items()))
        log.info("done %s in %.2f s (%s)", site, outcome.provenance.run_seconds, counts)

    async def _fail(
        self,
        claim: catalog_pb2.SiteClaim,
        execution: str,
        outcome: Failure,
        site: str,
        delivery: Delivery,
    ) -> None:
        self.stats.sites_failed += 1
        cls_name = types_pb2.FailureClass.Name(outcome.failure_class)  # type: ignore[arg-type]
        log.warning("%s failed: %s: %s", site, cls_name, outcome.reason)
        # The catalog decides whether and when the site is tried again (READY
        # with a not-before time); this worker only records the outcome, with
        # the task unacked until it is recorded.
        try:
            reply = await self._catalog(
                "recording a failed site",
                lambda: self.catalog.FailSiteJob(self._fail_request(claim, execution, outcome), timeout=30),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.warning("failure of %s not recorded: %s", site, exc.details())
            delivery.ack()
            return
        if reply.will_retry:  # type: ignore[attr-defined]
            log.info(
                "%s will be tried again by the catalog as attempt %d",
                site,
                reply.next_attempt,  # type: ignore[attr-defined]
            )
            delivery.ack()
        else:
            # Failed for good: recorded in the catalog; the task goes to the
            # dead-letter queue, where it is parked for people to inspect.
            delivery.reject()

    def _fail_request(
        self, claim: catalog_pb2.SiteClaim, execution: str, outcome: Failure
    ) -> catalog_pb2.FailSiteJobRequest:
        return catalog_pb2.FailSiteJobRequest(
            site_job_id=claim.site_job_id,
            attempt=claim.attempt,
            worker_id=self.worker_id,
            execution_id=execution,
            failure_class=outcome.failure_class,  # type: ignore[arg-type]
            reason=outcome.reason,
        )
