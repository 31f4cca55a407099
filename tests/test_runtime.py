"""Crashes, restarts, heartbeats, refs, encoding and bad input, on real processes."""

from __future__ import annotations

import datetime as dt
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from offline_lm import offline_lm

import dspex
from dspex.wire.headers import (
    RequestHeader,
    pack_reply_envelope,
    unpack_request_envelope,
    unpack_request_header,
)
from dspex.wire.protocol import B_HEARTBEAT, PROTOCOL_VERSION, W_READY, W_REPLY
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.timeout(90)


def test_sigkill_pinned_worker_detected_before_heartbeat_expiry(stack: Stack) -> None:
    stack.heartbeat, stack.liveness = 1.0, 5  # expiry would take 5 s
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p")
    pid = int(s.call("os", "getpid"))
    killed = time.monotonic()
    stack.kill(pid)
    wait_for(lambda: len(stack.workers("p")) == 1, timeout=5, interval=0.005, what="worker dropped")
    detected = time.monotonic() - killed
    with pytest.raises(dspex.SessionWorkerUnavailable) as info:
        s.call("os", "getpid")
    assert detected < 1.0, f"crash noticed after {detected:.3f}s; heartbeat expiry is 5 s"
    assert "crashed" in str(info.value)


def sleep_in_background(stack: Stack, s: dspex.Session, seconds: float) -> tuple[threading.Thread, list[BaseException]]:
    """Start ``time.sleep(seconds)`` on the session's worker in a thread; wait until it runs."""
    errors: list[BaseException] = []

    def long_call() -> None:
        try:
            s.call("time", "sleep", [seconds])
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    t = threading.Thread(target=long_call)
    t.start()
    wait_for(lambda: stack.workers("p")[0]["state"] == "busy", what="busy")
    return t, errors


