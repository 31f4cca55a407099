"""What user code prints, warns or logs during a call: to its caller and to the worker log, tagged.

``sys.stdout``/``sys.stderr`` are replaced once by dispatchers that send a write to the sink of
the call it belongs to (a contextvar, which threads and pool tasks a call starts carry:
worker.threads; after the call, what they write goes to its session's LateOutput), else to the
real stream. ``warnings.showwarning`` likewise, and a
handler on the root logger gives a call's log records (any logger's that propagate to the root)
at or above its caller's threshold to its sink. What a sink logs and sends, and when
(coalesced text, the flush timer): worker.sink.
"""

from __future__ import annotations

import contextvars
import io
import logging
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any, TextIO

from worker import limits, warnfilters
from worker.refs import SessionState
from worker.sink import Emit, Offer, OutputSink

_OWN_LOGGERS = "dspex.worker"  # the worker's own records are the worker's, never a call's output


_current: contextvars.ContextVar[OutputSink | None] = contextvars.ContextVar("dspex_output", default=None)
_local = threading.local()
# CPython's own "filters changed" bump (3.11-3.13), which makes every warnings registry start
# again; where it is missing, a place's warning is sent once per session as before
_restart_registries: Any = getattr(warnings, "_filters_mutated", lambda: None)


def _sink() -> OutputSink | None:
    if getattr(_local, "busy", False):
        return None  # writing from inside a sink (a log handler on stderr): the real stream
    # (an ended call's sink is kept: what the threads it started write is its session's)
    return _current.get()


def _in_sink(method: Callable[..., None], *args: Any) -> None:
    """A sink's ``method(*args)``, marked busy: what the sink writes itself goes to the real stream."""
    _local.busy = True
    try:
        method(*args)
    finally:
        _local.busy = False


class _Dispatch(io.TextIOBase):
    def __init__(self, name: str, real: TextIO) -> None:
        self.name = name
        self.real = real
        self.buffer = _BinaryDispatch(self)

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # as a text file refuses it (click probes a stream with b"")
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        sink = _sink()
        if sink is None:
            return self.real.write(text)
        _in_sink(sink.write, self.name, text)
        return len(text)

    def flush(self) -> None:
        sink = _sink()
        if sink is None:
            self.real.flush()
            return
        _in_sink(sink.flush, self.name)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")

    def writable(self) -> bool:
        return True

    @property
    def errors(self) -> str:  # type: ignore[override]
        return getattr(self.real, "errors", "strict")

    @property
    def line_buffering(self) -> bool:
        return True  # every write reaches the call's sink at once

    def reconfigure(self, **_options: Any) -> None:
        """Accepted and ignored (scripts call ``sys.stdout.reconfigure(encoding="utf-8")``):
        output is already UTF-8 and forwarded as written."""


class _BinaryDispatch(io.BufferedIOBase):
    """``sys.stdout.buffer`` of a :class:`_Dispatch`: bytes a call writes go to its sink as
    text, as the same program's bytes reach a terminal in-process."""

    def __init__(self, text: _Dispatch) -> None:
        self.text = text

    def write(self, data: Any) -> int:
        raw = bytes(data)
        sink = _sink()
        if sink is None:
            real = getattr(self.text.real, "buffer", None)
            if real is not None:
                return int(real.write(raw))
            self.text.real.write(raw.decode(self.text.encoding, "replace"))
            return len(raw)
        _in_sink(sink.write_bytes, self.text.name, raw)
        return len(raw)

    def flush(self) -> None:
        self.text.flush()

    def fileno(self) -> int:
        return self.text.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


class _CallRecords(logging.Handler):
    """On the root logger: a call's log records at or above its caller's threshold go to its sink."""

    def handle(self, record: logging.LogRecord) -> bool:
        # no handler lock: sending may wait for the caller's credit, and other calls' threads
        # logging meanwhile must not wait for it
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        sink = _sink()
        if sink is None or record.levelno < sink.log_level or not sink.log_level \
                or record.name.startswith(_OWN_LOGGERS):
            return
        _in_sink(sink.record, record)


_dispatchers: tuple[_Dispatch, _Dispatch] | None = None
# the original streams too: ``sys.stdout = sys.__stdout__`` (the usual end of a redirection) and
# ``print(..., file=sys.__stderr__)`` reach the terminal in-process, so the call's client here
_STREAMS = ("stdout", "stderr", "__stdout__", "__stderr__")


def _bind(dispatchers: tuple[_Dispatch, _Dispatch]) -> None:
    for name, stream in zip(_STREAMS, dispatchers * 2):
        setattr(sys, name, stream)


