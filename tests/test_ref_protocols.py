"""A ref handle reads like the object it names, for Python's protocols too: ``len``, ``in``,
iteration (a stream), ``del``, ``with``, ``str``/``format`` and operators run on the worker as
Python runs them on the object there, so each expression gives what it gives in-process. What
cannot be answered at once through an asyncio session (``len``, ``in``, ``with``...) is a
``TypeError`` naming the awaitable way; ``bool`` and ``==`` are the handle's own (no round trip)."""

from __future__ import annotations

import asyncio
import copy
import functools
import gc
import math
import pickle
import re
import threading
import warnings
from collections.abc import Callable, Generator, Iterator
from types import TracebackType
from typing import Any, Self

import pytest

import dspex
import dspex.aio
from dspex.wire.ref import RemoteMethod
from tests.harness import shared_pool, wait_for
from tests.test_stream_return import delegate, drive

pytestmark = pytest.mark.timeout(120)


class Box:
    """A client class (sent by value) with the protocols a user's own class defines."""

    def __init__(self, items: list[int]) -> None:
        self.items = list(items)
        self.tag = "t"
        self.entered = 0
        self.exits: list[Any] = []
        self.probes: list[str] = []
        self.closed_gens = 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[int]:
        return iter(self.items)

    def __contains__(self, x: object) -> bool:
        return x in self.items

    def __getitem__(self, k: Any) -> Any:
        return self.items[k]

    def push(self, x: int) -> int:
        self.items.append(x)
        return len(self.items)

    def __reversed__(self) -> Iterator[int]:
        return reversed(self.items)

    def __delitem__(self, k: Any) -> None:
        del self.items[k]

    def __add__(self, other: list[int]) -> Box:
        return Box(self.items + list(other))

    def __radd__(self, other: list[int]) -> Box:
        return Box(list(other) + self.items)

    def __iadd__(self, other: list[int]) -> Self:
        self.items += other
        return self

    def __mul__(self, k: int) -> Box:
        return Box(self.items * k)

    def __neg__(self) -> Box:
        return Box([-x for x in self.items])

    def __lt__(self, n: int) -> bool:
        return len(self.items) < n

    def __enter__(self) -> Self:
        self.entered += 1
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        self.entered -= 1
        self.exits.append((exc_type, str(exc) if exc is not None else None, tb))
        return exc_type is KeyError  # suppresses a KeyError, as a user's context manager may

    async def __aenter__(self) -> Self:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        return self.__exit__(exc_type, exc, tb)

    def __str__(self) -> str:
        return f"box of {len(self.items)}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __getattr__(self, name: str) -> Any:
        self.__dict__.setdefault("probes", []).append(name)  # who looks for attributes it lacks
        raise AttributeError(name)

    def gen(self, n: int) -> Iterator[int]:
        try:
            yield from range(n)
        finally:
            self.closed_gens += 1

    async def agen(self, n: int) -> Any:
        for i in range(n):
            await asyncio.sleep(0)
            yield i


class Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class Plain:
    """A context manager without the async protocol."""

    def __init__(self) -> None:
        self.entered = False

    def __enter__(self) -> Self:
        self.entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.entered = False


class AsyncOnly:
    """A context manager with the async protocol only."""

    def __init__(self) -> None:
        self.entered = False

    async def __aenter__(self) -> Self:
        self.entered = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.entered = False


def state(box: Any) -> Any:
    """A Box's data, here or through a ref (attribute reads are round trips then)."""
    return (box.items, box.tag if hasattr(box, "tag") else None, box.entered)


def _delattr(b: Any) -> Any:
    del b.tag
    return state(b)


def _delitem(b: Any) -> Any:
    del b[0]
    return state(b)


def _iadd(b: Any) -> Any:
    b += [7]
    return state(b)


def _with(b: Any) -> Any:
    with b as inner:
        during = state(inner)
    return during, state(b)


def _for_break(b: Any) -> Any:
    seen = []
    for x in b:
        seen.append(x)
        if x == 2:
            break
    return seen


