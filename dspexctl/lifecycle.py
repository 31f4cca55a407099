"""The commands that start and stop a stack's processes through supervisord: ``pools start``,
``pools stop``, ``pools restart`` and ``stop`` (the whole stack). Each has the three steps of
:mod:`dspexctl.commands`."""

from __future__ import annotations

import time
from typing import Any

from dspex.stack.health import State, worker_problems, worst
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
    supervisord_pid,
)
from dspex.wire.errors import ConnectionError, PoolNotFound, Timeout
from dspexctl.commands import EXIT_FOR_STATE, EXIT_OK, Settings, metrics_text, progress
from dspexctl.stack import (
    StackConflict,
    ensure_stack,
    expected_workers,
    foreign_stack,
    ready_counts,
    start_stopped,
    wait_pid_exit,
    wait_ready,
)


def _pool_groups(sup: Supervisor, sc: SupervisorConf, wanted: list[str]) -> list[str]:
    """The supervisord groups of the named pools (all pools of the conf when none is named)."""
    groups = by_group(sup.processes())
    declared = [c.name for c in load_pools(sc.path)]
    if not wanted:
        return [name for name in declared if name in groups]
    bad = [name for name in wanted if name not in groups or name == "broker"]
    if bad:
        raise PoolNotFound(f"no pool named {', '.join(map(repr, bad))} in {sc.path}; pools: "
                           f"{', '.join(n for n in declared if n in groups) or 'none'}")
    return wanted


