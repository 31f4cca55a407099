"""dspy.streamify with a StreamListener, async and sync, in-process and through a session.

Patterns from DSPy's docs ("Streaming") and tests/streaming: a listener on the ``answer`` field,
chunks arrive as ``StreamResponse`` objects and the last item is the ``Prediction``. DSPy's own
streaming tests patch litellm to stream tokens; here ``DummyLM``'s answers go through DSPy's
custom-engine API instead, streamed word by word (DummyLM alone answers in one piece).
"""

import asyncio
import contextlib
import dataclasses
import re

import dspy
import pytest
from dspy.clients.engines.dummy_engine import AsyncDummyEngine, DummyEngine
from dspy.lm15 import StreamDeltaEvent, TextDelta
from dspy.utils.dummies import DummyLM

import dspex
from tests.conformance.harness import SESSION, Runner, as_data


class StreamingDummyEngine(DummyEngine):
    """DummyLM's engine, streaming each answer word by word as a provider streams tokens."""

    complete_legacy = None  # no non-streaming shortcut: DSPy takes the canonical (streaming) path

    def stream(self, request):
        for event in super().stream(request):
            delta = getattr(event, "delta", None)
            if not (isinstance(delta, TextDelta) and delta.text):
                yield event
                continue
            for i, piece in enumerate(re.findall(r"\s*\S+", delta.text)):
                first = dataclasses.replace(delta, text=piece)  # carries the logprobs, if any
                yield StreamDeltaEvent(delta=first if i == 0 else TextDelta(text=piece, part_index=delta.part_index))


class AsyncStreamingDummyEngine(AsyncDummyEngine):
    complete_legacy = None


def streaming_dummy_lm(answers):
    engine = StreamingDummyEngine(DummyLM(answers))
    return dspy.LM("dummy/streaming", engine=engine, async_engine=AsyncStreamingDummyEngine(engine), cache=False)


ANSWER = "Because it wanted to get to the other side of the road."


def make_stream_predict(async_streaming=True):
    predict = dspy.Predict("question -> answer")
    return dspy.streamify(
        predict,
        stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer", allow_reuse=True)],
        async_streaming=async_streaming,
    )


def async_streaming_program():
    dspy.configure(lm=streaming_dummy_lm([{"answer": ANSWER}]))
    stream_predict = make_stream_predict()

    async def read_output_stream():
        output_stream = stream_predict(question="Why did a chicken cross the road?")
        return [chunk async for chunk in output_stream]

    return asyncio.run(read_output_stream())


def sync_streaming_program():
    dspy.configure(lm=streaming_dummy_lm([{"answer": ANSWER}]))
    stream_predict = make_stream_predict(async_streaming=False)
    return list(stream_predict(question="Why did a chicken cross the road?"))


def check_chunks(items):
    *chunks, final = items
    assert isinstance(final, dspy.Prediction)
    assert final.answer == ANSWER
    assert chunks and all(isinstance(c, dspy.streaming.StreamResponse) for c in chunks)
    assert {c.signature_field_name for c in chunks} == {"answer"}
    assert "".join(c.chunk for c in chunks).strip() == final.answer


@pytest.mark.parametrize("program", [async_streaming_program, sync_streaming_program], ids=["async", "sync"])
def test_streamify_program_collects_chunks(run: Runner, program) -> None:
    check_chunks(run.check(program))


def streamed_items(run: Runner, stream_predict, **kwargs):
    """Iterate a streamify program item by item where it runs (a session streams it over the wire)."""
    if run.mode == SESSION:
        return list(run.s.stream_method(stream_predict, "__call__", kwargs=kwargs))
    items = stream_predict(**kwargs)
    if hasattr(items, "__aiter__"):
        async def drain():
            return [item async for item in items]

        return asyncio.run(drain())
    return list(items)


