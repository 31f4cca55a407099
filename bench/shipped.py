"""The shipped stack on a private copy: ``supervisor.conf`` under supervisord in a temp dir
(cold start, flagship, the idle stack, the local-model overhead).

Nothing here touches a stack a colleague runs: the copy's ``%(here)s`` (sockets, pidfile, logs)
and ``DSPEX_RUN_DIR`` are in the bench's own short temp dir.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from bench.common import PY, REPO, Workspace, base_env, descendants, starttime, venv_bin, wait_for
from tests.harness.procs import free_port
from tests.harness.supervisord import link_launcher


def supervisord_bin() -> str:
    found = venv_bin("supervisord")
    if found is None:
        raise FileNotFoundError("supervisord is not installed")
    return found


def private_conf(ws: Workspace, conf: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the project's supervisor.conf in ``ws`` (its %(here)s: sockets, pidfile, logs) and
    the environment that points the stack at ``ws``: no clash with a stack a colleague runs."""
    copy = Path(ws.path("supervisor.conf"))
    copy.write_text(conf.read_text())
    link_launcher(ws.root)  # its command= lines run %(here)s/bin/dspex-python
    for d in ("run", "log"):
        os.makedirs(ws.path(d), exist_ok=True)
    env = base_env(ws.path("r"), DSPEX_PYTHON=PY, DSPEX_METRICS_PORT="0", DSPEX_SUPERVISOR_CONF=str(copy))
    return copy, env


def stop_daemon(ws: Workspace) -> None:
    """A supervisord that daemonized itself from our private conf (its pidfile is in ``ws``)."""
    pidfile = Path(ws.path("run", "supervisord.pid"))
    if not pidfile.exists():
        return
    try:
        pid = int(pidfile.read_text().strip())
    except ValueError:
        return
    started = starttime(pid)
    if started is None:
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if ws.root.encode() not in f.read():
                return  # not the supervisord of our private conf
    except OSError:
        return
    tree = descendants(pid)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while starttime(pid) == started and time.monotonic() < deadline:
        time.sleep(0.05)
    for p, st in [(pid, started), *tree]:
        if starttime(p) == st:
            os.kill(p, signal.SIGKILL)


class ShippedStack:
    """``supervisor.conf`` on a private copy under ``supervisord -n``; ``pids`` by role once ready:
    ``supervisord``, ``broker``, ``<pool>_<n>`` for each worker."""

    def __init__(self, ws: Workspace, metrics: bool = True, tree: Path = REPO) -> None:
        """``tree``: the source tree whose supervisor.conf and code the stack runs (``bench.ab``)."""
        conf = tree / "supervisor.conf"
        if not conf.exists():
            raise FileNotFoundError(f"no supervisor.conf in {tree}")
        self.ws = ws
        self.copy, self.env = private_conf(ws, conf)
        if tree != REPO:
            self.env["PYTHONPATH"] = f"{tree}{os.pathsep}{self.env['PYTHONPATH']}"
        if metrics:
            self.env["DSPEX_METRICS_PORT"] = str(free_port())  # the shipped default: metrics on
        self.endpoint = f"ipc://{self.env['DSPEX_RUN_DIR']}/frontend.sock"
        self.sup: Any = None
        self.pids: dict[str, int] = {}

    def start(self, timeout: float = 120, interval: float = 0.05) -> dict[str, int]:
        import dspex

        self.sup = self.ws.procs.spawn([supervisord_bin(), "-n", "-c", str(self.copy)], "supervisord.out", self.env,
                                       cwd=self.ws.root)

        def ready() -> bool:
            self.ws.procs.remember_tree(self.sup)
            if self.sup.poll() is not None:
                raise RuntimeError("supervisord exited: " + self.ws.procs.log_tail("supervisord.out"))
            if not os.path.exists(self.endpoint[6:]):
                return False
            with dspex.connect(self.endpoint, timeout=1) as c:
                pools = c.status(timeout=1)["pools"]
            want = sum(p.get("size") or 0 for p in pools.values()) or 6
            return sum(len(p["workers"]) for p in pools.values()) >= want

        wait_for(ready, timeout, interval, "every worker of supervisor.conf ready")
        self.ws.procs.remember_tree(self.sup)
        self.pids = {"supervisord": self.sup.pid}
        for pid, _ in descendants(self.sup.pid):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"broker" in argv:
                self.pids["broker"] = pid
            elif b"--pool" in argv:
                pool = argv[argv.index(b"--pool") + 1].decode()
                n = sum(1 for k in self.pids if k.startswith(pool + "_"))
                self.pids[f"{pool}_{n}"] = pid
        return self.pids

    def stop(self) -> None:
        if self.sup is not None:
            self.ws.procs.remember_tree(self.sup)
            self.ws.procs.stop(self.sup, signal.SIGTERM, wait=30)
            self.sup = None
