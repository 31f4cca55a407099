"""A session's event loop: all the awaitable calls of a session run on one asyncio loop, on a
worker of any capacity, as a program runs all its async code on its one loop.

An awaitable result (worker.streaming: an ``acall``, an ``async def``, an async generator that
streams) runs as a task on its session's :class:`SessionLoop`, made at the session's first
awaitable and closed when the session is released (closed, expired, a sessionless call's end).
No thread runs it between calls. What a session keeps bound to a loop (an ``httpx.AsyncClient``
and its pooled connections, an ``asyncio.Queue``/``Event``/``Lock`` a later call waits on, a
future, an async generator its code steps, DSPy's async LM clients) works in its later calls and
in its calls that run at the same time on other pool threads.

Who runs the loop (a baton): the thread of a call that finds the loop idle runs it until that
call's task ends. A call of the session that comes while it runs (a capacity-N worker runs a
``hint`` session's calls side by side) schedules its task on the loop thread-safely, in its own
context (its session, DSPy settings, output capture, context variables), and its thread waits.
When the running thread's own task ends while other calls' tasks are pending, it hands the loop
to one of their threads and goes on to send its reply: no reply waits for another call's end, and
no task is left without a thread to run it. A capacity-1 worker's one thread always runs it.

Why not another way: a loop per pool thread (what came before) broke every such object on a
capacity-N pool, whose calls of one session run on any of its threads; one loop thread per worker
would let a session's blocking code (``time.sleep`` in an ``async def``) stall every other
session's async calls; a loop thread per session costs a thread per idle session and a thread
hop per call. Here a session's blocking code stalls only its own other calls' tasks, as it stalls
a program's loop in-process.

A call's tasks: the tasks it starts on the loop (directly or through its tasks, and threads it
starts: a task factory counts each task for the call whose context creates it) that still run
when its coroutine ends are cancelled and awaited then, as ``asyncio.run`` cancels a program's
at its end; other calls' tasks are not touched.

Interrupting a call (worker.limits) cancels its task (:meth:`SessionLoop.cancel`); a loop that
does not take the cancel (synchronous code blocks it) gets the interruption raised in the thread
that runs it only while that thread runs the call's own code (:meth:`SessionLoop.runner`), never
into another call's task that shares the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import functools
import math
import threading
from collections.abc import Coroutine
from typing import Any

from worker import limits

# the tasks of the call whose code runs (its _Turn's), for the loop's task factory
_call_tasks: contextvars.ContextVar[set[asyncio.Task[Any]] | None] = contextvars.ContextVar(
    "dspex_call_tasks", default=None)


class _Turn:
    """One call's coroutine on its session's loop."""

    __slots__ = ("call", "coro", "finished", "task", "tasks", "wake")

    def __init__(self, call: limits._Call, coro: Coroutine[Any, Any, Any]) -> None:
        self.call = call
        self.coro = coro
        self.task: asyncio.Task[Any] | None = None
        self.tasks: set[asyncio.Task[Any]] = set()  # those it started on the loop and are not done
        self.finished = False  # its task is done
        self.wake: threading.Event | None = None  # (a waiting turn's) its task ended, or the loop is its to run


class SessionLoop:
    """One session's event loop and the thread that runs it now (the module's doc)."""

    __slots__ = ("_closed", "_driver", "_lock", "_loop", "_waiting")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._driver: _Turn | None = None  # the turn whose thread runs the loop
        self._waiting: list[_Turn] = []  # turns with a task on the loop whose thread waits
        self._closed = False  # the session was released: the loop closes when no thread runs it

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` to its end as a task of the current call on the session's loop."""
        call = limits._state().active
        assert call is not None, "an awaitable result runs within a call"
        turn = _Turn(call, coro)
        loop = None
        try:
            with limits.protected():  # (an interruption inside would leave the baton nowhere)
                loop = self._enter(turn)
            if turn.wake is not None:
                turn.wake.wait()
            while not turn.finished:  # the loop is this thread's to run
                try:
                    loop.run_forever()
                except Exception:
                    raise
                except BaseException:  # noqa: BLE001 - see below
                    # a task's SystemExit or KeyboardInterrupt (kept as its result too, which its
                    # call raises), or an interruption that landed in asyncio's own code once the
                    # call's code had returned (that call's task cancel is queued): the loop goes on
                    pass
        finally:
            if loop is not None:
                self._hand_over(loop, turn)
        assert turn.task is not None
        try:
            return turn.task.result()
        except asyncio.CancelledError:
            if call.timed_out:  # the call's interruption (_take_cancel), not the coroutine's own cancel
                raise call.interruption() from None
            raise

    def _enter(self, turn: _Turn) -> asyncio.AbstractEventLoop:
        """Put ``turn``'s task on the loop: this thread runs it, or waits (``turn.wake``)."""
        with self._lock:
            loop = self._loop
            if loop is None or loop.is_closed():  # (user code may close it between calls)
                loop = self._loop = asyncio.new_event_loop()
                loop.set_task_factory(_new_task)
            with turn.call.lock:
                turn.call.loop = self
            if self._driver is None:
                self._driver = turn
                self._start(turn)  # no thread runs the loop: this one may touch it
            else:
                turn.wake = threading.Event()
                self._waiting.append(turn)
                loop.call_soon_threadsafe(self._start, turn)  # in this thread's context: the call's
        return loop

    def _hand_over(self, loop: asyncio.AbstractEventLoop, turn: _Turn) -> None:
        """``turn``'s thread is done with the loop: to a waiting turn whose task is pending, if any."""
        with limits.protected(), self._lock:
            if not turn.finished:  # its thread leaves on an error: its task must not run on without it
                with contextlib.suppress(RuntimeError):  # (closed: nothing runs on it)
                    loop.call_soon_threadsafe(_abandon, turn)
            if self._driver is not turn:
                self._waiting.remove(turn)
                return
            heir = next((t for t in self._waiting if not t.finished), None)
            self._driver = heir
            if heir is not None:
                self._waiting.remove(heir)
                assert heir.wake is not None
                heir.wake.set()
            elif self._closed:
                loop.close()
                self._loop = None

    def _start(self, turn: _Turn) -> None:
        """Create ``turn``'s task (on the loop's thread, or while no thread runs it)."""
        assert self._loop is not None
        task = self._loop.create_task(_main(turn))
        turn.task = task
        with turn.call.lock:
            turn.call.task = task
        task.add_done_callback(functools.partial(self._ended, turn))

    def _ended(self, turn: _Turn, task: asyncio.Task[Any]) -> None:
        with self._lock:
            turn.finished = True
            if self._driver is turn:
                assert self._loop is not None
                self._loop.stop()
                return
        if turn.wake is not None:
            turn.wake.set()

    def cancel(self, call: limits._Call) -> bool:
        """Send ``call``'s interruption to its task as ``task.cancel()`` (taken when the loop next
        runs a callback); False if the loop is gone."""
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(_take_cancel, call)
        except RuntimeError:  # closed meanwhile: the call's coroutine has ended
            return False
        return True

    def runner(self, call: limits._Call) -> tuple[int, limits._ThreadState] | None:
        """The thread that runs the loop (and its state) while it runs ``call``'s own code, which
        an interruption may be raised into; None while it runs another call's task (or no thread
        runs it). With no other call's task pending, all the loop runs is the call's."""
        with self._lock:
            driver, loop = self._driver, self._loop
            if driver is None or loop is None:
                return None
            turn = driver if driver.call is call else next((t for t in self._waiting if t.call is call), None)
            if turn is None:
                return None
            if turn is not driver or any(not t.finished for t in self._waiting):
                current = asyncio.current_task(loop)
                if current is None or not (current is turn.task or current in turn.tasks):
                    return None
            return driver.call.thread, driver.call.thread_state

    def close(self) -> None:
        """The session was released: close the loop now, or when its running thread is done."""
        with self._lock:
            self._closed = True
            if self._driver is None and self._loop is not None:
                self._loop.close()
                self._loop = None


