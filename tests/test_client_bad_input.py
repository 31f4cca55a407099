"""A user who passes the wrong things to the public API, with both client kinds: each mistake is a
typed error at once (no wait for a timeout, no internal traceback) whose message says the cause
and the fix, and nothing else is lost: the same session's next call, its refs and the client's
sockets still serve."""

from __future__ import annotations

import _thread
import asyncio
import dataclasses
import hashlib
import math
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

import dspex
import dspex.aio
from dspex.wire.headers import RequestHeader, unpack_reply_header
from tests.harness import shared_pool

pytestmark = pytest.mark.timeout(120)

NOT_A_DEADLINE: list[Any] = ["x", True, 0, -1, math.nan, math.inf, -math.inf, 1e300]


@pytest.fixture(scope="module")
def dx() -> Iterator[dspex.Client]:
    yield from shared_pool("p:strict_queue", 1, "--no-dspy")


def ident(x: Any) -> Any:
    return x


def chatty(n: int) -> int:
    for i in range(n):
        print("line", i)
    return n


def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def numbers() -> Iterator[int]:
    yield from range(3)


class RaisingReduce:
    def __reduce__(self) -> Any:
        raise RuntimeError("no reduce here")


class GarbageReduce:
    def __reduce__(self) -> Any:
        return 42


class RaisingGetstate:
    def __getstate__(self) -> Any:
        raise ValueError("no state here")


def nested(depth: int) -> list[Any]:
    top: list[Any] = []
    inner = top
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return top


def test_a_pool_or_session_id_that_is_not_a_str_is_refused_at_once(dx: dspex.Client) -> None:
    s = dx.session("p")
    assert s.run(ident, 1) == 1
    sockets = dx.open_sockets
    started = time.monotonic()
    for bad in (123, None, "", ["p"], "p" * 300):
        with pytest.raises(dspex.BadArgument, match="pool"):
            dx.session(bad)  # type: ignore[arg-type]
    for bad_id in (42, b"id", "x" * 300):
        with pytest.raises(dspex.BadArgument, match="session id"):
            dx.session("p", bad_id)  # type: ignore[arg-type]
    for call in (lambda: dx.call("builtins", "len", ([],), pool=123),  # type: ignore[arg-type]
                 lambda: dx.close_session(123)):  # type: ignore[arg-type]
        with pytest.raises(dspex.BadArgument, match="is a str"):
            call()
    with pytest.raises(dspex.BadArgument, match="at most 256 bytes"):
        dx.close_session("x" * 300)
    with dspex.connect(endpoints={"p": dx.endpoint}, timeout=20) as routed:  # a client of several brokers
        for bad in (["p"], "p" * 300):
            with pytest.raises(dspex.BadArgument, match="pool"):
                routed.session(bad)  # type: ignore[arg-type]
        assert routed.session("p").run(ident, 1) == 1
    assert time.monotonic() - started < 5  # not one waited out the client's timeout
    assert s.run(ident, 2) == 2 and dx.open_sockets == sockets

    async def main() -> None:
        adx = dspex.aio.connect(dx.endpoint, timeout=20)
        async with adx:
            with pytest.raises(dspex.BadArgument, match="pool is a str"):
                adx.session(123)  # type: ignore[arg-type]
            with pytest.raises(dspex.BadArgument, match="is a str"):
                await adx.call("builtins", "len", ([],), pool=123)  # type: ignore[arg-type]
            assert await adx.session("p").run(ident, 3) == 3

    asyncio.run(main())


