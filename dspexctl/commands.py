"""dspexctl's commands, each split circus-style in three:

* ``request(**options)``: the command line turned into a plain dict (validated, nothing contacted);
* ``execute(settings, request)``: talks to the broker and supervisord, returns plain data (the
  ``--json`` document);
* ``present(result)``: the human text. ``--json`` skips only this step.

``exit_code(result)`` says how the shell sees the outcome. Errors are dspex errors (each with a
``code``); cli.py turns them into one ``Error: ...`` line and an exit code (:func:`exit_code_for`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dspex
from dspex.client.config import ClientConfig
from dspex.client.endpoints import Broker, BrokerMap, broker_map, probe_endpoint
from dspex.client.routing import broker_keys
from dspex.stack.health import State, is_here, silent_pids, worker_problems
from dspex.stack.supervisor import (
    Supervisor,
    SupervisorConf,
    SupervisorError,
    SupervisorUnreachable,
    full_name,
)
from dspex.wire.errors import (
    BrokerUnreachable,
    ConfigError,
    ConnectionError,
    DspexError,
    PoolNotFound,
    Timeout,
    UsageError,
)

EXIT_OK = 0
EXIT_ERROR = 1  # the operation failed
EXIT_USAGE = 2  # a user mistake: unknown pool/worker/session, bad option, bad config or endpoint
EXIT_DEGRADED = 3  # pools status: a pool short of workers, or a supervisord program not RUNNING
EXIT_UNREACHABLE = 4  # the broker or supervisord cannot be reached
EXIT_DOWN = 5  # pools status: a pool has no ready worker
EXIT_WARN = 6  # pools status: all up, but a queue is over 80% full or many requests fail
EXIT_STARTING = 7  # pools status: processes still starting, nothing wrong (yet)
EXIT_TIMEOUT = 8  # the broker or supervisord did not answer within --timeout, or a --wait ran out
# a state's code: pools status, and pools start/restart for the pools they started
EXIT_FOR_STATE = {State.OK: EXIT_OK, State.STARTING: EXIT_STARTING, State.WARN: EXIT_WARN,
                  State.DEGRADED: EXIT_DEGRADED, State.DOWN: EXIT_DOWN, State.UNREACHABLE: EXIT_UNREACHABLE}

def exit_code_for(err: DspexError) -> int:
    if isinstance(err, (ConnectionError, SupervisorUnreachable)):  # lost on the way too: "no broker"
        return EXIT_UNREACHABLE
    if isinstance(err, UsageError):
        return EXIT_USAGE
    return EXIT_TIMEOUT if isinstance(err, Timeout) else EXIT_ERROR


class NotFound(UsageError):
    """A worker or session the operator named does not exist (code set per instance)."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.code = code


