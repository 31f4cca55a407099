"""Durable sessions in combinations the earlier rounds left out (dur21x): a close cut by a broker
SIGKILL, a session waiting for its move as operators see it. Real broker and workers, the broker
SIGSTOPped and SIGKILLed by pid and restarted on the same run dir, workers SIGKILLed by pid, the
CLI as a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import dspex
import dspex.aio
from dspex.client import aiochannel, sync
from tests.harness import Stack, wait_for
from tests.test_durable import gone, pid_of

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(120)


def _stored(stack: Stack) -> set[str]:
    with sqlite3.connect(os.path.join(stack.run_dir, "checkpoints.sqlite")) as db:
        return {row[0] for row in db.execute("SELECT id FROM sessions")}


@pytest.mark.parametrize("kind", ["blocking", "asyncio"])
def test_a_close_the_broker_died_with_reaches_the_restarted_broker_and_deletes_the_checkpoint(
        stack: Stack, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """The close was sent to a broker that died before answering: sent again once to the broker
    that comes back (closing is idempotent), so the session's checkpoint goes with the close,
    not an idle TTL (an hour by default) later; the session kept open is untouched."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    loop = asyncio.new_event_loop()
    adx = dspex.aio.connect(stack.frontend, timeout=20)
    closed: Any = adx.session("p", durable=True) if kind == "asyncio" else dx.session("p", durable=True)
    kept = dx.session("p", durable=True)
    put = closed.put([1, 2, 3])
    if kind == "asyncio":
        loop.run_until_complete(put)
    box = kept.put([4])
    assert _stored(stack) == {closed.id, kept.id}
    sent = threading.Event()
    if kind == "asyncio":
        real_async_send = aiochannel.AsyncChannel.send

        async def async_send(channel: Any, frames: list[Any], timeout: float) -> None:
            await real_async_send(channel, frames, timeout)
            sent.set()

        monkeypatch.setattr(aiochannel.AsyncChannel, "send", async_send)
        close: Any = lambda: loop.run_until_complete(closed.close())
    else:
        real_send = sync.Client._send

        def send(client: Any, ch: Any, frames: list[Any], timeout: float) -> None:
            real_send(client, ch, frames, timeout)
            if threading.current_thread().name == "closing":
                sent.set()

        monkeypatch.setattr(sync.Client, "_send", send)
        close = closed.close
    assert stack.broker is not None
    os.kill(stack.broker.pid, signal.SIGSTOP)  # the close reaches a broker that never answers it
    closing = threading.Thread(target=close, name="closing")
    closing.start()
    try:
        assert sent.wait(10)
        stack.kill(stack.broker)
        stack.broker.wait(10)
        stack.start_broker()
        stack.wait_workers("p", 2)
    finally:
        closing.join(30)
    assert not closing.is_alive()
    loop.run_until_complete(adx.close())
    loop.close()
    assert [r["id"] for r in dx.sessions("p")] == [kept.id]
    assert _stored(stack) == {kept.id}
    assert kept.eval("b + [5]", {"b": box}) == [4, 5]
    with pytest.raises(dspex.SessionClosed):
        dx.session("p", closed.id).eval("1")


