"""Workers on other hosts: ``dspexctl hosts conf`` (the conf it writes and what it refuses), and
three network namespaces (a broker host and two worker hosts, each running a real supervisord with
its generated conf over TCP + CURVE) where one host vanishes and comes back."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import dspex
from dspexctl.keys import generate
from tests.harness import PY, REPO, Workspace, base_env, wait_for
from tests.harness.chaos import report
from tests.harness.procs import kill_pid
from tests.harness.supervisord import SUPERVISORD, Supervisord

pytestmark = pytest.mark.timeout(150)

# the defaults of broker and workers: the bound an operator gets. The broker drops a worker
# LIVENESS beats after the last message it had from it and checks once a beat.
HEARTBEAT, LIVENESS = 1.0, 3
BOUND = HEARTBEAT * (LIVENESS + 1)
LOAD_SLACK = 1.0  # two cores shared with other jobs
PORT = 5556


def dspexctl(*args: str, cwd: Path | str, env: dict[str, str] | None = None,
             prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, PY, "-m", "dspexctl", *args], cwd=cwd, env=env or base_env(),
                          capture_output=True, text=True, timeout=60, check=False)


def host_dir(root: Path, keys: Path, name: str) -> Path:
    """A worker host's directory with the two files an operator copies there (docs/operations.md)."""
    host = root / name
    (host / "keys").mkdir(parents=True)
    for key in ("worker.key_secret", "broker.key"):
        shutil.copy(keys / key, host / "keys" / key)
    return host


# -- the conf and its checks (no network) ----------------------------------------------------------
@pytest.fixture
def keys(short_tmp: str) -> Path:
    generate(Path(short_tmp, "keys"))
    return Path(short_tmp, "keys")


def test_conf_is_read_by_supervisord_as_intended(keys: Path) -> None:
    from supervisor.datatypes import RestartUnconditionally
    from supervisor.options import ServerOptions

    host = host_dir(keys.parent, keys, "worker host 1")  # a space and no bin/ or venv beside it
    out = dspexctl("hosts", "conf", "--broker", "tcp://broker.example:5556", "--pool", "triage_pool=3",
                   "--pool", "analytics_pool=1", cwd=host)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    conf = host / "workers.conf"
    conf.write_text(out.stdout)
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])  # supervisord's own parser and checks
    assert options.logfile == str(host / "supervisord.log")
    assert options.pidfile == str(host / "supervisord.pid")
    assert options.serverurl == f"unix://{host}/supervisor.sock"
    groups = {g.name: g.process_configs for g in options.process_group_configs}
    assert {name: [p.name for p in procs] for name, procs in groups.items()} == {
        "triage_pool": ["triage_pool_00", "triage_pool_01", "triage_pool_02"],
        "analytics_pool": ["analytics_pool_00"],
    }, "no broker: only the named pools' workers"
    for pool, procs in groups.items():
        for p in procs:
            assert shlex.split(p.command) == [
                sys.executable, "-P", "-m", "worker", "--pool", pool, "--backend", "tcp://broker.example:5556",
                "--curve-server-key", str(host / "keys" / "broker.key"),
                "--curve-key", str(host / "keys" / "worker.key_secret")]
            assert p.autorestart is RestartUnconditionally, "a recycled worker exits 0 and must come back"
            assert p.stopsignal == signal.SIGTERM and p.stopasgroup and p.killasgroup
            assert p.directory == str(host)
            assert p.stdout_logfile == str(host / f"{p.name}.log")
    assert not any(host.glob("*.log")), "writing the conf starts nothing"


