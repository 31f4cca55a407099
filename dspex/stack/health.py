"""The state of a pool as an operator reads it: OK, STARTING, WARN, DEGRADED or DOWN.

Pure logic shared by ``dspexctl pools status`` and the broker's dashboard: both turn supervisord's
processes into counts with :func:`process_counts` and call :func:`pool_state` with the numbers
they have, so the two never disagree about the same facts.

Health means trouble: WARN counts only the service's own failures (``SERVICE_FAILURES``) in a
sliding window (a pool's ``health_window``, default 300 s), so it clears by itself once the window
holds none. A user's exception (``remote_error``), a cancel or a usage error is the caller's, and an
answer to a session whose worker an operator recycled or stopped is the operator's: both are
counted and shown, never WARN (:func:`failure_kind`).
"""

from __future__ import annotations

import enum
import socket
import time
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# a queue this full is close to refusing requests (pool_saturated at queue_max)
WARN_QUEUE_FILL = 0.8
# a request that waited this part of its queue timeout is close to failing with queue_timeout
WARN_QUEUE_WAIT = 0.5
# a worker process supervisord reports RUNNING may still be importing dspy before it registers
REGISTER_GRACE_S = 60.0
# the default sliding window of a pool's health, in seconds (the pool setting ``health_window``)
HEALTH_WINDOW_S = 300.0

SERVICE, USER, RECYCLE = "service", "user", "recycle"
# failures that are the service's: a worker crash (the event itself, "crash"), a call lost in one,
# a call that waited past its queue timeout or was refused because the queue (or the broker's
# session table) was full, a call the worker stopped at its deadline, an internal error
# a durable session turned plain because the broker's checkpoint store refused its write (full,
# past its total cap, a disk error): its own size past the per-session cap is the caller's
CHECKPOINT_REFUSED = "checkpoint_refused"
SERVICE_FAILURES = frozenset({"crash", "worker_crashed", "queue_timeout", "pool_saturated", "session_quota",
                              "timeout", "internal_error", CHECKPOINT_REFUSED})
# an answer to a session whose pinned worker left: the operator's when it was recycled or stopped
WORKER_GONE = "session_worker_unavailable"
# what each code is called in a reason line
LABELS = {"crash": "worker crash", "worker_crashed": "call lost in a crash", "queue_timeout": "queue timeout",
          "pool_saturated": "refused (queue full)", "session_quota": "refused (session limit)",
          "timeout": "call stopped at its deadline", "internal_error": "internal error",
          WORKER_GONE: "session whose worker crashed", CHECKPOINT_REFUSED: "checkpoint not kept"}


def failure_kind(code: str, worker_left_cleanly: bool = True) -> str:
    """``service``, ``user`` or ``recycle`` for a failed answer's error code. A session whose
    worker left is the operator's (``recycle``) unless that worker crashed."""
    if code == WORKER_GONE:
        return RECYCLE if worker_left_cleanly else SERVICE
    return SERVICE if code in SERVICE_FAILURES else USER


class State(str, enum.Enum):
    """Pool and stack states, mildest first (``worst`` orders them)."""

    OK = "ok"
    STARTING = "starting"  # processes still coming up; nothing is wrong yet
    WARN = "warn"  # every worker is up, but a queue is nearly full or the service failed lately
    DEGRADED = "degraded"  # fewer workers than the pool's size (some up), or a process not running
    DOWN = "down"  # no worker of the pool is ready
    UNREACHABLE = "unreachable"  # the broker or supervisord cannot be asked


_ORDER = [State.OK, State.STARTING, State.WARN, State.DEGRADED, State.DOWN, State.UNREACHABLE]


def worst(states: list[State]) -> State:
    return max(states, key=_ORDER.index, default=State.OK)


def fmt_window(seconds: float) -> str:
    """300 -> "5m", 90 -> "1m30s", 10 -> "10s"."""
    s = round(seconds)
    m, s = divmod(s, 60)
    return (f"{m}m" if m else "") + (f"{s}s" if s or not m else "")


def last_failure(name: str, last: Mapping[str, Any] | None, kind: str = USER) -> str:
    """A pool's newest failed answer of ``kind`` in its health window (the broker's status's
    ``last_failures``) with its cause: "triage_pool: last USER failure 3s ago: LMRateLimitError:
    ..."; "" when there is none. The counts say how often callers fail; this says why (an LM
    provider refusing every call is the callers' error, never WARN, but the operator's business)."""
    f = (last or {}).get(kind)
    if not f:
        return ""
    return (f"{name}: last {kind.upper()} failure {fmt_window(float(f.get('ago_s') or 0))} ago: "
            f"{f.get('cause') or f.get('code')}")


