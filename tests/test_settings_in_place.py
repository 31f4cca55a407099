"""A client's DSPy setting changed *in place* after a session received it reaches the next call.

In-process ``lm.kwargs["temperature"] = 0.7`` (or ``lm.model = ...``, ``lm.cache = False``,
``adapter.use_native_function_calling = True``, ``dspy.settings.callbacks.append(cb)``) applies
to the next call. Through a session the LM, the adapter and the callbacks list are sent once per
session by the client object's identity: each case runs the same calls in-process and through
``s.run`` (sync and asyncio clients) and compares what DSPy's real ``dspy.LM`` sent to the loopback
server (tests/lmserver.py) or what the program saw.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dspy
import msgpack
import pytest

import dspex
from dspex.client.exchange import encode_request
from dspex.wire.ops import Op
from tests.conformance.harness import fresh_dspy_settings
from tests.harness import shared_pool, wait_for
from tests.lmserver import LMServer

pytestmark = pytest.mark.timeout(120)

_SENT = ("model", "temperature", "max_tokens", "max_completion_tokens")
_nonce = itertools.count()


@pytest.fixture(scope="module")
def dx() -> Iterator[dspex.Client]:
    yield from shared_pool("p:strict_queue", 1)


@pytest.fixture(scope="module")
def server() -> Iterator[LMServer]:
    with LMServer() as lms:
        yield lms


def ask(question: str) -> str:
    return str(dspy.Predict("question -> answer")(question=question).answer)


def _sent(server: LMServer, since: int) -> list[dict[str, Any]]:
    return [{k: c.body.get(k) for k in _SENT} for c in server.completions()[since:]]


def _lm(server: LMServer) -> dspy.LM:
    return dspy.LM("openai/m", api_base=server.base, api_key="k", cache=False, temperature=0.1, max_tokens=50)


def _changes(lm: dspy.LM) -> list[Callable[[], None]]:
    """Each an in-place change of ``lm`` a user makes between two calls."""

    def temperature() -> None:
        lm.kwargs["temperature"] = 0.7

    def max_tokens() -> None:
        lm.kwargs["max_tokens"] = 77

    def model() -> None:
        lm.model = "openai/m2"

    return [temperature, max_tokens, model]


def _each_change(server: LMServer, call: Callable[[str], Any]) -> list[dict[str, Any]]:
    """What the LM sent for a call before any change and after each in-place change."""
    lm = _lm(server)
    since = len(server.completions())
    with fresh_dspy_settings():
        dspy.configure(lm=lm)
        call(f"q{next(_nonce)}")
        for change in _changes(lm):
            change()
            call(f"q{next(_nonce)}")
    return _sent(server, since)


def test_an_lm_changed_in_place_reaches_the_next_call(dx: dspex.Client, server: LMServer) -> None:
    expected = _each_change(server, ask)
    s = dx.session("p")
    try:
        got = _each_change(server, lambda q: s.run(ask, q))
    finally:
        s.close(timeout=10)
    assert expected[-1]["model"] == "m2" and expected[-1]["temperature"] == 0.7  # the changes show here
    assert got == expected


def test_an_lm_changed_in_place_reaches_an_asyncio_clients_next_call(dx: dspex.Client, server: LMServer) -> None:
    expected = _each_change(server, ask)

    async def main() -> list[dict[str, Any]]:
        async with dspex.aio.connect(dx.endpoint, timeout=20) as adx:
            s = adx.session("p")
            lm = _lm(server)
            since = len(server.completions())
            with fresh_dspy_settings():
                dspy.configure(lm=lm)
                await s.run(ask, f"q{next(_nonce)}")
                for change in _changes(lm):
                    change()
                    await s.run(ask, f"q{next(_nonce)}")
            await s.close()
            return _sent(server, since)

    assert asyncio.run(main()) == expected


def test_the_cache_switched_off_in_place_reaches_the_next_call(dx: dspex.Client, server: LMServer) -> None:
    """``lm.cache = False`` after a call with the cache on: the same question asked again goes
    to the server again, in-process and through a session (whose worker has its own cache)."""

    def twice(call: Callable[[str], Any]) -> int:
        lm = dspy.LM("openai/m", api_base=server.base, api_key="k", cache=True)
        # a question no earlier run asked: DSPy's disk cache outlives the test
        since, question = len(server.completions()), f"cached {uuid.uuid4().hex}"
        with fresh_dspy_settings():
            dspy.configure(lm=lm)
            call(question)
            call(question)  # the cache answers
            lm.cache = False
            call(question)
        return len(server.completions()) - since

    expected = twice(ask)
    s = dx.session("p")
    try:
        got = twice(lambda q: s.run(ask, q))
    finally:
        s.close(timeout=10)
    assert got == expected == 2


def test_a_context_lm_changed_in_place_reaches_the_next_call(dx: dspex.Client, server: LMServer) -> None:
    """``with dspy.context(lm=lm2):`` around the call, after ``lm2`` was changed in place."""

    def run(call: Callable[[str], Any]) -> list[dict[str, Any]]:
        lm, lm2 = _lm(server), _lm(server)
        since = len(server.completions())
        with fresh_dspy_settings():
            dspy.configure(lm=lm)
            with dspy.context(lm=lm2):
                call(f"q{next(_nonce)}")
            lm2.kwargs["temperature"] = 0.9
            lm2.model = "openai/m3"
            with dspy.context(lm=lm2):
                call(f"q{next(_nonce)}")
            call(f"q{next(_nonce)}")
        return _sent(server, since)

    expected = run(ask)
    s = dx.session("p")
    try:
        got = run(lambda q: s.run(ask, q))
    finally:
        s.close(timeout=10)
    assert [e["model"] for e in expected] == ["m", "m3", "m"]
    assert got == expected


def configure_own_lm(base: str) -> None:
    dspy.configure(lm=dspy.LM("openai/own", api_base=base, api_key="k", cache=False, temperature=0.3))


def test_the_sessions_own_lm_wins_over_a_client_lm_changed_in_place(dx: dspex.Client, server: LMServer) -> None:
    """A session that configured its own LM keeps it, however the client's configured LM
    changes; a client's ``dspy.context`` LM wins over it, as it is now."""
    lm, lm2 = _lm(server), _lm(server)
    s = dx.session("p")
    try:
        with fresh_dspy_settings():
            dspy.configure(lm=lm)
            s.run(configure_own_lm, server.base)
            since = len(server.completions())
            s.run(ask, f"q{next(_nonce)}")
            lm.kwargs["temperature"] = 0.7
            s.run(ask, f"q{next(_nonce)}")
            for change in (None, *_changes(lm2)):
                if change is not None:
                    change()
                with dspy.context(lm=lm2):
                    s.run(ask, f"q{next(_nonce)}")
    finally:
        s.close(timeout=10)
    assert [(e["model"], e["temperature"]) for e in _sent(server, since)] == [
        ("own", 0.3), ("own", 0.3), ("m", 0.1), ("m", 0.7), ("m", 0.7), ("m2", 0.7)]