# each expression runs on a local Box and on a ref to a Box on the worker: the same answer
CASES: dict[str, Callable[[Any], Any]] = {
    "len": len,
    "in": lambda b: (2 in b, 9 in b, 9 not in b),
    "iter": list,
    "for-break": _for_break,
    "sorted": sorted,
    "reversed": lambda b: list(reversed(b)),  # one stream, not len() and a __getitem__ per item
    "index": lambda b: (b[0], b[-1], b[1:]),
    "str": str,
    "format": lambda b: (f"{b}", f"{b:>12}", "%s" % b),  # noqa: UP031 - %-formatting is what's tested
    "print-ish": lambda b: " ".join(map(str, [b, b])),
    "add": lambda b: state(b + [4]),
    "radd": lambda b: state([0] + b),
    "mul": lambda b: state(b * 2),
    "neg": lambda b: state(-b),
    "lt/gt": lambda b: (b < 5, b < 2, 5 > b),
    "iadd": _iadd,
    "delattr": _delattr,
    "delitem": _delitem,
    "with": _with,
    "bool": bool,
    "bytes": bytes,  # a Box has no __bytes__: its items, as iter() gives them
    "getattr-default": lambda b: (getattr(b, "nosuch", 5), hasattr(b, "nosuch")),
}


@pytest.fixture(scope="module")
def dx() -> Iterator[dspex.Client]:
    yield from shared_pool("p:strict_queue", 1, "--no-dspy")


@pytest.fixture
def s(dx: dspex.Client) -> Iterator[dspex.Session]:
    with dx.session("p") as session:
        yield session


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_protocol_on_a_ref_gives_what_it_gives_in_process(s: dspex.Session, case: str) -> None:
    local = Box([1, 2, 3])
    expected = CASES[case](local)
    ref = s.put(Box([1, 2, 3]))
    assert isinstance(ref, dspex.Ref)
    assert CASES[case](ref) == expected
    assert s.run(lambda b: b.probes, ref) == local.probes  # the same lookups of missing attributes


