"""Many hosts as an operator deploys them (docs/operations.md, "Many hosts"), seen from the broker
host: its supervisor.conf runs the broker on TCP and some of a pool's workers, ``[dspex:pool:NAME]
size`` counts the workers of every host, and a worker host runs the conf ``dspexctl hosts conf``
wrote. What ``dspexctl pools start``, ``pools status`` and the dashboard say while the worker host
is not up yet, when it is, when it goes silent (its supervisord and workers frozen: the TCP
connections stay open, as when a host loses power) and dies, and when it boots again.

The worker host is a second supervisord on this machine with a directory of its own; as root it
runs in a UTS namespace of its own, so its workers report another host name, as they would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dspex.stack.health import REGISTER_GRACE_S
from tests.harness import wait_for
from tests.harness.chaos import report
from tests.harness.procs import base_env, free_port, kill_pid
from tests.harness.supervisord import SUPERVISORD, SupervisedStack, Supervisord
from tests.test_cli import no_traceback
from tests.test_ops_python import small_conf_text

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

WORKER_HOST = "dxwh1"


def run(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "dspexctl", *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    no_traceback(out)
    return out


def own_uts_namespace() -> bool:
    """Root may give the worker host's supervisord a host name of its own (a UTS namespace)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--uts", "sh", "-c", f"hostname {WORKER_HOST} && hostname"],
                           capture_output=True, text=True, timeout=10, check=False)
    return probe.returncode == 0 and probe.stdout.strip() == WORKER_HOST


class Deployment:
    """The broker host (a SupervisedStack: broker on a TCP backend, one local triage worker, pool
    sizes counting the other host's) and one worker host's directory with its copied keys."""

    def __init__(self) -> None:
        self.port = free_port()
        conf = small_conf_text({"triage_pool": 1}, triage_pool={"size": "3"})
        conf = conf.replace('-m broker --config "%(here)s/supervisor.conf"',
                            f'-m broker --config "%(here)s/supervisor.conf" --backend tcp://127.0.0.1:{self.port} '
                            '--curve-secret-key "%(here)s/keys/broker.key_secret" '
                            '--curve-allowed "%(here)s/keys/allowed"')
        conf = conf.replace('PYTHONUNBUFFERED="1"',
                            f'PYTHONUNBUFFERED="1",DSPEX_BACKEND="tcp://127.0.0.1:{self.port}",'
                            'DSPEX_CURVE_SERVER_KEY="%(here)s/keys/broker.key",'
                            'DSPEX_CURVE_WORKER_KEY="%(here)s/keys/worker.key_secret"', 1)
        # a pool whose workers all run on the worker host: its section only
        conf += "\n[dspex:pool:analytics_pool]\naffinity = hint\nsize = 1\n"
        self.broker_host = SupervisedStack(conf)
        self.env = {k: v for k, v in self.broker_host.env.items() if k != "DSPEX_SUPERVISOR_CONF"}
        self.host = self.broker_host.root / "wh"
        self.hostname = WORKER_HOST if own_uts_namespace() else socket.gethostname()
        self.worker_host: Supervisord | None = None
        self.old: list[Supervisord] = []

    def keys(self) -> None:
        """`dspexctl keys generate` on the broker host; the two files a worker host needs copied."""
        out = run("keys", "generate", "--dir", "keys", cwd=self.broker_host.root, env=self.env)
        assert out.returncode == 0, out.stderr
        (self.host / "keys").mkdir(parents=True)
        for name in ("broker.key", "worker.key_secret"):
            shutil.copy(self.broker_host.root / "keys" / name, self.host / "keys" / name)

    def boot_worker_host(self) -> None:
        """supervisord -c workers.conf on the worker host (in the foreground, as a systemd unit runs it)."""
        if self.worker_host is not None:
            self.old.append(self.worker_host)
        argv = [SUPERVISORD]
        if self.hostname == WORKER_HOST:
            argv = ["unshare", "--uts", "sh", "-c", f'hostname {WORKER_HOST} && exec "$0" "$@"', SUPERVISORD]
        env = base_env()  # the worker host knows nothing of the broker host's run directory
        self.worker_host = Supervisord(self.host, self.host / "workers.conf", env, argv=argv)
        self.worker_host.start_foreground()

    def status(self, *args: str) -> tuple[int, dict[str, Any], str]:
        doc = run("--json", "pools", "status", *args, cwd=self.broker_host.root, env=self.env)
        text = run("pools", "status", *args, cwd=self.broker_host.root, env=self.env)
        return doc.returncode, json.loads(doc.stdout), text.stdout

    def dashboard(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.broker_host.metrics_port}/api/status"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return dict(json.load(resp))

    def close(self) -> None:
        for sup in [*self.old, *([self.worker_host] if self.worker_host else [])]:
            for pid in [sup.supervisord_pid, *sup.child_pids]:
                try:
                    os.kill(pid, signal.SIGCONT)  # a frozen process cannot act on SIGTERM
                except OSError:
                    pass
            sup.stop()
        self.broker_host.stop()
        self.broker_host.cleanup()


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    d = Deployment()
    try:
        yield d
    finally:
        d.close()


