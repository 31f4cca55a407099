"""Results that are not plain values: streams, progress events, awaitables.

- :class:`StreamControl`: credit-based flow control and cancellation of one streamed call;
  :class:`LazyStream` opens one at the first output event of a plain call.
- :func:`progress_scope`: dspy/gepa log records and ``dspex.progress.report`` as progress events.
- :func:`resolve_awaitable`: an awaitable result (``acall``, ``aforward``, ``dspy.asyncify``) is
  awaited on its session's event loop (worker.session_loop), so the caller gets its value, as
  ``await`` would.
- :func:`drain`: the items of any iterable or async iterable, sent as partial replies. An async
  generator is driven by one task for its whole life: anyio cancel scopes (dspy.streamify) must
  be entered and left in the same task; it awaits credit (:meth:`StreamControl.credit_ready`)
  rather than block its session's loop, which the session's calls running at once share.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from dspex import progress
from dspex.wire import codec
from dspex.wire.errors import Cancelled, DspexError, ResultTooLarge
from dspex.wire.protocol import Status
from dspex.wire.ref import Ref
from worker import limits
from worker.dspy_settings import claim_configure
from worker.remote_errors import remote_error
from worker.session_loop import SessionLoop

log = logging.getLogger("dspex.worker")

Encode = Callable[[Any], list[Any]]
_OUTPUT = Status.OUTPUT.value


class StreamControl:
    """Flow control of one streamed call: credit from the consumer, and cancellation.

    The producer may run ``window`` items ahead of the consumer's acknowledgements, so a slow
    consumer makes the producer wait instead of making the broker buffer without bound.
    """

    def __init__(self, emit: Callable[[str, list[Any]], None], window: int, stall_timeout: float, limit: int) -> None:
        self._emit = emit
        self.limit = limit  # the message size limit (DSPEX_MAX_MESSAGE): a progress event over it is refused
        self._cond = threading.Condition()
        self.credit = window
        self.cancelled = False
        self.gone = False  # the consumer stopped acknowledging: nothing more is sent
        self._stopping_output = window  # output events sent without credit once cancelled
        self.stall_timeout = stall_timeout
        self._awaiting_credit = False  # the producer waits to send an item
        self._on_credit: Callable[[], None] | None = None  # an offer found no credit: told when some comes
        # an async producer awaits credit (credit_ready): woken on its loop when some comes, or a cancel
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        # sends the call's waiting output before an item or a progress event (it was written first)
        self.before_item: Callable[[], None] | None = None

    def add_credit(self, n: int) -> None:
        with self._cond:
            self.credit += n
            self._cond.notify_all()
            if self._waiter is not None:
                self._wake()
            told, self._on_credit = self._on_credit, None
        if told is not None:
            told()

    def cancel(self) -> bool:
        """Stop the stream. True when the producer must also be interrupted: this is the first
        cancel and the producer is computing (one waiting for credit stops by itself, and an
        interruption must not cut short the ``finally`` blocks it then runs)."""
        with self._cond:
            first = not self.cancelled
            self.cancelled = True
            self._cond.notify_all()
            if self._waiter is not None:
                self._wake()
            return first and not self._awaiting_credit

    def _wake(self) -> None:
        """(Holding ``_cond``.) The async producer that awaits credit goes on."""
        assert self._waiter is not None
        loop, ready = self._waiter
        self._waiter = None
        with contextlib.suppress(RuntimeError):  # its loop is closed: nothing awaits there any more
            loop.call_soon_threadsafe(_set_ready, ready)

    async def credit_ready(self) -> None:
        """Wait until an item may be sent at once (credit, or the stream is cancelled) without
        blocking the loop: the session's other calls' tasks run meanwhile, as they run while an
        in-process async generator waits at its ``yield``. A consumer silent for ``stall_timeout``
        is taken as gone, as in :meth:`send`."""
        with self._cond:
            if self.cancelled or self.credit > 0:
                return
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            self._waiter = (loop, ready)
            self._awaiting_credit = True  # a cancel wakes it: no interruption needed
        try:
            await asyncio.wait_for(ready, self.stall_timeout)
        except TimeoutError:
            with self._cond:
                if not (self.cancelled or self.credit > 0):  # (came as it timed out)
                    self._consumer_gone()
        finally:
            with self._cond:
                self._awaiting_credit = False
                self._waiter = None

    def _consumer_gone(self) -> None:
        """(Holding ``_cond``.) It acknowledged nothing for ``stall_timeout``: stop the stream."""
        log.warning("stream consumer silent for %.0fs; cancelling the stream", self.stall_timeout)
        self.cancelled = self.gone = True

    def send(self, kind: str, frames: list[Any]) -> bool:
        """Send one item, progress or output event; False once the consumer cancelled or went away.

        A consumer that acknowledges nothing for ``stall_timeout`` (the stream's per-item timeout,
        the time it waits for an item itself) is taken as gone: the stream is cancelled."""
        if kind != _OUTPUT and self.before_item is not None:
            self.before_item()
        with self._cond:
            self._awaiting_credit = kind == Status.PARTIAL.value
            try:
                if not self._cond.wait_for(lambda: self.cancelled or self.credit > 0, self.stall_timeout):
                    self._consumer_gone()
            finally:
                self._awaiting_credit = False
            if self.cancelled:
                # what the producer prints while it stops (its finally blocks) goes without credit,
                # up to one window: a consumer that closed the stream waits for its end and shows it
                if kind != _OUTPUT or self.gone or self._stopping_output <= 0:
                    return False
                self._stopping_output -= 1
            else:
                self.credit -= 1
        with limits.protected():  # a soft time limit must never cut a multipart reply in two
            self._emit(kind, frames)
        return True

    def offer(self, kind: str, frames: list[Any], on_credit: Callable[[], None]) -> bool:
        """Send only if credit allows it now (never wait: the thread that reads the credit may be
        the one sending); False if not sent, and ``on_credit`` runs when credit comes. A cancelled
        stream sends up to a window without credit (what its producer prints while it stops), and
        once its consumer went away takes nothing more: True."""
        with self._cond:
            if self.cancelled:
                if self.gone or self._stopping_output <= 0:
                    return True
                self._stopping_output -= 1
            elif self.credit <= 0:
                self._on_credit = on_credit
                return False
            else:
                self.credit -= 1
        with limits.protected():
            self._emit(kind, frames)
        return True


class LazyStream:
    """The events of a call whose caller takes its output (``FLAG_OUTPUT``): the StreamControl is
    opened at the first event, so a call that prints and logs nothing costs nothing here."""

    __slots__ = ("_open", "control")

    def __init__(self, open_control: Callable[[], StreamControl]) -> None:
        self._open = open_control
        self.control: StreamControl | None = None

    def send(self, kind: str, frames: list[Any]) -> bool:
        return self._control().send(kind, frames)

    def offer(self, kind: str, frames: list[Any], on_credit: Callable[[], None]) -> bool:
        return self._control().offer(kind, frames, on_credit)

    def _control(self) -> StreamControl:
        control = self.control
        if control is None:
            with _OPENING:  # a thread the call started may print at the same moment
                if self.control is None:
                    self.control = self._open()
            control = self.control
            assert control is not None
        return control


_OPENING = threading.Lock()


class _ProgressLogHandler(logging.Handler):
    """Forwards dspy/gepa log records of one call's thread as progress events."""

    def __init__(self, stream: StreamControl) -> None:
        super().__init__(logging.INFO)
        self.stream = stream
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread or not record.name.startswith(("dspy", "gepa")):
            return
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a log record whose arguments do not format is not forwarded
            return
        self.stream.send(Status.PROGRESS.value, codec.encode({"log": record.name, "message": message[:2000]}))


