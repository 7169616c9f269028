"""How much a call may carry, and how often a user may call.

* **Request size per RPC.** Each RPC has a limit that fits what it carries
  (`REQUEST_LIMITS`; 1 MiB for every other): a pipeline with its inline
  attachments may be 40 MiB, a batch of 10,000 image registrations 16 MiB, a
  read a few bytes. A larger request is refused with RESOURCE_EXHAUSTED
  naming the RPC, its size and its limit. The server's own cap
  (`MAX_REQUEST_BYTES`, the largest limit) refuses anything bigger before it
  is read.
* **Calls per second per user.** The RPCs users call (those a viewer or a
  scientist may call: services/common/roles.py) are rate-limited per caller
  (the token's or certificate's name, or the peer's address with AUTH=off):
  a token bucket of `RATE_LIMIT_BURST` calls refilled at `RATE_LIMIT_PER_S`.
  The mesh's own services are never limited. Past it, RESOURCE_EXHAUSTED
  says when to retry. Each server (each catalog replica) counts its own calls.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from services.common import roles
from services.common.auth import admitted, current_caller

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_REQUEST_LIMIT = 1 * MIB
_CATALOG = roles.CATALOG
#: Full method name -> the largest request it takes, in bytes.
REQUEST_LIMITS: dict[str, int] = {
    # A .cppipe (4 MiB) and its inline attachments (32 MiB together).
    _CATALOG + "RegisterPipeline": 40 * MIB,
    # Up to 10,000 image registrations with their metadata.
    _CATALOG + "RegisterImages": 16 * MIB,
    # A layout of up to 1,536 wells, a plate map (4 MiB), a workflow of stages.
    _CATALOG + "CreatePlate": 8 * MIB,
    _CATALOG + "SetPlateMap": 8 * MIB,
    # A site's result files (SaveImages may write many) and provenance.
    _CATALOG + "CompleteSiteJob": 4 * MIB,
    # A report's files.
    _CATALOG + "RegisterPlateReport": 4 * MIB,
}
#: What the server reads at most (anything larger is refused unread).
MAX_REQUEST_BYTES = max(REQUEST_LIMITS.values())


def request_limit(method: str) -> int:
    return REQUEST_LIMITS.get(method, DEFAULT_REQUEST_LIMIT)


def user_facing(method: str) -> bool:
    """Whether users call `method` (a viewer or a scientist may)."""
    allowed = roles.allowed(method)
    return allowed is not None and bool(allowed & {"viewer", "scientist"})


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n:,} bytes"


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per caller: `burst` calls at once, `per_second` after.
    `per_second` 0 turns it off. Keeps at most `max_callers` buckets (the
    least recently used go)."""

    def __init__(
        self,
        per_second: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_callers: int = 10_000,
    ) -> None:
        self.per_second = per_second
        self.burst = max(1, burst)
        self._clock = clock
        self._max = max_callers
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, caller: str) -> float:
        """0 if `caller` may call now (one call taken), else the seconds until it may."""
        if self.per_second <= 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.pop(caller, None) or _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.per_second)
        bucket.at = now
        self._buckets[caller] = bucket
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.per_second


@dataclass(frozen=True)
class Limits:
    """A server's limits: the per-RPC request sizes always, and the per-user
    call rate (`rate_per_s` 0: none)."""

    rate_per_s: float = 0.0
    rate_burst: int = 1

    @classmethod
    def from_settings(cls, values: Mapping[str, Any]) -> Limits:
        return cls(float(values.get("RATE_LIMIT_PER_S", 0) or 0), int(values.get("RATE_LIMIT_BURST", 1) or 1))

    def interceptor(self) -> LimitsInterceptor:
        return LimitsInterceptor(RateLimiter(self.rate_per_s, self.rate_burst))


def _caller_key(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, bool]:
    """(who calls, whether it is one of the mesh's services)."""
    caller = current_caller()
    if caller is not None:
        return f"{caller.role} {caller.name}", caller.role in roles.SERVICE_ROLES
    peer = context.peer() or "unknown"
    # ipv4:10.0.0.5:51234 -> ipv4:10.0.0.5 (one bucket per machine, not per connection)
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer, False


class LimitsInterceptor(grpc.aio.ServerInterceptor):
    """Checks each call's request size, and users' call rate, before its handler runs."""

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith((roles.HEALTH_PREFIX, *roles.REFLECTION_PREFIXES)):
            return handler
        if handler.request_streaming:
            return handler  # none of the mesh's RPCs stream requests
        return _limited(handler, method, self._limiter)


def _limited(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, limiter: RateLimiter
) -> grpc.RpcMethodHandler[Any, Any]:
    limit = request_limit(method)
    rated = user_facing(method)
    name = method.rsplit("/", 1)[-1]

    async def admit(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        size = request.ByteSize()
        if size > limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this {name} request is {_size(size)}; {name} takes at most {_size(limit)}: "
                "send less in one call (fewer items per batch, big files through the object store)",
            )
        if rated:
            who, service = _caller_key(context)
            wait = 0.0 if service else limiter.take(who)
            if wait > 0:
                log.info("rate limit: %s on %s, retry in %.2f s", who, name, wait)
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many calls from {who}: at most {limiter.per_second:g} per second "
                    f"(bursts of {limiter.burst}); retry in {wait:.2f} s",
                )

    return admitted(handler, admit)
