"""The worker's status RPC: what it is running now and what it has done."""

from __future__ import annotations

from typing import Any

import grpc
from cellmesh.worker.v1 import worker_pb2, worker_pb2_grpc
from google.protobuf import timestamp_pb2

from services.cpworker.consumer import SiteConsumer


class WorkerStatusServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, consumer: SiteConsumer, mode: str, cp_version: str) -> None:
        self._consumer = consumer
        self._mode = mode
        self.cp_version = cp_version

    async def GetWorkerStatus(
        self, request: worker_pb2.GetWorkerStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> worker_pb2.GetWorkerStatusResponse:
        c = self._consumer
        active = []
        for phase in list(c.active.values()):
            started = timestamp_pb2.Timestamp()
            started.FromNanoseconds(int(phase.started_at * 1e9))
            active.append(
                worker_pb2.ActiveSite(
                    site_job_id=phase.claim.site_job_id,
                    attempt=phase.claim.attempt,
                    site=phase.claim.site,
                    phase=phase.name,
                    started_at=started,
                )
            )
        return worker_pb2.GetWorkerStatusResponse(
            worker_id=c.worker_id,
            mode=self._mode,
            slots=c.slots,
            active=active,
            sites_done=c.stats.sites_done,
            sites_failed=c.stats.sites_failed,
            duplicates_skipped=c.stats.duplicates_skipped,
            cellprofiler_version=self.cp_version,
            draining=c.draining,
            not_serving_reason=c.store_problem,
        )
