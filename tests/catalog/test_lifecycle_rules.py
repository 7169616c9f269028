"""Properties of the job lifecycle's pure decisions (services/catalog/lifecycle.py),
over generated histories of failures."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from services.catalog import lifecycle
from services.catalog.domain import FailureClass, SiteState

CLASSES = [c for c in FailureClass if c != FailureClass.UNSPECIFIED]
T0 = datetime(2026, 1, 1, tzinfo=UTC)

policies = st.builds(
    lifecycle.Policy,
    max_attempts=st.integers(1, 6),
    retry_base_s=st.floats(0.01, 60),
    retry_max_s=st.floats(0.01, 600),
    transient_delay_s=st.floats(0.01, 30),
    transient_max_delay_s=st.floats(0.01, 120),
    transient_budget_s=st.floats(1, 3600),
)
# A history: each step is a failure class and the seconds since the last step,
# or None for "the deadline passed and the job was issued again".
steps = st.lists(st.one_of(st.none(), st.tuples(st.sampled_from(CLASSES), st.floats(0, 5000))), max_size=60)


@settings(max_examples=400, deadline=None)
@given(policy=policies, history=steps, seed=st.integers(0, 2**32))
def test_every_history_settles_and_never_charges_more_than_allowed(
    policy: lifecycle.Policy, history: list[tuple[FailureClass, float] | None], seed: int
) -> None:
    rng = random.Random(seed)
    counters = lifecycle.Counters(attempt=1, free_attempts=0, transient_since=None)
    now = T0
    state = SiteState.RUNNING
    for step in history:
        if state == SiteState.FAILED:
            break
        if step is None:
            # Issued again after a deadline: a new attempt, free while queued.
            counters = lifecycle.Counters(
                counters.attempt + 1,
                counters.free_attempts + int(lifecycle.reissue_is_free(SiteState.QUEUED)),
                counters.transient_since,
            )
            continue
        cls, gap = step
        now += timedelta(seconds=gap)
        decision = lifecycle.on_fail(counters, cls, "x", False, now, policy, rng)
        assert decision.state in (SiteState.READY, SiteState.FAILED)
        if decision.will_retry:
            assert decision.ready_at is not None and decision.ready_at > now
            # A retry is never later than the longest configured delay.
            longest = max(policy.retry_max_s, policy.transient_max_delay_s, policy.retry_base_s)
            assert (decision.ready_at - now).total_seconds() <= longest + 1e-6
        else:
            assert decision.ready_at is None
        # Charged attempts never pass max_attempts; a retried job has room left.
        charged = counters.attempt - decision.free_attempts
        assert charged <= policy.max_attempts or decision.failure_class == FailureClass.TRANSIENT
        if decision.failure_class in lifecycle.FINAL_CLASSES:
            assert decision.state == SiteState.FAILED
        if decision.failure_class == FailureClass.TRANSIENT:
            assert decision.will_retry and decision.transient_since is not None
            assert (now - decision.transient_since).total_seconds() < policy.transient_budget_s
        state = decision.state
        # The claim that issues the retry adds the next attempt.
        counters = lifecycle.Counters(counters.attempt + 1, decision.free_attempts, decision.transient_since)


@settings(max_examples=200, deadline=None)
@given(policy=policies, gaps=st.lists(st.floats(0.001, 50), min_size=1, max_size=500))
def test_transient_failures_end_within_their_budget(policy: lifecycle.Policy, gaps: list[float]) -> None:
    # A site that only ever fails transiently is charged (TIMEOUT) once its
    # failures have lasted longer than the budget: it cannot retry forever.
    counters = lifecycle.Counters(1, 0, None)
    now = T0
    first = T0 + timedelta(seconds=gaps[0])  # the budget runs from the first failure
    for gap in gaps:
        now += timedelta(seconds=gap)
        d = lifecycle.on_fail(counters, FailureClass.TRANSIENT, "x", False, now, policy)
        if d.failure_class != FailureClass.TRANSIENT:
            assert d.failure_class == FailureClass.TIMEOUT and "SITE_TRANSIENT_BUDGET_S" in d.reason
            assert (now - first).total_seconds() >= policy.transient_budget_s
            return
        counters = lifecycle.Counters(counters.attempt + 1, d.free_attempts, d.transient_since)
    assert (now - first).total_seconds() < policy.transient_budget_s


def test_retries_spread_out_instead_of_arriving_in_lockstep() -> None:
    delays = {round(lifecycle.jittered(5.0, 300.0, 3, random.Random(seed)), 3) for seed in range(100)}
    assert len(delays) > 90 and min(delays) >= 2.0 and max(delays) <= 20.0
