"""PYTEST_DONT_REWRITE: the tutorials' ``assert`` statements stay Python's, as in the user's script
(pytest's rewritten ones, sent to a worker by value, word their message by the test process's
pytest configuration, which the worker has not).

Programs of DSPy's tutorials run as written, with DSPy's real ``dspy.LM`` HTTP path swapped in for
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
import contextlib
import difflib
import inspect
import os
import pprint
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from enum import Enum
from hashlib import sha256
from typing import Any, Optional

import dspy
import orjson
import pytest
from dspy.clients import base_lm
from dspy.utils import DummyLM
from dspy.utils.callback import BaseCallback
from pydantic import BaseModel

import dspex
from tests.conformance.harness import (
    INPROCESS,
    AsyncInProcess,
    AsyncRunner,
    AsyncThroughSession,
    as_data,
    fresh_dspy_settings,
)
from tests.lmserver import LMServer

MODEL = "openai/gpt-4o-mini"


@pytest.fixture(scope="module")
def lmserver() -> Iterator[LMServer]:
    with LMServer() as server:
        yield server


@pytest.fixture(params=["c1", "c4"])
def session(dx: dspex.Client, request: pytest.FixtureRequest) -> Iterator[dspex.Session]:
    """A session of a capacity-1 worker (calls on its main thread) and of a capacity-4 one (calls in
    pool threads, several sessions at once)."""
    s = dx.session(request.param)
    try:
        yield s
    finally:
        s.close(timeout=10)


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


def streaming_script_top_level() -> None:
    """The tutorial script's top level: the streamified programs, module globals. Run at import and
    again by each case: a ``StreamListener`` without ``allow_reuse`` is spent once its field has
    streamed (DSPy keeps that state on it), as in a script run twice in one process."""
    global predict, stream_predict, two_fields, stream_two_fields, react, stream_react, answer_twice
    global stream_answer_twice, stream_status, sync_stream_predict
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


streaming_script_top_level()


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


# --------------------------------------------------------------------------- tutorials/custom_module


class QueryGenerator(dspy.Signature):
    """Generate a query based on question to fetch relevant context"""
    question: str = dspy.InputField()
    query: str = dspy.OutputField()


WIKI = ["LeBron James is an American basketball player.", "Michael Jordan is often called the GOAT of basketball."]


def search_wikipedia(query: str) -> list[str]:
    """Query ColBERT endpoint, which is a knowledge source based on wikipedia data"""
    # the tutorial asks dspy.ColBERTv2(url='http://20.102.90.50:2017/wiki17_abstracts'): no network here
    words = set(query.lower().split())
    return sorted(WIKI, key=lambda text: -len(words & set(text.lower().split())))[:1]


class WikiRAG(dspy.Module):  # the tutorial's ``RAG``
    def __init__(self):
        self.query_generator = dspy.Predict(QueryGenerator)
        self.answer_generator = dspy.ChainOfThought("question,context->answer")

    def forward(self, question, **kwargs):
        query = self.query_generator(question=question).query
        context = search_wikipedia(query)[0]
        return self.answer_generator(question=question, context=context).answer


def custom_module_tutorial(base: str) -> Any:
    lm = tutorial_lm(base)
    dspy.configure(lm=lm)
    rag = WikiRAG()
    print(rag(question="Is Lebron James the basketball GOAT?"))
    dspy.inspect_history(n=2)
    return history_of(lm)


# --------------------------------------------------------------------------- tutorials/tool_use

# The ToolHop data the tutorial downloads, in its shape: each function's code as text, with the
# "# Example usage" tail the tutorial cuts off
TOOLHOP = [
    {"question": "In which year was the author of Dune born?", "answer": "1920", "functions": [
        ('def author_of(book: str) -> str:\n    """Return the author of a book."""\n'
         '    return {"Dune": "Frank Herbert"}.get(book, "unknown")\n\n# Example usage\nprint(author_of("Dune"))'),
        ('def birth_year(person: str) -> int:\n    """Return the birth year of a person."""\n'
         '    return {"Frank Herbert": 1920}[person]\n\n# Example usage\nprint(birth_year("Frank Herbert"))')]},
    {"question": "How many letters has the capital of Peru?", "answer": "4", "functions": [
        ('def capital_of(country: str) -> str:\n    """Return the capital of a country."""\n'
         '    return {"Peru": "Lima"}[country]'),
        'def count_letters(word: str) -> int:\n    """Count the letters of a word."""\n    return len(word)']},
]

examples = []
fns2code = {}


def finish(answer: str):
    """Conclude the trajectory and return the final answer."""
    return answer


for datapoint in TOOLHOP:
    func_dict = {}
    for func_code in datapoint["functions"]:
        cleaned_code = func_code.rsplit("\n\n# Example usage", 1)[0]
        fn_name = re.search(r"^\s*def\s+([a-zA-Z0-9_]+)\s*\(", cleaned_code)
        fn_name = fn_name.group(1) if fn_name else None

        if not fn_name:
            continue

        local_vars = {}
        exec(cleaned_code, {}, local_vars)
        fn_obj = local_vars.get(fn_name)

        if callable(fn_obj):
            func_dict[fn_name] = fn_obj
            assert fn_obj not in fns2code, f"Duplicate function found: {fn_name}"
            fns2code[fn_obj] = (fn_name, cleaned_code)

    func_dict["finish"] = finish

    example = dspy.Example(question=datapoint["question"], answer=datapoint["answer"], functions=func_dict)
    examples.append(example.with_inputs("question", "functions"))

devset = examples


def wrap_function_with_timeout(fn):
    # the tutorial decorates the wrapper with func_timeout's @func_set_timeout(10): not installed here
    def wrapper(*args, **kwargs):
        try:
            return {"return_value": fn(*args, **kwargs), "errors": None}
        except Exception as e:
            return {"return_value": None, "errors": str(e)}

    return wrapper


def fn_metadata(func):
    signature = inspect.signature(func)
    docstring = inspect.getdoc(func) or "No docstring."
    return dict(function_name=func.__name__, arguments=str(signature), docstring=docstring)


def metric(example, pred, trace=None):
    gold = str(example.answer).rstrip(".0").replace(",", "").lower()
    pred = str(pred.answer).rstrip(".0").replace(",", "").lower()
    return pred == gold  # stricter than the original paper's metric!


class Agent(dspy.Module):
    def __init__(self, max_steps=5):
        self.max_steps = max_steps
        instructions = "For the final answer, produce short (not full sentence) answers in which you format dates as YYYY-MM-DD, names as Firstname Lastname, and numbers without leading 0s."
        signature = dspy.Signature('question, trajectory, functions -> next_selected_fn, args: dict[str, Any]', instructions)
        self.react = dspy.ChainOfThought(signature)

    def forward(self, question, functions):
        tools = {fn_name: fn_metadata(fn) for fn_name, fn in functions.items()}
        trajectory = []

        for _ in range(self.max_steps):
            pred = self.react(question=question, trajectory=trajectory, functions=tools)
            selected_fn = pred.next_selected_fn.strip('"').strip("'")
            fn_output = wrap_function_with_timeout(functions[selected_fn])(**pred.args)
            trajectory.append(dict(reasoning=pred.reasoning, selected_fn=selected_fn, args=pred.args, **fn_output))

            if selected_fn == "finish":
                break

        return dspy.Prediction(answer=fn_output.get("return_value", ''), trajectory=trajectory)


# the model's choices, keyed by what the last message shows (DummyLM's dict mode: the first key found)
TOOL_CHOICES = {
    '"return_value": 1920': {"reasoning": "done", "next_selected_fn": "finish", "args": {"answer": "1920"}},
    '"return_value": 4': {"reasoning": "done", "next_selected_fn": "finish", "args": {"answer": "4"}},
    "Frank Herbert": {"reasoning": "year", "next_selected_fn": "birth_year", "args": {"person": "Frank Herbert"}},
    "Lima": {"reasoning": "count", "next_selected_fn": "count_letters", "args": {"word": "Lima"}},
    "Dune": {"reasoning": "author", "next_selected_fn": "author_of", "args": {"book": "Dune"}},
    "Peru": {"reasoning": "capital", "next_selected_fn": "capital_of", "args": {"country": "Perú"}},
}


def tool_use_tutorial() -> Any:
    dspy.configure(lm=DummyLM(TOOL_CHOICES))
    evaluate = dspy.Evaluate(devset=devset, metric=metric, num_threads=24, display_progress=True, display_table=0,
                             max_errors=999)
    agent = Agent()
    result = evaluate(agent)
    return result.score, [(pred.answer, pred.trajectory, score) for _, pred, score in result.results]


# --------------------------------------------------------------------------- tutorials/email_extraction


class EmailType(str, Enum):
    ORDER_CONFIRMATION = "order_confirmation"
    SUPPORT_REQUEST = "support_request"
    MEETING_INVITATION = "meeting_invitation"
    NEWSLETTER = "newsletter"
    PROMOTIONAL = "promotional"
    INVOICE = "invoice"
    SHIPPING_NOTIFICATION = "shipping_notification"
    OTHER = "other"


class UrgencyLevel(str, Enum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class ExtractedEntity(BaseModel):
    entity_type: str
    value: str
    confidence: float


class ClassifyEmail(dspy.Signature):
    """Classify the type and urgency of an email based on its content."""

    email_subject: str = dspy.InputField(desc="The subject line of the email")
    email_body: str = dspy.InputField(desc="The main content of the email")
    sender: str = dspy.InputField(desc="Email sender information")

    email_type: EmailType = dspy.OutputField(desc="The classified type of email")
    urgency: UrgencyLevel = dspy.OutputField(desc="The urgency level of the email")
    reasoning: str = dspy.OutputField(desc="Brief explanation of the classification")


class ExtractEntities(dspy.Signature):
    """Extract key entities and information from email content."""

    email_content: str = dspy.InputField(desc="The full email content including subject and body")
    email_type: EmailType = dspy.InputField(desc="The classified type of email")

    key_entities: list[ExtractedEntity] = dspy.OutputField(desc="List of extracted entities with type, value, and confidence")
    financial_amount: Optional[float] = dspy.OutputField(desc="Any monetary amounts found (e.g., '$99.99')")
    important_dates: list[str] = dspy.OutputField(desc="List of important dates found in the email")
    contact_info: list[str] = dspy.OutputField(desc="Relevant contact information extracted")


class GenerateActionItems(dspy.Signature):
    """Determine what actions are needed based on the email content and extracted information."""

    email_type: EmailType = dspy.InputField()
    urgency: UrgencyLevel = dspy.InputField()
    email_summary: str = dspy.InputField(desc="Brief summary of the email content")
    extracted_entities: list[ExtractedEntity] = dspy.InputField(desc="Key entities found in the email")

    action_required: bool = dspy.OutputField(desc="Whether any action is required")
    action_items: list[str] = dspy.OutputField(desc="List of specific actions needed")
    deadline: Optional[str] = dspy.OutputField(desc="Deadline for action if applicable")
    priority_score: int = dspy.OutputField(desc="Priority score from 1-10")


class SummarizeEmail(dspy.Signature):
    """Create a concise summary of the email content."""

    email_subject: str = dspy.InputField()
    email_body: str = dspy.InputField()
    key_entities: list[ExtractedEntity] = dspy.InputField()

    summary: str = dspy.OutputField(desc="A 2-3 sentence summary of the email's main points")


class EmailProcessor(dspy.Module):
    """A comprehensive email processing system using DSPy."""

    def __init__(self):
        super().__init__()

        # Initialize our processing components
        self.classifier = dspy.ChainOfThought(ClassifyEmail)
        self.entity_extractor = dspy.ChainOfThought(ExtractEntities)
        self.action_generator = dspy.ChainOfThought(GenerateActionItems)
        self.summarizer = dspy.ChainOfThought(SummarizeEmail)

    def forward(self, email_subject: str, email_body: str, sender: str = ""):
        """Process an email and extract structured information."""

        # Step 1: Classify the email
        classification = self.classifier(
            email_subject=email_subject,
            email_body=email_body,
            sender=sender
        )

        # Step 2: Extract entities
        full_content = f"Subject: {email_subject}\n\nFrom: {sender}\n\n{email_body}"
        entities = self.entity_extractor(
            email_content=full_content,
            email_type=classification.email_type
        )

        # Step 3: Generate summary
        summary = self.summarizer(
            email_subject=email_subject,
            email_body=email_body,
            key_entities=entities.key_entities
        )

        # Step 4: Determine actions
        actions = self.action_generator(
            email_type=classification.email_type,
            urgency=classification.urgency,
            email_summary=summary.summary,
            extracted_entities=entities.key_entities
        )

        # Step 5: Structure the results
        return dspy.Prediction(
            email_type=classification.email_type,
            urgency=classification.urgency,
            summary=summary.summary,
            key_entities=entities.key_entities,
            financial_amount=entities.financial_amount,
            important_dates=entities.important_dates,
            action_required=actions.action_required,
            action_items=actions.action_items,
            deadline=actions.deadline,
            priority_score=actions.priority_score,
            reasoning=classification.reasoning,
            contact_info=entities.contact_info
        )


SAMPLE_EMAILS = [
    {
        "subject": "Order Confirmation #12345 - Your MacBook Pro is on the way!",
        "body": """Dear John Smith,

