"""Bring the whole stack up (supervisord, broker, every pool's workers) and down again.

``dspexctl pools start``, ``stop`` and ``flagship`` use this, the one way to do either::

    handle = ensure_stack(Path("supervisor.conf"), timeout=60, progress=print)
    ...  # dspex.connect(handle.endpoint)
    if handle.started:  # leave a stack that was there before
        stop_stack(handle.conf)
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspex
from dspex.client.config import ClientConfig
from dspex.client.endpoints import probe_endpoint
from dspex.stack.pools import load_pools
from dspex.stack.supervisor import (
    FAULT_SHUTDOWN_STATE,
    STOPPED_STATES,
    Supervisor,
    SupervisorConf,
    SupervisorError,
    SupervisorUnreachable,
    by_group,
    full_name,
    left_running,
    left_running_text,
    pid_alive,
    start_supervisord,
    supervisord_pid,
)
from dspex.wire.errors import ConfigError, ConnectionError, PoolNotFound, Timeout
from dspexctl import commands

Progress = Callable[[str], None]

BROKER_SLOW_S = 30.0  # a broker silent this long (a loaded machine takes seconds) gets its error in the progress line


class StackConflict(ConfigError):
    """Another stack's broker holds this stack's run directory (one stack per run directory)."""

    code = "stack_conflict"


def foreign_stack(conf: SupervisorConf, endpoint: str, sup: Supervisor | None = None,
                  confless_is_foreign: bool = True) -> str | None:
    """Why the broker at ``endpoint`` belongs to another stack than ``conf``'s, or None (nobody
    listens there, or it is this conf's broker): its ``ping`` judged by
    :func:`dspexctl.commands.foreign_broker`. ``sup``: this conf's supervisord, when running."""
    try:
        probe_endpoint(endpoint)
    except (ConnectionError, ConfigError):
        return None  # nothing listens: no conflict (a refused endpoint is reported by whoever uses it)
    procs = sup.processes() if sup is not None else []
    try:
        with dspex.connect(endpoint, timeout=2.0) as client:
            info = client.ping(timeout=2.0)
    except Timeout:
        if any(p["group"] == "broker" and p["name"] == "broker" and p["pid"] for p in procs):
            return None  # our own broker, busy: not a conflict
        return commands.not_this_stack(endpoint, f"a process accepts connections at {endpoint} but does not answer "
                                                 "(a stopped or hung broker?)", f"stop it, or {commands.OWN_RUN_DIR}")
    except ConnectionError:
        return None
    return commands.foreign_broker(info, endpoint, conf, procs, confless_is_foreign)


def check_run_dir(conf: Path, endpoint: str | None) -> None:
    """Raise :class:`StackConflict` when the broker answering at ``endpoint`` (default: this
    environment's) was started with another supervisor.conf; ``dspexctl flagship`` calls it before it
    uses a running stack (a broker started without a conf, by hand or by a test, is usable)."""
    sc = SupervisorConf.load(conf)
    endpoint = ClientConfig.from_env().endpoint_or_default(endpoint)
    with Supervisor(sc, timeout=5.0) as sup:
        conflict = foreign_stack(sc, endpoint, sup if sup.running() else None, confless_is_foreign=False)
    if conflict:
        raise StackConflict(conflict)


def _bind_refused(sup: Supervisor) -> str | None:
    """The broker's last log line when it refused to start because another broker is live on the
    run directory's sockets (BACKOFF or FATAL), else None."""
    for p in sup.processes():
        if p["group"] == "broker" and p["name"] == "broker" and p["statename"] in ("BACKOFF", "FATAL", "EXITED"):
            lines = [ln for ln in sup.tail(full_name(p)).splitlines() if "another broker is live" in ln]
            return lines[-1].split("broker: ", 1)[-1].strip() if lines else None
    return None


@dataclass
class StackHandle:
    """What :func:`ensure_stack` brought up."""

    conf: Path
    endpoint: str
    started: bool  # True if ensure_stack launched supervisord (stopping it again is then the caller's call)
    pools: list[str]  # the pools asked for; none named: every pool of the conf with workers on this host
    wanted: dict[str, int]  # the workers waited for, per pool (its numprocs here)
    status: dict[str, Any]  # the broker's status once they were ready


def pool_groups(sup: Supervisor, sc: SupervisorConf, wanted: Iterable[str]) -> list[str]:
    """The supervisord groups of the named pools (all pools of the conf when none is named)."""
    groups = by_group(sup.processes())
    declared = [c.name for c in load_pools(sc.path)]
    wanted = list(wanted)
    if not wanted:
        return [name for name in declared if name in groups]
    bad = [name for name in wanted if name not in groups or name == "broker"]
    if bad:
        raise PoolNotFound(f"no pool named {', '.join(map(repr, bad))} in {sc.path}; pools: "
                           f"{', '.join(n for n in declared if n in groups) or 'none'}")
    return wanted


