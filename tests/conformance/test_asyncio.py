"""The asyncio user: the same ``async def`` programs in-process and through a ``dspex.aio`` session.

Each case is ``main(arun)``, an asyncio program as a DSPy user writes it, run by ``arun.go`` in a
new event loop: ``await arun(fn, ...)`` is ``await fn(...)`` in-process and ``await
s.run(fn, ...)`` through a session (``fn`` by value, the client's DSPy settings with it). Cases
from DSPy's own tests say so; ``arun.check`` runs the program both ways and compares.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
import warnings
from typing import Any

import dspy
import pytest
from dspy.utils.callback import BaseCallback
from dspy.utils.dummies import DummyLM

from tests.conformance.harness import INPROCESS, AsyncRunner

pytestmark = pytest.mark.timeout(180)


def answers(tag: str, n: int = 20) -> DummyLM:
    return DummyLM([{"answer": f"{tag}{i}"} for i in range(n)])


# -- awaiting programs inside the function -------------------------------------------------------

qa = dspy.Predict("question -> answer")


async def ask(question):
    return (await qa.acall(question=question)).answer


async def ask_many(questions):
    predictions = await asyncio.gather(*(qa.acall(question=q) for q in questions))
    return [p.answer for p in predictions]


async def ask_asyncified(question):
    return (await dspy.asyncify(qa)(question=question)).answer


async def ask_within(question, seconds):
    return (await asyncio.wait_for(qa.acall(question=question), seconds)).answer


class Shouting(dspy.Module):
    """DSPy's async module pattern: its own ``aforward``, called with ``acall``."""

    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    async def aforward(self, question):
        prediction = await self.predict.acall(question=question)
        return dspy.Prediction(answer=prediction.answer.upper())


async def ask_shouting(question):
    return (await Shouting().acall(question=question)).answer


def test_acall_gather_asyncify_wait_for_and_aforward(arun: AsyncRunner) -> None:
    """``dspy.configure(lm=...)`` at the top of ``main``, then async programs awaited."""

    async def main(arun: AsyncRunner) -> list[Any]:
        dspy.configure(lm=answers("a"))
        return [await arun(ask, "q"), await arun(ask_many, ["x", "y", "z"]), await arun(ask_asyncified, "q"),
                await arun(ask_within, "q", 5), await arun(ask_shouting, "q")]

    assert arun.check(main) == ["a0", ["a1", "a2", "a3"], "a4", "a5", "A6"]


async def get_weather(city: str) -> str:
    """Get the weather for a city."""
    await asyncio.sleep(0.01)
    return f"sunny in {city}"


async def react_with_an_async_tool(question):
    """DSPy docs "Tools" (async tools): ReAct awaited with ``acall``, its tool an ``async def``."""
    agent = dspy.ReAct("question -> answer", tools=[get_weather])
    prediction = await agent.acall(question=question)
    return prediction.answer, prediction.trajectory


async def parallel_inside_async(questions):
    """``dspy.Parallel`` (threads) called from an ``async def``: its jobs see the caller's LM."""
    predict = dspy.Predict("question -> answer")
    jobs = [(predict, dspy.Example(question=q).with_inputs("question")) for q in questions]
    return sorted(p.answer for p in dspy.Parallel(num_threads=2)(jobs))


def test_react_with_async_tools_and_parallel(arun: AsyncRunner) -> None:
    async def main(arun: AsyncRunner) -> Any:
        dspy.configure(lm=DummyLM([
            {"next_thought": "look it up", "next_tool_name": "get_weather", "next_tool_args": {"city": "Paris"}},
            {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}},
            {"reasoning": "it is sunny", "answer": "sunny"},
        ]))
        react = await arun(react_with_an_async_tool, "Weather in Paris?")
        with dspy.context(lm=DummyLM([{"answer": "p"}] * 4)):
            parallel = await arun(parallel_inside_async, ["a", "b", "c"])
        return react, parallel

    (answer, trajectory), parallel = arun.check(main)
    assert answer == "sunny" and trajectory["observation_0"] == "sunny in Paris" and parallel == ["p", "p", "p"]


