"""Retrying calls to other services through transient outages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from services.common.backoff import Backoff

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


class GaveUp(RuntimeError):
    """Retries ran out (or the service is stopping) before the call succeeded."""


async def sleep_unless(stop: asyncio.Event | None, seconds: float) -> None:
    """Sleeps, returning early if `stop` is set."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def wait_first(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Returns when any of the events is set (or after `timeout`)."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in TRANSIENT_CODES


async def with_backoff(
    call: Callable[[], Awaitable[T]],
    what: str,
    *,
    transient: Callable[[BaseException], bool] = is_transient,
    first_delay: float = 0.2,
    max_delay: float = 10.0,
    give_up_after: float | None = None,
    stop: asyncio.Event | None = None,
) -> T:
    """Calls until it succeeds or fails with a non-transient error. Transient
    errors are retried with exponential backoff and full jitter
    (services/common/backoff.py), for at most `give_up_after` seconds
    (forever if None) or until `stop` is set; then GaveUp."""
    loop = asyncio.get_running_loop()
    deadline = None if give_up_after is None else loop.time() + give_up_after
    delays = Backoff(first_delay, max(first_delay, max_delay)).schedule()
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            if not transient(exc):
                raise
            attempt += 1
            delay = delays.next()
            if deadline is not None and loop.time() < deadline:
                delay = min(delay, deadline - loop.time())
            if (deadline is not None and loop.time() >= deadline) or (stop is not None and stop.is_set()):
                raise GaveUp(f"{what}: still failing after {attempt} tries: {exc}") from exc
            if attempt == 1 or attempt % 10 == 0:
                log.warning("%s failed (%s); retrying with backoff", what, _short(exc))
            await sleep_unless(stop, delay)


def _short(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
