"""Chaos under load: client threads drive sessions on three pools while supervisord-managed
workers (and, optionally, the broker) are SIGKILLed at random intervals.

    python -m tests.harness.chaos --requests 100000 --sessions 200 --kill-every 2 [--broker-kill-every 15]

The whole stack runs under a private supervisord (its own config, sockets and logs in a short
temp dir); processes are killed through supervisord's XML-RPC ``signalProcess(name, "KILL")``
so they come back (``autorestart=true``). Every call returns the pid that served it, and the
worker also appends ``<token> <session> <pid>`` to a per-pid file, so the run checks from the
outside:

* every request got exactly one outcome: a result, a typed error (``dspex.DspexError``) or
  ``dspex.Timeout`` (counted as *lost*); anything else is *untyped*;
* duplicates: a request token executed more than once (worker-side ground truth) or a per-session
  sequence number the session state saw twice;
* affinity: for ``strict_*`` pools all successful calls of a session come from one pid, and the
  session's worker-side state (defined by its first call) is always there (a call that ran on a
  worker without it fails with ``NameError``); the hit files give the ground truth of where every
  executed call ran, answered or not;
* after a broker SIGKILL: time until the restarted broker answers, and until every worker has
  re-registered with it.

Nothing is killed by name: teardown asks supervisord to shut down, then kills by pid only the
processes it saw under this run's supervisord that are still those processes (start time checked)
(:class:`tests.harness.supervisord.Supervised`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspex
from tests.harness.procs import rss_kb
from tests.harness.supervisord import Supervised

# The first call of a strict session defines its worker-side state: a per-session sequence
# dict and a probe. A later call that runs on another worker has no `_hit` -> NameError.
STRICT_INIT = """\
import os
seen = {}
def _hit(t, k, d, sid):
    seen[k] = seen.get(k, 0) + 1
    with open(d + '/' + str(os.getpid()), 'a') as f:
        f.write(t + ' ' + sid + ' ' + str(os.getpid()) + chr(10))
    return (os.getpid(), seen[k])
