"""Programs of DSPy's tutorials run as written, with DSPy's real ``dspy.LM`` HTTP path swapped in for
the provider (the loopback server ``tests/lmserver.py``): in-process and through a session, the
same result, printed lines, log lines, warnings, exception, LM history (``lm.history``,
``dspy.inspect_history``), usage and requests the server received.

From dspy.ai (stanfordnlp/dspy ``docs/docs/tutorials``):

- "Async" (tutorials/async): ``Predict.acall``, an async ``dspy.Tool`` (``acall``; called
  synchronously under ``allow_tool_async_sync_conversion``, by ``dspy.context`` and by
  ``dspy.configure``), a custom module with ``aforward``;
- "Streaming" (tutorials/streaming): ``dspy.streamify`` with ``StreamListener`` on one field, on two
  modules' fields, ``allow_reuse`` over ReAct's ``next_thought``, duplicate field names told apart
  by ``predict``/``predict_name``, a ``StatusMessageProvider`` around a ``dspy.Tool``, and
  ``async_streaming=False``;
- "Output Refinement" (tutorials/output_refinement): ``dspy.BestOfN`` and ``dspy.Refine`` with the
  one-word reward, ``fail_count=1`` over a module that fails, a factuality judge as reward;
- "Conversation History" (tutorials/conversation_history): a ``dspy.History`` input kept across
  turns (the tutorial's ``input()`` loop over a fixed list of questions), then a demo holding a
  history, each followed by ``dspy.inspect_history()``;
- "Cache" (tutorials/cache): ``track_usage`` and a repeated question (the second's usage ``{}``),
  then a ``dspy.clients.Cache`` subclass keyed by the messages only, set as ``dspy.cache`` (each run
  in its own cache directory, ``dspy.cache`` put back at its end: it is the process's, see
  docs/remote-objects.md).

Each LM is ``dspy.LM("openai/gpt-4o-mini", api_base=<loopback>, api_key=..., cache=False)`` (the
tutorials' own model name; the cache tutorial keeps DSPy's cache on, in a directory of its own).
"""

from __future__ import annotations

import asyncio
import difflib
import pprint
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from hashlib import sha256
from typing import Any

import dspy
import orjson
import pytest

import dspex
from tests.conformance.harness import as_data, fresh_dspy_settings
from tests.lmserver import LMServer

MODEL = "openai/gpt-4o-mini"


@pytest.fixture(scope="module")
def lmserver() -> Iterator[LMServer]:
    with LMServer() as server:
        yield server


def tutorial_lm(base: str, model: str = MODEL, cache: bool = False) -> dspy.LM:
    return dspy.LM(model, api_base=base, api_key="not-a-key", cache=cache)


def history_of(lm: dspy.LM) -> list[dict[str, Any]]:
    """What of ``lm.history`` a run fixes: all but the time, the uuid and the server's response id."""
    return [{**{k: v for k, v in entry.items() if k not in ("timestamp", "uuid", "response")},
             "response_text": getattr(entry.get("response"), "text", None)} for entry in lm.history]


# --------------------------------------------------------------------------- tutorials/async


async def foo(x):
    # Simulate an async operation
    await asyncio.sleep(0.1)
    print(f"I get: {x}")


async def async_tool(x: int) -> int:
    """An async tool that doubles a number."""
    await asyncio.sleep(0.1)
    return x * 2


class TwoStepModule(dspy.Module):  # the tutorial's ``MyModule`` (other tutorials use the name too)
    def __init__(self):
        self.predict1 = dspy.ChainOfThought("question->answer")
        self.predict2 = dspy.ChainOfThought("answer->simplified_answer")

    async def aforward(self, question, **kwargs):
        # Execute predictions sequentially but asynchronously
        answer = await self.predict1.acall(question=question)
        return await self.predict2.acall(answer=answer)