# -- DSPy's tests/utils/test_settings.py ---------------------------------------------------------

async def dspy_context_with_async_task_group():
    """tests/utils/test_settings.py ``test_dspy_context_with_async_task_group``, with DummyLMs
    (whose answers name them) in place of a mocked ``litellm.acompletion``."""
    entered = 0
    all_entered = asyncio.Event()
    france, germany = DummyLM([{"answer": "Paris"}] * 2), DummyLM([{"answer": "Berlin"}] * 2)

    class MyModule(dspy.Module):
        def __init__(self):
            self.predict = dspy.Predict("question -> answer")

        async def aforward(self, question: str) -> str:
            lm = france if "France" in question else germany
            with dspy.context(lm=lm, trace=[]):
                nonlocal entered
                entered += 1
                if entered == 4:
                    all_entered.set()
                await all_entered.wait()
                assert dspy.settings.lm is lm
                result = await self.predict.acall(question=question)
                assert len(dspy.settings.trace) == 1
                return result

    module = MyModule()
    with dspy.context(lm=DummyLM([{"answer": "unused"}]), adapter=dspy.ChatAdapter()):
        coroutines = [
            module.acall(question="What is the capital of France?"),
            module.acall(question="What is the capital of France?"),
            module.acall(question="What is the capital of Germany?"),
            module.acall(question="What is the capital of Germany?"),
        ]
        results = await asyncio.wait_for(asyncio.gather(*coroutines), timeout=2)
        assert dspy.settings.trace == []
    return [r.answer for r in results], len(france.history), len(germany.history)


async def dspy_configure_allowance_async():
    """tests/utils/test_settings.py ``test_dspy_configure_allowance_async``, unchanged but for the
    ``pytest.raises`` blocks written as ``try`` (the worker may lack pytest)."""
    def expect_refused():
        try:
            dspy.configure(lm=dspy.LM("openai/gpt-4o"))
        except RuntimeError as e:
            assert "dspy.configure(...) can only be called from the same async" in str(e)
            return
        raise AssertionError("dspy.configure was allowed")

    def bar1():
        # `dspy.configure` is disallowed in different async tasks from the initial one.
        expect_refused()

    async def foo1():
        bar1()
        await asyncio.sleep(0.1)

    async def foo2():
        expect_refused()
        await asyncio.sleep(0.1)

    async def foo3():
        # `dspy.context` is allowed in different async tasks from the initial one.
        with dspy.context(lm=dspy.LM("openai/gpt-4o")):
            await asyncio.sleep(0.1)

    async def foo4():
        # foo4 is directly invoked by the entry task, so it has the same async task as the entry task.
        dspy.configure(lm=dspy.LM("openai/gpt-4o"))
        await asyncio.sleep(0.1)

    dspy.configure(lm=dspy.LM("openai/gpt-4o-mini"))
    dspy.configure(lm=dspy.LM("openai/gpt-4o"))
    dspy.configure(adapter=dspy.JSONAdapter())

    await asyncio.gather(foo1(), foo2(), foo3())

    await foo4()
    return dspy.settings.lm.model, type(dspy.settings.adapter).__name__


def test_dspy_context_with_async_task_group(arun: AsyncRunner) -> None:
    async def main(arun: AsyncRunner) -> Any:
        return await arun(dspy_context_with_async_task_group)

    assert arun.check(main) == (["Paris", "Paris", "Berlin", "Berlin"], 2, 2)


def test_dspy_configure_allowance_async(arun: AsyncRunner) -> None:
    async def main(arun: AsyncRunner) -> Any:
        return await arun(dspy_configure_allowance_async)

    assert arun.check(main) == ("openai/gpt-4o", "JSONAdapter")


# -- the client's settings in concurrent tasks ---------------------------------------------------

async def which_lm():
    await asyncio.sleep(0.02)  # the other task's context is entered meanwhile
    return (await dspy.Predict("question -> answer").acall(question="?")).answer