def ensure_stack(conf: Path, *, pools: Iterable[str] = (), timeout: float = 60.0,
                 progress: Progress = commands.progress, endpoint: str | None = None,
                 rpc_timeout: float = 5.0) -> StackHandle:
    """Start supervisord with ``conf`` when it is not running (which starts every program), else
    the stopped programs of ``pools`` and the broker (none named: every stopped program); then wait
    until each pool started has its numprocs workers ready in the broker (the workers of other
    hosts, which their own supervisord starts, are not waited for).

    Raises :class:`PoolNotFound` for a pool without workers here, :class:`dspex.Timeout` naming
    the pools still short (supervisord is left running for inspection; ``err.details["started"]``
    says whether this call started it), and a ``SupervisorError`` (code ``supervisor_error``) when
    supervisord cannot start.
    """
    sc = SupervisorConf.load(conf)
    endpoint = ClientConfig.from_env().endpoint_or_default(endpoint)
    try:  # all or nothing: a conf whose broker and workers would only go FATAL starts nothing
        load_pools(sc.path)
    except ConfigError as err:
        raise ConfigError(f"invalid dspex config, nothing started: {err.message}") from None
    named = list(pools)
    started = False
    with Supervisor(sc, timeout=rpc_timeout) as sup:
        running = sup.running()
        conflict = foreign_stack(sc, endpoint, sup if running else None)
        if conflict:  # before anything starts: our workers would join the other stack's broker
            raise StackConflict(conflict)
        left = {} if running or supervisord_pid(sc) else left_running(sc)
        if left:  # a second broker and set of workers would fight the first over the run directory
            raise StackConflict(left_running_text(sc, left))
        if not running:
            try:  # a run directory the broker would refuse: said before anything starts
                probe_endpoint(endpoint)
            except ConnectionError:
                pass  # nothing listens yet, as expected
            except ConfigError as err:
                raise ConfigError(f"nothing started: {err.message}") from None
            if named:
                progress("supervisord is not running: starting it, which starts every pool")
            progress(f"starting supervisord -c {sc.path}")
            pid = start_supervisord(sc, timeout=max(10.0, timeout / 2))
            started = True
            progress(f"supervisord running (pid {pid})")
        groups = pool_groups(sup, sc, named)
        if not started:
            start_stopped(sup, (*groups, "broker") if named else None, timeout=timeout, progress=progress)
        # a supervisord that starts starts every pool: they are all waited for
        wanted = expected_workers(sup, groups if named and not started else None)
        try:
            status = wait_ready(sup, endpoint, wanted, timeout=timeout, progress=progress)
        except StackConflict as err:
            if started:  # all or nothing: what this call started goes, before it joins the other stack
                progress("another stack holds the run directory: stopping the supervisord this command started")
                stop_stack(sc.path, progress=progress)
                raise StackConflict(err.message + " (this command stopped the supervisord it had started, and "
                                    "every program of it)") from None
            raise
        except Timeout as err:
            err.details["started"] = started
            raise
    return StackHandle(conf=sc.path, endpoint=endpoint, started=started, pools=groups, wanted=wanted, status=status)


def start_stopped(sup: Supervisor, groups: Iterable[str] | None, *, timeout: float, progress: Progress) -> None:
    """Start the stopped processes of ``groups`` (None: every group). One still stopping (a worker
    finishing its calls after a ``pools stop`` whose --wait ran out) is started once it has stopped,
    within ``timeout``: supervisord cannot start a stopping process, and would leave it stopped."""
    deadline = time.monotonic() + timeout
    wanted = None if groups is None else set(groups)
    started: set[str] = set()
    awaited: set[str] = set()
    while True:
        stopping = []
        for p in sup.processes():
            name = full_name(p)
            if (wanted is not None and p["group"] not in wanted) or name in started:
                continue
            if p["statename"] in STOPPED_STATES:
                progress(f"starting {name}")
                sup.start_process(name)
                started.add(name)
            elif p["statename"] == "STOPPING":
                stopping.append(name)
        if not stopping or time.monotonic() >= deadline:
            return
        for name in stopping:
            if name not in awaited:
                progress(f"waiting for {name} to stop, to start it")
                awaited.add(name)
        time.sleep(0.1)


