"""The worker stops a site it no longer holds, and records nothing for it:
when the broker connection under an unacknowledged task closes, when the
catalog says another execution took the attempt over, and when the lease
could not be renewed for its length. Unit tests over the consumer with a
fake catalog and channel; the partition test in tests/faults runs the same
paths against the real servers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2
from cellmesh.tasks.v1 import tasks_pb2
from pika import BasicProperties

from services.common.amqp import Delivery, Topology
from services.cpworker import consumer as consumer_module
from services.cpworker.consumer import SiteConsumer
from services.cpworker.site import Phase, Success


@dataclass
class FakeChannel:
    is_open: bool = True
    acked: list[int] = field(default_factory=list)
    nacked: list[tuple[int, bool]] = field(default_factory=list)

    def basic_ack(self, tag: int) -> None:
        self.acked.append(tag)

    def basic_nack(self, tag: int, requeue: bool) -> None:
        self.nacked.append((tag, requeue))


class Unreachable(grpc.aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "catalog down"
        )


@dataclass
class FakeCatalog:
    held: bool = True
    reachable: bool = True
    calls: list[tuple[str, Any]] = field(default_factory=list)

    async def StartSiteJob(self, request: Any, timeout: float = 0) -> catalog_pb2.StartSiteJobResponse:
        self.calls.append(("start", request))
        return catalog_pb2.StartSiteJobResponse(
            decision=catalog_pb2.START_DECISION_RUN, execution_id=request.execution_id
        )

    async def RenewSiteLease(self, request: Any, timeout: float = 0) -> catalog_pb2.RenewSiteLeaseResponse:
        self.calls.append(("renew", request))
        if not self.reachable:
            raise Unreachable()
        return catalog_pb2.RenewSiteLeaseResponse(held=self.held)

    async def CompleteSiteJob(self, request: Any, timeout: float = 0) -> catalog_pb2.CompleteSiteJobResponse:
        self.calls.append(("complete", request))
        return catalog_pb2.CompleteSiteJobResponse(recorded=True)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class AnsweringStore:
    """An object store that always answers its probe (the gate stays open)."""

    async def probe(self, key: str = "") -> None:
        return None


@dataclass
class SlowProcessor:
    """Stands in for the site processor: runs for `seconds`, then succeeds."""

    seconds: float
    started: int = 0
    cancelled: int = 0
    executions: list[str] = field(default_factory=list)
    store: AnsweringStore = field(default_factory=lambda: AnsweringStore())

    async def process(self, claim: Any, runners: Any, phase: Phase, execution: str) -> Success:
        self.started += 1
        self.executions.append(execution)
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return Success([], catalog_pb2.Provenance(run_seconds=self.seconds))


def make_consumer(
    catalog: FakeCatalog, processor: SlowProcessor, lease: int = 1, ack_early_after: float = 3600
) -> SiteConsumer:
    consumer = SiteConsumer(
        catalog,  # type: ignore[arg-type]
        processor,  # type: ignore[arg-type]
        [],
        "amqp://unused",
        Topology(prefix="t"),
        "worker-a",
        ack_early_after=ack_early_after,
        lease_seconds=lease,
        renew_every=0.1,
    )
    return consumer


def delivery(channel: FakeChannel) -> Delivery:
    claim = catalog_pb2.SiteClaim(
        site_job_id=7,
        attempt=1,
        site=types_pb2.SiteRef(plate="P", well="A01", site=0),
        images=[catalog_pb2.Image(channel="DNA")],
        pipeline=types_pb2.PipelineRef(sha256="ab" * 32, key="pipelines/x"),
    )
    body = tasks_pb2.SiteTask(claim=claim).SerializeToString()
    return Delivery(body, BasicProperties(headers={}), False, 1, channel)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def fast_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_module, "GUARD_TICK_S", 0.02)


async def test_a_site_whose_broker_connection_closes_stops_and_records_nothing() -> None:
    catalog, processor, channel = FakeCatalog(), SlowProcessor(30), FakeChannel()
    consumer = make_consumer(catalog, processor, lease=60)
    handled = asyncio.create_task(consumer._handle(delivery(channel)))
    await asyncio.sleep(0.2)
    assert processor.started == 1
    channel.is_open = False  # the broker missed our heartbeats: it redelivers the task
    await asyncio.wait_for(handled, 5)
    assert processor.cancelled == 1
    assert "complete" not in catalog.names()
    assert consumer.stats.runs_abandoned == 1 and not channel.acked and not channel.nacked


async def test_a_site_taken_over_by_another_execution_stops_and_records_nothing() -> None:
    catalog, processor, channel = FakeCatalog(held=False), SlowProcessor(30), FakeChannel()
    consumer = make_consumer(
        catalog,
        processor,
    )
    await asyncio.wait_for(consumer._handle(delivery(channel)), 5)
    assert processor.cancelled == 1
    assert catalog.names() == ["start", "renew"]
    (start,), renew = [r for n, r in catalog.calls if n == "start"], catalog.calls[1][1]
    assert start.execution_id and renew.execution_id == start.execution_id == processor.executions[0]
    assert channel.acked == [1]  # the task is obsolete: the attempt is someone else's


async def test_a_lease_that_cannot_be_renewed_for_its_length_stops_the_run() -> None:
    catalog, processor, channel = FakeCatalog(), SlowProcessor(30), FakeChannel()
    consumer = make_consumer(catalog, processor, ack_early_after=0)
    handled = asyncio.create_task(consumer._handle(delivery(channel)))
    await asyncio.sleep(0.3)
    assert channel.acked == [1]  # lease taken, acknowledged early: the lease alone guards it now
    catalog.reachable = False
    await asyncio.wait_for(handled, 5)
    assert processor.cancelled == 1 and "complete" not in catalog.names()


async def test_a_site_that_holds_its_claim_completes_with_its_execution() -> None:
    catalog, processor, channel = FakeCatalog(), SlowProcessor(0.5), FakeChannel()
    consumer = make_consumer(
        catalog,
        processor,
    )
    await asyncio.wait_for(consumer._handle(delivery(channel)), 5)
    assert processor.cancelled == 0 and channel.acked == [1]
    names = catalog.names()
    assert names[0] == "start" and names[-1] == "complete" and "renew" in names
    complete = catalog.calls[-1][1]
    assert complete.execution_id == processor.executions[0] != ""


def test_result_keys_differ_per_execution() -> None:
    from services.cpworker.site import result_prefix

    claim = catalog_pb2.SiteClaim(
        attempt=1,
        site=types_pb2.SiteRef(plate="P", well="A01", site=2),
        pipeline=types_pb2.PipelineRef(sha256="c" * 64),
    )
    assert result_prefix(claim, "e1") == f"results/P/{'c' * 12}/A01/s2/a1-e1"
    assert result_prefix(claim, "e1") != result_prefix(claim, "e2")
    assert Path(result_prefix(claim, "e2")).name == "a1-e2"
