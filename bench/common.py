"""Shared pieces of the benchmarks: statistics, /proc figures, machine facts, result rows, the
figures' configuration and their alternating-blocks loop.

Processes come from the tests' one process harness (:mod:`tests.harness`: own process groups,
killed by pid, short temp dirs, polling); run the benchmarks as ``python -m bench`` from the repo
root so ``tests`` is importable.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.procs import (  # re-exported: the benchmarks import them from here
    PY as PY,  # noqa: PLC0414 - an explicit re-export
)
from tests.harness.procs import (
    REPO as REPO,  # noqa: PLC0414 - an explicit re-export
)
from tests.harness.procs import (
    Procs as Procs,  # noqa: PLC0414 - an explicit re-export
)
from tests.harness.procs import (
    Workspace as Workspace,  # noqa: PLC0414 - an explicit re-export
)
from tests.harness.procs import (
    base_env as base_env,  # noqa: PLC0414 - an explicit re-export
)
from tests.harness.procs import (
    descendants as descendants,  # noqa: PLC0414 - an explicit re-export
)
from tests.harness.procs import (
    starttime as starttime,  # noqa: PLC0414 - an explicit re-export
)
from tests.harness.procs import (
    wait_for as wait_for,  # noqa: PLC0414 - an explicit re-export
)
from tests.harness.stack import Stack as HarnessStack

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# the goals a row and the goals table (bench/figures.py) both judge by
BROKER_CPU_GOAL_US = 35  # broker CPU per request + reply
NOOP_GOAL = 1.5  # no-op pinned call p50 over the C proxy's (stretch 1.25)


# -- results ---------------------------------------------------------------------------------

@dataclass
class Row:
    """One figure of the table. ``status`` is ok | pending | skipped | error (with ``reason``)."""

    name: str  # stable key, e.g. "noop.p50"
    figure: str  # human label
    ours: str = ""
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    verdict: str = ""  # PASS | FAIL | "" (informational)
    status: str = "ok"
    reason: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def pending(cls, name: str, figure: str, target: str, why: str) -> Row:
        return cls(name, figure, target=target, status="pending", reason=why, ours=f"pending: {why}")

    @classmethod
    def skipped(cls, name: str, figure: str, target: str, why: str) -> Row:
        return cls(name, figure, target=target, status="skipped", reason=why, ours=f"skipped: {why}")

    @classmethod
    def error(cls, name: str, figure: str, target: str, why: str) -> Row:
        return cls(name, figure, target=target, status="error", reason=why, ours=f"error: {why}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# -- statistics ------------------------------------------------------------------------------

def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank style quantile (no interpolation) of an unsorted sequence."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, int(q * len(ordered))))
    if q == 0.5:  # the usual median
        n = len(ordered)
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return ordered[idx]


def median(values: Sequence[float]) -> float:
    return quantile(values, 0.5)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def secs(seconds: float) -> str:
    return f"{seconds:.2f} s"


# -- /proc -----------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads included (zmq I/O threads too)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_breakdown(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid`` split into its main thread and its other threads (zmq's I/O threads,
    monitors), each in user and system time: system time is the syscall and wake-up cost."""
    out = {"main_user": 0.0, "main_sys": 0.0, "threads_user": 0.0, "threads_sys": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        who = "main" if int(tid) == pid else "threads"
        out[f"{who}_user"] += int(fields[11]) / CLK_TCK
        out[f"{who}_sys"] += int(fields[12]) / CLK_TCK
    return out


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def rss_total(pids: Iterable[int]) -> int:
    """RSS bytes of the processes among ``pids`` that still run."""
    total = 0
    for pid in pids:
        try:
            total += rss_bytes(pid)
        except OSError:  # exited meanwhile
            pass
    return total


class Stack(HarnessStack):
    """The harness's broker-and-workers stack with the benchmarks' defaults: 1 s heartbeats and
    WARNING logs (log lines would cost time in the measured processes)."""

    def __init__(self, ws: Workspace, name: str = "s", heartbeat: float = 1.0, liveness: int = 3) -> None:
        super().__init__(ws, name, heartbeat=heartbeat, liveness=liveness, log_level="WARNING")


@contextmanager
def pool_stack(name: str, *worker_args: str, workers: int = 1) -> Iterator[tuple[Workspace, Stack, Any]]:
    """A workspace with a broker of one ``strict_queue`` pool ``p``, ``workers`` ready workers and
    a client (patient: workers that import dspy start slowly on a loaded machine); at the end the
    client is closed and every process of the workspace stopped, errors included."""
    with Workspace() as ws:
        st = Stack(ws, name)
        st.start_broker("p:strict_queue")
        for _ in range(workers):
            st.start_worker("p", *worker_args)
        client = st.client(timeout=60)
        try:
            st.wait_workers("p", workers, 90, client=client)
            yield ws, st, client
        finally:
            client.close()


# -- machine ---------------------------------------------------------------------------------

def commit() -> str:
    """The checkout's commit, ``+`` when files differ from it (the figures belong to both)."""
    git = ["git", "-C", str(REPO)]
    try:
        rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("+" if dirty else "")


def venv_bin(name: str) -> str | None:
    """The command ``name`` beside this Python (its venv's), else on PATH; None when neither has it."""
    cand = Path(PY).parent / name
    return str(cand) if cand.exists() else shutil.which(name)


def loadavg() -> list[str]:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg writes them."""
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def machine_info() -> dict[str, Any]:
    import msgpack
    import zmq

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
    }
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["ray"] = version("ray")
    except Exception:  # noqa: BLE001 - optional
        info["ray"] = None
    info["loadavg_start"] = loadavg()
    info["commit"] = commit()
    return info


def iter_rotated(items: Sequence[Any], r: int) -> Iterator[Any]:
    """The items starting at index r mod n: alternates which system goes first in each round."""
    n = len(items)
    for i in range(n):
        yield items[(r + i) % n]


# -- the figures' configuration and their alternating blocks ---------------------------------

@dataclass
class Config:
    smoke: bool = False
    rounds: int = 0  # 0: the mode's default
    profile_dir: str | None = None
    log: Callable[[str], None] = print

    def n_rounds(self, full: int, smoke: int = 2) -> int:
        if self.rounds:
            return self.rounds
        return smoke if self.smoke else full


def ratio_of(a: float, b: float) -> float:
    return a / b if b else float("nan")


def spawn_server(ws: Workspace, log: str, *args: str) -> subprocess.Popen[bytes]:
    return ws.procs.spawn([PY, "-m", "bench.servers", *args], log, base_env())


def wait_echo(sock: Any, frames: list[Any], timeout: float = 20.0) -> None:
    """Until a message sent on ``sock`` comes back (the peer may still be starting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.send_multipart(frames)
        if sock.poll(200):
            sock.recv_multipart()
            while sock.poll(50):  # late echoes of earlier tries
                sock.recv_multipart()
            return
    raise TimeoutError("echo server did not answer")


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    pc = time.perf_counter
    out = [0.0] * n
    for i in range(n):
        t = pc()
        fn()
        out[i] = pc() - t
    return out


def pooled(rounds: list[list[float]]) -> list[float]:
    return [x for r in rounds for x in r]


def ratio_p50(lat: dict[str, list[list[float]]], a: str, b: str) -> float:
    """Median over rounds of (p50 of a) / (p50 of b): each round's two blocks ran back to back."""
    return median([ratio_of(quantile(x, 0.5), quantile(y, 0.5)) for x, y in zip(lat[a], lat[b])])


def alternate(systems: dict[str, Callable[[], Any]], rounds: int, per_round: int, cfg: Config,
              warmup: int = 200) -> dict[str, list[list[float]]]:
    """Blocks of ``per_round`` timed calls of each system, the systems alternating block by block,
    the order rotating each round, after ``warmup`` calls of each (imports, connections, caches)."""
    names = list(systems)
    for name in names:
        timed(systems[name], warmup)
    lat: dict[str, list[list[float]]] = {k: [] for k in names}
    every = max(1, rounds // 5)
    for r in range(rounds):
        for name in iter_rotated(names, r):
            lat[name].append(timed(systems[name], per_round))
        if (r + 1) % every == 0 or r + 1 == rounds:
            cfg.log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {quantile(v[-1], 0.5) * 1e6:.0f}µs" for k, v in lat.items()))
    return lat