def stop_groups(sup: Supervisor, groups: list[str], since: float, deadline: float,
                progress: Progress = commands.progress) -> dict[str, str]:
    """Stop ``groups`` all at once and wait until their processes stopped (or ``deadline``): their
    states. The polling wakes supervisord's loop, which reaps the exits. A progress line while
    processes take their time (a worker finishing its calls, up to its stopwaitsecs), once they
    have taken a second, and again when the set changes."""
    for group in groups:
        sup.stop_group(group, wait=False)
    said: list[str] = []
    while True:
        states = {full_name(p): p["statename"] for p in sup.processes() if p["group"] in groups}
        left = [name for name, state in states.items() if state not in STOPPED_STATES]
        if not left or time.monotonic() > deadline:
            return states
        if left != said and time.monotonic() - since >= 1.0:
            progress(f"waiting for {', '.join(left)} to stop (a worker finishes its running calls first)")
            said = left
        time.sleep(0.02)


def _await_shutdown(sup: Supervisor, deadline: float) -> None:
    """Poll a supervisord that shuts down until its socket is gone (or ``deadline``)."""
    while time.monotonic() < deadline:
        try:
            sup.state()  # refused while it shuts down, but the request still wakes its loop
        except SupervisorUnreachable:
            return  # its socket is gone: it is exiting
        except SupervisorError:
            pass
        time.sleep(0.02)


def stop_stack(conf: Path, *, wait: float = 60.0, progress: Progress = commands.progress,
               rpc_timeout: float = 5.0) -> dict[str, Any]:
    """Shut down the supervisord of ``conf`` (workers first, then the broker) and wait for it to
    exit, within ``wait`` seconds. What was stopped: ``was_running``, ``pid``, ``processes``,
    ``seconds`` (``already_shutting_down`` when another stop was under way)."""
    sc = SupervisorConf.load(conf)
    t0 = time.monotonic()
    deadline = t0 + wait
    with Supervisor(sc, timeout=rpc_timeout) as sup:
        try:
            pid = sup.pid()
        except SupervisorUnreachable:
            left = {} if supervisord_pid(sc) else left_running(sc)
            if left:
                progress(f"supervisord of {sc.path} is not running: stopping the {len(left)} process(es) it left "
                         "running")
                stop_left_running(left, deadline)
            return {"conf": str(sc.path), "was_running": False, "pid": None, "processes": sorted(set(left.values())),
                    "seconds": round(time.monotonic() - t0, 3)}
        except SupervisorError as err:
            if err.details.get("fault") != FAULT_SHUTDOWN_STATE:
                raise
            # another stop is under way (one that ran out of --wait, another operator's):
            # supervisord refuses every call now, so its pid comes from its pidfile
            daemon = supervisord_pid(sc)
            progress(f"supervisord (pid {daemon}) of {sc.path} is shutting down already: waiting for it to exit")
            _await_shutdown(sup, deadline)
            if daemon:
                wait_pid_exit(daemon, max(0.1, deadline - time.monotonic()))
            return {"conf": str(sc.path), "was_running": True, "pid": daemon, "processes": [],
                    "seconds": round(time.monotonic() - t0, 3), "already_shutting_down": True}
        running = [p for p in sup.processes() if p["statename"] not in STOPPED_STATES]
        progress(f"stopping supervisord (pid {pid}) of {sc.path}: {len(running)} running program(s)")
        # supervisord's own shutdown stops one group per turn of its main loop, and a turn waits
        # up to a second for I/O: every worker group at once instead, the broker last, and
        # polling supervisord meanwhile (each request wakes its loop, which reaps the exits)
        stop_groups(sup, sorted({p["group"] for p in running if p["group"] != "broker"}), t0, deadline, progress)
        sup.shutdown()
        _await_shutdown(sup, deadline)
    wait_pid_exit(pid, max(0.1, deadline - time.monotonic()))
    return {"conf": str(sc.path), "was_running": True, "pid": pid, "processes": [full_name(p) for p in running],
            "seconds": round(time.monotonic() - t0, 3)}


