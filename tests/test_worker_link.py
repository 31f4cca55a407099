"""The worker's link to the broker, seen from the broker's side: a real worker process against a
ROUTER socket this test drives (the goodbye handshake of both exits, re-registration with
backoff), and a real broker for what the goodbye means to callers."""

from __future__ import annotations

import itertools
import os
import selectors
import signal
import socket
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

import dspex
from dspex.wire import codec
from dspex.wire.headers import RequestHeader, pack_request_envelope, unpack_reply_envelope
from dspex.wire.protocol import (
    B_BYE,
    B_HEARTBEAT,
    B_REREGISTER,
    B_SYNC,
    GOODBYE_ABANDONED,
    GOODBYE_HARD_LIMIT,
    PROTOCOL_VERSION,
    W_DISCONNECT,
    W_DRAIN,
    W_HEARTBEAT,
    W_HELD,
    W_READY,
    W_REPLY,
)
from dspex.wire.remoteerror import error_from_wire
from tests.harness import Stack, wait_for
from worker.link import Heartbeats

pytestmark = pytest.mark.timeout(60)

STUBBORN = textwrap.dedent("""
    import time
    while True:
        try:
            time.sleep(60)
        except BaseException:
            pass
""")


class FakeBroker:
    """The broker's end of the backend, driven by the test."""

    def __init__(self, stack: Stack, endpoint: str = "") -> None:
        os.makedirs(stack.run_dir, mode=0o700, exist_ok=True)
        self.sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # The worker's renewed connection reuses its identity. Without handover, libzmq ignores
        # a connection whose identity an old one still holds (the old one's close is processed
        # asynchronously), and its READY is lost until the next renewal: a race in the stand-in,
        # not the worker's behaviour under test. The real broker's side of it is covered by the
        # broker-pause tests.
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.bind(endpoint or stack.backend)
        self.worker = b""

    def recv(self, timeout: float = 15.0) -> list[bytes]:
        """The worker's next message that is not a heartbeat."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.sock.poll(int(left * 1000)), "the worker sent nothing"
            self.worker, *frames = self.sock.recv_multipart()
            if frames[0] != W_HEARTBEAT:
                return frames

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart([self.worker, *frames])

    def request(self, req_id: int, session: str, op: str, body: Any, call_ms: int = 0) -> None:
        header = RequestHeader(op, req_id, "p", session, "", call_ms).pack()
        self.send(pack_request_envelope(b"client", call_ms, 0), header, *codec.encode(body))

    def close(self) -> None:
        self.sock.close(0)


class Gate:
    """A broker that is not there yet at the worker's path, then is: connections are accepted and
    held (no zmq handshake) until :meth:`open`, then each is relayed, byte for byte, to ``target``
    (a unix socket path): the handshake with the broker comes when the test says."""

    def __init__(self, path: str, target: str) -> None:
        self.target = target
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(8)
        self._opened = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def open(self) -> None:
        self._opened.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        held: list[socket.socket] = []
        peers: dict[socket.socket, socket.socket] = {}

        def relay(conn: socket.socket) -> None:
            inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            inner.connect(self.target)
            peers[conn], peers[inner] = inner, conn
            for s in (conn, inner):
                selector.register(s, selectors.EVENT_READ)

        while not self._stop.is_set():
            if self._opened.is_set():
                for conn in held:
                    relay(conn)
                held.clear()
            for key, _ in selector.select(0.01):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    conn = sock.accept()[0]
                    relay(conn) if self._opened.is_set() else held.append(conn)
                    continue
                if sock not in peers:  # closed with its peer in this round
                    continue
                try:
                    data = sock.recv(65536)
                    if data:
                        peers[sock].sendall(data)
                        continue
                except OSError:
                    pass
                for s in (sock, peers[sock]):
                    selector.unregister(s)
                    peers.pop(s)
                    s.close()
        for s in [*held, *peers, self._listener]:
            s.close()
        selector.close()


@pytest.fixture
def broker(stack: Stack) -> Any:
    fake = FakeBroker(stack)
    yield fake
    fake.close()


def _log(stack: Stack) -> str:
    return Path(stack.root, "worker-p.log").read_text()


@pytest.mark.parametrize("ack", [True, False], ids=["acknowledged", "unacknowledged"])
def test_a_stopping_worker_drains_says_goodbye_and_waits_for_the_ack(stack: Stack, broker: FakeBroker,
                                                                   ack: bool) -> None:
    stack.heartbeat = 5.0  # no heartbeat expiry while the test holds the acknowledgement back
    proc = stack.start_worker("p", "--no-dspy")
    ready = broker.recv()
    assert ready[0] == W_READY and msgpack.unpackb(ready[1])["version"] == PROTOCOL_VERSION
    proc.send_signal(signal.SIGTERM)
    assert broker.recv() == [W_DRAIN]
    assert broker.recv() == [W_DISCONNECT]  # every call it started is answered: a plain goodbye
    if ack:
        broker.send(B_BYE)
    assert proc.wait(timeout=10) == 0
    # without the acknowledgement it waited its full second for it, and says so
    assert ("did not acknowledge our goodbye within 1s" in _log(stack)) is not ack


@pytest.mark.parametrize("capacity", [1, 2])
def test_a_hard_time_limit_replies_then_says_goodbye_and_waits_for_the_ack(stack: Stack, broker: FakeBroker,
                                                                         capacity: int) -> None:
    """The call's ``Timeout(hard=True)`` goes out first, then the goodbye, which says
    ``abandoned`` when other calls still run (capacity 2: a sleep of another session), else
    ``hard_limit``; the worker exits (3) on the broker's ``B_BYE``, not on anything else."""
    stack.heartbeat = 5.0
    stack.env["DSPEX_HARD_GRACE"] = "0.5"
    proc = stack.start_worker("p", "--no-dspy", "--capacity", str(capacity))
    assert broker.recv()[0] == W_READY
    if capacity == 2:
        broker.request(1, "other", "call", ["time", "sleep", [60], {}])
    broker.request(2, "stubborn", "exec", [STUBBORN], call_ms=300)
    reply = broker.recv()
    ok, req_id, client = unpack_reply_envelope(reply[0])
    assert reply[0][:1] == W_REPLY and (ok, req_id, client) == (False, 2, b"client")
    err = error_from_wire(msgpack.unpackb(reply[2]))
    assert isinstance(err, dspex.Timeout) and err.details.get("hard") is True
    goodbye = broker.recv()
    assert goodbye == ([W_DISCONNECT, GOODBYE_HARD_LIMIT] if capacity == 1 else [W_DISCONNECT, GOODBYE_ABANDONED])
    assert proc.poll() is None, "the worker exited before the broker acknowledged its goodbye"
    broker.send(B_HEARTBEAT)  # not the acknowledgement: the worker keeps waiting for B_BYE
    broker.send(B_REREGISTER)
    broker.send(B_BYE)
    assert proc.wait(timeout=10) == 3
    assert "did not acknowledge our goodbye" not in _log(stack)