class Num:
    """A user's number-like class (a score, a cost): the conversions and rounding it defines."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __float__(self) -> float:
        return self.value

    def __int__(self) -> int:
        return int(self.value)

    def __complex__(self) -> complex:
        return complex(self.value, 1)

    def __round__(self, ndigits: int | None = None) -> Any:
        return ("round", ndigits)

    def __trunc__(self) -> str:
        return "trunc"

    def __floor__(self) -> str:
        return "floor"

    def __ceil__(self) -> str:
        return "ceil"

    def __divmod__(self, other: int) -> tuple[float, float]:
        return divmod(self.value, other)

    def __rdivmod__(self, other: int) -> tuple[float, float]:
        return divmod(other, self.value)

    def __pow__(self, other: int, mod: int | None = None) -> Any:
        return ("pow", other, mod)

    def __bytes__(self) -> bytes:
        return str(self.value).encode()


NUMERIC: dict[str, Callable[[Any], Any]] = {
    "float": float,
    "int": int,
    "complex": complex,
    "bytes": bytes,
    "round": lambda n: (round(n), round(n, 2)),
    "math": lambda n: (math.trunc(n), math.floor(n), math.ceil(n)),
    "divmod": lambda n: (divmod(n, 2), divmod(7, n)),
    "pow": lambda n: (n**2, pow(n, 2, 5)),
    "sum-and-format": lambda n: (sum([float(n), 1.0]), f"{float(n):.2f}"),
}


@pytest.mark.parametrize("case", sorted(NUMERIC))
def test_a_number_likes_conversions_give_what_they_give_in_process(s: dspex.Session, case: str) -> None:
    expected = NUMERIC[case](Num(7.5))
    result = NUMERIC[case](s.put(Num(7.5)))
    assert result == expected and type(result) is type(expected)


class Bare:
    """A class with none of the protocols, which sees every lookup of a name it lacks."""

    def __init__(self) -> None:
        self.probes: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.__dict__.setdefault("probes", []).append(name)
        raise AttributeError(name)


def _with_bare(b: Any) -> None:
    with b:
        pass


def _setitem(b: Any) -> None:
    b[0] = 1


# each expression fails on an object without its protocol: the same error through a ref
LACKING: dict[str, Callable[[Any], Any]] = {
    "call": lambda b: b(1, k=2),
    "getitem": lambda b: b[0],
    "slice": lambda b: b[1:],
    "setitem": _setitem,
    "delitem": _delitem,
    "len": len,
    "in": lambda b: 1 in b,
    "iter": list,
    "next": next,
    "with": _with_bare,
    "add": lambda b: b + 1,
    "neg": lambda b: -b,
}


def _error(expression: Callable[[Any], Any], obj: Any) -> tuple[str, str]:
    """The builtin exception class ``expression(obj)`` raises (a RemoteError[TypeError] is a
    TypeError), and its message."""
    try:
        expression(obj)
    except Exception as exc:  # noqa: BLE001 - which one is what's compared
        return next(c.__name__ for c in type(exc).__mro__ if c.__module__ == "builtins"), str(exc)
    raise AssertionError("no exception")


@pytest.mark.parametrize("case", sorted(LACKING))
def test_a_protocol_the_object_lacks_raises_what_it_raises_in_process(s: dspex.Session, case: str) -> None:
    local = Bare()
    expected = _error(LACKING[case], local)
    ref = s.put(Bare())
    assert _error(LACKING[case], ref) == expected
    assert s.run(lambda b: b.probes, ref) == local.probes == []  # Python asks the class, never the object


def test_a_with_block_gives_the_exception_to_the_objects_exit(s: dspex.Session) -> None:
    box = s.put(Box([]))
    with pytest.raises(ValueError, match="body"), box:
        raise ValueError("body")
    with box:  # __exit__ answers True for a KeyError: suppressed, as in-process
        raise KeyError("swallowed")
    with pytest.raises(Unpicklable) as raised, box:  # its lock cannot travel: its type and message do
        raise Unpicklable("held")
    assert raised.value.__context__ is None  # the body's own exception, nothing of dspex's
    with s.put(AsyncOnly()) as entered:  # an async context manager: a blocking `with` enters it there
        assert entered.entered
    assert not entered.entered
    with pytest.raises(TypeError, match="does not support the context manager protocol"), s.put(Unpicklable):
        pass
    exits = s.run(lambda b: [(t.__name__, msg, tb) for t, msg, tb in b.exits], box)
    assert exits == [("ValueError", "body", None), ("KeyError", "'swallowed'", None), ("Unpicklable", "held", None)]
    assert box.entered == 0


def test_iterating_a_generator_ref_takes_batches_and_leaving_early_leaves_it_there(s: dspex.Session) -> None:
    box = s.put(Box([]))
    gen = box.gen(10**6)
    assert isinstance(gen, dspex.Ref) and gen.type_name == "generator"
    for x in gen:
        if x == 0:
            break
    # the first batch is one item: the generator stays where the loop left it, as in-process
    assert s.run(next, gen) == 1 and box.closed_gens == 0
    for x in gen:
        if x == 5:
            break
    assert s.run(next, gen) == 9  # later batches (1, 2, 4 items) take a few items ahead
    assert list(box.gen(3)) == [0, 1, 2]
    assert list(box.agen(3)) == [0, 1, 2]  # an async generator streams to a blocking `for` too
    with pytest.raises(TypeError, match="not iterable"):
        list(s.put(Unpicklable))  # a class without __iter__: iter() raises there, as here


def counted(n: int) -> Generator[int, None, str]:
    yield from range(n)
    return f"counted {n}"


def test_a_generator_ref_is_an_iterator_and_gives_its_return_value(s: dspex.Session) -> None:
    expected = ([0, 1, 2], "counted 3")
    assert drive(counted(3)) == drive(delegate(counted(3))) == expected
    assert drive(s.run(counted, 3)) == expected  # next(ref): one item each, then its StopIteration
    assert drive(delegate(s.run(counted, 3))) == expected  # yield from ref: batches, and the value
    gen = s.run(counted, 10**6)
    for x in gen:
        break  # the first batch is one item: next() goes on where the loop left the generator
    assert (x, next(gen), next(gen)) == (0, 1, 2)
    with pytest.raises(TypeError, match="'Box' object is not an iterator"):
        next(s.put(Box([1])))  # an iterable that is no iterator: next() raises there, as here
    with pytest.raises(TypeError, match="'async_generator' object is not an iterator"):
        next(s.put(Box([1])).agen(2))  # as next() of an async generator raises in-process


def _pairs(gen: Any) -> tuple[list[Any], Any]:
    """The pairs, and the value of the StopIteration a next() in the body met (an odd count)."""
    pairs = []
    try:
        for x in gen:
            pairs.append((x, next(gen)))
    except StopIteration as stop:
        return pairs, stop.value
    return pairs, None


def _nested(gen: Any) -> list[Any]:
    return [(a, b) for a in gen if a > 0 for b in gen]  # the outer loop's second batch is 2 items


def _zipped(gen: Any) -> list[Any]:
    return list(zip(gen, gen, strict=False))  # two loops side by side over one generator


@pytest.mark.parametrize("use", [_pairs, _nested, _zipped])
def test_next_and_a_loop_inside_a_loop_over_a_generator_ref_take_the_items_after_the_loops(
        s: dspex.Session, use: Callable[[Any], Any]) -> None:
    """What a loop's batch took ahead of it is the next item of ``next(gen)`` and of an inner loop."""
    for n in (10, 9):
        assert use(s.run(counted, n)) == use(counted(n))
    assert next(iter(s.put(Box([5])))) == 5


