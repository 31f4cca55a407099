"""What both stream kinds (the blocking ``dspex.Stream``, the asyncio ``AsyncStream``) hold: the
progress events collected, the result once done, and the session whose close ends them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dspex.client.api import SessionAPI
from dspex.wire.errors import SessionClosed

log = logging.getLogger("dspex.client")


class StreamAPI:
    """What both stream kinds hold: the ``progress`` events collected, the ``result`` once ``done``.
    One collected before its end stops its producer (``_end``)."""

    _end: Callable[..., None]

    def __init__(self, session: SessionAPI | None) -> None:
        self.done = False
        self.result: Any = None
        self.progress: list[Any] = []  # filled by its exchange (Exchange.collect_progress)
        self._session = session

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
