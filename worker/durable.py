"""A worker's side of durable sessions (docs/protocol.md, "Durable sessions").

A call of a durable session comes with ``Durable.CHECKPOINT`` in its request envelope: after it, the
session is checkpointed (worker/checkpoint.py) and the checkpoint sent before the call's reply
(``W_CHECKPOINT``), or nothing when the call changed nothing. The first call after a move comes
with ``Durable.RESTORE`` and the checkpoint between the request envelope and the request header: the
session is restored before the call is decoded. What a checkpoint must leave out is said once, as
a :class:`dspex.NotDurableWarning` of the call that brought it (its output goes to the caller).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgpack

from dspex.wire.errors import CheckpointRefused, NotDurableWarning, ProtocolError
from dspex.wire.zmqfast import frame_buffer
from worker import checkpoint, checkpoint_restore
from worker.refs import RefTable, SessionState
from worker.sink import OutputSink

log = logging.getLogger("dspex.worker")


@dataclass
class Restore:
    """The checkpoint a request carries: its meta (session, seq, slots) and frames."""

    session: str
    seq: int
    slots: list[int]
    frames: list[Any]  # the skeleton (when seq > 0), then one blob per slot


def split_restore(frames: list[Any]) -> tuple[Restore, list[Any]]:
    """``[envelope, meta, skeleton?, *blobs, header, ...]`` (an envelope with ``Durable.RESTORE``)
    -> the restore and ``[envelope, header, ...]``."""
    try:
        meta = msgpack.unpackb(frame_buffer(frames[1]))
        session, seq, slots = str(meta["session"]), int(meta["seq"]), [int(i) for i in meta["slots"]]
    except Exception as exc:  # noqa: BLE001 - any malformed restore meta is the broker's bug, refused
        raise ProtocolError(f"malformed restore frames: {exc}") from None
    n = len(slots) + (1 if seq else 0)
    if len(frames) < 3 + n:
        raise ProtocolError(f"restore frames: {len(frames) - 3} of {n}")
    return Restore(session, seq, slots, frames[2:2 + n]), [frames[0], *frames[2 + n:]]


class DurableSessions:
    """Restores and checkpoints of this worker's durable sessions."""

    def __init__(self, refs: RefTable, history_limit: int = checkpoint.DEFAULT_HISTORY_LIMIT) -> None:
        self.refs = refs
        self.history_limit = history_limit

    def restore(self, session: str, restore: Restore) -> SessionState:
        """The session as the checkpoint a call of ``session`` carries (its first call after a
        move) holds it, replacing anything this worker held of it; restored before anything may
        refuse the call: the broker sends it once. Raises ``CheckpointRefused`` (and keeps
        nothing of it) for a checkpoint it cannot use."""
        sid = restore.session
        if sid != session:
            raise ProtocolError(f"restore of session {sid[:8]} with a call of {session[:8]}")
        self.refs.release_session(sid, "its session was restored from a checkpoint")
        state = self.refs.session(sid)
        if not restore.seq:  # durable, but no call of it changed anything yet
            state.checkpoint = checkpoint.Tracker(sid, self.history_limit)
            return state
        frames = [frame_buffer(f) for f in restore.frames]
        try:
            restored = checkpoint_restore.restore(state, frames[0], restore.slots, frames[1:], restore.seq,
                                          self.history_limit)
        except CheckpointRefused as err:
            self.refs.release_session(sid, "its checkpoint was refused")
            log.error("session %s: %s", sid[:8], err.message)
            raise
        state.checkpoint = restored.tracker
        gone = {why.key: f"it was not durable ({why.reason}); its session moved to this worker"
                for why in restored.lost if why.section == "ref"}
        self.refs.adopt(state, gone)
        log.info("session %s restored from its checkpoint %d (%d refs, %d not durable)", sid[:8], restore.seq,
                 len(state.refs), len(restored.lost))
        return state

    def after_call(self, state: SessionState, full: bool, sink: OutputSink) -> list[Any] | None:
        """The frames after a ``W_CHECKPOINT`` head for the call that just ran (None: nothing
        changed). What could not be kept is said as a warning through ``sink`` (the call's
        output: its caller, and the worker's log)."""
        tracker = state.checkpoint
        if tracker is None:
            tracker = state.checkpoint = checkpoint.Tracker(state.id, self.history_limit)
        try:
            ck, newly = tracker.build(state, full=full)
        except Exception as exc:  # noqa: BLE001 - pickling runs user code (__reduce__, __getstate__)
            reason = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("session %s cannot be checkpointed as a whole: %s", state.id[:8], reason)
            return [msgpack.packb({"session": state.id, "error": f"the session as a whole cannot be pickled ({reason})"})]
        for why in newly:
            try:
                sink.warning(f"dspex: {why.message()}", NotDurableWarning, "<dspex checkpoint>", 0, None)
            except Exception:  # noqa: BLE001 - a caller gone or cancelled: the worker's log has it
                log.warning("session %s: %s", state.id[:8], why.message())
        if ck is None:
            return None
        return [msgpack.packb(ck.meta()), ck.skeleton, *ck.blobs]

    @staticmethod
    def fitted(frames: list[Any], reply: list[Any], bound: int) -> list[Any]:
        """``frames`` (of :meth:`after_call`), or frames telling the broker the session cannot stay
        durable when its checkpoint cannot travel in one message under ``bound`` (the message
        bound, DSPEX_MAX_MESSAGE): with the call's ``reply`` now, and whole (everything the
        broker holds) with a call after a move. The broker's socket drops a bigger message and the
        worker's connection with it, as if the worker had crashed."""
        meta = msgpack.unpackb(frames[0])
        held = max(int(meta.get("size", 0)), sum(map(len, frames)))
        if "size" not in meta or held + sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes
                                            for f in reply) <= bound:
            return frames
        reason = (f"its checkpoint would hold {held / 2**20:.1f} MB, more than one message may carry "
                  f"({bound / 2**20:.1f} MB, DSPEX_MAX_MESSAGE)")
        log.warning("session %s cannot stay durable: %s", meta["session"][:8], reason)
        return [msgpack.packb({"session": meta["session"], "error": reason})]

    @staticmethod
    def refused_frames(err: CheckpointRefused) -> list[Any]:
        """``W_CHECKPOINT`` frames telling the broker the session is lost."""
        return [msgpack.packb({"session": err.details.get("session", ""), "lost": err.details.get("reason", "")})]