Thank you for your order! We're excited to confirm that your order #12345 has been processed.

Order Details:
- MacBook Pro 14-inch (Space Gray)
- Order Total: $2,399.00
- Estimated Delivery: December 15, 2024
- Tracking Number: 1Z999AA1234567890

If you have any questions, please contact our support team at support@techstore.com.

Best regards,
TechStore Team""",
        "sender": "orders@techstore.com"
    },
    {
        "subject": "URGENT: Server Outage - Immediate Action Required",
        "body": """Hi DevOps Team,

We're experiencing a critical server outage affecting our production environment.

Impact: All users unable to access the platform
Started: 2:30 PM EST

Please join the emergency call immediately: +1-555-123-4567

This is our highest priority.

Thanks,
Site Reliability Team""",
        "sender": "alerts@company.com"
    },
]


def run_email_processing_demo(lm):
    """Demonstration of the email processing system (the tutorial's; the LM is the argument, and
    its ``os.environ["OPENAI_API_KEY"] = ...`` is left out: the loopback LM takes its key)."""

    # Configure DSPy
    dspy.configure(lm=lm)

    # Create our email processor
    processor = EmailProcessor()

    # Process each email and display results
    print("🚀 Email Processing Demo")
    print("=" * 50)

    results = []
    for i, email in enumerate(SAMPLE_EMAILS):
        print(f"\n📧 EMAIL {i+1}: {email['subject'][:50]}...")

        # Process the email
        result = processor(
            email_subject=email["subject"],
            email_body=email["body"],
            sender=email["sender"]
        )
        results.append(result)

        # Display key results
        print(f"   📊 Type: {result.email_type}")
        print(f"   🚨 Urgency: {result.urgency}")
        print(f"   📝 Summary: {result.summary}")

        if result.financial_amount:
            print(f"   💰 Amount: ${result.financial_amount:,.2f}")

        if result.action_required:
            print("   ✅ Action Required: Yes")
            if result.deadline:
                print(f"   ⏰ Deadline: {result.deadline}")
        else:
            print("   ✅ Action Required: No")
    return results


# the model's answers by step, keyed by an input only that step's last message shows
EMAIL_ANSWERS = {
    "[[ ## email_summary ## ]]": {"reasoning": "r", "action_required": "true", "action_items": '["Join the call"]',
                                  "deadline": "today", "priority_score": "9"},
    "[[ ## email_content ## ]]": {"reasoning": "r", "key_entities": '[{"entity_type": "amount", "value": "$2,399.00", '
                                  '"confidence": 0.9}]', "financial_amount": "2399.0",
                                  "important_dates": '["December 15, 2024"]', "contact_info": '["support@techstore.com"]'},
    "[[ ## sender ## ]]": {"reasoning": "r", "email_type": "order_confirmation", "urgency": "high"},
    "[[ ## email_body ## ]]": {"reasoning": "r", "summary": "An email that needs attention."},
}


def email_extraction_tutorial(base: str | None) -> Any:
    """Over the loopback server (``base``), whose stand-in model answers no ``EmailType``: the
    tutorial's first email fails to parse; with ``None``, DummyLM's answers go through."""
    lm = tutorial_lm(base) if base else DummyLM(EMAIL_ANSWERS)
    return run_email_processing_demo(lm), history_of(lm)


# --------------------------------------------------------------------------- tutorials/papillon (gepa_papillon)


class CraftRedactedRequest(dspy.Signature):
    """
    Given a private user query, create a privacy-preserving request for a powerful external LLM.
    The LLM may assist without learning private information about the user.
    """

    user_query = dspy.InputField()
    llm_request = dspy.OutputField()


class RespondToQuery(dspy.Signature):
    """
    Respond to a user query.
    For inspiration, we found a potentially related request to a powerful external LLM and its response.
    """

    related_llm_request = dspy.InputField()
    related_llm_response = dspy.InputField(desc="information from a powerful LLM responding to a related request")
    user_query = dspy.InputField(desc="the user's request you need to fulfill")
    response = dspy.OutputField(desc="your final response to the user's request")


class PAPILLON(dspy.Module):
    def __init__(self, untrusted_model):
        self.craft_redacted_request = dspy.ChainOfThought(CraftRedactedRequest)
        self.respond_to_query = dspy.Predict(RespondToQuery)
        self.untrusted_model = untrusted_model

    def forward(self, user_query):
        try:
            llm_request = self.craft_redacted_request(user_query=user_query).llm_request
            llm_response = self.untrusted_model(llm_request)[0]
            response = self.respond_to_query(
                related_llm_request=llm_request, related_llm_response=llm_response, user_query=user_query
            ).response
        except Exception:
            return dspy.Prediction(llm_request="", llm_response="", response="")

        return dspy.Prediction(llm_request=llm_request, llm_response=llm_response, response=response)


class JudgeQuality(dspy.Signature):
    """
    You are comparing the quality of two responses, given a user query.
    Is response A at least as good as response B?
    """

    user_query = dspy.InputField(desc="The user's request to be fulfilled.")
    response_A = dspy.InputField()
    response_B = dspy.InputField()
    judgment: bool = dspy.OutputField()


class JudgeLeakage(dspy.Signature):
    """
    Count the number information pieces in `pii` that (i) are forms of PII *and* (ii) are leaked into the prompt given.
    Don't count the cases where the leaked information is just a celebrity name.
    Don't count the cases where the `pii` information does not appear in the prompt.
    """

    pii = dspy.InputField()
    prompt = dspy.InputField()
    num_pii_leaked: int = dspy.OutputField()


class LLMJudge(dspy.Module):
    def __init__(self):
        self.quality_judge = dspy.ChainOfThought(JudgeQuality)
        self.fact_checker = dspy.ChainOfThought(JudgeLeakage)

    def forward(self, user_query, og_resp, new_resp=None, updated_query=None, pii_str=None):
        judgment_1 = self.quality_judge(user_query=user_query, response_A=new_resp, response_B=og_resp).judgment
        judgment_2 = self.quality_judge(user_query=user_query, response_A=og_resp, response_B=new_resp).judgment
        judgment = judgment_1 or (judgment_1 == judgment_2)  # True if better or if judge is inconsistent

        pii = list(set(pii_str.split("||")))  # The pii_str field must be separated by `||`
        pii_score = self.fact_checker(pii=pii, prompt=updated_query).num_pii_leaked
        pii_score = pii_score / len(pii) if len(pii) > 0 else 0

        return dspy.Prediction(quality=judgment, leakage=pii_score)


# the script's top level, run by the ``papillon_script`` fixture with the loopback server's address
# (the tutorial reads its API key with input() and builds these two LMs with it)
local_lm: Any = None
large_lm: Any = None
llm_judge: Any = None

PUPA = [  # the shape of Columbia-NLP/PUPA's pupa_new rows, which the tutorial downloads; one PII unit
    # each: the judge lists ``set(pii_str.split("||"))``, in an order of the process's string hashing
    {"user_query": "Write a cover letter for Jane Roe applying to Acme as an engineer.",
     "target_response": "Dear Acme team, ...", "pii_units": "Jane Roe"},
    {"user_query": "My SSN is 123-45-6789; how do I file taxes late?", "target_response": "To file late, ...",
     "pii_units": "123-45-6789"},
    {"user_query": "Summarize my diagnosis of asthma for my employer.", "target_response": "A summary ...",
     "pii_units": "asthma"},
]
examples = [
    dspy.Example(
        {"target_response": x["target_response"], "user_query": x["user_query"], "pii_str": x["pii_units"]}
    ).with_inputs("user_query")
    for x in PUPA
]
papillon_devset = examples


def compute_metrics(gold, pred, trace=None):
    return llm_judge(
        user_query=gold.user_query,
        new_resp=pred.response,
        og_resp=gold.target_response,
        updated_query=pred.llm_request,
        pii_str=gold.pii_str,
    )


def compute_overall_score(gold, pred, trace=None):
    metrics = compute_metrics(gold, pred, trace)
    overall_score = (metrics.quality + (1 - metrics.leakage)) / 2.0
    return overall_score


def papillon_tutorial() -> Any:
    """The zero-shot evaluation, with ``dspy.configure(lm=local_lm)`` done by the script's top
    level (on the client): the judge runs on ``large_lm`` (``set_lm``), the untrusted model is
    ``large_lm`` called directly."""
    seen_before = [len(lm.history) for lm in (local_lm, large_lm)]
    zeroshot = PAPILLON(untrusted_model=large_lm)

    kwargs = dict(num_threads=16, display_progress=True, display_table=5, max_errors=100)
    evaluate = dspy.Evaluate(metric=compute_overall_score, devset=papillon_devset, **kwargs)
    result = evaluate(zeroshot)
    # Evaluate's threads call the LMs in any order: each LM's calls are compared as a set
    calls = [sorted(map(repr, history_of(lm)[start:])) for lm, start in zip((local_lm, large_lm), seen_before)]
    return result.score, [(pred, score) for _, pred, score in result.results], calls


# --------------------------------------------------------------------------- tutorials/saving


GSM8K_ROWS = [  # the shape of GSM8K().train, which the tutorial downloads
    {"question": "Tom has 3 apples and buys 4 more. How many apples has he?", "gold_reasoning": "3 + 4 = 7", "answer": "7"},
    {"question": "A box holds 6 eggs. How many eggs are in 2 boxes?", "gold_reasoning": "6 * 2 = 12", "answer": "12"},
    {"question": "Sam had 10 pens and gave away 4. How many are left?", "gold_reasoning": "10 - 4 = 6", "answer": "6"},
]


def saving_tutorial(base: str, workdir: str, as_written: bool) -> Any:
    """The tutorial's paths are relative (``./dspy_program/``): it runs in a new directory of
    ``workdir`` (each run its own). As written, it reads ``compiled_dspy_program.demos`` and
    ``.signature``, which a ``ChainOfThought`` of DSPy 3.4.1 lacks (``AttributeError``); else
    those of its ``predict``, and a demo loaded from the ``.pkl`` is the ``dspy.Example`` it saved,
    not the dict the tutorial's comment says."""

    def predictor(program: Any) -> Any:
        return program if as_written else program.predict

    def loaded(demo: Any) -> Any:
        return demo if as_written or isinstance(demo, dict) else demo.toDict()

    from dspy.datasets.gsm8k import gsm8k_metric

    with contextlib.chdir(tempfile.mkdtemp(dir=workdir)):
        dspy.configure(lm=tutorial_lm(base))
        gsm8k_trainset = [dspy.Example(**row).with_inputs("question") for row in GSM8K_ROWS]
        dspy_program = dspy.ChainOfThought("question -> answer")
        optimizer = dspy.BootstrapFewShot(metric=gsm8k_metric, max_bootstrapped_demos=4, max_labeled_demos=4,
                                          max_rounds=5)
        compiled_dspy_program = optimizer.compile(dspy_program, trainset=gsm8k_trainset)

        os.makedirs("./dspy_program")  # DSPy 3.4.1 saves state into an existing directory only
        compiled_dspy_program.save("./dspy_program/program.json", save_program=False)
        compiled_dspy_program.save("./dspy_program/program.pkl", save_program=False)

        loaded_dspy_program = dspy.ChainOfThought("question -> answer")  # Recreate the same program.
        loaded_dspy_program.load("./dspy_program/program.json")
        assert len(predictor(compiled_dspy_program).demos) == len(predictor(loaded_dspy_program).demos)
        for original_demo, loaded_demo in zip(predictor(compiled_dspy_program).demos, predictor(loaded_dspy_program).demos):
            # Loaded demo is a dict, while the original demo is a dspy.Example.
            assert original_demo.toDict() == loaded(loaded_demo)
        assert str(predictor(compiled_dspy_program).signature) == str(predictor(loaded_dspy_program).signature)

        loaded_dspy_program = dspy.ChainOfThought("question -> answer")  # Recreate the same program.
        loaded_dspy_program.load("./dspy_program/program.pkl", allow_pickle=True)
        assert len(predictor(compiled_dspy_program).demos) == len(predictor(loaded_dspy_program).demos)
        for original_demo, loaded_demo in zip(predictor(compiled_dspy_program).demos, predictor(loaded_dspy_program).demos):
            # Loaded demo is a dict, while the original demo is a dspy.Example.
            assert original_demo.toDict() == loaded(loaded_demo)
        assert str(predictor(compiled_dspy_program).signature) == str(predictor(loaded_dspy_program).signature)

        compiled_dspy_program.save("./dspy_program/", save_program=True)
        loaded_dspy_program = dspy.load("./dspy_program/", allow_pickle=True)
        assert len(predictor(compiled_dspy_program).demos) == len(predictor(loaded_dspy_program).demos)
        for original_demo, loaded_demo in zip(predictor(compiled_dspy_program).demos, predictor(loaded_dspy_program).demos):
            # Loaded demo is a dict, while the original demo is a dspy.Example.
            assert original_demo.toDict() == loaded(loaded_demo)
        assert str(predictor(compiled_dspy_program).signature) == str(predictor(loaded_dspy_program).signature)
        answer = loaded_dspy_program(question="Ann has 2 cats and gets 1 more. How many cats has she?")
        return [d.toDict() for d in predictor(compiled_dspy_program).demos], answer, sorted(os.listdir("dspy_program"))