def test_a_loops_body_may_call_the_session_and_loops_may_nest(dx: dspex.Client, s: dspex.Session) -> None:
    """Each batch is a call of its own: the session is free between them (a stream would hold it
    until its end, and a call of the loop's body would wait for that until its timeout)."""
    def refs() -> int:  # what the worker holds, as its heartbeat reports it
        return sum(int(w["refs"]) for w in dx.status()["pools"]["p"]["workers"])

    many = s.put(Box(list(range(600))))
    other = s.put(Box(list(range(600, 1200))))
    wait_for(lambda: refs() == 2, 10, what="the two boxes held")
    assert sum(s.run(abs, -x) for x in many) == sum(range(600))
    assert len(list(zip(many, other))) == 600
    assert sum(1 for x in many if x < 2 for _ in other) == 1200
    for x in many:
        if x == 100:
            break  # the iterator is released when the loop's generator is collected
    wait_for(lambda: refs() == 2, 10, what="every iterator made for a loop released")


def test_listing_a_generator_ref_asks_no_length(s: dspex.Session, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = s.put(Box([])).gen(3)
    calls: list[Any] = []
    for op in ("call", "stream"):
        real = getattr(s, op)
        monkeypatch.setattr(s, op, lambda *args, real=real, **kwargs: calls.append(args[1]) or real(*args, **kwargs))
    assert list(gen) == [0, 1, 2]
    assert "len" not in calls  # list()'s length hint asked nothing: a generator has no len
    with pytest.raises(TypeError, match="'generator' has no len"):
        len(s.put(Box([])).gen(1))


def test_a_ref_captured_by_a_closure_is_not_probed(s: dspex.Session) -> None:
    box = s.put(Box([1]))

    def reads() -> list[int]:
        return box.items  # box is a closure variable: sent as the ref it is

    assert s.run(reads) == [1]
    assert s.run(lambda: box.probes) == []


def test_a_handles_method_given_to_a_call_is_the_objects_method_there(dx: dspex.Client, s: dspex.Session) -> None:
    box = s.put(Box([]))
    assert isinstance(box.push, RemoteMethod)
    assert s.run(box.push, 5) == 1  # as `fn = obj.push; fn(5)` in-process
    assert s.run(functools.partial(box.push, 6)) == 2
    assert dx.submit(s.run, box.push, 7).result(timeout=30) == 3
    assert box.items == [5, 6, 7]
    with dx.session("p") as other, pytest.raises(dspex.RefNotFound, match="belongs to session"):
        other.run(box.push, 8)

    async def main() -> list[int]:
        async with dspex.aio.connect(dx.endpoint, timeout=20) as adx:
            a = adx.session("p")
            abox = await a.put(Box([]))
            return list(await asyncio.gather(*(a.run(abox.push, i) for i in range(3))))

    assert sorted(asyncio.run(main())) == [1, 2, 3]


def test_without_a_session_protocols_are_type_errors(s: dspex.Session) -> None:
    ref = dspex.Ref(*s.put(Box([1])).as_tuple())  # a value only: no session to ask
    for attempt in (lambda: len(ref), lambda: 1 in ref, lambda: list(ref), lambda: -ref):
        with pytest.raises(TypeError, match="not bound to a session"):
            attempt()
    with pytest.raises(TypeError):
        _ = ref + [1]
    assert str(ref) == repr(ref) and bool(ref)


class Tally:
    """An object whose repr changes as it does."""

    def __init__(self) -> None:
        self.items: list[int] = []

    def push(self, x: int) -> Self:
        self.items.append(x)
        return self

    def __repr__(self) -> str:
        return f"Tally{self.items}"


def test_two_handles_of_one_object_are_equal_whatever_its_repr_became(s: dspex.Session) -> None:
    tally = s.put(Tally())
    again = tally.push(1)  # the same object, its repr now another
    assert again.repr != tally.repr and again.id == tally.id
    assert again == tally and hash(again) == hash(tally) and len({tally, again, tally.push(2)}) == 1
    assert tally != s.put(Tally())  # another object


class Counter:
    """An iterator of its own (``iter`` gives itself) whose repr tells where it is."""

    def __init__(self) -> None:
        self.n = 0

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> int:
        self.n += 1
        return self.n

    def __repr__(self) -> str:
        return f"Counter({self.n})"


def test_a_loop_over_an_iterator_of_its_own_leaves_its_ref_to_it(s: dspex.Session) -> None:
    """The loop releases the iterator it made, never the ref when ``iter(obj)`` is the object."""
    counter = s.put(Counter())
    assert next(counter) == 1  # its repr is now another than the ref's
    for x in counter:
        break
    assert (x, next(counter), s.run(next, counter)) == (2, 3, 4)


def test_the_handles_own_names_say_how_to_reach_the_objects(s: dspex.Session) -> None:
    box = s.put(Box([1]))
    with pytest.raises(AttributeError, match=re.escape("session.set_attr(ref, '__doc__', value)")):
        box.__doc__ = "a box"
    with pytest.raises(AttributeError, match=re.escape("session.set_attr(ref, 'id', value)")):
        box.id = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError, match=re.escape("session.run(delattr, ref, 'session')")):
        del box.session
    s.set_attr(box, "__doc__", "a box")
    assert s.attr(box, "__doc__") == "a box" and box.__doc__ == dspex.Ref.__doc__


