"""The shipped supervisor.conf under a real supervisord: processes, recycling, policies, metrics.

One supervisord (module scope) runs a copy of the shipped conf in a short temp directory; the
only change is a recycle policy of max 5 requests on analytics_pool. Its commands find python
through ``.venv`` next to the conf (a symlink to this venv), the README's layout, with
DSPEX_PYTHON unset: the shipped default path is what runs here.
"""

from __future__ import annotations

import json
import re
import socket
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import dspex
from dspex.stack.supervisor import Supervisor, SupervisorConf, SupervisorUnreachable, full_name
from tests.harness import REPO, wait_for
from tests.harness.supervisord import BIN, POOLS, SHIPPED_CONF, SupervisedStack

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def set_pool_option(conf_text: str, pool: str, key: str, value: str) -> str:
    """Change ``key`` in ``[dspex:pool:POOL]`` of a conf's text (the key must be there)."""
    section = re.search(rf"^\[dspex:pool:{re.escape(pool)}\]\n(.*?)(?=^\[)", conf_text, re.DOTALL | re.MULTILINE)
    assert section, pool
    body, n = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", section.group(1), flags=re.MULTILINE)
    assert n == 1, key
    return conf_text[:section.start(1)] + body + conf_text[section.end(1):]


@pytest.fixture(scope="module")
def sup() -> Iterator[SupervisedStack]:
    text = set_pool_option(SHIPPED_CONF.read_text(), "analytics_pool", "max_requests", "5")
    stack = SupervisedStack(text)
    try:
        stack.start_foreground()
        stack.wait_all_ready()
        yield stack
    finally:
        stack.stop()
        stack.cleanup()


# -- the shipped conf ------------------------------------------------------------------------------
def test_shipped_conf_declares_the_flagship_pools() -> None:
    from dspex.stack.pools import load_pools

    pools = {p.name: p for p in load_pools(SHIPPED_CONF)}
    assert {n: p.affinity.value for n, p in pools.items()} == POOLS
    assert {n: p.size for n, p in pools.items()} == {"triage_pool": 2, "optimizer_pool": 2, "analytics_pool": 2}
    text = SHIPPED_CONF.read_text()
    for line in text.splitlines():
        if line.startswith("command"):
            assert " ;" not in line and " #" not in line, "a comment would cut this command short"
    assert (REPO / "run" / ".gitkeep").exists() and (REPO / "log" / ".gitkeep").exists()