# --------------------------------------------------------------------------- tutorials/observability

PASSAGES = ["Shohei Ohtani plays for the Los Angeles Dodgers.", "The Dodgers won the 2024 World Series.",
            "Ohtani played for the Los Angeles Angels until 2023.", "Baseball is played with nine innings."]


def retrieve(query: str):
    """Retrieve top 3 relevant information from ColBert"""
    # the tutorial asks dspy.ColBERTv2(url="http://20.102.90.50:2017/wiki17_abstracts"): no network here
    words = set(query.lower().split())
    return sorted(PASSAGES, key=lambda text: -len(words & set(text.lower().split())))[:3]


agent = dspy.ReAct("question -> answer", tools=[retrieve], max_iters=3)


class AgentLoggingCallback(BaseCallback):
    # 2. Implement on_module_end handler to run a custom logging code.
    def on_module_end(self, call_id, outputs, exception):
        step = "Reasoning" if self._is_reasoning_output(outputs) else "Acting"
        print(f"== {step} Step ===")
        for k, v in outputs.items():
            print(f"  {k}: {v}")
        print("\n")

    def _is_reasoning_output(self, outputs):
        return any(k.startswith("Thought") for k in outputs.keys())


def observability_tutorial() -> Any:
    """The agent's calls, with ``dspy.configure(lm=lm)`` and the logging callback done by the
    script's top level (on the client), then ``dspy.inspect_history(n=5)`` where it runs."""
    prediction = agent(question="Which baseball team does Shohei Ohtani play for in June 2025?")
    print(prediction.answer)
    # Print out 5 LLM calls
    dspy.inspect_history(n=5)
    return prediction


