"""A worker that cannot do its job from its start is named, with the cause, instead of looking
healthy: the CLI as a subprocess and the dashboard's JSON against a real supervisord stack whose
triage_pool workers find a broken ``dspy`` first on their ``PYTHONPATH`` (the shipped broker and
triage_pool sections, one worker).

The worker stays up and serves plain Python (supervisord has nothing to restart, so nothing
flaps), but ``pools status`` is DEGRADED (exit 3) with a line naming the worker and the import's
error, ``--json`` has it on the worker's row as ``problem``, and the dashboard says the same.

A worker that dies at its start every time (a broken ``msgpack`` first on its ``PYTHONPATH``):
supervisord gives up after ``startretries`` (FATAL, not restarted forever), and ``pools status``
and the dashboard both quote the last line of its log, the cause.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import REPO, wait_for
from tests.harness.procs import short_tmpdir
from tests.harness.supervisord import SupervisedStack
from tests.test_cli import dspexctl, no_traceback
from tests.test_dashboard import browser, rows  # noqa: F401 - the fixture, for the page's test
from tests.test_ops_python import small_conf_text

pytestmark = [pytest.mark.slow]

BROKEN = "cannot import name 'BaseLM' from 'dspy.clients' (a half-installed upgrade)"


WORKER = 'command = /bin/sh "%(here)s/bin/dspex-python" -m worker --pool triage_pool'


@contextlib.contextmanager
def shadowed_stack(package: str, init: str, conf: str) -> Iterator[SupervisedStack]:
    """A supervised stack of ``conf`` whose triage_pool workers find ``package`` first on their
    PYTHONPATH, its ``__init__`` being ``init``; stopped, and the package removed, after."""
    shadow = Path(short_tmpdir())
    (shadow / package).mkdir()
    (shadow / package / "__init__.py").write_text(init)
    assert WORKER in conf
    s = SupervisedStack(conf.replace(WORKER, f'environment = PYTHONPATH="{shadow}:{REPO}"\n{WORKER}'))
    try:
        yield s
    finally:
        s.stop()
        s.cleanup()
        shutil.rmtree(shadow)


@pytest.fixture(scope="module")
def stack() -> Iterator[SupervisedStack]:
    with shadowed_stack("dspy", f"raise ImportError({BROKEN!r})\n", small_conf_text({"triage_pool": 1})) as s:
        s.start_foreground()
        wait_for(lambda: all(p["statename"] == "RUNNING" for p in s.processes()) and len(s.ready("triage_pool")) == 1,
                 120, 0.1, "the worker registered, its process RUNNING")
        yield s


@pytest.mark.timeout(180)
def test_a_worker_whose_dspy_import_failed_is_degraded_and_named(stack: SupervisedStack) -> None:
    (worker,) = stack.ready("triage_pool")
    with stack.client() as dx:
        assert dx.call("operator", "add", [1, 2], pool="triage_pool") == 3, "plain Python still runs there"
    line = f"worker {worker['incarnation'][:8]} (pid {worker['pid']}) cannot import dspy: ImportError: {BROKEN}"

    def degraded() -> tuple[int, dict, str] | None:
        doc = dspexctl(stack, "pools", "status", "--json")
        text = dspexctl(stack, "pools", "status")
        no_traceback(doc)
        no_traceback(text)
        return (doc.returncode, json.loads(doc.stdout), text.stdout) if text.returncode == 3 else None

    rc, doc, text = wait_for(degraded, 30, 0.5, "pools status DEGRADED")
    assert doc["health"] == "degraded" and rc == 3
    assert f"DEGRADED: triage_pool: {line} (its log has the traceback)" in text, text
    (row,) = doc["pools"][0]["workers"]
    assert row["problem"] == f"cannot import dspy: ImportError: {BROKEN}"
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/api/status", timeout=10) as resp:
        pool = json.loads(resp.read())["pools"]["triage_pool"]
    assert pool["state"] == "degraded" and any(line in r for r in pool["reasons"]), pool["reasons"]
    assert len(stack.processes()) == 2 and all(p["statename"] == "RUNNING" for p in stack.processes()), "no flapping"


@pytest.mark.timeout(180)
def test_a_recycle_whose_replacement_cannot_import_dspy_says_so(stack: SupervisedStack) -> None:
    """``workers recycle`` waits for the new incarnation's dspy import, and a replacement that
    reports a problem is named as pools status names it (exit 3), not called ready."""
    (old,) = stack.ready("triage_pool")
    res = dspexctl(stack, "--json", "workers", "recycle", "triage_pool")
    no_traceback(res)
    assert res.returncode == 3, res.stdout + res.stderr
    (r,) = json.loads(res.stdout)["recycled"]
    assert r["old"] == old["incarnation"] and r["problem"] == f"cannot import dspy: ImportError: {BROKEN}", r
    (new,) = stack.ready("triage_pool")
    assert new["incarnation"] == r["new"] and not new["preparing"], "its import was over when the command said so"
    text = dspexctl(stack, "workers", "recycle", "triage_pool")
    (newer,) = stack.ready("triage_pool")
    assert text.returncode == 3, text.stdout + text.stderr
    assert (f"DEGRADED: triage_pool: worker {newer['incarnation'][:8]} (pid {newer['pid']}) cannot import dspy: "
            f"ImportError: {BROKEN}") in text.stdout, text.stdout


@pytest.mark.timeout(300)
def test_pools_start_does_not_call_a_pool_ready_whose_workers_cannot_import_dspy() -> None:
    """``pools start`` waits for the workers' dspy import and says what ``pools status`` says of
    the outcome: DEGRADED, exit 3, the worker and the import's error named; the same for a start
    that finds supervisord running."""
    with shadowed_stack("dspy", f"raise ImportError({BROKEN!r})\n", small_conf_text({"triage_pool": 1})) as s:
        res = dspexctl(s, "pools", "start", "--wait", "120")
        s.adopt_daemon()
        no_traceback(res)
        (w,) = s.ready("triage_pool")
        line = f"DEGRADED: triage_pool: worker {w['incarnation'][:8]} (pid {w['pid']}) cannot import dspy: ImportError: {BROKEN}"
        assert res.returncode == 3, res.stdout + res.stderr
        assert line in res.stdout, res.stdout
        assert "triage_pool: 1/1 ready" not in res.stdout, "a pool whose worker reports a problem is not ready"
        again = dspexctl(s, "--json", "pools", "start", "--wait", "60")
        no_traceback(again)
        doc = json.loads(again.stdout)
        assert again.returncode == 3, again.stdout + again.stderr
        assert doc["health"] == "degraded" and doc["pools"]["triage_pool"]["state"] == "degraded", doc
        assert doc["pools"]["triage_pool"]["problems"] == [line.removeprefix("DEGRADED: triage_pool: ") + " (its log has the traceback)"], doc
        status = dspexctl(s, "pools", "status")
        assert status.returncode == 3 and line in status.stdout, status.stdout


@pytest.mark.timeout(180)
def test_a_worker_still_importing_dspy_is_starting_and_pools_start_waits_for_it() -> None:
    """A dspy whose import takes 6 s before it fails: meanwhile the registered worker is STARTING
    (exit 7, its -v row ``preparing``), not OK; ``pools start`` waits for the import's end and
    then says DEGRADED."""
    slow_fail = f"import time\ntime.sleep(6)\nraise ImportError({BROKEN!r})\n"
    with shadowed_stack("dspy", slow_fail, small_conf_text({"triage_pool": 1})) as s:
        s.start_foreground()
        wait_for(lambda: (s.processes(), s.status()["pools"]["triage_pool"]["workers"])[1], 60, 0.05,
                 "the worker registered")
        res = dspexctl(s, "pools", "status", "-v")
        no_traceback(res)
        (w,) = s.status()["pools"]["triage_pool"]["workers"]
        assert w["preparing"], "the import still ran after pools status: make the shadow dspy slower"
        assert res.returncode == 7, res.stdout
        assert "STARTING: triage_pool: 1 worker(s) starting" in res.stdout, res.stdout
        pool_row = next(ln.split() for ln in res.stdout.splitlines() if ln.startswith("triage_pool "))
        assert pool_row[2:4] == ["1/1", "0"], "registered, not ready yet"
        with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/api/status", timeout=10) as resp:
            pool = json.loads(resp.read())["pools"]["triage_pool"]
        assert pool["state"] == "starting" and pool["workers"][0]["preparing"], pool  # the dashboard's rule too
        assert any(ln.split()[4:5] == ["preparing"] for ln in res.stdout.splitlines() if w["id"] in ln), res.stdout
        start = dspexctl(s, "pools", "start", "--wait", "60")
        no_traceback(start)
        assert start.returncode == 3 and "cannot import dspy" in start.stdout, start.stdout + start.stderr
        assert not s.status()["pools"]["triage_pool"]["workers"][0]["preparing"]


@pytest.mark.timeout(180)
def test_the_dashboard_shows_a_worker_still_importing_dspy_as_preparing_then_ready(browser: Any) -> None:  # noqa: F811
    """In a real browser: while its dspy import runs (8 s here), the registered worker's row says
    ``preparing`` in the colour of a start, the pool is STARTING with 0 of 1 ready; once the import is
    over, ``ready`` and OK, without a reload."""
    slow = ("import sys, time\ntime.sleep(8)\nsys.path.remove(__path__[0].rpartition('/')[0])\n"
            "del sys.modules['dspy']\nimport dspy\n")
    with shadowed_stack("dspy", slow, small_conf_text({"triage_pool": 1})) as s:
        s.start_foreground()
        wait_for(lambda: (s.processes(), s.status()["pools"]["triage_pool"]["workers"])[1], 60, 0.05,
                 "the worker registered")
        browser.get(f"http://127.0.0.1:{s.metrics_port}/")

        def worker_row() -> dict[str, str] | None:
            return next((r for r in rows(browser, "workers") if r.get("incarnation")), None)

        row = wait_for(worker_row, 30, 0.1, "the registered worker's row")
        (pool,) = rows(browser, "pools")
        assert s.status()["pools"]["triage_pool"]["workers"][0]["preparing"], "make the shadow dspy slower"
        assert (row["td_wstate"], row["colour"]) == ("preparing", "starting"), row
        assert (pool["state"], pool["td_ready"]) == ("starting", "0 / 1"), pool
        with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert s.status()["pools"]["triage_pool"]["workers"][0]["preparing"], "make the shadow dspy slower"
        # an alert on ready workers sees it as not ready yet, as the page does
        assert 'dspex_workers{pool="triage_pool",state="preparing"} 1.0' in metrics.splitlines(), metrics
        assert 'dspex_workers{pool="triage_pool",state="ready"} 0.0' in metrics.splitlines(), metrics
        wait_for(lambda: (r := worker_row()) is not None and (r["td_wstate"], r["colour"]) == ("ready", "ok"), 60, 0.2,
                 "the row ready once the import is over")
        wait_for(lambda: [(p["state"], p["td_ready"]) for p in rows(browser, "pools")] == [("ok", "1 / 1")], 30, 0.2,
                 "the pool OK")


@pytest.mark.timeout(240)
def test_a_rolling_recycle_goes_on_only_once_the_replacement_imported_dspy() -> None:
    """``workers recycle --all`` keeps the pool serving: the next worker retires only once the
    previous one's replacement can run calls, not as soon as it registered while its dspy import
    (here 4 s) still runs."""
    # sleeps, then steps aside for the installed dspy, which the import of "dspy" then returns
    slow = ("import sys, time\ntime.sleep(4)\nsys.path.remove(__path__[0].rpartition('/')[0])\n"
            "del sys.modules['dspy']\nimport dspy\n")
    with shadowed_stack("dspy", slow, small_conf_text({"triage_pool": 2})) as s:
        s.start_foreground()
        wait_for(lambda: all(p["statename"] == "RUNNING" for p in s.processes()) and len(s.ready("triage_pool")) == 2,
                 120, 0.1, "two workers ready")
        import subprocess
        import sys

        env = dict(s.env)
        env.pop("DSPEX_SUPERVISOR_CONF", None)
        roll = subprocess.Popen([sys.executable, "-m", "dspexctl", "workers", "recycle", "triage_pool", "--all"],
                                cwd=s.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        fewest = 2
        with s.client(10) as dx:
            while roll.poll() is None:
                workers = dx.status()["pools"]["triage_pool"]["workers"]
                fewest = min(fewest, sum(1 for w in workers if w["state"] != "draining" and not w["preparing"]))
        out, err = roll.communicate(timeout=10)
        assert roll.returncode == 0, out + err
        assert fewest >= 1, "the pool had no worker able to run a call during the rolling recycle"


@pytest.mark.timeout(240)
def test_status_during_a_rolling_recycle_says_a_recycle_is_replacing_the_workers() -> None:
    """While ``workers recycle --all`` waits for a replacement's dspy import (4 s here), the pool is
    STARTING (exit 7) and its line says why, naming the worker being replaced: not a start out of
    nowhere. The dashboard says the same."""
    slow = ("import sys, time\ntime.sleep(4)\nsys.path.remove(__path__[0].rpartition('/')[0])\n"
            "del sys.modules['dspy']\nimport dspy\n")
    with shadowed_stack("dspy", slow, small_conf_text({"triage_pool": 2})) as s:
        s.start_foreground()
        wait_for(lambda: all(p["statename"] == "RUNNING" for p in s.processes()) and len(s.ready("triage_pool")) == 2,
                 120, 0.1, "two workers ready")
        old = {w["incarnation"][:8] for w in s.ready("triage_pool")}
        import subprocess
        import sys

        env = dict(s.env)
        env.pop("DSPEX_SUPERVISOR_CONF", None)
        roll = subprocess.Popen([sys.executable, "-m", "dspexctl", "workers", "recycle", "triage_pool", "--all"],
                                cwd=s.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            def starting() -> str | None:
                res = dspexctl(s, "pools", "status")
                no_traceback(res)
                return res.stdout if res.returncode == 7 else None

            text = wait_for(starting, 60, 0.1, "pools status STARTING during the roll")
            line = next(ln for ln in text.splitlines() if ln.startswith("STARTING: triage_pool"))
            assert "a recycle replaces worker" in line and line.rstrip(")").split()[-1] in old, line

            def dashboard_starting() -> list[str] | None:
                with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/api/status", timeout=10) as resp:
                    pool = json.loads(resp.read())["pools"]["triage_pool"]
                return pool["reasons"] if pool["state"] == "starting" else None

            reasons = wait_for(dashboard_starting, 30, 0.1, "the dashboard's STARTING during the roll")
            assert any("a recycle replaces worker" in r for r in reasons), reasons
        finally:
            out, err = roll.communicate(timeout=120)
        assert roll.returncode == 0, out + err


@pytest.mark.timeout(180)
def test_a_worker_that_dies_at_every_start_is_fatal_with_its_cause_in_the_cli_and_the_dashboard() -> None:
    missing = "libmsgpack.so.2: cannot open shared object file"
    cause = f"ImportError: {missing}"
    conf = small_conf_text({"triage_pool": 1}, startretries=2)
    with shadowed_stack("msgpack", f"raise ImportError({missing!r})\n", conf) as s:
        s.start_foreground()
        wait_for(lambda: [p["statename"] for p in s.processes() if p["group"] == "triage_pool"] == ["FATAL"],
                 60, 0.2, "supervisord giving up on the worker")
        res = dspexctl(s, "pools", "status")
        no_traceback(res)
        assert res.returncode == 5, res.stdout
        line = f"triage_pool:triage_pool_00 is FATAL (last log line: {cause})"
        assert f"DEGRADED: {line}" in res.stdout, res.stdout
        assert "DOWN: triage_pool has no ready worker (0/1)" in res.stdout

        def dashboard() -> list[str] | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/api/status", timeout=10) as resp:
                pool = json.loads(resp.read())["pools"]["triage_pool"]
            return pool["reasons"] if pool["state"] == "down" else None

        reasons = wait_for(dashboard, 20, 0.2, "the dashboard's DOWN")
        assert line in reasons, reasons
