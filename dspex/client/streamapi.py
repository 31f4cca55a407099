"""What both stream kinds (the blocking ``dspex.Stream``, the asyncio ``AsyncStream``) hold: the
progress events collected, the result once done (``{"items": n, "value": v}``, ``v`` what the
generator returned), and the session whose close ends them."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from dspex.client.sessionapi import SessionAPI
from dspex.wire.errors import Cancelled, QueueTimeout, SessionClosed

log = logging.getLogger("dspex.client")

# items a call reads ahead for a stream its caller holds (``take_in``) before it stops a producer
# that does not end
HELD_ITEMS_MAX = 1024


def returned(summary: Any) -> Any:
    """The ``return`` value of a stream's generator in its final ``summary``."""
    return summary.get("value") if isinstance(summary, dict) else None


class ReadAheadStopped(Exception):
    """The deadline of the call that reads a stream ahead came first: the stream is left as it is."""


# why a call of a session waits for its held stream, where the broker runs neither beside the other
ONE_AT_A_TIME = "its session runs one call at a time on its worker"
ONE_SLOT = "the stream holds its pool's only worker slot"


def runs_beside(status: dict[str, Any], pool: str) -> str | None:
    """Whether the broker runs a call of a (not durable) session of ``pool`` beside a stream of
    that session, by its ``status``: None where it does (a ``hint`` or ``none`` pool of two slots
    or more), else why not (``ONE_AT_A_TIME``, ``ONE_SLOT``)."""
    info = status.get("pools", {}).get(pool)
    if not isinstance(info, dict) or info.get("affinity") not in ("hint", "none") or info.get("durable"):
        return ONE_AT_A_TIME
    slots = sum(int(w.get("capacity", 1)) for w in info.get("workers", ()) if w.get("state") != "draining")
    return None if slots >= 2 else ONE_SLOT


def behind_held_stream(op: str, timeout: float, req_id: int, why: str) -> QueueTimeout:
    """The error of a call whose deadline came while it read ahead a stream that did not end."""
    return QueueTimeout(f"{op} did not run: it waited {timeout:g}s behind stream {req_id} of its session, which "
                        f"the caller holds open ({why}: finish or close the stream first)", op=op)


class StreamAPI:
    """What both stream kinds hold: the ``progress`` events collected, the ``result`` once ``done``.
    One collected before its end stops its producer (``_end``).

    An open stream is a call that runs until its producer ends; past its credit window the
    producer waits for the loop. Where the broker runs a session's calls one at a time (a
    ``strict_*`` pool, a durable session) or the stream holds the pool's only worker slot, a call
    of that session made where the stream is held (``stream = s.stream_apply(...)``, some
    ``next(stream)`` or a ``break``, then ``s.run(...)``, on the stream's thread or task) would
    wait for a loop that cannot go on, where in-process the generator waits suspended and the
    call runs. So the call first reads the stream ahead (``take_in``: its items, then how it ended, kept in order for the
    stream's next reads); a producer still going after ``HELD_ITEMS_MAX`` items is stopped, and
    the stream ends with ``Cancelled`` after them. A call whose deadline comes first did not run
    (``QueueTimeout``); the stream goes on as it was. A ``hint`` or ``none`` pool of two slots or
    more runs the call beside the stream (``runs_beside``, asked of the broker's status once per
    pool): nothing is read ahead, and the producer waits suspended, as in-process."""

    _end: Callable[..., None]

    def __init__(self, session: SessionAPI | None) -> None:
        self.done = False
        self.result: Any = None
        self.progress: list[Any] = []  # filled by its exchange (Exchange.collect_progress)
        self._session = session
        self._taken_in: deque[Any] = deque()  # items a call of the session read ahead
        self._taken_end: Exception | None = None  # how the stream ended while they were read

    def _has_taken(self) -> bool:
        return bool(self._taken_in) or self._taken_end is not None

    def _give_taken(self) -> Any:
        """The next item read ahead, or (raised, once) how the stream ended then."""
        if self._taken_in:
            return self._taken_in.popleft()
        end, self._taken_end = self._taken_end, None
        assert end is not None  # _has_taken() said so
        raise end

    def _stop_taking(self, req_id: int, session: str, why: str) -> None:
        """``HELD_ITEMS_MAX`` items read ahead and the producer goes on: stop it."""
        self._end(abandon=True)
        self._taken_end = Cancelled(f"stream {req_id} was stopped after {HELD_ITEMS_MAX} items read ahead for "
                                    f"another call of its session ({why}: close or finish a stream before the "
                                    "next call)", session=session)

    def _check_open(self) -> None:
        """A stream read after its session closed: the close cancelled its producer, and the items
        it sent ahead are not what the caller wants; ``SessionClosed`` (once: it ended)."""
        session = self._session
        if session is not None and session.closed:
            self._end(abandon=True)  # the broker cancelled it; this covers a close it never heard of
            raise SessionClosed(f"session {session.id[:8]} was closed, and this stream with it (its producer "
                                "was cancelled)", session=session.id)

    def __del__(self) -> None:
        if not self.done:
            try:
                self._end(abandon=True)
            except Exception as exc:  # noqa: BLE001 - garbage collection (maybe at interpreter exit) must not raise
                log.debug("abandoning a stream at garbage collection: %r", exc)
