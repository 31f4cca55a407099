"""Durable sessions in combinations the earlier rounds left out (dur21x): a close cut by a broker
SIGKILL. Real broker and workers, the broker SIGSTOPped and SIGKILLed by pid, restarted on the
same run dir."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
from typing import Any

import pytest

import dspex
from dspex.client import sync
from tests.harness import Stack

pytestmark = pytest.mark.timeout(120)


def _stored(stack: Stack) -> set[str]:
    with sqlite3.connect(os.path.join(stack.run_dir, "checkpoints.sqlite")) as db:
        return {row[0] for row in db.execute("SELECT id FROM sessions")}


def test_a_close_the_broker_died_with_reaches_the_restarted_broker_and_deletes_the_checkpoint(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The close was sent to a broker that died before answering: sent again once to the broker
    that comes back (closing is idempotent), so the session's checkpoint goes with the close,
    not an idle TTL (an hour by default) later; the session kept open is untouched."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    closed, kept = dx.session("p", durable=True), dx.session("p", durable=True)
    closed.put([1, 2, 3])
    box = kept.put([4])
    assert _stored(stack) == {closed.id, kept.id}
    sent = threading.Event()
    real_send = sync.Client._send

    def send(client: Any, ch: Any, frames: list[Any], timeout: float) -> None:
        real_send(client, ch, frames, timeout)
        if threading.current_thread().name == "closing":
            sent.set()

    monkeypatch.setattr(sync.Client, "_send", send)
    assert stack.broker is not None
    os.kill(stack.broker.pid, signal.SIGSTOP)  # the close reaches a broker that never answers it
    closing = threading.Thread(target=closed.close, name="closing")
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
    assert [r["id"] for r in dx.sessions("p")] == [kept.id]
    assert _stored(stack) == {kept.id}
    assert kept.eval("b + [5]", {"b": box}) == [4, 5]
    with pytest.raises(dspex.SessionClosed):
        dx.session("p", closed.id).eval("1")