def stop_groups(sup: Supervisor, groups: list[str], since: float, deadline: float) -> dict[str, str]:
    """Stop ``groups`` all at once and wait until their processes stopped (or ``deadline``): their
    states. The polling wakes supervisord's loop, which reaps the exits. A line on stderr while
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


class PoolsCommand:
    """``pools start|stop|restart``: the pools named (all of the conf's by default), and how long to wait."""

    def request(self, pools: tuple[str, ...] = (), wait: float = 120.0) -> dict[str, Any]:
        return {"pools": list(pools), "wait": wait}


class PoolsStart(PoolsCommand):
    interrupted = "supervisord goes on starting the stack (dspexctl pools status follows it, dspexctl stop stops it)"

    def execute(self, settings: Settings, req: dict[str, Any]) -> dict[str, Any]:
        sc = SupervisorConf.load(settings.supervisor_conf)
        endpoint = settings.resolved_endpoint()
        t0 = time.monotonic()
        with Supervisor(sc, timeout=settings.timeout) as sup:
            started = not sup.running()
            if started:
                if req["pools"]:
                    progress("supervisord is not running: starting it, which starts every pool")
                ensure_stack(sc.path, timeout=req["wait"], progress=progress, endpoint=endpoint)
            groups = _pool_groups(sup, sc, req["pools"])
            wanted = expected_workers(sc, sup, groups)
            if started:  # ensure_stack waited for every pool already
                with settings.client() as dx:
                    status = dx.status()
            else:
                conflict = foreign_stack(sc, endpoint, sup)
                if conflict:  # our workers would join the other stack's broker
                    raise StackConflict(conflict)
                start_stopped(sup, (*groups, "broker"), timeout=req["wait"], progress=progress)
                status = wait_ready(sup, endpoint, wanted, timeout=req["wait"], progress=progress, conf=sc)
        # the pools' sizes count the workers of other hosts too, which their own supervisord starts
        sizes = {c.name: c.size for c in load_pools(sc.path)}
        shown = [*groups, *([n for n in sizes if n not in groups] if not req["pools"] else [])]
        counts = ready_counts(status, shown)
        metrics = dict(status["broker"].get("metrics") or {})
        text, trouble = metrics_text(metrics)
        if trouble:
            progress(f"warning: {text}")
        pools = {}
        for g in shown:
            # a worker that registered but cannot do its job (its dspy import failed): the pool is
            # not ready, in the words and with the exit code of pools status
            problems = list(worker_problems((status["pools"].get(g) or {}).get("workers") or []))
            pools[g] = {"ready": counts[g], "expected": max(sizes.get(g, 0), wanted.get(g, 0)),
                        "here": wanted.get(g, 0), "state": (State.DEGRADED if problems else State.OK).value,
                        "problems": problems}
        health = worst([State(p["state"]) for p in pools.values()])
        return {"started_supervisord": started, "seconds": round(time.monotonic() - t0, 3), "health": health.value,
                "pools": pools, "metrics": metrics}

    def present(self, result: dict[str, Any]) -> str:
        head = "started supervisord; " if result["started_supervisord"] else ""
        return head + ", ".join(_pool_line(name, p) for name, p in result["pools"].items()) + (
            f" ({result['seconds']:.1f}s)\n" + metrics_text(result["metrics"])[0] + _problem_lines(result["pools"]))

    def exit_code(self, result: dict[str, Any]) -> int:
        return EXIT_FOR_STATE[State(result["health"])]


def _pool_line(name: str, p: dict[str, Any]) -> str:
    there = f" ({p['expected'] - p['here']} expected from other hosts)" if p["expected"] > p["here"] else ""
    if p["problems"]:
        return f"{name}: {p['ready']}/{p['expected']} up{there}, {p['state'].upper()}"
    return f"{name}: {p['ready']}/{p['expected']} ready{there}"


def _problem_lines(pools: dict[str, Any]) -> str:
    return "".join(f"\n{p['state'].upper()}: {name}: {text}" for name, p in pools.items() for text in p["problems"])


class PoolsStop(PoolsCommand):
    interrupted = "supervisord goes on stopping the workers (dspexctl pools status follows it)"

    def execute(self, settings: Settings, req: dict[str, Any]) -> dict[str, Any]:
        sc = SupervisorConf.load(settings.supervisor_conf)
        t0 = time.monotonic()
        # stopProcessGroup(wait=True) returns once the group is stopped; workers finish their
        # current request first (up to stopwaitsecs), so give the call that long
        with Supervisor(sc, timeout=max(settings.timeout, req["wait"])) as sup:
            groups = _pool_groups(sup, sc, req["pools"])
            for g in groups:
                progress(f"stopping {g}")
            states = stop_groups(sup, groups, t0, t0 + req["wait"])
        stopping = sorted(f"{name} is still {state}" for name, state in states.items() if state not in STOPPED_STATES)
        if stopping:  # as every command whose --wait runs out; the workers' exits are not waited for either
            raise Timeout(f"{', '.join(stopping)} after {req['wait']:g}s (a worker finishes its running calls "
                          "first, up to its stopwaitsecs; supervisord goes on stopping it: dspexctl pools status "
                          "follows it, a longer --wait waits for it)")
        # the workers said goodbye on SIGTERM; confirm the broker has dropped them
        left: dict[str, int] = {}
        try:
            with settings.client() as dx:
                deadline = time.monotonic() + 10.0
                while True:
                    status = dx.status()
                    left = {g: len(status["pools"][g]["workers"]) for g in groups if g in status["pools"]}
                    if not any(left.values()) or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
        except (ConnectionError, Timeout):
            pass  # no broker: nothing registered either
        return {"stopped": groups, "processes": states, "still_registered": left,
                "seconds": round(time.monotonic() - t0, 3)}

    def present(self, result: dict[str, Any]) -> str:
        lines = [f"{name}: {state}" for name, state in sorted(result["processes"].items())]
        lines += [f"warning: the broker still lists {n} worker(s) of {pool}"
                  for pool, n in result["still_registered"].items() if n]
        return "\n".join(lines)

    def exit_code(self, result: dict[str, Any]) -> int:
        return EXIT_OK


class PoolsRestart(PoolsCommand):
    """Stop the pools' workers through supervisord, start them again, wait until they are ready."""

    interrupted = PoolsStart.interrupted

    def execute(self, settings: Settings, req: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        sc = SupervisorConf.load(settings.supervisor_conf)
        with Supervisor(sc, timeout=settings.timeout) as sup:
            sup.state()  # a restart of a stack that is not running is an error, not a start
        stopped = PoolsStop().execute(settings, PoolsStop().request(tuple(req["pools"]), req["wait"]))
        started = PoolsStart().execute(settings, PoolsStart().request(tuple(stopped["stopped"]), req["wait"]))
        return {"pools": started["pools"], "health": started["health"], "seconds": round(time.monotonic() - t0, 3)}

    def present(self, result: dict[str, Any]) -> str:
        return ("restarted " + ", ".join(_pool_line(name, p) for name, p in result["pools"].items())
                + f" ({result['seconds']:.1f}s)" + _problem_lines(result["pools"]))

    def exit_code(self, result: dict[str, Any]) -> int:
        return EXIT_FOR_STATE[State(result["health"])]


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


class StackStop:
    """Shut down the supervisord of this supervisor.conf (workers first, then the broker)."""

    def request(self, wait: float = 60.0) -> dict[str, Any]:
        return {"wait": wait}

    def execute(self, settings: Settings, req: dict[str, Any]) -> dict[str, Any]:
        sc = SupervisorConf.load(settings.supervisor_conf)
        t0 = time.monotonic()
        deadline = t0 + req["wait"]
        with Supervisor(sc, timeout=settings.timeout) as sup:
            try:
                pid = sup.pid()
            except SupervisorUnreachable:
                return {"conf": str(sc.path), "was_running": False, "pid": None, "processes": [], "seconds": 0.0}
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
            stop_groups(sup, sorted({p["group"] for p in running if p["group"] != "broker"}), t0, deadline)
            sup.shutdown()
            _await_shutdown(sup, deadline)
        wait_pid_exit(pid, max(0.1, deadline - time.monotonic()))
        return {"conf": str(sc.path), "was_running": True, "pid": pid, "processes": [full_name(p) for p in running],
                "seconds": round(time.monotonic() - t0, 3)}

    def present(self, result: dict[str, Any]) -> str:
        if not result["was_running"]:
            return f"supervisord of {result['conf']} is not running: nothing to stop"
        if result.get("already_shutting_down"):
            return (f"supervisord (pid {result['pid']}) of {result['conf']} was shutting down already; it exited "
                    f"after {result['seconds']:.1f}s")
        return (f"stopped supervisord (pid {result['pid']}) and {len(result['processes'])} program(s) "
                f"in {result['seconds']:.1f}s")

    def exit_code(self, result: dict[str, Any]) -> int:
        return EXIT_OK
