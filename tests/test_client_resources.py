"""Client resources and failure semantics on real sockets: bounded sockets for any number of
threads, the reply deadline (Timeout stopped=False), unreachable vs lost, socket replacement."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

import dspex
from dspex.wire.headers import pack_reply_header, unpack_request_header
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.timeout(120)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_thread_per_request_leaves_no_sockets_behind(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", "4")
    s = dx.session("p")
    assert s.eval("1") == 1
    before = open_fds()
    errors: list[BaseException] = []

    def one_call(i: int) -> None:
        try:
            assert dx.call("builtins", "abs", [-i], pool="p") == i
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for round_ in range(10):
        threads = [threading.Thread(target=one_call, args=(round_ * 20 + i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    # 200 threads, each gone: the client keeps at most its idle pool, not a socket per thread
    assert dx.open_sockets <= dx.config.idle_sockets
    # each socket costs ~3 descriptors (mailbox, connection, monitor pair), which zmq's I/O thread
    # frees shortly after close: 200 leaked sockets would be ~600
    wait_for(lambda: open_fds() - before <= 100, timeout=10, what=f"descriptors released ({open_fds() - before} more)")


class SilentBroker:
    """A ROUTER that takes requests and never answers (a wedged broker or a lost reply)."""

    def __init__(self, path: str) -> None:
        self.endpoint = f"ipc://{path}"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self.headers: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(50):
                frames = self.sock.recv_multipart()
                self.headers.append(unpack_request_header(frames[1]))
                self.answer(frames[0], self.headers[-1].req_id)

    def answer(self, peer: bytes, req_id: int) -> None:
        """Silence."""

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


class GarbledBroker(SilentBroker):
    """Answers each request with an error reply: the next of ``bodies`` as its body."""

    def __init__(self, path: str, bodies: list[bytes]) -> None:
        self.bodies = bodies
        super().__init__(path)

    def answer(self, peer: bytes, req_id: int) -> None:
        self.sock.send_multipart([peer, pack_reply_header("err", req_id, "w" * 32, "p"), self.bodies.pop(0)])


def test_an_error_reply_the_client_cannot_read_says_the_call_may_have_run(short_tmp: str) -> None:
    """The reply says the call failed, not how: whether it ran is unknown (MayHaveRun), not a
    request to fix (UsageError) nor one safe to resend (DidNotRun)."""
    unreadable = [b"\xc1", msgpack.packb([1, 2]), msgpack.packb("no map"), b""]
    broker = GarbledBroker(str(Path(short_tmp) / "garbled.sock"), list(unreadable))
    try:
        with dspex.connect(broker.endpoint, timeout=5) as dx:
            s = dx.session("p")
            for body in unreadable:
                with pytest.raises(dspex.UndecodableResult, match="may or may not have run") as info:
                    s.run(len, [1])
                assert isinstance(info.value, dspex.MayHaveRun), body
                assert not isinstance(info.value, (dspex.UsageError, dspex.DidNotRun)), body
    finally:
        broker.close()


def test_an_error_reply_of_an_unknown_code_says_the_call_may_have_run(short_tmp: str) -> None:
    """A code this client does not know (a newer broker or worker), or none: of no group, a retry
    loop could not tell what to do; whether the call ran is unknown. The code stays visible."""
    bodies = [msgpack.packb({"code": "some_later_code", "message": "new here", "extra": 1}),
              msgpack.packb({"message": "no code"})]
    broker = GarbledBroker(str(Path(short_tmp) / "garbled.sock"), list(bodies))
    try:
        with dspex.connect(broker.endpoint, timeout=5) as dx:
            s = dx.session("p")
            for code, message, details in (("some_later_code", "new here", {"extra": 1}),
                                           ("may_have_run", "no code", {})):
                with pytest.raises(dspex.MayHaveRun) as info:
                    s.run(len, [1])
                assert (info.value.code, str(info.value), info.value.details) == (code, message, details)
                assert not isinstance(info.value, (dspex.UsageError, dspex.DidNotRun)), code
    finally:
        broker.close()


def test_no_reply_is_timeout_stopped_false_after_deadline_plus_grace(short_tmp: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_REPLY_GRACE", "0.6")  # read when the client is made
    broker = SilentBroker(str(Path(short_tmp) / "silent.sock"))
    try:
        with dspex.connect(broker.endpoint, timeout=0.4) as dx:
            s = dx.session("p")
            started = time.monotonic()
            with pytest.raises(dspex.Timeout) as info:
                s.run(len, [1])
            waited = time.monotonic() - started
            assert info.value.details["stopped"] is False and "may still be running" in str(info.value)
            assert isinstance(info.value, dspex.MayHaveRun)
            assert 0.95 <= waited < 5, waited  # the deadline (0.4) + the grace (0.6), not the deadline alone
            wait_for(lambda: broker.headers, timeout=5, what="request seen")
            assert broker.headers[0].timeout_ms == 400 and broker.headers[0].op == "apply"
            # broker ops have no worker to wait for: no grace
            started = time.monotonic()
            with pytest.raises(dspex.Timeout):
                dx.ping()
            assert time.monotonic() - started < 0.95
    finally:
        broker.close()


def test_nothing_listening_is_broker_unreachable(short_tmp: str) -> None:
    stale = Path(short_tmp) / "stale.sock"
    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))
    listener.close()  # the file stays, nobody listens: a broker that died
    dx = dspex.connect(f"ipc://{stale}", timeout=5)
    try:
        with pytest.raises(dspex.BrokerUnreachable) as info:
            dx.session("p").run(len, [])
        assert isinstance(info.value, dspex.DidNotRun)
    finally:
        dx.close()


def test_broker_death_mid_call_is_connection_lost(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    assert s.eval("1") == 1
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            s.run(time.sleep, 10)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=slow)
    t.start()
    wait_for(lambda: stack.workers("p")[0].get("state") == "busy" or stack.workers("p")[0].get("inflight"),
             timeout=10, what="call running")
    assert stack.broker is not None
    stack.kill(stack.broker)
    t.join(15)
    assert len(errors) == 1 and isinstance(errors[0], dspex.ConnectionLost), errors
    assert isinstance(errors[0], dspex.MayHaveRun)


def test_sync_and_async_clients_replace_a_socket_broken_by_an_oversized_reply(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    stack.pool("p:strict_queue", 1, "--no-dspy")
    monkeypatch.setenv("DSPEX_MAX_MESSAGE", str(1 << 20))  # these clients accept at most 1 MiB
    small = stack.client()
    s = small.session("p")
    with pytest.raises(dspex.ConnectionLost):
        s.eval("b'x' * (2 << 20)", timeout=10)  # zmq drops the connection and never reconnects it
    assert s.eval("2 + 2") == 4  # a fresh socket
    assert small.replaced_sockets == 1 and small.open_sockets == 1

    async def main() -> None:
        async with dspex.aio.connect(stack.frontend, timeout=10) as dx:
            a = dx.session("p")
            with pytest.raises(dspex.ConnectionLost):
                await a.eval("b'x' * (2 << 20)")
            assert await a.eval("3 + 3") == 6
            assert dx.replaced_sockets == 1 and dx.open_sockets == 1
        assert dx.open_sockets == 0

    asyncio.run(main())


def test_timeout_the_worker_stopped_arrives_typed_and_the_session_goes_on(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.run(setattr, __import__("sys"), "dspex_marker", 41)  # session state that must survive
    started = time.monotonic()
    with pytest.raises(dspex.Timeout) as info:
        s.apply(time.sleep, [30], timeout=1.0)
    assert info.value.details.get("stopped") is True and not info.value.details.get("hard")
    assert time.monotonic() - started < 1.0 + dx.config.reply_grace  # the worker's reply, not the client's wait
    assert s.run(lambda: __import__("sys").dspex_marker + 1) == 42


def stubborn(seconds: float) -> str:
    """Ignores every interruption (as code with a bare ``except BaseException`` would)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(0.05)
        except BaseException:  # noqa: BLE001 - the point of the test
            pass
    return "finished"


