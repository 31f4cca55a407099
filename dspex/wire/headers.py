"""The small headers and envelopes the broker routes on, packed and checked.

On the hot path the command, the fixed-size fields the other side needs and the client id share
one frame, the envelope around the client's request or reply (``pack_request_envelope``,
``pack_reply_envelope``: ``struct`` layouts): one frame fewer per message and no msgpack on the
broker's reply path. The broker decodes only the request header (a short msgpack
array); payloads are codec frames it never touches. The frames themselves: :mod:`dspex.wire.protocol`.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import msgpack

from dspex.wire.errors import ProtocolError
from dspex.wire.protocol import B_REQUEST, MAX_HEADER_BYTES, MAX_NAME_BYTES, SessionMode


def packb(obj: Any) -> bytes:
    """``msgpack.packb``, typed."""
    data: bytes = msgpack.packb(obj)
    return data


class RequestHeader(NamedTuple):
    """``[op, req_id, pool, session, worker, timeout_ms, flags]`` packed as one msgpack array.

    ``worker`` is the incarnation the client believes the session is pinned to ("" if none):
    it lets a restarted broker re-adopt pins it has never seen. A NamedTuple, not a frozen
    dataclass: the broker and the worker build one per request, and a frozen dataclass's
    ``__init__`` sets each field with ``object.__setattr__``.
    """

    op: str
    req_id: int
    pool: str
    session: str
    worker: str = ""
    timeout_ms: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        return packb(
            [self.op, self.req_id, self.pool, self.session, self.worker, self.timeout_ms, self.flags]
        )


_unpackb = msgpack.unpackb
_new_tuple = tuple.__new__
_SHORT_NAME = MAX_NAME_BYTES // 4  # characters that fit the bound whatever they are (UTF-8: at most 4 bytes each)


def name_error(name: str) -> str:
    """Why a request header cannot carry ``name`` ("" if it can): the broker's rule, a client's check."""
    size = len(name.encode("utf-8", "surrogatepass")) if len(name) > _SHORT_NAME else 0  # (ids: no encoding)
    return f"is at most {MAX_NAME_BYTES} bytes in UTF-8, got {size} ({len(name)} characters)" if size > MAX_NAME_BYTES else ""


def request_id_of(data: Any) -> int:
    """The request id of a refused request header, to answer (0: its first MAX_HEADER_BYTES hold none)."""
    try:
        fields = msgpack.Unpacker()
        fields.feed(memoryview(data)[:MAX_HEADER_BYTES])
        fields.read_array_header()
        fields.skip()  # the op
        req_id = fields.unpack()
    except Exception:  # noqa: BLE001 - whatever a header cut short or garbage makes msgpack raise: no id
        return 0
    return req_id if type(req_id) is int and 0 <= req_id < _REQ_ID_END else 0


def unpack_request_header(data: Any) -> RequestHeader:
    """The request header in ``data``: bytes, a memoryview or a zmq frame (any buffer)."""
    if len(data) > MAX_HEADER_BYTES:  # before unpacking: ids are kept for a session's lifetime
        raise ProtocolError(f"request header is {len(data)} bytes, over the limit of {MAX_HEADER_BYTES} (a pool "
                            f"name or session id is at most {MAX_NAME_BYTES} bytes in UTF-8): nothing ran")
    try:
        fields = _unpackb(data, use_list=False)  # (a tuple: no list to copy)
        op, req_id, pool, session, worker, timeout_ms, flags = fields  # (exactly seven)
        if not (
            isinstance(op, str)
            and isinstance(req_id, int)
            and 0 <= req_id < _REQ_ID_END
            and isinstance(pool, str)
            and isinstance(session, str)
            and isinstance(worker, str)
            and isinstance(timeout_ms, int)
            and isinstance(flags, int)
        ):
            raise TypeError("wrong field types")
        if len(op) > _SHORT_NAME or len(pool) > _SHORT_NAME or len(session) > _SHORT_NAME or len(worker) > _SHORT_NAME:
            for kind, name in (("op", op), ("pool", pool), ("session id", session), ("worker", worker)):
                if name_error(name):
                    raise ValueError(f"a {kind} {name_error(name)}")
    except Exception as exc:  # noqa: BLE001 - whatever a malformed header makes msgpack or the checks raise
        raise ProtocolError(f"malformed request header: {exc}: nothing ran") from None
    return _new_tuple(RequestHeader, fields)  # (RequestHeader._make without its second length check)


def pack_reply_header(status: str, req_id: int, worker: str = "", pool: str = "") -> bytes:
    """``[status, req_id, worker, pool]``: the worker the reply came from lets clients track pins."""
    return packb([status, req_id, worker, pool])


def unpack_reply_header(data: bytes | memoryview) -> tuple[str, int, str, str]:
    try:
        status, req_id, worker, pool = msgpack.unpackb(data)
        if not (isinstance(status, str) and isinstance(req_id, int)):
            raise TypeError("wrong field types")
    except Exception as exc:  # noqa: BLE001 - whatever a malformed header makes msgpack or the checks raise
        raise ProtocolError(f"malformed reply header: {exc}") from None
    return status, req_id, str(worker), str(pool)


_REQ_ID_END = 2**64  # request ids are unsigned 64-bit (the reply envelope carries them in 8 bytes)
_U32 = 2**32 - 1
# The envelopes the broker and a worker put around a request and a reply on the backend: the
# fixed fields the other side needs without unpacking msgpack, then the client's routing id.
# B_REQUEST's: command, call_ms, queue_ms, session_ttl_s, session_mode, durable, then the client id
_REQUEST_ENVELOPE = struct.Struct("<cIIIBB")
# W_REPLY / W_PARTIAL's first frame: command, ok (1: status "ok"), req_id, then the client id
_REPLY_ENVELOPE = struct.Struct("<cBQ")
REQUEST_ENVELOPE_SIZE = _REQUEST_ENVELOPE.size
REPLY_ENVELOPE_SIZE = _REPLY_ENVELOPE.size


def pack_request_envelope(client: bytes, call_ms: int, queue_ms: int, session_ttl_s: int = 0,
                          session_mode: SessionMode = SessionMode.KEPT, durable: int = 0) -> bytes:
    """B_REQUEST's first frame, the broker's envelope around a client's request. The budget: what
    is left of the call's deadline and of its queue deadline when the broker hands the request to
    a worker (ms, 0: none). Relative, so clocks of other hosts never matter: the worker adds them
    to its own monotonic clock on receipt. ``session_ttl_s`` is the pool's session TTL (the
    worker's backstop TTL derives from it; 0: none); ``durable``: ``Durable`` flags (0: a plain
    session). Values past 32 bits are capped."""
    return _REQUEST_ENVELOPE.pack(B_REQUEST, min(call_ms, _U32), min(queue_ms, _U32), min(session_ttl_s, _U32),
                                  session_mode, durable) + client


class RequestEnvelope(NamedTuple):
    """B_REQUEST's first frame, parsed (by the worker, once per request; a NamedTuple for the
    reason ``RequestHeader`` is one)."""

    client: bytes
    call_ms: int
    queue_ms: int
    session_ttl_s: int
    session_mode: int  # a SessionMode value
    durable: int  # Durable flags


def unpack_request_envelope(data: bytes) -> RequestEnvelope:
    if len(data) <= REQUEST_ENVELOPE_SIZE or data[:1] != B_REQUEST:
        raise ProtocolError(f"malformed request envelope ({len(data)} bytes): a broker of another protocol version?")
    _, call_ms, queue_ms, ttl, mode, durable = _REQUEST_ENVELOPE.unpack_from(data)
    return RequestEnvelope(data[REQUEST_ENVELOPE_SIZE:], call_ms, queue_ms, ttl, mode, durable)


def pack_reply_envelope(command: bytes, status: str, req_id: int, client: bytes) -> bytes:
    """W_REPLY / W_PARTIAL's first frame, the worker's envelope around a reply: what the broker
    needs of it without unpacking its msgpack reply header (which it forwards to the client
    untouched)."""
    return _REPLY_ENVELOPE.pack(command, status == "ok", req_id) + client


def unpack_reply_envelope(data: bytes) -> tuple[bool, int, bytes]:
    """``(ok, req_id, client)`` of a W_REPLY / W_PARTIAL first frame (the command is ``data[:1]``)."""
    if len(data) <= REPLY_ENVELOPE_SIZE:
        raise ProtocolError(f"malformed reply envelope ({len(data)} bytes)")
    _, ok, req_id = _REPLY_ENVELOPE.unpack_from(data)
    return ok == 1, req_id, data[REPLY_ENVELOPE_SIZE:]


def pack_error(code: str, message: str, **details: Any) -> bytes:
    return packb({"code": code, "message": message, **details})