# --------------------------------------------------------------------------- tutorials/deployment


class Question(BaseModel):
    text: str


class HTTPException(Exception):
    """FastAPI's (not installed here): what the tutorial's endpoint raises on an error."""

    def __init__(self, status_code: int, detail: Any = None) -> None:
        super().__init__(status_code, detail)
        self.status_code, self.detail = status_code, detail


# Configure your language model and 'asyncify' your DSPy program (the LM and async_max_workers=4
# are configured by the script's top level: compare's settings)
dspy_program = dspy.ChainOfThought("question -> answer")
dspy_program = dspy.asyncify(dspy_program)


async def predict_endpoint(question: Question):  # the tutorial's ``@app.post("/predict") async def predict``
    try:
        result = await dspy_program(question=question.text)
        return {
            "status": "success",
            "data": result.toDict()
        }
    except Exception as e:
        raise HTTPException(status_code=500, detail=str(e))


async def serve_requests(texts: list[str]) -> Any:
    """What the server answers each request: the endpoint's dict, or its HTTPException's code."""
    answers = []
    for text in texts:
        try:
            answers.append(await predict_endpoint(Question(text=text)))
        except HTTPException as exc:
            print(f"HTTP {exc.status_code}: {str(exc.detail).splitlines()[0]}")
            answers.append((exc.status_code, exc.detail))
    return answers