def test_conf_under_json_is_one_json_document_with_the_same_conf(keys: Path) -> None:
    """--json (the global one, or the command's) only changes the presentation: the conf's text
    as a field beside what it was written from; the plain output stays the conf itself."""
    host = host_dir(keys.parent, keys, "wh")
    argv = ["--broker", "tcp://broker.example:5556", "--pool", "triage_pool=3", "--pool", "analytics_pool=1"]
    plain = dspexctl("hosts", "conf", *argv, cwd=host)
    assert plain.returncode == 0 and plain.stdout.startswith("; dspex workers of"), plain.stdout
    for args in (["--json", "hosts", "conf", *argv], ["hosts", "conf", *argv, "--json"]):
        out = dspexctl(*args, cwd=host)
        assert out.returncode == 0 and out.stderr == "", out.stderr
        doc = json.loads(out.stdout)
        assert doc == {"conf": plain.stdout, "broker": "tcp://broker.example:5556",
                       "pools": {"triage_pool": 3, "analytics_pool": 1},
                       "worker_key": str(host / "keys" / "worker.key_secret"),
                       "server_key": str(host / "keys" / "broker.key"), "python": sys.executable}, doc


def test_conf_help_describes_every_option(keys: Path) -> None:
    out = dspexctl("hosts", "conf", "--help", cwd=keys.parent)
    assert out.returncode == 0
    for option, words in (("--broker tcp://HOST:PORT", "worker endpoint"), ("--pool NAME=N", "worker processes"),
                          ("--worker-key PATH", "secret key"), ("--server-key PATH", "public key"),
                          ("--python PATH", "must import dspex")):
        assert option in out.stdout
        assert words in " ".join(out.stdout.split()), f"{option} is described"
    listed = dspexctl("hosts", "--help", cwd=keys.parent)
    assert "conf" in listed.stdout and "only workers" in listed.stdout