def test_a_pickled_ref_is_its_value_and_binds_again_to_the_session(dx: dspex.Client, s: dspex.Session) -> None:
    """Pickling a ref pickles the handle, never the object or the live session: unpickled here it
    is a value (equal, and an argument of its session's calls), a handle again once bound."""
    box = s.put(Box([1, 2]))
    copied = pickle.loads(pickle.dumps(box))
    assert copied == box and hash(copied) == hash(box)
    with pytest.raises(TypeError, match=re.escape("ref.bind(session)")):
        len(copied)
    assert s.run(len, copied) == 2 and len(copied.bind(s)) == 2
    assert copy.copy(box) is box and copy.deepcopy({"b": box})["b"] is box  # the handle, bound as it was
    with dx.session("p") as other, pytest.raises(dspex.RefNotFound, match="only in the session that made it"):
        other.run(len, copied)


def test_a_pickled_method_of_a_ref_is_that_method_again_as_a_bound_method_pickles_in_process(
        dx: dspex.Client, s: dspex.Session) -> None:
    """In-process ``pickle.loads(pickle.dumps(obj.push))`` is a method again. A method handle
    unpickled on the client is the method of an unbound ref: a value that is the bound method
    in the session's calls, and says how to bind it when called here."""
    box = s.put(Box([1]))
    for copied in (pickle.loads(pickle.dumps(box.push)), pickle.loads(pickle.dumps(functools.partial(box.push, 7)))):
        assert s.run(lambda push: push(5) if not isinstance(push, functools.partial) else push(), copied) in (2, 3)
    unbound = pickle.loads(pickle.dumps(box.push))
    assert isinstance(unbound, RemoteMethod) and unbound.ref == box
    with pytest.raises(TypeError, match=re.escape("ref.bind(session)")):
        unbound(9)
    assert s.run(lambda b: b.items, box) == [1, 5, 7]


