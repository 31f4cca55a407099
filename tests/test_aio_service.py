"""An asyncio web service on ``dspex.aio``, as a DSPy user writes one: concurrent request tasks
awaiting calls of sessions, streaming, timing out and being cancelled, compared with the same
program in-process on DSPy's own async API (``acall``, ``asyncify``, ``streamify``).

Each test is one difference found between the two; the program runs through real broker and
worker processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import dspy
import pytest

import dspex
import dspex.aio
from tests.harness import shared_pool
from tests.lmserver import LMServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    for client in shared_pool("p:strict_queue", 1):
        yield client.endpoint


async def numbers(n: int) -> AsyncIterator[int]:
    for i in range(n):
        # 3 items take 30 ms: the next call waits in the broker, not prefetched behind a call that just started
        await asyncio.sleep(0.01)
        yield i


async def echo(x: int) -> int:
    return x


def test_a_call_behind_a_stream_held_after_break_gets_its_timeout_not_silence(endpoint: str) -> None:
    """In-process, ``break`` out of ``async for`` over a generator held in a variable leaves it
    suspended and the next call runs. A session runs one call at a time, so its next call waits
    behind the stream: it must end at its own timeout, typed as never run, and not be dropped by the
    broker while the client waits out the reply grace for an answer that never comes."""

    async def main() -> tuple[type[BaseException], float, int]:
        async with dspex.aio.connect(endpoint, timeout=20) as dx:
            s = dx.session("p")
            stream = s.stream_apply(numbers, [1000], timeout=30)
            async for i in stream:
                if i == 2:
                    break
            start = time.monotonic()
            with pytest.raises(dspex.DspexError) as caught:
                await s.apply(echo, [1], timeout=2)
            waited = time.monotonic() - start
            await stream.aclose()
            after = await s.run(echo, 7)  # the session serves on
            await s.close()
            return type(caught.value), waited, after

    kind, waited, after = asyncio.run(main())
    assert issubclass(kind, dspex.QueueTimeout), kind  # it never ran: safe to retry
    assert 1.5 < waited < 4.0, waited
    assert after == 7


async def pause(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "paused"


async def touch(path: str) -> str:
    open(path, "w").close()  # noqa: ASYNC230 - the side effect that must not happen
    return "ran"


def test_a_call_whose_timeout_ran_out_while_prefetched_is_answered_at_its_deadline(endpoint: str,
                                                                                   tmp_path: Path) -> None:
    """Tasks of one request handler gather a long call and a short one of their session: the broker
    may send the second to the worker at once (prefetch, behind a call that just started). When
    its timeout runs out there before the first call ends, it must not start, and its caller hears
    so at its deadline: ``QueueTimeout`` (it never ran), as the broker says of one that waited in its
    queue - not ``Timeout`` (may have run) from its own client once the reply grace is over, nor
    ``Timeout`` (stopped, its coroutine half set up) when the worker reaches it."""

    async def attempt(s: dspex.aio.AsyncSession, path: str) -> tuple[BaseException | str, float]:
        for _ in range(3):
            await s.run(abs, -1)  # short calls: the worker may be sent a call ahead of a free slot
        start = time.monotonic()
        slow = asyncio.ensure_future(s.apply(pause, [60.0], timeout=90))  # far past the reply grace
        second = asyncio.ensure_future(s.apply(touch, [path], timeout=1.0))
        outcome: BaseException | str
        try:
            outcome = await second
        except dspex.DspexError as err:
            outcome = err
        waited = time.monotonic() - start
        slow.cancel()  # the slow call is stopped on its worker
        with contextlib.suppress(asyncio.CancelledError):
            await slow
        return outcome, waited

    async def main() -> list[tuple[BaseException | str, float]]:
        async with dspex.aio.connect(endpoint, timeout=20) as dx:
            s = dx.session("p")
            tries = []
            for i in range(8):  # until the second call was prefetched: its worker answered it
                tries.append(await attempt(s, str(tmp_path / f"touched{i}")))
                if "on this worker" in str(tries[-1][0]) or tries[-1][1] > 3.0:
                    break
            await s.close()
            return tries

    tries = asyncio.run(main())
    assert all(isinstance(outcome, dspex.QueueTimeout) for outcome, _ in tries), tries
    assert all(0.9 < waited < 3.0 for _, waited in tries), tries  # at its deadline
    assert not list(tmp_path.iterdir())  # no attempt ran
    if "on this worker" not in str(tries[-1][0]):
        pytest.skip("the broker never prefetched the second call (a loaded machine): the worker's path was not taken")


qa = dspy.Predict("question -> answer")


async def answers(questions: list[str]) -> AsyncIterator[str]:
    """A streaming handler: one LM call per item."""
    for question in questions:
        yield (await qa.acall(question=question)).answer


def test_a_stream_left_with_aclose_counts_its_lm_usage_and_history(endpoint: str) -> None:
    """``dspy.track_usage()`` and the LM's history around a stream the handler leaves after its
    first item (``aclose()``): what the producer spent before it stopped is counted, as in-process."""

    async def first_answer(lm: dspy.LM, stream: Callable[[], AsyncIterator[str]]) -> tuple[int, int]:
        before = len(lm.history)
        with dspy.track_usage() as usage:
            async with contextlib.aclosing(stream()) as items:  # type: ignore[type-var]
                async for _ in items:
                    break
        return usage.get_total_tokens().get("openai/m", {}).get("total_tokens", 0), len(lm.history) - before

    async def main(base: str) -> tuple[tuple[int, int], tuple[int, int]]:
        lm = dspy.LM("openai/m", api_base=base, api_key="k", cache=False)
        with dspy.context(lm=lm, track_usage=True):
            inprocess = await first_answer(lm, lambda: answers(["a", "b", "c"]))
            async with dspex.aio.connect(endpoint, timeout=20) as dx:
                s = dx.session("p")
                remote = await first_answer(lm, lambda: s.stream_apply(answers, [["a", "b", "c"]]))
                await s.close()
        return inprocess, remote

    with LMServer() as server:
        inprocess, remote = asyncio.run(main(server.base))
    tokens, entries = inprocess
    assert tokens > 0 and entries == 1
    # the producer may have run ahead of the consumer (its credit window): at least what in-process spent
    assert remote[0] >= tokens and remote[1] >= entries, (inprocess, remote)


TENANT = contextvars.ContextVar("tenant", default="-")  # what a web middleware sets per request


async def who_and_which_lm() -> AsyncIterator[tuple[str, str | None]]:
    lm = dspy.settings.lm
    yield TENANT.get(), lm.model if lm is not None else None


def test_a_stream_runs_with_the_settings_and_context_where_it_is_iterated(endpoint: str) -> None:
    """A handler makes its stream first and iterates it inside the request's context (a tenant
    set, ``dspy.context(lm=...)``): an async generator's body runs in the context of each
    ``__anext__``, so it sees them; the stream's request is sent at its first ``__anext__``, and
    carries what is in force there."""

    async def handler(make: Callable[[], AsyncIterator[tuple[str, str | None]]]) -> list[tuple[str, str | None]]:
        stream = make()
        TENANT.set("acme")
        with dspy.context(lm=dspy.LM("openai/tenant-model", api_key="k")):
            return [item async for item in stream]

    async def main() -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
        inprocess = await asyncio.create_task(handler(who_and_which_lm))
        async with dspex.aio.connect(endpoint, timeout=20) as dx:
            s = dx.session("p")
            remote = await asyncio.create_task(handler(lambda: s.stream_apply(who_and_which_lm)))
            await s.close()
        return inprocess, remote

    inprocess, remote = asyncio.run(main())
    assert inprocess == [("acme", "openai/tenant-model")]
    assert remote == inprocess