# -- supervisord's processes ---------------------------------------------------------------------
# why the broker drops a worker whose heartbeats stopped (its event's ``why``)
SILENT = "stopped answering heartbeats"


def silent_pids(events: Iterable[Mapping[str, Any]]) -> dict[int, float]:
    """Pids whose last event in the broker's ``events`` is being dropped for silence, with when.
    Such a process that supervisord still reports RUNNING is wedged (in a call that holds the
    GIL, say), not starting."""
    last: dict[int, Mapping[str, Any]] = {}
    for e in sorted(events, key=lambda e: float(e.get("time") or 0)):
        if e.get("pid"):
            last[int(e["pid"])] = e
    return {pid: float(e["time"]) for pid, e in last.items() if e.get("event") == "crash" and e.get("why") == SILENT}


# -- how a crashed worker ended -------------------------------------------------------------------
# a SIGKILL nobody in dspex sent (dspexctl's own kills are named: Supervisor.kill): the kernel's OOM
# killer is the usual sender in production
_HINTS = {"terminated by SIGKILL": "out of memory? the kernel's OOM killer sends SIGKILL: see dmesg"}


def with_exits(events: Iterable[Mapping[str, Any]], causes: Mapping[int, str],
               here: str | None = None) -> list[dict[str, Any]]:
    """The broker's ``events`` with ``exit`` (how the process ended, from supervisord's
    :meth:`~dspex.stack.supervisor.Supervisor.exit_causes`) on each crash of this host's workers
    whose end supervisord saw. The broker only sees the connection drop; the parent saw the signal."""
    return [{**e, "exit": causes[int(e["pid"])]}
            if e.get("event") == "crash" and e.get("pid") and int(e["pid"]) in causes and is_here(e, here)
            else dict(e) for e in events]


def last_crash(events: Iterable[Mapping[str, Any]], pool: str, now: float | None = None) -> str:
    """The newest crash of a pool's worker in words, with how it ended when known: "worker
    3f2a9c1e (pid 4250) 12s ago: terminated by SIGSEGV"; "" when the events hold none."""
    crashes = [e for e in events if e.get("event") == "crash" and e.get("pool") == pool]
    if not crashes:
        return ""
    e = max(crashes, key=lambda e: float(e.get("time") or 0))
    ago = fmt_window(max(0.0, (time.time() if now is None else now) - float(e.get("time") or 0)))
    why, end = str(e.get("why") or ""), str(e.get("exit") or "")
    # a wedged worker that was then killed: both, in their order
    how = f"{why}, then {end}" if why == SILENT and end else end or why
    hint = f" ({_HINTS[end]})" if end in _HINTS else ""
    who = f"worker {str(e.get('worker') or '?')[:8]} (pid {e.get('pid')})"
    return f"{who} {ago} ago" + (f": {how}{hint}" if how else "")


# -- workers of this host and of others -----------------------------------------------------------
def is_here(worker: Mapping[str, Any], here: str | None = None) -> bool:
    """A worker of this host (whose supervisord the caller joins), by the host name its READY gave;
    supervisord's pids mean nothing for a worker of another host."""
    host = worker.get("host")
    return not host or host == (here or socket.gethostname())


def local_pids(workers: Iterable[Mapping[str, Any]], here: str | None = None) -> set[int]:
    return {int(w["pid"]) for w in workers if w.get("pid") and is_here(w, here)}


@dataclass(frozen=True)
class Lost:
    """Workers of a pool on another host that left (for one cause) and were not replaced."""

    host: str
    why: str
    count: int
    ago_s: float

    def __str__(self) -> str:
        return f"host {self.host}: {self.count} {self.why} {fmt_window(self.ago_s)} ago"


