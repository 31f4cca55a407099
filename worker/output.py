"""What user code prints or warns during a call: to its caller and to the worker log, tagged.

``sys.stdout``/``sys.stderr`` are replaced once by dispatchers that send a write to the sink of
the call it belongs to (a contextvar; on a capacity-1 worker also the one running call, for
threads user code starts), else to the real stream. ``warnings.showwarning`` likewise. A sink
logs complete lines as ``[session req] stream: text`` and, when the caller streams, sends each
line as an ``out`` event (``{"stream", "text"}``). A carriage return (a progress bar redrawing
itself) replaces the pending line instead of logging it, so tqdm bars leave one line per bar in
the log, never a smear of redraws; the caller still gets every redraw.
"""

from __future__ import annotations

import contextvars
import io
import logging
import re
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, TextIO

from worker import limits

log = logging.getLogger("dspex.worker.output")

MAX_LINE_CHARS = 8000
# terminal control sequences (colours, tqdm's cursor moves between bars) mean nothing in a log file
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
Emit = Callable[[str, str], None]  # (stream, text)


class OutputSink:
    """The output of one call."""

    def __init__(self, tag: str, emit: Emit | None) -> None:
        self.tag = tag
        self.emit = emit
        self._pending: dict[str, str] = {}
        self._lock = threading.Lock()

    def write(self, stream: str, text: str) -> None:
        if not text:
            return
        out: list[str] = []
        logged: list[str] = []
        with self._lock:
            buf = self._pending.get(stream, "") + text
            while True:
                cut = min((i for i in (buf.find("\n"), buf.find("\r")) if i >= 0), default=-1)
                if cut < 0:
                    break
                line, end, buf = buf[:cut], buf[cut], buf[cut + 1:]
                if end == "\r" and buf.startswith("\n"):  # a CRLF line end, not a redraw
                    end, buf = "\r\n", buf[1:]
                out.append(line + end)
                if end != "\r" and line:
                    logged.append(line)
            if len(buf) > MAX_LINE_CHARS:  # a huge write without newline: pass it on in pieces
                out.append(buf)
                logged.append(buf)
                buf = ""
            self._pending[stream] = buf
        for line in logged:
            self._log(stream, line)
        if self.emit is not None:
            for piece in out:
                self.emit(stream, piece)

    def _log(self, stream: str, line: str) -> None:
        line = _ANSI.sub("", line[:MAX_LINE_CHARS])
        if line.strip():
            log.info("[%s] %s: %s", self.tag, stream, line)

    def close(self) -> None:
        with self._lock:
            if not self._pending:  # nothing was written (the usual call)
                return
            rest, self._pending = self._pending, {}
        for stream, text in rest.items():
            if text:
                self._log(stream, text)
                if self.emit is not None:
                    self.emit(stream, text)


_current: contextvars.ContextVar[OutputSink | None] = contextvars.ContextVar("dspex_output", default=None)
_process_sink: OutputSink | None = None  # capacity 1: the one running call, for threads it starts
_local = threading.local()


def _sink() -> OutputSink | None:
    if getattr(_local, "busy", False):
        return None  # writing from inside a sink (a log handler on stderr): the real stream
    return _current.get() or _process_sink


class _Dispatch(io.TextIOBase):
    def __init__(self, name: str, real: TextIO) -> None:
        self.name = name
        self.real = real

    def write(self, text: str) -> int:
        sink = _sink()
        if sink is None:
            return self.real.write(text)
        _local.busy = True
        try:
            sink.write(self.name, text)
        finally:
            _local.busy = False
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")

    def writable(self) -> bool:
        return True


_dispatchers: tuple[_Dispatch, _Dispatch] | None = None


def install() -> None:
    """Replace sys.stdout/sys.stderr and warnings.showwarning (once per process)."""
    global _dispatchers
    if _dispatchers is not None:
        return
    _dispatchers = (_Dispatch("stdout", sys.stdout), _Dispatch("stderr", sys.stderr))
    sys.stdout, sys.stderr = _dispatchers
    real_show = warnings.showwarning

    def showwarning(message: Any, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
        sink = _sink() if file is None else None
        if sink is None:
            real_show(message, category, filename, lineno, file, line)
            return
        text = warnings.formatwarning(message, category, filename, lineno, line)
        _local.busy = True
        try:
            sink.write("warning", text)
        finally:
            _local.busy = False

    warnings.showwarning = showwarning


class capture:
    """Route this call's output to a new sink for the block (``with`` gives the sink). A class,
    not a generator context manager: it is entered on every call (~2 µs less each time)."""

    __slots__ = ("sink", "process_wide", "_token")

    def __init__(self, tag: str, emit: Emit | None, process_wide: bool) -> None:
        self.sink = OutputSink(tag, emit)
        self.process_wide = process_wide

    def __enter__(self) -> OutputSink:
        global _process_sink
        self._token = _current.set(self.sink)
        if self.process_wide:
            _process_sink = self.sink
        return self.sink

    def __exit__(self, *exc: object) -> None:
        global _process_sink
        sink = self.sink
        with limits.protected():
            if self.process_wide and _process_sink is sink:
                _process_sink = None
            _current.reset(self._token)
            sink.close()
            if self.process_wide and _dispatchers is not None:
                # a call that rebound sys.stdout/stderr for good must not take the next call's
                # output (another session's) with it
                sys.stdout, sys.stderr = _dispatchers


class _SharedBars(weakref.WeakSet):  # type: ignore[type-arg]
    """tqdm's registry of live bars, shared by every call of a capacity-N worker.

    dspy's Evaluate and ParallelExecutor reset it with ``tqdm.tqdm._instances.clear()`` before
    they start; a bar another session's thread has just created is then missing when tqdm's own
    ``__init__`` removes it again (``KeyError: <weakref ... to 'tqdm'>``, the call fails). Here
    ``clear`` keeps the live bars (it only serves redrawing a terminal, which a worker has not)
    and ``remove`` of a bar that is already gone is a no-op. In-process DSPy has the same race with user threads; a worker makes it
    likely by running several sessions' programs at once.
    """

    def clear(self) -> None:
        return None  # a worker draws no bars: nothing on a terminal needs resetting

    def remove(self, item: Any) -> None:
        self.discard(item)


def share_progress_bars() -> None:
    """Install :class:`_SharedBars` as tqdm's registry (no-op without tqdm)."""
    try:
        import tqdm
    except ImportError:
        return
    cls = tqdm.tqdm
    if not isinstance(cls._instances, _SharedBars):
        bars = _SharedBars()
        for bar in list(cls._instances):
            bars.add(bar)
        cls._instances = bars
