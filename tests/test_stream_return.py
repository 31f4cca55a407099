"""A streamed generator's ``return value`` reaches the client, as ``StopIteration.value`` does
in-process: ``returned = yield from stream`` and the ``StopIteration`` of the ``next()`` that ends
the stream carry it (blocking client), and ``stream.result["value"]`` holds it (both clients; an
async generator cannot return a value, an ``async for`` drops it)."""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Iterator
from typing import Any

import pytest

import dspex
import dspex.aio
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