# --------------------------------------------------------------------------- learn/programming/modules: usage tracking


class ScoredProgram(dspy.Module):  # the docs' ``MyProgram``: a module overriding __call__
    def __init__(self):
        self.predict1 = dspy.ChainOfThought("question -> answer")
        self.predict2 = dspy.ChainOfThought("question, answer -> score")

    def __call__(self, question: str) -> str:
        answer = self.predict1(question=question)
        score = self.predict2(question=question, answer=answer)
        return score


def usage_tracking_tutorial() -> Any:
    """``dspy.configure(lm=..., track_usage=True)`` by the script's top level (on the client)."""
    program = ScoredProgram()
    output = program(question="What is the capital of France?")
    print(output.get_lm_usage())
    return output


# --------------------------------------------------------------------------- with handles: the script on the client
# The same tutorials written as the user's script with the program made in the session
# (``put``: ``s.put`` there, the object itself in-process) and everything else here: the LM
# configured here, the conversation's history, the printing and ``dspy.inspect_history()``.


def conversation_history_with_handles(put: Callable[[Any], Any], base: str, questions: list[str]) -> Any:
    lm = tutorial_lm(base)
    dspy.configure(lm=lm)
    predict = put(dspy.Predict(QA))
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
    return history, history_of(lm)


def custom_module_with_handles(put: Callable[[Any], Any], base: str) -> Any:
    lm = tutorial_lm(base)
    dspy.configure(lm=lm)
    rag = put(WikiRAG())
    print(rag(question="Is Lebron James the basketball GOAT?"))
    dspy.inspect_history(n=2)
    return history_of(lm)


def output_refinement_with_handles(put: Callable[[Any], Any], base: str) -> Any:
    lm = tutorial_lm(base)
    dspy.configure(lm=lm)
    best_of_3 = put(dspy.BestOfN(
        module=dspy.ChainOfThought("question -> answer"),
        N=3,
        reward_fn=one_word_answer,
        threshold=1.0
    ))
    result = best_of_3(question="What is the capital of Belgium?")
    print(result.answer)  # Brussels
    refine = put(dspy.Refine(
        module=dspy.ChainOfThought("question -> answer"),
        N=3,
        reward_fn=one_word_answer,
        threshold=1.0
    ))
    refined = refine(question="What is the capital of Belgium?")
    print(refined.answer)  # Brussels
    return result, refined, history_of(lm)


def email_extraction_with_handles(put: Callable[[Any], Any]) -> Any:
    lm = DummyLM(EMAIL_ANSWERS)
    dspy.configure(lm=lm)
    processor = put(EmailProcessor())
    email = SAMPLE_EMAILS[0]
    result = processor(email_subject=email["subject"], email_body=email["body"], sender=email["sender"])
    print(f"   📊 Type: {result.email_type}")
    print(f"   💰 Amount: ${result.financial_amount:,.2f}")
    return result, [type(e).__name__ for e in result.key_entities], history_of(lm)


def async_tool_conversion_with_handles(put: Callable[[Any], Any]) -> Any:
    """"Using Async Tools in Synchronous Contexts" with the tool made in the session: the
    conversion setting given here, by ``dspy.context`` and by ``dspy.configure``. (The rest of
    the async tutorial awaits: through a session that is ``dspex.aio``'s, whose calls are
    awaitables where in-process ones are not, test_asyncio.py.)"""
    tool = put(dspy.Tool(async_tool))
    outcomes = []
    try:
        tool(x=5)  # without the conversion DSPy refuses
    except ValueError as exc:
        outcomes.append(f"{raised_type(exc).__name__}: {exc}")
    # Option 1: Use context manager for temporary conversion
    with dspy.context(allow_tool_async_sync_conversion=True):
        result = tool(x=5)  # Works in sync context
        print(result)  # 10
    # Option 2: Configure globally
    dspy.configure(allow_tool_async_sync_conversion=True)
    result = tool(x=5)  # Now works everywhere
    print(result)  # 10
    return outcomes


def observability_with_handles(put: Callable[[Any], Any], base: str) -> Any:
    lm = tutorial_lm(base)
    dspy.configure(lm=lm)
    dspy.configure(callbacks=[AgentLoggingCallback()])
    agent = put(dspy.ReAct("question -> answer", tools=[retrieve], max_iters=3))
    prediction = agent(question="Which baseball team does Shohei Ohtani play for in June 2025?")
    print(prediction.answer)
    # Print out 5 LLM calls
    dspy.inspect_history(n=5)
    return prediction, history_of(lm)


