"""Processes for tests and benchmarks: spawned in their own process group, killed by pid/pgid only.

Every process a test or a benchmark starts goes through :class:`Procs`: it runs in a new session
(its own process group) with its output in a log file of a short temp dir (unix socket paths stay
under 100 bytes), and :meth:`Procs.close` kills exactly those groups, plus the recorded descendants
of processes (supervisord) that put their children in groups of their own. Nothing is ever killed
by name; waits poll a condition (:func:`wait_for`), never sleep a fixed time.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]


class WaitTimeout(AssertionError, TimeoutError):
    """A polled condition never held: a test failure (AssertionError) and a timeout for the bench."""


def wait_for(cond: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy and return that; raise :class:`WaitTimeout`
    after ``timeout`` seconds (exceptions from ``cond`` count as "not yet" and are reported)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
        except Exception as exc:  # noqa: BLE001 - the condition may fail until ready
            last, value = exc, None
        if value:
            return value
        time.sleep(interval)
    raise WaitTimeout(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last!r})" if last else ""))


def base_env(run_dir: str | None = None, **extra: str) -> dict[str, str]:
    """This environment without any DSPEX_* setting, offline litellm, unbuffered output, the repo
    importable (tests/, bench/ and examples/ are not installed packages)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if run_dir is not None:
        env["DSPEX_RUN_DIR"] = run_dir
    env.update(extra)
    return env


def short_tmpdir(prefix: str = "dx") -> str:
    """A fresh directory right under /tmp: ipc:// paths inside it stay far below 100 bytes."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connectable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a live, non-zombie process."""
    return starttime(pid) is not None


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in kB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


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


def starttime(pid: int) -> int | None:
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
            st = starttime(c)
            if st is not None:
                out.append((c, st))
            todo.append(c)
    return out


def kill_pid(pid: int, sig: int = signal.SIGKILL, started: int | None = None) -> None:
    """Signal one process by pid; with ``started``, only if it is still that process (not a reused pid)."""
    if started is not None and starttime(pid) != started:
        return
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_PR_SET_PDEATHSIG = 1


def _dies_with(parent: int) -> Callable[[], None] | None:
    """A child's pre-exec step that makes the kernel SIGKILL it when its parent dies, however it
    dies (a pytest or a script killed by ``timeout``, one that never reached its cleanup): a child
    in its own session outlives its parent otherwise. Linux ties it to the thread that forks, so
    only a spawn from the main thread gets it (one from a thread that ends would kill the child)."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the prctl took
            os._exit(1)

    return preexec


class Procs:
    """Processes this test or run started. Each in its own process group; closed by pid/pgid only."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tree_pids: set[tuple[int, int]] = set()  # (pid, start time) of descendants seen

    def spawn(self, args: Sequence[str], log_name: str, env: dict[str, str] | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``args`` in a new session, output appended to ``root/log_name``."""
        log = open(os.path.join(self.root, log_name), "ab")  # noqa: SIM115 - the child process holds it
        try:
            proc = subprocess.Popen(list(args), cwd=cwd or REPO, env=env or base_env(), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_dies_with(os.getpid()))  # noqa: PLW1509 - a prctl and a getppid, looked up before the fork
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def remember_tree(self, proc: subprocess.Popen[bytes]) -> None:
        """Record the current descendants of ``proc`` (they may sit in process groups of their own)."""
        self.tree_pids.update(descendants(proc.pid))

    def remember(self, pid: int) -> None:
        """Record one process started on our behalf by another (e.g. a supervisord child)."""
        st = starttime(pid)
        if st is not None:
            self.tree_pids.add((pid, st))

    def kill(self, proc_or_pid: subprocess.Popen[bytes] | int, sig: int = signal.SIGKILL) -> None:
        """Signal one process (not its group) and, when it is one of ours, reap it."""
        pid = proc_or_pid if isinstance(proc_or_pid, int) else proc_or_pid.pid
        kill_pid(pid, sig)
        for p in self.procs:
            if p.pid == pid:
                p.wait(timeout=10)

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL, wait: float = 10.0) -> None:
        """Signal ``proc``'s group (and its recorded descendants on SIGKILL) and reap it."""
        if proc.poll() is None:
            self.tree_pids.update(descendants(proc.pid))
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
            self.kill_leftovers()

    def kill_leftovers(self) -> None:
        """SIGKILL every recorded descendant that is still the process we saw."""
        for pid, started in sorted(self.tree_pids):
            if starttime(pid) != started:
                continue  # gone, or a reused pid that is not ours
            try:
                if os.getpgid(pid) == pid:  # a group leader (a supervisord program): its children too
                    os.killpg(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                self.stop(proc)
            except Exception:  # noqa: BLE001 - keep cleaning the others
                pass
        self.kill_leftovers()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def log_tail(self, name: str, n: int = 3000) -> str:
        path = Path(self.root, name)
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def logs(self, tail: int = 4000) -> str:
        """The tail of every ``*.log`` under root (for a failing test's report)."""
        return "\n".join(f"--- {p.relative_to(self.root)}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(Path(self.root).rglob("*.log")))


class Workspace:
    """A short temp dir with a process registry; closing it kills the processes, then removes it."""

    def __init__(self, prefix: str = "dxb") -> None:
        self.root = short_tmpdir(prefix)
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
