"""The scheduler: turns the catalog's ready sites and settled plates into
tasks on RabbitMQ, and records what the dead-letter queues receive.

A site's task is published, the broker confirms it, and only then does the
catalog learn the site is queued. A scheduler that dies in between leaves a
claim whose lease runs out; the site is claimed again with a new attempt and
the older task, if it was delivered at all, is skipped by the worker as stale.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field

import grpc
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2
from cellmesh.tasks.v1 import tasks_pb2
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from services.common.amqp import (
    AmqpConnection,
    BrokerUnavailable,
    Delivery,
    PublishRefused,
    Topology,
    connect_with_backoff,
)
from services.common.retry import GaveUp, is_transient, wait_first, with_backoff

log = logging.getLogger(__name__)

SITE_TASK_TYPE = "cellmesh.tasks.v1.SiteTask"
REDUCE_TASK_TYPE = "cellmesh.tasks.v1.PlateReduceTask"


@dataclass
class SchedulerStats:
    sites_claimed: int = 0
    sites_published: int = 0
    reduces_published: int = 0
    publish_failures: int = 0
    dead_recorded: int = 0
    parked: int = 0
    last_poll_at: float = 0.0
    site_queue_depth: int = 0
    broker_connected: bool = False
    dispatch_lags: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=100))


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def death_reason(delivery: Delivery) -> str:
    """Why the broker dead-lettered a message, from its x-death headers."""
    headers = delivery.headers
    reason = str(headers.get("x-first-death-reason", "") or "")
    deaths = headers.get("x-death") or []
    count = 0
    if deaths and isinstance(deaths, list) and isinstance(deaths[0], dict):
        count = int(deaths[0].get("count", 0) or 0)
        reason = reason or str(deaths[0].get("reason", ""))
    if reason == "delivery_limit":
        return (
            f"dead-lettered: delivered {delivery.delivery_count or count} times without being settled "
            "(workers died or lost their connection while processing it)"
        )
    if reason == "rejected":
        return "dead-lettered: a worker rejected the task"
    return f"dead-lettered ({reason or 'unknown reason'})"


class Scheduler:
    """Polls the catalog and publishes site and reduce tasks."""

    def __init__(
        self,
        catalog: catalog_pb2_grpc.CatalogServiceAsyncStub,
        amqp_url: str,
        topology: Topology,
        scheduler_id: str,
        poll_interval: float = 0.5,
        batch: int = 500,
        lease_seconds: int = 60,
        queue_per_consumer: int = 16,
        queue_min: int = 16,
    ) -> None:
        self.catalog = catalog
        self.amqp_url = amqp_url
        self.topology = topology
        self.scheduler_id = scheduler_id
        self.poll_interval = poll_interval
        self.batch = batch
        self.lease_seconds = lease_seconds
        self.queue_per_consumer = queue_per_consumer
        self.queue_min = queue_min
        self.stats = SchedulerStats()
        self._conn: AmqpConnection | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Runs until `stop` is set, reconnecting to the broker with backoff."""
        while not stop.is_set():
            try:
                conn = await connect_with_backoff(
                    self.amqp_url, self.topology, f"scheduler {self.scheduler_id}", stop
                )
            except BrokerUnavailable:
                break
            self._conn = conn
            self.stats.broker_connected = True
            log.info("connected to the broker; dispatching")
            try:
                for kind in Topology.KINDS:
                    await conn.consume(self.topology.dead_queue(kind), 20, self._on_dead)
                await self._dispatch_until_closed(conn, stop)
            except BrokerUnavailable as exc:
                log.warning("lost the broker: %s", exc)
            finally:
                self.stats.broker_connected = False
                await conn.close()
                self._conn = None

    async def _dispatch_until_closed(self, conn: AmqpConnection, stop: asyncio.Event) -> None:
        while not stop.is_set() and not conn.closed.is_set():
            busy = await self.poll_once(conn)
            if not busy:
                await wait_first(stop, conn.closed, timeout=self.poll_interval)

    async def poll_once(self, conn: AmqpConnection) -> bool:
        """One round: sites, then reduces. True if a full batch was claimed
        (there may be more right away)."""
        try:
            full = await self._dispatch_sites(conn)
            await self._dispatch_reduces(conn)
            self.stats.site_queue_depth = await conn.queue_depth(self.topology.queue("sites"))
        except grpc.aio.AioRpcError as exc:
            if not is_transient(exc):
                raise
            log.warning("catalog unavailable (%s); will poll again", exc.code().name)
            return False
        finally:
            self.stats.last_poll_at = time.time()
        return full

    async def _room(self, conn: AmqpConnection) -> int:
        """How many more site tasks the broker should hold: a bounded depth per
        consuming worker. Sites beyond it wait in the catalog, where their
        deadlines are kept, rather than piling up on the broker."""
        depth, consumers = await conn.queue_stats(self.topology.queue("sites"))
        self.stats.site_queue_depth = depth
        return max(self.queue_min, self.queue_per_consumer * consumers) - depth

    async def _dispatch_sites(self, conn: AmqpConnection) -> bool:
        room = await self._room(conn)
        if room <= 0:
            return False
        wanted = min(self.batch, room)
        reply = await self.catalog.ClaimReadySites(
            catalog_pb2.ClaimReadySitesRequest(
                scheduler_id=self.scheduler_id, max_sites=wanted, lease_seconds=self.lease_seconds
            ),
            timeout=30,
        )
        claims = list(reply.claims)
        if not claims:
            return False
        self.stats.sites_claimed += len(claims)
        published = _now()
        futures = []
        for claim in claims:
            task = tasks_pb2.SiteTask(claim=claim, published_at=published, scheduler_id=self.scheduler_id)
            futures.append(
                conn.publish_nowait(
                    self.topology.exchange,
                    "sites",
                    task.SerializeToString(),
                    headers={"site_job_id": claim.site_job_id, "attempt": claim.attempt},
                    message_type=SITE_TASK_TYPE,
                )
            )
        results = await asyncio.gather(*futures, return_exceptions=True)
        confirmed = [
            catalog_pb2.QueuedSite(site_job_id=c.site_job_id, attempt=c.attempt)
            for c, r in zip(claims, results, strict=True)
            if r is None
        ]
        failures = [r for r in results if r is not None]
        if failures:
            self.stats.publish_failures += len(failures)
            log.error(
                "%d of %d site tasks not confirmed (%s); their claims will expire and be retried",
                len(failures),
                len(claims),
                failures[0],
            )
        if confirmed and os.environ.get("CELLMESH_FAILPOINT") == "scheduler.after_publish":
            # Fault injection for tests: die between the broker's confirm and
            # the catalog's record, as a kill -9 at the worst moment would.
            log.error("failpoint scheduler.after_publish: killing this process")
            os.kill(os.getpid(), signal.SIGKILL)
        if confirmed:
            await self._mark_queued(confirmed)
            self.stats.sites_published += len(confirmed)
            now = time.time()
            for claim in claims:
                ready = next((i.registered_at for i in claim.images), None)
                if ready is not None and ready.seconds:
                    self.stats.dispatch_lags.append(max(0.0, now - ready.ToDatetime().timestamp()))
        if failures and isinstance(failures[0], BrokerUnavailable):
            raise failures[0]
        return len(claims) == wanted and wanted < room

    async def _mark_queued(self, confirmed: list[catalog_pb2.QueuedSite]) -> None:
        request = catalog_pb2.MarkSitesQueuedRequest(scheduler_id=self.scheduler_id, sites=confirmed)
        try:
            await with_backoff(
                lambda: self.catalog.MarkSitesQueued(request, timeout=30),
                "recording queued sites",
                give_up_after=self.lease_seconds / 2,
            )
        except GaveUp as exc:
            # The tasks are on the queue; the claims expire and the sites are
            # published again with a new attempt, the old tasks are skipped as stale.
            log.error("%s", exc)

    async def _dispatch_reduces(self, conn: AmqpConnection) -> None:
        reply = await self.catalog.ClaimReducibleRuns(
            catalog_pb2.ClaimReducibleRunsRequest(
                scheduler_id=self.scheduler_id, max_runs=20, lease_seconds=self.lease_seconds
            ),
            timeout=30,
        )
        if not reply.claims:
            return
        published = _now()
        confirmed = []
        for run in reply.claims:
            task = tasks_pb2.PlateReduceTask(run=run, published_at=published, scheduler_id=self.scheduler_id)
            try:
                await conn.publish(
                    self.topology.exchange,
                    "reduce",
                    task.SerializeToString(),
                    headers={"plate": run.plate, "generation": run.generation},
                    message_type=REDUCE_TASK_TYPE,
                )
                confirmed.append(run)
            except PublishRefused as exc:
                self.stats.publish_failures += 1
                log.error("reduce task for %s not confirmed: %s", run.plate, exc)
        if confirmed:
            request = catalog_pb2.MarkRunsQueuedRequest(scheduler_id=self.scheduler_id, runs=confirmed)
            with contextlib.suppress(GaveUp):
                await with_backoff(
                    lambda: self.catalog.MarkRunsQueued(request, timeout=30),
                    "recording queued reduces",
                    give_up_after=self.lease_seconds / 2,
                )
            self.stats.reduces_published += len(confirmed)
            for run in confirmed:
                log.info("queued reduce of plate %s (generation %d)", run.plate, run.generation)

    async def _on_dead(self, delivery: Delivery) -> None:
        """A task the broker dead-lettered: record the site as failed (so it is
        never left RUNNING), then park the message for people to inspect."""
        reason = death_reason(delivery)
        try:
            if delivery.properties.type == REDUCE_TASK_TYPE:
                reduce_task = tasks_pb2.PlateReduceTask.FromString(delivery.body)
                log.error("reduce of plate %s %s", reduce_task.run.plate, reason)
            else:
                task = tasks_pb2.SiteTask.FromString(delivery.body)
                if task.claim.site_job_id <= 0:
                    raise DecodeError("no site job id")
                await self._record_dead_site(task, reason)
        except DecodeError:
            log.error(
                "unreadable message on a dead-letter queue (%d bytes, type %r): parking it",
                len(delivery.body),
                delivery.properties.type,
            )
        except GaveUp as exc:
            log.error("%s; leaving the message for later", exc)
            delivery.requeue()
            return
        await self._park(delivery, reason)

    async def _record_dead_site(self, task: tasks_pb2.SiteTask, reason: str) -> None:
        claim = task.claim
        request = catalog_pb2.FailSiteJobRequest(
            site_job_id=claim.site_job_id,
            attempt=claim.attempt,
            worker_id=f"scheduler {self.scheduler_id}",
            failure_class=types_pb2.FAILURE_CLASS_CP_PROBLEM,
            reason=reason,
            final=True,
        )
        try:
            await with_backoff(
                lambda: self.catalog.FailSiteJob(request, timeout=30),
                "recording a dead site",
                give_up_after=60,
            )
            self.stats.dead_recorded += 1
            log.error("site %s/%s/%d %s", claim.site.plate, claim.site.well, claim.site.site, reason)
        except grpc.aio.AioRpcError as exc:
            # Stale or already settled: the catalog holds a newer outcome.
            log.info("dead task for site job %d not recorded: %s", claim.site_job_id, exc.details())

    async def _park(self, delivery: Delivery, reason: str) -> None:
        conn = self._conn
        if conn is None:
            delivery.requeue()
            return
        try:
            await conn.publish(
                "",
                self.topology.parked_queue,
                delivery.body,
                headers={
                    **{k: v for k, v in delivery.headers.items() if not k.startswith("x-")},
                    "cellmesh-parked-reason": reason,
                },
                message_type=delivery.properties.type or "",
            )
        except (PublishRefused, BrokerUnavailable, TimeoutError) as exc:
            log.error("could not park a dead message (%s); leaving it on the dead-letter queue", exc)
            delivery.requeue()
            return
        delivery.ack()
        self.stats.parked += 1