@contextlib.contextmanager
def progress_scope(stream: StreamControl, to_ref: Callable[[Any], Ref]) -> Iterator[None]:
    def report(data: Any) -> None:
        frames = codec.encode(data, to_ref=to_ref)
        within_limit(frames, "a progress event", stream.limit)
        stream.send(Status.PROGRESS.value, frames)

    handler = _ProgressLogHandler(stream)
    # dspy's logger does not propagate to the root: listen on it directly
    loggers = [logging.getLogger()] + [
        lg for lg in (logging.getLogger("dspy"), logging.getLogger("gepa")) if not lg.propagate]
    for lg in loggers:
        lg.addHandler(handler)
    token = progress.current_reporter.set(report)
    try:
        yield
    finally:
        progress.current_reporter.reset(token)
        for lg in loggers:
            lg.removeHandler(handler)


_PLAIN = frozenset({type(None), bool, int, float, str, bytes, list, dict, tuple})


def resolve_awaitable(result: Any, loop: SessionLoop) -> Any:
    """``await`` an awaitable result on its session's ``loop`` (repeatedly: a coroutine may return
    another one)."""
    if type(result) in _PLAIN:  # the usual result: no isinstance against the Awaitable ABC
        return result
    while inspect.isawaitable(result):
        async def wait(aw: Any = result) -> Any:
            claim_configure()
            return await aw

        result = loop.run(wait())
    return result


