"""A client's ``dspy.context`` block names the settings it sets, and those win in the session's call.

In-process ``with dspy.context(lm=lm):`` wins over any ``dspy.configure``, even when ``lm`` is the
LM configured already: the user named it. DSPy's ``dspy.context`` copies the whole configuration
into the block, so only the names passed to it tell which settings a block sets. Each case runs the
same steps in-process and through ``s.run`` (sync and asyncio clients) of a session that
configured its own LM, adapter and ``track_usage``, and compares what DSPy's real ``dspy.LM`` sent
to the loopback server (tests/lmserver.py) and what the program saw.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
from typing import Any

import dspy
import pytest

import dspex
from tests.conformance.harness import fresh_dspy_settings
from tests.harness import shared_pool
from tests.lmserver import LMServer

pytestmark = pytest.mark.timeout(120)

_nonce = itertools.count()


@pytest.fixture(scope="module")
def dx() -> Iterator[dspex.Client]:
    yield from shared_pool("p:strict_queue", 1)


@pytest.fixture(scope="module")
def server() -> Iterator[LMServer]:
    with LMServer() as lms:
        yield lms


def configure_own(base: str) -> None:
    """The session's own settings (in-process: the program's own ``dspy.configure``)."""
    dspy.configure(lm=dspy.LM("openai/own", api_base=base, api_key="k", cache=False),
                   adapter=dspy.JSONAdapter(), track_usage=False)


def seen(question: str) -> tuple[str, str, bool]:
    """The model the LM call went to, the adapter and ``track_usage`` the program saw."""
    dspy.Predict("question -> answer")(question=question)
    return str(dspy.settings.lm.model), type(dspy.settings.adapter).__name__, bool(dspy.settings.track_usage)


def configure_own_then_seen(base: str, question: str) -> tuple[str, str, bool]:
    configure_own(base)
    return seen(question)


def _lm(server: LMServer) -> dspy.LM:
    return dspy.LM("openai/m", api_base=server.base, api_key="k", cache=False)


def _steps(server: LMServer) -> Generator[tuple[Callable[..., Any], tuple[Any, ...]], Any, list[Any]]:
    """The client configures ``lm``, an adapter and ``track_usage``; the program configures its own;
    then blocks around calls name some of the client's same objects again, or others. Yields each
    call (function, arguments) from inside its blocks, and gets its result back."""
    lm, adapter = _lm(server), dspy.ChatAdapter()
    out: list[Any] = []
    with fresh_dspy_settings():
        dspy.configure(lm=lm, adapter=adapter, track_usage=True)
        yield configure_own, (server.base,)
        out.append((yield seen, (f"q{next(_nonce)}",)))  # the session's own
        with dspy.context(lm=lm):  # named: the client's, though configured already
            out.append((yield seen, (f"q{next(_nonce)}",)))
            with dspy.context(trace=[]), dspy.context(adapter=adapter):  # nested: lm and adapter named
                out.append((yield seen, (f"q{next(_nonce)}",)))
            out.append((yield configure_own_then_seen, (server.base, f"q{next(_nonce)}")))  # the block still wins
        with dspy.context(track_usage=True):
            out.append((yield seen, (f"q{next(_nonce)}",)))
        with dspy.context(adapter=dspy.ChatAdapter()):  # an unrelated block: lm stays the session's
            out.append((yield seen, (f"q{next(_nonce)}",)))
        with dspy.context():
            out.append((yield seen, (f"q{next(_nonce)}",)))
    return out


def _drive(server: LMServer, run: Callable[..., Any]) -> tuple[list[Any], list[str]]:
    """:func:`_steps` with each call made by ``run`` (in the blocks' context); what the LM server got."""
    since = len(server.completions())
    steps = _steps(server)
    try:
        call = next(steps)
        while True:
            call = steps.send(run(call[0], *call[1]))
    except StopIteration as stop:
        return stop.value, _models(server, since)


_EXPECTED = [("openai/own", "JSONAdapter", False),
             ("openai/m", "JSONAdapter", False),
             ("openai/m", "ChatAdapter", False),
             ("openai/m", "JSONAdapter", False),
             ("openai/own", "JSONAdapter", True),
             ("openai/own", "ChatAdapter", False),
             ("openai/own", "JSONAdapter", False)]


def _models(server: LMServer, since: int) -> list[str]:
    return [str(c.body.get("model")) for c in server.completions()[since:]]


def _in_process(server: LMServer) -> tuple[list[Any], list[str]]:
    return _drive(server, lambda f, *args: f(*args))


def test_a_context_naming_the_configured_lm_wins_over_the_sessions_own(dx: dspex.Client, server: LMServer) -> None:
    expected = _in_process(server)
    assert expected[0] == _EXPECTED
    s = dx.session("p")
    try:
        got = _drive(server, s.run)
    finally:
        s.close(timeout=10)
    assert got == expected


def test_an_asyncio_clients_context_naming_the_configured_lm_wins(dx: dspex.Client, server: LMServer) -> None:
    expected = _in_process(server)

    async def main() -> tuple[list[Any], list[str]]:
        async with dspex.aio.connect(dx.endpoint, timeout=20) as adx:
            s = adx.session("p")
            since = len(server.completions())
            steps = _steps(server)
            try:
                call = next(steps)
                while True:  # awaited in the blocks: the generator runs in this task's context
                    call = steps.send(await s.run(call[0], *call[1]))
            except StopIteration as stop:
                out: list[Any] = stop.value
            await s.close()
            return out, _models(server, since)

    assert asyncio.run(main()) == expected


def test_the_names_of_a_context_are_known_when_dspy_is_imported_after_dspex() -> None:
    """DSPy imported after dspex's client: ``dspy.context``, bound at DSPy's import, records them too."""
    script = (
        "import dspex\nfrom dspex.client.sendcache import client_dspy_settings\n"
        "import dspy\nfrom dspy.utils import DummyLM\n"
        "lm = DummyLM([])\ndspy.configure(lm=lm)\n"
        "with dspy.context(lm=lm):\n    print(client_dspy_settings()[1])\n"
        "with dspy.context(adapter=dspy.JSONAdapter()):\n    print(client_dspy_settings()[1])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split("\n")[:2] == ["['lm']", "['adapter']"]