async def task_with_contexts(arun: AsyncRunner, own: DummyLM, top: DummyLM) -> list[str]:
    out = []
    with dspy.context(lm=own):
        out.append(await arun(which_lm))
        await asyncio.sleep(0.01)
        with dspy.context(lm=top):
            out.append(await arun(which_lm))
        out.append(await arun(which_lm))
    out.append(await arun(which_lm))
    return out


def test_contexts_of_concurrent_tasks_do_not_bleed(arun: AsyncRunner) -> None:
    """Two tasks of one client, each in its own (nested) ``dspy.context``, over one session: each
    call runs with its task's settings, and each LM keeps its state across calls."""

    async def main(arun: AsyncRunner) -> Any:
        top, first, second = answers("top"), answers("A"), answers("B")
        dspy.configure(lm=top)
        return await asyncio.gather(task_with_contexts(arun, first, top), task_with_contexts(arun, second, top))

    got = arun.check(main)
    assert [sorted(a[0] for a in got), sorted(a[2] for a in got)] == [["A0", "B0"], ["A1", "B1"]]
    assert sorted(x for a in got for x in (a[1], a[3])) == ["top0", "top1", "top2", "top3"]


# -- the user's own context variables ------------------------------------------------------------

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")
TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")


async def handle(question):
    async def child() -> str:  # a task the call starts copies the call's context
        await asyncio.sleep(0.01)
        return REQUEST_ID.get()

    return question, REQUEST_ID.get(), TENANT.get("no tenant"), await asyncio.create_task(child())


def test_context_variables_of_the_users_code_travel_with_each_call(arun: AsyncRunner) -> None:
    """A web service's request-scoped ``ContextVar`` (a request id set by a middleware, per task):
    each call sees the value its awaiting task holds, concurrent tasks their own, and a call from a
    context where it is unset sees its default, as ``await handle(...)`` does in-process."""

    async def request(arun: AsyncRunner, rid: str, question: str) -> Any:
        REQUEST_ID.set(rid)
        TENANT.set(f"tenant of {rid}")
        return await arun(handle, question)

    async def main(arun: AsyncRunner) -> Any:
        served = await asyncio.gather(request(arun, "r1", "a"), request(arun, "r2", "b"))
        return served, await arun(handle, "c")

    assert arun.check(main) == ([("a", "r1", "tenant of r1", "r1"), ("b", "r2", "tenant of r2", "r2")],
                                ("c", "none", "no tenant", "none"))


# -- callbacks and usage configured on the client ------------------------------------------------

class Recorder(BaseCallback):
    def __init__(self):
        self.events = []

    def on_module_start(self, call_id, instance, inputs):
        self.events.append(("start", type(instance).__name__))

    def on_module_end(self, call_id, outputs, exception=None):
        self.events.append(("end", None))


async def ask_and_read_events(recorder, question):
    answer = (await dspy.Predict("question -> answer").acall(question=question)).answer
    return answer, list(recorder.events)


async def usage_of_a_prediction():
    prediction = await dspy.Predict("question -> answer").acall(question="?")
    return prediction.answer, sorted(prediction.get_lm_usage() or {})


def test_callbacks_and_usage_configured_on_the_client(arun: AsyncRunner) -> None:
    """DSPy docs "Callbacks" and "Tracking usage", asyncio style: the callback configured on the
    client sees the calls' modules (read inside the calls: its state stays where the calls run,
    docs/remote-objects.md), ``track_usage=True`` gives predictions their usage, and a
    ``dspy.track_usage()`` block around concurrent awaits counts them all."""

    async def main(arun: AsyncRunner) -> Any:
        recorder = Recorder()
        dspy.configure(lm=answers("a"), callbacks=[recorder], track_usage=True)
        first = await arun(ask_and_read_events, recorder, "q")
        second = await arun(ask_and_read_events, recorder, "q")
        usage = await arun(usage_of_a_prediction)
        with dspy.track_usage() as tracker:
            await asyncio.gather(arun(ask, "x"), arun(ask, "y"))
        return first, second, usage, {lm: len(entries) for lm, entries in tracker.usage_data.items()}

    first, second, usage, tracked = arun.check(main)
    assert first == ("a0", [("start", "Predict"), ("end", None)])
    assert second[1] == [("start", "Predict"), ("end", None)] * 2
    assert usage == ("a2", ["dummy"]) and tracked == {"dummy": 2}