def test_a_silent_broker_gets_a_new_connection_and_ready_with_backoff(stack: Stack, broker: FakeBroker) -> None:
    """A broker that says nothing for heartbeat × liveness is given up on: a fresh socket under
    the same identity and READY, after twice the wait each time; a broker that talks again keeps
    the connection, and one that asks for READY (``B_REREGISTER``) gets it."""
    stack.heartbeat, stack.liveness = 0.2, 2  # silent for 0.4 s: a new socket
    proc = stack.start_worker("p", "--no-dspy")
    assert broker.recv()[0] == W_READY
    identity = broker.worker
    readies = [time.monotonic()]
    for _ in range(5):
        assert broker.recv()[0] == W_READY and broker.worker == identity
        readies.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(readies)]
    # the silence limit, then a backoff that doubles: 0.4, 0.4, 0.4, 0.4, 3.2 s between READYs
    # (the two tries after a handshake nothing answered that would come later than a silence
    # limit, after 0.8 and 1.6 s, come then)
    assert max(gaps[:4]) < 0.8 and gaps[4] > 2 * max(gaps[:4]), gaps
    assert _log(stack).count("broker silent; new socket and READY") >= 4
    # a broker that heartbeats keeps the connection (the retry under way when it began aside)
    retries = _log(stack).count("broker silent")
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        broker.send(B_HEARTBEAT)
        while broker.sock.poll(100):
            broker.sock.recv_multipart()
    assert _log(stack).count("broker silent") <= retries + 1
    broker.send(B_REREGISTER)
    assert broker.recv()[0] == W_READY
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_a_broker_back_just_before_the_next_try_gets_a_silence_limit_to_answer(stack: Stack) -> None:
    """The worker renewed its socket with no broker there; the broker comes back (its handshake)
    just before the next try. It gets a full silence limit from the handshake to answer the READY,
    as after any new connection: its first heartbeat, a little later than that next try, keeps the
    connection. (The worker renewed it at the next try, a moment after the handshake: a real broker
    had registered it meanwhile and took the closed connection for a crash, its sessions lost.)"""
    stack.heartbeat, stack.liveness = 0.5, 2  # silent for 1 s: a new socket, next try 2 s later
    inner = os.path.join(stack.root, "in.sock")
    os.makedirs(stack.run_dir, mode=0o700, exist_ok=True)
    fake = FakeBroker(stack, f"ipc://{inner}")
    gate = Gate(stack.backend[len("ipc://"):], inner)
    try:
        stack.start_worker("p", "--no-dspy")
        wait_for(lambda: "next try in 2.0s" in _log(stack), timeout=20, interval=0.005, what="the second try")
        next_try = time.monotonic() + 2.0
        wait_for(lambda: time.monotonic() > next_try - 0.3, interval=0.005, what="just before the next try")
        gate.open()
        assert fake.recv()[0] == W_READY
        handshake = time.monotonic()
        tries = _log(stack).count("broker silent")
        # the broker's first word comes 0.6 s after the handshake (within the 1 s silence limit,
        # after the next try the worker had planned): then a heartbeat every interval
        beats = 0
        while time.monotonic() < handshake + 3.0:
            if time.monotonic() >= handshake + 0.6 + 0.5 * beats:
                fake.send(B_HEARTBEAT)
                beats += 1
            if fake.sock.poll(10):
                frames = fake.sock.recv_multipart()
                assert frames[1] != W_READY, f"a new connection {time.monotonic() - handshake:.2f}s after the handshake"
        assert _log(stack).count("broker silent") == tries, _log(stack)
    finally:
        gate.close()
        fake.close()


