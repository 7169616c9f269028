"""The scheduler's status RPC."""

from __future__ import annotations

from typing import Any

import grpc
from cellmesh.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from google.protobuf import timestamp_pb2

from services.scheduler.loop import Scheduler


class SchedulerStatusServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    async def GetSchedulerStatus(
        self, request: scheduler_pb2.GetSchedulerStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> scheduler_pb2.GetSchedulerStatusResponse:
        s = self._scheduler.stats
        last = timestamp_pb2.Timestamp()
        if s.last_poll_at:
            last.FromNanoseconds(int(s.last_poll_at * 1e9))
        lags = list(s.dispatch_lags)
        return scheduler_pb2.GetSchedulerStatusResponse(
            scheduler_id=self._scheduler.scheduler_id,
            sites_claimed=s.sites_claimed,
            sites_published=s.sites_published,
            reduces_published=s.reduces_published,
            publish_failures=s.publish_failures,
            last_poll_at=last,
            mean_dispatch_lag_seconds=sum(lags) / len(lags) if lags else 0.0,
            site_queue_depth=s.site_queue_depth,
            broker_connected=s.broker_connected,
        )
