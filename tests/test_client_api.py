"""The user API on real processes: code and objects by value, refs as handles, typed remote
errors, output events, and the asyncio twin."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import subprocess
import sys
import threading
from typing import Any

import pydantic
import pytest

import dspex
from tests.harness import Stack

pytestmark = pytest.mark.timeout(120)


class Ticket(pydantic.BaseModel):
    title: str
    priority: int = 1


@dataclasses.dataclass
class Score:
    value: float
    note: str = ""


class Counter:
    """A client-defined class: instances travel by value, then live on the worker."""

    def __init__(self, start: int = 0) -> None:
        self.value = start
        self.items: dict[str, int] = {}

    def incr(self, by: int = 1) -> int:
        self.value += by
        return self.value

    def __call__(self, x: int) -> int:
        return self.value * x

    def shifted(this, self: int) -> int:  # a keyword named like the handle's own first parameter
        return this.value + self

    def __getitem__(self, key: str) -> int:
        return self.items[key]

    def __setitem__(self, key: str, value: int) -> None:
        self.items[key] = value


class QuotaError(ValueError):
    """A custom exception whose __init__ takes more than a message, with an attribute."""

    def __init__(self, used: int, limit: int) -> None:
        super().__init__(f"used {used} of {limit}")
        self.used = used


def triage(ticket: Ticket, weight: float = 1.0) -> Score:
    """A client function using client classes: all of it runs on the worker."""
    return Score(ticket.priority * weight, note=f"pid {os.getpid()}")


def source_of(fn: Any) -> str:
    return inspect.getsource(fn)


def test_run_sends_code_by_value_and_returns_data(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    with dx.session("p") as s:
        score = s.run(triage, Ticket(title="t", priority=3), weight=2.0)
        assert score == Score(6.0, note=score.note) and score.note != f"pid {os.getpid()}"
        assert s.run(lambda xs: sorted(xs, key=lambda t: -t.priority), [Ticket(title="a"), Ticket(title="b", priority=5)]) \
            == [Ticket(title="b", priority=5), Ticket(title="a")]
        threshold = 10
        assert s.run(lambda: [n for n in range(20) if n > threshold]) == list(range(11, 20))  # closures travel
        # the source travels with by-value code: inspect.getsource works on the worker
        assert "A client function using client classes" in s.run(source_of, triage)


def apply_to(fn: Any, items: list[int], self: int = 0) -> list[int]:
    return [fn(x) + self for x in items]


def test_any_keyword_argument_reaches_the_function(stack: Stack) -> None:
    """``fn(fn=..., self=...)`` in-process: the same keywords through ``s.run``, ``dx.submit`` and a
    handle's call are the function's, never the API's own parameters."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    expected = apply_to(fn=abs, items=[-1, 2], self=1)
    with dx.session("p") as s:
        assert s.run(apply_to, fn=abs, items=[-1, 2], self=1) == expected
        assert dx.submit(apply_to, fn=abs, items=[-1, 2], self=1).result(timeout=30) == expected
        assert dx.submit(s.run, apply_to, fn=abs, items=[-1, 2], self=1).result(timeout=30) == expected
        handle = s.put(apply_to)
        assert handle(fn=abs, items=[-1, 2], self=1) == expected
        counter = s.put(Counter(5))
        assert counter.shifted(self=2) == 7  # a method of a handle: its keywords too


