"""A durable session's restore as a real worker process receives it, from a broker this test
scripts (tests.test_worker_link.FakeBroker): what the worker must do with a checkpoint whatever
becomes of the call that carried it."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

import dspex
from dspex.wire import codec
from dspex.wire.errors import SessionNotHeld
from dspex.wire.headers import RequestHeader, pack_request_envelope, unpack_reply_envelope
from dspex.wire.protocol import W_CHECKPOINT, W_READY, Durable
from dspex.wire.remoteerror import error_from_wire
from tests.harness import Stack
from tests.test_worker_link import FakeBroker
from worker import checkpoint, namespace
from worker.refs import RefTable

pytest.importorskip("dspy")  # here and in the worker: a checkpoint names the DSPy version it was written with
pytestmark = pytest.mark.timeout(60)

SID = "d" * 32


@pytest.fixture
def broker(stack: Stack) -> Any:
    fake = FakeBroker(stack)
    yield fake
    fake.close()


def restore_frames() -> list[bytes]:
    """The session's checkpoint as the broker sends it: restore meta, skeleton, blobs."""
    state = RefTable("p", "w-old").session(SID)
    namespace.namespace(state)["counter"] = 41
    ck, _ = checkpoint.Tracker(SID).build(state)
    assert ck is not None
    return [msgpack.packb({"session": SID, "seq": ck.seq, "slots": ck.set_slots}), ck.skeleton, *ck.blobs]


def send(broker: FakeBroker, req_id: int, session: str, expr: str, *, queue_ms: int = 0, durable: int = 0,
         restore: list[bytes] | None = None) -> None:
    header = RequestHeader("eval", req_id, "p", session).pack()
    broker.send(pack_request_envelope(b"client", 0, queue_ms, 0, durable=durable), *(restore or []), header,
                *codec.encode([expr, {}]))


def reply(broker: FakeBroker) -> tuple[int, Any]:
    """The next reply: its request id and its value, or the error it carries."""
    frames = broker.recv()
    ok, req_id, _client = unpack_reply_envelope(frames[0])
    rest = frames[1:]
    if frames[0][:1] == W_CHECKPOINT:  # meta, then a skeleton and blobs (a checkpoint) or nothing
        meta = msgpack.unpackb(rest[0])
        rest = rest[1 + (1 + len(meta["set"]) if "seq" in meta else 0):]
    body = rest[1:]  # after the reply header
    return req_id, codec.decode(body) if ok else error_from_wire(msgpack.unpackb(body[0]))


def test_a_restore_whose_call_is_refused_for_its_queue_deadline_still_restores(stack: Stack,
                                                                              broker: FakeBroker) -> None:
    """A request prefetched behind a call that turned out long is answered QueueTimeout without
    running; if it carried its session's checkpoint (the first call after a move), the broker sent
    that checkpoint once: the session's next call finds it restored, not an empty session."""
    stack.heartbeat = 5.0  # the scripted broker sends no heartbeats: the worker must not think it silent
    stack.start_worker("p")
    assert broker.recv()[0] == W_READY
    send(broker, 1, "o" * 32, "__import__('time').sleep(0.4)")  # the long call it was prefetched behind
    send(broker, 2, SID, "counter + 1", queue_ms=100, durable=Durable.CHECKPOINT | Durable.RESTORE,
         restore=restore_frames())
    assert reply(broker) == (1, None)
    req_id, err = reply(broker)
    assert req_id == 2 and isinstance(err, dspex.QueueTimeout), err
    send(broker, 3, SID, "counter + 1", durable=Durable.CHECKPOINT)
    assert reply(broker) == (3, 42)


def test_a_call_for_a_session_the_worker_should_hold_and_does_not_is_refused_unrun(stack: Stack, broker: FakeBroker,
                                                                                  tmp_path: Any) -> None:
    stack.heartbeat = 5.0
    stack.start_worker("p")
    assert broker.recv()[0] == W_READY
    marker = tmp_path / "ran"
    send(broker, 1, SID, f"__import__('os').mkdir({str(marker)!r})", durable=Durable.CHECKPOINT | Durable.HELD)
    req_id, err = reply(broker)
    assert req_id == 1 and isinstance(err, SessionNotHeld) and err.details["session"] == SID, err
    assert not marker.exists()
    send(broker, 2, SID, "counter + 1", durable=Durable.CHECKPOINT | Durable.RESTORE, restore=restore_frames())
    assert reply(broker) == (2, 42)
    send(broker, 3, SID, "counter + 2", durable=Durable.CHECKPOINT | Durable.HELD)  # held now
    assert reply(broker) == (3, 43)