async def _main(turn: _Turn) -> Any:
    """The call's task: its coroutine, then the tasks it left running cancelled."""
    _call_tasks.set(turn.tasks)
    call = turn.call
    try:
        return await turn.coro
    finally:
        try:
            left = [t for t in turn.tasks if not t.done()]
            for task in left:
                task.cancel()
            if left:
                await asyncio.gather(*left, return_exceptions=True)
        finally:
            with call.lock:
                call.loop = call.task = None
            here = threading.get_ident()
            if call.timed_out and here != call.thread:
                # its interruption may have been raised into this thread, which runs other calls' tasks next
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(here), None)


def _new_task(loop: asyncio.AbstractEventLoop, coro: Any, **options: Any) -> asyncio.Task[Any]:
    """The loop's task factory: a task counted for the call whose context creates it."""
    task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, **options)
    context = options.get("context")
    tasks = _call_tasks.get() if context is None else context.get(_call_tasks)
    if tasks is not None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return task


def _abandon(turn: _Turn) -> None:
    if turn.task is not None:
        turn.task.cancel()


def _take_cancel(call: limits._Call) -> None:
    """On the loop: the call's interruption, as its task's ``cancel()`` (SessionLoop.cancel)."""
    with call.lock:
        call.task_cancel_due = math.inf
        task = call.task
        if task is None or call.done or call.settled:
            return
        call.timed_out = True
    task.cancel()
