"""A real supervisord as a subprocess: the shipped supervisor.conf (``SupervisedStack``, or its
broker and pool sections alone: ``small_conf_text``, ``small_stack``) or a generated one
(``Supervised``, the chaos runs), torn down by pid; and ``dspexctl`` against such a stack as an
operator runs it (a subprocess), with what the ops tests read of it (``cli_status``,
``dashboard_status``).

supervisord puts its programs in process groups of their own, so killing its group is not
enough: every child pid seen (through XML-RPC or the broker's status) is recorded with its start
time and SIGKILLed at the end if it is still that process.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import xmlrpc.client
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import dspex
from dspex.stack.supervisor import Supervisor, SupervisorConf
from tests.harness.procs import PY, REPO, Procs, WaitTimeout, base_env, free_port, pid_alive, short_tmpdir, wait_for

BIN = Path(sys.executable).parent
SUPERVISORD = str(BIN / "supervisord")
SHIPPED_CONF = REPO / "supervisor.conf"
POOLS = {"triage_pool": "strict_queue", "optimizer_pool": "strict_queue", "analytics_pool": "hint"}
READY_TIMEOUT = 90.0  # six workers importing dspy on two cores, plus supervisord's start


def link_launcher(root: str | Path) -> None:
    """Put the shipped ``bin/`` (the ``bin/dspex-python`` launcher every ``command=`` of
    supervisor.conf runs from ``%(here)s``) next to a copy of the conf in ``root``."""
    Path(root, "bin").symlink_to(REPO / "bin")


class Supervisord:
    """One supervisord running ``conf`` in the foreground (``-n``), in its own process group."""

    def __init__(self, root: str | Path, conf: str | Path, env: dict[str, str],
                 argv: list[str] | None = None) -> None:
        self.root = Path(root)
        self.conf = Path(conf)
        self.env = env
        self.argv = argv or [SUPERVISORD]
        self.procs = Procs(str(self.root))
        self.proc: Any = None
        self.supervisord_pid = 0
        self.child_pids: set[int] = set()

    def start_foreground(self) -> None:
        """``supervisord -c conf -n`` as our child, output in ``root/supervisord.out``."""
        self.proc = self.procs.spawn([*self.argv, "-c", str(self.conf), "-n"], "supervisord.out", self.env,
                                     cwd=self.root)
        self.supervisord_pid = self.proc.pid

    def adopt_daemon(self, pidfile: Path) -> None:
        """Track a supervisord that daemonized itself: its pid from its pidfile."""
        self.supervisord_pid = int(wait_for(lambda: pidfile.read_text().strip(), 10, what="supervisord pidfile"))
        self.procs.remember(self.supervisord_pid)

    def remember(self, pids: Iterable[int]) -> None:
        """Record children of supervisord (so they are killed at :meth:`stop` if still running)."""
        for pid in pids:
            if pid and pid not in self.child_pids:
                self.child_pids.add(pid)
                self.procs.remember(pid)

    def rpc(self, method: str, *args: Any) -> Any:
        """One raw XML-RPC call over a fresh connection (faults and OSErrors propagate as they are)."""
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, serverurl=SupervisorConf.load(self.conf).serverurl)
        try:
            fn: Any = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
            for part in method.split("."):
                fn = getattr(fn, part)
            return fn(*args)
        finally:
            transport.close()

    def supervisor(self) -> Supervisor:
        return Supervisor(SupervisorConf.load(self.conf), timeout=10)

    def processes(self) -> list[dict[str, Any]]:
        with self.supervisor() as sup:
            procs = sup.processes()
        self.remember(int(p["pid"]) for p in procs if p["pid"])
        return procs

    def stop(self, wait: float = 45.0) -> None:
        """supervisord's own shutdown (SIGTERM by pid); then SIGKILL whatever of ours is left."""
        try:
            self.processes()
        except Exception:  # noqa: BLE001 - it may be dead already
            pass
        if self.supervisord_pid and pid_alive(self.supervisord_pid):
            os.kill(self.supervisord_pid, signal.SIGTERM)
            deadline = time.monotonic() + wait
            while pid_alive(self.supervisord_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.procs.close()  # our supervisord's group, then every recorded child still alive


class SupervisedStack(Supervisord):
    """A copy of the shipped supervisor.conf (or ``conf_text``) in a short temp dir and its supervisord."""

    def __init__(self, conf_text: str | None = None, *, venv_link: bool = True) -> None:
        root = Path(short_tmpdir("dxs"))
        conf = root / "supervisor.conf"
        conf.write_text(conf_text if conf_text is not None else SHIPPED_CONF.read_text())
        link_launcher(root)
        (root / "run").mkdir()
        (root / "log").mkdir()
        if venv_link:  # the README's layout: the venv in .venv next to supervisor.conf
            (root / ".venv").symlink_to(sys.prefix)
        self.run_dir = str(root / "r")
        self.endpoint = f"ipc://{self.run_dir}/frontend.sock"
        self.metrics_port = free_port()
        env = base_env(self.run_dir, DSPEX_METRICS_PORT=str(self.metrics_port), DSPEX_SUPERVISOR_CONF=str(conf))
        super().__init__(root, conf, env)

    def adopt_daemon(self, pidfile: Path | None = None) -> None:
        super().adopt_daemon(pidfile or self.root / "run" / "supervisord.pid")

    def client(self, timeout: float = 30.0) -> dspex.Client:
        return dspex.connect(self.endpoint, timeout=timeout)

    def status(self) -> dict[str, Any]:
        with self.client(5) as dx:
            st = dx.status()
        for pool in st["pools"].values():
            self.remember(w["pid"] for w in pool["workers"])
        return st

    def ready(self, pool: str) -> list[dict[str, Any]]:
        """Registered workers that are not draining and whose dspy import is over."""
        return [w for w in self.status()["pools"][pool]["workers"] if w["state"] != "draining" and not w["preparing"]]

    def wait_all_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"supervisord exited with {self.proc.returncode}:\n{self.logs()}")
            procs = self.processes()  # also wakes supervisord's loop so restarts are prompt
            st = self.status()
            ok = (len(procs) == 7 and all(p["statename"] == "RUNNING" for p in procs)
                  and all(sum(w["state"] != "draining" and not w["preparing"] for w in st["pools"][p]["workers"]) == 2
                          for p in POOLS))
            return st if ok else None
        try:
            found: dict[str, Any] = wait_for(check, timeout, 0.1, "7 RUNNING processes and 6 ready workers")
            return found
        except AssertionError:
            print(self.logs())
            raise

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self, tail: int = 3000) -> str:
        out = []
        for path in sorted([*(self.root / "log").glob("*.log"), self.root / "supervisord.out"]):
            if path.exists():
                out.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-tail:])
        return "\n".join(out)

    def cli(self, *args: str) -> Any:
        """``dspexctl ARGS`` in-process (click's runner) against this stack."""
        from click.testing import CliRunner

        from dspexctl.cli import main as dspexctl

        env = {"DSPEX_RUN_DIR": self.run_dir, "DSPEX_SUPERVISOR_CONF": str(self.conf),
               "DSPEX_METRICS_PORT": str(self.metrics_port), "DSPEX_ENDPOINT": None, "DSPEX_FRONTEND": None,
               "DSPEX_BACKEND": None, "DSPEX_PYTHON": None}
        return CliRunner().invoke(dspexctl, list(args), env=env, catch_exceptions=False)