def streaming_with_handles(stream: Callable[..., Any], base: str) -> Any:
    """The streaming tutorial's programs built here (``dspy.streamify`` at the script's top level)
    and read item by item: ``stream(program, kwargs)`` is ``s.stream_apply`` through a session, the
    async generator driven by ``asyncio.run`` in-process."""
    lm = tutorial_lm(base)
    dspy.configure(lm=lm)
    two_fields = QuestionThenSimplify()
    programs = [
        (dspy.streamify(dspy.Predict("question->answer"),
                        stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer")]),
         {"question": "Why did a chicken cross the kitchen?"}),
        (dspy.streamify(two_fields, stream_listeners=[
            dspy.streaming.StreamListener(signature_field_name="answer"),
            dspy.streaming.StreamListener(signature_field_name="simplified_answer")]),
         {"question": "why did a chicken cross the kitchen?"}),
        (dspy.streamify(dspy.ReAct("question->answer", tools=[fetch_user_info, get_sports_news]), stream_listeners=[
            dspy.streaming.StreamListener(signature_field_name="next_thought", allow_reuse=True)]),
         {"question": "What sports news happened in the year Adam was born?"}),
        (dspy.streamify(DoubleThenSum(),
                        stream_listeners=[dspy.streaming.StreamListener(signature_field_name="reasoning")],
                        status_message_provider=MyStatusMessageProvider()),
         {"num": 3}),
    ]
    outputs = []
    for program, kwargs in programs:
        return_value = None
        for chunk in stream(program, kwargs):
            if isinstance(chunk, dspy.streaming.StreamResponse | dspy.streaming.StatusMessage):
                print(chunk)
            elif isinstance(chunk, dspy.Prediction):
                return_value = chunk
        print("Final output: ", return_value)
        outputs.append(return_value)
    return outputs, history_of(lm)


def drive(program: Callable[..., Any], kwargs: dict[str, Any]) -> list[Any]:
    """A streamified program's items, read in-process to the end."""
    async def read_output_stream():
        return [chunk async for chunk in program(**kwargs)]

    return asyncio.run(read_output_stream())


async def async_tutorial_awaited(arun: AsyncRunner, base: str) -> Any:
    """The async tutorial as an asyncio script whose awaits go through ``dspex.aio`` (``await
    arun(fn, ...)`` is ``await fn(...)`` in-process): the LM configured here, ``inspect_history`` here."""
    lm = tutorial_lm(base)
    dspy.configure(lm=lm)
    predict = dspy.Predict("question->answer")
    # Use acall() for async execution
    output = await arun(predict.acall, question="why did a chicken cross the kitchen?")
    print(output)
    tool = dspy.Tool(foo)
    # Execute the tool asynchronously
    await arun(tool.acall, x=2)
    mod = TwoStepModule()
    result = await arun(mod.acall, question="Why did a chicken cross the kitchen?")
    print(result)
    dspy.inspect_history(n=3)
    return result, history_of(lm)


def deployment_with_handles(put: Callable[[Any], Any], base: str, texts: list[str]) -> Any:
    """The deployment tutorial's server with the program made in the session: its endpoints
    awaited together (``asyncio.gather``), as requests arriving at once, each in one of
    ``async_max_workers`` threads calling the session."""
    lm = tutorial_lm(base)
    dspy.configure(lm=lm, async_max_workers=4)  # default is 8
    dspy_program = dspy.asyncify(put(dspy.ChainOfThought("question -> answer")))

    async def predict(question: Question):
        try:
            result = await dspy_program(question=question.text)
            return {
                "status": "success",
                "data": result.toDict()
            }
        except Exception as e:
            raise HTTPException(status_code=500, detail=str(e))

    async def serve() -> Any:
        return await asyncio.gather(*(predict(Question(text=text)) for text in texts), return_exceptions=True)

    answers = asyncio.run(serve())
    return [(a.status_code, a.detail) if isinstance(a, HTTPException) else a for a in answers], \
        sorted(map(repr, history_of(lm)))


def usage_tracking_with_handles(put: Callable[[Any], Any], base: str) -> Any:
    # Configure DSPy with tracking enabled
    dspy.configure(
        lm=tutorial_lm(base),
        track_usage=True
    )
    program = put(ScoredProgram())
    output = program(question="What is the capital of France?")
    print(output.get_lm_usage())
    with dspy.track_usage() as usage:
        program(question="What is the capital of Zambia?")
    print(usage.get_total_tokens())
    return output


async def streaming_awaited(arun: AsyncRunner, base: str) -> Any:
    """The streaming tutorial's ``read_output_stream`` as written (``async for chunk in
    output_stream``) over programs built here: in-process the streamified program's own async
    generator, through ``dspex.aio`` the session's stream of it (``s.stream_apply``)."""
    lm = tutorial_lm(base)
    dspy.configure(lm=lm)
    status_program = dspy.streamify(
        DoubleThenSum(),
        stream_listeners=[dspy.streaming.StreamListener(signature_field_name="reasoning")],
        status_message_provider=MyStatusMessageProvider(),
    )
    two_fields_program = dspy.streamify(QuestionThenSimplify(), stream_listeners=[
        dspy.streaming.StreamListener(signature_field_name="answer"),
        dspy.streaming.StreamListener(signature_field_name="simplified_answer")])

    def stream_of(program: Any, **kwargs: Any) -> Any:
        return program(**kwargs) if arun.mode == INPROCESS else arun.s.stream_apply(program, kwargs=kwargs)  # type: ignore[attr-defined]

    async def read_output_stream(output_stream):
        return_value = None
        async for chunk in output_stream:
            if isinstance(chunk, dspy.streaming.StreamResponse):
                print(chunk)
            elif isinstance(chunk, dspy.Prediction):
                return_value = chunk
            elif isinstance(chunk, dspy.streaming.StatusMessage):
                print(chunk)
        return return_value

    outputs = [await read_output_stream(stream_of(status_program, num=3)),
               await read_output_stream(stream_of(two_fields_program, question="why did a chicken cross the kitchen?"))]
    print("Final output: ", outputs)
    return outputs, history_of(lm)


# --------------------------------------------------------------------------- the comparison


# the times and rates of a line, which no two runs share: a log's time, a progress bar's [00:00<00:00, 8004.40it/s]
PROGRESS = re.compile(r"\d+%\|")
TIMES = re.compile(r"\d{4}[-/]\d\d[-/]\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?|\[\d\d:\d\d<[^\]]*\]")


def shown_lines(text: str) -> list[str]:
    """Printed text by line, times and rates left out, and of a progress bar only its end, once:
    the running score a bar shows on the way depends on which of ``dspy.Evaluate``'s threads ends
    first, and whether tqdm draws the full bar before its ``close()`` draws it again on how long the
    last step took (``mininterval``)."""
    lines: list[str] = []
    for line in TIMES.sub("<time>", text).splitlines():
        bar = PROGRESS.search(line)
        if not bar or ("100%|" in line and lines[-1:] != [line]):
            lines.append(line)
    return lines


def raised_type(exc: Exception) -> type:
    """The exception's type as the program raised it: a session's ``RemoteError[T]`` is also a ``T``
    (docs/remote-objects.md, "Errors"), and that ``T`` is the one compared."""
    if isinstance(exc, dspex.RemoteError):
        (original,) = [base for base in type(exc).__bases__ if base is not dspex.RemoteError]
        return original
    return type(exc)


@contextlib.contextmanager
def fresh_global_history() -> Iterator[None]:
    """DSPy's process-wide LM history (``dspy.inspect_history`` prints its end) empty, as in a new
    process, and put back after: a session's is its own, and earlier cases' calls are not the
    program's."""
    saved = list(base_lm.GLOBAL_HISTORY)
    base_lm.GLOBAL_HISTORY.clear()
    try:
        yield
    finally:
        base_lm.GLOBAL_HISTORY[:] = saved


def observe(call: Callable[[], Any], capsys: pytest.CaptureFixture[str], server: LMServer) -> dict[str, Any]:
    """What a program shows its user: its result or exception, printed and logged text, warnings,
    and what it sent the provider."""
    with server.lock:
        server.calls.clear()
    capsys.readouterr()
    with fresh_global_history(), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            outcome: Any = ("returned", as_data(call()))
        except Exception as exc:
            outcome = ("raised", raised_type(exc).__qualname__, str(exc))
    captured = capsys.readouterr()
    return {
        "outcome": outcome,
        "stdout": shown_lines(captured.out),
        "stderr": shown_lines(captured.err),
        "warnings": [(w.category.__name__, str(w.message)) for w in warned],
        # in the order they were received, which a program's threads leave open
        "requests": sorted((c.body for c in server.completions()), key=repr),
    }


def assert_same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """The session's observation is the in-process one, key by key (a failure shows the diff)."""
    for key, wanted in expected.items():
        assert got[key] == wanted, f"{key}: through a session differs from in-process:\n" + "\n".join(
            difflib.unified_diff(pprint.pformat(wanted, width=150).splitlines(),
                                 pprint.pformat(got[key], width=150).splitlines(), "in-process", "session", lineterm=""))


def awaited(result: Any) -> Any:
    """A program's result as the worker gives it: an ``async def``'s awaited (in a new loop)."""
    return asyncio.run(result) if inspect.iscoroutine(result) else result


def compare(session: dspex.Session, capsys: pytest.CaptureFixture[str], server: LMServer,
            program: Callable[..., Any], *args: Any, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``settings``: what the script's top level configured (``dspy.configure``), on the client
    and again for the in-process run."""
    # the session first: it gets the program's module globals as they are now, and the in-process
    # run may change them (a StreamListener is spent once its field has streamed), as a second run
    # of the script in one process would see
    with fresh_dspy_settings():
        dspy.configure(**settings or {})
        got = observe(lambda: session.run(program, *args), capsys, server)
    with fresh_dspy_settings():
        dspy.configure(**settings or {})
        expected = observe(lambda: awaited(program(*args)), capsys, server)
    assert_same(got, expected)
    return expected


def compare_with_handles(session: dspex.Session, capsys: pytest.CaptureFixture[str], server: LMServer,
                         script: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """``script(put, *args)`` run here twice: with ``put=session.put``, then in-process."""
    with fresh_dspy_settings():
        got = observe(lambda: script(session.put, *args), capsys, server)
    with fresh_dspy_settings():
        expected = observe(lambda: script(lambda obj: obj, *args), capsys, server)
    assert_same(got, expected)
    return expected


def test_async_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str], lmserver: LMServer) -> None:
    seen = compare(session, capsys, lmserver, async_tutorial, lmserver.base)
    assert seen["outcome"][0] == "returned", seen["outcome"]
    assert "I get: 2" in seen["stdout"] and seen["stdout"].count("10") == 2
    assert len(seen["requests"]) == 3


def test_streaming_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str], lmserver: LMServer) -> None:
    streaming_script_top_level()
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


def test_custom_module_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str], lmserver: LMServer) -> None:
    seen = compare(session, capsys, lmserver, custom_module_tutorial, lmserver.base)
    assert seen["outcome"][0] == "returned", seen["outcome"]
    assert len(seen["requests"]) == 2


def test_tool_use_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str], lmserver: LMServer) -> None:
    """Tools made by ``exec`` of downloaded code (no source file, empty globals), carried in the
    devset's examples, and run by ``dspy.Evaluate`` over 24 threads."""
    seen = compare(session, capsys, lmserver, tool_use_tutorial)
    assert seen["outcome"][0] == "returned", seen["outcome"]
    score, rows = seen["outcome"][1]
    assert score == 50.0  # the second question's capital is asked of "Perú": a KeyError the agent records
    assert [answer for answer, _, _ in rows] == [1920, None]  # args: dict[str, Any] parsed the JSON number


@pytest.mark.parametrize("over_http", [True, False], ids=["loopback", "dummy"])
def test_email_extraction_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str], lmserver: LMServer,
                                   over_http: bool) -> None:
    seen = compare(session, capsys, lmserver, email_extraction_tutorial, lmserver.base if over_http else None)
    if over_http:
        assert seen["outcome"][:2] == ("raised", "AdapterParseError"), seen["outcome"]
        assert len(seen["requests"]) == 2  # ChatAdapter, then its JSONAdapter fallback
    else:
        assert seen["outcome"][0] == "returned", seen["outcome"]
        assert "   💰 Amount: $2,399.00" in seen["stdout"]


