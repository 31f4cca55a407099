"""Threads a call starts carry the call.

A capacity-N worker runs calls of several sessions at once, and a capacity-1 worker runs other
sessions' calls while a thread one call left running goes on, so a thread can only know its call
through its context, which Python threads do not inherit. Here a
``threading.Thread`` started during a call, and each task a call submits to a
``concurrent.futures.ThreadPoolExecutor`` (``loop.run_in_executor`` too; DSPy's ``Parallel``,
``Evaluate`` and ``batch`` run their jobs that way), run in a copy of the context that started
them with the call's own variables: the call's session (its ``dspy.inspect_history``, its
``dspy.configure``), its output, and then what ``enter`` makes of them (DSPy's settings as
configured, worker.dspy_settings); the user's and libraries' context variables are not carried,
as a new thread does not inherit them in-process. An
executor task is carried per task, not per thread, so an executor of an installed library shared
by sessions runs each session's tasks as that session's. Outside calls nothing changes.
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

# Called where a thread or task is started: None outside a call, else what the thread or task does
# first, inside its copy of the call's context.
Entry = Callable[[], Callable[[], None] | None]

_entry: Entry | None = None


def _carried(fn: Callable[..., Any]) -> Callable[..., Any] | None:
    entry = _entry
    enter = entry() if entry is not None else None
    if enter is None:
        return None
    return functools.partial(_thread_context().run, _run, enter, fn)


def _thread_context() -> contextvars.Context:
    """The context a thread or task a call starts runs in: the call's own variables (dspex's,
    all named ``dspex_*``: its session, output, history...), nothing else. In-process a new thread
    inherits no context variable (the user's, a library's): here neither; ``enter`` then sets
    DSPy's settings as configured."""
    context = contextvars.Context()
    for var, value in contextvars.copy_context().items():
        if var.name.startswith("dspex_"):
            context.run(var.set, value)
    return context


def _run(enter: Callable[[], None], fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    enter()
    return fn(*args, **kwargs)


def install(entry: Entry) -> None:
    """Carry calls into the threads and executor tasks they start (once per process)."""
    global _entry
    installed, _entry = _entry is not None, entry
    if installed:
        return
    start = threading.Thread.start
    submit = ThreadPoolExecutor.submit

    def start_carried(self: threading.Thread) -> None:
        # the whole life of the thread, not only run(): threading.excepthook prints an uncaught
        # exception after run() returns, and it belongs to the call's stderr too
        bootstrap = _carried(self._bootstrap)  # type: ignore[attr-defined]
        if bootstrap is not None:
            self._bootstrap = bootstrap  # type: ignore[attr-defined]
        start(self)

    def submit_carried(self: ThreadPoolExecutor, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return submit(self, _carried(fn) or fn, *args, **kwargs)

    start_carried.__doc__ = start.__doc__
    submit_carried.__doc__ = submit.__doc__
    threading.Thread.start = start_carried  # type: ignore[method-assign]
    ThreadPoolExecutor.submit = submit_carried  # type: ignore[method-assign,assignment]
