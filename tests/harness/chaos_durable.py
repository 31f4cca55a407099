"""Chaos with durable sessions: many sessions append to a list their session holds while workers
(and optionally the broker) are SIGKILLed; at the end every acknowledged append is there exactly
once (``python -m tests.harness.chaos --durable``, tests/chaos/test_chaos.py).

Each session's calls are ``log.append(k)`` with ``k`` counting up, one call at a time. The
client knows which appends were acknowledged (a result), which may have run (``WorkerCrashed``,
``ConnectionLost``, ``Timeout``: never retried, so each happened at most once) and which did not
run (a did-not-run error). After the run each session's list is read once more and checked:

* **lost**: an acknowledged ``k`` that is not in the list;
* **duplicated**: a ``k`` that is in it twice;
* **phantom**: a ``k`` that did not run (did-not-run error) but is in the list;
* **disordered**: the list is not increasing (a state applied out of order).
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dspex
from tests.harness.supervisord import Supervised

APPEND = "(log.append(k), len(log))[1]"
MAY_HAVE_RUN = (dspex.MayHaveRun, dspex.ConnectionError)


@dataclass
class DurableResult:
    calls: int = 0  # appends sent
    acknowledged: int = 0
    may_have_run: collections.Counter[str] = field(default_factory=collections.Counter)
    did_not_run: collections.Counter[str] = field(default_factory=collections.Counter)
    other_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    sessions: int = 0
    sessions_read: int = 0  # sessions whose list was read back at the end
    lost: int = 0
    duplicated: int = 0
    phantom: int = 0
    disordered: int = 0
    uncertain_applied: int = 0  # may-have-run appends that were applied (all of the call)
    uncertain_dropped: int = 0  # ... and those that were not (none of it)
    worker_kills: int = 0
    broker_kills: int = 0
    moves: int = 0  # sessions moved to another worker (the broker's count; reset by a broker restart)
    moves_all: int = 0  # ... by every broker of the run (its log's lines)
    restores: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("may_have_run", "did_not_run", "other_errors"):
            d[k] = dict(d[k])
        d["calls_per_s"] = round(self.calls / self.seconds, 1) if self.seconds else 0.0
        return d


class DurableChaos:
    """``threads`` durable sessions appending for ``duration`` seconds; kills as configured."""

    def __init__(self, sup: Supervised, threads: int, duration: float, kill_every: float = 2.0,
                 broker_kill_every: float = 0.0, timeout: float = 10.0, seed: int = 1,
                 progress: Callable[[str], None] | None = None) -> None:
        self.sup, self.threads, self.duration = sup, threads, duration
        self.kill_every, self.broker_kill_every = kill_every, broker_kill_every
        self.timeout, self.seed, self.progress = timeout, seed, progress
        self.r = DurableResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._acked: dict[str, list[int]] = {}
        self._maybe: dict[str, set[int]] = collections.defaultdict(set)
        self._not_run: dict[str, set[int]] = collections.defaultdict(set)
        self._sessions: list[dspex.Session] = []

    def _session_loop(self, dx: dspex.Client, idx: int) -> None:
        pool = self.sup.pools[idx % len(self.sup.pools)][0]
        s = dx.session(pool, durable=True)
        with self._lock:
            self.r.sessions += 1
            self._sessions.append(s)
            self._acked[s.id] = []
        while True:
            try:
                s.exec("log = []", timeout=self.timeout)
                break
            except dspex.DspexError:
                if self._stop.is_set():
                    return
        k = 0
        while not self._stop.is_set():
            k += 1
            with self._lock:
                self.r.calls += 1
            try:
                s.eval(APPEND, {"k": k}, timeout=self.timeout)
            except MAY_HAVE_RUN as err:
                with self._lock:
                    self.r.may_have_run[err.code] += 1
                    self._maybe[s.id].add(k)
            except dspex.DidNotRun as err:
                with self._lock:
                    self.r.did_not_run[err.code] += 1
                    self._not_run[s.id].add(k)
            except dspex.DspexError as err:
                with self._lock:
                    self.r.other_errors[err.code] += 1
                    self._maybe[s.id].add(k)
            else:
                with self._lock:
                    self.r.acknowledged += 1
                    self._acked[s.id].append(k)

    def _killer(self, every: float, broker: bool) -> None:
        rng = random.Random(self.seed * 7 + (1 if broker else 2))
        while not self._stop.wait(every * rng.uniform(0.5, 1.5)):
            name = "broker" if broker else rng.choice(self.sup.worker_names)
            try:
                if self.sup.kill(name):
                    with self._lock:
                        if broker:
                            self.r.broker_kills += 1
                        else:
                            self.r.worker_kills += 1
            except (OSError, xmlrpc.client.Error):
                pass

    def run(self) -> DurableResult:
        t0 = time.monotonic()
        with dspex.connect(self.sup.frontend, timeout=self.timeout) as dx:
            threads = [threading.Thread(target=self._session_loop, args=(dx, i), daemon=True)
                       for i in range(self.threads)]
            killers = [threading.Thread(target=self._killer, args=(every, broker), daemon=True)
                       for every, broker in ((self.kill_every, False), (self.broker_kill_every, True)) if every > 0]
            for t in threads + killers:
                t.start()
            last = time.monotonic()
            while time.monotonic() - t0 < self.duration:
                time.sleep(0.2)
                if self.progress and time.monotonic() - last > 10:
                    last = time.monotonic()
                    self.progress(f"{self.r.calls} appends, {self.r.acknowledged} acknowledged, kills "
                                  f"{self.r.worker_kills}/{self.r.broker_kills}")
            self._stop.set()
            for t in killers + threads:
                t.join(self.timeout + 30)
            self.r.seconds = time.monotonic() - t0
            self.sup.wait_registered(60)
            st = dx.status(timeout=10)
            self.r.moves, self.r.restores = st["checkpoints"]["moves"], st["checkpoints"]["restores"]
            log = os.path.join(self.sup.log_dir, "broker.log")
            with open(log, errors="replace") as f:
                self.r.moves_all = sum(1 for line in f if "moves to worker" in line)
            for s in self._sessions:
                self._check(s)
        return self.r

    def _check(self, s: dspex.Session) -> None:
        log: list[int] | None = None
        for _ in range(20):  # the last kill may have taken its worker: the read moves it back
            try:
                log = list(s.eval("list(log)", timeout=self.timeout))
                break
            except dspex.DspexError:
                time.sleep(0.5)
        if log is None:
            return
        r = self.r
        r.sessions_read += 1
        counts = collections.Counter(log)
        r.duplicated += sum(1 for n in counts.values() if n > 1)
        r.lost += sum(1 for k in self._acked[s.id] if counts[k] == 0)
        r.phantom += sum(1 for k in self._not_run[s.id] if counts[k])
        r.disordered += int(log != sorted(log))
        maybe = self._maybe[s.id]
        r.uncertain_applied += sum(1 for k in maybe if counts[k])
        r.uncertain_dropped += sum(1 for k in maybe if not counts[k])


def run_durable_chaos(root: str, threads: int, duration: float, kill_every: float = 2.0,
                      broker_kill_every: float = 0.0, timeout: float = 10.0, seed: int = 1,
                      progress: Callable[[str], None] | None = None,
                      **sup_kwargs: Any) -> tuple[DurableResult, Supervised]:
    sup_kwargs.setdefault("pools", (("triage_pool", "strict_queue"), ("analytics_pool", "hint")))
    sup_kwargs.setdefault("pool_opts", "queue_timeout=30,durable=true")
    sup = Supervised(root, **sup_kwargs)
    try:
        sup.start()
        res = DurableChaos(sup, threads, duration, kill_every, broker_kill_every, timeout, seed, progress).run()
    except BaseException:
        sup.close()
        raise
    return res, sup