def test_a_timeout_that_is_no_deadline_is_refused_before_anything_is_sent(dx: dspex.Client) -> None:
    s = dx.session("p")
    ref = s.put([1, 2])
    sockets = dx.open_sockets
    for bad in NOT_A_DEADLINE:
        with pytest.raises(dspex.BadArgument, match="timeout"):
            s.apply(ident, (1,), timeout=bad)
        with pytest.raises(dspex.BadArgument, match="timeout"):
            dx.status(timeout=bad)
        with pytest.raises(dspex.BadArgument, match="timeout"):
            dspex.connect(dx.endpoint, timeout=bad)
    with pytest.raises(TypeError):  # a BadArgument is a UsageError, and a TypeError and ValueError as Python's own
        s.apply(ident, (1,), timeout="x")
    with pytest.raises(ValueError):
        s.apply(ident, (1,), timeout=-1)
    assert s.apply(len, (ref,), timeout=5) == 2 and dx.open_sockets == sockets

    async def main() -> None:
        adx = dspex.aio.connect(dx.endpoint, timeout=20)
        async with adx:
            a = adx.session("p")
            for bad in NOT_A_DEADLINE:
                with pytest.raises(dspex.BadArgument, match="timeout"):
                    await a.apply(ident, (1,), timeout=bad)
            assert await a.run(ident, 4) == 4

    asyncio.run(main())


def test_args_that_are_not_a_list_of_arguments_say_how_to_pass_one(dx: dspex.Client) -> None:
    s = dx.session("p")
    ref = s.put([1, 2])
    for bad in (5, "abc", b"ab", {"x": 1}):
        with pytest.raises(dspex.BadArgument, match=r"args=\(x,\)"):
            s.apply(ident, bad)
        with pytest.raises(dspex.BadArgument, match=r"args=\(x,\)"):
            s.call("builtins", "len", bad)
        with pytest.raises(dspex.BadArgument, match=r"args=\(x,\)"):
            s.method(ref, "count", bad)
    assert s.apply(ident, ("abc",)) == "abc" and s.call("builtins", "len", [ref]) == 2


def test_kwargs_that_are_not_a_mapping_of_names_are_refused_as_in_process(dx: dspex.Client) -> None:
    """``fn(**[1])`` and ``fn(**{1: 2})`` are TypeErrors in-process: so are ``kwargs=[1]`` and
    ``kwargs={1: 2}`` (BadArgument, before anything is sent), with every op and client kind; any
    mapping of names works as ``**`` takes it."""
    s = dx.session("p")
    ref = s.put([1, 2])
    ops = [lambda bad: s.apply(ident, (), bad), lambda bad: s.call("builtins", "dict", (), bad),
           lambda bad: s.method(ref, "count", (1,), bad), lambda bad: list(s.stream_apply(iter, ([],), bad)),
           lambda bad: dx.call("builtins", "dict", (), bad, pool="p")]
    for bad in ([1], (("x", 1),), "x", 5, {1: 2}):
        for op in ops:
            with pytest.raises(dspex.BadArgument, match="kwargs") as caught:
                op(bad)
            assert isinstance(caught.value, TypeError)
    assert s.apply(dict, (), types.MappingProxyType({"x": 1})) == {"x": 1}

    async def main() -> None:
        async with dspex.aio.connect(dx.endpoint) as a:
            with pytest.raises(dspex.BadArgument, match="kwargs"):
                await a.session("p").apply(ident, (), [1])  # type: ignore[arg-type]

    asyncio.run(main())