def _dspexctl(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**stack.env, "DSPEX_ENDPOINT": stack.frontend, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dspexctl", *args], cwd=stack.root, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_a_durable_session_whose_worker_died_is_listed_counted_and_closed_by_dspexctl(stack: Stack) -> None:
    """Its worker SIGKILLed, the session waits for its next call to move: it is a session of the
    pool (listed with its worker gone, counted), and `dspexctl sessions close --all` reaches it and
    deletes its checkpoint."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    durable = dx.session("p", durable=True)
    durable.put(list(range(100)))
    pid = pid_of(durable)
    stack.kill(pid)
    gone(dx, "p", pid)
    (row,) = dx.sessions("p")
    assert row["id"] == durable.id and row["durable"] and not row["worker_alive"]
    assert dx.status()["pools"]["p"]["sessions"] == 1
    listed = _dspexctl(stack, "sessions", "list")
    assert listed.returncode == 0 and durable.id in listed.stdout and "(gone)" in listed.stdout, listed
    closed = _dspexctl(stack, "sessions", "close", "--all")
    assert closed.returncode == 0 and durable.id[:8] in closed.stdout, closed
    assert dx.sessions("p") == [] and _stored(stack) == set()
    with pytest.raises(dspex.SessionClosed):
        durable.eval("1")


def test_sessions_made_durable_by_the_pool_stay_durable_after_the_setting_is_removed(stack: Stack) -> None:
    """The pool's `durable = true` gone when the broker restarts: the sessions it made durable
    keep their checkpoints (the store has them) and move with their state; new sessions are
    plain (docs/operations.md, "Durable sessions")."""
    dx = stack.pool("p:strict_queue:durable=true", 2, "--no-dspy")
    s = dx.session("p")
    box = s.put([1, 2])
    s.exec("n = 5")
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.broker.wait(10)
    stack.start_broker("p:strict_queue")
    stack.wait_workers("p", 2)
    s.exec("n += 1")
    pid = pid_of(s)
    stack.kill(pid)
    gone(dx, "p", pid)
    assert s.eval("(n, b, __import__('os').getpid() != pid)", {"b": box, "pid": pid}) == (6, [1, 2], True)
    new = dx.session("p")
    new.put(1)
    assert {r["id"]: r["durable"] for r in dx.sessions("p")} == {s.id: True, new.id: False}


CODE = '''
import os, time
import dspy

SEEN = []


def add(i, pause=0.0):
    time.sleep(pause)
    SEEN.append(i)
    return i, os.getpid()


def seen():
    return list(SEEN)


def answer(q):
    return dspy.Predict("question -> answer")(question=q).answer
'''


def _restart_broker(stack: Stack, workers: int = 2) -> None:
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.broker.wait(10)
    stack.start_broker()
    stack.wait_workers("p", workers)


def _kill_its_worker(stack: Stack, dx: dspex.Client, s: dspex.Session) -> None:
    pid = pid_of(s)
    stack.kill(pid)
    gone(dx, "p", pid)


@pytest.mark.parametrize("capacity,pause", [("3", 0.005), ("1", 0.0)], ids=["capacity-3", "capacity-1-prefetch"])
def test_calls_of_one_session_in_flight_from_six_threads_when_its_worker_is_killed(
        stack: Stack, usercode: Any, capacity: str, pause: float) -> None:
    """Six threads call one durable session at once (its calls run one at a time, the others wait
    in the broker, or are prefetched to a capacity-1 worker), beside three other durable sessions
    on the same workers; the session's worker is SIGKILLed mid-way. Every acknowledged append is
    in the restored list exactly once; one that raised WorkerCrashed is there at most once; none
    that was never sent."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy", "--capacity", capacity)
    mod = usercode(CODE)
    s = dx.session("p", durable=True)
    neighbours = [dx.session("p", durable=True) for _ in range(3)]
    pid = s.run(mod.add, -1)[1]
    acked: list[int] = []
    crashed: list[int] = []
    failed: list[str] = []

    def calls(base: int) -> None:
        for i in range(base, base + 40):
            try:
                s.run(mod.add, i, pause)
                acked.append(i)
            except dspex.WorkerCrashed:
                crashed.append(i)
            except Exception as exc:  # noqa: BLE001 - any other outcome fails the test below
                failed.append(repr(exc))

    def neighbour(n: dspex.Session) -> None:
        for i in range(40):
            try:
                n.run(mod.add, i, pause)
            except dspex.WorkerCrashed:
                pass

    threads = [threading.Thread(target=calls, args=(1000 * k,)) for k in range(1, 7)]
    threads += [threading.Thread(target=neighbour, args=(n,)) for n in neighbours]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acked) > 40, 60, what="40 calls acknowledged")
        stack.kill(pid)
        stack.start_worker("p", "--no-dspy", "--capacity", capacity)
    finally:
        for t in threads:
            t.join(120)
    assert not failed and not any(t.is_alive() for t in threads)
    final = s.run(mod.seen)
    assert len(final) == len(set(final))
    assert set(acked) <= set(final)
    assert set(final) - {-1} <= set(acked) | set(crashed)
    assert len(acked) + len(crashed) == 240