def async_tutorial(base: str) -> Any:
    lm = tutorial_lm(base)
    dspy.configure(lm=lm)
    predict = dspy.Predict("question->answer")

    async def main():
        # Use acall() for async execution
        output = await predict.acall(question="why did a chicken cross the kitchen?")
        print(output)

    asyncio.run(main())

    tool = dspy.Tool(foo)

    async def call_the_tool():
        # Execute the tool asynchronously
        await tool.acall(x=2)

    asyncio.run(call_the_tool())

    doubling = dspy.Tool(async_tool)
    # Option 1: Use context manager for temporary conversion
    with dspy.context(allow_tool_async_sync_conversion=True):
        result = doubling(x=5)  # Works in sync context
        print(result)  # 10
    # Option 2: Configure globally
    dspy.configure(allow_tool_async_sync_conversion=True)
    result = doubling(x=5)  # Now works everywhere
    print(result)  # 10

    async def run_the_module():
        mod = TwoStepModule()
        result = await mod.acall(question="Why did a chicken cross the kitchen?")
        print(result)
        return result

    final = asyncio.run(run_the_module())
    dspy.inspect_history(n=3)
    return final, history_of(lm)


# --------------------------------------------------------------------------- tutorials/streaming


class QuestionThenSimplify(dspy.Module):  # "Streaming Multiple Fields"
    def __init__(self):
        super().__init__()
        self.predict1 = dspy.Predict("question->answer")
        self.predict2 = dspy.Predict("answer->simplified_answer")

    def forward(self, question: str, **kwargs):
        answer = self.predict1(question=question)
        simplified_answer = self.predict2(answer=answer)
        return simplified_answer


class AnswerTwice(dspy.Module):
    """ "Handling Duplicate Field Names", whose second signature DSPy 3.4.1 refuses as written
    (``"question, answer->answer, score"``: an input and an output both named ``answer``): its
    input is ``draft`` here."""

    def __init__(self):
        super().__init__()
        self.predict1 = dspy.Predict("question->answer")
        self.predict2 = dspy.Predict("question, draft->answer, score")

    def forward(self, question: str, **kwargs):
        answer = self.predict1(question=question)
        simplified_answer = self.predict2(question=question, draft=answer.answer)
        return simplified_answer


def fetch_user_info(user_name: str):
    """Get user information like name, birthday, etc."""
    return {
        "name": user_name,
        "birthday": "2009-05-16",
    }


def get_sports_news(year: int):
    """Get sports news for a given year."""
    if year == 2009:
        return "Usane Bolt broke the world record in the 100m race."
    return None


class DoubleThenSum(dspy.Module):  # "Intermediate Status Streaming"
    def __init__(self):
        super().__init__()
        self.tool = dspy.Tool(lambda x: 2 * x, name="double_the_number")
        self.predict = dspy.ChainOfThought("num1, num2->sum")

    def forward(self, num, **kwargs):
        num2 = self.tool(x=num)
        return self.predict(num1=num, num2=num2)


class MyStatusMessageProvider(dspy.streaming.StatusMessageProvider):
    def tool_start_status_message(self, instance, inputs):
        return f"Calling Tool {instance.name} with inputs {inputs}..."

    def tool_end_status_message(self, outputs):
        return f"Tool finished with output: {outputs}!"


# as the tutorial's script: the streamified program is built at its top level
predict = dspy.Predict("question->answer")
stream_predict = dspy.streamify(
    predict,
    stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer")],
)
two_fields = QuestionThenSimplify()
stream_two_fields = dspy.streamify(
    two_fields,
    stream_listeners=[
        dspy.streaming.StreamListener(signature_field_name="answer"),
        dspy.streaming.StreamListener(signature_field_name="simplified_answer"),
    ],
)
react = dspy.ReAct("question->answer", tools=[fetch_user_info, get_sports_news])
stream_react = dspy.streamify(react, stream_listeners=[
    # dspy.ReAct has a built-in output field called "next_thought".
    dspy.streaming.StreamListener(signature_field_name="next_thought", allow_reuse=True),
])
answer_twice = AnswerTwice()
stream_answer_twice = dspy.streamify(
    answer_twice,
    stream_listeners=[
        dspy.streaming.StreamListener(signature_field_name="answer", predict=answer_twice.predict1,
                                      predict_name="predict1"),
        dspy.streaming.StreamListener(signature_field_name="answer", predict=answer_twice.predict2,
                                      predict_name="predict2"),
    ],
)
stream_status = dspy.streamify(
    DoubleThenSum(),
    stream_listeners=[dspy.streaming.StreamListener(signature_field_name="reasoning")],
    status_message_provider=MyStatusMessageProvider(),
)
sync_stream_predict = dspy.streamify(
    predict,
    stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer")],
    async_streaming=False,
)


