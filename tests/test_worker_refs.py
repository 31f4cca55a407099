"""Refs are counted per session: a quota with a typed error; no session evicts another's objects."""

from __future__ import annotations

import pytest

import dspex
from tests.harness import Stack, wait_for


def test_ref_quota_is_per_session(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--ref-cap", "50")
    keeper, greedy = dx.session("p"), dx.session("p")
    program = keeper.call("builtins", "object")
    held = greedy.exec("held = [object() for _ in range(40)]")["held"]
    with pytest.raises(dspex.RefQuotaExceeded) as info:
        greedy.exec("more = [object() for _ in range(20)]")
    assert info.value.code == "ref_quota" and info.value.details["quota"] == 50
    # the failed call's refs were dropped; the other session's objects were never touched
    assert keeper.eval("type(x).__name__", {"x": program}) == "object"
    assert greedy.eval("len(x)", {"x": held[:10]}) == 10
    assert greedy.release(*held[:30]) == 30
    more = greedy.exec("more = [object() for _ in range(20)]")["more"]
    assert len(more) == 20
    # a session's refs are counted for the whole worker until the session closes
    wait_for(lambda: stack.workers("p")[0]["refs"] == 1 + 10 + 20, what="ref count in heartbeat stats")
    greedy.close()
    wait_for(lambda: stack.workers("p")[0]["refs"] == 1, what="refs freed when the session closed")
    assert keeper.eval("type(x).__name__", {"x": program}) == "object"
