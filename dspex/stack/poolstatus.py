"""One pool's status, as ``dspexctl pools status`` and the broker's dashboard both present it.

The broker's view of a pool (its status: workers, queue, recent failures, events) joined with this
host's supervisord processes of the pool's group: how many workers are expected, ready, busy,
draining, starting and broken, which processes the broker has not registered (and in which
phase), and the pool's state and reasons (:func:`dspex.stack.health.pool_state`); and what the
broker's status says of the whole stack (:func:`stack_issues`). Computed here once; the
presentations (the text table, ``--json``, the dashboard's JSON and page) only format it.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dspex.stack.health import (
    HEALTH_WINDOW_S,
    Lost,
    State,
    Verdict,
    facts_from_status,
    fmt_window,
    is_here,
    last_crash,
    local_pids,
    other_hosts,
    pool_state,
    proc_phase,
    store_filling,
)

Proc = dict[str, Any]  # a supervisord process (getAllProcessInfo's dict)


@dataclass
class PoolSummary:
    """``verdict`` is None when the broker did not answer (the pool's state is not known)."""

    expected: int
    ready: int  # registered, ready, its dspy import over
    busy: int
    draining: int
    up: int  # ready or busy, its dspy import over: what the state counts as up
    starting: int  # processes starting, workers of other hosts expected soon, registered workers still importing dspy
    broken: list[Proc]  # processes of the group not coming back on their own
    unregistered: list[tuple[Proc, str]]  # processes of the group the broker does not list, with their phase
    process_of: dict[int, Proc]  # the process of each registered worker of this host, by pid
    verdict: Verdict | None


def latency(pool: Mapping[str, Any] | None, key: str) -> float | None:
    """A pool's ``latency_p50_ms`` or ``latency_p99_ms``; None where there is no sample (the broker
    reports 0.0 for an empty window)."""
    if not pool or (not pool.get("latency_p50_ms") and not pool.get("latency_p99_ms")):
        return None
    return float(pool[key])


def stack_issues(status: Mapping[str, Any]) -> list[tuple[State, str]]:
    """What the broker's status says of the whole stack, beside its pools: each CURVE peer its
    allow-list refused in the health window (a worker host whose workers never register, and
    why) and its checkpoint store near its total cap (past it, every durable session's next
    checkpoint is refused), and each worker it told to leave in the health window (of a pool it
    does not serve, or of another wire version: supervisord restarts it, and it never registers),
    all WARN."""
    issues = [(State.WARN, refused_line(r)) for r in status.get("refused") or [] if r["ago_s"] < HEALTH_WINDOW_S]
    issues += [(State.WARN, turned_away_line(t, list(status.get("pools") or {}),
                                                (status.get("broker") or {}).get("protocol")))
               for t in status.get("turned_away") or [] if t["ago_s"] < HEALTH_WINDOW_S]
    filling = store_filling(status.get("checkpoints") or {})
    if filling:
        issues.append((State.WARN, filling))
    return issues


def refused_line(refusal: Mapping[str, Any]) -> str:
    """A peer the broker's CURVE allow-list refused: where from, its key, where the key must be and
    how to get it there (a worker host's workers never register, and nothing else says why)."""
    peer = "worker" if refusal["plane"] == "workers" else "client"
    allowed = refusal["allowed"]
    return (f"the broker refused {refusal['count']} {peer} connection(s) from {refusal['address']}, the last "
            f"{fmt_window(refusal['ago_s'])} ago: public key {refusal['key']} is not in {allowed}; give that host "
            f"a {peer}.key_secret `dspexctl keys generate` wrote for this broker, or copy the public key file of "
            f"its key into {allowed} (this clears {fmt_window(HEALTH_WINDOW_S)} after the last refusal)")


def turned_away_line(knock: Mapping[str, Any], served: list[str], protocol: int | None) -> str:
    """A worker the broker told to leave at its READY, ``served`` the broker's pools and
    ``protocol`` its wire version (its own: this process may run another dspex): what the worker
    wants, how often and how lately it came back (its supervisord restarts it), and what to fix."""
    who = f"worker pid {knock['pid']} on host {knock['host']}"
    times = f"turned away {knock['count']} time{'s' if knock['count'] != 1 else ''}, last {fmt_window(knock['ago_s'])} ago"
    if knock["reason"] == "wire_version":
        return (f"{who} speaks wire protocol version {knock['wants']}, this broker {protocol} ({times}): "
                "run one dspex version on a stack (upgrade that host or this one)")
    return (f"{who} wants pool {knock['wants']!r}, which this broker does not serve (it serves "
            f"{', '.join(served) or 'none'}; {times}): fix its --pool or add the pool and restart the broker")


def summarize(name: str, pool: Mapping[str, Any] | None, group: Sequence[Proc] | None, *,
              events: Sequence[Mapping[str, Any]], registered: set[int], silent: Container[int],
              young: bool, conf_size: int = 0, broker_answered: bool = True,
              edited: str = "", looping: Container[str] = ()) -> PoolSummary:
    """Pool ``name``: ``pool`` its part of the broker's status (None: the broker does not list
    it); ``group`` the pool's processes of this host's supervisord (None: supervisord's view is not
    known; empty: all its workers are on other hosts); ``registered`` the pids of this host's
    registered workers of every pool; ``silent`` the pids the broker dropped for silence;
    ``young``: the broker started lately (workers of other hosts it has not heard from yet are
    starting); ``conf_size`` the pool's size in the dspex config (0: not known); ``edited``: the
    supervisor.conf the broker started with, when the pool is in that file now but not among the
    broker's pools (``pool`` None), or the other way round (then said only while this host runs
    none of its processes: ``supervisorctl update`` removed them); ``looping`` the full names of
    processes supervisord restarts in a loop (broken, not starting)."""
    bp = pool or {}
    workers = list(bp.get("workers") or [])
    lost: list[Lost] = []
    starting = 0
    if group is not None and broker_answered:
        group_pids = {p["pid"] for p in group if p["pid"]}
        # a pool removed from the conf: the workers its size counts elsewhere are not coming
        expected, starting, lost = other_hosts(bp, name, group_pids, len(group), events, young and not edited)
    elif group is not None:
        expected = max(len(group), conf_size)
    else:
        expected = int(bp.get("size") or conf_size or len(workers))
    preparing = sum(1 for w in workers if w["state"] in ("ready", "busy") and w.get("preparing"))
    ready = sum(1 for w in workers if w["state"] == "ready")
    busy = sum(1 for w in workers if w["state"] == "busy")
    seen = local_pids(workers)
    unregistered = [(p, proc_phase(p, registered, silent, looping)) for p in group or []
                    if not (p["pid"] and p["pid"] in seen)]
    starting += sum(1 for _, phase in unregistered if phase == "starting")
    broken = [p for p, phase in unregistered if phase == "broken"]
    by_pid = {p["pid"]: p for p in group or [] if p["pid"]}
    verdict = None
    if broker_answered:
        verdict = pool_state(name, facts_from_status(bp, expected=expected, up=ready + busy, starting=starting,
                                                     broken=len(broken), here=None if group is None else len(group),
                                                     lost=lost, last_crash=last_crash(events, name),
                                                     conf_edited=edited if pool is None or not group else "",
                                                     added=pool is None))
    return PoolSummary(
        expected=expected, ready=ready - sum(1 for w in workers if w["state"] == "ready" and w.get("preparing")),
        busy=busy, draining=sum(1 for w in workers if w["state"] == "draining"), up=ready + busy - preparing,
        starting=starting + preparing, broken=broken, unregistered=unregistered,
        process_of={int(w["pid"]): by_pid[w["pid"]] for w in workers if is_here(w) and w["pid"] in by_pid},
        verdict=verdict)
