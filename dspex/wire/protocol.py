"""Wire protocol constants, the ops, and the small headers and envelopes the broker routes on.

Frontend (client DEALER -> broker ROUTER)::

    client -> broker:  [request_header, *payload]
    broker -> client:  [reply_header, *payload]

Backend (worker DEALER -> broker ROUTER); the first frame starts with a one-byte command::

    worker -> broker:  [W_READY, ready_info] | [W_HEARTBEAT, stats?] | [W_DRAIN] | [W_HELD, sync, msgpack held, msgpack received]
                       [W_DISCONNECT] | [W_DISCONNECT, GOODBYE_ABANDONED | GOODBYE_HARD_LIMIT]  (the goodbye)
                       [W_REPLY | W_PARTIAL + ok + req_id + client_id, reply_header, *payload]
                       [W_CHECKPOINT + ok + req_id + client_id, checkpoint meta, *checkpoint, reply_header, *payload]
    broker -> worker:  [B_REQUEST + budget + client_id, (restore meta, *checkpoint,) request_header, *payload]
                       [B_HEARTBEAT]
                       [B_DISCONNECT] | [B_RELEASE_SESSION, session_id] | [B_REREGISTER]
                       [B_CANCEL | B_CREDIT, client_id, msgpack [req_id, n]] | [B_BYE] | [B_SYNC, sync]

On the hot path the command, the fixed-size fields the other side needs and the client id share
one frame, the envelope around the client's request or reply (``pack_request_envelope``,
``pack_reply_envelope``: ``struct`` layouts): one frame fewer per message and no msgpack on the
broker's reply path. The broker decodes only the request header (a short msgpack
array); payloads are codec frames it never touches. See docs/protocol.md for the full description.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple, Self

import msgpack

from dspex.wire.errors import ProtocolError

# 2: the hot-path command frames are envelopes carrying the budget / reply status.
# 3: one goodbye for every exit (W_DISCONNECT, acknowledged by B_BYE) that says whether the worker
# leaves calls it started unanswered.
# 4: durable sessions: W_CHECKPOINT (a checkpoint and its call's reply), the request envelope's
# ``durable`` byte (Durable flags) and restore frames. A worker of 3 would answer a durable
# session's calls without checkpoints: the session would not be durable, silently.
# 5: what a client and a worker exchange through the broker: a reply's extras map (usage and the
# LM history that comes back to the client), session pickles' held globals. A worker of 4 would
# answer a client of 5 with a usage map read as extras (and load no held global); a broker of 5
# refuses it, so clients upgraded with their broker never meet one.
# 6: B_SYNC / W_HELD: a worker back on a new connection says which requests it holds, so the broker
# fails those its old connection lost instead of waiting for them for ever. A worker of 5 would
# ignore B_SYNC: its lost requests would hang, silently.
# The broker tells a worker of another version to leave (its READY says its version).
PROTOCOL_VERSION = 6


def packb(obj: Any) -> bytes:
    """``msgpack.packb``, typed."""
    data: bytes = msgpack.packb(obj)
    return data

# Backend commands, one byte each so the broker branches on a byte compare.
W_READY = b"\x01"
W_HEARTBEAT = b"\x02"
W_REPLY = b"\x03"
W_PARTIAL = b"\x04"
W_DISCONNECT = b"\x05"  # the goodbye: the worker leaves now; the broker acknowledges with B_BYE
W_DRAIN = b"\x06"  # the worker is stopping (SIGTERM): send it nothing new; goodbye follows
W_CHECKPOINT = b"\x07"  # a durable session's checkpoint and the reply of the call it follows, in one message
W_HELD = b"\x08"  # the answer to B_SYNC: its sync frame, the requests it holds, those it received last

B_REQUEST = b"\x11"
B_HEARTBEAT = b"\x12"
B_DISCONNECT = b"\x13"
B_RELEASE_SESSION = b"\x14"
B_REREGISTER = b"\x15"
B_CANCEL = b"\x16"
B_CREDIT = b"\x17"
B_BYE = b"\x18"  # the broker has the worker's goodbye: it may exit now
# the worker is back on a new connection: say which requests you hold (delivered, not yet finally
# answered); what the broker sent on the old connection and you do not hold was lost with it
B_SYNC = b"\x19"
# W_HELD also names the last this many requests the worker received: a request the broker sent it
# fewer than this many requests ago that it names in neither list never reached it (it did not run)
RECEIVED_WINDOW = 1024

# The goodbye's optional second frame: the worker leaves with calls it started still running (a
# call past its hard time limit), so the broker fails those as ``worker_crashed`` (they may have
# run) instead of handing them back. Without it every request the worker has not answered never
# started there.
GOODBYE_ABANDONED = b"abandoned"
# The same at a hard time limit when the worker's other calls all ended: nothing is failed, but the
# broker names why the worker left (a recycle at the hard limit, not a plain exit).
GOODBYE_HARD_LIMIT = b"hard_limit"

# Defaults fixed by the brief (PPP-style heartbeats).
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_LIVENESS = 3
# A worker that hears nothing from the broker renews its socket after interval x liveness, then
# at intervals doubling up to this (seconds); the broker waits as long for a worker it lost while
# it did not run itself.
RENEW_BACKOFF_MAX = 30.0
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Request headers are ~100 bytes; names are bounded in UTF-8 (a client's header fits) to keep per-session state small
MAX_HEADER_BYTES = 1024
MAX_NAME_BYTES = 256
# Streamed items a worker may send ahead of the consumer's acknowledgements (credit-based flow
# control: the broker never holds more than this many items of one stream).
STREAM_WINDOW = 64


class Side(str, enum.Enum):
    """Who answers an op."""

    WORKER = "worker"  # forwarded to a worker of the request's pool, which runs it in the session
    BROKER = "broker"  # answered by the broker
    CONTROL = "control"  # request control: to the worker running the header's req_id; no reply


_REQUIRED: Any = object()


@dataclass(frozen=True)
class Arg:
    """One argument of an op: its name, the types it may have once decoded (none: any value,
    e.g. an object a ref stands for) and its default (none: required)."""

    name: str
    types: tuple[type, ...] = ()
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def _arg(name: str, *types: type, default: Any = _REQUIRED) -> Arg:
    return Arg(name, types, default)


_NAMESPACE = _arg("namespace", dict, type(None), default=None)
_CALL_ARGS = (_arg("args", list, tuple, type(None), default=None), _arg("kwargs", dict, type(None), default=None))


class Op(str, enum.Enum):
    """Every op of the protocol, defined once: its wire name (the member's value), who answers it
    (``side``), its arguments in order (``args``; a worker op's body is their list, a broker op's
    a map of them by name, a control op's one integer), the user methods of ``dspex.client.api`` that
    send it (``client``: none for request control, which the client kinds send themselves) and
    what it does (``doc``, the table in docs/protocol.md). The broker routes by ``side``; each side
    registers its handlers against the members (``broker.ops``, ``worker.executor``); the client
    checks a body against ``args`` before sending it (``dspex.client.exchange``); tests/test_protocol_ops.py
    checks that every op has its handlers and that the client methods named here send it."""

    side: Side
    args: tuple[Arg, ...]
    client: tuple[str, ...]
    doc: str
    _required: int  # how many arguments have no default (they come first)
    _defaults: tuple[Any, ...]
    _typed: tuple[tuple[int, tuple[type, ...], str], ...]  # (index, types, name) of the typed ones

    def __new__(cls, name: str, side: Side, args: tuple[Arg, ...], client: tuple[str, ...], doc: str) -> Self:
        op = str.__new__(cls, name)
        op._value_ = name
        op.side, op.args, op.client, op.doc = side, args, client, doc
        op._required = sum(a.required for a in args)
        op._defaults = tuple(a.default for a in args)
        op._typed = tuple((i, a.types, a.name) for i, a in enumerate(args) if a.types)
        return op

    CALL = ("call", Side.WORKER, (_arg("module", str), _arg("fn", str), *_CALL_ARGS),
            ("ClientAPI.call", "SessionAPI.call", "SessionAPI.stream"),
            "`module.fn(*args, **kwargs)` (`fn` may be a dotted qualname)")
    METHOD = ("method", Side.WORKER, (_arg("ref"), _arg("name", str), *_CALL_ARGS),
              ("SessionAPI.method", "SessionAPI.stream_method"), "`getattr(obj, name)(*args, **kwargs)`")
    GETATTR = ("getattr", Side.WORKER, (_arg("ref"), _arg("name", str)), ("SessionAPI.attr",),
               "`getattr(obj, name)`")
    SETATTR = ("setattr", Side.WORKER, (_arg("ref"), _arg("name", str), _arg("value")), ("SessionAPI.set_attr",),
               "`setattr(obj, name, value)`; `None`")
    EVAL = ("eval", Side.WORKER, (_arg("expr", str), _NAMESPACE), ("SessionAPI.eval", "SessionAPI.stream_eval"),
            "the value of `expr` in the session namespace + `namespace`")
    EXEC = ("exec", Side.WORKER, (_arg("source", str), _NAMESPACE), ("SessionAPI.exec",),
            "runs `source` as the next lines of the session's module; `{name: value}` of the names it bound")
    RELEASE = ("release", Side.WORKER, (_arg("ref_ids", list, tuple),), ("SessionAPI.release",),
               "drops the session's refs of these ids; the number released")
    TO_DATA = ("to_data", Side.WORKER, (_arg("ref"),), ("SessionAPI.to_data",),
               "plain dict of a `dspy.Example`/`Prediction` (`toDict()`)")
    APPLY = ("apply", Side.WORKER, (_arg("fn"), *_CALL_ARGS),
             ("SessionAPI.run", "SessionAPI.apply", "SessionAPI.stream_apply"),
             "`fn(*args, **kwargs)`; `fn` arrives by value (ext 25) or as a ref")
    BIND = ("bind", Side.WORKER, (_arg("name", str), _arg("value")), ("SessionAPI.define",),
            "binds `value` as `name` in the session namespace; `None`")
    PUT = ("put", Side.WORKER, (_arg("value"),), ("SessionAPI.put",), "a ref to `value`, always (Ray's `put`)")
    PING = ("ping", Side.BROKER, (), ("ClientAPI.ping",),
            ("`{\"pong\": true, \"pid\", \"config\", \"frontend\", \"backend\", \"run_dir\", \"metrics\", "
             "\"checkpoints\"}` (`config`: the broker's supervisor.conf, so `dspexctl` can tell which stack answers; "
             "`checkpoints`: the durable sessions' store file, absent without one)"))
    STATUS = ("status", Side.BROKER, (), ("ClientAPI.status",),
              "pools, workers, counters (what `dspexctl pools status --json` prints)")
    SESSIONS = ("sessions", Side.BROKER, (_arg("pool", str, default=""),), ("ClientAPI.sessions",),
                ("`[{\"id\", \"pool\", \"worker\", \"worker_alive\", \"calls\", \"idle_s\", \"created\", "
                 "\"durable\", \"checkpoint_bytes\", \"checkpoint_age_s\", \"no_longer_durable\"}]` (and `\"owner\"`, the CURVE key that opened "
                 "it, on a TCP frontend): the sessions of the caller's key (on ipc every peer shares one identity, so all "
                 "of them; an admin key sees every session); `pool`: of that pool only"))
    CLOSE_SESSION = ("close_session", Side.BROKER, (_arg("session", str, default=""),),
                     ("ClientAPI.close_session", "SessionAPI.close"),
                     ("`{\"closed\": bool, \"released\": bool}` (`session`: else the header's); the broker sends "
                      "`B_RELEASE_SESSION` to its workers; another client's session is `session_not_yours`"))
    RECYCLE = ("recycle", Side.BROKER, (_arg("pool", str, default=""), _arg("worker", str, int, default=""),
                                        _arg("all", bool, default=False)), ("ClientAPI.recycle",),
               ("`{\"pool\", \"recycling\": [incarnation, ...]}`: starts a graceful, rolling recycle (`pool`: else "
                "the header's; `worker`: an incarnation prefix or a pid; neither `worker` nor `all`: the oldest "
                "worker); needs an admin key when the broker has an admin allow-list (else `refused`)"))
    CREDIT = ("credit", Side.CONTROL, (_arg("n", int),), (),
              ("the consumer of a stream took `n` more items: the worker may send `n` more `part`/`prog`/`out` "
               "replies (the stream window is 64 items)"))
    CANCEL = ("cancel", Side.CONTROL, (_arg("n", int),), (),
              ("stop the request, streamed or not (`n`: 0; sent when its caller stops waiting: a cancelled "
               "task, Ctrl-C, an exception, a stream left early): a request still queued in the broker is removed and "
               "answered `cancelled`; a running one is forwarded to its worker as `B_CANCEL`, which stops it and "
               "answers `cancelled` (the broker counts outcome `cancelled`); a cancel for a request that has "
               "finished, or that the broker never saw, is dropped silently"))

    def bind_list(self, body: Any) -> list[Any] | tuple[Any, ...]:
        """A worker op's body (the list of its arguments in order) checked against ``args``,
        defaults filled in; a ``ProtocolError`` says what is wrong. (Once per call on the
        worker: the common case, every argument sent, checks their types and copies nothing.)"""
        if not isinstance(body, (list, tuple)):
            raise ProtocolError(f"the body of {self.value!r} must be a list, got {type(body).__name__}")
        values: list[Any] | tuple[Any, ...] = body
        n = len(values)
        if n != len(self.args):
            if n > len(self.args):
                raise ProtocolError(f"{self.value!r} takes at most {len(self.args)} arguments "
                                    f"({', '.join(a.name for a in self.args)}), got {n}")
            if n < self._required:
                raise ProtocolError(f"{self.value!r} needs its argument {self.args[n].name!r}")
            values = [*values, *self._defaults[n:]]
        for i, types, name in self._typed:
            if not isinstance(values[i], types):
                raise ProtocolError(f"{self.value!r}: {name} must be {_names(types)}, got {type(values[i]).__name__}")
        return values

    def bind_map(self, body: Any) -> dict[str, Any]:
        """A broker op's body (a map of its arguments by name) checked against ``args``, defaults
        filled in; a ``ProtocolError`` says what is wrong."""
        if not isinstance(body, dict):
            raise ProtocolError(f"the body of {self.value!r} must be a map, got {type(body).__name__}")
        known = {a.name for a in self.args}
        if unknown := [k for k in body if k not in known]:
            raise ProtocolError(f"{self.value!r} takes no argument {unknown[0]!r} (it takes: "
                                f"{', '.join(sorted(known)) or 'none'})")
        out = {}
        for arg in self.args:
            value = body.get(arg.name, arg.default)
            if value is _REQUIRED:
                raise ProtocolError(f"{self.value!r} needs its argument {arg.name!r}")
            if arg.types and not isinstance(value, arg.types):
                raise ProtocolError(f"{self.value!r}: {arg.name} must be {_names(arg.types)}, got {type(value).__name__}")
            out[arg.name] = value
        return out


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in types)


OPS: dict[str, Op] = {op.value: op for op in Op}  # by wire name


def ops_of(side: Side) -> frozenset[str]:
    """The wire names of the ops ``side`` answers."""
    return frozenset(op.value for op in Op if op.side is side)


WORKER_OPS = ops_of(Side.WORKER)
BROKER_OPS = ops_of(Side.BROKER)
STREAM_OPS = ops_of(Side.CONTROL)


class Status(str, enum.Enum):
    """Reply status in the reply header."""

    OK = "ok"
    ERROR = "err"
    PARTIAL = "part"  # one streamed item
    PROGRESS = "prog"  # a progress event of a long call
    OUTPUT = "out"  # what the call printed, warned or logged: {"stream": "stdout"|"stderr"|"warning"|"log", "text": str, ...}


class Affinity(str, enum.Enum):
    """How a pool maps a session's calls to workers (the table in the brief)."""

    STRICT_QUEUE = "strict_queue"
    STRICT_FAIL_FAST = "strict_fail_fast"
    HINT = "hint"
    NONE = "none"


class WorkerState(str, enum.Enum):
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    AWAY = "away"  # its connection closed while it lives on: waited for on a new one


# Request header flags
FLAG_STREAM = 1  # the caller accepts PARTIAL/PROGRESS/OUTPUT replies
FLAG_ITEMS = 2  # the caller iterates the result (Session.stream*): any iterable streams, others are an error
# The caller takes the call's OUTPUT events (printed text, warnings, log records), with credit flow
# control. Unlike FLAG_STREAM it costs a call that prints nothing nothing: the worker builds the
# stream machinery at the first event.
FLAG_OUTPUT = 4
# Bits 8-15 of the flags: the lowest log level the caller handles (1-255); log records below it are
# not sent. 0: send no log records.
_LOG_LEVEL_SHIFT = 8


def output_flags(log_level: int) -> int:
    """FLAG_OUTPUT with the caller's log threshold (clamped to 0-255; 0: no log records)."""
    return FLAG_OUTPUT | (min(max(log_level, 0), 0xFF) << _LOG_LEVEL_SHIFT)


def log_level_of(flags: int) -> int:
    """The caller's log threshold carried in ``flags`` (0: it takes no log records)."""
    return (flags >> _LOG_LEVEL_SHIFT) & 0xFF


FLAG_CONTEXT = 8  # the payload's last frame is the session context (client DSPy settings, dropped keys)
FLAG_DURABLE = 16  # the session is durable (read when the broker first sees the session)
# the request refers to what the session's worker holds (code by key, globals left out as bound):
# a worker that holds nothing of the session refuses it (CodeCacheMiss; dspex.wire.codestore.check_held)
FLAG_HELD = 32


class RequestHeader(NamedTuple):
    """``[op, req_id, pool, session, worker, timeout_ms, flags]`` packed as one msgpack array.

    ``worker`` is the incarnation the client believes the session is pinned to ("" if none):
    it lets a restarted broker re-adopt pins it has never seen. Immutable like the other
    messages, but a NamedTuple: the broker and the worker build one per request, and a frozen
    dataclass's ``__init__`` (one ``object.__setattr__`` per field) costs several times as much
    (docs/benchmarks.md).
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


class SessionMode(enum.IntEnum):
    """What the worker keeps of a request's session once the call ends (in its envelope)."""

    KEPT = 0  # the session's state stays for its next calls
    EPHEMERAL = 1  # a ``none`` pool: nothing (the state is dropped when the call ends)


class Durable(enum.IntFlag):
    """A durable session's request envelope says what the worker does with its checkpoint."""

    CHECKPOINT = 1  # send the session's checkpoint after this call, with its reply (W_CHECKPOINT)
    FULL = 2  # the broker holds nothing usable of the session: a full checkpoint, changed or not
    RESTORE = 4  # restore frames follow the envelope: [envelope, restore meta, skeleton?, *blobs, header, ...]
    HELD = 8  # the broker stored a checkpoint of it and has it pinned here: not held here, answer session_not_held


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
