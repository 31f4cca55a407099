"""Call deadlines enforced on the worker: a soft limit that stops the call, a hard limit after it.

Soft limit (as Celery's): at the deadline :class:`CallTimedOut` is raised into the running call.
It derives from ``BaseException`` so user code's ``except Exception`` does not swallow it.

- A call on the main thread (capacity-1 workers) gets it from a signal handler: the watchdog
  sends SIGINT to the main thread, which interrupts ``time.sleep`` and blocking socket reads
  (PEP 475: a handler that raises ends the retried system call). SIGINT, not SIGALRM, because
  it is how Python code is interrupted in-process (Ctrl-C) and code that runs threads listens
  for it: DSPy's ``ParallelExecutor`` (``Evaluate``, ``Parallel``, ``batch``) chains its own
  SIGINT handler while it runs and cancels its queued jobs. A SIGINT that is not a soft limit
  (an operator's Ctrl-C) goes to the handler the worker had installed (stop the worker). A
  SIGINT that lands after the thread's last look at its signals and before it enters a blocking
  system call (a long ``time.sleep``, a socket read: the GIL is handed over right there, often to
  the thread sending the signal) is taken only when that call returns; until its handler has run,
  the watchdog nudges the thread with SIGURG, whose handler does nothing: the blocked call returns
  (EINTR), and the pending SIGINT handler runs.
- A call on a pool thread (capacity > 1) gets it through ``PyThreadState_SetAsyncExc``: raised at
  the next bytecode the thread runs (a thread blocked in C sees it when the C call returns).
  There is no SIGINT for DSPy's ``ParallelExecutor`` to hear, so the watchdog sets the
  ``cancel_jobs`` event of any executor the call's thread is running (found on its stack), which
  is what its SIGINT handler would do.

Hard limit: a call still running ``grace`` seconds after its deadline cannot be stopped; the
watchdog calls ``on_hard`` (the worker replies ``Timeout(hard=True)``, says goodbye to the
broker and exits; supervisord starts a fresh process).

User code cannot take SIGINT (nor SIGTERM) from the worker: ``signal.signal`` in a call sets the
call's handler, which runs before the worker's (worker.stopsignals).

Worker code that must not be interrupted half-way (sending a multipart reply) runs inside
:func:`protected`; a soft limit arriving there is raised when it ends.

An awaitable result runs as a task on its session's event loop (worker.session_loop), which
whichever thread runs one of the session's calls may be running. Its interruption is the call's
``task.cancel()``, sent to that loop with ``call_soon_threadsafe``: its coroutine gets
``CancelledError`` at its ``await`` and its ``finally`` blocks run (and may await), as with an
in-process ``task.cancel()``; the session loop turns the cancelled task into the call's
interruption. Raised into a thread instead, it could land in asyncio's own code, which catches
``BaseException`` in places (a transport's socket write: "Fatal write error", a closed
connection, and the call ran on), or in another call's task on the same loop. A loop that does
not take the cancel within ``_TASK_CANCEL_WAIT`` (synchronous code blocks it) gets the
interruption raised as above into the thread that runs the loop, once that thread runs the call's
own code (``SessionLoop.runner``; until then the watchdog looks again every ``_TASK_CANCEL_WAIT``).

Cancellation (the caller gave up: ``B_CANCEL``) stops a running call the same way, at once:
:meth:`Watchdog.cancel` raises :class:`CallCancelled` (a ``CallTimedOut``, so code that handles
the interruption of a call handles both). An interruption Python itself ignores (raised while a
weakref callback, a ``__del__`` or a finalizer ran on the call's thread: "Exception ignored in")
reaches the worker's ``sys.unraisablehook``, and the watchdog raises it again once that has
returned. A cancel is not escalated: a call that swallows it runs
on until its own deadline, where the limits above act. Once the call's code has returned
(:func:`settle`) a cancel changes nothing: the result goes out.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import math
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker import stopsignals

log = logging.getLogger("dspex.worker")

DEFAULT_GRACE = 5.0
# the longest the watchdog sleeps: a new call wakes it only if its deadline comes sooner
_REVIEW = 1.0
_NUDGE = signal.SIGURG  # ignored by default: a nudge after its handler was replaced changes nothing
_NUDGE_EVERY = 0.05  # seconds between nudges while a SIGINT's handler has not run
# seconds a coroutine's loop has to take its task's cancel before the interruption is raised in
# the call's code that the loop's thread runs (the coroutine blocks its loop in synchronous code)
_TASK_CANCEL_WAIT = 0.25


class CallTimedOut(BaseException):
    """Raised into a call that ran past its deadline (the soft limit)."""


class CallCancelled(CallTimedOut):
    """Raised into a call its caller cancelled (a ``CallTimedOut``: the same interruption, another cause)."""


@dataclass
class _Call:
    deadline: float
    thread: int
    on_hard: Callable[[], None]
    token: int
    watchdog: Watchdog
    thread_state: _ThreadState
    soft_sent: bool = False
    done: bool = False
    timed_out: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancelled: bool = False  # its caller cancelled it (B_CANCEL)
    session_closed: bool = False  # ... because its session closed
    settled: bool = False  # its code has returned: a cancel changes nothing now
    loop: CallLoop | None = None  # the session loop its coroutine runs on
    task: asyncio.Task[Any] | None = None  # ... and its task there
    task_cancel_due: float = math.inf  # its task's cancel was sent to its loop: raise if not taken by then
    signalled: bool = False  # a SIGINT was sent to its (main) thread and its handler has not run yet
    resend: bool = False  # its interruption was raised where Python ignores it: the watchdog sends it again
    nudge_at: float = 0.0  # when the watchdog nudges the thread next, while ``signalled``

    def interruption(self) -> CallTimedOut:
        if self.session_closed:
            return CallCancelled("the call's session was closed")
        if self.cancelled:
            return CallCancelled("the call was cancelled by its caller")
        return CallTimedOut("the call ran past its deadline")

    def extend(self, seconds: float) -> None:
        """Move the deadline to ``seconds`` from now (a stream's timeout is per item)."""
        if not self.soft_sent:
            with self.watchdog._cond:
                self.deadline = time.monotonic() + seconds  # later: the watchdog finds it not due yet when it wakes
                if self.deadline < self.watchdog._wake_at:
                    self.watchdog._cond.notify()


class CallLoop(Protocol):
    """What the watchdog asks of the loop a call's coroutine runs on (worker.session_loop.SessionLoop,
    which imports this module)."""

    def cancel(self, call: _Call) -> bool: ...

    def runner(self, call: _Call) -> tuple[int, _ThreadState] | None: ...


@dataclass
class _ThreadState:
    active: _Call | None = None
    protected: int = 0
    pending: _Call | None = None  # the call whose interruption arrived while protected (perhaps
    # not the thread's own: the thread may run another call's task on their session's loop)


_local = threading.local()


def _state() -> _ThreadState:
    st: _ThreadState | None = getattr(_local, "st", None)
    if st is None:
        st = _local.st = _ThreadState()
    return st


class protected:
    """Defer a soft limit until the block ends (never split a zmq multipart send). A class, not
    a generator context manager: it is entered on every call, and a class is cheaper to enter."""

    __slots__ = ("_st",)

    def __enter__(self) -> None:
        st = self._st = _state()
        st.protected += 1

    def __exit__(self, *exc: object) -> None:
        st = self._st
        st.protected -= 1
        call = st.pending
        if st.protected == 0 and call is not None:
            st.pending = None
            if not call.done:
                call.timed_out = True
                raise call.interruption()


# one token per soft-limit or cancel SIGINT sent and not handled yet. Two threads send them (the
# watchdog, the I/O thread's cancels) and the handler may run inside itself: append and pop are
# atomic, where a counter's read-modify-write could lose an update, and a limit signal taken for
# an operator's Ctrl-C stops the worker
_limit_signals: deque[int] = deque()


def _on_sigint(signum: int, frame: Any) -> None:
    try:
        _limit_signals.pop()
    except IndexError:
        stopsignals.sigint_before(signum, frame)  # a real SIGINT: the worker's own handler
        return
    st = _state()  # always the main thread: Python runs signal handlers there
    call = st.active
    if call is not None:
        call.signalled = False
    if call is None or call.done or call.settled or not (call.soft_sent or call.cancelled):
        return  # a stale signal: the call it was meant for has ended (or has returned its result)
    if st.protected:
        st.pending = call
        return
    call.timed_out = True
    raise call.interruption()


def _on_nudge(signum: int, frame: Any) -> None:
    """Nothing: the nudge only makes a blocked system call return, so that a pending SIGINT's
    handler runs."""


def settle(call: _Call | None) -> None:
    """The call's code has returned and its result is encoded: an interruption from now on (a
    cancel, the soft limit) changes nothing. One already on its way is raised here, in the call's
    body, never in the cleanup (settings, output capture) that follows."""
    if call is None:
        return
    with call.lock:
        call.settled = True
        interrupted = call.cancelled or call.timed_out
    if interrupted:
        if call.thread != threading.main_thread().ident:
            # not delivered yet: it must not surface later in the worker's own code
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(call.thread), None)
        call.timed_out = True
        raise call.interruption()


