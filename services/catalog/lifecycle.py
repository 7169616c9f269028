"""The site job's lifecycle as pure decisions: deadlines, retries, budgets.

No database and no clock of its own: the store asks, with the job's counters
and `now`, and writes down what it is told. Every in-flight state has a
deadline, and a job whose deadline passed is issued again with a new attempt
(the attempt number fences the old one off):

    WAITING ──all channels in──▶ READY (ready_at = not before)
    READY ──ClaimReadySites──▶ CLAIMED   deadline: the claim lease
    CLAIMED ──MarkSitesQueued──▶ QUEUED  deadline: queue_deadline
    QUEUED ──StartSiteJob──▶ RUNNING     deadline: the worker's lease, renewed
    RUNNING ──CompleteSiteJob──▶ DONE
    RUNNING ──FailSiteJob──▶ READY (not before now + backoff) or FAILED
    CLAIMED/QUEUED/RUNNING past deadline ──ClaimReadySites──▶ CLAIMED (attempt + 1)

Retries are decided here, not by a worker publishing a message: a failed
attempt goes back to READY with a not-before time, so a retry can no more be
lost than any other ready job. Attempts are counted in two kinds: *charged*
ones (CellProfiler ran and failed, or its worker vanished mid-run) count
toward `max_attempts`; *free* ones (a transient failure, a task the broker
lost or a claim never queued) do not, and transient failures have a time
budget after which they are charged as TIMEOUT.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.catalog.domain import FailureClass, SiteState

FINAL_CLASSES = (FailureClass.INPUT_PROBLEM, FailureClass.BAD_TASK)


@dataclass(frozen=True)
class Policy:
    """The catalog's retry and deadline settings."""

    max_attempts: int = 3
    # Backoff of charged retries: base × 2^(n-1), capped, with full jitter.
    retry_base_s: float = 5.0
    retry_max_s: float = 300.0
    # Transient failures: retried after a jittered delay, free of charge, for
    # at most this long in a row; then the next one is charged as TIMEOUT.
    transient_delay_s: float = 5.0
    transient_max_delay_s: float = 60.0
    transient_budget_s: float = 900.0
    # A task on the broker: if no worker starts it within this time, it is
    # presumed lost and issued again.
    queue_deadline_s: float = 1800.0
    # A started job whose worker gave no lease: it must renew within this.
    start_lease_s: float = 600.0
    # A reduce on the broker or in a reducer: if no report is registered
    # within this, it is issued again; after max_attempts it fails.
    reduce_deadline_s: float = 1800.0


@dataclass(frozen=True)
class Counters:
    """What a decision needs to know about a job."""

    attempt: int
    free_attempts: int
    transient_since: datetime | None

    @property
    def charged(self) -> int:
        """Attempts that count toward `max_attempts`."""
        return self.attempt - self.free_attempts


@dataclass(frozen=True)
class FailDecision:
    """What becomes of a job whose current attempt failed."""

    state: SiteState  # READY (retried) or FAILED
    ready_at: datetime | None
    failure_class: FailureClass  # the class recorded (TRANSIENT may become TIMEOUT)
    reason: str
    free_attempts: int
    transient_since: datetime | None

    @property
    def will_retry(self) -> bool:
        return self.state == SiteState.READY


def jittered(base: float, cap: float, n: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base·2^(n-1))],
    never below a tenth of the step, so retries after an outage spread out
    instead of arriving in lockstep."""
    step = min(cap, base * 2.0 ** min(max(0, n - 1), 60))
    r = float((rng or random).random())
    return step * (0.1 + 0.9 * r)


def on_fail(
    job: Counters,
    failure_class: FailureClass,
    reason: str,
    final: bool,
    now: datetime,
    policy: Policy,
    rng: random.Random | None = None,
) -> FailDecision:
    """Decides what a failed attempt leads to."""
    if failure_class == FailureClass.TRANSIENT and not final:
        since = job.transient_since or now
        spent = (now - since).total_seconds()
        if spent < policy.transient_budget_s:
            streak = max(1, int(spent // max(policy.transient_delay_s, 0.001)) + 1)
            delay = jittered(policy.transient_delay_s, policy.transient_max_delay_s, streak, rng)
            return FailDecision(
                SiteState.READY,
                now + timedelta(seconds=delay),
                FailureClass.TRANSIENT,
                reason,
                job.free_attempts + 1,  # the claim that retries it adds an attempt
                since,
            )
        failure_class = FailureClass.TIMEOUT
        reason = (
            f"transient failures for {spent:.0f} s, past the {policy.transient_budget_s:.0f} s "
            f"budget (SITE_TRANSIENT_BUDGET_S); the last one: {reason}"
        )
    give_up = final or failure_class in FINAL_CLASSES or job.charged >= policy.max_attempts
    if give_up:
        return FailDecision(SiteState.FAILED, None, failure_class, reason, job.free_attempts, None)
    delay = jittered(policy.retry_base_s, policy.retry_max_s, job.charged, rng)
    return FailDecision(
        SiteState.READY,
        now + timedelta(seconds=delay),
        failure_class,
        reason,
        job.free_attempts,
        None,
    )


def reissue_is_free(state: SiteState) -> bool:
    """Whether issuing a job again after its deadline passed is free of charge:
    a claim never queued or a task never started did not run CellProfiler; a
    running attempt whose worker vanished did (it may be the site that kills it)."""
    return state in (SiteState.CLAIMED, SiteState.QUEUED)


def queued_deadline(now: datetime, policy: Policy) -> datetime:
    return now + timedelta(seconds=policy.queue_deadline_s)


def start_deadline(now: datetime, lease_seconds: int, policy: Policy) -> datetime:
    """A started job's deadline: the worker's own lease when it gives one,
    else the catalog's default; renewals move it on."""
    return now + timedelta(seconds=lease_seconds or policy.start_lease_s)
