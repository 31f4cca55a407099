"""Fuzzed frames: the broker keeps serving honest clients, stays bounded in memory, and honest
sessions are untouched (short CI version of ``python -m tests.harness.fuzz``).

Three layers: hypothesis properties of the header/codec parsers and of the broker's handlers
in-process (derandomized: the same cases on every run), then a seeded generator throwing tens of
thousands of hostile frame sets at a live broker's frontend and backend, checking honest sessions
between batches. Regression tests for the bugs fuzzing found are at the end.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import dspex
from broker.broker import Broker
from broker.settings import BrokerOptions
from dspex.errors import DspexError, ProtocolError
from dspex.stack.pools import parse_pool_spec
from dspex.wire import codec
from dspex.wire.headers import (
    RequestHeader,
    pack_reply_envelope,
    pack_reply_header,
    unpack_reply_header,
    unpack_request_envelope,
    unpack_request_header,
)
from dspex.wire.protocol import (
    B_DISCONNECT,
    B_REQUEST,
    PROTOCOL_VERSION,
    W_DISCONNECT,
    W_HEARTBEAT,
    W_PARTIAL,
    W_READY,
    W_REPLY,
)
from tests.harness import Stack, rss_kb, wait_for
from tests.harness.fuzz import FrameFuzzer, ProcStack, run_fuzz

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=1500,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=12),
                    st.binary(max_size=12), st.sampled_from(["p", "h", "call", "status", "eval", ""]))
objects = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                    st.dictionaries(st.text(max_size=6), c, max_size=3)),
                       max_leaves=12)


def packed(obj: Any) -> bytes:
    return msgpack.packb(obj)


frame = st.one_of(
    st.binary(max_size=48),
    objects.map(packed),
    st.lists(objects, max_size=9).map(packed),
    st.sampled_from([W_READY, W_REPLY, W_HEARTBEAT, W_DISCONNECT, W_PARTIAL, B_REQUEST, b"\xdb\xff\xff\xff\xff",
                     b"\xdd\xff\xff\xff\xff\x01", b"\x91" * 3000 + b"\xc0", RequestHeader("call", 1, "p", "s").pack(),
                     RequestHeader("eval", 2, "h", "").pack(), RequestHeader("credit", 3, "p", "s").pack()]),
    st.fixed_dictionaries({"pool": st.sampled_from(["p", "h", "nope"]), "pid": st.integers(0, 2**31),
                           "capacity": st.integers(-5, 4)}).map(packed),
)
frame_sets = st.lists(frame, max_size=6)


# -- parsers ----------------------------------------------------------------------------------
@FUZZ
@given(st.one_of(st.binary(max_size=64), st.lists(objects, max_size=9).map(packed), objects.map(packed)))
def test_request_header_parser_only_raises_protocol_error(data: bytes) -> None:
    try:
        h = unpack_request_header(data)
    except ProtocolError:
        return
    assert isinstance(h.op, str) and isinstance(h.req_id, int) and isinstance(h.session, str)


@FUZZ
@given(st.one_of(st.binary(max_size=64), st.lists(objects, max_size=6).map(packed)))
def test_reply_header_parser_only_raises_protocol_error(data: bytes) -> None:
    try:
        status, req_id, _worker, _pool = unpack_reply_header(data)
    except ProtocolError:
        return
    assert isinstance(status, str) and isinstance(req_id, int)


VALID_BODIES = [codec.encode(v) for v in (["os", "getpid", [], {}], {"a": (1, 2.5, None)}, {1, 2}, 2**70,
                                          [complex(1, 2), b"x" * 40], ["1 + 1", {"x": [1, [2, [3]]]}])]


@FUZZ
@given(st.sampled_from(range(len(VALID_BODIES))), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                                                          max_size=4), st.integers(0, 400),
       st.lists(st.binary(max_size=16), max_size=2))
def test_codec_decode_of_mutated_frames_only_raises_dspex_errors(i: int, flips: list[tuple[int, int]], cut: int,
                                                                 extra: list[bytes]) -> None:
    frames = [bytearray(bytes(f)) for f in VALID_BODIES[i]]
    body = frames[0]
    for pos, val in flips:
        if body:
            body[pos % len(body)] = val
    if cut % 3 == 0:  # truncate
        del body[len(body) - cut % (len(body) + 1):]
    try:
        codec.decode([bytes(f) for f in frames] + extra)
    except DspexError:
        pass


# -- the broker's handlers, in-process --------------------------------------------------------
@pytest.fixture(scope="module")
def inproc_broker() -> Iterator[Broker]:
    root = tempfile.mkdtemp(prefix="dxb", dir="/tmp")
    ctx = zmq.Context()
    b = Broker(BrokerOptions(f"ipc://{root}/r/f", f"ipc://{root}/r/b",
                             [parse_pool_spec("p:strict_queue"), parse_pool_spec("h:hint")], run_dir=f"{root}/r"), ctx)
    b.bind()
    try:
        yield b
    finally:
        b.close()
        ctx.term()
        shutil.rmtree(root, ignore_errors=True)


def _ready_with_bad_record(frames: list[bytes]) -> bool:
    """The known bug pinned by test_ready_with_unusable_fields_is_refused_as_garbage."""
    if len(frames) < 2 or frames[0] != W_READY:
        return False
    try:
        info = msgpack.unpackb(frames[1])
    except Exception:  # noqa: BLE001
        return False
    if not isinstance(info, dict) or info.get("pool") not in ("p", "h"):
        return False
    try:
        int(info.get("pid", 0))
        int(info.get("capacity", 1))
    except Exception:  # noqa: BLE001
        return True
    return False


@FUZZ
@given(st.sampled_from([b"c1", b"w1", b"w2", b"\x00", b"x" * 40]), st.booleans(), frame_sets)
def test_broker_handlers_absorb_any_frames(inproc_broker: Broker, ident: bytes, front: bool,
                                           frames: list[bytes]) -> None:
    assume(front or not _ready_with_bad_record(frames))
    msg = [zmq.Frame(ident)] + [zmq.Frame(f) for f in frames]
    if front:
        inproc_broker.core.on_client_frames(msg, time.monotonic())
    else:
        inproc_broker.core.on_worker_frames(msg, time.monotonic())
    assert set(inproc_broker.core.pools) == {"p", "h"}


# -- a live broker ----------------------------------------------------------------------------
@pytest.fixture
def fuzz_stack() -> Iterator[ProcStack]:
    root = tempfile.mkdtemp(prefix="dxf", dir="/tmp")
    stack = ProcStack(root, broker_args=("--max-sessions", "20000"))
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.close()
        shutil.rmtree(root, ignore_errors=True)


def test_live_broker_survives_fuzzed_frames(fuzz_stack: ProcStack) -> None:
    res = run_fuzz(fuzz_stack, cases=40_000, seed=20261123, batch=1000)
    d = res.as_dict()
    print(f"\n[fuzz] {d}")
    assert res.honest_failures == [], res.honest_failures
    assert res.malformed_replies == 0, "the broker answered with a reply header clients cannot read"
    assert res.honest_checks == 40
    # every kind of case was exercised
    assert all(d["by_kind"].get(f"front:{k}", 0) > 0 for k in FrameFuzzer.FRONT_KINDS if k != "oversize")
    assert all(d["by_kind"].get(f"back:{k}", 0) > 0 for k in FrameFuzzer.BACK_KINDS if k != "oversize")
    # typed answers came back to the fuzzer where it could be answered
    assert {"protocol_error", "unknown_op", "pool_not_found"} <= set(d["replies"])
    # memory: bounded by the limits (sessions expire after 5 s), not growing with the case count
    _, warm, end = res.broker_rss_kb
    assert end - warm < 16_000, f"broker RSS grew {end - warm} kB over {res.cases} cases"
    assert res.worker_rss_kb[1] - res.worker_rss_kb[0] < 16_000


# -- regressions: bugs fuzzing found (identity claims, huge headers, forged replies, bad READYs, reused ids) --


def _start(stack: Stack, spec: str, n: int = 1) -> dspex.Client:
    dx = stack.pool(spec, n, "--no-dspy")
    dx.timeout = 5
    return dx


@pytest.mark.timeout(60)
def test_identity_claim_cannot_hijack_a_live_worker(stack: Stack) -> None:
    stack.heartbeat = 0.25
    dx = _start(stack, "p:strict_queue", 2)
    s = dx.session("p")
    pid = s.call("os", "getpid")
    imposter = zmq.Context.instance().socket(zmq.DEALER)
    imposter.setsockopt(zmq.LINGER, 0)
    imposter.setsockopt(zmq.ROUTING_ID, s.worker.encode())
    monitor = imposter.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        imposter.connect(stack.backend)
        imposter.send_multipart([W_HEARTBEAT])
        # the broker's ROUTER met the imposter (and silently refuses its claimed identity)
        assert monitor.poll(10_000), "the imposter never reached the broker"
        stolen = []
        outcomes = []
        for _ in range(5):
            try:
                outcomes.append(s.call("os", "getpid", timeout=3))
            except dspex.DspexError as err:
                outcomes.append(err.code)
            while imposter.poll(0):
                f = imposter.recv_multipart()
                if f[0][:1] == B_REQUEST:
                    stolen.append(f)
        assert not stolen, "the imposter received a client's request"
        assert outcomes == [pid] * 5, outcomes
    finally:
        imposter.disable_monitor()
        monitor.close(0)
        imposter.close()
    # and the real worker is still registered once the imposter is gone
    wait_for(lambda: s.call("os", "getpid") == pid, what="the real worker still serving")


@pytest.mark.timeout(60)
def test_huge_header_fields_are_refused_and_not_retained(stack: Stack) -> None:
    dx = _start(stack, "p:strict_queue")
    assert stack.broker is not None
    before = rss_kb(stack.broker.pid)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    codes = []
    try:
        raw.connect(stack.frontend)
        for i in range(24):
            sid = f"{i:03d}" + "s" * (4 << 20)
            raw.send_multipart([RequestHeader("eval", i + 1, "p", sid).pack(), codec.encode(["1", {}])[0]])
            assert raw.poll(10_000)
            reply = raw.recv_multipart()
            codes.append(msgpack.unpackb(reply[1])["code"] if msgpack.unpackb(reply[0])[0] == "err" else "ok")
    finally:
        raw.close()
    grown = rss_kb(stack.broker.pid) - before
    assert dx.session("p").eval("1 + 1") == 2
    assert set(codes) == {"protocol_error"}, codes
    assert grown < 20_000, f"broker RSS grew {grown} kB"


@pytest.mark.timeout(60)
def test_reply_for_a_request_never_sent_is_not_forwarded(stack: Stack) -> None:
    stack.heartbeat = 1.0
    stack.start_broker("p:strict_queue", "evil:strict_queue")
    stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 1)
    fake = zmq.Context.instance().socket(zmq.DEALER)
    fake.setsockopt(zmq.LINGER, 0)
    fake.setsockopt(zmq.ROUTING_ID, b"f" * 32)
    try:
        fake.connect(stack.backend)
        fake.send_multipart([W_READY, msgpack.packb({"pool": "evil", "pid": 1, "capacity": 1,
                                                     "version": PROTOCOL_VERSION})])
        stack.wait_workers("evil", 1)
        dx = stack.client(timeout=5)
        honest, evil = dx.session("p"), dx.session("evil")  # both used from this thread: one client identity
        assert honest.eval("1 + 1") == 2

        def serve_one_then_forge() -> None:  # the fake worker answers, then forges the client's next reply
            assert fake.poll(5000)
            frames = fake.recv_multipart()
            while frames[0][:1] != B_REQUEST:
                assert fake.poll(5000)
                frames = fake.recv_multipart()
            client, header = unpack_request_envelope(frames[0]).client, unpack_request_header(frames[1])
            fake.send_multipart([pack_reply_envelope(W_REPLY, "ok", header.req_id, client),
                                 pack_reply_header("ok", header.req_id, "f" * 32, "evil"), *codec.encode(0)])
            fake.send_multipart([pack_reply_envelope(W_REPLY, "ok", header.req_id + 1, client),
                                 pack_reply_header("ok", header.req_id + 1, "", "p"),
                                 *codec.encode("forged")])

        watcher = stack.client(timeout=5)  # its own sockets: dx's next request id stays the forged one

        def refused() -> int:
            return int(watcher.status()["broker"]["garbage_backend"])

        before = refused()
        server = threading.Thread(target=serve_one_then_forge)
        server.start()
        assert evil.eval("0") == 0
        server.join(10)
        # the broker has judged the forged reply (had it forwarded it, it would be waiting in this
        # thread's socket for the next call to read)
        wait_for(lambda: refused() > before, what="the broker to refuse the forged reply")
        assert honest.eval("1 + 1") == 2, "a reply forged by another pool's worker was accepted"
    finally:
        fake.close()


def test_ready_with_unusable_fields_is_refused_as_garbage(inproc_broker: Broker) -> None:
    before = inproc_broker.core.counters["garbage_backend"]
    for info in ({"pool": "p", "pid": "x"}, {"pool": "h", "pid": 1, "capacity": "many"},
                 {"pool": "p", "pid": 1, "capacity": float("inf")}):
        inproc_broker.core.on_worker_frames([zmq.Frame(b"bad-ready"), zmq.Frame(W_READY), zmq.Frame(msgpack.packb(info))],
                                       time.monotonic())
    assert inproc_broker.core.counters["garbage_backend"] == before + 3
    assert b"bad-ready" not in inproc_broker.core.workers


@pytest.mark.timeout(60)
def test_a_request_id_reused_in_flight_does_not_stall_a_worker(stack: Stack) -> None:
    dx = _start(stack, "p:strict_queue", 2)
    s1, s2 = dx.session("p"), dx.session("p")
    assert s1.call("os", "getpid") != s2.call("os", "getpid")
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    try:
        raw.connect(stack.frontend)
        for seconds in (0.3, 0.8):  # same req_id, sessionless: one on each (idle) worker
            raw.send_multipart([RequestHeader("call", 7, "p", "").pack(), *codec.encode(["time", "sleep", [seconds], {}])])
        # the first runs; the second, its request id in flight, is refused at once
        assert raw.poll(10_000), "no answer to the request whose id was in flight"
        refused = raw.recv_multipart()
        header = unpack_reply_header(refused[0])
        assert header[0] == "err" and header[1] == 7, header
        error = msgpack.unpackb(refused[-1])
        assert error["code"] == ProtocolError.code and error["message"] == "request id 7 is already in flight", error
        # the call that holds the id is untouched: it answers when its sleep is over
        assert raw.poll(10_000), "the first call of id 7 was never answered"
        assert unpack_reply_header(raw.recv_multipart()[0])[:2] == ("ok", 7)
        results: list[Any] = []

        def call(s: dspex.Session) -> None:  # queued behind the sleeps, on each session's worker
            try:
                results.append(s.call("os", "getpid", timeout=4))
            except dspex.DspexError as err:
                results.append(err.code)

        threads = [threading.Thread(target=call, args=(s,)) for s in (s1, s2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert all(isinstance(r, int) for r in results), results
    finally:
        raw.close()


@pytest.mark.timeout(60)
def test_a_worker_of_the_previous_wire_version_is_refused_with_a_clear_log_line(stack: Stack) -> None:
    """Wire v2 folded the command into the request/reply heads: a v1 worker must be told to leave
    (B_DISCONNECT) and the broker's log must say why, never half-parse its frames."""
    dx = _start(stack, "p:strict_queue")
    old = zmq.Context.instance().socket(zmq.DEALER)
    old.setsockopt(zmq.LINGER, 0)
    old.setsockopt(zmq.ROUTING_ID, b"o" * 32)
    try:
        old.connect(stack.backend)
        old.send_multipart([W_READY, msgpack.packb({"pool": "p", "pid": 1, "capacity": 1, "version": 1})])
        assert old.poll(10_000), "no answer to a v1 READY"
        assert old.recv_multipart() == [B_DISCONNECT]
        wait_for(lambda: f"speaks wire protocol version 1, this broker speaks {PROTOCOL_VERSION}" in stack.logs(),
                 what="the broker's refusal in its log")
        assert len(stack.workers("p")) == 1  # only the real worker is registered, and it serves
        assert dx.session("p").eval("1 + 1") == 2
    finally:
        old.close()
