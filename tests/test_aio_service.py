"""An asyncio web service on ``dspex.aio``, as a DSPy user writes one: concurrent request tasks
awaiting calls of sessions, streaming, timing out and being cancelled, compared with the same
program in-process on DSPy's own async API (``acall``, ``asyncify``, ``streamify``).

Each test is one difference found between the two; the program runs through real broker and
worker processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

import dspex
import dspex.aio
from tests.harness import shared_pool

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    for client in shared_pool("p:strict_queue", 1):
        yield client.endpoint


async def numbers(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(0)
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