def streaming_tutorial(base: str) -> Any:
    lm = tutorial_lm(base)
    dspy.configure(lm=lm)

    async def read_output_stream():
        output_stream = stream_predict(question="Why did a chicken cross the kitchen?")
        async for chunk in output_stream:
            print(chunk)

    asyncio.run(read_output_stream())

    async def read_and_keep(stream):
        return_value = None
        async for chunk in stream:
            if isinstance(chunk, dspy.streaming.StreamResponse):
                print(chunk)
            elif isinstance(chunk, dspy.Prediction):
                return_value = chunk
            elif isinstance(chunk, dspy.streaming.StatusMessage):
                print(chunk)
        return return_value

    outputs = []
    for stream in (lambda: stream_two_fields(question="why did a chicken cross the kitchen?"),
                   lambda: stream_react(question="What sports news happened in the year Adam was born?"),
                   lambda: stream_answer_twice(question="why did a chicken cross the kitchen?"),
                   lambda: stream_status(num=3)):
        program_output = asyncio.run(read_and_keep(stream()))
        print("Final output: ", program_output)
        outputs.append(program_output)

    output = sync_stream_predict(question="why did a chicken cross the kitchen?")
    program_output = None
    for chunk in output:
        if isinstance(chunk, dspy.streaming.StreamResponse):
            print(chunk)
        elif isinstance(chunk, dspy.Prediction):
            program_output = chunk
    print(f"Program output: {program_output}")
    return [*outputs, program_output], history_of(lm)


# --------------------------------------------------------------------------- tutorials/output_refinement


def one_word_answer(args, pred: dspy.Prediction) -> float:
    return 1.0 if len(pred.answer.split()) == 1 else 0.0


class FactualityJudge(dspy.Signature):
    """Determine if a statement is factually accurate."""

    statement: str = dspy.InputField()
    is_factual: bool = dspy.OutputField()


factuality_judge = dspy.ChainOfThought(FactualityJudge)


def factuality_reward(args, pred: dspy.Prediction) -> float:
    statement = pred.answer
    result = factuality_judge(statement)
    return 1.0 if result.is_factual else 0.0


class BrokenQA(dspy.Module):
    """The tutorial's ``qa`` for the error-handling examples: a module that fails."""

    def __init__(self):
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question):
        raise ValueError(f"no answer to {question!r}")


def output_refinement_tutorial(base: str) -> Any:
    lm = tutorial_lm(base)
    dspy.configure(lm=lm)
    results = []
    best_of_3 = dspy.BestOfN(
        module=dspy.ChainOfThought("question -> answer"),
        N=3,
        reward_fn=one_word_answer,
        threshold=1.0
    )
    result = best_of_3(question="What is the capital of Belgium?")
    print(result.answer)  # Brussels
    results.append(result)

    refine = dspy.Refine(
        module=dspy.ChainOfThought("question -> answer"),
        N=3,
        reward_fn=one_word_answer,
        threshold=1.0
    )
    result = refine(question="What is the capital of Belgium?")
    print(result.answer)  # Brussels
    results.append(result)

    qa = BrokenQA()
    for kind in (dspy.BestOfN, dspy.Refine):
        failing = kind(module=qa, N=3, reward_fn=one_word_answer, threshold=1.0, fail_count=1)
        try:
            failing(question="What is the capital of Belgium?")
        except ValueError as exc:  # raises an error after the first failure
            print(f"{kind.__name__}: {type(exc).__name__}: {exc}")
            results.append(str(exc))
    return results, history_of(lm)


def factuality_tutorial(base: str) -> Any:
    """"Ensuring Factual Correctness" as written: its reward calls the judge with a positional
    argument, which DSPy 3.4.1 refuses (``TypeError``) in the first attempt's reward."""
    dspy.configure(lm=tutorial_lm(base))
    refined_qa = dspy.Refine(
        module=dspy.ChainOfThought("question -> answer"),
        N=3,
        reward_fn=factuality_reward,
        threshold=1.0
    )
    result = refined_qa(question="Tell me about Belgium's capital city.")
    print(result.answer)
    return result