def stop_left_running(left: dict[int, str], deadline: float) -> None:
    """What a killed supervisord left running, as it would have stopped it: the workers first
    (SIGTERM: each finishes its call), then the broker; SIGKILL for any still there at ``deadline``."""
    workers = [pid for pid, name in left.items() if not name.startswith("broker:")]
    for pids, until in ((workers, (time.monotonic() + deadline) / 2), (list(left), deadline)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        while any(pid_alive(pid) for pid in pids) and time.monotonic() < until:
            time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_pid_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise Timeout(f"supervisord (pid {pid}) still running {timeout:g}s after shutdown")
        time.sleep(0.05)


def expected_workers(sup: Supervisor, pools: Iterable[str] | None) -> dict[str, int]:
    """Workers each pool should have once this supervisord has started them: the processes of its
    group (numprocs). A pool without a group here has its workers on other hosts (its ``size``
    counts them), which this supervisord cannot start: 0."""
    groups = by_group(sup.processes())
    names = list(pools) if pools is not None else [p.name for p in load_pools(sup.conf.path)]
    return {name: len(groups.get(name, ())) for name in names}


def ready_counts(status: dict[str, Any], pools: Iterable[str]) -> dict[str, int]:
    """Registered workers per pool in a broker status that are neither draining nor away, nor
    still importing dspy (whether that worked is known only once it is done)."""
    out = {}
    for name in pools:
        p = status.get("pools", {}).get(name)
        out[name] = sum(1 for w in p["workers"] if w["state"] not in ("draining", "away")
                        and not w.get("preparing")) if p else 0
    return out


def wait_ready(sup: Supervisor, endpoint: str, wanted: dict[str, int], *, timeout: float,
               progress: Progress) -> dict[str, Any]:
    """Poll the broker until each pool of ``wanted`` has that many ready workers; return the status.

    Also polls supervisord, which (besides spotting a FATAL program early) wakes its main loop:
    supervisord only restarts an exited program on its next loop turn, up to 1 s later otherwise.
    Raises :class:`StackConflict` as soon as the broker that answers is another stack's, or this
    stack's broker refused to start because another one is live on the run directory.
    """
    started_at = time.monotonic()
    deadline = started_at + timeout
    last_line = ""
    last_err = ""
    checked = False  # whose broker answers: asked once
    client = dspex.connect(endpoint, timeout=1.0)
    try:
        while True:
            status: dict[str, Any] | None = None
            counts = dict.fromkeys(wanted, 0)
            try:
                status = client.status(timeout=1.0)
                if not checked:
                    conflict = foreign_stack(sup.conf, endpoint, sup)
                    if conflict:
                        raise StackConflict(conflict)
                    checked = True
                counts = ready_counts(status, wanted)
                unknown = [p for p in wanted if p not in status["pools"]]
                if unknown:
                    raise ConfigError(f"the broker at {endpoint} has no pool {', '.join(unknown)} "
                                      "(is it running with another config?)")
                last_err = ""
            except (ConnectionError, Timeout) as err:
                last_err = f"broker: {err.message}"
                client.close()
                client = dspex.connect(endpoint, timeout=1.0)
            fatal = [full_name(p) for p in sup.processes() if p["statename"] == "FATAL"]
            refused = _bind_refused(sup) if status is None else None
            if refused:
                raise StackConflict(commands.not_this_stack(
                    endpoint, f"this stack's broker refused to start ({refused})",
                    f"stop that stack, or {commands.OWN_RUN_DIR}"))
            if fatal:
                logs = sup.conf.logfile.parent if sup.conf.logfile else sup.conf.here
                why = "; ".join(f"{name}: {sup.last_log_line(name) or 'no output'}" for name in fatal)
                raise SupervisorError(f"supervisord gave up on {', '.join(fatal)} (FATAL: it exited at once on every "
                                      f"try); its last log line: {why} (more in {logs})")
            if status is not None and all(counts[p] >= n for p, n in wanted.items()):
                troubled = {p: n for p in wanted if (n := sum(1 for w in status["pools"][p]["workers"]
                                                              if w.get("problem")))}
                progress(("registered: " if troubled else "ready: ") + ", ".join(
                    f"{p} {counts[p]}/{n}" + (f" ({troubled[p]} reporting a problem)" if p in troubled else "")
                    for p, n in wanted.items()))
                return status
            line = "waiting for workers: " + ", ".join(f"{p} {counts[p]}/{n}" for p, n in wanted.items())
            if status is None:  # normal for a moment while it starts; its error only once that is unusual
                slow = time.monotonic() - started_at > BROKER_SLOW_S
                line = "waiting for the broker" + (f" ({last_err})" if last_err and slow else " to start")
            if line != last_line:
                progress(line)
                last_line = line
            if time.monotonic() > deadline:
                short = {p: f"{counts[p]}/{n}" for p, n in wanted.items() if counts[p] < n}
                raise Timeout(f"not ready after {timeout:g}s: " + (
                    ", ".join(f"{p} {c}" for p, c in short.items()) if status is not None else last_err or "no broker"),
                    short=short)
            time.sleep(0.1)
    finally:
        client.close()