def lost_elsewhere(events: Iterable[Mapping[str, Any]], pool: str, here: str | None = None,
                   now: float | None = None, limit: int | None = None) -> list[Lost]:
    """A pool's workers on other hosts that left (crashed, went silent, stopped) and were not
    replaced, by host and cause, from the broker's ``events`` (the newest ``limit`` of them): each
    ``start`` of a host's worker counts as the replacement of that host's oldest loss."""
    here = here or socket.gethostname()
    lost: dict[str, list[tuple[float, str]]] = {}
    for e in sorted(events, key=lambda e: float(e.get("time") or 0)):
        host = str(e.get("host") or "")
        if e.get("pool") != pool or not host or host == here:
            continue
        if e.get("event") == "start":
            if lost.get(host):
                lost[host].pop(0)
        elif e.get("event") in ("crash", "exit"):
            lost.setdefault(host, []).append((float(e.get("time") or 0), str(e.get("why") or "left")))
    now = time.time() if now is None else now
    newest = sorted(((at, host, why) for host, gone in lost.items() for at, why in gone), reverse=True)[:limit]
    by_cause: dict[tuple[str, str], list[float]] = {}
    for at, host, why in sorted(newest, key=lambda x: (x[1], x[0])):
        by_cause.setdefault((host, why), []).append(at)
    return [Lost(host, why, len(ats), max(0.0, now - max(ats))) for (host, why), ats in by_cause.items()]


def other_hosts(pool: Mapping[str, Any], name: str, group_pids: Container[int], local: int,
                events: Iterable[Mapping[str, Any]], young: bool, here: str | None = None,
                now: float | None = None) -> tuple[int, int, list[Lost]]:
    """A pool's workers beyond the ``local`` processes of this host's supervisord (``group_pids``):
    (expected workers in all, those of other hosts counted as starting, those lost there). While the
    broker is ``young`` the workers of other hosts it has not heard from yet are starting, unless
    the events say they were lost."""
    expected = max(int(pool.get("size") or 0), local)  # size counts every host's workers
    up_there = sum(1 for w in pool.get("workers") or [] if w.get("state") in ("ready", "busy")
                   and not (is_here(w, here) and w.get("pid") in group_pids))
    missing = max(0, expected - local - up_there)
    lost = lost_elsewhere(events, name, here, now, limit=missing) if missing else []
    starting = max(0, missing - sum(x.count for x in lost)) if young else 0
    return expected, starting, lost


def gave_up(name: str, state: str, tail: str) -> str:
    """A process supervisord does not run (FATAL, BACKOFF, ...) with the last line of its log,
    usually its cause: "triage_pool:triage_pool_00 is FATAL (last log line: ImportError: ...)"."""
    return f"{name} is {state}" + (f" (last log line: {tail})" if tail else "")


def store_filling(checkpoints: Mapping[str, Any]) -> str | None:
    """The broker's checkpoint store at ``WARN_QUEUE_FILL`` of its total cap or more (its status's
    ``checkpoints``), in words: past the cap every durable session's next checkpoint is refused."""
    held, cap = int(checkpoints.get("bytes") or 0), int(checkpoints.get("total_cap") or 0)
    if not cap or held < WARN_QUEUE_FILL * cap:
        return None
    return (f"the checkpoint store holds {fmt_size(held)} of its {fmt_size(cap)} total cap ({held / cap:.0%}): past it, every "
            "durable session's next checkpoint is refused (raise --checkpoint-total-cap, or close durable sessions)")


def fmt_size(n: int) -> str:
    """Bytes as the checkpoint store's messages say them: 4.5 KB, 64.0 MB."""
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def restart_loop(name: str, exits: int, how: str, tail: str) -> str:
    """A process supervisord restarts in a loop, with how it last ended and its last log line."""
    return (f"{name} restarts in a loop: supervisord restarted it {exits} times in the last "
            f"{fmt_window(REGISTER_GRACE_S)} (last exit: {how})" + (f"; its last log line: {tail}" if tail else ""))


def proc_uptime(proc: Mapping[str, Any]) -> float:
    return float(max(0, proc["now"] - proc["start"])) if proc["statename"] == "RUNNING" else 0.0


def proc_phase(proc: Mapping[str, Any], registered: set[int], silent: Container[int] = (),
               looping: Container[str] = ()) -> str:
    """``registered`` (the broker lists its pid), ``starting`` (supervisord says STARTING, or
    RUNNING for under REGISTER_GRACE_S while it imports dspy) or ``broken`` (anything else, and a
    RUNNING process the broker dropped for ``silent``, and a process of a restart loop: ``looping``
    full names, :meth:`dspex.stack.supervisor.Supervisor.restart_loops`)."""
    state = proc["statename"]
    if state in ("RUNNING", "STARTING") and proc["pid"] in registered:
        return "registered"
    if state == "RUNNING" and proc["pid"] in silent:
        return "broken"
    if f"{proc['group']}:{proc['name']}" in looping:  # a new process of a restart loop: not coming up
        return "broken"
    if state == "STARTING" or (state == "RUNNING" and proc_uptime(proc) < REGISTER_GRACE_S):
        return "starting"
    return "broken"