# --------------------------------------------------------------------------- tutorials/conversation_history


class QA(dspy.Signature):
    question: str = dspy.InputField()
    history: dspy.History = dspy.InputField()
    answer: str = dspy.OutputField()


def conversation_history_tutorial(base: str, questions: list[str]) -> Any:
    lm = tutorial_lm(base)
    dspy.configure(lm=lm)
    predict = dspy.Predict(QA)
    history = dspy.History(messages=[])
    answers = iter(questions)
    while True:
        question = next(answers)  # the tutorial reads input(...) here
        if question == "finish":
            break
        outputs = predict(question=question, history=history)
        print(f"\n{outputs.answer}\n")
        history.messages.append({"question": question, **outputs})
    dspy.inspect_history()

    # "History in Few-shot Examples"
    predict = dspy.Predict(QA)
    predict.demos.append(
        dspy.Example(
            question="What is the capital of France?",
            history=dspy.History(
                messages=[{"question": "What is the capital of Germany?", "answer": "The capital of Germany is Berlin."}]
            ),
            answer="The capital of France is Paris.",
        )
    )
    predict(question="What is the capital of America?", history=dspy.History(messages=[]))
    dspy.inspect_history()
    return history, history_of(lm)


# --------------------------------------------------------------------------- tutorials/cache


class CustomCache(dspy.clients.Cache):
    def cache_key(self, request: dict[str, Any], ignored_args_for_cache_key: list[str] | None = None) -> str:
        messages = request.get("messages", [])
        return sha256(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)).hexdigest()


def cache_tutorial(base: str) -> Any:
    """The tutorial's three blocks; the elapsed times it prints are left out (not a result)."""
    saved = dspy.cache
    with tempfile.TemporaryDirectory() as cache_dir:
        dspy.cache = dspy.clients.Cache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=cache_dir)
        try:
            dspy.configure(lm=tutorial_lm(base, cache=True), track_usage=True)
            predict = dspy.Predict("question->answer")
            result1 = predict(question="Who is the GOAT of basketball?")
            print(f"Total usage: {result1.get_lm_usage()}")
            result2 = predict(question="Who is the GOAT of basketball?")
            print(f"Total usage: {result2.get_lm_usage()}")

            result1 = predict(question="Who is the GOAT of soccer?")
            with dspy.context(lm=tutorial_lm(base, "openai/gpt-4.1-mini", cache=True)):
                result2 = predict(question="Who is the GOAT of soccer?")
            print(f"Missed: {result2.get_lm_usage() != {}}")

            dspy.cache = CustomCache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=cache_dir)
            result1 = predict(question="Who is the GOAT of volleyball?")
            with dspy.context(lm=tutorial_lm(base, "openai/gpt-4.1-mini", cache=True)):
                result2 = predict(question="Who is the GOAT of volleyball?")
            print(f"Hit: {result2.get_lm_usage() == {}}")
            return result1, result2
        finally:
            dspy.cache = saved


# --------------------------------------------------------------------------- the comparison


TIMESTAMP = re.compile(r"\d{4}[-/]\d\d[-/]\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?")


def raised_type(exc: Exception) -> type:
    """The exception's type as the program raised it: a session's ``RemoteError[T]`` is also a ``T``
    (docs/remote-objects.md, "Errors"), and that ``T`` is the one compared."""
    if isinstance(exc, dspex.RemoteError):
        (original,) = [base for base in type(exc).__bases__ if base is not dspex.RemoteError]
        return original
    return type(exc)