@pytest.mark.parametrize("capacity", [1, 2])
def test_a_worker_says_which_requests_it_holds_at_once_while_its_calls_run(stack: Stack, broker: FakeBroker,
                                                                          capacity: int) -> None:
    """B_SYNC (the broker saw the worker back on a new connection) is answered by the link, not
    after the calls: W_HELD names every request delivered and not yet answered, running or
    queued behind them, and none once their replies went out (before the answer); and the
    requests it received last, answered or not (those not named never reached it)."""
    stack.heartbeat = 5.0
    proc = stack.start_worker("p", "--no-dspy", "--capacity", str(capacity))
    assert broker.recv()[0] == W_READY
    for req_id in range(1, capacity + 2):  # one more than it runs at once: that one waits
        broker.request(req_id, f"s{req_id}", "call", ["time", "sleep", [2], {}])
    broker.send(B_SYNC, b"7")
    held = broker.recv()
    assert held[:2] == [W_HELD, b"7"], held
    sent = [(b"client", r) for r in range(1, capacity + 2)]
    assert sorted(map(tuple, msgpack.unpackb(held[2]))) == sent
    assert [tuple(k) for k in msgpack.unpackb(held[3])] == sent  # received, in order
    replies = {unpack_reply_envelope(broker.recv(timeout=30)[0])[1] for _ in range(capacity + 1)}
    assert replies == set(range(1, capacity + 2))
    broker.send(B_SYNC, b"8")
    held = broker.recv()
    assert held[:3] == [W_HELD, b"8", msgpack.packb([])]  # answered: none held, still received
    assert [tuple(k) for k in msgpack.unpackb(held[3])] == sent
    proc.send_signal(signal.SIGTERM)
    assert broker.recv()[0] == W_DRAIN
    assert broker.recv()[0] == W_DISCONNECT
    broker.send(B_BYE)
    assert proc.wait(timeout=10) == 0


def test_the_other_calls_of_a_worker_leaving_at_a_hard_limit_get_worker_crashed(stack: Stack) -> None:
    """Through a real broker: a capacity-2 worker leaves at one call's hard time limit while
    another session's call runs on it. That call may have run: ``WorkerCrashed``, never a
    did-not-run error; the broker counts a recycle, not a crash."""
    stack.env["DSPEX_HARD_GRACE"] = "0.5"
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", "2")
    sleeper, stubborn = dx.session("p"), dx.session("p")
    errors: list[BaseException] = []

    def sleep() -> None:
        try:
            sleeper.call("time", "sleep", [60], timeout=30)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    t = threading.Thread(target=sleep)
    t.start()
    wait_for(lambda: stack.workers("p")[0]["inflight"] == 1, what="the sleep to run")
    with pytest.raises(dspex.Timeout) as info:
        stubborn.exec(STUBBORN, timeout=0.3)
    assert info.value.details.get("hard") is True
    t.join(10)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], dspex.WorkerCrashed), errors
    events = dx.status()["events"]
    assert [e["why"] for e in events if e["event"] == "recycle"] == ["was recycled at a call's hard time limit"]
    assert not [e for e in events if e["event"] == "crash"]


def test_the_workers_heartbeat_answers_the_brokers_then_waits_for_just_after_its_next() -> None:
    """Ours goes out in the wake-up the broker's arrives in, unless one went out less than half
    an interval ago; our timer then moves to just after the broker's next one, so one wake-up
    serves both. Without the broker's, ours goes every interval."""
    beats = Heartbeats(1.0, 3, now=0.0)  # the READY went out at 0 (it counts as ours)
    assert (beats.next_beat, beats.deadline) == (1.0, 3.0)
    assert not beats.theirs(0.4)  # ours went out 0.4 s ago: not again
    assert beats.next_beat == pytest.approx(1.65)
    assert beats.theirs(1.6)
    beats.ours(1.6)
    assert beats.last_beat == 1.6 and beats.next_beat == pytest.approx(2.85)
    beats.ours(2.85)  # the broker's did not come: ours on its own timer
    assert beats.next_beat == pytest.approx(3.85)