def test_a_ref_from_a_call_outside_any_session_says_its_object_was_not_kept(dx: dspex.Client) -> None:
    ref = dx.call("builtins", "object", pool="p")
    assert isinstance(ref, dspex.Ref)
    for attempt in (lambda: ref.anything, lambda: len(ref)):
        with pytest.raises((AttributeError, TypeError), match="outside any session"):
            attempt()


def test_after_its_session_closed_a_ref_says_so(dx: dspex.Client) -> None:
    s = dx.session("p")
    box = s.put(Box([1]))
    s.close()
    for attempt in (lambda: len(box), lambda: list(box), lambda: box + [1]):
        with pytest.raises(dspex.SessionClosed):
            attempt()
    assert str(box) == repr(box)  # printing a handle never fails for what became of its session
    with dx.session("p") as live:
        released = live.put(Box([1]))
        live.release(released)
        assert str(released) == repr(released)


def test_asyncio_refs_await_what_can_be_awaited_and_name_the_way_for_the_rest(dx: dspex.Client) -> None:
    async def main() -> None:
        async with dspex.aio.connect(dx.endpoint, timeout=20) as adx:
            s = adx.session("p")
            box = await s.put(Box([1, 2, 3]))
            assert [x async for x in await box.agen(3)] == [0, 1, 2]
            assert [x async for x in box] == [1, 2, 3]  # a plain iterable is iterated by `async for` too
            agen, gen = await box.agen(3), await s.run(counted, 2)
            assert await anext(agen) == 0  # stepped on the session's loop, which later calls share
            assert [x async for x in agen] == [1, 2]
            assert await anext(agen, "end") == "end"
            assert [await anext(gen), await anext(gen), await anext(gen, "end")] == [0, 1, "end"]
            with pytest.raises(StopAsyncIteration):
                await anext(gen)
            gen = await s.run(counted, 10)
            assert [(x, await anext(gen)) async for x in gen] == _pairs(counted(10))[0]
            with pytest.raises(TypeError, match="await anext"):
                next(gen)
            many = await s.put(Box(list(range(300))))
            assert sum([await s.run(abs, -x) async for x in many]) == sum(range(300))  # the body calls the session
            assert await (box < 5) and await (await (box + [4])).items == [1, 2, 3, 4]
            async with box as inner:
                assert await inner.entered == 1
            assert await box.entered == 0
            with pytest.raises(Unpicklable):
                async with box:
                    raise Unpicklable("held")
            async with await s.run(Plain) as plain:  # a plain context manager: `async with` enters it too
                assert await plain.entered
            assert await s.run(lambda b: b.exits[-1][1:], box) == ("held", None)
            assert str(box) == repr(box)  # str() cannot await: the handle's repr
            for attempt, hint in ((lambda: len(box), "session.run(len, ref)"), (lambda: 1 in box, "contains"),
                                  (lambda: iter(box), "async for"), (lambda: box.__enter__(), "async with")):
                with pytest.raises(TypeError, match=re.escape(hint)):
                    attempt()
            with pytest.raises(TypeError, match="in-place"):
                box += [1]
            num = await s.put(Num(7.5))
            assert (await round(num, 1), await divmod(num, 2)) == (("round", 1), (3.0, 1.5))  # awaitables, as operators
            with pytest.raises(TypeError, match=re.escape("await session.run(float, ref)")):
                float(num)  # Python takes no awaitable here
            with pytest.raises(TypeError, match="delattr"):
                del box.tag
            assert await s.run(len, box) == 3
            # a class the client does not have (made on the worker): its method is still one call
            made = (await s.exec("class Made:\n    def plus(self, x):\n        return x + 1\nmade = Made()"))["made"]
            assert await made.plus(1) == 2 and await (await made.plus)(2) == 3
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert hasattr(made, "anything")  # an attribute to await: nothing is sent, nothing left unawaited
                gc.collect()
            assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
            await s.close()

    asyncio.run(main())


