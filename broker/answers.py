"""The answers the broker gives in place of a worker's reply, and what failures count for.

An error reply goes to the client; a failed request counts in its pool's outcomes and health
window (the service's failure, the caller's, or an operator's recycle); refusals and queue
timeouts are logged in bulk, one line per pool and kind at most every ``NOTICE_EVERY`` seconds.
A worker's reply that came without its header is answered here (:func:`unreadable_reply`); what
a worker-side peer sends that the broker cannot use is counted, its first per peer logged
(:class:`BackendGarbage`).
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import zmq

from broker.port import Port
from broker.state import Clock, GoneWorkers, Notices, Pending, Pool, SessionRecord, WorkerRecord
from dspex.stack.health import failure_kind
from dspex.wire.errors import DspexError, InternalError, PoolSaturated, QueueTimeout
from dspex.wire.headers import pack_error, pack_reply_envelope, pack_reply_header, unpack_reply_header
from dspex.wire.protocol import W_REPLY, Status
from dspex.wire.zmqfast import frame_buffer

NOTICE_EVERY = 10.0  # seconds between two log lines of one pool's refusals (or queue timeouts)
_BULK_CODES = (PoolSaturated.code, QueueTimeout.code)  # counted and logged in bulk, not per call
CAUSE_CHARS = 160  # of a failure's cause kept for status lines


def error_cause(frames: list[Any]) -> tuple[str, str]:
    """The code of a worker's error reply (its last frame: the error map) and its cause in one
    short line, ``Type: first line of the message``; only error replies pay."""
    try:
        body = msgpack.unpackb(frames[-1].buffer)
    except Exception:  # noqa: BLE001 - a worker's garbage is its error
        return "error", ""
    if not isinstance(body, dict):
        return "error", ""
    code = str(body.get("code") or "error")
    return code, one_line(f"{body.get('type') or code}: {body.get('message') or ''}")


def one_line(text: str) -> str:
    """A cause as an operator's status line quotes it: its first line, cut to CAUSE_CHARS (the
    caller's error, and the worker's log, have it whole)."""
    first = text.strip().split("\n", 1)[0].strip()
    return first if len(first) <= CAUSE_CHARS else first[:CAUSE_CHARS - 1] + "…"


def call_error(reply: list[Any]) -> str:
    """``Type: message`` of a call's own error reply (``[client, header, error map]``); "" for a
    success, or a reply that does not read as an error."""
    try:
        if unpack_reply_header(frame_buffer(reply[1]))[0] == Status.OK.value:
            return ""
        body = msgpack.unpackb(frame_buffer(reply[-1]))
        if not isinstance(body, dict):
            return ""
        return f"{body.get('type') or body.get('code') or 'error'}: {str(body.get('message', ''))[:1000]}"
    except Exception:  # noqa: BLE001 - a worker's garbage: the refusal alone
        return ""


class Answers:
    def __init__(self, port: Port, clock: Clock, workers: dict[bytes, WorkerRecord], gone: GoneWorkers,
                 sessions: dict[str, SessionRecord]) -> None:
        self.port = port
        self.sessions = sessions
        self._to_client = port.to_client
        self.clock = clock
        self.workers = workers
        self.gone = gone
        self.notices = Notices(NOTICE_EVERY)

    def error(self, client: bytes, req_id: int, err: DspexError) -> None:
        self._to_client(
            [client, pack_reply_header(Status.ERROR.value, req_id), pack_error(err.code, err.message, **err.details)])

    def fail(self, p: Pending, pool: Pool | None, err: DspexError) -> None:
        """Answer ``p`` with ``err``, counted against its pool."""
        if pool is not None:
            pool.outcomes[(p.op, err.code)] += 1
            self.note_failure(pool, err.code, str(err.details.get("worker") or ""),
                              one_line(f"{err.code}: {err.message}"))
        if err.code not in _BULK_CODES:
            self.port.log(logging.INFO, "call failed in the broker: pool=%s session=%s request=%d op=%s error=%s: %s",
                     pool.name if pool is not None else "-", p.session[:8] or "-", p.req_id, p.op, err.code,
                     err.message)
        self.error(p.client, p.req_id, err)

    def expired(self, p: Pending, pool: Pool) -> None:
        """Answer a request whose caller's timeout ran out before it reached a worker: it never ran.
        Its caller still waits (a reply grace past the timeout, for a running call's late answer),
        so it hears that at once instead of a silence; not counted against the pool: the caller's
        own deadline says nothing of the pool's health."""
        rec = self.sessions.get(p.session) if p.session else None
        if rec is not None and (pool.strict or rec.durable is not None):
            behind = (f" behind the calls on its session's worker (a {pool.mode.value} session runs on that worker only, "
                      "one call at a time, and a stream holds it until its producer ends or its consumer closes it)")
        elif p.session:  # hint or none: any free slot runs it, beside the session's other calls
            behind = (f" while every worker slot of the pool was busy (a {pool.mode.value} session's calls run side by "
                      "side on any free slot)")
        else:
            behind = ""
        self.error(p.client, p.req_id, QueueTimeout(
            f"{p.op} waited {self.clock.now - p.enqueued:.1f}s in pool {pool.name!r}{behind} and never ran: "
            f"its timeout of {round(p.deadline - p.enqueued, 3):g}s ran out first", pool=pool.name))

    def fail_in_bulk(self, p: Pending, pool: Pool, err: PoolSaturated | QueueTimeout) -> None:
        """``fail``, logged as a count: a refusal or a queue timeout comes in floods."""
        if n := self.notices.note((pool.name, err.code), self.clock.now):
            self._log_notice(pool, err.code, n, 0.0)
        self.fail(p, pool, err)

    def note_failure(self, pool: Pool, code: str, worker: str = "", cause: str = "") -> None:
        """Count a failed answer in the pool's health window: the service's, the caller's, or
        (a session whose worker was recycled or stopped) the operator's; ``cause``: its error in
        one line (``one_line``)."""
        wid = worker.encode()
        cleanly = wid in self.workers or (bool(wid) and not self.gone.crashed(wid))
        pool.recent.add(failure_kind(code, cleanly), code, self.clock.now, cause)

    def log_due(self, pools: dict[str, Pool], now: float) -> None:
        """The counts of the notice windows that ended."""
        for (name, code), n, span in self.notices.due(now):
            if (pool := pools.get(name)) is not None:
                self._log_notice(pool, code, n, span)

    def _log_notice(self, pool: Pool, code: str, n: int, span: float) -> None:
        """One line for ``n`` refusals or queue timeouts (``span`` > 0: counted over that many seconds)."""
        during = f" in the last {span:.0f}s" if span else ""
        if code == PoolSaturated.code:
            self.port.log(logging.WARNING, "pool %s refused %d request(s)%s: queue full (%d/%d queued; %s)", pool.name, n, during,
                        pool.queued, pool.config.queue_max, code)
        else:
            self.port.log(logging.WARNING, "pool %s: %d request(s) waited past its queue timeout of %gs%s (%d queued, %d workers "
                        "ready; %s)", pool.name, n, pool.config.queue_timeout, during, pool.queued,
                        pool.ready_count(), code)


def unreadable_reply(w: WorkerRecord, req_id: int, client: bytes) -> list[zmq.Frame]:
    """The reply (envelope, header, error map) that answers a call whose reply came without its
    header."""
    err = InternalError(f"worker {w.incarnation[:8]} (pid {w.pid}) answered this call without its reply header "
                        "(a broken or foreign worker): the call may have run", worker=w.incarnation)
    return [zmq.Frame(f) for f in (pack_reply_envelope(W_REPLY, Status.ERROR.value, req_id, client),
                                   pack_reply_header(Status.ERROR.value, req_id),
                                   pack_error(err.code, err.message, **err.details))]


class BackendGarbage:
    """Messages from worker-side peers that the broker cannot use: each counted (``garbage_backend``),
    the first of each peer logged (a broken or foreign peer sends them in floods)."""

    def __init__(self, port: Port, counters: dict[str, int]) -> None:
        self.port = port
        self.counters = counters
        self.peers: set[bytes] = set()  # peers whose garbage was logged

    def __call__(self, wid: bytes, w: WorkerRecord | None, what: str) -> None:
        self.counters["garbage_backend"] += 1
        if wid in self.peers:
            return
        if len(self.peers) >= 10_000:
            self.peers.clear()
        self.peers.add(wid)
        peer = (f"worker {w.incarnation[:8]} (pid {w.pid}, host {w.host or '-'}, pool {w.pool.name})" if w is not None
                else f"unregistered peer {wid.hex()[:16]}")
        self.port.log(logging.WARNING, "%s sent garbage: %s (counted as garbage_backend; more from it are counted, "
                      "not logged)", peer, what)