def adapter_and_callbacks() -> tuple[str, bool, list[str]]:
    adapter = dspy.settings.adapter
    return type(adapter).__name__, adapter.use_native_function_calling, \
        [type(c).__name__ for c in dspy.settings.callbacks]


class Recorder(dspy.utils.callback.BaseCallback):
    pass


class Counter(dspy.utils.callback.BaseCallback):
    pass


def test_an_adapter_and_callbacks_changed_in_place_reach_the_next_call(dx: dspex.Client) -> None:
    """``ChatAdapter(use_native_function_calling=...)`` toggled, and ``dspy.settings.callbacks``
    appended to and removed from, between two calls."""

    def run(call: Callable[[], Any]) -> list[Any]:
        seen = []
        with fresh_dspy_settings():
            adapter = dspy.ChatAdapter()
            dspy.configure(adapter=adapter, callbacks=[Recorder()])
            seen.append(call())
            adapter.use_native_function_calling = True
            dspy.settings.callbacks.append(Counter())
            seen.append(call())
            dspy.settings.callbacks.pop(0)
            seen.append(call())
        return seen

    expected = run(adapter_and_callbacks)
    s = dx.session("p")
    try:
        got = run(lambda: s.run(adapter_and_callbacks))
    finally:
        s.close(timeout=10)
    assert expected == [("ChatAdapter", False, ["Recorder"]), ("ChatAdapter", True, ["Recorder", "Counter"]),
                        ("ChatAdapter", True, ["Counter"])]
    assert got == expected


def nothing() -> None:
    return None


def _context_frame(s: dspex.Session) -> bytes:
    """The client's settings as a request of ``s`` carries them."""
    frames, _ = encode_request(Op.APPLY.value, [nothing, [], {}], 2**30, s.sender)
    return bytes(msgpack.unpackb(frames[-1])["dspy"].data)


