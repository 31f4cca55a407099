"""A call's output sink: what user code printed, warned or logged during one call, to the worker
log (tagged) and to its caller, and when it goes (worker.output routes writes, warnings and
records here).

A sink logs complete lines as ``[session req] stream: text`` and, when the caller takes output,
sends it events: ``{"stream": "stdout" | "stderr", "text"}`` of whole lines (a carriage return, a
progress bar redrawing itself, also ends a piece; a flush sends the partial line written so far,
as a terminal would show it), one ``"warning"`` event per warning (its text, and its message,
category and place, so the client can re-issue it) and one ``"log"`` event per record (logger,
level, message, exception text...). A carriage return replaces the pending line in the log instead
of logging it, so tqdm bars leave one line per bar in the log, never a smear of redraws; the
caller still gets every redraw.

Text is coalesced: each event costs a message through the broker and a write on the client, so a
loop of small prints sent one event per write costs many times what it costs in-process. The
first text after a quiet spell (no event for COALESCE_WINDOW) goes at once; text that follows
within the window waits and goes as one event per stream run when the window ends, when
MAX_EVENT_CHARS are waiting (events are cut at line ends, at most about that long), before a
warning, a record, a stream item or a progress event of the call (:meth:`OutputSink.send_pending`),
and when the call ends, before its reply. A window that ends while the call writes nothing more
(it sleeps, waits on an LM) is sent by the thread that waits on the worker's socket
(:data:`flush_timer`, run by worker.link), so the last line shows within the window; nothing
wakes while nothing waits.
"""

from __future__ import annotations

import codecs
import logging
import math
import re
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dspex.worker.output")

MAX_LINE_CHARS = 8000
MAX_EVENT_CHARS = 64 * 1024  # of the text of one output event, and of text waiting to go
# Text written this soon after the last event waits to go with what follows: short enough that a
# line shows as at once to a person, long enough that a print loop sends a handful of events.
COALESCE_WINDOW = 0.02
MAX_RECORD_CHARS = 100_000  # of a log record's message, and of its exception text
# terminal control sequences (colours, tqdm's cursor moves between bars) mean nothing in a log file
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_FORMATTER = logging.Formatter()
# a record's own attributes; any other is an ``extra=`` field of the call that logged it
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
MAX_EXTRA_FIELDS = 32
_PLAIN = (str, int, float, bool, type(None))
Event = dict[str, Any]
# the file of the frame that calls what a client asked for (worker/ops.py): a warning at that place
# (a library callable the client called itself warning at its caller's, ``s.run(dspy.InputField,
# prefix=...)``) is at the place of the client's call, as in-process at the line of the script
CALLER_FILE = "<dspex: the client's call>"
Emit = Callable[[Event], None]
# send an event only if the caller's credit allows it now; False: not sent, and the callable given
# runs when credit comes
Offer = Callable[[Event, Callable[[], None]], bool]


