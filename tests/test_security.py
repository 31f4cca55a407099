"""CURVE on TCP endpoints, the private run directory, and a worker on another (namespaced) host."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq.auth
from click.testing import CliRunner

import dspex
import dspex.aio
from dspexctl.cli import main
from dspexctl.keys import generate
from tests.harness import PY, REPO, Stack, WaitTimeout, base_env, free_port, wait_for

pytestmark = pytest.mark.timeout(90)


def curve_stack(stack: Stack, host: str = "127.0.0.1") -> dict[str, Path]:
    written = generate(Path(stack.root, "k"))
    stack.frontend = f"tcp://127.0.0.1:{free_port()}"
    stack.backend = f"tcp://{host}:{free_port()}"
    kdir = Path(stack.root, "k")
    stack.env.update(DSPEX_CURVE_SERVER_KEY=str(kdir / "broker.key"), DSPEX_CURVE_WORKER_KEY=str(written["worker"]))
    stack.start_broker("p:strict_queue", extra=["--curve-secret-key", str(written["broker"]),
                                                "--curve-allowed", str(written["allowed"])])
    return written


def test_curve_over_ipv6(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broker, worker and client on IPv6 addresses (bracketed: IPv6 is on for those sockets only)."""
    if not socket.has_ipv6 or not connectable_v6():
        pytest.skip("no IPv6 loopback here")
    written = generate(Path(stack.root, "k"))
    stack.frontend, stack.backend = f"tcp://[::1]:{free_port()}", f"tcp://[::1]:{free_port()}"
    kdir = Path(stack.root, "k")
    stack.env.update(DSPEX_CURVE_SERVER_KEY=str(kdir / "broker.key"), DSPEX_CURVE_WORKER_KEY=str(written["worker"]))
    stack.start_broker("p:strict_queue", extra=["--curve-secret-key", str(written["broker"]),
                                                "--curve-allowed", str(written["allowed"])])
    stack.start_worker("p", "--no-dspy")
    monkeypatch.setenv("DSPEX_CURVE_SERVER_KEY", str(kdir / "broker.key"))
    monkeypatch.setenv("DSPEX_CURVE_CLIENT_KEY", str(written["client"]))
    with dspex.connect(stack.frontend, timeout=10) as dx:
        wait_for(lambda: len(dx.status()["pools"]["p"]["workers"]) == 1, what="a worker registered over IPv6")
        assert dx.session("p").eval("6 * 7") == 42


