"""Backoff with full jitter: every delay within its bounds, ceilings that
double up to the maximum, and schedules of two processes that differ."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys

import pytest

from services.common.backoff import Backoff
from services.common.retry import GaveUp, with_backoff

SEEDS = range(200)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_delay_is_within_its_bounds(seed: int) -> None:
    rng = random.Random(seed)
    first = rng.uniform(0.01, 5)
    maximum = first * rng.uniform(1, 100)
    minimum = rng.uniform(0, first)
    backoff = Backoff(first, maximum, minimum)
    schedule = backoff.schedule(rng)
    for n in range(rng.randrange(1, 80)):
        delay = schedule.next()
        assert minimum <= delay <= min(maximum, max(minimum, first * 2**n)) + 1e-9


def test_ceiling_doubles_up_to_the_maximum() -> None:
    backoff = Backoff(0.5, 15.0)
    assert [backoff.ceiling(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert backoff.ceiling(10_000) == 15.0


def test_delays_spread_over_the_whole_range() -> None:
    rng = random.Random(1)
    backoff = Backoff(1.0, 8.0)
    draws = [backoff.delay(3, rng) for _ in range(2000)]
    assert min(draws) < 0.5 and max(draws) > 7.5  # full jitter, not a narrow band
    assert 3.5 < sum(draws) / len(draws) < 4.5  # the mean is half the ceiling


def test_two_workers_schedules_differ() -> None:
    """Two processes started at the same moment draw different schedules
    (the generator is seeded by the OS, never by the time or the pid)."""
    code = (
        "from services.common.backoff import Backoff\n"
        "s = Backoff(0.5, 15.0).schedule()\n"
        "print(' '.join(f'{s.next():.6f}' for _ in range(8)))\n"
    )
    runs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0].split() for p in runs]
    assert all(len(o) == 8 for o in outputs)
    assert outputs[0] != outputs[1]
    # not merely shifted: most retries happen at different moments
    assert sum(a != b for a, b in zip(*outputs, strict=True)) >= 7


@pytest.mark.parametrize("bad", [(0.0, 1.0, 0.0), (1.0, 0.5, 0.9), (1.0, 2.0, -1.0)])
def test_bad_bounds_are_refused(bad: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(*bad)


async def test_with_backoff_keeps_to_its_budget() -> None:
    calls = 0

    async def failing() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(GaveUp, match="still failing"):
        await with_backoff(
            failing, "a call", transient=lambda e: True, first_delay=0.05, max_delay=0.2, give_up_after=1.0
        )
    took = loop.time() - started
    assert 0.9 <= took < 1.6
    assert calls >= 4
