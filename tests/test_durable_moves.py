"""Durable sessions moving under a real supervisord, which restarts what is killed or recycled:
``dspexctl workers recycle``, the broker SIGKILLed and restarted with its workers kept, a
rolling ``recycle --all`` under load. Each checks the session's refs, module state, demos and LM
(a DummyLM whose answers come in order) are the same after the move."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import dspex
from tests.harness import REPO, short_tmpdir, wait_for
from tests.harness.supervisord import Supervised
from tests.test_durable import ask, gone, state_of, typical

pytest.importorskip("dspy")
pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


@pytest.fixture
def sup() -> Iterator[Supervised]:
    root = short_tmpdir("dxd")
    stack = Supervised(root, pools=(("p", "strict_queue"),), workers_per_pool=2, heartbeat=0.5, liveness=3,
                       pool_opts="queue_timeout=60", worker_args=())
    try:
        stack.start(timeout=120)
        yield stack
    finally:
        stack.close()
        subprocess.run(["rm", "-rf", root], check=False)


def dspexctl(sup: Supervised, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DSPEX_RUN_DIR": sup.run_dir, "DSPEX_ENDPOINT": sup.frontend, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dspexctl", *args], cwd=sup.root, env=env, capture_output=True,
                          text=True, timeout=180, check=False)


def name_of(sup: Supervised, pid: int) -> str:
    (name,) = [f"{i['group']}:{i['name']}" for i in sup.infos() if i["pid"] == pid]
    return name


def without_pid(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in ("pid", "history")}


def test_dspexctl_workers_recycle_moves_the_session(sup: Supervised) -> None:
    with dspex.connect(sup.frontend, timeout=60) as dx:
        s = dx.session("p", durable=True)
        refs = typical(s)
        assert ask(s, refs["cot"], "one") == "answer 0"
        before = state_of(s, refs)
        pinned = next(w for w in dx.status()["pools"]["p"]["workers"] if w["pid"] == before["pid"])
        res = dspexctl(sup, "workers", "recycle", "p", "--worker", pinned["id"])
        assert res.returncode == 0, res.stdout + res.stderr
        assert ask(s, refs["cot"], "two") == "answer 1"
        after = state_of(s, refs)
        assert after["pid"] != before["pid"] and without_pid(after) == without_pid(before)
        assert after["history"] == 2
        listed = dspexctl(sup, "sessions", "list")
        assert "yes (" in listed.stdout and s.id in listed.stdout, listed.stdout


def test_broker_sigkill_and_restart_with_workers_kept_then_a_worker_kill(sup: Supervised) -> None:
    with dspex.connect(sup.frontend, timeout=60) as dx:
        s = dx.session("p", durable=True)
        refs = typical(s)
        assert ask(s, refs["cot"], "one") == "answer 0"
        before = state_of(s, refs)
        old_broker = dx.ping()["pid"]
        sup.kill("broker")
        wait_for(lambda: _ping(dx) not in (None, old_broker), timeout=60, what="the restarted broker")
        assert ask(s, refs["cot"], "two") == "answer 1"  # on its kept worker, re-adopted
        kept = state_of(s, refs)
        assert kept["pid"] == before["pid"] and without_pid(kept) == without_pid(before)
        sup.kill(name_of(sup, before["pid"]))  # now its worker goes too: the store has its state
        gone(dx, "p", before["pid"])
        assert ask(s, refs["cot"], "three") == "answer 2"
        moved = state_of(s, refs)
        assert moved["pid"] != before["pid"] and without_pid(moved) == without_pid(before)
        assert moved["history"] == 3


def _ping(dx: dspex.Client) -> int | None:
    try:
        return int(dx.ping(timeout=1)["pid"])
    except dspex.DspexError:
        return None


def test_rolling_recycle_all_under_load_loses_and_repeats_nothing(sup: Supervised) -> None:
    """Four sessions call their programs back to back while every worker is recycled in turn:
    each session's DummyLM hands out answer n to its n-th call, so the answers every session got
    are 0, 1, 2... with no gap (a lost state) and no repeat (a call applied twice)."""
    with dspex.connect(sup.frontend, timeout=120) as dx:
        sessions = [dx.session("p", durable=True) for _ in range(4)]
        programs = [typical(s, 4000)["cot"] for s in sessions]
        got: list[list[str]] = [[] for _ in sessions]
        errors: list[BaseException] = []
        stop = threading.Event()

        def load(i: int) -> None:
            try:
                while not stop.is_set():
                    got[i].append(ask(sessions[i], programs[i], f"q{len(got[i])}"))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(len(sessions))]
        for t in threads:
            t.start()
        wait_for(lambda: all(len(g) >= 3 for g in got) or errors, timeout=60, what="load running")
        old = {w["incarnation"] for w in dx.status()["pools"]["p"]["workers"]}
        res = dspexctl(sup, "workers", "recycle", "p", "--all")
        assert res.returncode == 0, res.stdout + res.stderr
        new = {w["incarnation"] for w in dx.status()["pools"]["p"]["workers"]}
        counts = [len(g) for g in got]
        wait_for(lambda: all(len(g) > c + 3 for g, c in zip(got, counts)) or errors, timeout=60,
                 what="calls on the new workers")
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert not new & old and len(new) == 2
        for answers in got:
            assert answers == [f"answer {n}" for n in range(len(answers))], answers
        moves = dx.status()["checkpoints"]["moves"]
        assert moves >= 2, moves  # at least the sessions of the first worker recycled moved
        print(f"calls {sum(map(len, got))}, sessions moved {moves}", file=sys.stderr)