# -- output of concurrent calls ------------------------------------------------------------------

log = logging.getLogger("conformance.asyncio")


async def chatty(name):
    print(f"{name}: start")
    log.warning("%s logs", name)
    await asyncio.sleep(0.05)
    warnings.warn(f"{name} warns", UserWarning, stacklevel=1)
    print(f"{name}: done")
    return name


def test_output_of_concurrent_tasks_reaches_the_client(arun: AsyncRunner, capsys: pytest.CaptureFixture[str],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Prints, log records and warnings of calls awaited by concurrent tasks (two sessions, so
    the calls run at the same time where the worker has room) reach this process's stdout, logger
    and warnings, whole lines each, as the same coroutines gathered in-process."""

    async def main(arun: AsyncRunner) -> Any:
        other = arun.session()
        return await asyncio.gather(arun(chatty, "one"), other(chatty, "two"))

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, "conformance.asyncio"):
        warnings.simplefilter("always")
        assert arun.go(main) == ["one", "two"]
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == ["one: done", "one: start", "two: done", "two: start"]
    assert lines.index("one: start") < lines.index("one: done") and lines.index("two: start") < lines.index("two: done")
    assert sorted(r.getMessage() for r in caplog.records if r.name == "conformance.asyncio") == ["one logs", "two logs"]
    assert sorted(str(w.message) for w in caught if "warns" in str(w.message)) == ["one warns", "two warns"]
    assert {w.category for w in caught if "warns" in str(w.message)} == {UserWarning}


# -- async streams -------------------------------------------------------------------------------

STARTED: list[int] = []


async def numbers(n):
    STARTED.append(n)
    for i in range(n):
        await asyncio.sleep(0.01)
        yield i


async def stream_of(arun: AsyncRunner, fn: Any, *args: Any) -> Any:
    """What ``async for`` over ``fn(*args)`` iterates: the generator itself in-process, a
    ``dspex.aio`` stream through the session (``s.stream_apply``)."""
    if arun.mode == INPROCESS:
        result = fn(*args)
        return await result if inspect.isawaitable(result) else result
    return arun.s.stream_apply(fn, list(args))  # type: ignore[attr-defined]


async def streamed_prediction(question):
    program = dspy.streamify(dspy.Predict("question -> answer"))
    return program(question=question)


def test_async_streams_stop_and_leave_the_session_serving(arun: AsyncRunner) -> None:
    """``async for`` to the end, ``aclosing`` left early, ``break`` alone, and the consuming task
    cancelled mid-stream: each producer stops, and the next call of the session runs at once."""

    async def main(arun: AsyncRunner) -> Any:
        dspy.configure(lm=DummyLM([{"answer": "one two three"}] * 3))
        whole = [x async for x in await stream_of(arun, numbers, 3)]
        early = []
        async with contextlib.aclosing(await stream_of(arun, numbers, 1000)) as stream:
            async for x in stream:
                early.append(x)
                if x == 2:
                    break
        taken = []
        async for x in await stream_of(arun, numbers, 1000):
            taken.append(x)
            if x == 2:
                break

        async def consume() -> None:
            async for _ in await stream_of(arun, numbers, 100_000):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        started = time.monotonic()
        after = await arun(ask, "q")
        waited = time.monotonic() - started
        chunks = [type(c).__name__ async for c in await stream_of(arun, streamed_prediction, "q")]
        return whole, early, taken, after, waited < 5, chunks[-1]

    assert arun.check(main) == ([0, 1, 2], [0, 1, 2], [0, 1, 2], "one two three", True, "Prediction")


async def numbers_with_cleanup(n):
    try:
        for i in range(n):
            await asyncio.sleep(0)
            yield i
    finally:
        print("cleaned up")


def test_what_an_async_stream_prints_while_it_stops_reaches_the_client(arun: AsyncRunner,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """An async generator's ``finally`` prints when ``aclose()`` stops it (``contextlib.aclosing``
    around the loop): the line shows on the client's stdout before ``aclose`` returns."""

    async def main(arun: AsyncRunner) -> Any:
        items = []
        async with contextlib.aclosing(await stream_of(arun, numbers_with_cleanup, 1000)) as stream:
            async for x in stream:
                items.append(x)
                if x == 2:
                    break
        return items, capsys.readouterr().out

    assert arun.go(main) == ([0, 1, 2], "cleaned up\n")


