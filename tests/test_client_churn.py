"""Clients that come and go never cancel the calls of other clients, and a client that leaves
mid-call always has its call cancelled (a real broker and workers).

The broker maps each client to the connection (fd) its first call came from and cancels a
client's calls when the frontend's socket monitor reports that connection's disconnect. The
broker's fd numbers are reused at once (the lowest free one), so a disconnect must be taken for
the client mapped on its fd only if that client's connection is the one that closed: libzmq
reports a disconnect just before it closes the fd, and the monitor can be read before the close.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq
import zmq.auth

import dspex
from dspex.client.exchange import encode_request
from dspex.wire.headers import RequestHeader
from dspex.wire.ops import Op
from dspexctl.keys import generate
from tests.harness import Stack, free_port, wait_for

pytestmark = pytest.mark.timeout(60)

CHURN_S = 4.0  # how long clients keep coming and going
QUICK_THREADS = 6  # each: connect, one quick call, close; again
SLOW_THREADS = 8  # each: connect, a session of SLOW_CALLS calls of SLOW_CALL_S, close; again
SLOW_CALLS = 1
SLOW_CALL_S = 0.2
CALL_TIMEOUT_S = 5.0  # a call the broker cancelled gets no reply: it surfaces as this timeout
LEAVE_THREADS = 1  # connect, send a call of pool "q" (30 s), close once it runs; again
CANCELLED_S = 5.0  # a departed client's call is cancelled within this (it takes ~50 ms)
Connect = Callable[[], dspex.Client]
Dealer = Callable[[], zmq.Socket[bytes]]
CAPACITY = 16  # the worker runs the slow calls side by side, so the quick ones do not queue long


@dataclass
class Tally:
    """What the clients saw: calls that returned, and what the others raised."""

    ok: int = 0
    sessions: int = 0
    left: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, calls: int = 0, sessions: int = 0, left: int = 0) -> None:
        with self.lock:
            self.ok += calls
            self.sessions += sessions
            self.left += left

    def failed(self, what: str, exc: BaseException) -> None:
        with self.lock:
            self.failures.append(f"{what}: {type(exc).__name__}: {exc}")


def _quick(connect: Connect, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        try:
            with connect() as c:
                c.call("time", "sleep", [0.0], pool="p")
                tally.count(calls=1)
        except dspex.DspexError as exc:
            tally.failed("a quick client's call", exc)


def _slow(connect: Connect, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        try:
            with connect() as c:
                s = c.session("p")
                for _ in range(SLOW_CALLS):
                    s.call("time", "sleep", [SLOW_CALL_S])
                    tally.count(calls=1)
                s.close()
                tally.count(sessions=1)
        except dspex.DspexError as exc:
            tally.failed("a slow client's call", exc)


def _leave(connect: Connect, dealer: Dealer, until: float, tally: Tally) -> None:
    """A client that leaves mid-call, as a killed process does: a call sent, no cancel, the
    connection closed. Its call (on pool "q"'s one worker) must be cancelled promptly."""
    frames = encode_request(Op.CALL.value, ["time", "sleep", [30.0], {}], 2**20)[0]
    with connect() as watcher:
        def q_inflight() -> int:
            return int(watcher.status()["pools"]["q"]["workers"][0]["inflight"])

        while time.monotonic() < until:
            sock = dealer()
            try:
                sock.send_multipart([RequestHeader(Op.CALL.value, 1, "q", "").pack(), *frames])
                wait_for(lambda: q_inflight() == 1, 10, 0.005, "the leaving client's call to run")
            finally:
                sock.close(0)
            try:
                wait_for(lambda: q_inflight() == 0, CANCELLED_S, 0.005, "the departed client's call cancelled")
            except AssertionError as exc:
                tally.failed("a departed client's call", exc)
                return  # still running: the next one would only queue behind it
            tally.count(left=1)


def _churn(connect: Connect, dealer: Dealer) -> None:
    """Quick and slow clients come and go for CHURN_S, and clients leave mid-call; every call of
    the first two kinds must succeed, every call of the last must be cancelled, and the broker
    must count exactly those calls, none left running."""
    tally = Tally()
    until = time.monotonic() + CHURN_S
    with ThreadPoolExecutor(QUICK_THREADS + SLOW_THREADS + LEAVE_THREADS) as pool:
        runs = [pool.submit(_quick, connect, until, tally) for _ in range(QUICK_THREADS)]
        runs += [pool.submit(_slow, connect, until, tally) for _ in range(SLOW_THREADS)]
        runs += [pool.submit(_leave, connect, dealer, until, tally) for _ in range(LEAVE_THREADS)]
        for run in runs:
            run.result()
    assert not tally.failures, f"{len(tally.failures)} of {tally.ok + len(tally.failures)} calls failed: " \
                               f"{tally.failures[:5]}"
    assert tally.ok > QUICK_THREADS + SLOW_THREADS * SLOW_CALLS and tally.left > 5, "the clients hardly ran"
    with connect() as c:
        status = c.status()
    p, q = status["pools"]["p"], status["pools"]["q"]
    assert p["outcomes"].get("call:ok", 0) == tally.ok, p["outcomes"]
    assert p["requests_error"] == 0 and p["queued"] == 0 and p["sessions"] == 0, p
    assert [w["inflight"] for w in p["workers"]] == [0], p["workers"]
    assert q["outcomes"] == {"call:cancelled": tally.left}, (tally.left, q["outcomes"])
    assert [w["inflight"] for w in q["workers"]] == [0], q["workers"]


def _start(stack: Stack, *broker_args: str) -> None:
    stack.start_broker("p:strict_queue", "q:strict_queue", extra=list(broker_args))
    stack.start_worker("p", "--no-dspy", "--capacity", str(CAPACITY))
    stack.start_worker("q", "--no-dspy")  # capacity 1: a cancel interrupts its time.sleep
    stack.wait_workers("p", 1)
    stack.wait_workers("q", 1)


def _dealer(frontend: str, curve: tuple[bytes, bytes, bytes] | None = None) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
    sock.connect(frontend)
    return sock


def _frontend(stack: Stack, monkeypatch: pytest.MonkeyPatch, kind: str) -> tuple[Connect, Dealer]:
    """Start the stack with an ipc frontend, or a TCP one with CURVE (as tests/test_security.py);
    how to connect a client to it, and a raw DEALER."""
    if kind == "ipc":
        _start(stack)
        return (lambda: dspex.connect(stack.frontend, timeout=CALL_TIMEOUT_S)), (lambda: _dealer(stack.frontend))
    kdir = Path(stack.root, "k")
    written = generate(kdir)
    stack.frontend = f"tcp://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DSPEX_CURVE_SERVER_KEY", str(kdir / "broker.key"))
    monkeypatch.setenv("DSPEX_CURVE_CLIENT_KEY", str(written["client"]))
    _start(stack, "--curve-secret-key", str(written["broker"]), "--curve-allowed", str(written["allowed"]))
    server_public, _ = zmq.auth.load_certificate(str(kdir / "broker.key"))
    client_public, client_secret = zmq.auth.load_certificate(str(written["client"]))
    assert client_secret is not None
    return ((lambda: dspex.connect(stack.frontend, timeout=CALL_TIMEOUT_S)),
            (lambda: _dealer(stack.frontend, (server_public, client_public, client_secret))))


@pytest.mark.parametrize("frontend", ["ipc", "tcp"])
def test_clients_coming_and_going_never_cancel_other_clients_calls(
        stack: Stack, monkeypatch: pytest.MonkeyPatch, frontend: str) -> None:
    """Many short-lived clients (threads: connect, one call, close) while others run calls of
    0.2 s on fresh connections and others leave mid-call: no call of a live client is lost or
    cancelled, every departed client's call is cancelled, the broker's counts match."""
    connect, dealer = _frontend(stack, monkeypatch, frontend)
    _churn(connect, dealer)

