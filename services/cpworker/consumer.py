"""The worker's queue side: takes site tasks with manual acks, one per
CellProfiler slot, and acks a task only once its outcome is recorded in the
catalog (results stored and registered, or the failure recorded and any retry
published). A redelivered task of a site already done is acked without
running again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass

import grpc
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2
from cellmesh.tasks.v1 import tasks_pb2
from google.protobuf.message import DecodeError

from services.common.amqp import (
    AmqpConnection,
    BrokerUnavailable,
    Delivery,
    PublishRefused,
    Topology,
    consume_until_stopped,
)
from services.common.retry import GaveUp, with_backoff
from services.cpworker.site import Failure, Phase, SiteProcessor, SiteRunner, Success

log = logging.getLogger(__name__)

FC = types_pb2.FailureClass
SITE_TASK_TYPE = "cellmesh.tasks.v1.SiteTask"


@dataclass
class WorkerStats:
    sites_done: int = 0
    sites_failed: int = 0
    duplicates_skipped: int = 0
    redelivered: int = 0


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
    ) -> None:
        self.ack_early_after = ack_early_after
        self.lease_seconds = lease_seconds
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
        self._conn: AmqpConnection | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()

    async def run(self, stop: asyncio.Event, grace_seconds: float) -> None:
        """Consumes until `stop`; then takes no new site, lets the current ones
        finish for up to `grace_seconds`, and hands the rest back."""
        self._stop = stop

        async def drain(conn: AmqpConnection, tag: str) -> None:
            await self._drain(conn, tag, grace_seconds)

        def use(conn: AmqpConnection | None) -> None:
            self._conn = conn  # retries are published on the consuming connection

        # Two tasks per CellProfiler: the second one's transfers overlap the first one's run.
        await consume_until_stopped(
            self.amqp_url,
            self.topology,
            f"cpworker {self.worker_id}",
            self.topology.queue("sites"),
            2 * self.slots,
            self._on_task,
            stop,
            on_stop=drain,
            on_connect=use,
        )

    async def _drain(self, conn: AmqpConnection, tag: str, grace_seconds: float) -> None:
        self.draining = True
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
            delivery.requeue()
            return
        site = f"{claim.site.plate}/{claim.site.well}/s{claim.site.site} attempt {claim.attempt}"
        if delivery.redelivered:
            self.stats.redelivered += 1
            log.info("redelivered task: %s (delivery count %d)", site, delivery.delivery_count)
        try:
            start = await self._catalog(
                "starting a site job",
                lambda: self.catalog.StartSiteJob(
                    catalog_pb2.StartSiteJobRequest(
                        site_job_id=claim.site_job_id, attempt=claim.attempt, worker_id=self.worker_id
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

        phase = Phase(claim)
        self.active[claim.site_job_id] = phase
        keeper = asyncio.create_task(self._keep_lease(claim, delivery, site))
        try:
            await _failpoint_slow_site()
            outcome = await self.processor.process(claim, self._runners, phase)
        finally:
            keeper.cancel()
        try:
            phase.name = "registering"
            if isinstance(outcome, Success):
                await self._complete(claim, outcome, site)
                delivery.ack()
            else:
                await self._fail(claim, outcome, site, delivery)
        finally:
            self.active.pop(claim.site_job_id, None)

    async def _keep_lease(self, claim: catalog_pb2.SiteClaim, delivery: Delivery, site: str) -> None:
        """A site that runs longer than `ack_early_after` (kept below the
        broker's consumer timeout) takes a lease in the catalog and has its
        task acknowledged, so the broker never closes the channel under it nor
        hands the site to another worker; the lease is renewed until the site
        ends. If this worker dies, the lease runs out and the catalog lets the
        site be claimed again."""
        await asyncio.sleep(self.ack_early_after)
        request = catalog_pb2.RenewSiteLeaseRequest(
            site_job_id=claim.site_job_id,
            attempt=claim.attempt,
            worker_id=self.worker_id,
            lease_seconds=self.lease_seconds,
        )
        while True:
            try:
                reply = await self.catalog.RenewSiteLease(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                log.warning("could not renew the lease of %s: %s", site, exc.details())
            else:
                if not reply.held:
                    return
                if not delivery.settled:
                    delivery.ack()
                    log.info("%s runs long: lease taken, task acknowledged early", site)
            await asyncio.sleep(self.lease_seconds / 3)

    async def _complete(self, claim: catalog_pb2.SiteClaim, outcome: Success, site: str) -> None:
        request = catalog_pb2.CompleteSiteJobRequest(
            site_job_id=claim.site_job_id,
            attempt=claim.attempt,
            worker_id=self.worker_id,
            results=outcome.results,
            provenance=outcome.provenance,
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
        self, claim: catalog_pb2.SiteClaim, outcome: Failure, site: str, delivery: Delivery
    ) -> None:
        self.stats.sites_failed += 1
        cls_name = types_pb2.FailureClass.Name(outcome.failure_class)  # type: ignore[arg-type]
        log.warning("%s failed: %s: %s", site, cls_name, outcome.reason)
        if outcome.failure_class == FC.FAILURE_CLASS_TRANSIENT:
            # No attempt is counted: the same attempt goes back through a delay queue.
            with contextlib.suppress(GaveUp, grpc.aio.AioRpcError):
                await with_backoff(
                    lambda: self.catalog.FailSiteJob(self._fail_request(claim, outcome), timeout=10),
                    "recording a transient failure",
                    give_up_after=10,
                )
            await self._publish_retry(claim, claim.attempt, 0)
            delivery.ack()
            return
        try:
            reply = await self._catalog(
                "recording a failed site",
                lambda: self.catalog.FailSiteJob(self._fail_request(claim, outcome), timeout=30),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.warning("failure of %s not recorded: %s", site, exc.details())
            delivery.ack()
            return
        if reply.will_retry:  # type: ignore[attr-defined]
            next_attempt = int(reply.next_attempt)  # type: ignore[attr-defined]
            await self._publish_retry(claim, next_attempt, claim.attempt - 1)
            delivery.ack()
        else:
            # Failed for good: recorded in the catalog; the task goes to the
            # dead-letter queue, where it is parked for people to inspect.
            delivery.reject()

    def _fail_request(self, claim: catalog_pb2.SiteClaim, outcome: Failure) -> catalog_pb2.FailSiteJobRequest:
        return catalog_pb2.FailSiteJobRequest(
            site_job_id=claim.site_job_id,
            attempt=claim.attempt,
            worker_id=self.worker_id,
            failure_class=outcome.failure_class,  # type: ignore[arg-type]
            reason=outcome.reason,
        )

    async def _publish_retry(self, claim: catalog_pb2.SiteClaim, attempt: int, retry_index: int) -> None:
        retry = catalog_pb2.SiteClaim()
        retry.CopyFrom(claim)
        retry.attempt = attempt
        body = tasks_pb2.SiteTask(claim=retry, scheduler_id=f"retry by {self.worker_id}").SerializeToString()
        conn = self._conn
        if conn is None:
            raise BrokerUnavailable("no broker connection to publish the retry")
        key = self.topology.retry_key("sites", retry_index)
        try:
            await conn.publish(
                self.topology.retry_exchange,
                key,
                body,
                headers={"site_job_id": claim.site_job_id, "attempt": attempt},
                message_type=SITE_TASK_TYPE,
            )
        except PublishRefused as exc:
            raise BrokerUnavailable(f"retry not stored: {exc}") from exc
        log.info("retry of site job %d (attempt %d) published to %s", claim.site_job_id, attempt, key)