class FlushTimer:
    """When each call's waiting text is due, for the thread that waits on the worker's socket (it
    calls :meth:`run` on each turn, and waits no longer than it says). :attr:`wake` (set by the
    worker) wakes that thread when a window ends before it would wake anyway."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[OutputSink, float] = {}
        self._wakes_by = math.inf  # the waiting thread runs the timer again by then
        self.wake: Callable[[], None] | None = None

    def add(self, sink: OutputSink, when: float) -> None:
        with self._lock:
            self._due[sink] = min(when, self._due.get(sink, math.inf))
            poke = when < self._wakes_by
            if poke:
                self._wakes_by = when
        if poke and self.wake is not None:
            self.wake()

    def discard(self, sink: OutputSink) -> None:
        with self._lock:
            self._due.pop(sink, None)

    def run(self, now: float) -> float:
        """Send the text that is due; the seconds until more is (inf: none waits)."""
        if not self._due and self._wakes_by == math.inf:  # the usual turn (an add meanwhile wakes us)
            return math.inf
        with self._lock:
            due = [sink for sink, when in self._due.items() if when <= now]
            for sink in due:
                del self._due[sink]
        for sink in due:
            sink.send_due()
        with self._lock:
            self._wakes_by = min(self._due.values(), default=math.inf)
            return max(0.0, self._wakes_by - now)


flush_timer = FlushTimer()


class OutputSink:
    """The output of one call. ``log_level``: the lowest level of log records its caller takes
    (0: none). ``emit`` sends an event, waiting for the caller's credit; ``offer`` (for the thread
    that runs :data:`flush_timer`, which must never wait for credit: it reads the socket credit
    comes on) sends one only if credit allows now (without it the timer uses ``emit``)."""

    def __init__(self, tag: str, emit: Emit | None, log_level: int = 0, offer: Offer | None = None) -> None:
        self.tag = tag
        self.emit = emit
        self.offer = offer
        self.log_level = log_level if emit is not None else 0
        self._pending: dict[str, str] = {}
        self._sent: dict[str, int] = {}  # stream -> chars of its pending line a flush sent already
        self._decoders: dict[str, codecs.IncrementalDecoder] = {}  # of bytes written to a stream's buffer
        self._lock = threading.Lock()
        self.closed = False  # the call ended: what a thread it started writes on goes to ``late``
        self.late: LateOutput | None = None  # the session's, once the call has ended
        # text waiting to go, in order: [stream, pieces] runs (the caller gets one event per run)
        self._out: list[tuple[str, list[str]]] = []
        self._out_chars = 0
        self._last_sent = -math.inf  # when waiting text last went (time.monotonic())
        self._timed = False  # flush_timer holds this sink, or a sender gives it back to it when done
        self._starved = False  # the timer found no credit: the stream's next credit hands it back
        # one sender at a time, so events leave in the order written (reentrant: a record logged
        # while sending must not deadlock its own thread)
        self._sending = threading.RLock()

    def write(self, stream: str, text: str) -> None:
        if not text:
            return
        out: list[str] = []
        now_due = False
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
            if out and self.emit is not None and not self.closed:
                now_due = self._queue(stream, "".join(out))
            late = self.late if out and self.closed else None
        for line in _log_lines(done):
            self._log(stream, line)
        if now_due:
            self.send_pending()
        if late is not None:
            for piece in out:
                late.write(stream, piece)

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
        """Send the caller what is written of the pending line (a progress bar's latest state),
        as any text: within the window; the log still gets the line when it ends."""
        if self.emit is None:
            return
        with self._lock:
            buf = self._pending.get(stream, "")
            sent = self._sent.get(stream, 0)
            if len(buf) <= sent or self.closed:
                return
            self._sent[stream] = len(buf)
            now_due = self._queue(stream, buf[sent:])
        if now_due:
            self.send_pending()

    def warning(self, message: Any, category: type[Warning], filename: str, lineno: int, line: str | None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        for piece in text.splitlines():
            self._log("warning", piece)
        if self.closed:  # a thread of an ended call: as text on stderr, where the warning would show
            if self.late is not None:
                self.late.write("stderr", text)
        elif self.emit is not None:
            self.send_pending({"stream": "warning", "text": text, "message": str(message),
                               "category": [getattr(category, "__module__", "builtins"),
                                            getattr(category, "__qualname__", "UserWarning")],
                               "filename": str(filename), "lineno": int(lineno),
                               **({"at_call": True} if filename == CALLER_FILE else {})})

    def record(self, record: logging.LogRecord) -> None:
        if self.emit is not None and not self.closed:  # (an ended call's thread: the worker log has it)
            self.send_pending(_record_event(record))

    def relay(self, stream: str, text: str) -> bool:
        """Send ``text`` (whole lines an ended call's thread wrote, logged under that call's tag
        already) with this call's output; False when this call has ended too."""
        with self._lock:
            if self.closed:
                return False
            if self.emit is None:
                return True  # its caller takes no output
            now_due = self._queue(stream, text)
        if now_due:
            self.send_pending()
        return True

    def _log(self, stream: str, line: str) -> None:
        line = _ANSI.sub("", line[:MAX_LINE_CHARS])
        if line.strip():
            log.info("[%s] %s: %s", self.tag, stream, line)

    # -- waiting text ------------------------------------------------------------------------
    def _queue(self, stream: str, text: str) -> bool:
        """Holding the lock: ``text`` waits to go (in the last run if of the same stream). True if
        the waiting text goes now (the first after a quiet spell, a window that has ended, a full
        buffer); else the timer has it (a closed sink's :meth:`close` sends it itself)."""
        if self._out and self._out[-1][0] == stream:
            self._out[-1][1].append(text)
        else:
            self._out.append((stream, [text]))
        self._out_chars += len(text)
        if self._out_chars >= MAX_EVENT_CHARS or time.monotonic() - self._last_sent >= COALESCE_WINDOW:
            return True
        if not self._timed and not self._starved and not self.closed:
            self._timed = True
            flush_timer.add(self, self._last_sent + COALESCE_WINDOW)
        return False

    def _take(self) -> list[tuple[str, list[str]]]:
        """Holding the lock and ``_sending``: the waiting text, now on its way."""
        runs, self._out, self._out_chars = self._out, [], 0
        self._last_sent = time.monotonic()
        self._starved = False
        if self._timed:
            self._timed = False
            flush_timer.discard(self)
        return runs

    def _done_sending(self) -> None:
        """Let ``_sending`` go; text that came meanwhile goes to the timer (a timer's turn that
        found this sink busy left it to us: both look under the lock)."""
        with self._lock:
            self._sending.release()
            if not self._out or self._timed or self._starved or self.closed:
                return
            self._timed = True
            flush_timer.add(self, self._last_sent + COALESCE_WINDOW)

    def send_pending(self, then: Event | None = None) -> None:
        """Send the waiting text now (waiting for credit), then the event ``then``: what the
        call sends that is not text (a warning, a record, a stream item) goes after what it
        printed before."""
        emit = self.emit
        if emit is None:
            return
        self._sending.acquire()
        try:
            with self._lock:
                runs = self._take() if self._out else []
            if runs:
                self._deliver(runs, emit)
            if then is not None:
                emit(then)
        finally:
            self._done_sending()

    def send_due(self) -> None:
        """From the timer: send the waiting text if the caller's credit allows it now; never wait
        (this thread reads the credit)."""
        with self._lock:
            if not self._sending.acquire(blocking=False):
                self._timed = False  # its sender gives it back to the timer when done
                return
            runs = self._take()
        try:
            if runs:
                self._deliver(runs, None)
        finally:
            self._done_sending()

    def _deliver(self, runs: list[tuple[str, list[str]]], emit: Emit | None) -> None:
        """Send ``runs`` in order, waiting for credit with ``emit``, else only as credit allows:
        what cannot go now waits again, ahead of anything written since (the stream's next credit
        hands it back to the timer). What an interruption (a time limit, a cancel) left unsent
        waits again too, for :meth:`close`."""
        offer = self.offer
        pieces = [(stream, text) for stream, run in runs for text in _cut("".join(run))]
        sent = 0
        try:
            for stream, text in pieces:
                event = {"stream": stream, "text": text}
                if emit is not None or offer is None:
                    (emit or self.emit)(event)  # type: ignore[misc]
                elif not offer(event, self._credit_came):
                    with self._lock:
                        self._starved = True
                    break
                sent += 1
        finally:
            if sent < len(pieces):
                rest = [(stream, [text]) for stream, text in pieces[sent:]]
                with self._lock:
                    self._out[:0] = rest
                    self._out_chars += sum(len(text) for _, text in pieces[sent:])

    def _credit_came(self) -> None:
        """The stream the timer found without credit has some again (called on the reading thread)."""
        with self._lock:
            self._starved = False
            if not self._out or self._timed or self.closed:
                return
            self._timed = True
        flush_timer.add(self, 0.0)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            if not self._pending and not self._out:  # nothing was written (the usual call)
                return
            rest, self._pending = self._pending, {}
            sent, self._sent = self._sent, {}
            for stream, text in rest.items():
                if self.emit is not None and len(text) > sent.get(stream, 0):
                    self._queue(stream, text[sent.get(stream, 0):])
        for stream, text in rest.items():
            if text:
                self._log(stream, text)
        self.send_pending()  # before the call's reply
        flush_timer.discard(self)


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
    one: whole lines are one write on the client, and a huge print is not held in memory at once
    by the broker and the client."""
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


MAX_LATE_CHARS = MAX_EVENT_CHARS  # of text held for a session's next call


class LateOutput:
    """What threads a session's calls started write after their call ended (one per session):
    sent with the session's running call, else held for its next call, which sends it before
    its own output. At most MAX_LATE_CHARS are held; what is left out is counted and said (the
    worker log has every line, under the tag of the call that started the thread)."""

    __slots__ = ("_held", "_held_chars", "_left_out", "_live", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: OutputSink | None = None
        self._held: list[tuple[str, str]] = []
        self._held_chars = 0
        self._left_out = 0

    def write(self, stream: str, text: str) -> None:
        with self._lock:
            live = self._live
        if live is not None and live.relay(stream, text):
            return
        with self._lock:
            if self._held_chars + len(text) > MAX_LATE_CHARS:
                self._left_out += len(text)
                return
            self._held.append((stream, text))
            self._held_chars += len(text)

    def attach(self, sink: OutputSink) -> None:
        """A call of the session starts: what is held goes first, then it takes what comes."""
        if not self._held and not self._left_out:  # the usual call: one store, no lock
            self._live = sink
            return
        with self._lock:
            held, self._held, self._held_chars = self._held, [], 0
            left_out, self._left_out = self._left_out, 0
            self._live = sink
        if left_out:
            note = (f"[dspex: {left_out} more characters that threads of this session wrote after their call "
                    "ended are only in the worker log]\n")
            held.append(("stderr", note))
        for stream, text in held:
            sink.relay(stream, text)

    def detach(self, sink: OutputSink) -> None:
        if self._live is sink:  # (a write that still finds it is refused by the closed sink, and held)
            self._live = None