class Watchdog:
    """One thread per worker: sends the soft limit at each call's deadline, the hard one after.

    It keeps the running calls (at most the worker's capacity) and sleeps until the earliest
    next limit among them, at most ``_REVIEW`` while calls keep starting. A new call wakes it
    only when its deadline is earlier than that, so the usual call (a deadline further away, a
    fast call that ends before a woken watchdog would even run) costs no thread switch and GIL
    hand-off; and an idle worker's watchdog (or one whose last call runs long) sleeps until the
    next deadline, if any.
    """

    def __init__(self, grace: float = DEFAULT_GRACE) -> None:
        self.grace = grace
        self._lock = threading.Lock()  # taken directly on the per-call path (Condition's own
        self._cond = threading.Condition(self._lock)  # __enter__ is one more Python call)
        self._calls: dict[int, _Call] = {}
        self._wake_at = math.inf
        self._ids = itertools.count()
        self._last_token = -1  # the token of the call that started last
        self._thread: threading.Thread | None = None
        self._main = threading.main_thread().ident
        self._signal_installed = False
        self._previous_unraisablehook: Callable[[Any], Any] = sys.unraisablehook

    def _start(self) -> None:
        if self._thread is None:
            if threading.current_thread() is threading.main_thread():
                stopsignals.keep(_on_sigint)
                signal.signal(_NUDGE, _on_nudge)
                self._previous_unraisablehook = sys.unraisablehook
                sys.unraisablehook = self._on_unraisable
                self._signal_installed = True
            self._thread = threading.Thread(target=self._loop, name="dspex-watchdog", daemon=True)
            self._thread.start()

    def _on_unraisable(self, unraisable: Any) -> None:
        """A call's interruption Python ignored (the module's doc): the watchdog sends it again."""
        call = _state().active
        if isinstance(unraisable.exc_value, CallTimedOut) and call is not None and not (call.done or call.settled):
            with self._cond:
                call.resend = True
                self._cond.notify()
            return
        self._previous_unraisablehook(unraisable)

    def install(self) -> None:
        """From the main thread, before any call: the SIGINT handler and the watchdog thread."""
        with self._cond:
            self._start()

    def _next(self, call: _Call) -> float:
        return call.deadline + self.grace if call.soft_sent else call.deadline

    def _loop(self) -> None:
        seen = -1  # the last call started when it last looked
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    due = [c for c in self._calls.values() if not c.done and self._next(c) <= now]
                    nudge = [c for c in self._calls.values() if c.signalled and not c.done and c.nudge_at <= now]
                    resend = [c for c in self._calls.values() if c.resend and not c.done]
                    stuck = [c for c in self._calls.values() if c.task_cancel_due <= now and not c.done]
                    if due or nudge or resend or stuck:
                        break
                    self._wake_at = min(min((self._next(c) for c in self._calls.values()), default=math.inf),
                                        min((c.nudge_at for c in self._calls.values() if c.signalled),
                                            default=math.inf),
                                        min((c.task_cancel_due for c in self._calls.values()), default=math.inf))
                    if self._last_token != seen:  # calls come: at most _REVIEW (the class doc says why)
                        self._wake_at = min(self._wake_at, now + _REVIEW)
                    seen = self._last_token
                    self._cond.wait(None if self._wake_at == math.inf else self._wake_at - now)
                for c in due:
                    if c.soft_sent:
                        self._calls.pop(c.token, None)  # the hard limit acts once
                for c in nudge:
                    c.nudge_at = now + _NUDGE_EVERY
                for c in resend:
                    c.resend = False
                for c in stuck:
                    c.task_cancel_due = math.inf
            for call in nudge:
                try:
                    signal.pthread_kill(call.thread, _NUDGE)
                except (ProcessLookupError, OSError):
                    pass
            for call in resend:
                self._soft(call)
            for call in stuck:
                self._raise(call)
            for call in due:
                if not call.soft_sent:
                    call.soft_sent = True
                    self._soft(call)
                else:
                    log.error("a call ignored its soft time limit for %.1fs: hard limit", self.grace)
                    try:
                        call.on_hard()
                    except Exception:  # the watchdog must survive
                        log.exception("hard time limit handler failed")

    def cancel(self, call: _Call, session_closed: bool = False) -> bool:
        """Stop a running call its caller cancelled (or whose session closed), as the soft limit
        does; False if it has ended, returned its result, or was cancelled already."""
        with call.lock:
            if call.done or call.settled or call.cancelled:
                return False
            call.cancelled = True
            call.session_closed = session_closed
        if call.thread == self._main and not self._signal_installed:
            return True  # no raising SIGINT handler here (an executor outside a worker): the flag only
        self._soft(call)
        if call.signalled:
            with self._cond:
                self._cond.notify()  # it nudges the thread until the SIGINT is taken
        return True

    def _soft(self, call: _Call) -> None:
        if not self._cancel_task(call):
            self._raise(call)

    def _cancel_task(self, call: _Call) -> bool:
        """The call's coroutine interrupted by its loop's ``task.cancel()`` (the module's doc says why),
        True if sent; a loop that does not take it in ``_TASK_CANCEL_WAIT`` gets :meth:`_raise`."""
        with call.lock:
            loop = call.loop
            if loop is None or call.done or call.settled:
                return False
            call.task_cancel_due = time.monotonic() + _TASK_CANCEL_WAIT
        if not loop.cancel(call):  # its loop closed meanwhile: the coroutine has ended
            call.task_cancel_due = math.inf
            return False
        with self._cond:
            self._cond.notify()  # its wait for the loop to take it
        return True

    def _raise(self, call: _Call) -> None:
        """Raise the call's interruption in whatever its thread runs; a coroutine's, in the thread
        that runs its session's loop while it runs the call's code there (the module's doc)."""
        thread, st = call.thread, call.thread_state
        loop = call.loop
        if loop is not None:
            runner = loop.runner(call)
            if runner is None:
                with call.lock:
                    still = call.loop is loop
                    if still and not (call.done or call.settled or call.timed_out):
                        call.task_cancel_due = time.monotonic() + _TASK_CANCEL_WAIT
                if still:  # the loop runs another call's code: look again soon
                    with self._cond:
                        self._cond.notify()
                    return
                # its coroutine ended meanwhile: its own thread runs the call
            else:
                thread, st = runner
        if thread == self._main:
            call.nudge_at = time.monotonic() + _NUDGE_EVERY
            call.signalled = True
            _limit_signals.append(1)
            try:
                signal.pthread_kill(thread, signal.SIGINT)
            except (ProcessLookupError, OSError):
                call.signalled = False
                _limit_signals.pop()
        else:
            with call.lock:
                if call.done or call.settled:
                    return
                if st.protected:
                    st.pending = call  # raised when the protected block ends
                    return
                call.timed_out = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(thread), ctypes.py_object(CallCancelled if call.cancelled else CallTimedOut))
            try:
                stopsignals.cancel_parallel_jobs(thread)
            except Exception:  # best effort: the soft limit itself is on its way
                log.exception("could not cancel the call's parallel jobs")