BAD_INPUT = [
    (["--broker", "ipc:///tmp/b.sock"], "is not a TCP endpoint"),
    (["--broker", "tcp://*:5556"], "is a bind address"),
    (["--broker", "tcp://broker.example"], "expected tcp://HOST:PORT"),
    (["--broker", "tcp://broker.example:70000"], "port from 1 to 65535"),
    (["--broker", "tcp://fd00::1:5556"], "an IPv6 address goes in brackets"),
    (["--pool", "triage_pool"], "expected NAME=N"),
    (["--pool", "triage_pool=0"], "at least 1"),
    (["--pool", "bad;name=1"], "expected NAME=N"),
    (["--pool", "-lead=1"], "not starting with '-'"),  # the worker's argv would read it as an option
    (["--pool", "triage_pool=2"], "pool triage_pool given twice"),
    (["--worker-key", "nowhere/worker.key_secret"], "does not exist: copy worker.key_secret"),
    (["--server-key", "nowhere/broker.key"], "does not exist: copy broker.key"),
    (["--worker-key", "keys/worker.key"], "holds a public key only"),
    (["--server-key", "keys/broker.key_secret"], "holds a secret key"),
    (["--server-key", "junk.txt"], "is not a CURVE key file"),
    (["--no-such-flag"], "No such option '--no-such-flag'"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUT, ids=[m for _, m in BAD_INPUT])
def test_conf_refuses_bad_input(keys: Path, extra: list[str], message: str) -> None:
    Path(keys.parent, "junk.txt").write_text("not a key\n")
    args = {"--broker": "tcp://broker.example:5556", "--pool": "triage_pool=1"}
    given = dict(zip(extra[::2], extra[1::2]))
    if "--pool" in given and "given twice" in message:
        argv = ["--broker", args["--broker"], "--pool", "triage_pool=1", *extra]
    else:
        argv = [*(x for k, v in args.items() if k not in given for x in (k, v)), *extra]
    out = dspexctl("hosts", "conf", *argv, cwd=keys.parent)
    assert out.returncode == 2, out
    assert out.stdout == "", "nothing goes to the conf"
    assert "Error:" in out.stderr and message in " ".join(out.stderr.split()), out.stderr
    assert "Traceback" not in out.stderr


def test_conf_refuses_an_interpreter_without_dspex(keys: Path) -> None:
    system = "/usr/bin/python3"
    env = {k: v for k, v in base_env().items() if k != "PYTHONPATH"}  # dspexctl itself from the checkout (cwd)
    if not os.access(system, os.X_OK) or subprocess.run(
            [system, "-P", "-c", "import dspex"], env=env, capture_output=True, timeout=30,
            check=False).returncode == 0:
        pytest.skip(f"needs an interpreter without dspex: {system} is missing or has it")
    out = dspexctl("hosts", "conf", "--broker", "tcp://broker.example:5556", "--pool", "p=1", "--python", system,
                   "--worker-key", str(keys / "worker.key_secret"), "--server-key", str(keys / "broker.key"),
                   cwd=REPO, env=env)
    assert out.returncode == 2 and out.stdout == ""
    assert f"{system} cannot import dspex" in out.stderr


# -- three hosts ------------------------------------------------------------------------------------
def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Host:
    """A worker host: its namespace, its link (``eth0``) and its supervisord."""

    ns: str
    broker_addr: str  # the broker host's end of this host's link
    root: Path
    supervisord: Supervisord | None = None
    old: list[Supervisord] = field(default_factory=list)

    def netns(self) -> str:
        return f"net:[{os.stat(f'/run/netns/{self.ns}').st_ino}]"

    def start(self) -> None:
        if self.supervisord is not None:
            self.old.append(self.supervisord)
        self.supervisord = Supervisord(self.root, self.root / "workers.conf", base_env(),
                                       argv=["ip", "netns", "exec", self.ns, SUPERVISORD])
        self.supervisord.start_foreground()

    def pids(self) -> set[int]:
        assert self.supervisord is not None
        return {int(p["pid"]) for p in self.supervisord.processes() if p["pid"]}

    def link(self, state: str) -> None:
        ip("-n", self.ns, "link", "set", "eth0", state)


@dataclass
class Net:
    broker_ns: str
    hosts: list[Host]
    ws: Workspace


@pytest.fixture
def net(request: pytest.FixtureRequest) -> Iterator[Net]:
    """A broker host with a link to each of two worker hosts (10.77.N.1 <-> 10.77.N.2); removed at
    the end with every process in them, pass or fail."""
    if sys.platform != "linux" or shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs Linux, iproute2 (`ip`) and root to create network namespaces")
    tag = uuid.uuid4().hex[:8]
    names = [f"dxb-{tag}", f"dxh1-{tag}", f"dxh2-{tag}"]
    made: list[str] = []
    hosts: list[Host] = []
    ws = Workspace("dxh")
    try:
        try:
            for name in names:
                ip("netns", "add", name)
                made.append(name)
        except (subprocess.CalledProcessError, OSError) as exc:
            pytest.skip(f"cannot create network namespaces here: {getattr(exc, 'stderr', b'') or exc!r}")
        for n, name in enumerate(names[1:], start=1):
            ip("-n", names[0], "link", "add", f"h{n}", "type", "veth", "peer", "name", "eth0", "netns", name)
            ip("-n", names[0], "addr", "add", f"10.77.{n}.1/24", "dev", f"h{n}")
            ip("-n", names[0], "link", "set", f"h{n}", "up")
            ip("-n", name, "addr", "add", f"10.77.{n}.2/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
            ip("-n", name, "link", "set", "lo", "up")
            hosts.append(Host(name, f"10.77.{n}.1", Path(ws.root, f"h{n}")))
        ip("-n", names[0], "link", "set", "lo", "up")
        yield Net(names[0], hosts, ws)
    finally:
        for host in hosts:
            for sup in [*host.old, *([host.supervisord] if host.supervisord else [])]:
                sup.procs.kill_leftovers()
                sup.procs.close()
        ws.procs.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(ws.procs.logs())
        for name in made:  # anything still running in our namespaces is ours: by pid
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10,
                                  check=False).stdout
            for pid in pids.split():
                kill_pid(int(pid))
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)
        ws.close()


HIT = """
import os
hits = 0
def hit():
    global hits
    hits += 1
    return hits, os.getpid(), os.readlink('/proc/self/ns/net')
"""


