"""One log line format for every dspex process: broker, workers, the processes dspexctl starts.

    2026-11-30T07:30:01.123Z broker[4242] WARNING dspex.broker: pool p refused 1 request(s) ...

UTC ISO 8601 timestamps with milliseconds, the process (``broker[pid]``, ``worker[pool:pid]``),
the level, the logger, the message. Lines written before logging is set up (a bad option, a
config error) use the same format through :func:`early`, so ``grep``/``sort`` over the log files
of a stack see one shape. DSPy installs its own handler and date format on the ``dspy`` logger
when it is imported, writing to whatever ``sys.stderr`` is at the time (in a worker: the running
call's output capture, which would nest its line inside a ``stderr:`` line of ours);
:func:`adopt` sends its records to the root handler instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

FORMAT = "%(asctime)s {label} %(levelname)s %(name)s: %(message)s"


class UTCFormatter(logging.Formatter):
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self.converter = time.gmtime  # every process's lines in UTC, whatever its TZ


def formatter(label: str) -> logging.Formatter:
    return UTCFormatter(FORMAT.format(label=label.replace("%", "%%")))


def setup(label: str, level: str = "INFO", stream: TextIO | None = None) -> None:
    """The root logger writes ``label``'s lines to ``stream`` (stderr); replaces other handlers.
    The handler has the level too: a worker lowers the root's level while a call's caller takes
    records below it (worker.output), and those are the caller's, not this log's."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(label))
    handler.setLevel(level.upper())
    root.addHandler(handler)
    root.setLevel(level.upper())
    adopt("dspy")


def adopt(name: str) -> None:
    """Records of dspy's logger go to the root handler (our format, the real stderr) instead of
    its own handler; ``dspy.disable_logging()`` still silences them."""
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        if h.get_name() == "dspy_handler":
            logger.removeHandler(h)
            stream = getattr(h, "stream", None)
            if hasattr(stream, "enabled"):
                logger.addFilter(_while_enabled(stream))
    logger.propagate = True


def _while_enabled(stream: Any) -> Callable[[logging.LogRecord], bool]:
    """A filter that passes records while dspy's stream of them is enabled."""
    return lambda record: bool(stream.enabled)


def early(label: str, message: str, level: str = "ERROR") -> None:
    """Write one line in the log format to stderr (config errors before logging is set up)."""
    record = logging.LogRecord("dspex", logging.getLevelName(level), __file__, 0, message, None, None)
    print(formatter(label).format(record), file=sys.stderr, flush=True)
