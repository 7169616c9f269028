"""Dispatch path alone: trivial site tasks through the scheduler's publisher
(claims from a stand-in catalog, pipelined confirms, mark queued) and a
consumer that only acks, against Celery (acks_late) on the same RabbitMQ.

    .venv/bin/python bench/bench_dispatch.py [--tasks 20000] [--celery-tasks 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from services.common.amqp import AmqpConnection, Delivery, Topology
from services.scheduler.loop import Scheduler

REPO = Path(__file__).resolve().parents[1]
AMQP = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


class StandInCatalog:
    """Hands out N ready sites in claims of `max_sites`, like the catalog."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.next_id = 1
        self.marked = 0

    async def ClaimReadySites(self, request: Any, timeout: float = 0) -> catalog_pb2.ClaimReadySitesResponse:
        k = min(self.left, request.max_sites)
        self.left -= k
        claims = []
        for _ in range(k):
            claims.append(
                catalog_pb2.SiteClaim(
                    site_job_id=self.next_id,
                    attempt=1,
                    site=types_pb2.SiteRef(plate="BENCH", well="A01", site=self.next_id),
                    images=[
                        catalog_pb2.Image(
                            channel=c,
                            object=types_pb2.ObjectRef(
                                key=f"images/BENCH/A01/{c}.tif", size=524288, sha256="0" * 64
                            ),
                        )
                        for c in ("DNA", "GFP")
                    ],
                    pipeline=types_pb2.PipelineRef(sha256="1" * 64, key="pipelines/x.cppipe"),
                )
            )
            self.next_id += 1
        return catalog_pb2.ClaimReadySitesResponse(claims=claims)

    async def MarkSitesQueued(self, request: Any, timeout: float = 0) -> catalog_pb2.MarkSitesQueuedResponse:
        self.marked += len(request.sites)
        return catalog_pb2.MarkSitesQueuedResponse(marked=len(request.sites))

    async def ClaimReducibleRuns(
        self, request: Any, timeout: float = 0
    ) -> catalog_pb2.ClaimReducibleRunsResponse:
        return catalog_pb2.ClaimReducibleRunsResponse()


async def bench_cellmesh(n: int) -> tuple[float, float, float]:
    """Publishes n site tasks through the scheduler's path into a quorum
    queue, then drains it with an ack-only consumer; returns (publish/s,
    drain/s, end-to-end/s over both phases)."""
    topology = Topology(prefix=f"bench-{uuid.uuid4().hex[:6]}")
    pub = AmqpConnection(AMQP, topology, "bench publisher")
    await pub.connect()
    catalog = StandInCatalog(n)
    scheduler = Scheduler(catalog, AMQP, topology, "bench", batch=1000)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    while catalog.left:
        await scheduler._dispatch_sites(pub)
    t_pub = time.perf_counter() - t0
    assert catalog.marked == n

    sub = AmqpConnection(AMQP, topology, "bench consumer")
    await sub.connect()
    got = 0
    done = asyncio.Event()

    async def ack_only(d: Delivery) -> None:
        nonlocal got
        d.ack()
        got += 1
        if got == n:
            done.set()

    t1 = time.perf_counter()
    await sub.consume(topology.queue("sites"), 200, ack_only)
    await done.wait()
    t_drain = time.perf_counter() - t1
    await sub.close()
    for kind in Topology.KINDS:
        for name in [topology.queue(kind), topology.dead_queue(kind)]:
            await pub.delete_queue(name)
    await pub.delete_queue(topology.parked_queue)
    await pub.close()
    return n / t_pub, n / t_drain, n / (t_pub + t_drain)


def bench_celery(n: int) -> float:
    queue = f"cellmesh_bench_celery_{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "BENCH_CELERY_QUEUE": queue, "AMQP_URL": AMQP.replace("%2F", "")}
    sys.path.insert(0, str(REPO / "bench"))
    os.environ.update(env)
    from celery_app import app, site

    app.conf.task_default_queue = queue
    for i in range(n):  # fill the queue first, then time the worker draining it
        site.apply_async((i,), queue=queue)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_app",
            "worker",
            "-c",
            "1",
            "-Q",
            queue,
            "--loglevel",
            "WARNING",
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
        ],
        cwd=REPO / "bench",
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t0 = time.perf_counter()
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            started = False
            while True:
                _, depth, consumers = channel.queue_declare(queue=queue, passive=True)
                if consumers and not started:
                    started, t0 = True, time.perf_counter()
                if started and depth == 0:
                    break
                time.sleep(0.01)
            elapsed = time.perf_counter() - t0
            channel.queue_delete(queue)
    finally:
        worker.terminate()
        worker.wait(30)
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--celery-tasks", type=int, default=5000)
    args = parser.parse_args()
    publish, drain, both = asyncio.run(bench_cellmesh(args.tasks))
    celery = bench_celery(args.celery_tasks)
    print("| dispatch path (same RabbitMQ, same run) | tasks | tasks/s | vs Celery |")
    print("|---|---:|---:|---:|")
    print(
        f"| cellmesh: scheduler publish (claim, pipelined confirms, mark queued), quorum queue | {args.tasks} | {publish:,.0f} | {publish / celery:.1f}x |"
    )
    print(
        f"| cellmesh: ack-only consumer draining the filled queue | {args.tasks} | {drain:,.0f} | {drain / celery:.1f}x |"
    )
    print(f"| cellmesh: both phases, end to end | {args.tasks} | {both:,.0f} | {both / celery:.1f}x |")
    print(
        f"| Celery 5 acks_late, 1 worker draining a filled queue (trivial task) | {args.celery_tasks} | {celery:,.0f} | 1.0x |"
    )


if __name__ == "__main__":
    main()
