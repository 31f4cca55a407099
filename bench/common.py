"""Shared pieces of the benchmarks: process groups, stacks, statistics, machine facts, result rows.

Every process the benchmarks start is started in a new session (its own process group) and
recorded; :meth:`Procs.close` kills exactly those groups, plus the recorded descendants of
processes (supervisord) that put their children in groups of their own. Nothing is ever killed
by name.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


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
    def pending(cls, name: str, figure: str, target: str, why: str) -> "Row":
        return cls(name, figure, target=target, status="pending", reason=why, ours=f"pending: {why}")

    @classmethod
    def skipped(cls, name: str, figure: str, target: str, why: str) -> "Row":
        return cls(name, figure, target=target, status="skipped", reason=why, ours=f"skipped: {why}")

    @classmethod
    def error(cls, name: str, figure: str, target: str, why: str) -> "Row":
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


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def _starttime(pid: int) -> int | None:
    """Start time of a live (non-zombie) process: with the pid it names one process, even after pid reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of ``pid``."""
    children = _ppid_map()
    out: list[tuple[int, int]] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            st = _starttime(c)
            if st is not None:
                out.append((c, st))
            todo.append(c)
    return out


# -- processes -------------------------------------------------------------------------------

def base_env(run_dir: str | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    for k in ("DSPEX_ENDPOINT", "DSPEX_FRONTEND", "DSPEX_BACKEND", "DSPEX_CONFIG"):
        env.pop(k, None)
    if run_dir is not None:
        env["DSPEX_RUN_DIR"] = run_dir
    env.update(extra)
    return env


class Procs:
    """Processes this run started. Each in its own process group; closed by pid/pgid only."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tree_pids: set[tuple[int, int]] = set()  # (pid, start time) of descendants seen

    def spawn(self, args: Sequence[str], log_name: str, env: dict[str, str] | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen[bytes]:
        log = open(os.path.join(self.root, log_name), "ab")
        try:
            proc = subprocess.Popen(list(args), cwd=cwd or REPO, env=env or base_env(), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def remember_tree(self, proc: subprocess.Popen[bytes]) -> None:
        """Record the current descendants of ``proc`` (they may sit in process groups of their own)."""
        self.tree_pids.update(descendants(proc.pid))

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL, wait: float = 10.0) -> None:
        """Signal ``proc``'s group (and its recorded descendants on SIGKILL) and reap it."""
        if proc.poll() is None:
            tree = descendants(proc.pid)
            self.tree_pids.update(tree)
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                if sig != signal.SIGKILL:
                    self.stop(proc, signal.SIGKILL, wait)
                    return
        if sig == signal.SIGKILL or proc.poll() is not None:
            self._kill_tree_leftovers()

    def _kill_tree_leftovers(self) -> None:
        for pid, started in sorted(self.tree_pids):
            if _starttime(pid) == started:  # still the process we saw, not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                self.stop(proc)
            except Exception:  # noqa: BLE001 - keep cleaning the others
                pass
        self._kill_tree_leftovers()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def log_tail(self, name: str, n: int = 3000) -> str:
        path = Path(self.root, name)
        return path.read_text(errors="replace")[-n:] if path.exists() else ""


class Workspace:
    """A short temp dir (unix socket paths < 100 bytes) with a process registry."""

    def __init__(self, prefix: str = "dxb") -> None:
        self.root = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        self.procs = Procs(self.root)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def ipc(self, name: str) -> str:
        ep = f"ipc://{self.root}/{name}"
        assert len(ep) < 100, ep
        return ep

    def close(self) -> None:
        try:
            self.procs.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, interval: float = 0.01, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
        except Exception as exc:  # noqa: BLE001 - not ready yet
            last, value = exc, None
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last!r})" if last else ""))


class Stack:
    """A dspex broker and its workers as subprocesses, as tests/conftest.py runs them."""

    def __init__(self, ws: Workspace, name: str = "s", heartbeat: float = 1.0, liveness: int = 3) -> None:
        self.ws = ws
        self.broker_cmd = ["-m", "broker"]
        self.worker_cmd = ["-m", "worker"]
        self.name = name
        self.frontend = ws.ipc(f"{name}f.sock")
        self.backend = ws.ipc(f"{name}b.sock")
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.env = base_env(ws.path(f"{name}run"))
        self.broker: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def start_broker(self, *pools: str) -> subprocess.Popen[bytes]:
        args = [PY, *self.broker_cmd, "--frontend", self.frontend, "--backend", self.backend,
                "--heartbeat", str(self.heartbeat), "--liveness", str(self.liveness), "--log-level", "WARNING"]
        for spec in pools:
            args += ["--pool", spec]
        self.broker = self.ws.procs.spawn(args, f"{self.name}-broker.log", self.env)
        wait_for(lambda: os.path.exists(self.frontend[6:]) or self.broker.poll() is not None,  # type: ignore[union-attr]
                 what="broker socket")
        if self.broker.poll() is not None:
            raise RuntimeError("broker exited: " + self.ws.procs.log_tail(f"{self.name}-broker.log"))
        return self.broker

    def start_worker(self, pool: str, *extra: str) -> subprocess.Popen[bytes]:
        proc = self.ws.procs.spawn(
            [PY, *self.worker_cmd, "--pool", pool, "--backend", self.backend, "--heartbeat", str(self.heartbeat),
             "--liveness", str(self.liveness), "--log-level", "WARNING", *extra],
            f"{self.name}-worker-{pool}.log", self.env)
        self.workers.append(proc)
        return proc

    def client(self, timeout: float = 20.0) -> Any:
        import dspex

        return dspex.connect(self.frontend, timeout=timeout)

    def pool_workers(self, client: Any, pool: str) -> list[dict[str, Any]]:
        workers: list[dict[str, Any]] = client.status(timeout=5)["pools"][pool]["workers"]
        return list(workers)

    def wait_workers(self, client: Any, pool: str, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = wait_for(lambda: (w := self.pool_workers(client, pool)) and len(w) == n and w, timeout, 0.02,
                        f"{n} workers ready in pool {pool}")
        return found


# -- machine ---------------------------------------------------------------------------------

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
    try:
        info["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    return info


def iter_rotated(items: Sequence[Any], r: int) -> Iterator[Any]:
    """The items starting at index r mod n: alternates which system goes first in each round."""
    n = len(items)
    for i in range(n):
        yield items[(r + i) % n]