def test_worker_killed_mid_request_gives_worker_crashed(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    pid = int(s.call("os", "getpid"))
    t, errors = sleep_in_background(stack, s, 30)
    started = time.monotonic()
    stack.kill(pid)
    t.join(10)
    assert not t.is_alive(), "the caller hung"
    assert len(errors) == 1 and isinstance(errors[0], dspex.WorkerCrashed), errors
    assert time.monotonic() - started < 2.0


def test_workers_started_before_broker_register(stack: Stack) -> None:
    os.makedirs(stack.run_dir, mode=0o700, exist_ok=True)
    for _ in range(2):
        stack.start_worker("p", "--no-dspy")
    log = Path(stack.root, "worker-p.log")
    # both workers are up and trying to reach a broker that does not exist yet
    wait_for(lambda: log.read_text().count("backend=") == 2, what="workers started")
    stack.start_broker("p:strict_queue")
    stack.wait_workers("p", 2)


def test_broker_restart_workers_reregister_and_sessions_continue(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p")
    s.exec("kept = [1, 2, 3]")  # state in the session's namespace on its worker
    ref = s.call("builtins", "object")
    pid = s.call("os", "getpid")
    before = {w["incarnation"] for w in stack.workers("p")}
    assert stack.broker is not None
    stack.kill(stack.broker)
    restarted = time.monotonic()
    stack.start_broker()
    after = stack.wait_workers("p", 2)
    elapsed = time.monotonic() - restarted
    assert {w["incarnation"] for w in after} == before, "same incarnations re-registered"
    assert elapsed < 5.0
    # the session's pin survives: the client tells the new broker which worker it was on, and
    # the session's state and refs are there
    assert s.call("os", "getpid") == pid
    assert s.eval("kept") == [1, 2, 3]
    assert s.eval("type(r).__name__", {"r": ref}) == "object"


def test_long_call_keeps_worker_alive(stack: Stack) -> None:
    stack.heartbeat, stack.liveness = 0.2, 3  # dead after 0.6 s of silence
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    inc = s.call("os", "getpid") and s.worker
    assert s.call("time", "sleep", [3.0]) is None  # 5x the liveness window
    assert [w["incarnation"] for w in stack.workers("p")] == [inc]


def test_two_sessions_on_one_worker_see_only_their_own_lm(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1)
    a, b = dx.session("p"), dx.session("p")
    lm_a = a.put(offline_lm("offline/alpha", temperature=0.2))  # user LMs, sent by value
    lm_b = b.put(offline_lm("offline/beta", temperature=0.7))
    a.call("dspy", "configure", kwargs={"lm": lm_a})
    b.call("dspy", "configure", kwargs={"lm": lm_b})
    assert a.worker == b.worker
    for _ in range(3):
        assert a.eval("__import__('dspy').settings.lm.model") == "offline/alpha"
        assert b.eval("__import__('dspy').settings.lm.model") == "offline/beta"
    pa = a.call("dspy", "Predict", ["ticket -> category"])
    pb = b.call("dspy", "Predict", ["ticket -> category"])
    a.method(pa, "__call__", kwargs={"ticket": "refund please"})
    b.method(pb, "__call__", kwargs={"ticket": "refund please"})
    b.method(pb, "__call__", kwargs={"ticket": "again"})
    assert a.eval("len(lm.history)", {"lm": lm_a}) == 1
    assert b.eval("len(lm.history)", {"lm": lm_b}) == 2
    # a third session without configure sees no LM at all
    c = dx.session("p")
    assert c.eval("__import__('dspy').settings.lm") is None


def test_offline_lm_travels_by_value_to_a_worker_that_cannot_import_it(stack: Stack, short_tmp: str) -> None:
    """examples/offline_lm.py is user code: dspex sends it by value (with its source), and it runs on a
    worker started in an empty working directory that can import nothing from examples/."""
    shadow, empty = Path(short_tmp, "shadow"), Path(short_tmp, "empty")
    (shadow / "examples").mkdir(parents=True)
    empty.mkdir()
    refuse = "raise ImportError('this worker cannot import examples/: user code must come by value')\n"
    for module in (shadow / "offline_lm.py", shadow / "examples" / "__init__.py"):
        module.write_text(refuse)
    stack.start_broker("p:strict_queue")
    stack.start_worker("p", env={**stack.env, "PYTHONPATH": f"{shadow}{os.pathsep}{stack.env['PYTHONPATH']}"},
                       cwd=str(empty))
    stack.wait_workers("p", 1, timeout=60)
    s = stack.client(timeout=60).session("p")
    assert s.call("os", "getcwd") == str(empty)
    with pytest.raises(dspex.RemoteError, match="cannot import examples"):
        s.eval("__import__('offline_lm')")
    lm = s.put(offline_lm("offline/triage", temperature=0.2))
    s.call("dspy", "configure", kwargs={"lm": lm})
    pred = s.run(lambda: __import__("dspy").Predict("ticket -> category, urgency")(ticket="Refund still missing."))
    assert (pred.category, pred.urgency) == ("billing", "medium")
    # never imported there, by value: the worker's module of that name is a view of the session's
    # copy of the client's module, whose __file__ is the client's file (as in-process), never the
    # shadow file this worker would import
    assert s.eval("getattr(__import__('sys').modules.get('offline_lm'), '__file__', None)") == \
        sys.modules[offline_lm.__module__].__file__ != str(shadow / "offline_lm.py")


NATIVE_VALUES = [
    None, True, False, 0, -1, 2**64 + 5, -(2**70), 1.5, float("inf"), "text", b"\x00bytes",
    [1, [2, 3]], (1, (2, "x")), {"a": 1}, {1: "int key", (1, 2): "tuple key"}, {1, 2, 3}, frozenset({"a"}),
    complex(1, -2), dt.datetime(2026, 11, 23, 12, 0, 1, 5), dt.date(2026, 1, 2), dt.time(3, 4, 5),
    np.float32(1.25), np.int64(-7),
]


def test_codec_round_trip_through_worker(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    for value in NATIVE_VALUES:
        back = s.eval("x", {"x": value})
        assert back == value and type(back) is type(value), (value, back)
    nan = s.eval("float('nan')")
    assert nan != nan  # noqa: PLR0124 - a NaN came back as a NaN
    arrays = [
        np.arange(12, dtype=np.int32).reshape(3, 4), np.linspace(0, 1, 7, dtype=np.float64),
        np.array([True, False]), np.zeros((2, 0), dtype=np.uint8), np.arange(20.0)[::3],
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)), np.array([1 + 2j], dtype=np.complex64),
    ]
    for arr in arrays:
        back = s.eval("x", {"x": arr})
        assert isinstance(back, np.ndarray) and back.dtype == arr.dtype and back.shape == arr.shape
        np.testing.assert_array_equal(back, arr)
    big = np.random.default_rng(1).random(1_000_000)
    assert float(s.eval("float(x.sum())", {"x": big})) == pytest.approx(float(big.sum()))


def test_graceful_results_and_refs_as_arguments(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    out = s.exec("o = object()\nresult = [{'obj': o, 'n': 1, 'again': o}, 'plain']")["result"]
    assert out[1] == "plain" and out[0]["n"] == 1
    ref = out[0]["obj"]
    assert isinstance(ref, dspex.Ref) and ref.type_name == "object" and ref.session == s.id
    assert out[0]["again"] == ref, "same object twice -> same ref"
    assert len(ref.id) >= 32
    cyc = s.eval("(lambda l: (l.append(l), l)[1])([1])")
    assert cyc[0] == 1 and cyc[1] is cyc  # a container that holds itself comes whole, still recursive
    # a ref passed back resolves to the object on the worker
    assert s.eval("o is x", {"x": ref}) is True
    lst = s.call("builtins", "list", [[3, 1, 2]])
    assert lst == [3, 1, 2]
    assert s.call("collections", "Counter", ["abca"]) == {"a": 2, "b": 1, "c": 1}  # dict subclass -> dict


def test_released_and_foreign_refs(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s, other = dx.session("p"), dx.session("p")
    ref = s.call("builtins", "object")
    with pytest.raises(dspex.RefNotFound, match="belongs to session"):
        other.eval("x", {"x": ref})
    assert s.release(ref) == 1
    with pytest.raises(dspex.RefNotFound, match="released"):
        s.eval("x", {"x": ref})
    # closing a session releases its refs on the worker
    ref2 = s.call("builtins", "object")
    s.close()
    with pytest.raises(dspex.SessionClosed):
        s.eval("1")
    again = dx.session("p", session_id=s.id)  # the id stays closed: never a fresh namespace
    with pytest.raises(dspex.SessionClosed, match="closed"):
        again.eval("x", {"x": ref2})


def test_session_idle_ttl_releases_refs(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue:session_ttl=0.5", 1, "--no-dspy")
    s = dx.session("p")
    ref = s.call("builtins", "object")
    wait_for(lambda: not dx.sessions("p"), timeout=10, what="session expired")
    with pytest.raises(dspex.SessionClosed, match="expired"):  # its refs went with it
        s.eval("x", {"x": ref})


def test_remote_errors_keep_worker_serving(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    with pytest.raises(dspex.RemoteError) as info:
        s.eval("1 / 0")
    assert info.value.type_name == "ZeroDivisionError" and "Traceback" in info.value.remote_traceback
    with pytest.raises(dspex.RemoteError, match="ModuleNotFoundError|No module"):
        s.call("no_such_module_xyz", "f")
    with pytest.raises(dspex.RemoteError) as info:
        s.call("os", "no_such_function")
    assert info.value.type_name == "AttributeError"
    with pytest.raises(dspex.RemoteError):
        s.eval("syntax error here")
    assert s.eval("1 + 1") == 2


def test_message_too_large(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    stack.env["DSPEX_MAX_MESSAGE"] = str(1 << 20)
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    with pytest.raises(dspex.ResultTooLarge) as info:
        s.eval("b'x' * (2 << 20)")  # the worker refuses to send a reply over the limit
    # the call ran: a retry loop must not take it for a request to fix, nor resend it blindly
    assert isinstance(info.value, dspex.MayHaveRun) and not isinstance(info.value, dspex.UsageError)
    message = str(info.value)  # the size, the limit, that the call ran, and the two ways on
    for part in (f"is {(2 << 20) + 5} bytes", f"limit of {1 << 20} bytes", "DSPEX_MAX_MESSAGE", "the call ran",
                 "keep large data on the worker", "return a ref"):
        assert part in message, (part, message)
    assert info.value.details["size"] == (2 << 20) + 5 and info.value.details["limit"] == 1 << 20
    monkeypatch.setenv("DSPEX_MAX_MESSAGE", str(1 << 20))
    small = stack.client()
    with pytest.raises(dspex.MessageTooLarge) as sent:
        small.session("p").eval("len(x)", {"x": b"y" * (2 << 20)})
    assert isinstance(sent.value, dspex.UsageError)  # nothing was sent: fix the request
    # a raw peer sending an oversized frame is cut off by zmq; the broker keeps serving
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(stack.frontend)
    raw.send_multipart([RequestHeader("eval", 1, "p", "x").pack(), b"z" * (3 << 20)])
    raw.close()
    assert s.eval("2 + 2") == 4


def test_refs_made_for_a_result_over_the_limit_are_dropped(stack: Stack) -> None:
    """Its caller never gets them: kept, they would count against the session's quota until it closes."""
    stack.env["DSPEX_MAX_MESSAGE"] = str(1 << 20)
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--ref-cap", "1")
    s = dx.session("p")
    for _ in range(2):
        with pytest.raises(dspex.ResultTooLarge):
            s.eval("[__import__('threading').Lock(), b'x' * (2 << 20)]")  # a lock would come back as a ref
    kept = s.put([1])  # the session's one ref
    with pytest.raises(dspex.RefQuotaExceeded):
        s.put([2])
    s.release(kept)
    assert s.eval("[__import__('threading').Lock()]")[0].type_name.endswith("lock")


def items_with_a_big_one() -> Iterator[object]:
    yield 1
    yield b"x" * (2 << 20)
    yield 3


def reports_a_big_event() -> str:
    from dspex import progress

    try:
        progress.report({"big": b"x" * (2 << 20)})
    except dspex.ResultTooLarge as err:  # raised where it was reported, as a typed error
        return f"{type(err).__name__}: {err}"
    return "sent"


def test_a_streamed_item_or_event_over_the_limit_is_refused_and_the_session_serves_on(stack: Stack) -> None:
    """Sent, the broker would cut the worker's connection at it (its size limit): a crash, the
    session lost. An item ends its stream with a typed error, after the items before it; a
    progress event is refused where the call reports it."""
    stack.env["DSPEX_MAX_MESSAGE"] = str(1 << 20)
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    pid = s.call("os", "getpid")
    items = iter(s.stream_apply(items_with_a_big_one))
    assert next(items) == 1
    with pytest.raises(dspex.ResultTooLarge, match="an item of apply is .* bytes.*the call ran") as info:
        next(items)
    assert info.value.details["limit"] == 1 << 20
    assert s.call("os", "getpid") == pid
    events: list[object] = []
    refused = s.apply(reports_a_big_event, on_progress=events.append)
    assert refused.startswith("ResultTooLarge: a progress event is") and "the call ran" in refused, refused
    assert events == [] and s.call("os", "getpid") == pid


def test_garbage_frames_leave_broker_serving(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    assert s.eval("1") == 1
    ctx = zmq.Context.instance()
    front = ctx.socket(zmq.DEALER)
    back = ctx.socket(zmq.DEALER)
    for sock, ep in ((front, stack.frontend), (back, stack.backend)):
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ep)
    rng = np.random.default_rng(7)
    garbage = [
        [b""], [b"\xff\xfe"], [msgpack.packb([1, 2])], [msgpack.packb(["call", "x", 1, 2, 3, 4, 5])],
        [RequestHeader("bogus_op", 9, "p", "").pack()], [RequestHeader("call", 10, "p", "s").pack(), b"\xc1"],
        [RequestHeader("status", 11, "", "").pack(), b"\x93\x01"],
    ] + [[rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 4)))] for _ in range(200)]
    for frames in garbage:
        front.send_multipart(frames)
    back_garbage = [[b""], [W_READY], [W_READY, b"\xc1"], [W_READY, msgpack.packb({"pool": 5})],
                    [W_REPLY, b"client"], [W_REPLY, b"c", b"\xc1"], [B_HEARTBEAT], [b"\x99", b"x"]]
    for frames in back_garbage + garbage:
        back.send_multipart(frames)
    # typed errors came back to the garbage sender where it could be answered
    replies = []
    while front.poll(500):
        replies.append(front.recv_multipart())
    codes = {msgpack.unpackb(r[1])["code"] for r in replies if len(r) > 1}
    assert "unknown_op" in codes and "protocol_error" in codes
    assert s.eval("40 + 2") == 42
    assert len(stack.workers("p")) == 1
    front.close()
    back.close()


def test_a_worker_that_answers_without_a_reply_header_fails_that_call_at_once_and_is_logged_once(
        stack: Stack) -> None:
    """A peer registered as a worker (a broken or foreign one) answers a call with the reply
    envelope alone, then sends commands the broker does not know: the call's caller hears a
    clear error at once (not its timeout), the garbage is counted and logged once naming the
    peer, and the real worker's call beside it is answered."""
    stack.heartbeat, stack.liveness = 1.0, 20  # the silent peer is not dropped for its silence meanwhile
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.call("os", "getpid")
    t, errors = sleep_in_background(stack, s, 1.5)  # the real worker is busy: the next call goes to the peer
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.setsockopt(zmq.ROUTING_ID, b"broken-peer-" + b"x" * 20)
    peer.connect(stack.backend)
    try:
        peer.send_multipart([W_READY, msgpack.packb({"pool": "p", "pid": os.getpid(), "capacity": 1,
                                                       "version": PROTOCOL_VERSION})])
        wait_for(lambda: len(stack.workers("p")) == 2, what="the peer registered")
        before = dx.status()["broker"]["garbage_backend"]
        result: list[object] = []
        caller = threading.Thread(target=lambda: result.append(_outcome(lambda: dx.call("os", "getpid", pool="p",
                                                                                       timeout=30))))
        asked = time.monotonic()
        caller.start()

        def request_to_peer() -> list[bytes]:
            while True:  # (heartbeats come too)
                assert peer.poll(10_000), "no request reached the peer"
                frames = peer.recv_multipart()
                if len(frames) >= 3:
                    return frames

        frames = request_to_peer()
        head, req_id = unpack_request_envelope(frames[0]), unpack_request_header(frames[1]).req_id
        peer.send_multipart([pack_reply_envelope(W_REPLY, "ok", req_id, head.client)])  # no reply header
        caller.join(10)
        assert not caller.is_alive() and time.monotonic() - asked < 5, "the caller waited for its timeout"
        (err,) = result
        assert isinstance(err, dspex.InternalError), err
        assert f"pid {os.getpid()}" in str(err) and "without its reply header" in str(err), err
        for garbage in ([b"\x99", b"x"], [b"zz"]):
            peer.send_multipart(garbage)
        wait_for(lambda: dx.status()["broker"]["garbage_backend"] == before + 3, what="the garbage counted")
        t.join(10)
        assert not t.is_alive() and not errors, errors  # the real worker's call beside it was answered
        assert s.eval("40 + 2") == 42
        logged = [line for line in Path(stack.root, "broker.log").read_text().splitlines() if "garbage" in line]
        assert len(logged) == 1 and " WARNING " in logged[0] and f"pid {os.getpid()}" in logged[0], logged
    finally:
        peer.close()


def _outcome(call: Callable[[], object]) -> object:
    try:
        return call()
    except dspex.DspexError as err:
        return err


def test_unknown_op_from_client(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    with pytest.raises(dspex.UnknownOp):
        dx.request("frobnicate", "p", "")


def test_broker_death_fails_inflight_call_with_connection_error(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.call("os", "getpid")
    t, errors = sleep_in_background(stack, s, 4)
    assert stack.broker is not None
    killed = time.monotonic()
    stack.kill(stack.broker)
    t.join(10)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], dspex.ConnectionError), errors
    assert time.monotonic() - killed < 2.0, "the caller learned of the lost broker at once, not at its timeout"
    # after a restart the same client and session work again
    stack.start_broker()
    stack.wait_workers("p", 1)
    wait_for(lambda: s.call("os", "getpid"), what="call after restart")


def test_worker_without_broker_for_long_still_stops_on_sigterm(stack: Stack) -> None:
    """Heartbeats to an absent broker fill the socket's queue; the worker must not wedge on them."""
    os.makedirs(stack.run_dir, mode=0o700, exist_ok=True)
    stack.heartbeat = 0.001  # a thousand heartbeats a second: the send queue (HWM 1000) fills at once
    proc = stack.start_worker("p", "--no-dspy")
    log = Path(stack.root, "worker-p.log")
    wait_for(lambda: "broker silent" in log.read_text(), what="worker noticed no broker")
    # ten READY retries with doubling backoff: ~3 s of 1 ms heartbeats, well past the queue limit
    wait_for(lambda: log.read_text().count("broker silent") >= 10, timeout=30, what="READY retries")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
