"""A context variable at the top of a user module in a durable session: not durable (the
checkpoint cannot pickle a ``ContextVar``), so the client sends it again after a move (as
docs/remote-objects.md promises), and each call after the move sees the value its caller's
context holds. Real broker and workers, the pinned worker SIGKILLed by pid."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

import dspex
from tests.harness import Stack
from tests.test_durable_today import _move

pytestmark = pytest.mark.timeout(180)

CV = '''
import contextvars
REQUEST = contextvars.ContextVar("request", default="none")
SEEN = []


def handle():
    SEEN.append(REQUEST.get())
    return list(SEEN)
'''


def _calls(s: dspex.Session, mod: Any, value: str) -> tuple[list[str], list[str]]:
    """``handle`` run with ``REQUEST`` set to ``value`` in the caller's context: what it saw, and the
    warnings the call brought."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        token = mod.REQUEST.set(value)
        try:
            seen = s.run(mod.handle)
        finally:
            mod.REQUEST.reset(token)
    return seen, [str(w.message) for w in said]


def test_a_context_variable_global_is_sent_again_after_a_move(stack: Stack, usercode: Any) -> None:
    dx = stack.pool("p:strict_queue", 2)  # (as the workers _move starts)
    mod = usercode(CV)
    s = dx.session("p", durable=True)
    seen, said = _calls(s, mod, "a")
    assert seen == ["a"]
    assert any(f"global REQUEST of {mod.__name__} (_contextvars.ContextVar) is not durable" in m for m in said), said
    assert s.run(mod.handle) == ["a", "none"]  # unset in the caller's context: its default
    _move(stack, dx, s)
    assert _calls(s, mod, "b")[0] == ["a", "none", "b"]  # the list kept, the variable sent again
    assert s.run(mod.handle) == ["a", "none", "b", "none"]
    _move(stack, dx, s)
    assert _calls(s, mod, "c")[0] == ["a", "none", "b", "none", "c"]
