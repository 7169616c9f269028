"""The reducer's queue side: one plate-reduce task at a time, acked only
after the report is stored and registered. A failing reduce is handed back
(with a pause) until the queue's delivery limit dead-letters it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.tasks.v1 import tasks_pb2
from google.protobuf.message import DecodeError

from services.common.amqp import Delivery, Topology, consume_until_stopped
from services.common.retry import is_transient, with_backoff
from services.common.s3 import ObjectStoreError

log = logging.getLogger(__name__)

ReduceRun = Callable[[catalog_pb2.RunClaim], Awaitable[catalog_pb2.PlateReport]]


class ReduceConsumer:
    def __init__(self, reduce_run: ReduceRun, amqp_url: str, topology: Topology, name: str) -> None:
        self.reduce_run = reduce_run
        self.amqp_url = amqp_url
        self.topology = topology
        self.name = name
        self.reduced = 0
        self._stop = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        await consume_until_stopped(
            self.amqp_url,
            self.topology,
            f"reducer {self.name}",
            self.topology.queue("reduce"),
            1,
            self._on_task,
            stop,
        )

    async def _on_task(self, delivery: Delivery) -> None:
        try:
            task = tasks_pb2.PlateReduceTask.FromString(delivery.body)
            if not task.run.plate or not task.run.pipeline.sha256:
                raise DecodeError("no plate or pipeline")
        except DecodeError as exc:
            log.error("unreadable reduce task (%d bytes): %s; dead-lettering it", len(delivery.body), exc)
            delivery.reject()
            return
        run = task.run
        try:
            report = await with_backoff(
                lambda: self.reduce_run(run),
                f"reducing plate {run.plate}",
                transient=lambda exc: is_transient(exc) or isinstance(exc, ObjectStoreError),
                stop=self._stop,
            )
        except asyncio.CancelledError:
            delivery.requeue()
            raise
        except Exception:
            log.exception(
                "reduce of plate %s (generation %d) failed; handing it back", run.plate, run.generation
            )
            await asyncio.sleep(2.0)
            delivery.requeue()
            return
        self.reduced += 1
        log.info(
            "reduced plate %s generation %d into report v%d (%d wells, %d sites, %d missing)",
            run.plate,
            run.generation,
            report.version,
            report.wells,
            report.sites,
            len(report.missing_sites),
        )
        delivery.ack()
