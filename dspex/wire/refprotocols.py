"""Python's protocols on a ref handle (``for``, ``with``): what the client drives and what runs on
the worker, by this module's name (a ``call`` op: ``dspex.wire.refprotocols.next_items``...).

Iterating a ref takes its items in batches, each batch one call of its own (1, 2, 4... up to
:data:`MAX_BATCH` items): between batches the session is free, so the loop's body may call the
same session (``for x in box: prog(x)``), two loops may run at once (``zip(a, b)``, nested loops),
and leaving the loop early leaves an iterator where the last batch left it. An async iterable is
streamed instead, by one task for its whole life (anyio cancel scopes must stay in one task).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any

from dspex.wire.errors import DspexError

MODULE = __name__
MAX_BATCH = 256


# -- on the worker ------------------------------------------------------------------------------
def iterator_of(obj: Any, reverse: bool) -> Any:
    """``iter(obj)`` (``reversed(obj)``) for a plain iterable; None for an async iterable, which
    the client streams (:func:`items_of`)."""
    if not reverse and hasattr(type(obj), "__aiter__"):
        return None
    return reversed(obj) if reverse else iter(obj)


def next_items(iterator: Any, n: int) -> tuple[list[Any], bool, Any]:
    """The next ``n`` items at most, whether more may follow, and the ``StopIteration``'s value
    (a generator's ``return`` value) once it ended: ``yield from ref`` gives it."""
    items = []
    try:
        for _ in range(n):
            items.append(next(iterator))
    except StopIteration as stop:
        return items, False, stop.value
    return items, True, None


def next_item(iterator: Any, asynchronous: bool = False) -> Any:
    """``next(ref)``, ``anext(ref)`` (``asynchronous``): ``(item, True)``, or ``(value, False)``
    at the end, ``value`` the ``StopIteration``'s (an asyncio session takes a plain iterator's
    items with ``anext``, as it iterates it with ``async for``). An async iterator's next item is
    awaited on the worker thread's event loop, which its later calls share (worker.limits)."""
    if asynchronous and hasattr(type(iterator), "__anext__"):
        return _anext_item(iterator)
    try:
        return next(iterator), True
    except StopIteration as stop:
        return stop.value, False


async def _anext_item(iterator: Any) -> tuple[Any, bool]:
    try:
        return await anext(iterator), True
    except StopAsyncIteration:
        return None, False


def items_of(obj: Any) -> Any:
    """What a stream of an async iterable's ref is: the object itself."""
    return obj


def _context_methods(obj: Any, asynchronous: bool) -> tuple[Any, Any]:
    cls = type(obj)
    kinds = (("__aenter__", "__aexit__"), ("__enter__", "__exit__"))
    for enter_name, exit_name in kinds if asynchronous else kinds[::-1]:
        if hasattr(cls, enter_name) and hasattr(cls, exit_name):
            return getattr(obj, enter_name), getattr(obj, exit_name)
    raise TypeError(f"{cls.__name__!r} object does not support the context manager protocol")


def enter(obj: Any, asynchronous: bool) -> Any:
    """What ``with ref`` (``async with ref``) runs on the worker: the object's ``__enter__`` (its
    ``__aenter__``), or the other kind's when it has only that (an awaitable is awaited there):
    a blocking client enters an async context manager, an asyncio one a plain one."""
    return _context_methods(obj, asynchronous)[0]()


def leave(obj: Any, asynchronous: bool, exc_type: type[BaseException] | None, exc: BaseException | None) -> Any:
    """The ``__exit__`` (``__aexit__``) that matches :func:`enter`; the traceback stays on the
    client (frames cannot travel)."""
    return _context_methods(obj, asynchronous)[1](exc_type, exc, None)


def stand_in(exc: BaseException) -> BaseException:
    """``exc``'s class with its message alone: what an exception that cannot be pickled sends."""
    stand = BaseException.__new__(type(exc))
    stand.args = (str(exc),)
    return stand


# -- on the client ------------------------------------------------------------------------------
class _Loops:
    """What batches took from one iterator ahead of the loops over it that run here."""

    __slots__ = ("ahead", "end", "running")

    def __init__(self) -> None:
        self.ahead: deque[Any] = deque()
        self.end: list[Any] = []  # the StopIteration's value once a batch met the end, until one takes it
        self.running = 0


# by the iterator's ref id: ``next(gen)`` in the body of ``for x in gen``, and a loop inside it
# over the same generator, take what the loop's batch took first, so each sees the order of
# in-process (a loop's own iterator, iter(obj), has an id no one else knows)
_loops: dict[str, _Loops] = {}


def taken_ahead(iterator: Any) -> tuple[Any, bool] | None:
    """``next(iterator)`` (a ref) from what running loops took ahead, as :func:`next_item` gives
    it; None when they hold nothing of it."""
    loops = _loops.get(iterator.id)
    if loops is None:
        return None
    if loops.ahead:
        return loops.ahead.popleft(), True
    return (loops.end.pop(), False) if loops.end else None


@contextlib.contextmanager
def _loop_over(iterator: Any) -> Iterator[_Loops]:
    loops = _loops.setdefault(iterator.id, _Loops())
    loops.running += 1
    try:
        yield loops
    finally:
        loops.running -= 1
        if not loops.running:  # what the last loop left taken ahead is dropped, as the docs say
            _loops.pop(iterator.id, None)


def items(owner: Any, ref: Any, reverse: bool = False) -> Generator[Any, None, Any]:
    """A blocking session's ``for x in ref``: nothing is sent before the first item is asked for;
    it returns what the iterator's ``StopIteration`` carried (``returned = yield from ref``)."""
    it = owner.call(MODULE, "iterator_of", [ref, reverse])
    if not isinstance(it, type(ref)):  # an async iterable (None), or an iterator that came back as data
        return (yield from owner.stream("builtins", "reversed", [ref]) if reverse
                else owner.stream(MODULE, "items_of", [ref]))
    try:
        with _loop_over(it) as loops:
            size, more = 1, True
            while more:
                batch, more, returned = owner.call(MODULE, "next_items", [it, size])
                loops.ahead.extend(batch)
                if not more:
                    loops.end.append(returned)
                while loops.ahead:
                    yield loops.ahead.popleft()
                size = min(size * 2, MAX_BATCH)
            # the value goes to whoever meets the end first (next(gen) in the body may have)
            return loops.end.pop() if loops.end else None
    finally:
        if it != ref:  # an iterator made for this loop (a generator is its own)
            try:
                owner.release(it)
            except DspexError:
                pass  # the session is gone, and the iterator with it


async def aitems(owner: Any, ref: Any) -> AsyncIterator[Any]:
    """An asyncio session's ``async for x in ref``: :func:`items`, awaited."""
    it = await owner.call(MODULE, "iterator_of", [ref, False])
    if not isinstance(it, type(ref)):
        async for item in owner.stream(MODULE, "items_of", [ref]):
            yield item
        return
    try:
        with _loop_over(it) as loops:
            size, more = 1, True
            while more:
                batch, more, returned = await owner.call(MODULE, "next_items", [it, size])
                loops.ahead.extend(batch)
                if not more:
                    loops.end.append(returned)  # async for drops it; anext(ref) in the body ends there
                while loops.ahead:
                    yield loops.ahead.popleft()
                size = min(size * 2, MAX_BATCH)
    finally:
        if it != ref:
            try:
                await owner.release(it)
            except DspexError:
                pass  # the session is gone, and the iterator with it
