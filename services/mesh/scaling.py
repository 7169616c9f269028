"""How many CellProfiler workers the mesh should run: a pure policy, no I/O.

Demand is the sites that need a CellProfiler slot now or soon: the catalog's
READY/CLAIMED and QUEUED sites (the backlog; the broker holds only a bounded
part of it, the rest waits READY in the catalog) plus the RUNNING ones. The
policy asks for enough workers to give every such site a slot, within
[min, max]:

- **up** at once to what the demand needs, but not sooner than
  `up_cooldown_s` after the last scale-up (a new warm worker needs a while to
  start CellProfiler; asking again before it answers would overshoot), and
  not when the workers there are would finish the backlog before a new one
  could start: at the throughput of the last minute, backlog / throughput
  shorter than the time a worker takes to start (a new worker would only
  cost memory and CPU the running ones need);
- **down** only once the demand has fitted into fewer workers for a whole
  `down_cooldown_s` without a break (hysteresis: a plate whose images are
  still arriving does not make workers come and go), and never sooner than
  `down_cooldown_s` after the last scale in either direction; then straight
  to what the demand needs, so never below the capacity the demand needs;
- outside [min, max] (a worker died, the settings changed) back inside at
  once, cool-downs or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScalePolicy:
    """The settings: AUTOSCALE_MIN, AUTOSCALE_MAX, AUTOSCALE_UP_COOLDOWN_S,
    AUTOSCALE_DOWN_COOLDOWN_S, and the CellProfiler slots of one worker
    (CP_SLOTS)."""

    min_replicas: int
    max_replicas: int
    slots_per_worker: int = 1
    up_cooldown_s: float = 15.0
    down_cooldown_s: float = 60.0

    def __post_init__(self) -> None:
        problems = []
        if self.min_replicas < 0:
            problems.append(f"the minimum ({self.min_replicas}) must be 0 or more")
        if self.max_replicas < max(1, self.min_replicas):
            problems.append(
                f"the maximum ({self.max_replicas}) must be at least 1 and at least the minimum ({self.min_replicas})"
            )
        if self.slots_per_worker < 1:
            problems.append(f"slots per worker ({self.slots_per_worker}) must be 1 or more")
        if self.up_cooldown_s < 0 or self.down_cooldown_s < 0:
            problems.append("cool-downs must be 0 s or more")
        if problems:
            raise ValueError("; ".join(problems))

    def needed(self, demand: int) -> int:
        """Workers that give every site of `demand` a slot, within [min, max]."""
        return min(
            self.max_replicas, max(self.min_replicas, math.ceil(max(0, demand) / self.slots_per_worker))
        )


@dataclass(frozen=True)
class Observation:
    """What the autoscaler sees at one moment."""

    backlog: int  # sites READY, CLAIMED or QUEUED: waiting for a slot
    in_flight: int  # sites RUNNING
    replicas: int  # workers running and taking sites (draining ones not counted)
    throughput: float = 0.0  # sites settled per second lately (0: unknown)
    worker_start_s: float = 0.0  # seconds a new worker takes to take sites (0: unknown)

    def drains_before_a_new_worker(self) -> bool:
        """True when the backlog is gone, at the current throughput, before a
        worker started now could take a site."""
        if self.throughput <= 0 or self.worker_start_s <= 0:
            return False
        return self.backlog / self.throughput < self.worker_start_s

    @property
    def demand(self) -> int:
        return max(0, self.backlog) + max(0, self.in_flight)


@dataclass
class ScaleState:
    """What the policy remembers between decisions (monotonic seconds)."""

    last_up: float | None = None
    last_down: float | None = None
    fits_fewer_since: float | None = None  # since when demand fits in fewer workers


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    observation: Observation = field(compare=False)

    @property
    def changes(self) -> bool:
        return self.replicas != self.observation.replicas


def _since(then: float | None, now: float) -> float:
    return math.inf if then is None else now - then


def decide(policy: ScalePolicy, obs: Observation, state: ScaleState, now: float) -> Decision:
    """The replicas wanted now; updates `state` as if the decision is carried out."""
    current = obs.replicas
    needed = policy.needed(obs.demand)
    if needed >= current:
        state.fits_fewer_since = None
    elif state.fits_fewer_since is None:
        state.fits_fewer_since = now

    if current < policy.min_replicas or current > policy.max_replicas:
        target = min(policy.max_replicas, max(policy.min_replicas, current))
        if target > current:
            state.last_up = now
        else:
            state.last_down = now
        state.fits_fewer_since = None
        return Decision(target, f"outside [{policy.min_replicas}, {policy.max_replicas}]", obs)

    if needed > current:
        waited = _since(state.last_up, now)
        if waited < policy.up_cooldown_s:
            return Decision(
                current,
                f"{obs.demand} site(s) want {needed} worker(s); up cool-down, {policy.up_cooldown_s - waited:.0f} s left",
                obs,
            )
        if obs.drains_before_a_new_worker():
            return Decision(
                current,
                f"{obs.demand} site(s) want {needed} worker(s), but {obs.backlog} waiting drain in "
                f"{obs.backlog / obs.throughput:.0f} s at {obs.throughput:.2f} site(s)/s, before a new worker "
                f"would start ({obs.worker_start_s:.0f} s)",
                obs,
            )
        state.last_up = now
        return Decision(needed, f"{obs.demand} site(s) want {needed} worker(s)", obs)

    if needed < current:
        assert state.fits_fewer_since is not None
        quiet = min(
            _since(state.fits_fewer_since, now), _since(state.last_up, now), _since(state.last_down, now)
        )
        if quiet < policy.down_cooldown_s:
            return Decision(
                current,
                f"{obs.demand} site(s) fit in {needed} worker(s); down cool-down, {policy.down_cooldown_s - quiet:.0f} s left",
                obs,
            )
        state.last_down = now
        state.fits_fewer_since = None
        return Decision(needed, f"{obs.demand} site(s) fit in {needed} worker(s)", obs)

    return Decision(current, f"{obs.demand} site(s) for {current} worker(s)", obs)
