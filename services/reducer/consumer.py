"""The reducer's queue side: one plate-reduce task at a time, acked only
after the report is stored and registered.

- Catalog outages are retried (with jittered backoff) for as long as the
  reducer runs; object-store outages are retried inside the reduce up to the
  reducer's transient budget, after which the reduce fails: its task is
  dead-lettered, and the scheduler logs and parks it with the reason.
- An object store that cannot be used with the reducer's settings (no such
  bucket, unknown key, access denied...) is not the plate's fault: the task is
  handed back, the reducer goes NOT_SERVING with the message, takes no task
  and probes the store every PROBE_INTERVAL_S until it answers.
- Anything else hands the task back after a pause, until the queue's delivery
  limit dead-letters it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.tasks.v1 import tasks_pb2
from google.protobuf.message import DecodeError

from services.common.amqp import Delivery, Topology, consume_until_stopped
from services.common.backoff import Backoff
from services.common.retry import GaveUp, is_transient, sleep_unless, with_backoff
from services.common.s3 import ObjectStoreMisconfigured, StoreGate

log = logging.getLogger(__name__)

ReduceRun = Callable[[catalog_pb2.RunClaim], Awaitable[catalog_pb2.PlateReport]]
FAILED_REDUCE_PAUSE = Backoff(1.0, 4.0, 1.0)  # before a failed reduce is handed back


class ReduceConsumer:
    def __init__(
        self,
        reduce_run: ReduceRun,
        amqp_url: str,
        topology: Topology,
        name: str,
        gate: StoreGate | None = None,
        on_serving: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.reduce_run = reduce_run
        self.amqp_url = amqp_url
        self.topology = topology
        self.name = name
        self.gate = gate
        self.on_serving = on_serving
        self.reduced = 0
        self.failed = 0
        self._stop = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        while not stop.is_set():
            if self.gate is not None and self.gate.problem:
                await self._serving(False)
                await self.gate.wait_open(stop)
                continue
            await self._serving(True)
            pause = asyncio.Event()
            relay = asyncio.create_task(self._relay(stop, pause))
            try:
                await consume_until_stopped(
                    self.amqp_url,
                    self.topology,
                    f"reducer {self.name}",
                    self.topology.queue("reduce"),
                    1,
                    self._on_task,
                    pause,
                )
            finally:
                relay.cancel()
                await asyncio.gather(relay, return_exceptions=True)

    async def _relay(self, stop: asyncio.Event, pause: asyncio.Event) -> None:
        """Stops consuming on `stop`, or when the object store turns out unusable."""
        waits = [asyncio.ensure_future(stop.wait())]
        if self.gate is not None:
            waits.append(asyncio.ensure_future(self.gate.closed.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        pause.set()

    async def _serving(self, serving: bool) -> None:
        if self.on_serving is not None:
            await self.on_serving(serving)

    async def _on_task(self, delivery: Delivery) -> None:
        try:
            task = tasks_pb2.PlateReduceTask.FromString(delivery.body)
            if not task.run.plate or not task.run.pipeline.sha256:
                raise DecodeError("no plate or pipeline")
        except DecodeError as exc:
            log.error("unreadable reduce task (%d bytes): %s; dead-lettering it", len(delivery.body), exc)
            delivery.reject()
            return
        if self.gate is not None and self.gate.problem:
            delivery.requeue()
            return
        run = task.run
        if os.environ.get("CELLMESH_FAILPOINT") == "reducer.kill_on_reduce":
            # Fault injection for tests: die on every reduce, as a reducer
            # killed by the kernel for memory would.
            log.error("failpoint reducer.kill_on_reduce: killing this process")
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            report = await with_backoff(
                lambda: self.reduce_run(run),
                f"reducing plate {run.plate}",
                transient=is_transient,
                stop=self._stop,
            )
        except asyncio.CancelledError:
            delivery.requeue()
            raise
        except ObjectStoreMisconfigured as exc:
            log.warning("handing the reduce of plate %s back: the object store cannot be used", run.plate)
            delivery.requeue()
            if self.gate is not None:
                self.gate.close(exc)
            return
        except GaveUp as exc:
            # The object store stayed unreachable for the whole budget (or the
            # reducer is stopping while the catalog is away).
            if self._stop.is_set():
                delivery.requeue()
                return
            self.failed += 1
            log.error(
                "reduce of plate %s (generation %d) failed: %s; dead-lettering its task",
                run.plate,
                run.generation,
                exc,
            )
            delivery.reject()
            return
        except Exception:
            log.exception(
                "reduce of plate %s (generation %d) failed; handing it back", run.plate, run.generation
            )
            await sleep_unless(self._stop, FAILED_REDUCE_PAUSE.delay(1))
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