class Traffic(threading.Thread):
    """Calls ``hit()`` on each session in turn until stopped: every result, every error."""

    def __init__(self, sessions: list[dspex.Session]) -> None:
        super().__init__(daemon=True)
        self.sessions = sessions
        self.results: dict[str, list[tuple[int, int, str]]] = {s.id: [] for s in sessions}
        self.errors: list[BaseException] = []
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for s in self.sessions:
                started = time.monotonic()
                try:
                    self.results[s.id].append(tuple(s.eval("hit()", timeout=10)))
                except Exception as exc:  # noqa: BLE001 - every failure is a finding
                    self.errors.append(exc)
                self.latencies.append(time.monotonic() - started)


def outcome(fn: Any, t0: list[float], log: list[tuple[str, float, BaseException | None]], name: str) -> threading.Thread:
    """Run ``fn`` in a thread; log (name, seconds after t0[0] when it ended, the error)."""
    def run() -> None:
        try:
            fn()
            log.append((name, time.monotonic() - t0[0], None))
        except Exception as exc:  # noqa: BLE001 - the error is the outcome
            log.append((name, time.monotonic() - t0[0], exc))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def workers_of(dx: dspex.Client, pool: str) -> list[dict[str, Any]]:
    return [w for w in dx.status()["pools"][pool]["workers"] if w["state"] != "draining"]


