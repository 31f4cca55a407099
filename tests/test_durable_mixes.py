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
from tests.harness import Stack
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