def observe(call: Callable[[], Any], capsys: pytest.CaptureFixture[str], server: LMServer) -> dict[str, Any]:
    """What a program shows its user: its result or exception, printed and logged text, warnings,
    and what it sent the provider."""
    with server.lock:
        server.calls.clear()
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            outcome: Any = ("returned", as_data(call()))
        except Exception as exc:  # noqa: BLE001 - the program's exception is what is compared
            outcome = ("raised", raised_type(exc).__qualname__, str(exc))
    captured = capsys.readouterr()
    return {
        "outcome": outcome,
        "stdout": TIMESTAMP.sub("<time>", captured.out).splitlines(),
        "stderr": TIMESTAMP.sub("<time>", captured.err).splitlines(),
        "warnings": [(w.category.__name__, str(w.message)) for w in warned],
        "requests": [{k: v for k, v in c.body.items()} for c in server.completions()],
    }


def compare(session: dspex.Session, capsys: pytest.CaptureFixture[str], server: LMServer,
            program: Callable[..., Any], *args: Any) -> dict[str, Any]:
    # the session first: it gets the program's module globals as they are now, and the in-process
    # run may change them (a StreamListener is spent once its field has streamed), as a second run
    # of the script in one process would see
    got = observe(lambda: session.run(program, *args), capsys, server)
    with fresh_dspy_settings():
        expected = observe(lambda: program(*args), capsys, server)
    for key in expected:
        assert got[key] == expected[key], f"{key}: through a session differs from in-process:\n" + "\n".join(
            difflib.unified_diff(pprint.pformat(expected[key], width=150).splitlines(),
                                 pprint.pformat(got[key], width=150).splitlines(), "in-process", "session", lineterm=""))
    return expected


def test_async_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str], lmserver: LMServer) -> None:
    seen = compare(session, capsys, lmserver, async_tutorial, lmserver.base)
    assert seen["outcome"][0] == "returned", seen["outcome"]
    assert "I get: 2" in seen["stdout"] and seen["stdout"].count("10") == 2
    assert len(seen["requests"]) == 3


def test_streaming_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str], lmserver: LMServer) -> None:
    seen = compare(session, capsys, lmserver, streaming_tutorial, lmserver.base)
    assert seen["outcome"][0] == "returned", seen["outcome"]
    out = "\n".join(seen["stdout"])
    for shown in ("predict_name='self', signature_field_name='answer'", "predict_name='predict2', signature_field_name='simplified_answer'",
                  "signature_field_name='next_thought'", "predict_name='predict2', signature_field_name='answer'",
                  "StatusMessage(message=\"Calling Tool double_the_number with inputs {'kwargs': {'x': 3}}...\")", "signature_field_name='reasoning'",
                  "Program output: Prediction("):
        assert shown in out, shown


def test_output_refinement_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str],
                                    lmserver: LMServer) -> None:
    seen = compare(session, capsys, lmserver, output_refinement_tutorial, lmserver.base)
    assert seen["outcome"][0] == "returned", seen["outcome"]
    assert "BestOfN: ValueError: no answer to 'What is the capital of Belgium?'" in seen["stdout"]
    assert "Refine: ValueError: no answer to 'What is the capital of Belgium?'" in seen["stdout"]


def test_output_refinement_factuality_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str],
                                               lmserver: LMServer) -> None:
    seen = compare(session, capsys, lmserver, factuality_tutorial, lmserver.base)
    assert seen["outcome"] == ("raised", "TypeError", "ChainOfThought.forward() takes 1 positional argument but 2 were given")
    assert len(seen["requests"]) == 3  # each of the N attempts, its reward raising (fail_count=N)


def test_conversation_history_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str],
                                       lmserver: LMServer) -> None:
    questions = ["do you know the competition between pytorch and tensorflow?",
                 "which one won the battle? just tell me the result, don't include any reasoning, thanks!", "finish"]
    seen = compare(session, capsys, lmserver, conversation_history_tutorial, lmserver.base, questions)
    assert seen["outcome"][0] == "returned", seen["outcome"]
    assert len(seen["requests"]) == 3 and len(seen["requests"][1]["messages"]) == 4  # system, turn 1 (2), question


def test_cache_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str], lmserver: LMServer) -> None:
    seen = compare(session, capsys, lmserver, cache_tutorial, lmserver.base)
    assert seen["outcome"][0] == "returned", seen["outcome"]
    assert seen["stdout"][1] == "Total usage: {}" and seen["stdout"][2:] == ["Missed: True", "Hit: True"]
    assert len(seen["requests"]) == 4
