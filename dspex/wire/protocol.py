"""Wire protocol constants: the version, the backend commands, limits, reply statuses and header flags.

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
                       [B_DISCONNECT] | [B_DISCONNECT, why] | [B_RELEASE_SESSION, session_id] | [B_REREGISTER]
                       [B_CANCEL | B_CREDIT, client_id, msgpack [req_id, n]] | [B_BYE] | [B_SYNC, sync]

The headers and envelopes of those frames are packed by :mod:`dspex.wire.headers`; the ops, each
defined once, are :mod:`dspex.wire.ops`. See docs/protocol.md for the full description.
"""

from __future__ import annotations

import enum

# A worker of another version would misread frames silently: the broker tells it to leave (its READY
# says its version). What each version added: docs/protocol.md (*Version*).
PROTOCOL_VERSION = 6

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
# B_CANCEL's n: the broker cancels a call because its session closed (0: its caller cancelled it)
CANCEL_SESSION_CLOSED = 1
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