@pytest.fixture
def papillon_script(lmserver: LMServer) -> Iterator[None]:
    """The tutorial's top level: two LMs and the judge on the large one, module globals."""
    global local_lm, large_lm, llm_judge
    local_lm = dspy.LM(model="openai/gpt-4.1-nano", api_base=lmserver.base, api_key="not-a-key", cache=False)
    large_lm = dspy.LM(model="openai/gpt-4.1-mini", api_base=lmserver.base, api_key="not-a-key", cache=False)
    llm_judge = LLMJudge()
    llm_judge.set_lm(large_lm)
    try:
        yield
    finally:
        local_lm = large_lm = llm_judge = None


@pytest.mark.usefixtures("papillon_script")
def test_papillon_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str], lmserver: LMServer) -> None:
    seen = compare(session, capsys, lmserver, papillon_tutorial, settings={"lm": local_lm})
    assert seen["outcome"][0] == "returned", seen["outcome"]
    _, rows, (local_calls, large_calls) = seen["outcome"][1]
    assert len(rows) == 3 and len(local_calls) == 6 and len(large_calls) == 12  # 3 x (untrusted + 2 judgments + leakage)
    assert "WARNING dspy.evaluate.evaluate: Skipping table display since `pandas` is not installed." in "\n".join(
        seen["stderr"])


@pytest.mark.parametrize("as_written", [True, False], ids=["as_written", "predict_demos"])
def test_saving_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str], lmserver: LMServer,
                         tmp_path: Any, as_written: bool) -> None:
    seen = compare(session, capsys, lmserver, saving_tutorial, lmserver.base, str(tmp_path), as_written)
    if as_written:
        assert seen["outcome"] == ("raised", "AttributeError", "'ChainOfThought' object has no attribute 'demos'")
        return
    assert seen["outcome"][0] == "returned", seen["outcome"]
    demos, _, files = seen["outcome"][1]
    assert len(demos) == 3 and files == ["metadata.json", "program.json", "program.pkl"]


QUESTIONS = ["do you know the competition between pytorch and tensorflow?",
             "which one won the battle? just tell me the result, don't include any reasoning, thanks!", "finish"]


def test_conversation_history_tutorial_with_handles(session: dspex.Session, capsys: pytest.CaptureFixture[str],
                                                    lmserver: LMServer) -> None:
    seen = compare_with_handles(session, capsys, lmserver, conversation_history_with_handles, lmserver.base, QUESTIONS)
    assert seen["outcome"][0] == "returned", seen["outcome"]
    assert len(seen["requests"]) == 2


def test_custom_module_tutorial_with_handles(session: dspex.Session, capsys: pytest.CaptureFixture[str],
                                             lmserver: LMServer) -> None:
    seen = compare_with_handles(session, capsys, lmserver, custom_module_with_handles, lmserver.base)
    assert seen["outcome"][0] == "returned", seen["outcome"]
    assert any("Is Lebron James the basketball GOAT?" in line for line in seen["stdout"])


