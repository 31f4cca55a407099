"""Fixtures that run real brokers and workers as subprocesses in short temp directories.

Every process is started in its own process group and killed by pid at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import dspex

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent


def wait_for(cond: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
        except Exception as exc:  # noqa: BLE001 - the condition may fail until ready
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


def base_env(run_dir: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DSPEX_RUN_DIR=run_dir,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.pop("DSPEX_ENDPOINT", None)
    env.pop("DSPEX_FRONTEND", None)
    env.pop("DSPEX_BACKEND", None)
    env.update(extra)
    return env


class Stack:
    """A broker and its workers, as real processes."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.run_dir = os.path.join(root, "r")
        self.frontend = f"ipc://{self.run_dir}/f.sock"
        self.backend = f"ipc://{self.run_dir}/b.sock"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broker: subprocess.Popen[bytes] | None = None
        self.broker_args: list[str] = []
        self.heartbeat = 0.25
        self.liveness = 3
        self.env = base_env(self.run_dir)
        self._clients: list[dspex.Client] = []

    def _spawn(self, args: list[str], log_name: str, prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
        log = open(os.path.join(self.root, log_name), "ab")
        proc = subprocess.Popen(
            [*(prefix or []), PY, *args], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def start_broker(self, *pools: str, extra: list[str] | None = None) -> subprocess.Popen[bytes]:
        if pools:
            self.broker_args = [a for spec in pools for a in ("--pool", spec)] + (extra or [])
        self.broker = self._spawn(
            ["-m", "broker", "--frontend", self.frontend, "--backend", self.backend,
             "--heartbeat", str(self.heartbeat), "--liveness", str(self.liveness), *self.broker_args],
            "broker.log",
        )
        if self.frontend.startswith("ipc://"):
            wait_for(lambda: os.path.exists(self.frontend[6:]) or self.broker.poll() is not None,  # type: ignore[union-attr]
                     what="broker socket")
        else:
            host, port = self.frontend[len("tcp://"):].rsplit(":", 1)
            wait_for(lambda: _connectable(host, int(port)) or self.broker.poll() is not None,  # type: ignore[union-attr]
                     what="broker port")
        return self.broker

    def start_worker(self, pool: str, *extra: str, prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
        return self._spawn(
            ["-m", "worker", "--pool", pool, "--backend", self.backend,
             "--heartbeat", str(self.heartbeat), "--liveness", str(self.liveness), *extra],
            f"worker-{pool}.log", prefix=prefix,
        )

    def pool(self, spec: str, n: int = 1, *worker_args: str) -> dspex.Client:
        """A broker with one pool (``NAME:MODE[:k=v,...]``) and ``n`` ready workers; a client to it."""
        self.start_broker(spec)
        name = spec.split(":")[0]
        for _ in range(n):
            self.start_worker(name, *worker_args)
        self.wait_workers(name, n)
        return self.client()

    def client(self, timeout: float = 20.0) -> dspex.Client:
        c = dspex.connect(self.frontend, timeout=timeout)
        self._clients.append(c)
        return c

    def workers(self, pool: str) -> list[dict[str, Any]]:
        with dspex.connect(self.frontend, timeout=5) as c:
            return list(c.status()["pools"][pool]["workers"])

    def wait_workers(self, pool: str, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        return wait_for(lambda: (w := self.workers(pool)) and len(w) == n and w, timeout, 0.05,
                        f"{n} workers ready in {pool}")

    def kill(self, proc_or_pid: subprocess.Popen[bytes] | int, sig: int = signal.SIGKILL) -> None:
        pid = proc_or_pid if isinstance(proc_or_pid, int) else proc_or_pid.pid
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        for p in self.procs:
            if p.pid == pid:
                p.wait(timeout=10)

    def close(self) -> None:
        # processes first: a client stuck in a test's thread must never leave them running
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait(timeout=10)
        for c in self._clients:
            c.close()

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(self.root)):
            if name.endswith(".log"):
                out.append(f"--- {name}\n" + Path(self.root, name).read_text(errors="replace")[-4000:])
        return "\n".join(out)


def _connectable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def short_tmp() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="dx", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stack(short_tmp: str, request: pytest.FixtureRequest) -> Iterator[Stack]:
    s = Stack(short_tmp)
    try:
        yield s
    finally:
        s.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(s.logs())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