@dataclass
class Settings:
    """The group's options; ``ctx.obj`` (dspexctl flagship reads endpoint/supervisor_conf/timeout).

    ``endpoints``: a map of brokers (``--endpoints``, ``DSPEX_ENDPOINTS``; one or several), which the
    commands about pools and sessions ask broker by broker (:meth:`each_broker`); the commands
    about one stack (``pools start|stop|restart``, ``stop``) use ``endpoint`` and the conf.
    """

    endpoint: str | None = None
    supervisor_conf: Path = Path("supervisor.conf")
    timeout: float = 5.0
    json: bool = False
    conf_explicit: bool = False  # given by option/env: a missing file is then an error
    endpoints: str | None = None
    broker: Broker | None = None  # one broker of a map: its endpoint and key files
    # one broker of a map: its supervisor.conf is the one it was started with (its ``config``)
    conf_of_broker: bool = False
    # the rest of the environment a client reads (the run directory, CURVE key files...), read once
    config: ClientConfig = field(default_factory=ClientConfig.from_env)

    def client(self) -> dspex.Client:
        endpoint = self.resolved_endpoint()
        # the key files first: a missing or wrong one is the operator's to fix, whatever listens there
        server_key, keypair = broker_keys(self._own_broker() or Broker(endpoint, None, None), self.config)
        try:
            probe_endpoint(endpoint)
        except BrokerUnreachable as err:  # is this conf's broker running elsewhere? say so
            from dspexctl.diagnose import explain

            conf = None if self.conf_of_broker else self.supervisor_conf_or_none()
            # ``probe``: the endpoint's own fault, for pools status, which explains it in its own lines
            raise BrokerUnreachable(err.message + explain(endpoint, conf, err.message, self.config, self.timeout),
                                    probe=err.message) from None
        return dspex.connect(endpoint, timeout=self.timeout,
                             curve_server_key=server_key, curve_keypair=keypair)

    def resolved_endpoint(self) -> str:
        broker = self._own_broker()
        if broker is not None:
            return broker.endpoint
        return self.config.endpoint_or_default(self.endpoint, "--endpoint")

    def _own_broker(self) -> Broker | None:
        """This command's broker when a map names it: a broker of the map, or a map of one."""
        if self.broker is not None:
            return self.broker
        brokers = self.broker_map()
        return brokers.brokers[0] if brokers is not None and not brokers.several else None

    def supervisor_conf_or_none(self) -> SupervisorConf | None:
        """The supervisor config, or None when none was asked for and ./supervisor.conf is absent.
        For a broker of a map: the one it was started with (:meth:`conf_of` its ``ping``)."""
        if self.conf_of_broker:
            try:
                with self.client() as dx:
                    return self.conf_of({"broker": dx.ping()})
            except (ConnectionError, Timeout):
                return None
        if not self.conf_explicit and not self.supervisor_conf.exists():
            return None
        return SupervisorConf.load(self.supervisor_conf)

    def conf_of(self, broker_status: dict[str, Any] | None) -> SupervisorConf | None:
        """The supervisor config to join with the broker's ``status`` (None: it did not answer).
        A broker of a map has the conf it was started with when that file is on this host."""
        if not self.conf_of_broker:
            return self.supervisor_conf_or_none()
        path = str((broker_status or {}).get("broker", {}).get("config") or "")
        return SupervisorConf.load(Path(path)) if path and Path(path).is_file() else None

    def broker_map(self) -> BrokerMap | None:
        """The map of ``endpoints``, or None. A map of one broker is still a map: the commands
        about pools and sessions show what it says (that broker, the pools it names), as for several."""
        return broker_map(self.config, endpoints=self.endpoints) if self.endpoints else None

    def each_broker(self) -> list[Settings]:
        """The settings of every broker of the map (each with its ``broker``), or ``[self]``."""
        brokers = self.broker_map()
        return [self] if brokers is None else [self._of(b) for b in brokers.brokers]

    def for_pool(self, pool: str) -> Settings:
        """The settings of ``pool``'s broker (``PoolNotFound`` when the map has none for it)."""
        brokers = self.broker_map()
        return self if brokers is None else self._of(brokers.broker_for(pool))

    def _of(self, broker: Broker) -> Settings:
        return replace(self, endpoint=None, endpoints=None, broker=broker, conf_explicit=False, conf_of_broker=True)