def drain(result: Any, stream: StreamControl, encode: Encode, loop: SessionLoop) -> dict[str, Any]:
    """Send the items of ``result`` as partial replies; ``{"items": n, "value": v}`` at the end,
    ``v`` a generator's ``return`` value (its ``StopIteration.value``; None for an async one,
    driven on its session's ``loop``).

    A consumer that cancels stops the producer (its ``finally`` blocks run now).
    """
    if hasattr(result, "__aiter__"):
        summary: dict[str, Any] = loop.run(_drain_async(result, stream, encode))
        return summary
    count = 0
    iterator = iter(result)
    try:
        while True:
            try:
                item = next(iterator)
            except StopIteration as stop:
                return {"items": count, "value": stop.value}
            _send_item(stream, encode(item), count)
            count += 1
    finally:
        close = getattr(iterator, "close", None)
        if callable(close):
            _closing(stream, close)  # runs a generator's finally blocks now, not at garbage collection


async def _drain_async(result: Any, stream: StreamControl, encode: Encode) -> dict[str, Any]:
    claim_configure()
    count = 0
    iterator = result.__aiter__()
    try:
        async for item in iterator:
            frames = encode(item)  # (first, as the sync drain: encoding starts the item's deadline)
            await stream.credit_ready()  # the loop runs the session's other calls' tasks meanwhile
            _send_item(stream, frames, count)
            count += 1
    finally:
        aclose = getattr(iterator, "aclose", None)
        if callable(aclose):
            await _closing_async(stream, aclose)
    return {"items": count, "value": None}


def _closing(stream: StreamControl, close: Callable[[], Any]) -> None:
    """``close()`` the producer. Once its consumer closed the stream, what that raises (a generator
    that yields again in its ``finally``: ``RuntimeError: generator ignored GeneratorExit``) is
    what the consumer's ``close()`` raises, as ``gen.close()`` raises it in-process: a
    ``RemoteError`` with ``details["closing"]``, in place of the cancel or interruption the worker
    stopped the producer with (which is its context here, not the user's)."""
    if not stream.cancelled:
        close()
        return
    try:
        close()
    except (DspexError, limits.CallTimedOut):
        raise
    except BaseException as exc:  # noqa: BLE001 - the user's finally blocks may raise anything
        raise _closing_error(exc) from None


async def _closing_async(stream: StreamControl, aclose: Callable[[], Any]) -> None:
    """:func:`_closing` of an async producer (``aclose()``)."""
    if not stream.cancelled:
        await aclose()
        return
    try:
        await aclose()
    except (DspexError, limits.CallTimedOut, asyncio.CancelledError):
        raise
    except BaseException as exc:  # noqa: BLE001 - the user's finally blocks may raise anything
        raise _closing_error(exc) from None


def _closing_error(exc: BaseException) -> DspexError:
    if isinstance(exc.__context__, (Cancelled, limits.CallTimedOut, asyncio.CancelledError)):
        exc.__context__ = None  # how the worker stopped the producer: not part of the user's error
    error = remote_error(exc)
    error.details["closing"] = True
    return error


def _send_item(stream: StreamControl, frames: list[Any], count: int) -> None:
    # (what encoding a user's item raises is the call's error: the executor runs the drain guarded)
    if not stream.send(Status.PARTIAL.value, frames):
        raise Cancelled(f"stream cancelled by its consumer after {count} items", items=count)


def _set_ready(ready: asyncio.Future[None]) -> None:
    if not ready.done():  # (cancelled: its waiter was interrupted, or timed out)
        ready.set_result(None)


def within_limit(frames: list[Any], what: str, limit: int) -> None:
    """Raise :class:`ResultTooLarge` when ``what`` (a result, a streamed item, a progress event) is
    over the message size limit (sent, the broker would cut the worker's connection at it): in the
    call, so the refs it made for it are dropped (the caller never gets them)."""
    size = len(frames[0]) if len(frames) == 1 and type(frames[0]) is bytes else \
        sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames)
    if size > limit:
        raise ResultTooLarge(
            f"{what} is {size} bytes, over the limit of {limit} bytes (DSPEX_MAX_MESSAGE): the call ran, and this "
            "was not sent. Return less: keep large data on the worker and return a ref to it (an object of your own "
            "class comes back as one) or the part the client needs; or raise DSPEX_MAX_MESSAGE for the workers, the "
            "broker and the clients alike", size=size, limit=limit)