def test_put_gives_a_handle_that_reads_like_the_object(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    with dx.session("p") as s:
        counter = s.put(Counter(5))
        assert isinstance(counter, dspex.Ref) and counter.type_name.endswith("Counter")
        assert counter.incr(2) == 7  # a method of a class known here: one `method` round trip
        assert counter.value == 7  # getattr
        counter.value = 10  # setattr
        assert counter(3) == 30  # __call__
        counter["a"] = 1  # __setitem__
        assert counter["a"] == 1 and s.attr(counter, "items") == {"a": 1}
        assert s.method(counter, "incr", [1]) == 11  # the explicit API still works on the same ref
        assert counter == dspex.Ref(*counter.as_tuple()) and hash(counter) == hash(dspex.Ref(*counter.as_tuple()))
        # an attribute that is a method of a class the client does not know: getattr, then call
        upper = s.eval("'abc'.upper")
        assert isinstance(upper, dspex.Ref) and upper() == "ABC"
        with pytest.raises(KeyError):  # iterated on the worker as Python does (one stream, not a loop of
            list(counter)  # round trips): Counter's sequence protocol raises its __getitem__(0)'s KeyError
        with pytest.raises(AttributeError):
            _ = dspex.Ref(*counter.as_tuple()).value  # a ref without a session is only a value


def test_a_method_of_a_class_from_the_users_script_is_one_round_trip(stack: Stack,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # a class defined in the script being run (module __main__) travels by value and its refs
    # are named by the bare qualname: its methods are still known here, so no getattr first
    scope: dict[str, Any] = {"__name__": "__main__"}
    exec("class Scripted:\n"  # noqa: S102 - a class defined by a script
         "    def __init__(self):\n        self.n = 0\n"
         "    def bump(self, k):\n        self.n += k\n        return self.n\n", scope)
    monkeypatch.setattr(sys.modules["__main__"], "Scripted", scope["Scripted"], raising=False)
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    with dx.session("p") as s:
        obj = s.put(scope["Scripted"]())
        assert obj.type_name == "Scripted"
        assert isinstance(obj.bump, dspex.wire.ref.RemoteMethod)  # known as a method: no round trip yet
        assert obj.bump(2) == 2 and obj.bump(3) == 5
        assert obj.n == 5  # a data attribute is still a getattr


def test_define_binds_client_code_for_eval_and_exec(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    with dx.session("p") as s:
        s.define(triage)
        s.define(Ticket)
        s.define(4, name="factor")
        assert s.eval("triage(Ticket(title='x', priority=factor)).value") == 4.0
        with pytest.raises(TypeError, match="name="):
            s.define(object())


def test_unpicklable_argument_is_an_encode_error_naming_it_and_nothing_is_sent(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    with dx.session("p") as s:
        with pytest.raises(dspex.EncodeError) as info:
            s.run(triage, Ticket(title="t"), weight=threading.Lock())
        assert info.value.details["path"] == "kwargs['weight']"
        with pytest.raises(dspex.EncodeError) as info:
            s.call("builtins", "len", [[1, {"reward_fn": threading.Lock()}]])
        assert info.value.details["path"] == "args[0][1]['reward_fn']"
        assert s.run(len, [1, 2]) == 2


def test_remote_errors_are_instances_of_the_original_type(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    with dx.session("p") as s:
        with pytest.raises(ZeroDivisionError) as zero:
            s.run(lambda: 1 / 0)
        assert isinstance(zero.value, dspex.RemoteError) and "ZeroDivisionError" in zero.value.remote_traceback

        def over_quota() -> None:
            raise QuotaError(7, 5)

        with pytest.raises(QuotaError) as quota:
            s.run(over_quota)
        assert quota.value.used == 7 and str(quota.value) == "used 7 of 5"
        assert s.run(lambda: "still serving") == "still serving"


def test_output_and_progress_reach_callbacks_of_any_op(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    with dx.session("p") as s:
        out: list[dict[str, Any]] = []

        def chatty(n: int) -> int:
            print(f"step {n}")
            return n

        assert s.apply(chatty, [3], on_output=out.append) == 3
        assert {"stream": "stdout", "text": "step 3\n"} in out or "step 3" in "".join(e["text"] for e in out)
        out.clear()
        s.exec("print('from exec')", on_output=out.append)
        assert "from exec" in "".join(e["text"] for e in out)
        progress: list[Any] = []
        s.eval("__import__('dspex.progress').progress.report({'step': 1})", on_progress=progress.append)
        assert progress == [{"step": 1}]


def test_import_dspex_then_aio_connect_in_a_fresh_interpreter(stack: Stack) -> None:
    stack.pool("p:strict_queue", 1, "--no-dspy")
    code = ("import asyncio, dspex\n"
            "async def main():\n"
            f"    async with dspex.aio.connect({stack.frontend!r}, timeout=20) as dx:\n"
            "        s = dx.session('p')\n"
            "        print(await s.run(sum, [1, 2, 3]))\n"
            "asyncio.run(main())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DSPEX_RUN_DIR": os.path.dirname(stack.frontend[len("ipc://"):])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "6"


def test_async_session_run_put_and_awaitable_handles(stack: Stack) -> None:
    stack.pool("p:strict_queue", 1, "--no-dspy")

    async def main() -> None:
        async with dspex.aio.connect(stack.frontend, timeout=20) as dx:
            s = dx.session("p")
            assert await s.run(triage, Ticket(title="a", priority=2)) == Score(2.0, note=(await s.run(
                lambda: f"pid {os.getpid()}")))
            counter = await s.put(Counter(1))
            assert await counter.incr(4) == 5
            assert await counter.value == 5
            assert await counter(2) == 10
            with pytest.raises(TypeError, match="set_attr"):
                counter.value = 3
            await s.set_attr(counter, "value", 3)
            assert await counter.value == 3
            with pytest.raises(ZeroDivisionError):
                await s.run(lambda: 1 / 0)
            out: list[dict[str, Any]] = []
            await s.apply(print, ["hello"], on_output=out.append)
            assert "hello" in "".join(e["text"] for e in out)
            await s.close()

    asyncio.run(main())


def test_stream_apply_streams_any_iterable_a_client_function_returns(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    with dx.session("p") as s:
        assert list(s.stream_apply(lambda n: (Ticket(title=str(i)) for i in range(n)), [3])) == [
            Ticket(title="0"), Ticket(title="1"), Ticket(title="2")]
        assert list(s.stream_apply(lambda: map(abs, [-1, -2]))) == [1, 2]
        with pytest.raises(TypeError, match="not iterable"):
            list(s.stream_apply(lambda: 42))


def test_import_dspex_loads_the_client_on_first_use_of_a_name() -> None:
    """The broker, the workers and dspexctl run dspex/__init__.py for dspex.wire and dspex.stack:
    it must not cost them the client stack. Every public name still resolves, by attribute and by
    ``from dspex import``, to the object its module defines."""
    script = (
        "import sys, dspex\n"
        "early = [m for m in sys.modules if m.startswith('dspex.client') or m == 'numpy']\n"
        "assert not early, early\n"
        "assert dspex.WorkerCrashed.__module__ == 'dspex.wire.errors'\n"
        "from dspex import Client, aio\n"
        "import dspex.client.sync, dspex.aio\n"
        "assert Client is dspex.client.sync.Client and aio is dspex.aio and dspex.connect is dspex.client.sync.connect\n"
        "assert all(getattr(dspex, n) is not None for n in dspex.__all__) and set(dspex.__all__) <= set(dir(dspex))\n"
        "try:\n    dspex.Clinet\nexcept AttributeError:\n    pass\nelse:\n    raise AssertionError('no error')\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