def not_this_stack(endpoint: str, what: str, fix: str) -> str:
    """The words for another stack at ``endpoint``: ``what`` shows it, ``fix`` says what to do."""
    run_dir = os.path.dirname(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else endpoint
    return f"another stack is using this run directory {run_dir}: {what}; {fix}"


OWN_RUN_DIR = ("give this one its own run directory and metrics port (DSPEX_RUN_DIR=/tmp/dspex-mine "
               "DSPEX_METRICS_PORT=9465 dspexctl ...; a second stack also needs a second checkout, whose run/ "
               "holds its supervisord's socket)")


def foreign_broker(broker: dict[str, Any], endpoint: str, conf: SupervisorConf, procs: list[dict[str, Any]],
                   confless_is_foreign: bool = False) -> str | None:
    """Why the broker answering at ``endpoint`` is not the broker of ``conf``'s stack, or None:
    the one rule every command applies (each reacts its own way: ``pools status`` warns, ``pools
    start`` and ``flagship`` refuse). ``broker``: what it says of itself (its ``ping``, or its
    ``status``'s ``broker``: pid, config); ``procs``: this supervisord's processes ([] when it is
    not running).

    While this supervisord has a broker process, its pid decides: another broker answers, whatever
    conf it was started with (one started by hand with this conf in another run directory is not
    it either). Otherwise the conf it was started with decides; a broker started without one (by
    hand, by a test) is another stack's only with ``confless_is_foreign`` (``pools start``, which
    would start its own beside it)."""
    pid = broker.get("pid")
    other = str(broker.get("config") or "")
    ours = [p["pid"] for p in procs if p["group"] == "broker" and p["name"] == "broker" and p["pid"]]
    started = f"started with {other}" if other else "started without a supervisor.conf"
    stop = f"stop that stack (dspexctl --supervisor-conf {other} stop)" if other and other != str(conf.path) \
        else f"stop that broker (kill {pid})"
    if ours:
        if pid in ours:
            return None
        from dspexctl.diagnose import broker_process

        mine = broker_process(int(ours[0]))
        where = f", which listens at {mine.frontend}" if mine is not None else ""
        point = (f"DSPEX_RUN_DIR={mine.run_dir} (or --endpoint {mine.frontend})" if mine is not None and mine.run_dir
                 else f"--endpoint {mine.frontend}" if mine is not None else "DSPEX_RUN_DIR / --endpoint")
        return not_this_stack(endpoint, f"the broker there (pid {pid}) is not this supervisord's broker (pid "
                                        f"{ours[0]}{where}); it was {started}",
                              f"run this command with {point}, or {stop}")
    if other == str(conf.path) or not (other or confless_is_foreign):
        return None
    return not_this_stack(endpoint, f"the broker there (pid {pid}) was {started}, not {conf.path}",
                          f"{stop}, or {OWN_RUN_DIR}")


def metrics_text(metrics: dict[str, Any]) -> tuple[str, bool]:
    """The broker's metrics server (its status ``broker.metrics``) in one line, and whether that is
    trouble (the port asked for was taken, or nothing could be served)."""
    if not metrics.get("requested"):
        return "metrics: off (the broker runs without DSPEX_METRICS_PORT / --metrics-port)", False
    if not metrics.get("port"):
        return f"metrics: off: {metrics.get('error') or 'not served'}", True
    url = f"http://127.0.0.1:{metrics['port']}/"
    if metrics.get("error"):
        return (f"metrics: {metrics['error']} (set DSPEX_METRICS_PORT to a free port): dashboard {url}, "
                f"metrics {url}metrics"), True
    return f"dashboard: {url} (metrics: {url}metrics)", False


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- formatting --------------------------------------------------------------------------------
def table(rows: list[list[str]], indent: str = "") -> list[str]:
    """Left-aligned columns separated by two spaces, like ``supervisorctl status``."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    return [indent + "  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]


def fmt_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{days}d " if days else "") + f"{h}:{m:02d}:{s:02d}"


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f}MB" if n else "-"


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.1f}ms" if ms < 1000 else f"{ms / 1000:.2f}s"


# -- workers recycle ---------------------------------------------------------------------------
def unregistered_worker(sup: Supervisor, pool: str, pid: str, status: dict[str, Any]) -> list[dict[str, Any]]:
    """The process of ``pool``'s supervisord group with this pid when the broker does not list it
    (it stopped answering heartbeats: wedged, say, in user code that holds the GIL), as a target of
    ``--hard``: its incarnation is the one the broker last knew under that pid."""
    procs = [p for p in sup.processes() if p["group"] == pool and str(p["pid"]) == pid and p["statename"] == "RUNNING"]
    if not procs:
        return []
    known = [e["worker"] for e in status.get("events") or [] if str(e.get("pid")) == pid and e.get("worker")]
    incarnation = known[-1] if known else f"pid-{pid}"
    return [{"incarnation": incarnation, "id": incarnation[:8], "pid": procs[0]["pid"]}]


class NothingToRecycle(DspexError):
    """``workers recycle`` of a pool the broker lists no worker of: nothing to ask to leave."""

    code = "nothing_to_recycle"


def silent_process(proc: dict[str, Any], pool: str, since: float) -> str:
    """A process of ``pool`` that supervisord runs while the broker dropped it for silence at
    ``since`` (wall time), in words, with the command that ends it: only a SIGKILL does, since a
    graceful recycle asks the worker. A process the kernel does not run says so in /proc; one that
    runs is guessed at."""
    from dspexctl.diagnose import process_state

    held = process_state(int(proc["pid"]))
    why = (f"its process is {held};" if held.startswith(("stopped", "in uninterruptible", "a zombie"))
           else "wedged, in a call that holds the GIL?")
    return (f"{full_name(proc)} is RUNNING (pid {proc['pid']}) but stopped answering heartbeats "
            f"{fmt_duration(time.time() - since)} ago: {why} "
            f"dspexctl workers recycle {pool} --worker {proc['pid']} --hard kills it")


def wedged(pool: str, sup: Supervisor | None, status: dict[str, Any]) -> list[str]:
    """The processes of ``pool`` that supervisord still runs while the broker dropped them for
    silence, each as ``pools status`` names it, with the command that ends it."""
    silent = silent_pids(e for e in status.get("events") or [] if is_here(e))
    return [silent_process(p, pool, silent[p["pid"]]) for p in (sup.processes() if sup is not None else [])
            if p["group"] == pool and p["statename"] == "RUNNING" and p["pid"] in silent]


class WorkersRecycle:
    interrupted = "the broker goes on with the recycle (dspexctl pools status -v follows it)"
    def request(self, pool: str, worker: str | None = None, all: bool = False, hard: bool = False,
                wait: float = 120.0) -> dict[str, Any]:
        if worker and all:
            raise NotFound("usage", "--worker and --all exclude each other")
        return {"pool": pool, "worker": worker, "all": all, "hard": hard, "wait": wait}

    def execute(self, settings: Settings, req: dict[str, Any]) -> dict[str, Any]:
        pool = req["pool"]
        settings = settings.for_pool(pool)
        with settings.client() as dx:
            status = dx.status()
            if pool not in status["pools"]:
                raise PoolNotFound(f"no pool named {pool!r}; pools: {', '.join(status['pools'])}")
            before = [w for w in status["pools"][pool]["workers"] if w["state"] != "draining"]
            sc = settings.supervisor_conf_or_none()
            if req["hard"] and sc is None:
                raise ConfigError(f"--hard needs supervisord: no {settings.supervisor_conf}")
            sup = Supervisor(sc, timeout=settings.timeout) if sc is not None else None
            if sup is not None and not req["hard"] and not sup.running():
                sup.close()
                sup = None
            try:
                if req["worker"]:
                    key = str(req["worker"])
                    targets = [w for w in before if w["incarnation"].startswith(key) or str(w["pid"]) == key]
                    if not targets and sup is not None and req["hard"]:  # a process the broker dropped: wedged
                        targets = unregistered_worker(sup, pool, key, status)
                    if len(targets) != 1:
                        raise NotFound("worker_not_found", f"{key!r} matches {len(targets)} workers of {pool}; workers: "
                                       + ", ".join(f"{w['id']} (pid {w['pid']})" for w in before))
                elif not before:
                    stuck = wedged(pool, sup, status)
                    raise NothingToRecycle(f"pool {pool} has no ready worker to recycle" + (
                        ": " + "; ".join(stuck) if stuck else f" (dspexctl pools status {pool} says why)"))
                elif req["all"]:
                    targets = list(before)
                else:  # the oldest, as the broker picks
                    targets = sorted(before, key=lambda w: -w["uptime_s"])[:1]
                if sc is not None:
                    warning = foreign_broker(status["broker"], settings.resolved_endpoint(), sc,
                                             sup.processes() if sup is not None else [])
                    if warning:
                        progress(f"warning: {warning}")
                if not req["worker"]:  # the broker's workers are recycled, not the one the operator may mean
                    for line in wedged(pool, sup, status):
                        progress(f"warning: {line}")
                if req["hard"]:
                    assert sup is not None
                    self._check_local(sup, targets)
                recycled = self._run(dx, sup, pool, targets, len(before), req)
            finally:
                if sup is not None:
                    sup.close()
        return {"pool": pool, "mode": "hard" if req["hard"] else "graceful", "recycled": recycled}

    @staticmethod
    def _check_local(sup: Supervisor, targets: list[dict[str, Any]]) -> None:
        """--hard kills through this host's supervisord: every target must be one of its processes
        (a pid of another host's worker may be any process's here), checked before any is killed."""
        pids = {p["pid"] for p in sup.processes()}
        for w in targets:
            if not is_here(w) or w["pid"] not in pids:
                where = (f"runs on host {w['host']}, not this one" if not is_here(w)
                         else f"is not a process of this supervisord ({sup.conf.path})")
                raise NotFound("worker_not_here", f"worker {w['id']} (pid {w['pid']}) {where}: --hard kills through "
                               "this host's supervisord; recycle it without --hard (the broker tells it to leave), "
                               "or kill it where it runs")

    def _run(self, dx: dspex.Client, sup: Supervisor | None, pool: str, targets: list[dict[str, Any]],
             size: int, req: dict[str, Any]) -> list[dict[str, Any]]:
        old_ids = {w["incarnation"] for w in dx.status()["pools"][pool]["workers"]}
        t0 = time.monotonic()
        deadline = t0 + req["wait"]
        if not req["hard"]:
            for w in targets:
                progress(f"recycling {pool} worker {w['id']} (pid {w['pid']}), gracefully")
            dx.recycle(pool, worker=targets[0]["incarnation"] if req["worker"] or not req["all"] else None,
                       all=req["all"])
            news = self._wait_replacements(dx, sup, pool, old_ids, {w["incarnation"] for w in targets}, size,
                                           deadline)
        else:
            assert sup is not None
            news = []
            for w in targets:  # rolling: the next one only once the previous replacement is ready
                if w["incarnation"] in old_ids:
                    # the broker counts the lost connection of the worker it recycles as a recycle, not a crash
                    dx.recycle(pool, worker=w["incarnation"])
                self._kill(sup, pool, w)
                news += self._wait_replacements(dx, sup, pool, old_ids | {n["incarnation"] for n in news},
                                                {w["incarnation"]}, size, deadline)
        starts = [t0, *(new["seen"] for new in news)]  # each replacement took from the one before
        return [{"old": old["incarnation"], "old_pid": old["pid"], "new": new["incarnation"], "new_pid": new["pid"],
                 "seconds": round(new["seen"] - start, 3), "problem": new.get("problem")}
                for old, new, start in zip(targets, news, starts)]

    @staticmethod
    def _kill(sup: Supervisor, pool: str, w: dict[str, Any]) -> None:
        """SIGKILL ``w``'s process, unless it already left: told to recycle, an idle worker may
        say goodbye and exit first, and supervisord signals by name, so a kill after that
        would hit its replacement."""
        proc = next((p for p in sup.processes() if p["pid"] == w["pid"] and p["statename"] in ("RUNNING", "STARTING")),
                    None)
        if proc is None:
            progress(f"{pool} worker {w['id']} (pid {w['pid']}) left before its SIGKILL")
            return
        progress(f"killing {pool} worker {w['id']} (pid {w['pid']}, {full_name(proc)}) with SIGKILL")
        try:
            sup.kill(full_name(proc), w["pid"])
        except SupervisorError as err:
            if any(p["pid"] == w["pid"] and p["statename"] in ("RUNNING", "STARTING") for p in sup.processes()):
                raise
            progress(f"{pool} worker {w['id']} (pid {w['pid']}) left before its SIGKILL ({err.message})")

    def _wait_replacements(self, dx: dspex.Client, sup: Supervisor | None, pool: str, old_ids: set[str],
                           targets: set[str], size: int, deadline: float) -> list[dict[str, Any]]:
        """Poll until every target left and as many new incarnations are ready; newest last."""
        seen: dict[str, dict[str, Any]] = {}
        last = ""
        while True:
            workers = dx.status()["pools"][pool]["workers"]
            now = time.monotonic()
            for w in workers:  # a new incarnation is ready once its dspy import is over (its problem known)
                if (w["incarnation"] not in old_ids and w["incarnation"] not in seen and w["state"] != "draining"
                        and not w.get("preparing")):
                    seen[w["incarnation"]] = {**w, "seen": now}
                    progress(f"new incarnation {w['id']} (pid {w['pid']}) ready")
            current = {w["incarnation"] for w in workers}
            gone = targets - current
            ready = sum(1 for w in workers if w["state"] != "draining" and not w.get("preparing"))
            if gone == targets and len(seen) >= len(targets) and ready >= size:
                return sorted(seen.values(), key=lambda w: w["seen"])
            # a target still running calls retires only once they end (up to the pool's drain_timeout)
            busy = [f"{w['id']} finishes its {w['inflight']} running call(s) first" for w in workers
                    if w["incarnation"] in targets and w["inflight"]]
            line = (f"waiting: {len(gone)}/{len(targets)} retired" + (f" ({'; '.join(busy)})" if busy else "")
                    + f", {len(seen)}/{len(targets)} replacements ready")
            if line != last:
                progress(line)
                last = line
            if now > deadline:
                raise Timeout(f"recycle of {pool} not done: {line}")
            if sup is not None:
                try:
                    sup.state()  # wakes supervisord's loop, which restarts an exited program on its next turn
                except SupervisorUnreachable:
                    sup = None
            time.sleep(0.05)

    def present(self, result: dict[str, Any]) -> str:
        lines = [f"{result['pool']}: {r['old'][:8]} (pid {r['old_pid']}) -> {r['new'][:8]} "
                 f"(pid {r['new_pid']}) in {r['seconds']:.2f}s ({result['mode']})" for r in result["recycled"]]
        problems = worker_problems({"incarnation": r["new"], "pid": r["new_pid"], "problem": r["problem"]}
                                   for r in result["recycled"])
        return "\n".join([*lines, *(f"DEGRADED: {result['pool']}: {p}" for p in problems)])

    def exit_code(self, result: dict[str, Any]) -> int:
        # a replacement that cannot do its job (its dspy import failed): as pools status says it
        return EXIT_DEGRADED if any(r.get("problem") for r in result["recycled"]) else EXIT_OK