def pools_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in doc["pools"]}


def test_the_broker_host_counts_the_workers_of_other_hosts(deployment: Deployment) -> None:
    d = deployment
    figures: dict[str, Any] = {}
    d.keys()

    # the broker host first: pools start waits for what its own supervisord starts, not for the
    # worker host's workers (nothing it does can start those), and says what it still expects
    t = time.monotonic()
    out = run("pools", "start", "--wait", "90", cwd=d.broker_host.root, env=d.env)
    d.broker_host.adopt_daemon()
    figures["broker_host_start_s"] = round(time.monotonic() - t, 2)
    assert out.returncode == 0, out.stdout + out.stderr + d.broker_host.logs()
    assert "triage_pool: 1/3 ready (2 expected from other hosts)" in out.stdout, out.stdout
    assert "analytics_pool: 0/1 ready (1 expected from other hosts)" in out.stdout, out.stdout
    rc, doc, text = d.status()
    pools = pools_of(doc)
    # a young broker (under a minute) has not heard from every host yet: not a problem so far
    assert rc == 7 and [(p["name"], p["expected"], p["health"]) for p in doc["pools"]] == [
        ("triage_pool", 3, "starting"), ("analytics_pool", 1, "starting")], text

    # the worker host, as documented: conf written there, supervisord started
    conf = run("hosts", "conf", "--broker", f"tcp://127.0.0.1:{d.port}", "--pool", "triage_pool=2",
               "--pool", "analytics_pool=1", cwd=d.host, env=base_env())
    assert conf.returncode == 0, conf.stderr
    (d.host / "workers.conf").write_text(conf.stdout)
    t = time.monotonic()
    d.boot_worker_host()
    assert d.worker_host is not None
    wait_for(lambda: d.status()[0] == 0, 90, 0.5, "every pool OK with the worker host's workers")
    figures["worker_host_boot_to_ok_s"] = round(time.monotonic() - t, 2)
    rc, doc, text = d.status("-v")
    pools = pools_of(doc)
    assert [(p["name"], p["total"], p["expected"], p["health"]) for p in doc["pools"]] == [
        ("triage_pool", 3, 3, "ok"), ("analytics_pool", 1, 1, "ok")], text
    remote = {w["pid"]: w["host"] for w in pools["triage_pool"]["workers"] if w["process"] is None}
    assert len(remote) == 2 and set(remote.values()) == {d.hostname}, text
    assert text.splitlines()[2].split()[:2] == ["PROCESS", "HOST"], text
    for pid in remote:  # each of the worker host's workers is listed with its host
        assert any(str(pid) in line and d.hostname in line for line in text.splitlines()), text

    # --hard is a SIGKILL through this host's supervisord: refused, before anything is killed, for a
    # worker of another host (its pid here may be any process's)
    local_pid = next(w["pid"] for w in pools["triage_pool"]["workers"] if w["process"] is not None)
    remote_pid = next(iter(remote))
    for args in (["--worker", str(remote_pid)], ["--all"]) if d.hostname == WORKER_HOST else ():
        out = run("workers", "recycle", "triage_pool", *args, "--hard", cwd=d.broker_host.root, env=d.env)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stdout + out.stderr
        # --all names the first of the other host's workers it meets (the broker's order, not the listing's)
        named = [remote_pid] if args[0] == "--worker" else list(remote)
        assert any(f"(pid {pid}) runs on host {d.hostname}, not this one" in out.stderr for pid in named), out.stderr
        assert "without --hard" in out.stderr, out.stderr
    assert {w["pid"] for w in pools_of(d.status()[1])["triage_pool"]["workers"]} == {local_pid, *remote}
    if d.hostname != WORKER_HOST:  # one host name for both: the broker cannot tell losses here from there,
        broker_up = float(doc["broker"]["uptime_s"])  # so wait until missing workers are no longer "starting"
        time.sleep(max(0.0, REGISTER_GRACE_S - broker_up + 1))
    # the worker host goes silent: frozen, its TCP connections open (no FIN), as a host that loses power
    frozen = [d.worker_host.supervisord_pid, *(int(p["pid"]) for p in d.worker_host.processes())]
    t0 = time.monotonic()
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)

    def seen_gone() -> tuple[int, dict[str, Any], str] | None:
        got = d.status()
        if pools_of(got[1])["triage_pool"]["health"] != "ok":
            figures.setdefault("status_sees_host_gone_s", round(time.monotonic() - t0, 2))
        # each worker is dropped at the heartbeat check after its own last message: up to a beat apart
        return got if [p["total"] for p in got[1]["pools"]] == [1, 0] else None

    rc, doc, text = wait_for(seen_gone, 30, 0.2, "pools status noticing the silent host")
    figures["status_sees_all_gone_s"] = round(time.monotonic() - t0, 2)
    pools = pools_of(doc)
    assert rc == 5 and doc["health"] == "down", text
    assert (pools["triage_pool"]["health"], pools["analytics_pool"]["health"]) == ("degraded", "down"), text
    assert "WORKERS" in text and pools["triage_pool"]["total"] == 1 and pools["triage_pool"]["expected"] == 3
    reason = next(line for line in text.splitlines() if line.startswith("DEGRADED: triage_pool"))
    assert "1/3 workers ready (1 here, 2 expected from other hosts)" in reason, reason
    if d.hostname == WORKER_HOST:  # what became of them, named by host
        assert f"host {WORKER_HOST}: 2 stopped answering heartbeats" in reason, reason
        assert f"(0/1) (0 here, 1 expected from other hosts); host {WORKER_HOST}: 1 stopped answering heartbeats" \
            in text, text
    view = d.dashboard()["pools"]
    assert (view["triage_pool"]["state"], view["triage_pool"]["expected"]) == ("degraded", 3), view["triage_pool"]
    assert view["analytics_pool"]["state"] == "down"
    events = [e for e in d.dashboard()["events"] if e["event"] == "crash"]
    assert {e.get("host") for e in events} == {d.hostname} and len(events) == 3, events

    # the host dies; the same conf boots it again (its stale pidfile and socket taken over)
    for pid in frozen:
        kill_pid(pid)
    t1 = time.monotonic()
    d.boot_worker_host()

    def whole() -> tuple[int, dict[str, Any], str] | None:
        got = d.status()
        # registered, and none still importing dspy (starting until then)
        return got if [(p["total"], p["starting"], p["expected"]) for p in got[1]["pools"]] == [(3, 0, 3), (1, 0, 1)] \
            else None

    rc, doc, text = wait_for(whole, 90, 0.5, "every worker back after the worker host's boot")
    figures["boot_to_registered_s"] = round(time.monotonic() - t1, 2)
    # every worker is back; the crashes stay a WARN for the health window, then clear by themselves
    assert rc == 6 and [p["health"] for p in doc["pools"]] == ["warn", "warn"], text
    assert "WARN: triage_pool failed 2 time(s) in the last 5m: worker crash ×2" in text, text
    report("ops_many_hosts", figures)