# -- the rule ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolFacts:
    """What is known of one pool. ``starting`` counts workers expected soon (their process is
    STARTING, or RUNNING unregistered for under REGISTER_GRACE_S); ``broken`` counts processes that
    are not coming back on their own (FATAL, BACKOFF, STOPPED, EXITED, or RUNNING unregistered too
    long). ``failures``: the service's failures of the last ``window_s`` seconds by code."""

    expected: int
    up: int  # registered and not draining
    queued: int = 0
    queue_max: int | None = None
    starting: int = 0
    broken: int = 0
    failures: Mapping[str, int] = field(default_factory=dict)
    window_s: float = HEALTH_WINDOW_S
    here: int | None = None  # of ``expected``, the processes of this host's supervisord (None: not known)
    lost: tuple[Lost, ...] = ()  # missing workers of other hosts, by host and cause (lost_elsewhere)
    last_crash: str = ""  # the newest crash of the pool's workers in words (last_crash)
    problems: tuple[str, ...] = ()  # registered workers that say they cannot do their job, one line each
    oldest_wait_s: float | None = None  # how long the request waiting longest has waited (None: none waits)
    queue_timeout: float | None = None
    free: int | None = None  # of ``up``, workers with a free slot (None: not known)
    away: int = 0  # registered workers whose connection closed, waited for on a new one
    recycling: str = ""  # the worker a rolling recycle replaces now (its id), "" when none
    # the supervisor.conf the broker started with, when it was edited since for this pool: the pool
    # is declared there but the broker does not serve it (``added``) or the other way round
    conf_edited: str = ""
    added: bool = False
    checkpoint_error: str = ""  # why the checkpoint store last refused a durable session of the pool
    last_cause: str = ""  # the newest service failure's cause, when not a crash (``last_crash`` says those)


@dataclass(frozen=True)
class Verdict:
    state: State
    reasons: list[str] = field(default_factory=list)


def pool_state(name: str, f: PoolFacts) -> Verdict:
    """The pool's state and why (one reason per line an operator should read)."""
    reasons: list[str] = []
    where = ""
    restart = f"restart the broker (supervisorctl -c {f.conf_edited} restart broker)"
    if f.conf_edited and f.added:  # whatever supervisord does with its workers, none can register
        return Verdict(State.DOWN, [(f"{name} is in {f.conf_edited} but the broker does not serve it: it read its "
                                    f"pools when it started, so it turns the pool's workers away; {restart}, then "
                                    "dspexctl pools start")])
    if f.conf_edited:  # not workers of other hosts: nobody will start any
        where = (f": it is not in {f.conf_edited} any more, but the broker still serves it from the conf it "
                 f"started with; {restart} to drop it")
    elif f.here is not None and f.expected > f.here:
        where = f" ({f.here} here, {f.expected - f.here} expected from other hosts)"
    lost = "".join(f"; {phrase}" for phrase in f.lost)
    if f.away:
        lost += f"; {f.away} away (connection lost, waited for on a new one; its sessions' calls wait)"
    if f.expected and f.up == 0:
        if f.starting and not f.broken:
            return Verdict(State.STARTING, [_starting(name, f)])
        waiting = (f"; {f.queued} queued request(s) wait for one" + (
            f" (queue_timeout after {fmt_window(f.queue_timeout)})" if f.queue_timeout else "")) if f.queued else ""
        return Verdict(State.DOWN, [f"{name} has no ready worker (0/{f.expected}){where}{lost}{waiting}"])
    problems = [f"{name}: {p}" for p in f.problems]
    if f.up + f.starting < f.expected or f.broken:
        reasons.append(f"{name} has {f.up}/{f.expected} workers ready{where}{lost}")
        return Verdict(State.DEGRADED, reasons + problems)
    if problems:  # up, but not able to do what the pool is for
        return Verdict(State.DEGRADED, problems)
    if f.queue_max and f.queued >= WARN_QUEUE_FILL * f.queue_max:
        reasons.append(f"{name} queue is {f.queued}/{f.queue_max} full (pool_saturated at {f.queue_max})")
    if f.oldest_wait_s is not None and f.queue_timeout and f.oldest_wait_s >= WARN_QUEUE_WAIT * f.queue_timeout:
        workers = "" if f.free is None else (f"all {f.up} worker(s) busy; " if f.free == 0 else
                                             f"{f.free} of {f.up} worker(s) free, but not for these sessions; ")
        reasons.append(f"{name}: the oldest of {f.queued} queued request(s) has waited {fmt_window(f.oldest_wait_s)} "
                       f"of its {fmt_window(f.queue_timeout)} queue timeout ({workers}queue_timeout comes next: "
                       "add workers, or see what keeps them busy with pools status -v)")
    failed = {code: n for code, n in f.failures.items() if n}
    if failed:
        window = fmt_window(f.window_s)
        parts = ", ".join(f"{LABELS.get(code, code)} ×{n}" for code, n in sorted(failed.items(), key=lambda kv: -kv[1]))
        crash = f"; last crash: {f.last_crash}" if f.last_crash and failed.get("crash") else ""
        if f.checkpoint_error and failed.get(CHECKPOINT_REFUSED):
            crash += f"; last: {f.checkpoint_error}"
        elif f.last_cause:  # the newest failure's own words: a deadline, why a request waited, an internal error
            crash += f"; last: {f.last_cause}"
        reasons.append(f"{name} failed {sum(failed.values())} time(s) in the last {window}: {parts}{crash} "
                       f"(clears after {window} without one)")
    if reasons:
        return Verdict(State.WARN, reasons)
    if f.starting:
        return Verdict(State.STARTING, [_starting(name, f)])
    return Verdict(State.OK)