@pytest.mark.parametrize("async_streaming", [True, False], ids=["async", "sync"])
def test_streamify_streams_item_by_item(run: Runner, async_streaming: bool) -> None:
    """streamify's defaults (async) through ``stream_method``: items arrive as data, then the stream ends."""
    run(dspy.configure, lm=streaming_dummy_lm([{"answer": ANSWER}] * 2))
    # built where it runs, as a ref: one program streamed twice (test_a_streamify_program_built_on_the_client_streams
    # sends one built here)
    stream_predict = run(make_stream_predict, async_streaming)
    first = streamed_items(run, stream_predict, question="Why did a chicken cross the road?")
    check_chunks(first)
    again = streamed_items(run, stream_predict, question="Why did a chicken cross the road?")
    assert as_data(again) == as_data(first)


@pytest.mark.parametrize("async_streaming", [True, False], ids=["async", "sync"])
def test_a_streamify_program_built_on_the_client_streams(run: Runner, async_streaming: bool) -> None:
    """DSPy's docs ("Streaming"): ``stream_predict = dspy.streamify(predict, stream_listeners=[...])``
    at the top of the script, then iterate ``stream_predict(question=...)``; through a session the
    program built here goes by value (its listener's queue too) and streams there."""
    run(dspy.configure, lm=streaming_dummy_lm([{"answer": ANSWER}] * 2))
    stream_predict = make_stream_predict(async_streaming)
    kwargs = {"question": "Why did a chicken cross the road?"}
    if run.mode == SESSION:
        items = list(run.s.stream_apply(stream_predict, (), kwargs))
    else:
        items = streamed_items(run, stream_predict, **kwargs)
    check_chunks(items)


def test_stream_any_iterable_and_refuse_a_non_iterable(session: dspex.Session) -> None:
    assert list(session.stream("builtins", "iter", [[1, 2, 3]])) == [1, 2, 3]
    assert list(session.stream("builtins", "map", [str.upper, ["a", "b"]])) == ["A", "B"]
    with pytest.raises(dspex.DspexError, match="iterable"):
        list(session.stream("builtins", "len", [[1, 2, 3]]))
    assert session.run(sum, [1, 2, 3]) == 6  # the session still serves


# -- ReAct: tool status messages and the answer's chunks, item by item ---------------------------


def lookup(term: str) -> str:
    """Look a term up."""
    return f"{term} is a DSPy runtime"


def make_streaming_react():
    dspy.configure(lm=streaming_dummy_lm([
        {"next_thought": "Look it up.", "next_tool_name": "lookup", "next_tool_args": {"term": "dspex"}},
        {"next_thought": "Done.", "next_tool_name": "finish", "next_tool_args": {}},
        {"reasoning": "Found it.", "answer": "dspex is a DSPy runtime"},
    ]))
    react = dspy.ReAct("question -> answer", tools=[lookup])
    return dspy.streamify(react, stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer")])


def test_streamify_react_status_messages_arrive_as_data(run: Runner) -> None:
    stream_react = run(make_streaming_react)
    items = streamed_items(run, stream_react, question="What is dspex?")
    statuses = [i.message for i in items if isinstance(i, dspy.streaming.StatusMessage)]
    assert statuses == ["Calling tool lookup...",
                        "Tool calling finished! Querying the LLM with tool calling results..."]
    chunks = [i for i in items if isinstance(i, dspy.streaming.StreamResponse)]
    assert "".join(c.chunk for c in chunks) == "dspex is a DSPy runtime"
    assert {c.predict_name for c in chunks} == {"extract.predict"}
    assert isinstance(items[-1], dspy.Prediction) and items[-1].trajectory["observation_0"] == "dspex is a DSPy runtime"


# -- a client-defined async generator, driven in one task for its whole life ---------------------


async def countdown(n):
    import anyio

    async with anyio.create_task_group() as tg:  # a cancel scope that must exit in the task that entered it
        tg.start_soon(anyio.sleep, 0)
        for i in range(n, 0, -1):
            await anyio.lowlevel.checkpoint()
            yield i


def test_async_generator_streams_from_a_client_function(session: dspex.Session) -> None:
    async def drain():
        return [i async for i in countdown(5)]

    expected = asyncio.run(drain())
    assert list(session.stream_apply(countdown, [5])) == expected == [5, 4, 3, 2, 1]


def first_items(run: Runner, stream_predict, n, **kwargs):
    """The first ``n`` items of a stream, then the stream is closed (a ``break`` out of the loop)."""
    if run.mode == SESSION:
        with run.s.stream_method(stream_predict, "__call__", kwargs=kwargs) as stream:
            return [item for _, item in zip(range(n), stream)]
    gen = stream_predict(**kwargs)
    items = [item for _, item in zip(range(n), gen)]
    gen.close()
    return items


@pytest.mark.parametrize("async_streaming", [False, True], ids=["sync", "async"])
def test_a_stream_left_early_leaves_the_session_serving(run: Runner, async_streaming: bool) -> None:
    """Leave a streamify stream after 3 chunks: the producer is closed where it runs (for the async
    default: inside the task that runs it) and the next program streams to its end. A listener
    left mid-stream is not reusable in DSPy itself, so the next stream is a new program."""
    if run.mode != SESSION and async_streaming:
        pytest.skip("in-process, DSPy's own streamify raises 'Attempted to exit cancel scope in a "
                    "different task' when its async generator is closed after a break")
    run(dspy.configure, lm=streaming_dummy_lm([{"answer": ANSWER}] * 2))
    first = first_items(run, run(make_stream_predict, async_streaming), 3, question="Why?")
    assert len(first) == 3 and all(isinstance(i, dspy.streaming.StreamResponse) for i in first)
    check_chunks(streamed_items(run, run(make_stream_predict, async_streaming), question="Why?"))


class AnswerThenFail(dspy.Module):
    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question):
        self.predict(question=question)
        raise ValueError("failed after the answer")