async def printed(capsys: pytest.CaptureFixture[str], lines: int) -> str:
    """What the client's stdout shows once it holds ``lines`` lines (within 10 s): what a producer
    prints while it stops may come a moment after the stop through a session."""
    out, deadline = "", time.monotonic() + 10
    while out.count("\n") < lines and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        out += capsys.readouterr().out
    return out


async def sleeps_with_cleanup():
    try:
        await asyncio.sleep(100)
    finally:
        print("stopped")


def test_what_a_program_prints_while_it_is_cancelled_reaches_the_client(arun: AsyncRunner,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The ``finally`` of an async generator whose consuming task is cancelled, of one left by
    ``break`` alone (dropped: stopped at garbage collection), and of a call that ``wait_for``
    cancels: what each prints as it stops shows on the client's stdout, as in-process, though
    nothing awaits the stop there."""

    async def main(arun: AsyncRunner) -> Any:
        running = asyncio.Event()

        async def consume() -> None:
            async for _ in await stream_of(arun, numbers_with_cleanup, 100_000):
                running.set()

        task = asyncio.create_task(consume())
        await running.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        cancelled = await printed(capsys, 1)
        async for x in await stream_of(arun, numbers_with_cleanup, 100_000):
            if x == 2:
                break
        left = await printed(capsys, 1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arun(sleeps_with_cleanup), 0.3)
        timed_out = await printed(capsys, 1)
        return cancelled, left, timed_out, await arun(ask_nothing)

    assert arun.go(main) == ("cleaned up\n", "cleaned up\n", "stopped\n", "served")


def ask_nothing():
    return "served"


# -- errors --------------------------------------------------------------------------------------

class LookupFailed(Exception):
    pass


async def chained():
    try:
        await asyncio.sleep(0)
        {}["k"]
    except KeyError as missing:
        raise LookupFailed("no k") from missing


async def timed_out_inside():
    await asyncio.wait_for(asyncio.sleep(10), 0.05)


async def task_group_fails():
    async def bad(exc):
        await asyncio.sleep(0)
        raise exc

    async with asyncio.TaskGroup() as group:
        group.create_task(bad(ValueError("v")))
        group.create_task(bad(KeyError("k")))


def describe(exc: BaseException | None) -> Any:
    """An error's type name, message (of an ``Exception``) and chain. A remote ``CancelledError``
    (a ``BaseException``) is a plain ``RemoteError`` of that ``type_name``: non-``Exception`` types
    are never mixed into a remote error (docs/remote-objects.md, *Errors*)."""
    if exc is None:
        return None
    name = getattr(exc, "type_name", None) or type(exc).__name__
    return (name, str(exc) if isinstance(exc, Exception) and name != "CancelledError" else "",
            describe(exc.__cause__), exc.__context__ is exc.__cause__, exc.__suppress_context__)


def test_errors_of_async_functions_keep_their_types_and_chains(arun: AsyncRunner) -> None:
    async def main(arun: AsyncRunner) -> Any:
        out = []
        for program in (chained, timed_out_inside):
            try:
                await arun(program)
            except Exception as exc:  # noqa: BLE001 - what was raised is the result
                out.append(describe(exc))
        try:
            await arun(task_group_fails)
        except* ValueError as group:
            out.append(("ValueError", [str(e) for e in group.exceptions]))
        except* KeyError as group:
            out.append(("KeyError", [str(e) for e in group.exceptions]))
        try:
            await arun(task_group_fails)
        except ExceptionGroup as group:
            out.append((group.__suppress_context__, sorted(type(e).__name__ for e in group.exceptions)))
        return out

    got = arun.check(main)
    assert got[0] == ("LookupFailed", "no k", ("KeyError", "'k'", None, True, False), True, True)
    assert got[2:] == [("ValueError", ["v"]), ("KeyError", ["'k'"]), (True, ["KeyError", "ValueError"])]


# -- cancellation --------------------------------------------------------------------------------

DONE: list[str] = []


async def slow_step(name):
    await asyncio.sleep(3)
    DONE.append(name)
    return name


def done_steps():
    return list(DONE)


def test_cancelling_the_awaiting_task_stops_the_call(arun: AsyncRunner) -> None:
    """``task.cancel()`` and ``asyncio.wait_for`` running out around an awaited call: the call
    stops where it waits (nothing after its ``await`` runs), at once, and the session serves on."""

    async def main(arun: AsyncRunner) -> Any:
        DONE.clear()
        task = asyncio.create_task(arun(slow_step, "cancelled"))
        await asyncio.sleep(0.3)
        task.cancel()
        started = time.monotonic()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            await asyncio.wait_for(arun(slow_step, "timed out"), 0.3)
        except TimeoutError:
            pass
        await asyncio.sleep(3.2)  # past the steps' end, had they run on
        return task.cancelled(), time.monotonic() - started < 4, await arun(done_steps)

    assert arun.check(main) == (True, True, [])


# -- one session, two tasks ----------------------------------------------------------------------

class Notes:
    def __init__(self):
        self.lines = []

    async def add(self, line):
        await asyncio.sleep(0.01)
        self.lines.append(line)
        return len(self.lines)


NOTES = Notes()


def test_one_session_from_two_tasks(arun: AsyncRunner) -> None:
    """Two tasks awaiting calls of one session at once: each gets its own result, and the calls
    share the session's module state (the calls run one after the other there:
    docs/remote-objects.md, *Async results and streams*)."""

    async def main(arun: AsyncRunner) -> Any:
        NOTES.lines.clear()

        async def writer(tag: str) -> list[int]:
            return [await arun(NOTES.add, f"{tag}{i}") for i in range(3)]

        counts = await asyncio.gather(writer("a"), writer("b"))
        lines = await arun(lambda: list(NOTES.lines))
        return sorted(counts[0] + counts[1]), sorted(lines)

    assert arun.check(main) == ([1, 2, 3, 4, 5, 6], ["a0", "a1", "a2", "b0", "b1", "b2"])



class Shelf:
    def __init__(self) -> None:
        self.queries: list[str] = []

    def search(self, query: str, k: int = 2) -> list[str]:
        """Search the shelf for books about the query."""
        self.queries.append(query)
        return [f"book {i} about {query}" for i in range(k)]


def test_a_tool_made_of_a_handles_method_is_awaited_like_the_method(arun: AsyncRunner) -> None:
    """DSPy docs "Tools" with an asyncio client: ``dspy.ReAct(..., tools=[shelf.search])`` built here
    over a ``dspex.aio`` handle's method and awaited with ``acall``: the tool has the method's name,
    description and argument schema (it was ``RemoteAttribute(*args, **kwargs)`` with the handle's
    docstring), and each tool call is awaited there."""

    async def main(arun: AsyncRunner) -> Any:
        shelf = Shelf() if arun.mode == INPROCESS else await arun.s.put(Shelf())  # type: ignore[attr-defined]
        tool = dspy.Tool(shelf.search)
        lm = DummyLM([{"next_thought": "look", "next_tool_name": "search", "next_tool_args": {"query": "cats"}},
                      {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}},
                      {"reasoning": "found", "answer": "cats purr"}])
        with dspy.context(lm=lm):
            result = await dspy.ReAct("question -> answer", tools=[shelf.search]).acall(question="Cats?")
        queries = shelf.queries if arun.mode == INPROCESS else await shelf.queries
        return tool.name, tool.desc, tool.args, result.trajectory["observation_0"], queries

    assert arun.check(main) == ("search", "Search the shelf for books about the query.",
                                {"query": {"type": "string"}, "k": {"type": "integer", "default": 2}},
                                ["book 0 about cats", "book 1 about cats"], ["cats"])