SMALL = """
[unix_http_server]
file = %(here)s/run/supervisor.sock

[supervisorctl]
serverurl = unix://%(here)s/run/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisord]
logfile = %(here)s/log/supervisord.log
pidfile = %(here)s/run/supervisord.pid
childlogdir = %(here)s/log
environment = LITELLM_LOCAL_MODEL_COST_MAP="True",PYTHONUNBUFFERED="1"
"""


def small_conf_text(pools: dict[str, int] | None = None, startretries: int = 1,
                    **settings: dict[str, str]) -> str:
    """The shipped broker and pool sections (``pools``: name -> numprocs; default one triage_pool
    worker), nothing else; ``settings[pool]`` overrides keys of ``[dspex:pool:POOL]``."""
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"))
    parser.read(SHIPPED_CONF)
    text = SMALL
    sections = ["program:broker"]
    for pool in pools or {"triage_pool": 1}:
        sections += [f"dspex:pool:{pool}", f"group:{pool}", f"program:{pool}"]
    for section in sections:
        text += f"\n[{section}]\n"
        pool = section.split(":")[-1]
        overrides = dict(settings.get(pool, {})) if section.startswith("dspex:pool:") else {}
        for key, value in parser.items(section):
            if key == "numprocs":
                value = str((pools or {"triage_pool": 1})[pool])
            if key == "startretries":
                value = str(startretries)
            text += f"{key} = {overrides.pop(key, value)}\n"
        text += "".join(f"{k} = {v}\n" for k, v in overrides.items())
    return text