class _Owner:
    """A session as a ref handle sees it, that records what it would send."""

    closed = False

    def __init__(self, awaitable: bool) -> None:
        self._ops_awaitable = awaitable
        self.sent: list[Any] = []

    def call(self, *args: Any) -> Any:
        self.sent.append(args)
        raise AssertionError("nothing is sent for a protocol of the other kind of session")


def test_a_protocol_of_the_other_kind_of_session_says_which_to_use_and_sends_nothing() -> None:
    from dspex.wire.ref import Ref

    blocking, asyncio_owner = _Owner(False), _Owner(True)
    on_blocking = Ref("id" * 16, "s", "p", "w", "builtins.list").bind(blocking)
    on_asyncio = Ref("id" * 16, "s", "p", "w", "builtins.list").bind(asyncio_owner)
    wrong: list[tuple[Callable[[], Any], str]] = [
        (lambda: on_blocking.__aiter__(), "a blocking session's ref is iterated with `for`"),
        (lambda: asyncio.run(on_blocking.__anext__()), "a blocking session's ref takes its next item with next()"),
        (lambda: on_blocking.__aenter__(), "a blocking session's ref is entered with `with`"),
        (lambda: iter(on_asyncio), "an asyncio session's ref is iterated with `async for`"),
        (lambda: next(on_asyncio), "next() on an asyncio session's ref cannot be awaited: use await anext(ref)"),
        (lambda: on_asyncio.__enter__(), "with on an asyncio session's ref cannot be awaited: use async with"),
    ]
    for attempt, message in wrong:
        with pytest.raises(TypeError) as raised:
            attempt()
        assert str(raised.value) == message
    assert blocking.sent == [] and asyncio_owner.sent == []


class Holder:
    """An object of the client's that holds a session and a ref of it (a DSPy program's module
    that calls out through a session, say)."""

    def __init__(self, session: Any, ref: dspex.Ref) -> None:
        self.session, self.ref, self.notes = session, ref, [1]


def test_a_copy_of_a_session_is_the_session_itself_in_every_client_kind(dx: dspex.Client) -> None:
    """``copy.copy``/``copy.deepcopy`` of a session (or of something holding one, and its refs) keep
    the one session: a copy that opened another would lose the first's objects; one that shared its
    state under another object would close it twice. The holder's own data is copied."""
    with dx.session("p") as s:
        box = s.put(Box([1, 2]))
        assert copy.copy(s) is s and copy.deepcopy(s) is s
        holder = Holder(s, box)
        twin = copy.deepcopy(holder)
        assert twin.session is s and twin.ref is box and twin.notes == holder.notes and twin.notes is not holder.notes
        assert len(twin.ref) == 2 and twin.session.run(len, twin.ref) == 2  # still bound, still live
        copy.copy(s).close()
        assert s.closed
        with pytest.raises(dspex.SessionClosed):
            twin.session.run(len, box)

    async def asynchronously() -> None:
        async with dspex.aio.connect(dx.endpoint, timeout=20) as adx:
            a = adx.session("p")
            aref = await a.put(Box([3]))
            assert copy.copy(a) is a and copy.deepcopy({"a": a, "r": aref}) == {"a": a, "r": aref}
            assert copy.deepcopy([a])[0] is a and copy.deepcopy(aref) is aref
            assert await a.run(len, copy.deepcopy(aref)) == 1
            await a.close()

    asyncio.run(asynchronously())