"""
STRICT_EXPR = "_hit(t, k, d, sid)"
# hint sessions may move: a stateless probe
HINT_EXPR = (
    "(lambda os: (lambda f: (f.write(t + ' ' + sid + ' ' + str(os.getpid()) + chr(10)), f.close(),"
    " (os.getpid(), 1))[2])(open(d + '/' + str(os.getpid()), 'a')))(__import__('os'))"
)


# -- load and chaos ---------------------------------------------------------------------------
@dataclass
class Result:
    sent: int = 0
    results: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: int = 0
    lost_explained: int = 0  # lost requests sent while a broker kill happened within their timeout
    untyped: collections.Counter[str] = field(default_factory=collections.Counter)
    duplicates: int = 0  # a session's sequence number seen twice by its state
    duplicate_executions: int = 0  # a token in the hit files more than once
    phantom_results: int = 0  # a result whose execution is in no hit file
    violations: int = 0  # strict: successful calls of one session from two pids, or state missing
    ground_truth_multi_pid: int = 0  # strict sessions whose executed calls ran on two pids
    ground_truth_multi_pid_answered: int = 0  # ... and whose calls on both pids were answered ok
    hint_repins: int = 0
    sessions_opened: int = 0
    rehydrations: int = 0
    worker_kills: int = 0
    broker_kills: int = 0
    broker_restart_s: list[float] = field(default_factory=list)  # kill -> new broker answers
    reregister_s: list[float] = field(default_factory=list)  # new broker answers -> all workers back
    reregister_from_kill_s: list[float] = field(default_factory=list)
    spurious_unavailable: int = 0  # SWU "not registered with this broker" (worker alive, broker new)
    seconds: float = 0.0
    broker_rss_kb: tuple[int, int] = (0, 0)
    broker_rss_samples_kb: list[int] = field(default_factory=list)  # every 5 s of the run
    broker_sessions_end: int = 0
    broker_counters: dict[str, Any] = field(default_factory=dict)
    executed_but_failed: int = 0  # executed on a worker, caller got an error or Timeout

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["errors"] = dict(self.errors)
        d["untyped"] = dict(self.untyped)
        d["answered"] = self.results + sum(self.errors.values())
        d["req_per_s"] = round(self.sent / self.seconds, 1) if self.seconds else 0.0
        for k in ("broker_restart_s", "reregister_s", "reregister_from_kill_s"):
            v = d[k]
            d[k] = {"n": len(v), "max": round(max(v), 3), "mean": round(sum(v) / len(v), 3)} if v else {"n": 0}
        return d


class Chaos:
    """Drive ``threads`` concurrent sessions until ``requests`` are sent; kill as configured."""

    def __init__(self, sup: Supervised, requests: int, threads: int, kill_every: float = 0.0,
                 broker_kill_every: float = 0.0, timeout: float = 5.0, seed: int = 1,
                 calls_per_session: tuple[int, int] = (5, 40), duration: float = 0.0,
                 progress: Callable[[str], None] | None = None) -> None:
        self.sup = sup
        self.requests = requests
        self.threads = threads
        self.kill_every = kill_every
        self.broker_kill_every = broker_kill_every
        self.timeout = timeout
        self.seed = seed
        self.calls = calls_per_session
        self.duration = duration
        self.progress = progress
        self.r = Result()
        self._lock = threading.Lock()
        self._budget = requests
        self._stop = threading.Event()
        self._broker_kills: list[float] = []
        self._lost_at: list[tuple[float, float]] = []
        self._ok_tokens: set[str] = set()
        self._failed_tokens: set[str] = set()
        self._strict_ok_pids: dict[str, set[int]] = collections.defaultdict(set)
        self._strict_sids: set[str] = set()
        self._kill_lock = threading.Lock()  # one kill (and its measurement) at a time

    # bookkeeping ------------------------------------------------------------------------------
    def _take(self) -> bool:
        with self._lock:
            if self._stop.is_set() or self._budget <= 0:
                return False
            self._budget -= 1
            self.r.sent += 1
            return True

    def _error(self, err: BaseException, token: str | None) -> None:
        with self._lock:
            if isinstance(err, dspex.Timeout):
                self.r.lost += 1
                self._lost_at.append((time.monotonic() - self.timeout, time.monotonic()))
            elif isinstance(err, dspex.DspexError):
                self.r.errors[err.code] += 1
                if isinstance(err, dspex.SessionWorkerUnavailable) and "not registered" in str(err):
                    self.r.spurious_unavailable += 1
            else:
                self.r.untyped[type(err).__name__] += 1
            if token is not None:
                self._failed_tokens.add(token)

    # client threads ---------------------------------------------------------------------------
    def _client_loop(self, dx: dspex.Client, idx: int) -> None:
        rng = random.Random(self.seed * 100_003 + idx)
        pool, mode = self.sup.pools[idx % len(self.sup.pools)]
        strict = mode.startswith("strict")
        d = self.sup.hits_dir
        s: dspex.Session | None = None
        seq = remaining = 0
        pid0: int | None = None
        while not self._stop.is_set():
            if s is None:
                s = dx.session(pool)
                seq, remaining, pid0 = 0, rng.randint(*self.calls), None
                with self._lock:
                    self.r.sessions_opened += 1
                if strict:
                    if not self._take():
                        return
                    try:
                        s.exec(STRICT_INIT, timeout=self.timeout)
                    except BaseException as err:
                        self._error(err, None)
                        if not isinstance(err, Exception):
                            raise
                        s.closed = True  # abandon it, as a user would on any failure of the first call
                        s = None
                        continue
                    with self._lock:
                        self.r.results += 1
                        self._strict_sids.add(s.id)
            if not self._take():
                break
            token = f"{s.id}:{seq}"
            ns = {"t": token, "k": seq, "d": d, "sid": s.id}
            try:
                out = s.eval(STRICT_EXPR if strict else HINT_EXPR, ns, timeout=self.timeout)
            except dspex.SessionWorkerUnavailable as err:
                self._error(err, token)
                with self._lock:
                    self.r.rehydrations += 1
                try:  # what dspex.Rehydrator does: drop the broker's record, open a new session
                    s.close(timeout=self.timeout)
                except dspex.DspexError:
                    pass
                s = None
                continue
            except dspex.RemoteError as err:
                if strict and err.type_name == "NameError":
                    with self._lock:
                        self.r.violations += 1  # the call ran where the session's state is not
                self._error(err, token)
            except BaseException as err:
                self._error(err, token)
                if not isinstance(err, Exception):
                    raise
            else:
                pid, count = int(out[0]), int(out[1])
                with self._lock:
                    self.r.results += 1
                    self._ok_tokens.add(token)
                    if count > 1:
                        self.r.duplicates += 1
                    if strict:
                        self._strict_ok_pids[s.id].add(pid)
                        if pid0 is not None and pid != pid0:
                            self.r.violations += 1
                    elif pid0 is not None and pid != pid0:
                        self.r.hint_repins += 1
                pid0 = pid if (pid0 is None or not strict) else pid0
            seq += 1
            remaining -= 1
            if remaining <= 0 and s is not None:
                try:
                    s.close(timeout=self.timeout)
                except dspex.DspexError:
                    pass
                s = None

    # killers ------------------------------------------------------------------------------------
    def _killer(self, every: float, target: str) -> None:
        rng = random.Random(self.seed * 7 + (1 if target == "broker" else 2))
        while not self._stop.wait(every * rng.uniform(0.5, 1.5)):
            with self._kill_lock:
                if self._stop.is_set():
                    return
                if target == "broker":
                    self._kill_broker()
                else:
                    name = rng.choice(self.sup.worker_names)
                    try:
                        if self.sup.kill(name):
                            with self._lock:
                                self.r.worker_kills += 1
                    except (OSError, xmlrpc.client.Error):
                        pass

    def _kill_broker(self) -> None:
        old = self.sup.pid("broker")
        # the measuring client connects before the kill: a fresh client would have to probe a
        # dead ipc socket on every try
        with dspex.connect(self.sup.frontend, timeout=0.25) as c:
            try:
                c.ping(timeout=2.0)
            except dspex.DspexError:
                return
            t_kill = time.monotonic()
            if not self.sup.kill("broker"):
                return
            with self._lock:
                self.r.broker_kills += 1
                self._broker_kills.append(t_kill)
            # measure: the new broker answering, then every worker re-registered with it
            t_up = None
            deadline = t_kill + 30
            while time.monotonic() < deadline:
                try:
                    pong = c.ping(timeout=0.25)
                    if int(pong["pid"]) != old:
                        t_up = time.monotonic()
                        break
                except dspex.DspexError:
                    time.sleep(0.01)
            if t_up is None:
                return
            while time.monotonic() < deadline:
                try:
                    pools = c.status(timeout=0.25)["pools"]
                    if all(len(pools[p]["workers"]) >= self.sup.workers_per_pool for p, _ in self.sup.pools):
                        t_all = time.monotonic()
                        with self._lock:
                            self.r.broker_restart_s.append(t_up - t_kill)
                            self.r.reregister_s.append(t_all - t_up)
                            self.r.reregister_from_kill_s.append(t_all - t_kill)
                        return
                except dspex.DspexError:
                    pass
                time.sleep(0.01)

    # run ----------------------------------------------------------------------------------------
    def run(self) -> Result:
        sup = self.sup
        self.r.broker_rss_kb = (rss_kb(sup.pid("broker")), 0)
        t0 = time.monotonic()
        with dspex.connect(sup.frontend, timeout=self.timeout) as dx:
            threads = [threading.Thread(target=self._client_loop, args=(dx, i), name=f"chaos-{i}", daemon=True)
                       for i in range(self.threads)]
            killers = []
            if self.kill_every > 0:
                killers.append(threading.Thread(target=self._killer, args=(self.kill_every, "worker"), daemon=True))
            if self.broker_kill_every > 0:
                killers.append(threading.Thread(target=self._killer, args=(self.broker_kill_every, "broker"),
                                                daemon=True))
            for t in threads + killers:
                t.start()
            last = last_sample = time.monotonic()
            while any(t.is_alive() for t in threads):
                time.sleep(0.1)
                if time.monotonic() - last_sample >= 5.0:
                    last_sample = time.monotonic()
                    try:
                        self.r.broker_rss_samples_kb.append(rss_kb(sup.pid("broker")))
                    except (OSError, xmlrpc.client.Error):
                        pass
                if self.duration and time.monotonic() - t0 > self.duration:
                    with self._lock:
                        self._budget = 0
                if self.progress and time.monotonic() - last > 10:
                    last = time.monotonic()
                    self.progress(f"{self.r.sent} sent, {self.r.results} ok, {dict(self.r.errors)}, "
                                  f"lost {self.r.lost}, kills {self.r.worker_kills}/{self.r.broker_kills}")
            self._stop.set()
            for t in killers:
                t.join(60)
            for t in threads:
                t.join(self.timeout + 5)
            self.r.seconds = time.monotonic() - t0
        # let the stack settle, then read the broker's view
        sup.wait_registered(30)
        with dspex.connect(sup.frontend, timeout=5) as c:
            st = c.status()
        self.r.broker_sessions_end = int(st["broker"]["sessions"])
        self.r.broker_counters = {k: st["broker"][k] for k in ("garbage_frontend", "garbage_backend", "expired_unsent")}
        self.r.broker_rss_kb = (self.r.broker_rss_kb[0], rss_kb(sup.pid("broker")))
        self._verify_hits()
        return self.r

    def _verify_hits(self) -> None:
        runs: dict[str, list[int]] = collections.defaultdict(list)
        pids_of_session: dict[str, set[int]] = collections.defaultdict(set)
        for f in Path(self.sup.hits_dir).iterdir():
            for line in f.read_text().splitlines():
                parts = line.split()
                if len(parts) != 3:
                    continue
                tok, sid, pid = parts
                runs[tok].append(int(pid))
                pids_of_session[sid].add(int(pid))
        r = self.r
        r.duplicate_executions = sum(1 for pids in runs.values() if len(pids) > 1)
        r.phantom_results = sum(1 for tok in self._ok_tokens if tok not in runs)
        r.executed_but_failed = sum(1 for tok in self._failed_tokens if tok in runs)
        for sid in self._strict_sids:
            if len(pids_of_session.get(sid, ())) > 1:
                r.ground_truth_multi_pid += 1
                if len(self._strict_ok_pids.get(sid, ())) > 1:
                    r.ground_truth_multi_pid_answered += 1
        for t_send, t_out in self._lost_at:
            if any(t_send - 0.05 <= k <= t_out for k in self._broker_kills):
                r.lost_explained += 1


def run_chaos(root: str, requests: int, threads: int, kill_every: float = 0.0, broker_kill_every: float = 0.0,
              timeout: float = 5.0, seed: int = 1, duration: float = 0.0, heartbeat: float = 1.0,
              progress: Callable[[str], None] | None = None, **sup_kwargs: Any) -> tuple[Result, Supervised]:
    sup = Supervised(root, heartbeat=heartbeat, **sup_kwargs)
    try:
        sup.start()
        res = Chaos(sup, requests, threads, kill_every, broker_kill_every, timeout, seed,
                    duration=duration, progress=progress).run()
    except BaseException:
        sup.close()
        raise
    return res, sup


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.harness.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--sessions", type=int, default=200, help="concurrent sessions (one client thread each)")
    p.add_argument("--kill-every", type=float, default=2.0, help="mean seconds between worker SIGKILLs (0: none)")
    p.add_argument("--broker-kill-every", type=float, default=0.0, help="mean seconds between broker SIGKILLs")
    p.add_argument("--timeout", type=float, default=10.0, help="per-call client timeout")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: by --requests)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="workers per pool")
    p.add_argument("--capacity", type=int, default=1, help="calls each worker runs at once")
    p.add_argument("--durable", action="store_true",
                   help="durable sessions appending to a session-held list (tests/harness/chaos_durable.py); "
                        "runs --duration seconds (default 60)")
    p.add_argument("--json", default="", help="write the result here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    a = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="dxc", dir="/tmp")
    print(f"chaos: {a.requests} requests, {a.sessions} sessions, worker kill every ~{a.kill_every}s, "
          f"broker kill every ~{a.broker_kill_every or '-'}s; stack in {root}", file=sys.stderr)
    sup = None
    stack: dict[str, Any] = {"workers_per_pool": a.workers, "worker_args": ("--no-dspy", "--capacity", str(a.capacity))}
    try:
        if a.durable:
            from tests.harness.chaos_durable import run_durable_chaos

            durable, sup = run_durable_chaos(root, a.sessions, a.duration or 60.0, a.kill_every, a.broker_kill_every,
                                             a.timeout, a.seed, progress=lambda m: print(m, file=sys.stderr), **stack)
            out = durable.as_dict()
        else:
            res, sup = run_chaos(root, a.requests, a.sessions, a.kill_every, a.broker_kill_every, a.timeout, a.seed,
                                 a.duration, progress=lambda m: print(m, file=sys.stderr), **stack)
            out = res.as_dict()
        print(json.dumps(out, indent=2))
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=2))
    finally:
        if sup is not None:
            sup.close()
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def report(name: str, figures: dict[str, Any]) -> None:
    """Print the figures (visible with -s or on failure) and append them to $DSPEX_CHAOS_JSON if set."""
    print(f"\n[{name}] " + json.dumps(figures, sort_keys=True))
    out = os.environ.get("DSPEX_CHAOS_JSON")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