def test_seven_processes_running_and_six_workers_ready(sup: SupervisedStack) -> None:
    out = subprocess.run([str(BIN / "supervisorctl"), "-c", str(sup.conf), "status"], env=sup.env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 7 and all(" RUNNING " in ln for ln in lines), out.stdout
    names = {full_name(p) for p in sup.processes()}
    assert names == {"broker:broker", *(f"{p}:{p}_{i:02d}" for p in POOLS for i in (0, 1))}
    st = sup.status()
    assert {n: p["affinity"] for n, p in st["pools"].items()} == POOLS
    assert all(p["size"] == 2 for p in st["pools"].values()), "the broker learns pool sizes from numprocs"
    # the workers run the venv's python found through %(here)s/.venv (DSPEX_PYTHON is unset)
    pid = st["pools"]["triage_pool"]["workers"][0]["pid"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0].decode() == str(sup.root / ".venv" / "bin" / "python")
    assert cmdline[1:4] == [b"-m", b"worker", b"--pool"]


def _rebuild(s: dspex.Session) -> dict[str, Any]:
    return {"ns": s.call("types", "SimpleNamespace", kwargs={"value": 42})}


def _use(s: dspex.Session, objs: dict[str, Any]) -> tuple[int, int]:
    return s.attr(objs["ns"], "value"), s.call("os", "getpid")


@pytest.mark.parametrize("hard", [False, True], ids=["graceful", "hard"])
def test_recycle_gives_new_incarnation_and_rehydrates(sup: SupervisedStack, hard: bool) -> None:
    before = sup.status()["pools"]["triage_pool"]
    with sup.client() as dx:
        r = dspex.Rehydrator(dx, "triage_pool", _rebuild)
        value, pid = r.run(_use)
        assert value == 42
        old = r.session.worker
        plain = dx.session("triage_pool", r.session.id)  # the same pinned session, without the helper
        plain.worker = old

        res = sup.cli("workers", "recycle", "triage_pool", "--worker", old[:8], *(["--hard"] if hard else []),
                      "--json")
        assert res.exit_code == 0, res.output
        data = json.loads(res.stdout)
        [rec] = data["recycled"]
        assert rec["old"] == old and rec["old_pid"] == pid
        assert rec["new"] != old and rec["new_pid"] != pid
        assert data["mode"] == ("hard" if hard else "graceful")
        assert f"new incarnation {rec['new'][:8]}" in res.stderr

        with pytest.raises(dspex.SessionWorkerUnavailable):
            plain.call("os", "getpid")
        value2, pid2 = r.run(_use)  # rebuilds on a new session and carries on
        assert value2 == 42 and pid2 != pid
        assert r.rehydrations == 1 and r.session.worker != old
        r.close()
    after = sup.status()["pools"]["triage_pool"]
    assert len([w for w in after["workers"] if w["state"] != "draining"]) == 2
    # --hard is the operator's recycle, told to the broker before the SIGKILL: a recycle, not a crash
    assert after["recycles"] == before["recycles"] + 1
    assert after["crashes"] == before["crashes"]
    sup.wait_all_ready()


def test_max_requests_policy_recycles_without_losing_a_request(sup: SupervisedStack) -> None:
    """analytics_pool has max_requests=5 (hint affinity): a worker retires after its 5th request,
    the pool rolls one worker at a time, and every call is answered."""
    start = sup.status()["pools"]["analytics_pool"]
    first = {w["incarnation"]: w for w in start["workers"]}
    with sup.client() as dx:
        s = dx.session("analytics_pool")
        expected: list[int] = []
        results: list[int] = []

        def call(i: int) -> None:
            expected.append(i + 1000)
            results.append(s.call("operator", "add", [i, 1000]))

        call(0)
        pinned = s.worker
        done = first[pinned]["served"] + first[pinned]["errors"] + 1
        for i in range(1, 4 - done + 1):
            call(i)
        assert s.worker == pinned
        time.sleep(0.3)  # several broker sweeps: 4 requests must not retire it
        assert pinned in {w["incarnation"] for w in sup.ready("analytics_pool")}
        call(99)  # the 5th
        assert s.worker == pinned
        wait_for(lambda: pinned not in {w["incarnation"] for w in sup.ready("analytics_pool")}, 10, 0.02,
                 "the worker retired after its 5th request")

        # keep calling (the session re-pins, hint affinity) until both first workers were retired
        i = 100
        while first.keys() & {w["incarnation"] for w in sup.ready("analytics_pool")}:
            call(i)
            i += 1
            sup.processes()  # wakes supervisord so the restart is prompt
            assert i < 2000, "the second worker was never retired"
            time.sleep(0.02)
        assert results == expected, "every request answered"

        def replaced() -> bool:
            sup.processes()
            ws = sup.ready("analytics_pool")
            return len(ws) == 2 and not first.keys() & {w["incarnation"] for w in ws}

        wait_for(replaced, 60, 0.1, "both analytics workers replaced")
        st = sup.status()["pools"]["analytics_pool"]
        assert st["recycles"] >= start["recycles"] + 2
        assert st["crashes"] == start["crashes"]
        assert st["requests_error"] == start["requests_error"]
        assert s.call("operator", "add", [1, 1]) == 2
    sup.wait_all_ready()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_counters_move(sup: SupervisedStack) -> None:
    ok_key = ("dspex_requests_total", (("op", "call"), ("outcome", "ok"), ("pool", "optimizer_pool")))
    count_key = ("dspex_request_duration_seconds_count", (("pool", "optimizer_pool"),))
    before = scrape(sup.metrics_port)
    with sup.client() as dx:
        s = dx.session("optimizer_pool")
        for _ in range(3):
            s.call("os", "getpid")
        with pytest.raises(dspex.PoolNotFound):
            s2 = dx.session("nope")
            s2.call("os", "getpid")
    after = scrape(sup.metrics_port)
    assert after[ok_key] == before.get(ok_key, 0) + 3
    assert after[count_key] == before[count_key] + 3
    inf = ("dspex_request_duration_seconds_bucket", (("le", "+Inf"), ("pool", "optimizer_pool")))
    assert after[inf] == after[count_key]
    for pool in POOLS:
        assert after[("dspex_workers", (("pool", pool), ("state", "ready")))] == 2
        assert after[("dspex_workers_expected", (("pool", pool),))] == 2
        assert ("dspex_queue_depth", (("pool", pool),)) in after
        for why in ("recycled", "hard_limit", "drain_deadline"):
            assert ("dspex_worker_recycles_total", (("pool", pool), ("why", why))) in after
        for why in ("connection_lost", "silent"):
            assert ("dspex_worker_crashes_total", (("pool", pool), ("why", why))) in after
    assert after[("dspex_sessions", (("pool", "optimizer_pool"),))] >= 1
    assert ("dspex_sessions_total", ()) not in after, "a gauge is never named _total"
    # optimizer_pool waits up to 900 s in its queue: the histograms' buckets reach that far
    assert ("dspex_queue_wait_seconds_bucket", (("le", "900.0"), ("pool", "optimizer_pool"))) in after
    assert after[("dspex_worker_starts_total", (("pool", "optimizer_pool"),))] >= 2
    # bound to loopback only: another address of this host does not answer
    addrs = {ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    for addr in addrs - {"127.0.0.1"}:
        if addr.startswith("127."):
            continue
        with socket.socket() as probe:
            probe.settimeout(2)
            assert probe.connect_ex((addr, sup.metrics_port)) != 0, f"metrics answer on {addr}"


def test_recycle_to_ready_times(sup: SupervisedStack) -> None:
    """Not a benchmark; a bound. Prints the medians (seen in -s / the report)."""
    times: dict[str, list[float]] = {"graceful": [], "hard": []}
    for mode in ("graceful", "hard", "graceful", "hard", "graceful", "hard"):
        res = sup.cli("workers", "recycle", "optimizer_pool", *(["--hard"] if mode == "hard" else []), "--json")
        assert res.exit_code == 0, res.output
        times[mode].append(json.loads(res.stdout)["recycled"][0]["seconds"])
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"recycle-to-ready medians: {med} (all: {times})")
    assert all(v < 15 for v in med.values())
    sup.wait_all_ready()


def test_supervisor_unreachable_is_a_clean_error(tmp_path: Path) -> None:
    conf = SupervisorConf.load(SHIPPED_CONF)
    bogus = SupervisorConf(conf.path, "unix:///tmp/dx-no-such-dir/supervisor.sock", None, None)
    with Supervisor(bogus, timeout=2) as s, pytest.raises(SupervisorUnreachable):
        s.state()
