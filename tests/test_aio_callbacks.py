"""The asyncio client as its own Python: an ``async def`` callback (``on_output=``, ``on_progress=``)
is awaited, in order, before the call goes on (a slow one paces the call, as a plain one does); a
blocking client given one says so at once instead of dropping its events unawaited."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

import dspex
import dspex.aio
from dspex.progress import report
from tests.harness import shared_pool

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def dx() -> Iterator[dspex.Client]:
    yield from shared_pool("p:strict_queue", 1, "--no-dspy")


def chatty(n: int) -> int:
    for i in range(n):
        print("line", i)
        report({"step": i})
    return n


def steps(n: int) -> Iterator[int]:
    for i in range(n):
        print("item", i)
        yield i


def test_async_callbacks_are_awaited_in_order(dx: dspex.Client) -> None:
    async def main() -> tuple[list[str], list[Any], list[int], list[str]]:
        async with dspex.aio.connect(dx.endpoint, timeout=20, forward_output=False) as adx:
            s = adx.session("p")
            texts: list[str] = []
            progress: list[Any] = []

            async def on_output(event: dict[str, Any]) -> None:
                await asyncio.sleep(0.001)  # a callback that awaits (a websocket send, a queue put)
                texts.append(event["text"])

            async def on_progress(event: Any) -> None:
                await asyncio.sleep(0)
                progress.append(event)

            assert await s.apply(chatty, [3], on_output=on_output, on_progress=on_progress) == 3
            streamed: list[str] = []

            async def collect(event: dict[str, Any]) -> None:
                streamed.append(event["text"])

            items = [x async for x in s.stream_apply(steps, [3], on_output=collect)]
            await s.close()
            return texts, progress, items, streamed

    texts, progress, items, streamed = asyncio.run(main())
    assert texts == ["line 0\n", "line 1\n", "line 2\n"]
    assert progress == [{"step": 0}, {"step": 1}, {"step": 2}]
    assert items == [0, 1, 2] and streamed == ["item 0\n", "item 1\n", "item 2\n"]


def test_a_failing_async_callback_stops_the_call_like_a_plain_one(dx: dspex.Client) -> None:
    async def main() -> Any:
        async with dspex.aio.connect(dx.endpoint, timeout=20, forward_output=False) as adx:
            s = adx.session("p")

            async def on_output(event: dict[str, Any]) -> None:
                raise RuntimeError("callback bug")

            with pytest.raises(RuntimeError, match="callback bug"):
                await s.apply(chatty, [3], on_output=on_output)
            return await s.run(abs, -4)  # the session serves on

    assert asyncio.run(main()) == 4


def test_a_blocking_client_given_an_async_callback_says_so(dx: dspex.Client) -> None:
    async def on_output(event: dict[str, Any]) -> None:
        pass

    with dx.session("p") as s:
        with pytest.raises(TypeError, match="dspex.aio"):
            s.apply(chatty, [2], on_output=on_output)  # refused before anything is sent
        with pytest.raises(TypeError, match="dspex.aio"):
            s.apply(chatty, [2], on_output=lambda event: on_output(event))  # known by what it returns
        assert s.run(abs, -4) == 4


def stops_with_a_word() -> None:
    try:
        __import__("time").sleep(100)
    finally:
        print("stopped")


def test_an_async_callback_gets_what_a_cancelled_call_prints_while_it_stops(dx: dspex.Client) -> None:
    """Nobody awaits a call ``wait_for`` cancelled, yet the ``async def`` ``on_output`` gets what
    its ``finally`` prints (awaited in a task of its own), and no coroutine is left unawaited."""
    async def main() -> list[str]:
        async with dspex.aio.connect(dx.endpoint, timeout=20, forward_output=False) as adx:
            texts: list[str] = []

            async def on_output(event: dict[str, Any]) -> None:
                await asyncio.sleep(0)
                texts.append(event["text"])

            with pytest.raises(TimeoutError):
                await asyncio.wait_for(adx.session("p").apply(stops_with_a_word, [], on_output=on_output), 0.5)
            async with asyncio.timeout(10):
                while not texts:
                    await asyncio.sleep(0.01)
            return texts

    assert "".join(asyncio.run(main())) == "stopped\n"