def test_hard_timeout_reply_arrives_within_the_client_grace(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    assert s.eval("1") == 1
    assert s.run(stubborn, 0.01) == "finished"
    with pytest.raises(dspex.Timeout) as info:
        s.apply(stubborn, [60], timeout=1.0)
    # the worker replied (stopped, hard) before the client's own deadline + grace ran out
    assert info.value.details.get("stopped") is True and info.value.details.get("hard") is True, info.value.details
    with pytest.raises(dspex.SessionWorkerUnavailable):
        s.eval("1")


def test_concurrent_async_calls_after_a_break_share_one_replacement(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", "4")
    monkeypatch.setenv("DSPEX_MAX_MESSAGE", str(1 << 20))

    async def main() -> None:
        async with dspex.aio.connect(stack.frontend, timeout=10) as dx:
            s = [dx.session("p") for _ in range(8)]
            with pytest.raises(dspex.ConnectionLost):
                await s[0].eval("b'x' * (2 << 20)")
            assert await asyncio.gather(*(x.eval(f"{i} * 2") for i, x in enumerate(s))) == [i * 2 for i in range(8)]
            assert dx.replaced_sockets == 1

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_call_made_while_the_broker_restarts_waits_for_the_new_one(stack: Stack, kind: str) -> None:
    """A service keeps calling while its broker is SIGKILLed and started again on the same run
    directory: the call in flight is ``ConnectionLost``; one made while no broker listens (the dead
    one's socket file still there) waits for the new broker and answers, with either client kind,
    as docs/reliability.md says (fix 4), instead of failing at once."""
    stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", "2")
    assert stack.broker is not None
    dead = stack.broker

    if kind == "sync":
        dx = stack.client(timeout=20)
        s = dx.session("p")
        assert s.eval("1") == 1
        in_flight = dx.submit(s.run, time.sleep, 30)
        wait_for(lambda: stack.workers("p", dx)[0].get("inflight"), timeout=10, what="the call running")
        stack.kill(dead)
        with pytest.raises(dspex.ConnectionLost):
            in_flight.result(15)
        during = dx.submit(s.eval, "2")  # no broker listens now
        stack.start_broker()
        assert during.result(25) == 2
        assert s.eval("3") == 3
        return

    async def main() -> None:
        dx = dspex.aio.connect(stack.frontend, timeout=20)
        try:
            s = dx.session("p")
            assert await s.eval("1") == 1
            in_flight = asyncio.create_task(s.run(time.sleep, 30))
            await asyncio.to_thread(wait_for, lambda: stack.workers("p")[0].get("inflight"), 10, 0.02,
                                    "the call running")
            stack.kill(dead)
            with pytest.raises(dspex.ConnectionLost):
                await asyncio.wait_for(in_flight, 15)
            during = asyncio.create_task(s.eval("2"))  # no broker listens now
            await asyncio.sleep(0)  # it is sent (or refused) before the new broker starts
            await asyncio.to_thread(stack.start_broker)
            assert await asyncio.wait_for(during, 25) == 2
            assert await s.eval("3") == 3
        finally:
            await dx.close()

    asyncio.run(main())


class DyingBroker:
    """What a SIGKILLed broker's socket is for a moment: connections accepted, then closed before
    any handshake (on the dead broker's frontend path)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.accepts = 0
        self._stop = threading.Event()
        if os.path.exists(path):
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(8)
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            conn.close()
            self.accepts += 1

    def gone(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()
        os.unlink(self.path)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_call_whose_connection_drops_before_its_handshake_waits_for_the_restarted_broker(
        stack: Stack, kind: str) -> None:
    """A call made as the broker dies meets its socket still accepting, then closing (no
    handshake: nothing was sent to any broker): it waits for the new broker and answers, as one
    made while no broker listens does, instead of ``ConnectionLost`` (a call that may have run)."""
    stack.pool("p:strict_queue", 1, "--no-dspy")
    assert stack.broker is not None
    path = stack.frontend[len("ipc://"):]

    seen = threading.Event()

    def restart() -> None:
        assert stack.broker is not None
        stack.kill(stack.broker)
        stack.broker.wait(10)
        dying = DyingBroker(path)
        try:
            # the client's zmq connects again once it has seen the drop: the call made now is made
            # after it (one made before may have gone out on the dead connection: ConnectionLost)
            wait_for(lambda: dying.accepts >= 1, timeout=15, what="a connection to the dying broker")
            seen.set()
            with contextlib.suppress(TimeoutError):  # the call's own connection meets it too, mostly
                wait_for(lambda: dying.accepts >= 2, timeout=5, what="the call's connection")
        finally:
            dying.gone()  # its thread stops whatever happened
        stack.start_broker()

    if kind == "sync":
        dx = stack.client(timeout=20)
        s = dx.session("p")
        assert s.eval("1") == 1
        restarter = threading.Thread(target=restart)
        restarter.start()
        try:
            assert seen.wait(20), "the client never connected to the dying broker"
            assert s.eval("2") == 2
        finally:
            restarter.join(30)
        return

    async def main() -> None:
        dx = dspex.aio.connect(stack.frontend, timeout=20)
        try:
            s = dx.session("p")
            assert await s.eval("1") == 1
            restarter = threading.Thread(target=restart)
            restarter.start()
            try:
                assert await asyncio.to_thread(seen.wait, 20), "the client never connected to the dying broker"
                assert await s.eval("2") == 2
            finally:
                await asyncio.to_thread(restarter.join, 30)
        finally:
            await dx.close()

    asyncio.run(main())