def make_failing_stream():
    dspy.configure(lm=streaming_dummy_lm([{"answer": ANSWER}]))
    return dspy.streamify(AnswerThenFail(), async_streaming=False,
                          stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer")])


def test_an_error_after_streamed_chunks_arrives_typed_after_them(run: Runner) -> None:
    stream_program = run(make_failing_stream)
    items = []
    with pytest.raises(ValueError, match="failed after the answer"):
        if run.mode == SESSION:
            for item in run.s.stream_method(stream_program, "__call__", kwargs={"question": "Why?"}):
                items.append(item)  # noqa: PERF402 - one at a time: the items before the error are kept
        else:
            for item in stream_program(question="Why?"):
                items.append(item)  # noqa: PERF402 - the same, in-process
    assert items and all(isinstance(i, dspy.streaming.StreamResponse) for i in items)
    assert "".join(i.chunk for i in items).strip() == ANSWER


def counting_with_cleanup(n):
    try:
        yield from range(n)
    finally:
        print("cleaned up")


def test_what_a_stream_prints_while_it_stops_reaches_the_client(run: Runner, capsys: pytest.CaptureFixture[str]) -> None:
    """A generator's ``finally`` prints when its consumer closes it (``with`` around the loop, as
    ``closing`` in-process): the line shows on the client's stdout, as in-process."""
    if run.mode == SESSION:
        with run.s.stream_apply(counting_with_cleanup, [1000]) as stream:
            items = [item for _, item in zip(range(3), stream)]
    else:
        with contextlib.closing(counting_with_cleanup(1000)) as gen:
            items = [item for _, item in zip(range(3), gen)]
    assert items == [0, 1, 2]
    assert capsys.readouterr().out == "cleaned up\n"


def lines_of(n):
    print("producing")
    yield from range(n)


def test_a_stream_runs_nothing_until_it_is_iterated(run: Runner, capsys: pytest.CaptureFixture[str]) -> None:
    """In-process a generator's body runs at its first ``next()``: one made and not yet iterated
    holds nothing, and the program's other calls run meanwhile. Through a session the same (the
    blocking client sends the stream's request at its first ``next()``, as ``dspex.aio`` does at
    its first ``__anext__``): the call in between runs at once, the stream then yields every item."""
    if run.mode == SESSION:
        stream = run.s.stream_apply(lines_of, (100,))
        between = run.s.apply(len, ([1, 2],), timeout=5)  # behind a producer already running: QueueTimeout
    else:
        stream = lines_of(100)
        between = len([1, 2])
    assert between == 2 and capsys.readouterr().out == ""
    assert list(stream) == list(range(100))
    assert capsys.readouterr().out == "producing\n"