@contextlib.contextmanager
def small_stack(pools: dict[str, int], *, conf_text: str | None = None,
                **settings: dict[str, str]) -> Iterator[SupervisedStack]:
    """A :class:`SupervisedStack` of :func:`small_conf_text` (or ``conf_text``, whose pools are
    ``pools``) under supervisord in the foreground, yielded once each pool has its workers ready
    (their dspy import over); stopped and removed after."""
    s = SupervisedStack(conf_text if conf_text is not None else small_conf_text(pools, **settings))
    try:
        s.start_foreground()

        def ready() -> bool:
            s.processes()  # records the pids (killed at the end) and wakes supervisord's loop
            return all(len(s.ready(pool)) == n for pool, n in pools.items())

        wait_for(ready, 120, 0.1, "the stack ready")
        yield s
    finally:
        s.stop()
        s.cleanup()


def dspexctl(stack: SupervisedStack, *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    """The real entry point, as a person runs it (cwd: the stack's dir, so ./supervisor.conf is found)."""
    env = dict(stack.env)
    env.pop("DSPEX_SUPERVISOR_CONF", None)
    return subprocess.run([sys.executable, "-m", "dspexctl", *args], cwd=stack.root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def no_traceback(res: Any) -> None:
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr


def cli_status(stack: SupervisedStack, *text_args: str, same_exit: bool = True) -> tuple[int, dict[str, Any], str]:
    """``pools status TEXT_ARGS`` then ``pools status --json``, neither with a traceback: (the text's
    exit code, the JSON document, the text). ``same_exit``: both exited with the same code. The
    document comes second: a state the text's exit code shows (a wait past half the queue timeout)
    has lasted at least as long in it."""
    text = dspexctl(stack, "pools", "status", *text_args)
    doc = dspexctl(stack, "pools", "status", "--json")
    no_traceback(doc)
    no_traceback(text)
    if same_exit:
        assert doc.returncode == text.returncode, (doc.stdout, text.stdout)
    return text.returncode, json.loads(doc.stdout), text.stdout


def dashboard_status(stack: SupervisedStack) -> dict[str, Any]:
    """The dashboard's ``/api/status`` document."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/api/status", timeout=10) as resp:
        return dict(json.loads(resp.read()))


CHAOS_POOLS = (
    ("triage_pool", "strict_queue"),
    ("optimizer_pool", "strict_queue"),
    ("analytics_pool", "hint"),
)


class Supervised(Supervisord):
    """A broker and its pools under a private supervisord with a generated conf (the chaos runs):
    programs killed through XML-RPC ``signalProcess(name, "KILL")`` come back (autorestart)."""

    def __init__(self, root: str, pools: tuple[tuple[str, str], ...] = CHAOS_POOLS, workers_per_pool: int = 2,
                 heartbeat: float = 1.0, liveness: int = 3, pool_opts: str = "queue_timeout=3",
                 broker_args: tuple[str, ...] = (), worker_args: tuple[str, ...] = ("--no-dspy",),
                 repo: Path = REPO) -> None:
        self.run_dir = os.path.join(root, "r")
        self.log_dir = os.path.join(root, "log")
        self.hits_dir = os.path.join(root, "hits")
        for d in (self.log_dir, self.hits_dir):
            os.makedirs(d, exist_ok=True)
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        self.frontend = f"ipc://{self.run_dir}/f.sock"
        self.backend = f"ipc://{self.run_dir}/b.sock"
        self.sock = os.path.join(root, "s.sock")
        self.pools = pools
        self.workers_per_pool = workers_per_pool
        self.heartbeat, self.liveness = heartbeat, liveness
        self.pool_opts = pool_opts
        self.broker_args = broker_args
        self.worker_args = worker_args
        self.repo = repo
        super().__init__(root, os.path.join(root, "supervisord.conf"),
                         {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_")})
        self._write_conf()

    @property
    def worker_names(self) -> list[str]:
        return [f"w_{p}:w_{p}_{i}" for p, _ in self.pools for i in range(self.workers_per_pool)]

    def _write_conf(self) -> None:
        specs = " ".join(f"--pool {name}:{mode}" + (f":{self.pool_opts}" if self.pool_opts else "")
                         for name, mode in self.pools)
        hb = f"--heartbeat {self.heartbeat} --liveness {self.liveness}"
        env = (f'DSPEX_RUN_DIR="{self.run_dir}",LITELLM_LOCAL_MODEL_COST_MAP="True",PYTHONUNBUFFERED="1",'
               f'PYTHONPATH="{self.repo}"')
        common = ("autorestart=true\nstartsecs=0\nstartretries=1000\nstopsignal=TERM\nstopwaitsecs=5\n"
                  f"redirect_stderr=true\ndirectory={self.repo}\nenvironment={env}\n")
        text = [
            f"[unix_http_server]\nfile={self.sock}\nchmod=0700\n",
            (f"[supervisord]\nlogfile={self.root}/supervisord.log\npidfile={self.root}/supervisord.pid\n"
            f"childlogdir={self.log_dir}\nnodaemon=true\nloglevel=info\n"),
            "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
            (f"[program:broker]\ncommand={PY} -m broker --frontend {self.frontend} --backend {self.backend} "
            f"{specs} {hb} {' '.join(self.broker_args)}\npriority=10\n{common}"
            f"stdout_logfile={self.log_dir}/broker.log\n"),
        ]
        for name, _ in self.pools:
            text.append(
                f"[program:w_{name}]\ncommand={PY} -m worker --pool {name} --backend {self.backend} {hb} "
                f"{' '.join(self.worker_args)}\nnumprocs={self.workers_per_pool}\n"
                "process_name=%(program_name)s_%(process_num)d\npriority=20\n"
                f"{common}stdout_logfile={self.log_dir}/%(program_name)s_%(process_num)d.log\n"
            )
        self.conf.write_text("\n".join(text))

    def start(self, timeout: float = 30.0) -> None:
        self.start_foreground()
        self.wait_registered(timeout)

    def infos(self) -> list[dict[str, Any]]:
        infos: list[dict[str, Any]] = self.rpc("supervisor.getAllProcessInfo")
        self.remember(int(i["pid"]) for i in infos if i.get("pid"))
        return infos

    def pid(self, name: str) -> int:
        info = self.rpc("supervisor.getProcessInfo", name)
        if info.get("pid"):
            self.remember([int(info["pid"])])
        return int(info.get("pid") or 0)

    def kill(self, name: str) -> int:
        """SIGKILL one program through supervisord; return the pid killed (0 if not running)."""
        pid = self.pid(name)
        if not pid:
            return 0
        try:
            self.rpc("supervisor.signalProcess", name, "KILL")
        except xmlrpc.client.Fault:
            return 0  # it just exited or is restarting
        return pid

    def registered(self) -> dict[str, int]:
        with dspex.connect(self.frontend, timeout=1.0) as c:
            return {name: len(p["workers"]) for name, p in c.status(timeout=1.0)["pools"].items()}

    def wait_registered(self, timeout: float = 30.0) -> float:
        t0 = time.monotonic()

        seen: list[dict[str, int]] = []

        def all_registered() -> bool:
            if not os.path.exists(self.frontend[6:]):
                return False
            reg = self.registered()
            seen[:] = [reg]
            return all(reg.get(p, 0) >= self.workers_per_pool for p, _ in self.pools)

        try:
            wait_for(all_registered, timeout, 0.05, "workers registered")
        except WaitTimeout as exc:  # the root goes with the test: say what was seen while it is here
            try:
                procs: Any = [(p["name"], p["statename"]) for p in self.processes()]
            except Exception as why:  # noqa: BLE001 - supervisord itself may be what went wrong
                procs = f"supervisord did not answer: {why!r}"
            raise WaitTimeout(f"{exc}; last registered: {seen[0] if seen else 'never answered'}; "
                              f"processes: {procs}\n{self.logs(1500)}") from None
        return time.monotonic() - t0

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.infos()
        except Exception:  # noqa: BLE001 - supervisord may already be gone
            pass
        if self.proc.poll() is None:
            try:
                self.rpc("supervisor.shutdown")
            except Exception:  # noqa: BLE001
                pass
        self.stop(wait=20)
        self.proc = None

    def logs(self, tail: int = 3000) -> str:
        out = []
        for p in sorted(Path(self.log_dir).glob("*.log")) + [Path(self.root, "supervisord.log")]:
            if p.exists():
                out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)