class Limit:
    """Run the block of one call under ``deadline`` (``time.monotonic()`` scale; None: no limit,
    but the call can still be cancelled); ``with`` gives the block its :class:`_Call`. A class,
    not a generator context manager: per call it saves the generator and contextlib's wrapper."""

    __slots__ = ("call", "deadline", "on_hard", "outer", "st", "watchdog")

    def __init__(self, watchdog: Watchdog, deadline: float | None, on_hard: Callable[[], None]) -> None:
        self.watchdog = watchdog
        self.deadline = math.inf if deadline is None else deadline
        self.on_hard = on_hard

    def __enter__(self) -> _Call:
        wd = self.watchdog
        deadline = self.deadline
        st = self.st = _state()
        call = self.call = _Call(deadline, threading.get_ident(), self.on_hard, next(wd._ids), wd, st)
        if call.thread == wd._main and not wd._signal_installed:
            # no raising handler on this main thread: only the hard limit applies
            call.soft_sent = True
        self.outer = st.active
        st.active = call
        with wd._lock:
            wd._start()
            wd._calls[call.token] = call
            wd._last_token = call.token
            if deadline < wd._wake_at:
                wd._cond.notify()
        return call

    def __exit__(self, *exc: object) -> None:
        wd, call, st = self.watchdog, self.call, self.st
        with call.lock:
            call.done = True
            if call.timed_out and call.thread != wd._main:
                # an async exception not yet delivered must not hit the worker's own code
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(call.thread), None)
        with wd._lock:
            wd._calls.pop(call.token, None)
        st.active = self.outer
        st.pending = None
        if stopsignals.call_handlers and self.outer is None and call.thread == wd._main:
            stopsignals.call_handlers.clear()  # the stop signals' handlers the call set end with it