def _starting(name: str, f: PoolFacts) -> str:
    # a start in the middle of a serving pool is a recycle's replacement: say whose
    why = f" (a recycle replaces worker {f.recycling})" if f.recycling else ""
    return f"{name}: {f.starting} worker(s) starting{why}"


def facts_from_status(pool: Mapping[str, Any], *, expected: int, up: int, starting: int = 0,
                      broken: int = 0, here: int | None = None, lost: Iterable[Lost] = (),
                      last_crash: str = "", conf_edited: str = "", added: bool = False) -> PoolFacts:
    """PoolFacts from one pool of the broker's status (its queue and its recent failures). A
    registered worker still importing dspy counts as starting, not up: whether it can do its job
    is not known yet."""
    recent = pool.get("recent") or {}
    preparing = sum(1 for w in pool.get("workers") or [] if w.get("preparing") and w.get("state") in ("ready", "busy"))
    up, starting = up - preparing, starting + preparing
    return PoolFacts(expected=expected, up=up, queued=int(pool.get("queued", 0)), queue_max=pool.get("queue_max"),
                     starting=starting, broken=broken, failures=dict(recent.get(SERVICE) or {}),
                     window_s=float(pool.get("health_window", HEALTH_WINDOW_S)), here=here, lost=tuple(lost),
                     last_crash=last_crash, problems=worker_problems(pool.get("workers") or []),
                     oldest_wait_s=pool.get("oldest_wait_s"), queue_timeout=pool.get("queue_timeout"),
                     free=sum(1 for w in pool.get("workers") or [] if w.get("state") == "ready") if pool else None,
                     away=sum(1 for w in pool.get("workers") or [] if w.get("state") == "away"),
                     recycling=str(pool.get("recycling") or "")[:8], conf_edited=conf_edited, added=added,
                     checkpoint_error=str(pool.get("checkpoint_error") or ""), last_cause=service_cause(pool))


def service_cause(pool: Mapping[str, Any]) -> str:
    """The cause of the pool's newest service failure in its health window (the broker's
    ``last_failures``), "" for a crash and the calls it cost: the crash's line says how it ended."""
    last = (pool.get("last_failures") or {}).get(SERVICE) or {}
    return "" if last.get("code") in ("crash", "worker_crashed", WORKER_GONE, None) else str(last.get("cause") or "")


def worker_problems(workers: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """One line per worker that reports a problem in its heartbeats (its dspy import failed)."""
    return tuple(f"worker {str(w.get('incarnation') or w.get('id') or '?')[:8]} (pid {w.get('pid')}) "
                 f"{w['problem']} (its log has the traceback)" for w in workers if w.get("problem"))