def test_an_unchanged_lm_travels_once_and_a_changed_one_as_its_state(dx: dspex.Client, server: LMServer) -> None:
    """The LM goes in full with a session's first call and by key after; changed in place, its
    new state goes once (not its history), then it is by key again."""
    lm = _lm(server)
    question = f"history {uuid.uuid4().hex}"
    s = dx.session("p")
    try:
        with fresh_dspy_settings():
            dspy.configure(lm=lm)
            s.run(ask, question)  # the LM in full; the call's entry comes back to lm.history
            assert question in str(lm.history[-1]["messages"])
            held = _context_frame(s)
            assert held == _context_frame(s) and b"openai/m" not in held and len(held) < 300
            lm.kwargs["temperature"] = 0.7
            changed = _context_frame(s)
            assert b"openai/m" in changed and question.encode() not in changed
            assert _context_frame(s) == _context_frame(s) and b"openai/m" not in _context_frame(s)
            # the change never reached the worker (those encodings were not sent): the next call
            # names the LM by a key the worker lacks, and goes again in full
            for change in (None, *_changes(lm)[1:]):
                if change is not None:
                    change()
                s.run(ask, f"q{next(_nonce)}")
    finally:
        s.close(timeout=10)
    assert [(e["model"], e["temperature"], e["max_completion_tokens"]) for e in _sent(server, -3)] == [
        ("m", 0.7, 50), ("m", 0.7, 77), ("m2", 0.7, 77)]


JUDGE = dspy.LM("openai/judge", api_key="k", cache=False)  # a global of the program's code, configured too


def the_judge() -> tuple[bool, Any]:
    return dspy.settings.lm is JUDGE, JUDGE.kwargs.get("temperature")


def test_an_lm_that_is_also_a_global_stays_one_object_when_changed_in_place(dx: dspex.Client) -> None:
    def run(call: Callable[[], Any]) -> list[Any]:
        seen = []
        with fresh_dspy_settings():
            dspy.configure(lm=JUDGE)
            seen.append(call())
            JUDGE.kwargs["temperature"] = 0.5
            seen.append(call())
            JUDGE.kwargs.pop("temperature")
        return seen

    expected = run(the_judge)
    s = dx.session("p")
    try:
        got = run(lambda: s.run(the_judge))
    finally:
        s.close(timeout=10)
    assert expected == [(True, None), (True, 0.5)]
    assert got == expected


@pytest.fixture(scope="module")
def hint() -> Iterator[dspex.Client]:
    yield from shared_pool("h:hint", 2)


def asked(question: str) -> int:
    ask(question)
    return os.getpid()


def wait_for_file(path: str) -> None:
    open(path + ".running", "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def _on_the_other_worker(dx: dspex.Client, s: dspex.Session, call: Callable[[], int]) -> int:
    """``call`` while the session's own worker is busy: a ``hint`` session runs it on the other one."""
    with tempfile.TemporaryDirectory(prefix="dx") as tmp:
        release = os.path.join(tmp, "release")
        busy = threading.Thread(target=s.run, args=(wait_for_file, release), daemon=True)
        busy.start()
        try:
            # the call itself running, not the status: its snapshot can still show the busy
            # call of the last round
            wait_for(lambda: os.path.exists(release + ".running"), what="the session's worker busy")
            return call()
        finally:
            open(release, "w").close()
            busy.join(30)


def test_a_change_reaches_either_worker_of_a_hint_session(hint: dspex.Client, server: LMServer) -> None:
    """A ``hint`` session's calls run on another worker while its own is busy: whichever worker
    holds the LM from before the change, each call runs with the LM as the client has it."""
    lm = _lm(server)
    s = hint.session("h")
    since = len(server.completions())
    try:
        with fresh_dspy_settings():
            dspy.configure(lm=lm)
            own = s.run(asked, f"q{next(_nonce)}")
            pids = [own, _on_the_other_worker(hint, s, lambda: s.run(asked, f"q{next(_nonce)}"))]
            lm.kwargs["temperature"] = 0.7
            pids.append(s.run(asked, f"q{next(_nonce)}"))
            pids.append(_on_the_other_worker(hint, s, lambda: s.run(asked, f"q{next(_nonce)}")))
            lm.model = "openai/m2"
            pids.append(_on_the_other_worker(hint, s, lambda: s.run(asked, f"q{next(_nonce)}")))
            pids.append(s.run(asked, f"q{next(_nonce)}"))
    finally:
        s.close(timeout=10)
    assert [p == own for p in pids] == [True, False, True, False, False, True]
    assert [(e["model"], e["temperature"]) for e in _sent(server, since)] == [
        ("m", 0.1), ("m", 0.1), ("m", 0.7), ("m", 0.7), ("m2", 0.7), ("m2", 0.7)]
