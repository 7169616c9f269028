"""`python -m services.scheduler`: reads settings, wires, runs until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from cellmesh.catalog.v1 import catalog_pb2_grpc
from cellmesh.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from services.common import channels, logs
from services.common.amqp import AMQP_VARS, Topology, topology_from
from services.common.server import service_server, stop_event_on_signals
from services.common.settings import COMMON_VARS, Var, load, port, positive_float, positive_int
from services.scheduler.loop import Scheduler
from services.scheduler.service import SchedulerStatusServicer

log = logging.getLogger("services.scheduler")

VARS = (
    *COMMON_VARS,
    *AMQP_VARS,
    Var("GRPC_PORT", "50052", port),
    Var("CATALOG_ADDR", "127.0.0.1:50051", help="host:port of the catalog"),
    Var("POLL_INTERVAL_S", "0.5", positive_float, "how often to ask the catalog for ready sites"),
    Var("CLAIM_BATCH", "500", positive_int),
    Var("CLAIM_LEASE_S", "60", positive_int, "seconds before an unconfirmed claim returns"),
    Var(
        "QUEUE_PER_CONSUMER",
        "16",
        positive_int,
        "site tasks kept waiting on the broker per consuming worker (at least QUEUE_MIN); the rest wait in the catalog",
    ),
    Var(
        "QUEUE_MIN", "16", positive_int, "site tasks kept waiting on the broker even with no worker connected"
    ),
    Var("SCHEDULER_ID", f"{socket.gethostname()}-{os.getpid()}"),
)


@dataclass(frozen=True)
class Settings:
    values: dict[str, Any]

    @property
    def topology(self) -> Topology:
        return topology_from(self.values)


async def main(settings: Settings) -> None:
    v = settings.values
    stop = stop_event_on_signals()
    async with channels.service_channel(v["CATALOG_ADDR"], v) as channel:
        scheduler = Scheduler(
            catalog_pb2_grpc.CatalogServiceStub(channel),
            v["AMQP_URL"],
            settings.topology,
            v["SCHEDULER_ID"],
            poll_interval=v["POLL_INTERVAL_S"],
            batch=v["CLAIM_BATCH"],
            lease_seconds=v["CLAIM_LEASE_S"],
            queue_per_consumer=v["QUEUE_PER_CONSUMER"],
            queue_min=v["QUEUE_MIN"],
        )
        server = service_server(
            scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server,
            SchedulerStatusServicer(scheduler),
            scheduler_pb2.DESCRIPTOR,
            "SchedulerService",
            v,
        )
        await server.start()
        await server.set_serving(True)
        try:
            await scheduler.run(stop)
        finally:
            await server.stop()


if __name__ == "__main__":
    values = load(VARS)
    logs.configure(values["LOG_LEVEL"], "scheduler")
    asyncio.run(main(Settings(values)))
