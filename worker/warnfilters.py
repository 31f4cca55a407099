"""The warning filters a session's own code sets are the session's.

``warnings.filters`` is one list per process, which every session of a worker would share: a
call's ``warnings.simplefilter("error")`` made every later call of every session raise its
warnings, ``filterwarnings("ignore")`` silenced theirs. Here ``simplefilter``, ``filterwarnings``
and ``resetwarnings`` called by a session's code (its modules sent by value, its ``exec``
module, or the call itself) give the session a list of its own (a copy of the worker's, at its first change), bound
as ``warnings.filters`` for each of its calls (what Python's warnings machinery and
``catch_warnings`` read); the worker's list is bound again as each call ends. What a library
does (a filter its import adds, in any session's call) goes to the worker's list, which every
session's list gets too. A session that never changes its filters costs a call two attribute
reads.
"""

from __future__ import annotations

import functools
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

from worker.refs import SessionState
from worker.sink import CALLER_FILE

# CPython's "filters changed" bump: the "once per place" registries start again under a new list
_filters_changed: Callable[[], None] = getattr(warnings, "_filters_mutated", lambda: None)
worker_filters: Any = warnings.filters  # (typeshed: a Sequence; a list at run time)


def install(current_session: Callable[[], SessionState | None]) -> None:
    """Route the filter functions of ``warnings`` (once per process); ``current_session``: the
    session of the call running in this thread, None outside calls."""
    global worker_filters
    if getattr(warnings.simplefilter, "_dspex_routed", False):
        return
    worker_filters = warnings.filters
    for name in ("filterwarnings", "simplefilter", "resetwarnings"):
        setattr(warnings, name, _routed(getattr(warnings, name), current_session))


def _routed(change: Callable[..., Any], current_session: Callable[[], SessionState | None]) -> Callable[..., Any]:
    @functools.wraps(change)
    def routed(*args: Any, **kwargs: Any) -> Any:
        state = current_session()
        bound = warnings.filters
        if state is not None and _is_session_code(state, sys._getframe(1)):
            if bound is worker_filters:  # (else a catch_warnings block's list, or the session's already)
                if state.warning_filters is None:
                    state.warning_filters = list(worker_filters)
                warnings.filters = state.warning_filters
            return change(*args, **kwargs)
        if bound is not worker_filters and bound is (state.warning_filters if state is not None else None):
            # a library's filter in a session that has its own: the worker's too, every session's
            warnings.filters = worker_filters
            try:
                change(*args, **kwargs)
            finally:
                warnings.filters = bound
        return change(*args, **kwargs)

    routed._dspex_routed = True  # type: ignore[attr-defined]
    return routed


def _is_session_code(state: SessionState, caller: types.FrameType) -> bool:
    """``caller`` runs the session's code, or is the call itself (``s.run(warnings.simplefilter, "error")``)."""
    if caller.f_code.co_filename == CALLER_FILE:
        return True
    modules: list[types.ModuleType] = [*state.code.modules.values(), *([state.module] if state.module else [])]
    return any(vars(module) is caller.f_globals for module in modules)


def enter(filters: list[Any]) -> None:
    """A call of a session with ``filters`` of its own begins: they are in force."""
    warnings.filters = filters
    _filters_changed()


def leave() -> None:
    """A call ends with filters other than the worker's in force: the worker's are again."""
    warnings.filters = worker_filters
    _filters_changed()
