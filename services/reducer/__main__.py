"""`python -m services.reducer`: reads settings, wires, runs until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from cellmesh.catalog.v1 import catalog_pb2_grpc
from cellmesh.reducer.v1 import reducer_pb2, reducer_pb2_grpc

from services.common import channels, logs
from services.common.amqp import AMQP_VARS, topology_from
from services.common.s3 import ObjectStore, StoreGate
from services.common.server import service_server, stop_event_on_signals
from services.common.settings import COMMON_VARS, S3_VARS, S3Settings, Var, load, port, positive_float
from services.reducer.consumer import ReduceConsumer
from services.reducer.service import Reducer, ReducerServicer

log = logging.getLogger("services.reducer")

VARS = (
    *COMMON_VARS,
    *AMQP_VARS,
    *S3_VARS,
    Var("GRPC_PORT", "50054", port),
    Var("CATALOG_ADDR", "127.0.0.1:50051", help="host:port of the catalog"),
    Var(
        "TRANSIENT_BUDGET_S",
        "300",
        positive_float,
        "how long an object store outage is retried inside a reduce before it fails",
    ),
    Var("PROBE_INTERVAL_S", "15", positive_float, "how often an unusable object store is probed"),
    Var("WORK_DIR", str(Path(tempfile.gettempdir()) / "cellmesh-reducer")),
    Var("REDUCER_ID", f"{socket.gethostname()}-{os.getpid()}"),
    Var(
        "CPA_IMAGE_URL_PREPEND",
        "",
        help="the URL CellProfiler Analyst opens a report's images under (object key appended); "
        "default: S3_ENDPOINT_URL/S3_BUCKET/",
    ),
)


async def main(v: dict[str, Any]) -> None:
    stop = stop_event_on_signals()
    async with (
        channels.service_channel(v["CATALOG_ADDR"], v) as channel,
        ObjectStore(S3Settings.from_env()) as store,
    ):
        reducer = Reducer(
            catalog_pb2_grpc.CatalogServiceStub(channel),
            store,
            Path(v["WORK_DIR"]),
            transient_budget=v["TRANSIENT_BUDGET_S"],
            image_url_prepend=v["CPA_IMAGE_URL_PREPEND"] or None,
        )
        gate = StoreGate(store, v["PROBE_INTERVAL_S"])
        server = service_server(
            reducer_pb2_grpc.add_ReducerServiceServicer_to_server,
            ReducerServicer(reducer, gate),
            reducer_pb2.DESCRIPTOR,
            "ReducerService",
            v,
        )
        await server.start()
        consumer = ReduceConsumer(
            reducer.reduce_run,
            v["AMQP_URL"],
            topology_from(v),
            v["REDUCER_ID"],
            gate=gate,
            on_serving=server.set_serving,
        )
        try:
            # SERVING only while the object store can be used (a missing
            # bucket is a setting to fix, never created here).
            await gate.check()
            await consumer.run(stop)
        finally:
            await server.stop()


if __name__ == "__main__":
    values = load(VARS)
    logs.configure(values["LOG_LEVEL"], "reducer")
    asyncio.run(main(values))