def test_the_clients_lm_replaced_after_a_move_and_a_broker_restart_is_the_one_the_session_uses(
        stack: Stack, usercode: Any) -> None:
    """``dspy.configure(lm=...)`` in the client travels with the calls: after a kill -9 the
    restored session goes on with the client's LM (its DummyLM answers on from where it was), a
    new one configured after the move reaches it, and so does switching back after a broker
    restart and another kill (each LM keeps its own place in its answers)."""
    import dspy
    from dspy.utils import DummyLM

    from tests.conformance.harness import fresh_dspy_settings

    dx = stack.pool("p:strict_queue", 2)
    mod = usercode(CODE)
    s = dx.session("p", durable=True)
    lm_a, lm_b = (DummyLM([{"answer": f"{name}{i}"} for i in range(20)]) for name in "AB")
    with fresh_dspy_settings():
        dspy.configure(lm=lm_a)
        assert [s.run(mod.answer, "q") for _ in range(2)] == ["A0", "A1"]
        _kill_its_worker(stack, dx, s)
        stack.start_worker("p")
        stack.wait_workers("p", 2)
        assert s.run(mod.answer, "q") == "A2"
        dspy.configure(lm=lm_b)
        assert s.run(mod.answer, "q") == "B0"
        _restart_broker(stack)
        assert s.run(mod.answer, "q") == "B1"
        dspy.configure(lm=lm_a)
        assert s.run(mod.answer, "q") == "A3"
        _kill_its_worker(stack, dx, s)
        assert s.run(mod.answer, "q") == "A4"
        dspy.configure(lm=lm_b)
        assert s.run(mod.answer, "q") == "B2"


MODULE_A = '''
import {b} as b

STATE = {{"a": 0}}


def bump():
    STATE["a"] += 1
    b.STATE["b"] += 10
    return STATE["a"], b.STATE["b"], b.back()
'''
MODULE_B = '''
import {a} as a

STATE = {{"b": 0}}


def back():
    return a.STATE["a"]
'''


def test_two_user_modules_importing_each_other_edited_around_moves(
        stack: Stack, usercode: Any, tmp_path: Path) -> None:
    """Module state of two by-value modules that import each other survives a broker restart and
    kills; the client edits one of them (a new hash) while the session's worker is dead and
    reloads it: the next call runs the new code with that module's state as the reload left it
    (as in-process) and the other's as it was, and so after the next restart and kill."""
    import importlib
    import sys

    names = {"a": f"usra_{os.getpid()}", "b": f"usrb_{os.getpid()}"}
    (tmp_path / f"{names['b']}.py").write_text(MODULE_B.format(**names))
    a = usercode(MODULE_A.format(**names), names["a"])
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p", durable=True)
    assert s.run(a.bump) == (1, 10, 1)
    _restart_broker(stack)
    assert s.run(a.bump) == (2, 20, 2)
    _kill_its_worker(stack, dx, s)
    (tmp_path / f"{names['b']}.py").write_text(MODULE_B.format(**names).replace('return a.STATE', 'return -a.STATE'))
    importlib.invalidate_caches()
    try:
        importlib.reload(sys.modules[names["b"]])  # its STATE starts again at 0, as here
        assert s.run(a.bump) == (3, 10, -3)
        _restart_broker(stack, 1)
        assert s.run(a.bump) == (4, 20, -4)
        _kill_its_worker(stack, dx, s)
        stack.start_worker("p", "--no-dspy")
        stack.wait_workers("p", 1)
        assert s.run(a.bump) == (5, 30, -5)
    finally:
        sys.modules.pop(names["b"], None)
