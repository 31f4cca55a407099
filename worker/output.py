"""What user code prints, warns or logs during a call: to its caller and to the worker log, tagged.

``sys.stdout``/``sys.stderr`` are replaced once by dispatchers that send a write to the sink of
the call it belongs to (a contextvar, which threads a call starts carry on a capacity-N worker:
worker.threads; on a capacity-1 worker also the one running call, for threads user code starts),
else to the real stream. ``warnings.showwarning`` likewise, and a
handler on the root logger gives a call's log records (any logger's that propagate to the root)
at or above its caller's threshold to its sink.

A sink logs complete lines as ``[session req] stream: text`` and, when the caller takes output,
sends it events: ``{"stream": "stdout" | "stderr", "text"}`` per write, up to its last line end
(a carriage return, a progress bar redrawing itself, also ends a piece; a write of more than
MAX_EVENT_CHARS goes in pieces cut at line ends; a flush sends the partial line written so far,
as a terminal would show it), one ``"warning"`` event per warning (its text, and its message,
category and place, so the client can re-issue it) and one ``"log"`` event per record (logger,
level, message, exception text...). A carriage return replaces the pending line in the log instead
of logging it, so tqdm bars leave one line per bar in the log, never a smear of redraws; the
caller still gets every redraw.
"""

from __future__ import annotations

import codecs
import contextvars
import io
import logging
import re
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any, TextIO

from worker import limits

log = logging.getLogger("dspex.worker.output")

MAX_LINE_CHARS = 8000
MAX_EVENT_CHARS = 64 * 1024  # of the text of one output event
MAX_RECORD_CHARS = 100_000  # of a log record's message, and of its exception text
# terminal control sequences (colours, tqdm's cursor moves between bars) mean nothing in a log file
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_OWN_LOGGERS = "dspex.worker"  # the worker's own records are the worker's, never a call's output
_FORMATTER = logging.Formatter()
# a record's own attributes; any other is an ``extra=`` field of the call that logged it
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
MAX_EXTRA_FIELDS = 32
_PLAIN = (str, int, float, bool, type(None))
Event = dict[str, Any]
Emit = Callable[[Event], None]


