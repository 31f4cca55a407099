"""Progress events from code running inside a worker.

>>> from dspex import progress
>>> progress.report({"step": 3, "of": 10})   # no-op unless the caller asked for progress

The worker sets :data:`current_reporter` around a call whose caller asked for streaming; the
event reaches the caller's ``on_progress`` callback (or the stream's ``progress`` list).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

current_reporter: contextvars.ContextVar[Callable[[Any], None] | None] = contextvars.ContextVar(
    "dspex_progress", default=None
)


def report(data: Any) -> None:
    """Send ``data`` (any codec value) to the caller as a progress event, if it listens."""
    reporter = current_reporter.get()
    if reporter is not None:
        reporter(data)
