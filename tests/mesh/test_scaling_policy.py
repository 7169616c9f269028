"""The autoscaler's policy (services/mesh/scaling.py): properties that hold for
any sequence of observations, and the plain cases."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.mesh.scaling import Observation, ScalePolicy, ScaleState, decide


@st.composite
def policies(draw: st.DrawFn) -> ScalePolicy:
    low = draw(st.integers(0, 4))
    high = draw(st.integers(max(1, low), 8))
    return ScalePolicy(
        low,
        high,
        draw(st.integers(1, 4)),
        draw(st.floats(0, 100, allow_nan=False)),
        draw(st.floats(0, 300, allow_nan=False)),
    )


# Steps: (seconds since the previous step, backlog, running).
steps = st.lists(
    st.tuples(st.floats(0, 60), st.integers(0, 200), st.integers(0, 40)), min_size=1, max_size=40
)


def run(policy: ScalePolicy, start: int, seq: list[tuple[float, int, int]]):  # type: ignore[no-untyped-def]
    """Feeds the observations, carrying each decision out; yields (now,
    observation, decision)."""
    state = ScaleState()
    now, replicas = 1000.0, start
    for dt, backlog, running in seq:
        now += dt
        obs = Observation(backlog, running, replicas)
        decision = decide(policy, obs, state, now)
        yield now, obs, decision
        replicas = decision.replicas


@settings(max_examples=300, deadline=None)
@given(policies(), st.integers(0, 12), steps)
def test_never_outside_min_max(policy: ScalePolicy, start: int, seq: list[tuple[float, int, int]]) -> None:
    for _, _, d in run(policy, start, seq):
        assert policy.min_replicas <= d.replicas <= policy.max_replicas


@settings(max_examples=300, deadline=None)
@given(policies(), st.integers(0, 12), steps)
def test_never_scales_down_while_the_backlog_exceeds_capacity(
    policy: ScalePolicy, start: int, seq: list[tuple[float, int, int]]
) -> None:
    for _, obs, d in run(policy, start, seq):
        if d.replicas < obs.replicas and obs.replicas <= policy.max_replicas:
            assert obs.demand <= d.replicas * policy.slots_per_worker, (obs, d)


@settings(max_examples=300, deadline=None)
@given(policies(), st.integers(0, 12), steps)
def test_respects_cool_downs(policy: ScalePolicy, start: int, seq: list[tuple[float, int, int]]) -> None:
    """Within [min, max], a scale-up comes at least up_cooldown after the
    previous one, and a scale-down at least down_cooldown after any scaling
    and after the demand first fitted into fewer workers."""
    last_up: float | None = None
    last_any: float | None = None
    fits_since: float | None = None
    for now, obs, d in run(policy, start, seq):
        inside = policy.min_replicas <= obs.replicas <= policy.max_replicas
        if policy.needed(obs.demand) < obs.replicas:
            fits_since = now if fits_since is None else fits_since
        else:
            fits_since = None
        if inside and d.replicas > obs.replicas and last_up is not None:
            assert now - last_up >= policy.up_cooldown_s
        if inside and d.replicas < obs.replicas:
            assert fits_since is not None and now - fits_since >= policy.down_cooldown_s
            if last_any is not None:
                assert now - last_any >= policy.down_cooldown_s
        if d.replicas > obs.replicas:
            last_up = now
        if d.replicas != obs.replicas:
            last_any = now
            if d.replicas < obs.replicas:
                fits_since = None


@settings(max_examples=200, deadline=None)
@given(policies(), st.integers(0, 300), st.integers(0, 40))
def test_settles_on_what_the_demand_needs(policy: ScalePolicy, backlog: int, running: int) -> None:
    """A steady demand, observed long enough, ends at exactly the workers it needs."""
    seq = [(policy.up_cooldown_s + policy.down_cooldown_s + 1, backlog, running)] * 4
    *_, (_, _, last) = run(policy, policy.min_replicas, seq)
    want = min(
        policy.max_replicas,
        max(policy.min_replicas, math.ceil((backlog + running) / policy.slots_per_worker)),
    )
    assert last.replicas == want


def test_a_plate_grows_the_workers_to_the_maximum_and_they_shrink_after_the_cool_down() -> None:
    policy = ScalePolicy(1, 3, 1, up_cooldown_s=5, down_cooldown_s=20)
    state = ScaleState()
    d = decide(policy, Observation(24, 0, 1), state, 0)
    assert d.replicas == 3 and d.changes
    # Draining: the demand fits into fewer workers, but only for 19 s.
    assert decide(policy, Observation(0, 1, 3), state, 10).replicas == 3
    assert decide(policy, Observation(0, 1, 3), state, 29).replicas == 3
    # A new site arrives: the quiet period starts again.
    assert decide(policy, Observation(2, 1, 3), state, 30).replicas == 3
    assert decide(policy, Observation(0, 0, 3), state, 31).replicas == 3
    assert decide(policy, Observation(0, 0, 3), state, 50).replicas == 3
    d = decide(policy, Observation(0, 0, 3), state, 51)
    assert d.replicas == 1 and "fit in 1" in d.reason


def test_up_cool_down_holds_a_second_scale_up() -> None:
    policy = ScalePolicy(1, 10, 2, up_cooldown_s=30, down_cooldown_s=60)
    state = ScaleState()
    assert decide(policy, Observation(4, 0, 1), state, 0).replicas == 2
    held = decide(policy, Observation(10, 4, 2), state, 10)
    assert held.replicas == 2 and "up cool-down" in held.reason
    assert decide(policy, Observation(10, 4, 2), state, 30).replicas == 7


def test_a_dead_worker_below_the_minimum_is_replaced_at_once() -> None:
    policy = ScalePolicy(2, 4, 1, up_cooldown_s=100, down_cooldown_s=100)
    state = ScaleState(last_up=0.0)
    assert decide(policy, Observation(0, 0, 1), state, 1).replicas == 2


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "at least the minimum"),
        ({"min_replicas": 0, "max_replicas": 0}, "at least 1"),
        ({"min_replicas": -1, "max_replicas": 2}, "0 or more"),
        ({"min_replicas": 1, "max_replicas": 2, "slots_per_worker": 0}, "slots per worker"),
        ({"min_replicas": 1, "max_replicas": 2, "up_cooldown_s": -1}, "cool-downs"),
    ],
)
def test_bad_settings_say_what_to_fix(kw: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScalePolicy(**kw)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    policies(),
    st.integers(0, 12),
    st.integers(0, 200),
    st.integers(0, 40),
    st.floats(0, 20, allow_nan=False),
    st.floats(0, 300, allow_nan=False),
)
def test_a_scale_up_is_held_only_when_the_backlog_drains_before_a_new_worker_starts(
    policy: ScalePolicy, replicas: int, backlog: int, running: int, throughput: float, start_s: float
) -> None:
    obs = Observation(backlog, running, replicas, throughput, start_s)
    d = decide(policy, obs, ScaleState(), 1000.0)
    assert policy.min_replicas <= d.replicas <= policy.max_replicas
    if policy.needed(obs.demand) > replicas >= policy.min_replicas and d.replicas == replicas:
        assert throughput > 0 and start_s > 0 and backlog / throughput < start_s, d


def test_a_short_backlog_at_a_high_throughput_starts_no_worker() -> None:
    policy = ScalePolicy(1, 3, 1, up_cooldown_s=0, down_cooldown_s=60)
    held = decide(policy, Observation(6, 2, 1, throughput=1.5, worker_start_s=20), ScaleState(), 0)
    assert held.replicas == 1 and "before a new worker would start (20 s)" in held.reason
    # The same backlog at a tenth of the throughput would wait 40 s: start them.
    assert (
        decide(policy, Observation(6, 2, 1, throughput=0.15, worker_start_s=20), ScaleState(), 0).replicas
        == 3
    )
    # Unknown throughput (nothing settled yet) or start time: start them.
    assert (
        decide(policy, Observation(6, 2, 1, throughput=0, worker_start_s=20), ScaleState(), 0).replicas == 3
    )
    assert (
        decide(policy, Observation(6, 2, 1, throughput=1.5, worker_start_s=0), ScaleState(), 0).replicas == 3
    )