@pytest.mark.slow
def test_a_worker_host_vanishes_and_comes_back(net: Net) -> None:
    ws, (h1, h2) = net.ws, net.hosts
    figures: dict[str, Any] = {}
    written = generate(Path(ws.root, "keys"))
    for host, pools in ((h1, ["--pool", "triage_pool=2"]),
                        (h2, ["--pool", "triage_pool=1", "--pool", "analytics_pool=1"])):
        host_dir(Path(ws.root), Path(ws.root, "keys"), host.root.name)
        out = dspexctl("hosts", "conf", "--broker", f"tcp://{host.broker_addr}:{PORT}", *pools, cwd=host.root,
                       prefix=("ip", "netns", "exec", host.ns))  # on the worker host, keys in ./keys
        assert out.returncode == 0, out.stderr
        (host.root / "workers.conf").write_text(out.stdout)
    run_dir = ws.path("r")
    os.makedirs(run_dir, mode=0o700)
    frontend = f"ipc://{run_dir}/f.sock"  # the client is on the broker host (a unix socket)
    ws.procs.spawn(["ip", "netns", "exec", net.broker_ns, PY, "-m", "broker", "--frontend", frontend,
                    "--backend", f"tcp://0.0.0.0:{PORT}", "--pool", "triage_pool:strict_queue:size=3",
                    "--pool", "analytics_pool:hint:size=1", "--curve-secret-key", str(written["broker"]),
                    "--curve-allowed", str(written["allowed"])], "broker.log", base_env(run_dir))
    started = time.monotonic()
    h1.start()
    h2.start()
    dx = dspex.connect(frontend, timeout=30)
    try:
        def all_ready() -> bool:
            return len(workers_of(dx, "triage_pool")) == 3 and len(workers_of(dx, "analytics_pool")) == 1
        wait_for(all_ready, 90, 0.2, "3 triage and 1 analytics workers from two hosts")
        figures["start_to_registered_s"] = round(time.monotonic() - started, 2)
        host_of = {pid: h for h in (h1, h2) for pid in h.pids()}
        assert {w["pid"] for w in workers_of(dx, "triage_pool")} <= set(host_of)

        # sessions across both hosts: least-loaded pinning gives each triage worker two
        sessions = [dx.session("triage_pool") for _ in range(6)]
        where: dict[str, Host] = {}
        for s in sessions:
            s.exec(HIT)
            hits, pid, netns = s.eval("hit()")
            assert hits == 1
            where[s.id] = host_of[pid]
            assert netns == host_of[pid].netns(), "the worker runs in its host's network namespace"
        analytics = dx.session("analytics_pool")
        analytics.exec(HIT)
        assert analytics.eval("hit()")[2] == h2.netns()
        on_h1 = [s for s in sessions if where[s.id] is h1]
        on_h2 = [s for s in sessions if where[s.id] is h2]
        assert len(on_h1) == 4 and len(on_h2) == 2

        # on each of h1's workers: one call running, one call of another session queued behind it
        by_pid: dict[int, list[dspex.Session]] = {}
        for s in on_h1:
            by_pid.setdefault(s.eval("hit()")[1], []).append(s)
        assert len(by_pid) == 2 and all(len(v) == 2 for v in by_pid.values())
        t0 = [0.0]
        ends: list[tuple[str, float, BaseException | None]] = []
        long_call = "(open(flag, 'w').close(), __import__('time').sleep(60))"
        flags = {pid: Path(ws.root, f"running-{pid}") for pid in by_pid}
        threads = [outcome(lambda s=ss[0], f=flags[pid]: s.eval(long_call, {"flag": str(f)}, timeout=30), t0, ends,
                           f"running-{pid}") for pid, ss in by_pid.items()]
        # past the broker's prefetch window (a request behind a call younger than 10 ms is sent
        # ahead to the worker): the next call of each worker waits in the broker
        wait_for(lambda: all(f.exists() and time.time() - f.stat().st_mtime > 0.05 for f in flags.values()),
                 10, what="a long call running on each of h1's workers")
        threads += [outcome(lambda s=ss[1]: s.eval("hit()", timeout=30), t0, ends, f"queued-{pid}")
                    for pid, ss in by_pid.items()]
        wait_for(lambda: all(w["queued"] == 1 for w in workers_of(dx, "triage_pool") if w["pid"] in by_pid),
                 10, what="a call queued behind each long call")
        traffic = Traffic([*on_h2, analytics])
        traffic.start()
        wait_for(lambda: sum(map(len, traffic.results.values())) >= 6, 10, what="traffic on h2")

        # h1 vanishes: its link goes down without a FIN, then the host dies (supervisord and its
        # workers SIGKILLed by pid while the link is down, so nothing they send gets out)
        h1_pids = h1.pids()
        t0[0] = time.monotonic()
        h1.link("down")
        assert h1.supervisord is not None
        kill_pid(h1.supervisord.supervisord_pid)
        for pid in h1_pids:
            kill_pid(pid)
        for thread in threads:
            thread.join(timeout=BOUND + 10)
        detected = time.monotonic() - t0[0]
        wait_for(lambda: len(workers_of(dx, "triage_pool")) == 1, 5, what="h1's workers gone from the broker")
        # every h1 session's next call: did not run, at once
        next_calls = []
        for s in on_h1:
            t = time.monotonic()
            with pytest.raises(dspex.SessionWorkerUnavailable):
                s.eval("hit()", timeout=10)
            next_calls.append(time.monotonic() - t)
        seen = sum(map(len, traffic.results.values()))
        wait_for(lambda: sum(map(len, traffic.results.values())) >= seen + 10, 10, what="h2 traffic after the cut")
        traffic.stop.set()
        traffic.join(timeout=15)

        kinds = {name: (round(at, 2), type(err).__name__) for name, at, err in ends}
        assert len(ends) == 4, kinds
        for name, at, err in ends:
            expected = dspex.WorkerCrashed if name.startswith("running") else dspex.SessionWorkerUnavailable
            assert isinstance(err, expected), kinds
            assert at <= BOUND + LOAD_SLACK, f"{name} answered {at:.2f}s after the cut, past the heartbeat bound {BOUND}s"
            assert at >= HEARTBEAT, f"{name} answered {at:.2f}s after the cut: the link cut was not silent"
        assert max(next_calls) < 1.0
        # h2 untouched: no error, each session's counter consecutive on its one worker
        assert traffic.errors == [], traffic.errors[:3]
        for s in [*on_h2, analytics]:
            got = traffic.results[s.id]
            assert [h for h, _, _ in got] == list(range(got[0][0], got[0][0] + len(got)))
            assert len({pid for _, pid, _ in got}) == 1 and got[0][2] == h2.netns()
        during = sorted(traffic.latencies)
        figures.update(detect_s=sorted(round(at, 3) for _, at, _ in ends), detect_all_s=round(detected, 2),
                       next_call_ms=round(1000 * max(next_calls), 1), h2_calls=len(during),
                       h2_p50_ms=round(1000 * during[len(during) // 2], 1), h2_max_ms=round(1000 * during[-1], 1))

        # h1 comes back: link up, then its supervisord starts again (the host boots) with the same conf
        h1.link("up")
        t1 = time.monotonic()
        h1.start()
        wait_for(lambda: len(workers_of(dx, "triage_pool")) == 3, 60, 0.1, "h1's new incarnations registered")
        figures["back_to_registered_s"] = round(time.monotonic() - t1, 2)
        new_pids = h1.pids()
        assert not new_pids & h1_pids
        for s in on_h1:  # a new incarnation: still "unavailable", never an unknown ref or a fresh namespace
            with pytest.raises(dspex.SessionWorkerUnavailable):
                s.eval("hit()", timeout=10)
        fresh = [dx.session("triage_pool") for _ in range(2)]
        for s in fresh:  # the least-loaded workers are h1's new ones
            s.exec(HIT)
            hits, pid, netns = s.eval("hit()")
            assert (hits, netns) == (1, h1.netns()) and pid in new_pids
        assert {s.eval("hit()")[1] for s in fresh} == new_pids

        # a partition only (h2's processes live on): its workers re-register by themselves when the
        # link is back, same incarnations and pids, and supervisord restarts nothing
        h2_pids = h2.pids()
        h2_incarnations = {w["incarnation"] for w in workers_of(dx, "triage_pool") if w["pid"] in h2_pids}
        t2 = time.monotonic()
        h2.link("down")
        wait_for(lambda: not any(w["pid"] in h2_pids for w in workers_of(dx, "triage_pool")), BOUND + 5, 0.05,
                 "h2's workers dropped")
        figures["partition_detect_s"] = round(time.monotonic() - t2, 2)
        with pytest.raises(dspex.SessionWorkerUnavailable):
            on_h2[0].eval("hit()", timeout=10)
        h2.link("up")
        t3 = time.monotonic()
        wait_for(lambda: {w["incarnation"] for w in workers_of(dx, "triage_pool") if w["pid"] in h2_pids}
                 == h2_incarnations, 30, 0.05, "h2's workers re-registered")
        figures["partition_back_to_registered_s"] = round(time.monotonic() - t3, 2)
        assert h2.pids() == h2_pids, "supervisord restarted nothing: the workers never exited"
        hits, pid, _ = on_h2[1].eval("hit()")
        assert pid in h2_pids and hits == len(traffic.results[on_h2[1].id]) + 2, "the session's state survived"
    finally:
        dx.close()
        report("many_hosts", figures)  # printed with -s or on failure; $DSPEX_CHAOS_JSON gets a line


@pytest.mark.slow
def test_worker_hosts_reach_the_broker_by_ipv6_address_and_by_host_name(net: Net) -> None:
    """The two other forms of ``--broker`` an operator writes: an IPv6 address (the broker bound on
    ``tcp://[::]:PORT``, dual-stack) and a host name the worker host resolves (its /etc/hosts)."""
    ws, (h1, h2) = net.ws, net.hosts
    try:  # h1's link gets IPv6 addresses (no duplicate detection: usable at once)
        ip("-n", net.broker_ns, "addr", "add", "fd77:1::1/64", "dev", "h1", "nodad")
        ip("-n", h1.ns, "addr", "add", "fd77:1::2/64", "dev", "eth0", "nodad")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"no IPv6 in network namespaces here: {exc.stderr!r}")
    # `ip netns exec` mounts /etc/netns/NAME/hosts over /etc/hosts for what runs in h2
    etc = Path("/etc/netns", h2.ns)
    etc.mkdir(parents=True)
    try:
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{h2.broker_addr} broker-host\n")
        written = generate(Path(ws.root, "keys"))
        for host, broker in ((h1, f"tcp://[fd77:1::1]:{PORT}"), (h2, f"tcp://broker-host:{PORT}")):
            host_dir(Path(ws.root), Path(ws.root, "keys"), host.root.name)
            out = dspexctl("hosts", "conf", "--broker", broker, "--pool", "triage_pool=1", cwd=host.root,
                           prefix=("ip", "netns", "exec", host.ns))
            assert out.returncode == 0, out.stderr
            (host.root / "workers.conf").write_text(out.stdout)
        run_dir = ws.path("r")
        os.makedirs(run_dir, mode=0o700)
        frontend = f"ipc://{run_dir}/f.sock"
        ws.procs.spawn(["ip", "netns", "exec", net.broker_ns, PY, "-m", "broker", "--frontend", frontend,
                        "--backend", f"tcp://[::]:{PORT}", "--pool", "triage_pool:strict_queue:size=2",
                        "--curve-secret-key", str(written["broker"]), "--curve-allowed", str(written["allowed"])],
                       "broker.log", base_env(run_dir))
        h1.start()
        h2.start()
        dx = dspex.connect(frontend, timeout=30)
        try:
            wait_for(lambda: {w["pid"] for w in workers_of(dx, "triage_pool")} == h1.pids() | h2.pids()
                     and len(h1.pids() | h2.pids()) == 2, 60, 0.2, "one worker from each host registered")
            sessions = [dx.session("triage_pool") for _ in range(2)]
            seen = {s.eval("(__import__('os').getpid(), __import__('os').readlink('/proc/self/ns/net'))")
                    for s in sessions}
            assert seen == {(next(iter(h.pids())), h.netns()) for h in (h1, h2)}, seen
        finally:
            dx.close()
    finally:
        shutil.rmtree(etc, ignore_errors=True)


@pytest.mark.slow
def test_a_worker_host_with_a_key_the_broker_does_not_allow_is_named_on_both_ends(net: Net) -> None:
    """A worker host given a worker key of another `keys generate` run (the right broker.key): its
    workers never register. The broker host's `pools status` names the host's address, its key and
    the allow-list; the worker's log names the same key."""
    ws, h1 = net.ws, net.hosts[0]
    written = generate(Path(ws.root, "keys"))
    other = generate(Path(ws.root, "other"))  # a worker key this broker never allowed
    host_dir(Path(ws.root), Path(ws.root, "keys"), h1.root.name)
    shutil.copy(other["worker"], h1.root / "keys" / "worker.key_secret")
    public = Path(other["worker"]).with_name("worker.key").read_text().split('public-key = "')[1].split('"')[0]
    out = dspexctl("hosts", "conf", "--broker", f"tcp://{h1.broker_addr}:{PORT}", "--pool", "triage_pool=1",
                   cwd=h1.root, prefix=("ip", "netns", "exec", h1.ns))
    assert out.returncode == 0, out.stderr
    (h1.root / "workers.conf").write_text(out.stdout)
    run_dir = ws.path("r")
    os.makedirs(run_dir, mode=0o700)
    frontend = f"ipc://{run_dir}/f.sock"
    ws.procs.spawn(["ip", "netns", "exec", net.broker_ns, PY, "-m", "broker", "--frontend", frontend,
                    "--backend", f"tcp://0.0.0.0:{PORT}", "--pool", "triage_pool:strict_queue:size=1",
                    "--curve-secret-key", str(written["broker"]), "--curve-allowed", str(written["allowed"])],
                   "broker.log", base_env(run_dir))
    h1.start()

    def refused_line() -> str | None:
        status = dspexctl("--endpoint", frontend, "pools", "status", cwd=ws.root)
        return next((x for x in status.stdout.splitlines() if x.startswith("WARN: the broker refused")), None)

    line = wait_for(refused_line, 30, 0.5, "pools status naming the refused worker host")
    assert "worker connection(s) from 10.77.1.2" in line, line
    assert f"public key {public} is not in {Path(written['allowed'], 'workers')}" in line, line
    assert "dspexctl keys generate" in line, line
    log = h1.root / "triage_pool_00.log"
    wait_for(lambda: log.exists() and f"its public key {public} is not in the broker's allow-list" in log.read_text(),
             10, 0.2, "the worker's line naming its refused key")
    assert "broker silent" not in log.read_text()
