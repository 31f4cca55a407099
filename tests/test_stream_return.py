"""A streamed generator's ``return value`` reaches the client, as ``StopIteration.value`` does
in-process: ``returned = yield from stream`` and the ``StopIteration`` of the ``next()`` that ends
the stream carry it (blocking client), and ``stream.result["value"]`` holds it (both clients; an
async generator cannot return a value, an ``async for`` drops it). A StopIteration the call raises
is an error of the stream, never its end."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

import dspex
import dspex.aio
from dspex.wire.protocol import STREAM_WINDOW
from tests.harness import shared_pool

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def dx() -> Iterator[dspex.Client]:
    yield from shared_pool("p:strict_queue", 1)


def counted(n: int) -> Generator[int, None, dict[str, Any]]:
    yield from range(n)
    return {"total": n, "squares": [i * i for i in range(n)]}


def plain(n: int) -> Generator[int, None, None]:
    yield from range(n)


def delegate(items: Any) -> Generator[Any, None, Any]:
    """What a generator that delegates to ``items`` (``yield from``) gets back."""
    returned = yield from items
    return returned


def drive(iterator: Any) -> tuple[list[Any], Any]:
    """The items ``next(iterator)`` gives, and the value of the ``StopIteration`` that ends them."""
    items = []
    while True:
        try:
            items.append(next(iterator))
        except StopIteration as stop:
            return items, stop.value


def test_yield_from_a_stream_gives_the_generators_return_value(dx: dspex.Client) -> None:
    expected = drive(delegate(counted(3)))
    assert expected == ([0, 1, 2], {"total": 3, "squares": [0, 1, 4]})
    with dx.session("p") as s:
        stream = s.stream_apply(counted, [3])
        assert drive(delegate(stream)) == expected
        assert stream.result == {"items": 3, "value": expected[1]}
        assert drive(stream) == ([], None)  # an ended generator: StopIteration without a value, as in-process
        stream = s.stream_apply(plain, [2])
        assert drive(stream) == ([0, 1], None)
        assert stream.result == {"items": 2, "value": None}


def test_the_value_survives_a_read_ahead_of_the_stream(dx: dspex.Client) -> None:
    """A call of the session made while the stream is held reads it to its end first (take_in)."""
    with dx.session("p") as s:
        stream = s.stream_apply(counted, [4])
        assert next(stream) == 0
        assert s.run(len, [1, 2]) == 2
        assert drive(stream) == ([1, 2, 3], {"total": 4, "squares": [0, 1, 4, 9]})
        assert stream.result == {"items": 4, "value": {"total": 4, "squares": [0, 1, 4, 9]}}


def test_an_asyncio_clients_stream_result_holds_the_value(dx: dspex.Client) -> None:
    async def main() -> tuple[list[int], Any]:
        async with dspex.aio.connect(dx.endpoint, timeout=20) as adx:
            s = adx.session("p")
            stream = s.stream_apply(counted, [3])
            items = [item async for item in stream]
            await s.close()
            return items, stream.result

    assert asyncio.run(main()) == ([0, 1, 2], {"items": 3, "value": {"total": 3, "squares": [0, 1, 4]}})


def returns_a_lock() -> Generator[int, None, Any]:
    import threading

    yield 1
    return threading.Lock()


def test_a_value_that_cannot_be_pickled_comes_back_as_a_ref(dx: dspex.Client) -> None:
    with dx.session("p") as s:
        stream = s.stream_apply(returns_a_lock)
        items, value = drive(stream)
        assert items == [1] and isinstance(value, dspex.Ref) and value.type_name.endswith("lock")
        assert s.run(lambda lock: lock.acquire(blocking=False), value) is True


def first_of_nothing() -> Iterator[int]:
    """Raises StopIteration before it gives its iterable, as ``next(iter(rows))`` of no rows does."""
    next(iter([]))
    return iter([1])


async def awaits_nothing() -> Any:
    raise StopAsyncIteration


def test_a_stop_iteration_the_call_raises_is_an_error_not_the_streams_end(dx: dspex.Client) -> None:
    """In-process the StopIteration of ``for x in first_of_nothing()`` leaves the loop as an error;
    a stream's ``next()`` raising it would end the consumer's loop quietly, with no items."""
    with pytest.raises(StopIteration):
        for _ in first_of_nothing():
            pass
    with dx.session("p") as s:
        with pytest.raises(dspex.RemoteError) as caught:
            list(s.stream_apply(first_of_nothing))
        assert caught.value.type_name == "StopIteration" and not isinstance(caught.value, StopIteration)
        assert "next(iter([]))" in caught.value.remote_traceback
        assert s.apply(len, ([1, 2],), timeout=10) == 2  # the stream ended: nothing waits behind it


def test_an_asyncio_streams_stop_async_iteration_is_an_error_not_its_end(dx: dspex.Client) -> None:
    async def main() -> tuple[dspex.RemoteError, int, RuntimeError]:
        async with dspex.aio.connect(dx.endpoint, timeout=20) as adx:
            s = adx.session("p")
            with pytest.raises(dspex.RemoteError) as caught:
                [item async for item in s.stream_apply(awaits_nothing)]
            after = await s.apply(len, ([1, 2],), timeout=10)
            # a call is a coroutine: Python makes the StopIteration leaving it a RuntimeError
            with pytest.raises(RuntimeError, match="coroutine raised StopIteration") as ran:
                await s.run(first_of_nothing)
            await s.close()
            return caught.value, after, ran.value

    err, after, ran = asyncio.run(main())
    assert err.type_name == "StopAsyncIteration" and not isinstance(err, StopAsyncIteration)
    assert after == 2
    assert isinstance(ran.__cause__, dspex.RemoteError) and isinstance(ran.__cause__, StopIteration)



def stubborn(progress: str) -> Iterator[int]:
    """A generator that yields again when closed (``close()`` raises RuntimeError in-process); it
    writes how many items it made to ``progress``."""
    i = 0
    try:
        while True:
            yield i
            i += 1
            Path(progress).write_text(str(i))
    finally:
        yield -1


async def astubborn(progress: str) -> AsyncIterator[int]:
    """:func:`stubborn`, async."""
    i = 0
    try:
        while True:
            yield i
            i += 1
            Path(progress).write_text(str(i))
    finally:
        yield -1


@dataclasses.dataclass
class SlowToSend:
    """An item (data: sent by value) whose encoding takes a minute: a cancel interrupts the worker there."""

    progress: str

    def __reduce__(self) -> Any:
        Path(self.progress).write_text("encoding")
        time.sleep(60)
        return (SlowToSend, (self.progress,))


def stubborn_then_slow(progress: str) -> Iterator[Any]:
    """:func:`stubborn` whose second item the worker is encoding when the stream is closed."""
    try:
        yield 0
        yield SlowToSend(progress)
    finally:
        yield -1


def window_full(progress: Path) -> None:
    """Until the producer made a credit window of items ahead: it waits for credit, not interrupted."""
    deadline = time.monotonic() + 30
    while not ((text := progress.read_text() if progress.exists() else "").isdigit() and int(text) >= STREAM_WINDOW):
        assert time.monotonic() < deadline, "the producer did not fill its window"
        time.sleep(0.01)


def test_closing_a_stream_whose_generator_ignores_generator_exit_raises_as_in_process(
        dx: dspex.Client, tmp_path: Path) -> None:
    local = stubborn(str(tmp_path / "local"))
    next(local)
    with pytest.raises(RuntimeError, match="generator ignored GeneratorExit") as expected:
        local.close()
    progress = tmp_path / "n"
    with dx.session("p") as s:
        stream = s.stream_apply(stubborn, [str(progress)])
        assert next(stream) == 0
        window_full(progress)
        with pytest.raises(RuntimeError, match=str(expected.value)) as err:
            stream.close()
        assert isinstance(err.value, dspex.RemoteError) and err.value.details["closing"] is True
        assert "Cancelled" not in str(err.value.details.get("chain", ""))  # how the worker stopped it is not the error
        assert stream.done and s.run(len, [1]) == 1  # the session serves on
        stream.close()  # closed: quiet, as a closed generator's close()
        progress.unlink()
        stream = s.stream_apply(stubborn_then_slow, [str(progress)])
        assert next(stream) == 0
        deadline = time.monotonic() + 30
        while not (progress.exists() and progress.read_text() == "encoding"):  # the worker runs, interruptible
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(RuntimeError, match=str(expected.value)):
            stream.close()  # (the worker interrupted the producer to stop it)
        progress.unlink()
        with s.stream_apply(plain, [100]) as quiet:  # a generator that stops when closed: quiet
            assert next(quiet) == 0

    async def main() -> None:
        async with dspex.aio.connect(dx.endpoint, timeout=20) as adx, adx.session("p") as a:
            for producer, message in ((stubborn, "generator ignored GeneratorExit"),
                                      (astubborn, "async generator ignored GeneratorExit")):
                stream = a.stream_apply(producer, [str(progress)])
                assert await anext(stream) == 0
                window_full(progress)
                with pytest.raises(RuntimeError, match=message):
                    await stream.aclose()
                progress.unlink()
                assert await a.run(len, [1]) == 1

    asyncio.run(main())
