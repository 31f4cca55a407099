"""The commands that start and stop a stack's processes through supervisord: ``pools start``,
``pools stop``, ``pools restart`` and ``stop`` (the whole stack). Each has the three steps of
:mod:`dspexctl.commands`."""

from __future__ import annotations

import time
from typing import Any

from dspex.stack.health import State, worker_problems, worst
from dspex.stack.pools import load_pools
from dspex.stack.supervisor import STOPPED_STATES, Supervisor, SupervisorConf
from dspex.wire.errors import ConnectionError, Timeout
from dspexctl.commands import EXIT_FOR_STATE, EXIT_OK, Settings, metrics_text, progress
from dspexctl.stack import ensure_stack, pool_groups, ready_counts, stop_groups, stop_stack


class PoolsCommand:
    """``pools start|stop|restart``: the pools named (all of the conf's by default), and how long to wait."""

    def request(self, pools: tuple[str, ...] = (), wait: float = 120.0) -> dict[str, Any]:
        return {"pools": list(pools), "wait": wait}


class PoolsStart(PoolsCommand):
    interrupted = "supervisord goes on starting the stack (dspexctl pools status follows it, dspexctl stop stops it)"

    def execute(self, settings: Settings, req: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        stack = ensure_stack(settings.supervisor_conf, pools=req["pools"], timeout=req["wait"], progress=progress,
                             endpoint=settings.resolved_endpoint(), rpc_timeout=settings.timeout)
        status, groups, wanted = stack.status, stack.pools, stack.wanted
        # the pools' sizes count the workers of other hosts too, which their own supervisord starts
        sizes = {c.name: c.size for c in load_pools(stack.conf)}
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
        return {"started_supervisord": stack.started, "seconds": round(time.monotonic() - t0, 3), "health": health.value,
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
            groups = pool_groups(sup, sc, req["pools"])
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


class PoolsRestart(PoolsStart):
    """Stop the pools' workers through supervisord, start them again, wait until they are ready."""

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


class StackStop:
    """Shut down the supervisord of this supervisor.conf (workers first, then the broker)."""

    def request(self, wait: float = 60.0) -> dict[str, Any]:
        return {"wait": wait}

    def execute(self, settings: Settings, req: dict[str, Any]) -> dict[str, Any]:
        return stop_stack(settings.supervisor_conf, wait=req["wait"], rpc_timeout=settings.timeout)

    def present(self, result: dict[str, Any]) -> str:
        if not result["was_running"] and result["processes"]:
            return (f"supervisord of {result['conf']} was not running; stopped what it left running: "
                    f"{', '.join(result['processes'])} in {result['seconds']:.1f}s")
        if not result["was_running"]:
            return f"supervisord of {result['conf']} is not running: nothing to stop"
        if result.get("already_shutting_down"):
            return (f"supervisord (pid {result['pid']}) of {result['conf']} was shutting down already; it exited "
                    f"after {result['seconds']:.1f}s")
        return (f"stopped supervisord (pid {result['pid']}) and {len(result['processes'])} program(s) "
                f"in {result['seconds']:.1f}s")

    def exit_code(self, result: dict[str, Any]) -> int:
        return EXIT_OK
