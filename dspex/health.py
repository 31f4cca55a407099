"""The state of a pool as an operator reads it: OK, STARTING, WARN, DEGRADED or DOWN.

Pure logic shared by ``dspexctl pools status`` (which adds supervisord's view of the processes)
and the broker's dashboard (which has only the broker's): both call :func:`pool_state` with the
numbers they have, so the two never disagree about the same facts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# a queue this full is close to refusing requests (pool_saturated at queue_max)
WARN_QUEUE_FILL = 0.8
# share of answered requests that failed; below WARN_MIN_REQUESTS the ratio says nothing yet
WARN_ERROR_RATE = 0.1
WARN_MIN_REQUESTS = 20
# a worker process supervisord reports RUNNING may still be importing dspy before it registers
REGISTER_GRACE_S = 60.0


class State(str, enum.Enum):
    """Pool and stack states, mildest first (``worst`` orders them)."""

    OK = "ok"
    STARTING = "starting"  # processes still coming up; nothing is wrong yet
    WARN = "warn"  # every worker is up, but a queue is nearly full or many requests fail
    DEGRADED = "degraded"  # fewer workers than the pool's size (some up), or a process not running
    DOWN = "down"  # no worker of the pool is ready
    UNREACHABLE = "unreachable"  # the broker or supervisord cannot be asked


_ORDER = [State.OK, State.STARTING, State.WARN, State.DEGRADED, State.DOWN, State.UNREACHABLE]


def worst(states: list[State]) -> State:
    return max(states, key=_ORDER.index, default=State.OK)


@dataclass(frozen=True)
class PoolFacts:
    """What is known of one pool. ``starting`` counts workers expected soon (their process is
    STARTING, or RUNNING unregistered for under REGISTER_GRACE_S); ``broken`` counts processes that
    are not coming back on their own (FATAL, BACKOFF, STOPPED, EXITED, or RUNNING unregistered too
    long)."""

    expected: int
    up: int  # registered and not draining
    queued: int = 0
    queue_max: int | None = None
    requests_ok: int = 0
    requests_error: int = 0
    starting: int = 0
    broken: int = 0


@dataclass(frozen=True)
class Verdict:
    state: State
    reasons: list[str] = field(default_factory=list)


def pool_state(name: str, f: PoolFacts) -> Verdict:
    """The pool's state and why (one reason per line an operator should read)."""
    reasons: list[str] = []
    if f.expected and f.up == 0:
        if f.starting and not f.broken:
            return Verdict(State.STARTING, [f"{name}: {f.starting} worker(s) starting"])
        return Verdict(State.DOWN, [f"{name} has no ready worker (0/{f.expected})"])
    if f.up + f.starting < f.expected or f.broken:
        reasons.append(f"{name} has {f.up}/{f.expected} workers ready")
        return Verdict(State.DEGRADED, reasons)
    if f.queue_max and f.queued >= WARN_QUEUE_FILL * f.queue_max:
        reasons.append(f"{name} queue is {f.queued}/{f.queue_max} full (pool_saturated at {f.queue_max})")
    answered = f.requests_ok + f.requests_error
    if answered >= WARN_MIN_REQUESTS and f.requests_error / answered >= WARN_ERROR_RATE:
        reasons.append(f"{name}: {f.requests_error} of {answered} requests failed "
                       f"({100 * f.requests_error / answered:.0f}%)")
    if reasons:
        return Verdict(State.WARN, reasons)
    if f.starting:
        return Verdict(State.STARTING, [f"{name}: {f.starting} worker(s) starting"])
    return Verdict(State.OK)