def install() -> None:
    """Replace sys.stdout/sys.stderr and warnings.showwarning, add the root logger's handler of
    call records (once per process)."""
    global _dispatchers
    if _dispatchers is not None:
        return
    _dispatchers = (_Dispatch("stdout", sys.stdout), _Dispatch("stderr", sys.stderr))
    _bind(_dispatchers)
    real_show = warnings.showwarning

    def showwarning(message: Any, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
        sink = _sink() if file is None else None
        if sink is None:
            real_show(message, category, filename, lineno, file, line)
            return
        _in_sink(sink.warning, message, category, filename, lineno, line)

    warnings.showwarning = showwarning
    logging.getLogger().addHandler(_CallRecords())
    _own_logging[:] = [list(logging.root.handlers), logging.root.manager.disable]
    _own_stdin_and_showwarning[:] = [getattr(sys, "stdin", None), showwarning]


class _RootLevel:
    """The root logger's level while callers take records below the worker's own level: the
    lowest level asked for, kept while such calls keep coming (``setLevel`` clears every logger's
    level cache: done per call it would cost more than the call), and put back by :func:`relax`
    once none has run for a while. The worker log's handler keeps the worker's own level."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._own: int | None = None  # the root's level before calls lowered it (None: not lowered)
        self._running = 0  # calls running that take records below ``_own``
        self._idle_since = 0.0

    def ceiling(self) -> int:
        """Records a call takes below this level need the root lowered (and counted)."""
        return logging.root.level if self._own is None else self._own

    def enter(self, level: int) -> None:
        with self._lock:
            root = logging.root
            if self._own is None:
                self._own = root.level
            if root.level > level:
                root.setLevel(level)
            self._running += 1

    def exit(self) -> None:
        with self._lock:
            self._running -= 1
            if not self._running:
                self._idle_since = time.monotonic()

    def relax(self) -> None:
        """Put the root logger's own level back if no call has taken records below it for
        ``ROOT_LEVEL_IDLE`` (the worker calls this at each heartbeat)."""
        with self._lock:
            if self._own is not None and not self._running and time.monotonic() - self._idle_since > ROOT_LEVEL_IDLE:
                logging.root.setLevel(self._own)
                self._own = None


root_level = _RootLevel()
ROOT_LEVEL_IDLE = 30.0  # seconds without a call below the worker's level before its level is back


class _Overlap:
    """How many calls of a capacity-N worker are inside :class:`capture`: what a call changed for
    good (``sys.stdout``, the root logger's handlers: :func:`_put_back`) is put back when the last
    one leaves (while calls overlap, one may be inside its own ``contextlib.redirect_stdout``,
    which must not be undone under it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0

    def enter(self) -> None:
        with self._lock:
            self._inside += 1

    def leave(self) -> bool:
        """True when no call is inside any more."""
        with self._lock:
            self._inside -= 1
            return not self._inside


_overlap = _Overlap()


# the root logger's handlers (the worker log's, the call records') and logging.disable's level
# as :func:`install` left them
_own_logging: list[Any] = []
# sys.stdin (a call that sets it would feed its text to another session's input()) and the
# showwarning that forwards warnings (a call's replacement would take another session's warnings)
_own_stdin_and_showwarning: list[Any] = []


def _put_back() -> None:
    """What a call changed for good and the next call (another session's) must not inherit: it
    would take that call's output with it, or its log records and the worker log's lines."""
    global _dispatchers
    if _dispatchers is None:
        return
    out, err = _dispatchers
    if any(stream.closed or stream.buffer.closed for stream in _dispatchers):  # sys.stdout.close(): for this call only
        _dispatchers = (_Dispatch(out.name, out.real), _Dispatch(err.name, err.real))
    # (a call may have deleted them: `del sys.stdout`)
    if any(getattr(sys, name, None) is not stream for name, stream in zip(_STREAMS, _dispatchers * 2)):
        _bind(_dispatchers)
    handlers, disabled = _own_logging
    root = logging.root
    if root.handlers != handlers:  # removed, or replaced (basicConfig(force=True)), or added to
        root.handlers[:] = handlers
    if root.manager.disable != disabled:
        logging.disable(disabled)
    stdin, showwarning = _own_stdin_and_showwarning
    if getattr(sys, "stdin", None) is not stdin:
        sys.stdin = stdin
    if warnings.showwarning is not showwarning:
        logging.captureWarnings(False)  # (logging's own replacement: a later call's captureWarnings(True) works)
        warnings.showwarning = showwarning


class capture:
    """Route this call's output to a new sink for the block (``with`` gives the sink). A class,
    not a generator context manager: it is entered on every call, and a class is cheaper to enter.
    ``log_level``: the lowest level of log records the caller takes (0: none); the root logger
    is lowered to it when the worker's level is above it (:class:`_RootLevel`). ``alone``: no other
    call runs meanwhile (capacity 1), so the block puts back what the call changed for good
    (:func:`_put_back`) as it ends; with capacity N the last of overlapping calls to end does
    (:class:`_Overlap`)."""

    __slots__ = ("_lowered", "_token", "alone", "late", "session", "sink")

    def __init__(self, tag: str, emit: Emit | None, alone: bool, log_level: int, offer: Offer | None,
                 session: SessionState) -> None:
        self.sink = OutputSink(tag, emit, log_level, offer)
        self.alone = alone
        self.session = session  # whose warning filters are in force during the call (worker.warnfilters)
        self.late = session.late_output  # what threads of its ended calls wrote comes with this one
        self._lowered = False

    def __enter__(self) -> OutputSink:
        self._token = _current.set(self.sink)
        # every "once per place" registry starts again (a counter bumped, the registries dropped
        # lazily): the worker sends a place's warning once per call, and the client's filters and
        # registry decide what shows, as in-process (a ``catch_warnings`` block there, pytest.warns,
        # starts them again too); else the session's module registry hid it from every later call
        _restart_registries()
        if self.session.warning_filters is not None:
            warnfilters.enter(self.session.warning_filters)
        if not self.alone:
            _overlap.enter()
        self.late.attach(self.sink)
        level = self.sink.log_level
        if level and level < root_level.ceiling():
            root_level.enter(level)
            self._lowered = True
        return self.sink

    def __exit__(self, *exc: object) -> None:
        sink = self.sink
        with limits.protected():
            if self._lowered:
                root_level.exit()
            _current.reset(self._token)
            if warnings.filters is not warnfilters.worker_filters:
                warnfilters.leave()
            self.late.detach(sink)
            sink.late = self.late
            sink.close()
            if self.alone or _overlap.leave():
                _put_back()


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
    """Install :class:`_SharedBars` as tqdm's registry (tqdm comes with DSPy)."""
    import tqdm

    cls = tqdm.tqdm
    if not isinstance(cls._instances, _SharedBars):
        bars = _SharedBars()
        for bar in list(cls._instances):
            bars.add(bar)
        cls._instances = bars
