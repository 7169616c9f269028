"""Exponential backoff with full jitter, for every retry and reconnect loop.

After an outage every worker, scheduler and reducer retries at once; with a
fixed or purely exponential schedule they keep doing so in lockstep. Full
jitter (each delay drawn uniformly between a floor and the exponential
ceiling) spreads them out while keeping the same average pace.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """The delays of one retry loop: the n-th (0-based) is drawn from
    [min_delay, min(max_delay, first_delay * 2**n)]."""

    first_delay: float = 0.2
    max_delay: float = 10.0
    min_delay: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_delay <= self.max_delay or self.first_delay <= 0:
            raise ValueError(
                f"backoff needs 0 <= min_delay <= max_delay and first_delay > 0, got "
                f"{self.min_delay}, {self.max_delay}, {self.first_delay}"
            )

    def ceiling(self, attempt: int) -> float:
        """The largest delay of the n-th retry."""
        exponent = min(max(attempt, 0), 64)  # 2**64 is past any max_delay
        return max(self.min_delay, min(self.max_delay, self.first_delay * 2.0**exponent))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The n-th retry's delay, drawn with full jitter."""
        draw = (rng or _RNG).uniform
        return draw(self.min_delay, self.ceiling(attempt))

    def schedule(self, rng: random.Random | None = None) -> BackoffSchedule:
        """A fresh sequence of delays for one loop."""
        return BackoffSchedule(self, rng or _RNG)


@dataclass
class BackoffSchedule:
    """The delays of one running loop: `next()` gives the next one."""

    backoff: Backoff
    rng: random.Random
    attempt: int = field(default=0)

    def next(self) -> float:
        value = self.backoff.delay(self.attempt, self.rng)
        self.attempt += 1
        return value

    def reset(self) -> None:
        self.attempt = 0


# One generator per process, seeded by the OS: two processes never share a schedule.
_RNG = random.SystemRandom()