def test_output_refinement_tutorial_with_handles(session: dspex.Session, capsys: pytest.CaptureFixture[str],
                                                 lmserver: LMServer) -> None:
    seen = compare_with_handles(session, capsys, lmserver, output_refinement_with_handles, lmserver.base)
    assert seen["outcome"][0] == "returned", seen["outcome"]


def test_email_extraction_tutorial_with_handles(session: dspex.Session, capsys: pytest.CaptureFixture[str],
                                                lmserver: LMServer) -> None:
    seen = compare_with_handles(session, capsys, lmserver, email_extraction_with_handles)
    assert seen["outcome"][0] == "returned", seen["outcome"]
    assert seen["outcome"][1][1] == ["ExtractedEntity"]


def test_async_tool_conversion_with_handles(session: dspex.Session, capsys: pytest.CaptureFixture[str],
                                            lmserver: LMServer) -> None:
    seen = compare_with_handles(session, capsys, lmserver, async_tool_conversion_with_handles)
    assert seen["stdout"] == ["10", "10"]
    assert len(seen["outcome"][1]) == 1 and "async" in seen["outcome"][1][0]


def test_observability_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str], lmserver: LMServer) -> None:
    seen = compare(session, capsys, lmserver, observability_tutorial,
                   settings={"lm": tutorial_lm(lmserver.base), "callbacks": [AgentLoggingCallback()]})
    assert seen["outcome"][0] == "returned", seen["outcome"]
    assert seen["stdout"].count("== Acting Step ===") >= 2 and len(seen["requests"]) == 4  # 3 steps, then extract


def test_observability_tutorial_with_handles(session: dspex.Session, capsys: pytest.CaptureFixture[str],
                                             lmserver: LMServer) -> None:
    seen = compare_with_handles(session, capsys, lmserver, observability_with_handles, lmserver.base)
    assert seen["outcome"][0] == "returned", seen["outcome"]
    assert seen["stdout"].count("== Acting Step ===") >= 2 and len(seen["requests"]) == 4


def test_streaming_tutorial_with_stream_apply(session: dspex.Session, capsys: pytest.CaptureFixture[str],
                                              lmserver: LMServer) -> None:
    def through_session(program: Any, kwargs: dict[str, Any]) -> Any:
        return session.stream_apply(program, kwargs=kwargs)

    with fresh_dspy_settings():
        got = observe(lambda: streaming_with_handles(through_session, lmserver.base), capsys, lmserver)
    with fresh_dspy_settings():
        expected = observe(lambda: streaming_with_handles(drive, lmserver.base), capsys, lmserver)
    assert_same(got, expected)
    out = "\n".join(expected["stdout"])
    for shown in ("predict_name='self', signature_field_name='answer'", "signature_field_name='simplified_answer'",
                  "signature_field_name='next_thought'", "StatusMessage(message=\"Calling Tool double_the_number"):
        assert shown in out, shown


@pytest.mark.parametrize("pool", ["c1", "c4"])
def test_async_tutorial_through_dspex_aio(cstack: Any, capsys: pytest.CaptureFixture[str], lmserver: LMServer, pool: str) -> None:
    def main(arun: AsyncRunner) -> Any:
        return async_tutorial_awaited(arun, lmserver.base)

    with fresh_dspy_settings():
        got = observe(lambda: AsyncThroughSession(cstack.frontend, pool).go(main), capsys, lmserver)
    with fresh_dspy_settings():
        expected = observe(lambda: AsyncInProcess().go(main), capsys, lmserver)
    assert_same(got, expected)
    assert expected["outcome"][0] == "returned", expected["outcome"]
    assert "I get: 2" in expected["stdout"] and len(expected["requests"]) == 3


def test_deployment_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str], lmserver: LMServer) -> None:
    """The FastAPI endpoint's body over a module-level ``dspy.asyncify`` program, awaited as the
    server would; a question the model answers with prose makes its HTTP 500."""
    lmserver.set(rules=(("unanswerable", "unparsable"),))
    try:
        seen = compare(session, capsys, lmserver, serve_requests,
                       ["What is the capital of France?", "An unanswerable question?"],
                       settings={"lm": tutorial_lm(lmserver.base), "async_max_workers": 4})
    finally:
        lmserver.set(rules=())
    assert seen["outcome"][0] == "returned", seen["outcome"]
    ok, failed = seen["outcome"][1]
    assert ok["status"] == "success" and failed[0] == 500
    assert seen["stdout"] == ["HTTP 500: LM response cannot be serialized to a JSON object."]


def test_deployment_tutorial_with_handles(session: dspex.Session, capsys: pytest.CaptureFixture[str],
                                          lmserver: LMServer) -> None:
    lmserver.set(rules=(("unanswerable", "unparsable"),))
    texts = [f"What is the capital of country {i}?" for i in range(5)] + ["An unanswerable question?"]
    try:
        seen = compare_with_handles(session, capsys, lmserver, deployment_with_handles, lmserver.base, texts)
    finally:
        lmserver.set(rules=())
    assert seen["outcome"][0] == "returned", seen["outcome"]
    answers, _ = seen["outcome"][1]
    assert [a["status"] for a in answers[:5]] == ["success"] * 5 and answers[5][0] == 500


def test_usage_tracking_tutorial(session: dspex.Session, capsys: pytest.CaptureFixture[str], lmserver: LMServer) -> None:
    seen = compare(session, capsys, lmserver, usage_tracking_tutorial,
                   settings={"lm": tutorial_lm(lmserver.base), "track_usage": True})
    assert seen["outcome"][0] == "returned", seen["outcome"]
    assert seen["stdout"][0].startswith("{'openai/gpt-4o-mini': {") and len(seen["requests"]) == 2


def test_usage_tracking_tutorial_with_handles(session: dspex.Session, capsys: pytest.CaptureFixture[str],
                                              lmserver: LMServer) -> None:
    seen = compare_with_handles(session, capsys, lmserver, usage_tracking_with_handles, lmserver.base)
    assert seen["outcome"][0] == "returned", seen["outcome"]
    assert seen["stdout"][1].startswith("{'openai/gpt-4o-mini': {") and len(seen["requests"]) == 4



@pytest.mark.parametrize("pool", ["c1", "c4"])
def test_streaming_tutorial_through_dspex_aio(cstack: Any, capsys: pytest.CaptureFixture[str], lmserver: LMServer, pool: str) -> None:
    def main(arun: AsyncRunner) -> Any:
        return streaming_awaited(arun, lmserver.base)

    with fresh_dspy_settings():
        got = observe(lambda: AsyncThroughSession(cstack.frontend, pool).go(main), capsys, lmserver)
    with fresh_dspy_settings():
        expected = observe(lambda: AsyncInProcess().go(main), capsys, lmserver)
    assert_same(got, expected)
    assert expected["outcome"][0] == "returned", expected["outcome"]
    out = "\n".join(expected["stdout"])
    assert "StatusMessage(message=\"Calling Tool double_the_number" in out and "signature_field_name='simplified_answer'" in out