def connectable_v6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_broker_refuses_tcp_without_keys(short_tmp: str) -> None:
    env = base_env(os.path.join(short_tmp, "r"))
    proc = subprocess.run([PY, "-m", "broker", "--frontend", f"tcp://127.0.0.1:{free_port()}", "--pool", "p"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "refusing to bind tcp://127.0.0.1" in proc.stderr and "CURVE" in proc.stderr


def test_client_needs_keys_for_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSPEX_CURVE_SERVER_KEY", raising=False)
    with pytest.raises(dspex.ConfigError, match="CURVE"):
        dspex.connect(f"tcp://127.0.0.1:{free_port()}")


def test_curve_allows_known_keys_and_refuses_others(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    written = curve_stack(stack)
    stack.start_worker("p", "--no-dspy")
    kdir = Path(stack.root, "k")
    monkeypatch.setenv("DSPEX_CURVE_SERVER_KEY", str(kdir / "broker.key"))
    monkeypatch.setenv("DSPEX_CURVE_CLIENT_KEY", str(written["client"]))
    with dspex.connect(stack.frontend, timeout=10) as dx:
        wait_for(lambda: len(dx.status()["pools"]["p"]["workers"]) == 1, what="curve worker registered")
        assert dx.session("p").eval("6 * 7") == 42
    # a key pair the broker does not know
    stranger = generate(Path(stack.root, "x"), peers=("stranger",))
    monkeypatch.setenv("DSPEX_CURVE_CLIENT_KEY", str(stranger["stranger"]))
    with dspex.connect(stack.frontend, timeout=10) as dx, \
            pytest.raises(dspex.Refused, match="the broker refused this client's key.*did not run"):
        dx.ping()

    async def refused_async() -> None:
        async with dspex.aio.connect(stack.frontend, timeout=10) as adx:
            await adx.ping()

    with pytest.raises(dspex.Refused, match="the broker refused this client's key.*did not run"):
        asyncio.run(refused_async())
    wait_for(lambda: "refused a CURVE peer" in Path(stack.root, "broker.log").read_text(), what="refusal logged")
    # a worker with an unknown key never registers
    stack.env["DSPEX_CURVE_WORKER_KEY"] = str(stranger["stranger"])
    stack.start_worker("p", "--no-dspy")
    wait_for(lambda: Path(stack.root, "broker.log").read_text().count("refused a CURVE peer") >= 2,
             what="worker refusal logged")
    monkeypatch.setenv("DSPEX_CURVE_CLIENT_KEY", str(written["client"]))
    with dspex.connect(stack.frontend, timeout=10) as dx:
        assert len(dx.status()["pools"]["p"]["workers"]) == 1


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_key_refused_before_the_first_send_is_refused_at_once(stack: Stack, monkeypatch: pytest.MonkeyPatch,
                                                                 kind: str) -> None:
    """On a loaded machine the broker can refuse the handshake before the request's first send:
    zmq has dropped the socket's only pipe then, and the send, which would wait for one, must end
    with the refusal (Refused: nothing ran), not wait out its timeout (BrokerUnreachable)."""
    curve_stack(stack)
    stranger = generate(Path(stack.root, "x"), peers=("stranger",))
    monkeypatch.setenv("DSPEX_CURVE_SERVER_KEY", str(Path(stack.root, "k", "broker.key")))
    monkeypatch.setenv("DSPEX_CURVE_CLIENT_KEY", str(stranger["stranger"]))

    log = Path(stack.root, "broker.log")

    def refused_first(connect: Callable[[], tuple[Any, Any]]) -> Callable[[], tuple[Any, Any]]:
        def connected() -> tuple[Any, Any]:
            refusals = log.read_text().count("refused a CURVE peer")
            sock, monitor = connect()
            wait_for(lambda: log.read_text().count("refused a CURVE peer") > refusals, what="the broker's refusal")
            # the refusal (an ERROR) takes the pipe with it: the socket cannot queue a message. (When
            # the connection's close overtook the ERROR, zmq keeps the pipe and reconnects: the send
            # queues, and the refusal reaches the waiting request.)
            with contextlib.suppress(WaitTimeout):
                wait_for(lambda: not sock.get(zmq.EVENTS) & zmq.POLLOUT, timeout=5, what="the pipe gone")
            return sock, monitor
        return connected

    timeout = 30.0
    started = time.monotonic()
    with pytest.raises(dspex.Refused, match="the broker refused this client's key.*did not run"):
        if kind == "sync":
            with dspex.connect(stack.frontend, timeout=timeout) as dx:
                monkeypatch.setattr(dx, "_connect", refused_first(dx._connect))
                dx.ping()
        else:
            async def ping() -> None:
                async with dspex.aio.connect(stack.frontend, timeout=timeout) as adx:
                    monkeypatch.setattr(adx, "_connect", refused_first(adx._connect))
                    await adx.ping()

            asyncio.run(ping())
    assert time.monotonic() - started < timeout / 2


def test_keys_generate_cli(short_tmp: str) -> None:
    result = CliRunner().invoke(main, ["keys", "generate", "--dir", os.path.join(short_tmp, "keys")])
    assert result.exit_code == 0, result.output
    kdir = Path(short_tmp, "keys")
    assert stat.S_IMODE(kdir.stat().st_mode) == 0o700
    # two allow-lists: a client key never joins the worker plane
    assert {p.name for p in (kdir / "allowed").iterdir()} == {"clients", "workers"}
    assert {p.name for p in (kdir / "allowed" / "clients").iterdir()} == {"client.key"}
    assert {p.name for p in (kdir / "allowed" / "workers").iterdir()} == {"worker.key"}
    assert stat.S_IMODE((kdir / "broker.key_secret").stat().st_mode) == 0o600


def test_ipc_run_dir_is_private(stack: Stack) -> None:
    stack.start_broker("p:strict_queue")
    assert stat.S_IMODE(Path(stack.run_dir).stat().st_mode) == 0o700


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (namespace, host-side link, host address)."""
    if sys.platform != "linux" or shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs Linux, iproute2 and root to create network namespaces")
    tag = uuid.uuid4().hex[:6]
    ns, host_link, ns_link = f"dx{tag}", f"vh{tag}", f"vn{tag}"
    octet = int(tag[:2], 16) % 250 + 1
    try:
        _ip("netns", "add", ns)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot create a network namespace here: {exc}")
    try:
        _ip("link", "add", host_link, "type", "veth", "peer", "name", ns_link)
        _ip("link", "set", ns_link, "netns", ns)
        _ip("addr", "add", f"10.231.{octet}.1/30", "dev", host_link)
        _ip("link", "set", host_link, "up")
        _ip("-n", ns, "addr", "add", f"10.231.{octet}.2/30", "dev", ns_link)
        _ip("-n", ns, "link", "set", ns_link, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns, host_link, f"10.231.{octet}.1"
    finally:
        subprocess.run(["ip", "link", "del", host_link], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_worker_on_another_host_cut_off(stack: Stack, netns: tuple[str, str, str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    ns, host_link, host_addr = netns
    written = curve_stack(stack, host=host_addr)
    local = stack.start_worker("p", "--no-dspy")
    remote = stack.start_worker("p", "--no-dspy", prefix=["ip", "netns", "exec", ns])
    kdir = Path(stack.root, "k")
    monkeypatch.setenv("DSPEX_CURVE_SERVER_KEY", str(kdir / "broker.key"))
    monkeypatch.setenv("DSPEX_CURVE_CLIENT_KEY", str(written["client"]))
    with dspex.connect(stack.frontend, timeout=10) as dx:
        wait_for(lambda: len(dx.status()["pools"]["p"]["workers"]) == 2, what="local and remote worker ready")
        by_pid = {}
        for _ in range(2):
            s = dx.session("p")
            by_pid[s.call("os", "getpid")] = s
        assert set(by_pid) == {local.pid, remote.pid}, "least-loaded placement used both hosts"
        on_remote, on_local = by_pid[remote.pid], by_pid[local.pid]
        _ip("link", "set", host_link, "down")  # the remote host vanishes without closing its TCP connection
        with pytest.raises(dspex.SessionWorkerUnavailable):
            wait_for(lambda: len(dx.status()["pools"]["p"]["workers"]) == 1, timeout=10,
                     what="remote worker expired by heartbeat")
            on_remote.call("os", "getpid")
        assert on_local.call("os", "getpid") == local.pid
        assert dx.session("p").call("os", "getpid") == local.pid


# -- trust on the worker plane ------------------------------------------------------------------
def test_client_key_is_refused_on_the_backend(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer holding a client key cannot register as a worker (and receive others' requests)."""
    written = curve_stack(stack)
    stack.env["DSPEX_CURVE_WORKER_KEY"] = str(written["client"])
    stack.start_worker("p", "--no-dspy")
    log = Path(stack.root, "broker.log")
    wait_for(lambda: "refused a CURVE peer from 127.0.0.1 on the workers plane" in log.read_text(),
             what="client key refused on the backend, with the peer's address")
    # the worker names the cause at once, not "broker silent" after the liveness timeout
    worker_log = Path(stack.root, "worker-p.log")
    wait_for(lambda: "ERROR dspex.worker: the broker refused this worker's key" in worker_log.read_text(),
             timeout=10, what="the worker's line about its refused key")
    assert "broker silent" not in worker_log.read_text().split("refused this worker's key")[0]
    kdir = Path(stack.root, "k")
    monkeypatch.setenv("DSPEX_CURVE_SERVER_KEY", str(kdir / "broker.key"))
    monkeypatch.setenv("DSPEX_CURVE_CLIENT_KEY", str(written["client"]))
    with dspex.connect(stack.frontend, timeout=10) as dx:
        assert dx.status()["pools"]["p"]["workers"] == []
    # `pools status` on the broker host names the refused worker host, its key and the fix, so the
    # operator need not read the broker's log to learn why a worker host's workers never came
    client_key = Path(written["client"])
    client_public = client_key.with_name(client_key.name.removesuffix("_secret"))
    public = client_public.read_text().split('public-key = "')[1].split('"')[0]
    env = {**base_env(), "DSPEX_ENDPOINT": stack.frontend, "DSPEX_CURVE_SERVER_KEY": str(kdir / "broker.key"),
           "DSPEX_CURVE_CLIENT_KEY": str(written["client"])}
    out = subprocess.run([PY, "-m", "dspexctl", "pools", "status"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    line = next((x for x in out.stdout.splitlines() if "refused" in x), "")
    assert line.startswith("WARN: the broker refused") and "worker connection(s) from 127.0.0.1" in line, out.stdout
    assert f"public key {public}" in line and f"is not in {Path(written['allowed'], 'workers')}" in line, line
    assert "dspexctl keys generate" in line, "the fix"
    # the worker's line names the same public key, so the two ends can be matched
    refused = next(x for x in worker_log.read_text().splitlines() if "refused this worker's key" in x)
    assert f"its public key {public} is not in the broker's allow-list, workers/ of its --curve-allowed" in refused
    doc = json.loads(subprocess.run([PY, "-m", "dspexctl", "--json", "pools", "status"], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=60, check=False).stdout)
    # the same line, but for the count and the time since the last (the worker keeps trying)
    def stable(text: str) -> str:
        return re.sub(r"refused \d+ (.*) the last \w+ ago", r"refused N \1 the last T ago", text)

    assert stable(line.removeprefix("WARN: ")) in map(stable, doc["problems"]), doc["problems"]
    monkeypatch.setenv("DSPEX_CURVE_CLIENT_KEY", str(written["worker"]))  # the worker key is no client key either
    with dspex.connect(stack.frontend, timeout=10) as dx, pytest.raises(dspex.Refused):
        dx.ping()


def test_a_wrong_server_key_is_named(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client or worker holding another broker's public key: "the server key does not match",
    a did-not-run error for the client, never "lost the connection" or "broker silent"."""
    written = curve_stack(stack)
    other = generate(Path(stack.root, "o"), peers=())
    wrong = str(Path(other["broker"]).with_name("broker.key"))
    stack.env["DSPEX_CURVE_SERVER_KEY"] = wrong
    stack.start_worker("p", "--no-dspy")
    monkeypatch.setenv("DSPEX_CURVE_SERVER_KEY", wrong)
    monkeypatch.setenv("DSPEX_CURVE_CLIENT_KEY", str(written["client"]))
    with dspex.connect(stack.frontend, timeout=10) as dx:
        started = time.monotonic()
        with pytest.raises(dspex.Refused, match="the server key does not match.*did not run"):
            dx.ping()
        assert time.monotonic() - started < 5, "named at the handshake, not at the timeout"

    async def ping_async() -> None:
        async with dspex.aio.connect(stack.frontend, timeout=10) as adx:
            await adx.ping()

    with pytest.raises(dspex.Refused, match="the server key does not match"):
        asyncio.run(ping_async())
    worker_log = Path(stack.root, "worker-p.log")
    wait_for(lambda: "ERROR dspex.worker: the server key does not match" in worker_log.read_text(), timeout=10,
             what="the worker's line about the server key")
    # where it failed and the key file the worker read: the broker host has only a count of failures
    assert (f"(the CURVE handshake with the broker at {stack.backend} failed, the broker's public key read "
            f"from {wrong}); retrying until the keys are fixed") in worker_log.read_text(), worker_log.read_text()
    # the broker names it too (zmq gives no peer address for a HELLO it cannot decrypt)
    broker_log = Path(stack.root, "broker.log")
    for plane in ("clients", "workers"):
        wait_for(lambda plane=plane: re.search(rf"WARNING dspex.broker: \d+ CURVE handshake\(s\) failed on the {plane} plane "
                                   r".*another broker's public key", broker_log.read_text()),
                 timeout=10, what=f"the broker's line about the {plane} plane")
    # with the right key the same worker process could register: the broker itself is fine
    monkeypatch.setenv("DSPEX_CURVE_SERVER_KEY", str(Path(stack.root, "k", "broker.key")))
    with dspex.connect(stack.frontend, timeout=10) as dx:
        assert dx.status()["pools"]["p"]["workers"] == []


def test_broker_refuses_a_single_allow_list(stack: Stack) -> None:
    written = generate(Path(stack.root, "k"))
    single = Path(stack.root, "single")
    single.mkdir()
    for f in (written["allowed"] / "clients").iterdir():
        shutil.copy(f, single / f.name)
    env = base_env(stack.run_dir)
    proc = subprocess.run([PY, "-m", "broker", "--frontend", f"tcp://127.0.0.1:{free_port()}", "--pool", "p",
                           "--curve-secret-key", str(written["broker"]), "--curve-allowed", str(single)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "separate allow-lists" in proc.stderr and "Traceback" not in proc.stderr


def test_sessions_belong_to_the_client_key_that_opened_them(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    kdir = Path(stack.root, "k")
    written = generate(kdir, peers=("alice", "bob", "worker"), admins=("ops",))
    stack.frontend = f"tcp://127.0.0.1:{free_port()}"
    stack.backend = f"tcp://127.0.0.1:{free_port()}"
    stack.env.update(DSPEX_CURVE_SERVER_KEY=str(kdir / "broker.key"), DSPEX_CURVE_WORKER_KEY=str(written["worker"]))
    stack.start_broker("p:strict_queue", extra=["--curve-secret-key", str(written["broker"]),
                                                "--curve-allowed", str(written["allowed"])])
    stack.start_worker("p", "--no-dspy")
    monkeypatch.setenv("DSPEX_CURVE_SERVER_KEY", str(kdir / "broker.key"))

    def as_(who: str) -> dspex.Client:
        monkeypatch.setenv("DSPEX_CURVE_CLIENT_KEY", str(written[who]))
        return dspex.connect(stack.frontend, timeout=10)

    with as_("alice") as alice, as_("bob") as bob, as_("ops") as ops:
        wait_for(lambda: len(alice.status()["pools"]["p"]["workers"]) == 1, what="worker ready")
        s = alice.session("p")
        s.exec("secret = 'alice'")
        assert [r["id"] for r in alice.sessions("p")] == [s.id]
        assert bob.sessions("p") == [], "bob lists only his own sessions"
        with pytest.raises(dspex.SessionNotYours):
            bob.session("p", s.id).eval("secret")
        with pytest.raises(dspex.SessionNotYours):
            bob.close_session(s.id)
        with pytest.raises(dspex.Refused):
            bob.recycle("p")
        assert s.eval("secret") == "alice"
        assert [r["id"] for r in ops.sessions("p")] == [s.id], "an admin key sees every session"
        alice_public, _ = zmq.auth.load_certificate(str(written["alice"]))
        assert [r["owner"] for r in ops.sessions("p")] == [alice_public.decode()], "and whose each one is"
        assert ops.close_session(s.id)["closed"]
        with pytest.raises(dspex.SessionClosed):
            s.eval("secret")


@pytest.mark.parametrize("problem", ["mode", "owner"])
def test_worker_and_client_refuse_a_run_dir_not_their_own(short_tmp: str, problem: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = Path(short_tmp, "r")
    run_dir.mkdir(mode=0o700)
    if problem == "mode":
        os.chmod(run_dir, 0o777)
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to make a directory owned by another uid")
        os.chown(run_dir, 65534, 65534)
    before = stat.S_IMODE(run_dir.stat().st_mode)
    env = base_env(str(run_dir))
    proc = subprocess.run([PY, "-m", "worker", "--pool", "p", "--no-dspy"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert ("must be 0700" if problem == "mode" else "belongs to uid 65534") in proc.stderr
    fix = f"chmod 700 {run_dir}" if problem == "mode" else "set DSPEX_RUN_DIR to a directory of your own"
    assert fix in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    monkeypatch.setenv("DSPEX_RUN_DIR", str(run_dir))
    monkeypatch.delenv("DSPEX_ENDPOINT", raising=False)
    monkeypatch.delenv("DSPEX_FRONTEND", raising=False)
    with dspex.connect(timeout=5) as dx, pytest.raises(dspex.ConfigError, match="run directory"):
        dx.ping()
    broker = subprocess.run([PY, "-m", "broker", "--pool", "p"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert broker.returncode == 2 and "run directory" in broker.stderr and fix in broker.stderr, broker.stderr
    assert stat.S_IMODE(run_dir.stat().st_mode) == before, "never chmod silently"
