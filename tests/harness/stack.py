"""A dspex broker and its workers as real subprocesses (tests' ``stack`` fixture, the benchmarks,
the fuzzer)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import dspex
from tests.harness.procs import PY, Procs, Workspace, base_env, connectable, short_tmpdir, wait_for


class Stack:
    """A broker and its workers, each in its own process group, killed by pid at :meth:`close`.

    ``where`` is a short temp dir (the stack owns a process registry there) or a :class:`Workspace`
    (the stack shares its registry); ``name`` keeps several stacks in one directory apart.
    """

    def __init__(self, where: str | Workspace, name: str = "", *, heartbeat: float = 0.25, liveness: int = 3,
                 log_level: str | None = None) -> None:
        self.procs_reg = where.procs if isinstance(where, Workspace) else Procs(where)
        self._owns_procs = not isinstance(where, Workspace)
        self.root = self.procs_reg.root
        self.name = name
        self.run_dir = os.path.join(self.root, f"{name}r")
        self.frontend = f"ipc://{self.run_dir}/f.sock"
        self.backend = f"ipc://{self.run_dir}/b.sock"
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.log_level = log_level
        self.env = base_env(self.run_dir)
        self.broker: subprocess.Popen[bytes] | None = None
        self.broker_args: list[str] = []
        self.worker_procs: list[subprocess.Popen[bytes]] = []
        self._clients: list[dspex.Client] = []

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        return self.procs_reg.procs

    def _common_args(self) -> list[str]:
        args = ["--heartbeat", str(self.heartbeat), "--liveness", str(self.liveness)]
        return args + (["--log-level", self.log_level] if self.log_level else [])

    def _log(self, what: str) -> str:
        return f"{self.name}-{what}.log" if self.name else f"{what}.log"

    def start_broker(self, *pools: str, extra: list[str] | None = None) -> subprocess.Popen[bytes]:
        """Start (or restart, with the same pools) the broker; return once its frontend is bound."""
        if pools:
            self.broker_args = [a for spec in pools for a in ("--pool", spec)] + (extra or [])
        broker = self.broker = self.procs_reg.spawn(
            [PY, "-m", "broker", "--frontend", self.frontend, "--backend", self.backend, *self._common_args(),
             *self.broker_args], self._log("broker"), self.env)
        if self.frontend.startswith("ipc://"):
            wait_for(lambda: os.path.exists(self.frontend[6:]) or broker.poll() is not None, what="broker socket")
        else:
            host, port = self.frontend[len("tcp://"):].rsplit(":", 1)
            host = host.strip("[]")  # an IPv6 address
            wait_for(lambda: connectable(host, int(port)) or broker.poll() is not None, what="broker port")
        return broker

    def start_worker(self, pool: str, *extra: str, prefix: list[str] | None = None, env: dict[str, str] | None = None,
                     cwd: str | None = None) -> subprocess.Popen[bytes]:
        """A worker of ``pool``; ``env``/``cwd`` replace the stack's environment and working directory."""
        proc = self.procs_reg.spawn(
            [*(prefix or []), PY, "-m", "worker", "--pool", pool, "--backend", self.backend, *self._common_args(),
             *extra], self._log(f"worker-{pool}"), env or self.env, cwd)
        self.worker_procs.append(proc)
        return proc

    def pool(self, spec: str, n: int = 1, *worker_args: str) -> dspex.Client:
        """A broker with one pool (``NAME:MODE[:k=v,...]``) and ``n`` ready workers; a client to it."""
        self.start_broker(spec)
        name = spec.split(":")[0]
        for _ in range(n):
            self.start_worker(name, *worker_args)
        self.wait_workers(name, n)
        return self.client()

    def client(self, timeout: float = 20.0) -> dspex.Client:
        """A client to the frontend, closed with the stack."""
        c = dspex.connect(self.frontend, timeout=timeout)
        self._clients.append(c)
        return c

    def workers(self, pool: str, client: dspex.Client | None = None) -> list[dict[str, Any]]:
        """The broker's view of ``pool``'s workers (through ``client``, else a fresh connection)."""
        if client is not None:
            return list(client.status(timeout=5)["pools"][pool]["workers"])
        with dspex.connect(self.frontend, timeout=5) as c:
            return list(c.status()["pools"][pool]["workers"])

    def registered(self) -> dict[str, list[dict[str, Any]]]:
        """Every pool's registered workers."""
        with dspex.connect(self.frontend, timeout=2) as c:
            return {name: list(p["workers"]) for name, p in c.status(timeout=2)["pools"].items()}

    def wait_workers(self, pool: str, n: int, timeout: float = 20.0,
                     client: dspex.Client | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = wait_for(lambda: (w := self.workers(pool, client)) and len(w) == n and w,
                                               timeout, 0.02 if client is not None else 0.05,
                                               f"{n} workers ready in {pool}")
        return found

    def kill(self, proc_or_pid: subprocess.Popen[bytes] | int, sig: int = signal.SIGKILL) -> None:
        self.procs_reg.kill(proc_or_pid, sig)

    def close(self) -> None:
        # processes first: a client stuck in a test's thread must never leave them running
        if self._owns_procs:
            self.procs_reg.close()
        else:
            for p in [*self.worker_procs, *([self.broker] if self.broker else [])]:
                self.procs_reg.stop(p)
        for c in self._clients:
            c.close()

    def logs(self) -> str:
        return self.procs_reg.logs()


def shared_pool(spec: str, n: int = 1, *worker_args: str) -> Iterator[dspex.Client]:
    """A client to a broker with one pool of ``n`` workers in a temp dir of its own, stopped and
    removed when the generator ends: the body of a module-scoped fixture (``yield from``)."""
    root = short_tmpdir("dx")
    st = Stack(root)
    try:
        yield st.pool(spec, n, *worker_args)
    finally:
        st.close()
        shutil.rmtree(root, ignore_errors=True)
