"""A durable session's checkpoint writes and the replies held for them (``DurableSessions.writes``;
docs/protocol.md, "Durable sessions").

The worker sends a durable call's checkpoint and its reply as one message (``W_CHECKPOINT``). The
checkpoint goes to the store through the port (a job: the shell runs the store on a thread or at
the end of its loop turn and hands finished jobs back through ``Core.store_done``); the call's
reply is held until every checkpoint write of its session submitted before it has committed, then
forwarded, in order. A refused write turns its call's reply into ``session_not_durable`` and the
session into a plain one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgpack

from broker.answers import call_error, error_cause, one_line
from broker.checkpoints import Job
from broker.moves import SessionMoves, movable
from broker.port import Port
from broker.state import Clock, Durability, Pending, Pool, SessionRecord, WorkerRecord
from broker.store_schema import OverCap, OverTotalCap, StaleCheckpoint, Write
from dspex.stack.health import CHECKPOINT_REFUSED, failure_kind
from dspex.wire.errors import InternalError, SessionNotDurable, SessionNotHeld
from dspex.wire.headers import pack_error, pack_reply_header
from dspex.wire.protocol import W_CHECKPOINT, W_REPLY, Status

if TYPE_CHECKING:
    import zmq


Key = tuple[bytes, int]  # (client, req_id)
Counts = tuple[Pool, str, str]  # how a call's answer counts: its pool, op and outcome


class CheckpointWrites:
    """Durable calls' checkpoints on their way to the store and their replies held until they
    commit; acts through the port (``store``, ``to_client``) and the session's moves (a
    checkpoint its worker could not restore loses the session; a committed write lets an uneven
    pool's session spread)."""

    def __init__(self, sessions: dict[str, SessionRecord], pools: dict[str, Pool], *, clock: Clock, port: Port,
                 moves: SessionMoves, counters: dict[str, int], core_counters: dict[str, int]) -> None:
        """``counters``: the durable sessions' (writes, refused); ``core_counters``: the core's (a
        malformed checkpoint counts as backend garbage); ``pools``: a session turned plain counts in
        its pool's health window."""
        self.sessions, self.pools, self.clock, self.port, self.moves = sessions, pools, clock, port, moves
        self.counters, self.core_counters = counters, core_counters
        self._to_client = port.to_client

    def answered(self, w: WorkerRecord, p: Pending, rec: SessionRecord | None, frames: list[zmq.Frame],
                 ok: bool) -> bool:
        """The final reply ``frames`` (``[wid, envelope, ...]``) of call ``p`` that ``w`` ran, of a
        durable session ``rec`` or carrying a checkpoint (``W_CHECKPOINT``): the checkpoint goes to
        the store and the reply to the client once it (and every write of the session before it)
        committed. Returns whether the reply is a success; its outcome counts in ``w``'s pool when
        it goes to the client (``session_not_durable`` when its checkpoint was refused)."""
        if not ok and movable(rec) and frames[1].bytes[:1] == W_REPLY and error_cause(frames)[0] == SessionNotHeld.code:
            assert rec is not None
            self.moves.not_held(rec, w, p)
            w.pool.outcomes[(p.op, p.outcome(False))] += 1
            return False
        client = p.client
        reply: list[Any] = [client, *frames[2:]]
        if frames[1].bytes[:1] == W_CHECKPOINT:
            used = self._checkpoint(w, p, frames)
            if used < 0:  # (the session is no longer durable: the call is told so)
                self.core_counters["garbage_backend"] += 1
                ok = False
                reply = [client, pack_reply_header(Status.ERROR.value, p.req_id),
                         pack_error(InternalError.code, "its worker sent a malformed checkpoint")]
            else:
                reply = [client, *frames[2 + used:]]
        self.reply(rec, (client, p.req_id), reply, (w.pool, p.op, p.outcome(ok)))
        return ok

    def _checkpoint(self, w: WorkerRecord, p: Pending, frames: list[zmq.Frame]) -> int:
        """``frames``: ``[wid, W_CHECKPOINT envelope, meta, skeleton?, *blobs, reply_header, ...]``
        of the call ``p`` that ``w`` runs (the caller checked that). Store the checkpoint; return
        how many frames it took after the envelope (the call's reply follows them), -1 if it is
        malformed (then the session is no longer durable)."""
        key = (p.client, p.req_id)
        rec = self.sessions.get(p.session) if p.session else None
        try:
            meta = msgpack.unpackb(frames[2].buffer)
            if not isinstance(meta, dict) or meta.get("session") != p.session:
                raise ValueError("not a checkpoint of this call's session")
            if "lost" in meta or "error" in meta:
                used, set_slots = 1, []
            else:
                set_slots, clear_slots = list(meta["set"]), list(meta["clear"])
                seq, full, size = int(meta["seq"]), bool(meta["full"]), int(meta["size"])
                if not all(isinstance(i, int) for i in (*set_slots, *clear_slots)):
                    raise TypeError("slots are not integers")
                used = 2 + len(set_slots)
            if len(frames) < 2 + used + 1:
                raise ValueError(f"{len(frames) - 2} frames for a checkpoint of {used} and a reply")
        except Exception as exc:  # noqa: BLE001 - whatever a malformed frame raises
            if rec is not None and rec.durable is not None:
                self._turn_off(rec, key, f"its worker sent a malformed checkpoint ({exc})", service=True)
            return -1
        d = rec.durable if rec is not None else None
        if rec is None or d is None or d.off:
            return used  # no longer durable (a call sent before it turned so), or closed meanwhile
        if "lost" in meta:
            self.moves.lose(rec, f"{meta['lost']}", w.id)
        elif "error" in meta:
            self._turn_off(rec, key, str(meta["error"]), service=False)  # too big for a message: the caller's
        else:
            write = Write(rec.id, seq, frames[3].buffer, set_slots, [f.buffer for f in frames[4:2 + used]],
                          clear_slots, full, size)
            if full:
                d.needs_full = False
            d.partial = bool(meta.get("partial"))
            d.submitted += 1
            self.port.store(Job("write", (write,), tag=(rec.id, key, size, seq)))
        return used

    def reply(self, rec: SessionRecord | None, key: Key, reply: list[Any], counts: Counts) -> None:
        """Forward a call's final reply, or hold it until its session's checkpoints committed;
        ``counts``: its pool, op and outcome, counted as it goes."""
        d = rec.durable if rec is not None else None
        if d is None:
            self._send(None, key, reply, counts)
        elif d.submitted == d.done:  # nothing pending: the reply, or its refusal, now
            self._send(d, key, reply, counts)
        else:
            d.held.append((d.submitted, key, reply, counts))

    def release_held(self, d: Durability, everything: bool = False) -> None:
        """The replies whose writes committed go; ``everything``: the session is gone, all of
        them go now (a refused call's as its error)."""
        while d.held and (everything or d.held[0][0] <= d.done):
            _before, key, reply, counts = d.held.popleft()
            self._send(d, key, reply, counts)

    def _send(self, d: Durability | None, key: Key, reply: list[Any], counts: Counts) -> None:
        """A call's reply, or its ``session_not_durable`` if its checkpoint was refused: the
        outcome the pool counts (its OK/ERR, ``dspex_requests_total``) is what the caller got."""
        pool, op, outcome = counts
        if d is not None and key in d.refused:
            outcome = d.refused[key].code
            reply = self._refusal(d, key, reply)
        pool.outcomes[(op, outcome)] += 1
        self._to_client(reply)

    @staticmethod
    def _refusal(d: Durability, key: Key, reply: list[Any]) -> list[Any]:
        """The call's ``session_not_durable`` in place of its ``reply``; a call that failed says
        its own error too (the caller would not see it otherwise)."""
        err = d.refused.pop(key)
        message, details = err.message, dict(err.details)
        failed = call_error(reply)
        if failed:
            message = f"{message}. The call itself failed: {failed}"
            details["call_error"] = failed
        return [reply[0], pack_reply_header(Status.ERROR.value, key[1]), pack_error(err.code, message, **details)]

    def _turn_off(self, rec: SessionRecord, key: Key | None, reason: str, service: bool) -> None:
        """The session is no longer durable; the call ``key`` gets ``session_not_durable``.
        ``service``: the broker failed it (its store refused the write), not the session's own size:
        its pool's health window counts that as the service's failure, with ``reason``."""
        d = rec.durable
        assert d is not None
        if not d.off:
            d.off = reason
            self.port.store(Job("forget", (rec.id, reason)))
            self.counters["refused"] += 1
            self.port.log(logging.WARNING, "session %s is no longer durable: %s", rec.id[:8], reason)
            pool = self.pools.get(rec.pool)
            if pool is not None:
                code = CHECKPOINT_REFUSED if service else SessionNotDurable.code
                pool.recent.add(failure_kind(code), code, self.clock.now, one_line(f"{code}: {reason}"))
                if service:
                    pool.checkpoint_error = reason
        if key is not None:
            d.refused[key] = SessionNotDurable(
                f"the call ran and its effects stay in session {rec.id[:8]}, but its checkpoint could not be kept: "
                f"{reason}; its result is not returned, and the session goes on as a plain (not durable) one",
                session=rec.id, reason=reason, ran=True)

    def done(self, job: Job) -> None:
        """A job the store finished: a write's or an opening's held replies go once committed."""
        if job.op not in ("write", "open"):
            return
        rec = self.sessions.get(job.tag[0] if job.op == "write" else job.args[0])
        d = rec.durable if rec is not None else None
        if rec is None or d is None:
            return
        d.done += 1
        if job.op == "open":
            if job.error is not None:
                self._turn_off(rec, job.tag, f"the broker's checkpoint store failed ({job.error})", service=True)
            self.release_held(d)
            return
        sid, key, size, seq = job.tag
        if job.error is None:
            d.bytes, d.seq, d.stored = size, seq, self.clock.wall()
            self.counters["writes"] += 1
        elif isinstance(job.error, StaleCheckpoint):
            self.port.log(logging.WARNING, "session %s: %s", sid[:8], job.error)
        else:
            # a session over its own cap is the caller's; the store full or failing is the broker's
            self._turn_off(rec, key, str(job.error),
                           service=isinstance(job.error, OverTotalCap) or not isinstance(job.error, OverCap))
        self.release_held(d)
        if self.moves.uneven:
            self.moves.spread_on(rec)
