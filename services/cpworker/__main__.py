"""`python -m services.cpworker`: reads settings, wires, runs until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from cellmesh.catalog.v1 import catalog_pb2_grpc
from cellmesh.worker.v1 import worker_pb2, worker_pb2_grpc

from services.common import channels, logs
from services.common.amqp import AMQP_VARS, topology_from
from services.common.s3 import ObjectStore
from services.common.server import service_server, stop_event_on_signals
from services.common.settings import (
    COMMON_VARS,
    S3_VARS,
    S3Settings,
    Var,
    load,
    port,
    positive_float,
    positive_int,
)
from services.cpworker.consumer import SiteConsumer
from services.cpworker.runner import ChildNetwork, ColdRunner, WarmRunner, judge_outputs
from services.cpworker.service import WorkerStatusServicer
from services.cpworker.site import PipelineCache, SiteProcessor, SiteRunner

log = logging.getLogger("services.cpworker")


def _mode(raw: str) -> str:
    if raw not in ("warm", "cold"):
        raise ValueError("warm (a long-lived CellProfiler per slot) or cold (one process per site)")
    return raw


def _child_network(raw: str) -> str:
    try:
        return ChildNetwork(raw).value
    except ValueError:
        raise ValueError("none, auto or host") from None


def _work_dir(raw: str) -> str:
    hidden = [part for part in Path(raw).expanduser().absolute().parts if part.startswith(".")]
    if hidden:
        raise ValueError(
            f"its folder {hidden[0]!r} starts with '.': CellProfiler's default Images filter"
            " ('directory doesnot containregexp [\\/]\\.') would then leave out every image of every"
            " site; choose a folder with no hidden part"
        )
    return raw


VARS = (
    *COMMON_VARS,
    *AMQP_VARS,
    *S3_VARS,
    Var("GRPC_PORT", "50053", port),
    Var("CATALOG_ADDR", "127.0.0.1:50051", help="host:port of the catalog"),
    Var("CP_PYTHON", help="python of CellProfiler's environment (scripts/install_cellprofiler.sh prints it)"),
    Var("CP_MODE", "warm", _mode),
    Var("CP_SLOTS", "1", positive_int, "CellProfiler processes in this worker"),
    Var("CP_RECYCLE_AFTER", "200", positive_int, "sites before a warm CellProfiler is replaced"),
    Var(
        "CP_CHILD_NETWORK",
        "auto",
        _child_network,
        "CellProfiler's network: none (a namespace of its own, or the worker does not start), "
        "auto (none where the platform allows it), host (the worker's)",
    ),
    Var("SITE_TIMEOUT_S", "600", positive_float, "time limit of one site"),
    Var(
        "STAGE_TIMEOUT_S", "21600", positive_float, "time limit of one plate-scope stage (all sites at once)"
    ),
    Var("TRANSIENT_BUDGET_S", "120", positive_float, "how long object store outages are retried in place"),
    Var(
        "ACK_EARLY_AFTER_S",
        "1200",
        positive_float,
        "a site running longer takes a lease in the catalog and acks its task; keep below the broker's consumer timeout",
    ),
    Var("SITE_LEASE_S", "120", positive_int, "lease of a long site, renewed every third of it"),
    Var(
        "PROBE_INTERVAL_S",
        "15",
        positive_float,
        "how often a worker whose object store cannot be used probes it",
    ),
    Var(
        "WORK_DIR",
        str(Path(tempfile.gettempdir()) / "cellmesh-worker"),
        _work_dir,
        "the worker's folder for pipelines, images and results (no hidden part in its path)",
    ),
    Var("WORKER_ID", f"{socket.gethostname()}-{os.getpid()}"),
)


def make_runners(v: dict[str, Any]) -> list[SiteRunner]:
    runners: list[SiteRunner] = []
    for _ in range(v["CP_SLOTS"]):
        if v["CP_MODE"] == "warm":
            runners.append(
                WarmRunner(v["CP_PYTHON"], recycle_after=v["CP_RECYCLE_AFTER"], network=v["CP_CHILD_NETWORK"])
            )
        else:
            runners.append(ColdRunner(v["CP_PYTHON"], network=v["CP_CHILD_NETWORK"]))
    return runners


async def main(v: dict[str, Any]) -> None:
    stop = stop_event_on_signals()
    work = Path(v["WORK_DIR"])
    runners = make_runners(v)
    async with (
        channels.service_channel(v["CATALOG_ADDR"], v) as channel,
        ObjectStore(S3Settings.from_env()) as store,
    ):
        consumer = SiteConsumer(
            catalog_pb2_grpc.CatalogServiceStub(channel),
            SiteProcessor(
                store,
                PipelineCache(store, work / "pipelines"),
                judge_outputs,
                v["WORKER_ID"],
                work / "sites",
                v["SITE_TIMEOUT_S"],
                v["TRANSIENT_BUDGET_S"],
                stage_timeout=v["STAGE_TIMEOUT_S"],
            ),
            runners,
            v["AMQP_URL"],
            topology_from(v),
            v["WORKER_ID"],
            ack_early_after=v["ACK_EARLY_AFTER_S"],
            lease_seconds=v["SITE_LEASE_S"],
            probe_interval=v["PROBE_INTERVAL_S"],
        )
        servicer = WorkerStatusServicer(consumer, v["CP_MODE"], "")
        server = service_server(
            worker_pb2_grpc.add_WorkerServiceServicer_to_server,
            servicer,
            worker_pb2.DESCRIPTOR,
            "WorkerService",
            v,
        )
        await server.start()
        try:
            # Serving only once CellProfiler is up (warm: the JVM has started).
            versions = [await r.start() for r in runners]
            servicer.cp_version = versions[0] if versions else ""
            log.info(
                "CellProfiler %s ready in %s mode, %d slot(s)",
                servicer.cp_version,
                v["CP_MODE"],
                len(runners),
            )
            # SERVING only while the object store can be used (the consumer
            # says so, and probes it when it cannot).
            consumer.on_serving(server.set_serving)
            await consumer.check_store()
            await consumer.run(stop, v["SITE_TIMEOUT_S"])
        finally:
            await server.stop()
            for r in runners:
                await r.close()


if __name__ == "__main__":
    values = load(VARS)
    logs.configure(values["LOG_LEVEL"], "cpworker")
    asyncio.run(main(values))
