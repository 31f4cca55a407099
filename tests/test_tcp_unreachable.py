"""A tcp:// broker that cannot be reached (nothing listens at its port, its host name does not
resolve) fails its pools' calls at once with ``BrokerUnreachable`` naming the endpoint and why, as
an ipc one does, not with a ``Timeout`` after the call's deadline that says "the call may still be
running" (nothing was ever sent); the map's other broker serves on, and ``dspexctl pools status``
says ``UNREACHABLE`` (exit 4) with the same words. A worker host's workers say the same in their
log while the broker is silent."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import dspex
from dspexctl.keys import generate
from tests.harness import Stack, Workspace, base_env, free_port, wait_for
from tests.harness.supervisord import Supervisord
from tests.test_hosts import host_dir

pytestmark = pytest.mark.timeout(120)


@pytest.mark.slow  # it starts processes without a fixture conftest knows
def test_an_unreachable_tcp_broker_is_named_at_once(request: pytest.FixtureRequest,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSPEX_ENDPOINT", raising=False)
    ws = Workspace("dxu")
    stack = Stack(ws, "a")
    try:
        keys = generate(Path(ws.root, "k"))
        server_key, client_key = keys["broker"].with_suffix(".key"), keys["client"]
        monkeypatch.setenv("DSPEX_CURVE_SERVER_KEY", str(server_key))
        monkeypatch.setenv("DSPEX_CURVE_CLIENT_KEY", str(client_key))
        stack.frontend, stack.backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        stack.env.update(DSPEX_CURVE_SERVER_KEY=str(server_key), DSPEX_CURVE_WORKER_KEY=str(keys["worker"]))
        stack.start_broker("apool:strict_queue", extra=["--curve-secret-key", str(keys["broker"]),
                                                        "--curve-allowed", str(keys["allowed"])])
        stack.start_worker("apool", "--no-dspy")
        closed = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
        typo = "tcp://no-such-host.invalid:5555"
        endpoints = f"apool={stack.frontend},closed={closed},typo={typo}"
        with dspex.connect(endpoints=endpoints, timeout=10) as dx:
            assert dx.session("apool").eval("6 * 7") == 42
            for pool, endpoint, why in (("closed", closed, "nothing is listening"),
                                        ("typo", typo, "the host name no-such-host.invalid does not resolve")):
                started = time.monotonic()
                with pytest.raises(dspex.BrokerUnreachable, match=f"{why}.*{endpoint}|{endpoint}.*{why}"):
                    dx.session(pool).eval("1")
                assert time.monotonic() - started < 5, "failed only at the call's deadline"
            assert dx.session("apool").eval("1") == 1

        env = base_env(DSPEX_ENDPOINTS=endpoints, DSPEX_CURVE_SERVER_KEY=str(server_key),
                       DSPEX_CURVE_CLIENT_KEY=str(client_key))
        res = subprocess.run([sys.executable, "-m", "dspexctl", "--timeout", "5", "pools", "status"],
                             cwd=ws.root, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 4, res.stdout + res.stderr
        assert f"UNREACHABLE: broker unreachable: nothing is listening at {closed}" in res.stdout, res.stdout
        assert "no-such-host.invalid does not resolve" in res.stdout, res.stdout
        assert "may still be running" not in res.stdout, res.stdout
    finally:
        stack.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(ws.procs.logs())
        ws.close()



@pytest.mark.slow  # it starts processes without a fixture conftest knows
def test_a_worker_host_whose_broker_cannot_be_reached_says_why(short_tmp: str) -> None:
    """The conf `dspexctl hosts conf` writes, run by a real supervisord, pointing at a port where
    nothing listens and at a host name that does not resolve: each worker's log names the endpoint
    and why, not only "broker silent"."""
    keys = Path(short_tmp, "keys")
    generate(keys)
    closed = f"tcp://127.0.0.1:{free_port()}"
    typo = "tcp://no-such-host.invalid:5556"
    sups = []
    try:
        for name, endpoint in (("h1", closed), ("h2", typo)):
            host = host_dir(Path(short_tmp), keys, name)
            out = subprocess.run([sys.executable, "-m", "dspexctl", "hosts", "conf", "--broker", endpoint,
                                  "--pool", "triage_pool=1"], cwd=host, env=base_env(), capture_output=True,
                                 text=True, timeout=60, check=False)
            assert out.returncode == 0, out.stderr
            (host / "workers.conf").write_text(out.stdout)
            sup = Supervisord(host, host / "workers.conf", base_env())
            sups.append(sup)
            sup.start_foreground()
        for sup, why in ((sups[0], f"nothing is listening at {closed}"),
                         (sups[1], f"cannot reach {typo}: the host name no-such-host.invalid does not resolve")):
            log = sup.root / "triage_pool_00.log"
            wait_for(lambda log=log, why=why: log.is_file() and any(
                line.startswith("broker silent; new socket and READY") and f"): {why}" in line
                for line in (text.partition(" dspex.worker: ")[2] for text in log.read_text().splitlines())), 30,
                     what=f"the worker's log naming why ({why})")
    finally:
        for sup in sups:
            sup.stop()