class OutputSink:
    """The output of one call. ``log_level``: the lowest level of log records its caller takes
    (0: none)."""

    def __init__(self, tag: str, emit: Emit | None, log_level: int = 0) -> None:
        self.tag = tag
        self.emit = emit
        self.log_level = log_level if emit is not None else 0
        self._pending: dict[str, str] = {}
        self._sent: dict[str, int] = {}  # stream -> chars of its pending line a flush sent already
        self._decoders: dict[str, codecs.IncrementalDecoder] = {}  # of bytes written to a stream's buffer
        self._lock = threading.Lock()
        self.closed = False  # the call ended: a thread it started that writes on goes to the real stream

    def write(self, stream: str, text: str) -> None:
        if not text:
            return
        out: list[str] = []
        with self._lock:
            buf = self._pending.get(stream, "") + text
            sent = self._sent.pop(stream, 0)
            end = max(buf.rfind("\n"), buf.rfind("\r")) + 1  # what precedes it is whole lines and redraws
            done, buf = buf[:end], buf[end:]
            if done:
                out.append(done[sent:])
                sent = 0
            if len(buf) > MAX_LINE_CHARS:  # a huge write without newline: pass it on in pieces
                out.append(buf[sent:])
                done += buf + "\n"
                buf, sent = "", 0
            self._pending[stream] = buf
            if sent:
                self._sent[stream] = sent
        for line in _log_lines(done):
            self._log(stream, line)
        if self.emit is not None:
            for piece in out:
                for event_text in _cut(piece):
                    self.emit({"stream": stream, "text": event_text})

    def write_bytes(self, stream: str, data: bytes) -> None:
        """Bytes written to ``sys.stdout.buffer``/``sys.stderr.buffer``: decoded as UTF-8 (what the
        worker's streams write), a character cut between two writes kept for the next."""
        with self._lock:
            decoder = self._decoders.get(stream)
            if decoder is None:
                decoder = self._decoders[stream] = codecs.getincrementaldecoder("utf-8")("replace")
            text = decoder.decode(data)
        self.write(stream, text)

    def flush(self, stream: str) -> None:
        """Send the caller what is written of the pending line (a progress bar's latest state);
        the log still gets the line when it ends."""
        if self.emit is None:
            return
        with self._lock:
            buf = self._pending.get(stream, "")
            sent = self._sent.get(stream, 0)
            if len(buf) <= sent:
                return
            self._sent[stream] = len(buf)
        self.emit({"stream": stream, "text": buf[sent:]})

    def warning(self, message: Any, category: type[Warning], filename: str, lineno: int, line: str | None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        for piece in text.splitlines():
            self._log("warning", piece)
        if self.emit is not None:
            self.emit({"stream": "warning", "text": text, "message": str(message),
                       "category": [getattr(category, "__module__", "builtins"),
                                    getattr(category, "__qualname__", "UserWarning")],
                       "filename": str(filename), "lineno": int(lineno)})

    def record(self, record: logging.LogRecord) -> None:
        if self.emit is not None:
            self.emit(_record_event(record))

    def _log(self, stream: str, line: str) -> None:
        line = _ANSI.sub("", line[:MAX_LINE_CHARS])
        if line.strip():
            log.info("[%s] %s: %s", self.tag, stream, line)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            if not self._pending:  # nothing was written (the usual call)
                return
            rest, self._pending = self._pending, {}
            sent, self._sent = self._sent, {}
        for stream, text in rest.items():
            if text:
                self._log(stream, text)
                if self.emit is not None and len(text) > sent.get(stream, 0):
                    self.emit({"stream": stream, "text": text[sent.get(stream, 0):]})


def _log_lines(text: str) -> list[str]:
    """The lines of ``text`` (whole lines and redraws) the worker log keeps: each line's last
    state (a carriage return is a redraw of the line; ``\\r\\n`` a line end)."""
    if not text:
        return []
    lines = text.split("\n")
    lines.pop()  # after the last newline: redraws of a line still open (a bar), not logged
    return [line for line in (line.removesuffix("\r").rpartition("\r")[2] for line in lines) if line]


def _cut(text: str) -> list[str]:
    """``text`` in events of at most about MAX_EVENT_CHARS, cut after a line end where there is
    one: a whole print is one event (one write on the client), and a huge one is not held in
    memory at once by the broker and the client."""
    pieces, start = [], 0
    while len(text) - start > MAX_EVENT_CHARS:
        cut = text.rfind("\n", start, start + MAX_EVENT_CHARS) + 1 or start + MAX_EVENT_CHARS
        pieces.append(text[start:cut])
        start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _clip(text: str) -> str:
    if len(text) <= MAX_RECORD_CHARS:
        return text
    return f"{text[:MAX_RECORD_CHARS]}... ({len(text) - MAX_RECORD_CHARS} more characters; the worker log has them)"


def _record_event(record: logging.LogRecord) -> Event:
    """A log record as its caller re-emits it: what a formatter needs, already formatted where
    the objects stay here (the message's arguments, the exception)."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string is the worker log handler's to report
        message = str(record.msg)
    exc_text = record.exc_text
    if record.exc_info and not exc_text:
        exc_text = record.exc_text = _FORMATTER.formatException(record.exc_info)
    message = _clip(message)
    exc_text = _clip(exc_text) if exc_text else None
    text = f"{record.levelname}:{record.name}:{message}\n"
    if exc_text:
        text += exc_text + "\n"
    if record.stack_info:
        text += record.stack_info + "\n"
    return {"stream": "log", "text": text, "logger": record.name, "level": record.levelno, "message": message,
            "exc_text": exc_text, "stack_info": record.stack_info, "pathname": record.pathname,
            "lineno": record.lineno, "funcName": record.funcName, "created": record.created,
            "process": record.process, "threadName": record.threadName, "extra": _extra(record)}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    """A record's ``extra=`` fields, for the client's formatters that name them: plain values
    as they are, others as their repr (what ``%(field)s`` would have shown of most)."""
    extra: dict[str, Any] = {}
    for key, value in record.__dict__.items():
        if key in _RECORD_FIELDS or key.startswith("dspex_") or not isinstance(key, str):
            continue
        if len(extra) == MAX_EXTRA_FIELDS:
            break
        try:
            extra[key] = value if type(value) in _PLAIN else _clip(repr(value))
        except Exception:  # noqa: BLE001 - a repr that fails must not lose the record
            extra[key] = f"<{type(value).__name__}>"
    return extra


_current: contextvars.ContextVar[OutputSink | None] = contextvars.ContextVar("dspex_output", default=None)
_process_sink: OutputSink | None = None  # capacity 1: the one running call, for threads it starts
_local = threading.local()


def _sink() -> OutputSink | None:
    if getattr(_local, "busy", False):
        return None  # writing from inside a sink (a log handler on stderr): the real stream
    sink = _current.get()
    return sink if sink is not None and not sink.closed else _process_sink


class _Dispatch(io.TextIOBase):
    def __init__(self, name: str, real: TextIO) -> None:
        self.name = name
        self.real = real
        self.buffer = _BinaryDispatch(self)

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # as a text file refuses it (click probes a stream with b"")
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
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
        sink = _sink()
        if sink is None:
            self.real.flush()
            return
        _local.busy = True
        try:
            sink.flush(self.name)
        finally:
            _local.busy = False

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
        output is already UTF-8 and forwarded per write."""


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
        _local.busy = True
        try:
            sink.write_bytes(self.text.name, raw)
        finally:
            _local.busy = False
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
        _local.busy = True
        try:
            sink.record(record)
        finally:
            _local.busy = False


_dispatchers: tuple[_Dispatch, _Dispatch] | None = None


def install() -> None:
    """Replace sys.stdout/sys.stderr and warnings.showwarning, add the root logger's handler of
    call records (once per process)."""
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
        _local.busy = True
        try:
            sink.warning(message, category, filename, lineno, line)
        finally:
            _local.busy = False

    warnings.showwarning = showwarning
    logging.getLogger().addHandler(_CallRecords())


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

    def relax(self, idle: float) -> None:
        with self._lock:
            if self._own is not None and not self._running and time.monotonic() - self._idle_since > idle:
                logging.root.setLevel(self._own)
                self._own = None


_root_level = _RootLevel()
ROOT_LEVEL_IDLE = 30.0  # seconds without a call below the worker's level before its level is back


def relax_root_level() -> None:
    """Put the root logger's own level back if no call has taken records below it for a while
    (the worker calls this every second)."""
    _root_level.relax(ROOT_LEVEL_IDLE)


class capture:
    """Route this call's output to a new sink for the block (``with`` gives the sink). A class,
    not a generator context manager: it is entered on every call, and a class is cheaper to enter.
    ``log_level``: the lowest level of log records the caller takes (0: none); the root logger
    is lowered to it when the worker's level is above it (:class:`_RootLevel`)."""

    __slots__ = ("_lowered", "_token", "process_wide", "sink")

    def __init__(self, tag: str, emit: Emit | None, process_wide: bool, log_level: int = 0) -> None:
        self.sink = OutputSink(tag, emit, log_level)
        self.process_wide = process_wide
        self._lowered = False

    def __enter__(self) -> OutputSink:
        global _process_sink
        self._token = _current.set(self.sink)
        if self.process_wide:
            _process_sink = self.sink
        level = self.sink.log_level
        if level and level < _root_level.ceiling():
            _root_level.enter(level)
            self._lowered = True
        return self.sink

    def __exit__(self, *exc: object) -> None:
        global _process_sink
        sink = self.sink
        with limits.protected():
            if self._lowered:
                _root_level.exit()
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