def test_a_callback_that_is_not_callable_is_refused_before_the_call_runs(dx: dspex.Client,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    s = dx.session("p")
    for option in ("on_output", "on_progress"):
        with pytest.raises(dspex.BadArgument, match=f"{option}= is a function"):
            s.apply(chatty, (2,), **{option: 5})
        with pytest.raises(dspex.BadArgument, match=f"{option}= is a function"):
            s.stream_apply(numbers, **{option: "print"})
    assert "line" not in capsys.readouterr().out  # nothing ran
    events: list[Any] = []
    assert s.apply(chatty, (2,), on_output=events.append) == 2 and len(events) == 2


def test_an_option_a_call_does_not_take_is_refused_by_name_before_anything_is_sent(
        dx: dspex.Client, capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt option, or one of the request's own (``sender``, ``flags``, ``worker``...), is
    a BadArgument (a TypeError, as Python's unexpected keyword argument) naming it, with every op
    and client kind; nothing runs and the session serves on."""
    s = dx.session("p")
    ref = s.put([1, 2])
    ops = [lambda **bad: s.apply(chatty, (2,), **bad), lambda **bad: s.put(1, **bad),
           lambda **bad: s.method(ref, "count", (1,), **bad), lambda **bad: s.release(ref, **bad),
           lambda **bad: s.stream_apply(numbers, **bad), lambda **bad: dx.call("builtins", "len", ([],), pool="p", **bad)]
    for bad in ({"timout": 5}, {"sender": None}, {"flags": 1}, {"worker": "w" * 32}, {"items": True}):
        for op in ops:
            with pytest.raises(dspex.BadArgument, match=f"unexpected keyword argument {next(iter(bad))}") as caught:
                op(**bad)
            assert isinstance(caught.value, TypeError)
    assert "line" not in capsys.readouterr().out  # nothing ran
    assert s.apply(len, (ref,), timeout=5) == 2

    async def main() -> None:
        async with dspex.aio.connect(dx.endpoint) as a:
            with pytest.raises(dspex.BadArgument, match="unexpected keyword argument timout"):
                await a.session("p").apply(ident, (1,), timout=5)  # type: ignore[call-arg]

    asyncio.run(main())


def test_a_wrong_endpoint_is_a_config_error(dx: dspex.Client) -> None:
    for endpoint in (123, b"ipc:///x"):
        with pytest.raises(dspex.ConfigError, match="an endpoint is a str"):
            dspex.connect(endpoint)  # type: ignore[arg-type]
    with pytest.raises(dspex.ConfigError, match="an endpoint is a str"):
        dspex.connect(endpoints={"p": 5})  # type: ignore[dict-item]
    with pytest.raises(dspex.ConfigError, match="is a map of pool names"):
        dspex.connect(endpoints=5)  # type: ignore[arg-type]
    with pytest.raises(dspex.ConfigError, match="not a pool name"):
        dspex.connect(endpoints={5: dx.endpoint})  # type: ignore[dict-item]
    with pytest.raises(dspex.ConfigError, match="an endpoint is a str"):
        dspex.aio.connect(123)  # type: ignore[arg-type]


def test_define_without_a_usable_name_says_so(dx: dspex.Client) -> None:
    s = dx.session("p")
    with pytest.raises(dspex.BadArgument, match="has no __name__; pass name="):
        s.define(5)
    for name in (123, "not a name", ""):
        with pytest.raises(dspex.BadArgument, match="name is a Python identifier"):
            s.define(ident, name)  # type: ignore[arg-type]
    s.define(5, "five")
    assert s.eval("five + 1") == 6


def test_an_argument_that_cannot_be_copied_says_to_make_it_on_the_worker(dx: dspex.Client) -> None:
    s = dx.session("p")
    ref = s.put({"kept": True})
    sockets = dx.open_sockets
    unsendable = [numbers(), threading.Lock(), sys._getframe(), hashlib.sha256(), RaisingReduce(), GarbageReduce(),
                  RaisingGetstate()]
    for obj in unsendable:
        with pytest.raises(dspex.EncodeError, match="make it there instead") as info:
            s.put(obj)
        assert type(obj).__name__ in str(info.value)
        with pytest.raises(dspex.EncodeError, match="make it there instead"):
            s.run(ident, obj)
    deep = nested(100_000)
    with pytest.raises(dspex.EncodeError, match="make it there instead") as info:
        s.put(deep)
    assert len(str(info.value)) < 600  # the path of a deep structure is cut short in the message...
    assert info.value.details["path"].count("[0]") > 100  # ...not in its details
    assert s.eval("x['kept']", {"x": ref}) is True and dx.open_sockets == sockets


def test_a_request_over_the_message_limit_names_the_limit_and_the_fix(dx: dspex.Client,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_MAX_MESSAGE", str(1 << 20))
    with dspex.connect(dx.endpoint, timeout=20) as small:
        s = small.session("p")
        with pytest.raises(dspex.MessageTooLarge, match="DSPEX_MAX_MESSAGE.*nothing was sent.*ref"):
            s.put(b"x" * (2 << 20))
        assert s.run(ident, 5) == 5 and small.open_sockets == 1


def test_a_closed_session_and_its_refs_say_how_to_go_on(dx: dspex.Client) -> None:
    s, other = dx.session("p"), dx.session("p")
    ref, kept = s.put([1]), other.put([2])
    s.close()
    for use in (lambda: s.run(ident, 1), lambda: ref.copy(), lambda: s.stream_apply(numbers)):
        with pytest.raises(dspex.SessionClosed, match="closed, and its refs with it.*opens a new one"):
            use()
    assert other.run(len, kept) == 1

    async def main() -> None:
        adx = dspex.aio.connect(dx.endpoint, timeout=20)
        async with adx:
            a = adx.session("p")
            aref = await a.put([1])
            await a.close()
            for use in (lambda: a.run(ident, 1), lambda: aref.copy()):
                with pytest.raises(dspex.SessionClosed, match="opens a new one"):
                    await use()

    asyncio.run(main())
    with dspex.connect(dx.endpoint, timeout=20) as closed:
        s = closed.session("p")
        assert s.run(ident, 1) == 1
    for use in (lambda: s.run(ident, 2), lambda: closed.session("p"), lambda: closed.status(),
                lambda: closed.submit(ident, 1)):
        with pytest.raises(dspex.UsageError, match="client is closed.*dspex.connect") as info:
            use()
        assert not isinstance(info.value, (dspex.DidNotRun, dspex.MayHaveRun))  # a retry loop must not spin on it
    s.close()  # a closed client's session closes quietly (the broker's idle TTL releases it)

    async def closed_async() -> None:
        adx = dspex.aio.connect(dx.endpoint, timeout=20)
        a = adx.session("p")
        assert await a.run(ident, 1) == 1
        await adx.close()
        for use in (lambda: a.run(ident, 2), lambda: adx.status()):
            with pytest.raises(dspex.UsageError, match="client is closed.*dspex.aio.connect"):
                await use()
        with pytest.raises(dspex.UsageError, match="client is closed"):
            adx.session("p")
        await a.close()

    asyncio.run(closed_async())


def test_a_stream_used_on_another_thread_is_a_usage_error_and_stays_usable(dx: dspex.Client) -> None:
    s = dx.session("p")
    stream = s.stream_apply(numbers)
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            next(stream)
        except BaseException as exc:  # noqa: BLE001 - what the other thread got is the subject
            errors.append(exc)

    other = threading.Thread(target=consume)
    other.start()
    other.join(10)
    assert len(errors) == 1 and isinstance(errors[0], dspex.UsageError), errors
    assert "thread that started it" in str(errors[0])
    assert list(stream) == [0, 1, 2] and list(stream) == []  # a second iteration ends at once, as a generator's
    assert s.run(ident, 6) == 6


def test_ctrl_c_while_the_sync_client_waits_leaves_the_session_and_sockets_as_they_were(dx: dspex.Client) -> None:
    s = dx.session("p")
    ref = s.put([1, 2, 3])
    sockets = dx.open_sockets
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            s.run(slow, 60)
    finally:
        timer.cancel()
    started = time.monotonic()
    assert s.run(len, ref) == 3 and dx.open_sockets == sockets
    assert time.monotonic() - started < 30  # the interrupted call was stopped on the (one) worker


def test_refs_of_another_session_or_client_kind_are_refused_by_name(dx: dspex.Client) -> None:
    s = dx.session("p")

    async def main() -> None:
        adx = dspex.aio.connect(dx.endpoint, timeout=20)
        async with adx:
            a = adx.session("p")
            theirs = await a.put([1])
            with pytest.raises(dspex.RefNotFound, match=f"belongs to session {a.id[:8]}.*only in the session that made"):
                s.run(len, theirs)
            mine = s.put([1, 2])
            with pytest.raises(dspex.RefNotFound, match=f"belongs to session {s.id[:8]}"):
                await a.run(len, mine)
            assert await a.run(len, theirs) == 1

    asyncio.run(main())
    assert s.run(ident, 7) == 7


def test_an_asyncio_call_cancelled_at_any_point_leaves_its_session_serving(dx: dspex.Client) -> None:
    async def main() -> None:
        adx = dspex.aio.connect(dx.endpoint, timeout=20)
        async with adx:
            a = adx.session("p")
            ref = await a.put([1, 2])
            for n, delay in enumerate((0, 0.001, 0.005, 0.02, 0.1, 0.3)):
                call = asyncio.ensure_future(a.run(slow, 0.5))
                stream = a.stream_apply(numbers)
                item = asyncio.ensure_future(anext(stream))
                await asyncio.sleep(delay)
                call.cancel()
                item.cancel()
                for task in (call, item):
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass
                await stream.aclose()
                assert await a.run(ident, n) == n and await a.run(len, ref) == 2
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    asyncio.run(main())


def test_an_async_stream_read_by_two_tasks_at_once_refuses_the_second(dx: dspex.Client) -> None:
    async def main() -> None:
        adx = dspex.aio.connect(dx.endpoint, timeout=20)
        async with adx:
            a = adx.session("p")
            stream = a.stream_apply(numbers)
            first = asyncio.ensure_future(anext(stream))
            await asyncio.sleep(0)  # the first task awaits its item
            with pytest.raises(dspex.UsageError, match="one task at a time.*asyncio.Queue"):
                await anext(stream)
            with pytest.raises(dspex.UsageError, match="one task at a time.*cancel that task"):
                await stream.aclose()
            assert await first == 0  # the reader lost nothing
            assert [x async for x in stream] == [1, 2]
            together = a.stream_apply(numbers)

            async def drain() -> list[int]:
                return [x async for x in together]

            results = await asyncio.wait_for(asyncio.gather(drain(), drain(), return_exceptions=True), 10)
            assert sorted(map(type, results), key=str) == [dspex.UsageError, list], results
            assert await a.run(ident, 8) == 8

    asyncio.run(main())


def test_ids_whose_utf8_is_over_the_header_limit_are_refused_before_anything_is_sent(dx: dspex.Client) -> None:
    """Multi-byte characters: 256 of them are over the broker's request header limit, which a
    client learns at once, not by waiting out its timeout."""
    with dspex.connect(dx.endpoint, timeout=5) as short:
        started = time.monotonic()
        for name in ("\U0001F600" * 256, "é" * 200):
            with pytest.raises(dspex.BadArgument, match="at most 256 bytes"):
                short.session("p", name).run(ident, 1)
            with pytest.raises(dspex.BadArgument, match="at most 256 bytes"):
                short.session(name)
        assert time.monotonic() - started < 2
        assert short.session("p", "é" * 128).run(ident, 1) == 1  # 256 bytes: the most there is


def test_a_request_header_the_broker_cannot_read_is_answered_with_its_request_id(dx: dspex.Client) -> None:
    """A peer that skips the client's checks (another client library, an older dspex) gets a typed
    error for its request, not silence."""
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(dx.endpoint)
    try:
        for req_id, header, why in (
                (7, RequestHeader("eval", 7, "p", "\U0001F600" * 256).pack(), "over the limit of 1024"),
                (8, RequestHeader("eval", 8, "p", "é" * 200).pack(), "at most 256 bytes"),
                (9, msgpack.packb(["eval", 9, "p"]), "malformed request header")):
            raw.send_multipart([header, msgpack.packb(["1", None])])
            assert raw.poll(5000), f"no answer to request {req_id}"
            reply = raw.recv_multipart()
            status, rid, _, _ = unpack_reply_header(reply[0])
            error = msgpack.unpackb(reply[1])
            assert (status, rid, error["code"]) == ("err", req_id, "protocol_error"), (status, rid, error)
            assert why in error["message"] and "nothing ran" in error["message"], error
    finally:
        raw.close()
    assert dx.session("p").run(ident, 3) == 3


@dataclasses.dataclass
class LoadsNowhere:
    """Returned by value (a dataclass), and refuses to load where it arrives."""

    x: int

    def __setstate__(self, state: Any) -> None:
        raise ValueError("this object refuses to load")


def make_unloadable(n: int) -> LoadsNowhere:
    return LoadsNowhere(n)


def test_a_result_that_cannot_be_decoded_says_the_call_ran_and_which_type_failed(dx: dspex.Client) -> None:
    s = dx.session("p")
    with pytest.raises(dspex.MayHaveRun, match="LoadsNowhere.*ValueError: this object refuses to load") as info:
        s.run(make_unloadable, 1)
    assert not isinstance(info.value, dspex.UsageError)  # the call ran: not a request to fix and resend as is
    assert info.value.details["type"].endswith("LoadsNowhere")
    with pytest.raises(dspex.MayHaveRun, match="LoadsNowhere"):
        list(s.stream_apply(lambda: iter([make_unloadable(2)])))
    assert s.run(ident, 4) == 4


def test_a_session_or_client_passed_to_a_call_says_what_it_is(dx: dspex.Client) -> None:
    s, other = dx.session("p"), dx.session("p")
    for obj, what in ((other, f"dspex.Session {other.id[:8]}"), (dx, "dspex client"),
                      ([1, {"s": other}], f"dspex.Session {other.id[:8]}")):
        with pytest.raises(dspex.EncodeError, match=f"{what}.*cannot be sent to a worker") as info:
            s.run(ident, obj)
        message = str(info.value)
        assert "cannot send dx" not in message and "make it there instead" not in message, message
        assert "pass the call the data or refs it needs" in message, message

    async def main() -> None:
        adx = dspex.aio.connect(dx.endpoint, timeout=20)
        async with adx:
            a = adx.session("p")
            with pytest.raises(dspex.EncodeError, match="dspex.aio.AsyncSession.*cannot be sent to a worker"):
                await a.run(ident, a)

    asyncio.run(main())
    assert s.run(ident, 5) == 5


def test_a_function_where_a_name_belongs_is_refused_at_once_and_says_what_takes_a_function(
        dx: dspex.Client) -> None:
    s = dx.session("p")
    ref = s.put([3, 1, 2])
    started = time.monotonic()
    # each op whose argument is a module, method or attribute name or source text, given a function
    for misuse in (lambda: s.stream(numbers, "x"), lambda: s.call(numbers, "x"), lambda: s.call("builtins", len),
                   lambda: s.stream_method(ref, numbers), lambda: s.method(ref, numbers), lambda: s.attr(ref, len),
                   lambda: s.set_attr(ref, len, 1), lambda: s.eval(numbers), lambda: s.stream_eval(numbers),
                   lambda: s.exec(numbers), lambda: dx.call(numbers, "x", pool="p")):
        with pytest.raises(dspex.BadArgument, match=r"is a str, got \w*function.*s\.run\(fn.*s\.stream_apply\(fn"):
            misuse()  # (a stream is refused when made, not at its first item)
    with pytest.raises(dspex.BadArgument, match="is a str, got int") as err:
        s.call("builtins", 5)
    assert "s.run" not in str(err.value)  # the hint is for a function only
    assert time.monotonic() - started < 5
    assert s.run(ident, 1) == 1 and list(s.stream_apply(numbers)) == [0, 1, 2]

    async def main() -> None:
        async with dspex.aio.connect(dx.endpoint, timeout=20) as adx:
            a = adx.session("p")
            with pytest.raises(dspex.BadArgument, match=r"got function.*s\.stream_apply\(fn"):
                a.stream(numbers, "x")
            with pytest.raises(dspex.BadArgument, match=r"got function.*s\.run\(fn"):
                await a.call(numbers, "x")
            assert [x async for x in a.stream_apply(numbers)] == [0, 1, 2]

    asyncio.run(main())
