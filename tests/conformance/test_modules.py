"""DSPy modules, each run in-process and through a session (see harness.py for ``run``).

Programs follow DSPy's docs and its own tests (stanfordnlp/dspy tests/predict): they configure a
``DummyLM``, build the module and call it, exactly as a user script would. No ``from __future__ import annotations`` here: DSPy's own
test modules do not use it, and local Pydantic classes in signatures must stay real types.
"""

import asyncio
import base64
import inspect
import json
import threading
import warnings
from typing import Literal

import dspy
import pytest
from dspy.utils.dummies import DummyLM
from pydantic import BaseModel

from tests.conformance.harness import SESSION, Runner

# -- Predict ------------------------------------------------------------------------------------


def predict_program():
    lm = DummyLM([{"answer": "Paris"}])
    dspy.configure(lm=lm)
    predict = dspy.Predict("question -> answer")
    return predict(question="What is the capital of France?")


def test_predict(run: Runner) -> None:
    result = run.check(predict_program)
    assert isinstance(result, dspy.Prediction)
    assert result.answer == "Paris"


def test_predict_through_handles(run: Runner) -> None:
    """The same code with the module and LM kept where they run: a handle reads like the object."""
    lm = run.put(DummyLM([{"answer": "Paris"}, {"answer": "Rome"}]))
    run(dspy.configure, lm=lm)
    predict = run.put(dspy.Predict("question -> answer"))
    first = predict(question="What is the capital of France?")
    second = predict(question="What is the capital of Italy?")
    assert isinstance(first, dspy.Prediction) and isinstance(second, dspy.Prediction)
    assert (first.answer, second.answer) == ("Paris", "Rome")
    assert len(lm.history) == 2
    assert lm.history[-1]["outputs"] == ["[[ ## answer ## ]]\nRome"]
    assert [name for name, _ in predict.named_predictors()] == ["self"]
    predict.demos = [dspy.Example(question="What is the capital of Spain?", answer="Madrid")]
    assert len(predict.demos) == 1


# -- ChainOfThought -----------------------------------------------------------------------------


def chain_of_thought_program():
    lm = DummyLM([{"reasoning": "Paris is the capital of France.", "answer": "Paris"}])
    dspy.configure(lm=lm)
    cot = dspy.ChainOfThought("question -> answer")
    return cot(question="What is the capital of France?")


def test_chain_of_thought(run: Runner) -> None:
    result = run.check(chain_of_thought_program)
    assert result.answer == "Paris"
    assert result.reasoning == "Paris is the capital of France."


# -- ReAct with a Pydantic tool argument (DSPy's test_tool_calling_with_pydantic_args) --------


def react_pydantic_program():
    class CalendarEvent(BaseModel):
        name: str
        date: str
        participants: dict[str, str]

    def write_invitation_letter(participant_name: str, event_info: CalendarEvent):
        if participant_name not in event_info.participants:
            return None
        return f"It's my honor to invite {participant_name} to event {event_info.name} on {event_info.date}"

    class InvitationSignature(dspy.Signature):
        participant_name: str = dspy.InputField(desc="The name of the participant to invite")
        event_info: CalendarEvent = dspy.InputField(desc="The information about the event")
        invitation_letter: str = dspy.OutputField(desc="The invitation letter to be sent to the participant")

    react = dspy.ReAct(InvitationSignature, tools=[write_invitation_letter])

    lm = DummyLM(
        [
            {
                "next_thought": "I need to write an invitation letter for Alice to the Science Fair event.",
                "next_tool_name": "write_invitation_letter",
                "next_tool_args": {
                    "participant_name": "Alice",
                    "event_info": {
                        "name": "Science Fair",
                        "date": "Friday",
                        "participants": {"Alice": "female", "Bob": "male"},
                    },
                },
            },
            {
                "next_thought": (
                    "I have successfully written the invitation letter for Alice to the Science Fair. Now "
                    "I can finish the task."
                ),
                "next_tool_name": "finish",
                "next_tool_args": {},
            },
            {
                "reasoning": "This is a very rigorous reasoning process, trust me bro!",
                "invitation_letter": "It's my honor to invite Alice to the Science Fair event on Friday.",
            },
        ]
    )
    dspy.settings.configure(lm=lm)

    return react(
        participant_name="Alice",
        event_info=CalendarEvent(
            name="Science Fair",
            date="Friday",
            participants={"Alice": "female", "Bob": "male"},
        ),
    )


def test_react_with_pydantic_tool_argument(run: Runner) -> None:
    outputs = run.check(react_pydantic_program)
    assert outputs.invitation_letter == "It's my honor to invite Alice to the Science Fair event on Friday."
    assert outputs.trajectory["observation_0"] == "It's my honor to invite Alice to event Science Fair on Friday"
    assert outputs.trajectory["tool_args_0"]["event_info"]["participants"] == {"Alice": "female", "Bob": "male"}
    assert outputs.trajectory["observation_1"] == "Completed."


# -- manual tool handling (DSPy docs "Tools": dspy.ToolCalls and ToolCall.execute()) ---------------


class ToolSignature(dspy.Signature):
    """Signature for manual tool handling."""

    question: str = dspy.InputField()
    tools: list[dspy.Tool] = dspy.InputField()
    outputs: dspy.ToolCalls = dspy.OutputField()


def weather(city: str) -> str:
    """Get weather information for a city."""
    return f"The weather in {city} is sunny"


def calculator(expression: str) -> str:
    """Add the numbers of an expression such as 2+3."""
    return f"The result is {sum(int(term) for term in expression.split('+'))}"


TOOLS = {"weather": dspy.Tool(weather), "calculator": dspy.Tool(calculator)}


def manual_tool_calls_program():
    calls = [{"name": "weather", "args": {"city": "New York"}}, {"name": "calculator", "args": {"expression": "2+3"}}]
    dspy.configure(lm=DummyLM([{"outputs": json.dumps({"tool_calls": calls})}]))
    predictor = dspy.Predict(ToolSignature)
    response = predictor(question="What's the weather in New York?", tools=list(TOOLS.values()))
    # execute() without functions= finds each tool by name in the caller's module globals
    return [(call.name, call.args, call.execute()) for call in response.outputs.tool_calls]


def test_tool_calls_execute_finds_the_module_functions_by_name(run: Runner) -> None:
    assert run.check(manual_tool_calls_program) == [
        ("weather", {"city": "New York"}, "The weather in New York is sunny"),
        ("calculator", {"expression": "2+3"}, "The result is 5")]


# -- ProgramOfThought with dspy.LocalInterpreter -------------------------------------------------


def program_of_thought_program():
    lm = DummyLM(
        [
            {"reasoning": "Add the numbers.", "generated_code": "```python\nresult = 1 + 1\nSUBMIT({'answer': str(result)})\n```"},
            {"reasoning": "The code computed 2.", "answer": "2"},
        ]
    )
    dspy.configure(lm=lm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "ProgramOfThought is deprecated" (DSPy 3.4)
        pot = dspy.ProgramOfThought("question -> answer", interpreter_factory=dspy.LocalInterpreter)
    return pot(question="What is 1+1?")


def test_program_of_thought_with_local_interpreter(run: Runner) -> None:
    result = run.check(program_of_thought_program)
    assert result.answer == "2"
    assert result.reasoning == "The code computed 2."


# -- BestOfN and Refine (DSPy's docs example and test_refine.py) --------------------------------


def best_of_n_program():
    lm = DummyLM([{"reasoning": "r1", "answer": "City of Brussels"}, {"reasoning": "r2", "answer": "Brussels"},
                  {"reasoning": "r3", "answer": "Brussels!"}])
    dspy.configure(lm=lm)
    rewards = []

    def one_word_answer(args, pred):
        rewards.append(pred.answer)
        return 1.0 if len(pred.answer.split()) == 1 else 0.0

    qa = dspy.ChainOfThought("question -> answer")
    best_of_3 = dspy.BestOfN(module=qa, N=3, reward_fn=one_word_answer, threshold=1.0)
    result = best_of_3(question="What is the capital of Belgium?")
    return result, rewards


def test_best_of_n(run: Runner) -> None:
    result, rewarded = run.check(best_of_n_program)
    assert result.answer == "Brussels"
    assert rewarded == ["City of Brussels", "Brussels"]  # stops at the first answer that reaches the threshold


class DummyModule(dspy.Module):
    def __init__(self, signature, forward_fn):
        super().__init__()
        self.predictor = dspy.Predict(signature)
        self.forward_fn = forward_fn

    def forward(self, **kwargs) -> dspy.Prediction:
        return self.forward_fn(self, **kwargs)


def refine_program():
    lm = DummyLM([{"answer": "Brussels"}, {"answer": "City of Brussels"}, {"answer": "Brussels"}])
    dspy.configure(lm=lm)
    module_call_count = [0]

    def count_calls(self, **kwargs):
        module_call_count[0] += 1
        return self.predictor(**kwargs)

    reward_call_count = [0]

    def reward_fn(kwargs, pred: dspy.Prediction) -> float:
        reward_call_count[0] += 1
        # The answer should always be one word.
        return 1.0 if len(pred.answer) == 1 else 0.0

    predict = DummyModule("question -> answer", count_calls)

    refine = dspy.Refine(module=predict, N=3, reward_fn=reward_fn, threshold=1.0)
    result = refine(question="What is the capital of Belgium?")
    return result, reward_call_count[0], module_call_count[0]


def test_refine(run: Runner) -> None:
    """dspy.Refine reads the source of the module class and of the reward function."""
    result, reward_calls, module_calls = run.check(refine_program)
    assert result.answer == "Brussels"
    assert reward_calls > 0
    assert module_calls == 3


# -- a custom Module with two predictors --------------------------------------------------------


class DraftThenPolish(dspy.Module):
    def __init__(self):
        super().__init__()
        self.draft = dspy.Predict("topic -> draft")
        self.polish = dspy.ChainOfThought("draft -> text")

    def forward(self, topic):
        draft = self.draft(topic=topic).draft
        return self.polish(draft=draft)


def custom_module_program():
    lm = DummyLM([{"draft": "cats are nice"}, {"reasoning": "capitalise", "text": "Cats are nice."}])
    dspy.configure(lm=lm)
    program = DraftThenPolish()
    result = program(topic="cats")
    return result, [name for name, _ in program.named_predictors()], lm.history[0]["messages"][-1]["content"]


def test_custom_module_with_two_predictors(run: Runner) -> None:
    result, names, first_prompt = run.check(custom_module_program)
    assert result.text == "Cats are nice."
    assert names == ["draft", "polish.predict"]
    assert "cats" in first_prompt


# -- a Module returning its own Prediction subclass ---------------------------------------------


class Verdict(dspy.Prediction):
    """A program's own result type, with a method and state outside its fields."""

    def __init__(self, label, confidence):
        super().__init__(label=label)
        self._confidence = confidence

    def sure(self):
        return self._confidence >= 0.5


class Classifier(dspy.Module):
    def __init__(self):
        super().__init__()
        self.classify = dspy.Predict("ticket -> label")

    def forward(self, ticket):
        return Verdict(self.classify(ticket=ticket).label, confidence=0.75)


def prediction_subclass_program():
    dspy.configure(lm=DummyLM([{"label": "billing"}]))
    return Classifier()(ticket="I was charged twice")


def test_a_module_returning_its_own_prediction_subclass(run: Runner) -> None:
    verdict = run.check(prediction_subclass_program)
    assert type(verdict) is Verdict and verdict.label == "billing" and verdict.sure()


def test_custom_module_instance_sent_by_value(run: Runner) -> None:
    """A client-built Module instance travels by value; its class is test-module code."""
    run(dspy.configure, lm=DummyLM([{"draft": "dogs bark"}, {"reasoning": "r", "text": "Dogs bark."}]))
    program = run.put(DraftThenPolish())
    assert program(topic="dogs").text == "Dogs bark."
    assert len(program.predictors()) == 2


def test_a_program_handle_reads_like_the_program(run: Runner) -> None:
    """Walk and tune a module through its handle exactly as in-process: named predictors, a
    sub-module's attribute set by assignment, a handle as a dict key and as an argument."""
    lm = run.put(DummyLM([{"draft": "d1"}, {"reasoning": "r", "text": "T1"}]))
    run(dspy.configure, lm=lm)
    program = run.put(DraftThenPolish())
    names = [name for name, _ in program.named_predictors()]
    assert names == ["draft", "polish.predict"]
    draft = program.draft
    draft.demos = [dspy.Example(topic="cats", draft="cats purr")]
    assert len(program.draft.demos) == 1 and program.draft.demos[0].draft == "cats purr"
    result = program(topic="dogs")
    assert result.text == "T1"
    assert "cats purr" in str(lm.history[0]["messages"])  # the demo set through the handle was used
    seen = {program: "the program"}
    assert seen[program] == "the program"
    assert run(lambda p: len(p.predictors()), program) == 2


class KnowledgeBase:
    """The DSPy docs' "Tools" pattern: a tool that is a method of an object holding state."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    def search(self, query: str, k: int = 2) -> list[str]:
        """Search the knowledge base for passages about the query."""
        self.queries.append(query)
        return [f"passage {i} about {query}" for i in range(k)]


def test_a_tool_made_of_a_handles_method_reads_like_the_method(run: Runner) -> None:
    """``dspy.Tool(kb.search)`` and ``dspy.ReAct(..., tools=[kb.search])`` built here over a
    handle's method: DSPy reads the tool's name, description and argument schema from the method
    (``inspect.signature``, ``get_type_hints``, ``__doc__``) as in-process, so the prompt lists
    ``search(query, k)``, not a ``RemoteMethod(*args, **kwargs)``, and the call validates."""
    kb = run.put(KnowledgeBase())
    tool = dspy.Tool(kb.search)
    assert (tool.name, tool.desc) == ("search", "Search the knowledge base for passages about the query.")
    assert tool.args == {"query": {"type": "string"}, "k": {"type": "integer", "default": 2}}
    assert str(inspect.signature(kb.search)) == "(query: str, k: int = 2) -> list[str]"
    lm = DummyLM([{"next_thought": "look it up", "next_tool_name": "search", "next_tool_args": {"query": "cats"}},
                  {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}},
                  {"reasoning": "found it", "answer": "cats purr"}])
    with dspy.context(lm=lm):
        result = dspy.ReAct("question -> answer", tools=[kb.search])(question="What do cats do?")
    assert result.trajectory["observation_0"] == ["passage 0 about cats", "passage 1 about cats"]
    assert "search, whose description is <desc>Search the knowledge base" in str(lm.history[0]["messages"])
    assert kb.queries == ["cats"]


# -- Parallel and batch (dict-mode DummyLM: answers do not depend on thread order) -------------

CAPITALS = {"France": {"answer": "Paris"}, "Italy": {"answer": "Rome"}, "Spain": {"answer": "Madrid"}}


def parallel_program():
    dspy.configure(lm=DummyLM(CAPITALS))
    predict = dspy.Predict("country -> answer")
    parallel = dspy.Parallel(num_threads=3)
    parallel_results = parallel([(predict, dspy.Example(country=c).with_inputs("country")) for c in CAPITALS])
    batch_results = predict.batch([dspy.Example(country=c).with_inputs("country") for c in CAPITALS], num_threads=3,
                                  disable_progress_bar=True)
    return [r.answer for r in parallel_results], [r.answer for r in batch_results]


def test_parallel_and_batch(run: Runner) -> None:
    parallel_answers, batch_answers = run.check(parallel_program)
    assert parallel_answers == ["Paris", "Rome", "Madrid"]
    assert batch_answers == ["Paris", "Rome", "Madrid"]


# -- async: acall and asyncify ------------------------------------------------------------------


def acall_program():
    async def main():
        with dspy.context(lm=DummyLM([{"answer": "Paris"}, {"answer": "Rome"}])):
            predict = dspy.Predict("question -> answer")
            first = await predict.acall(question="What is the capital of France?")
            second = await dspy.asyncify(predict)(question="What is the capital of Italy?")
            return first, second

    return asyncio.run(main())


def test_acall_and_asyncify(run: Runner) -> None:
    first, second = run.check(acall_program)
    assert (first.answer, second.answer) == ("Paris", "Rome")


def test_acall_through_a_handle_is_awaited(run: Runner) -> None:
    """``prog.acall(...)`` on a handle returns the Prediction, not a coroutine."""
    run(dspy.configure, lm=DummyLM([{"answer": "Paris"}]))
    predict = run.put(dspy.Predict("question -> answer"))
    result = predict.acall(question="What is the capital of France?")
    if run.mode != SESSION:
        result = asyncio.run(result)
    assert isinstance(result, dspy.Prediction) and result.answer == "Paris"


class AsyncQA(dspy.Module):
    """A module with its own ``aforward`` (DSPy's async module pattern)."""

    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    async def aforward(self, question):
        first = await self.predict.acall(question=question)
        return dspy.Prediction(answer=first.answer.upper())


async def async_program():
    dspy.configure(lm=DummyLM([{"answer": "Paris"}, {"answer": "Rome"}]))
    qa = AsyncQA()
    return [await qa.acall(question="Capital of France?"), await qa.acall(question="Capital of Italy?")]


def test_async_program_is_awaited(run: Runner) -> None:
    """``s.run(coroutine_function)`` is ``asyncio.run(coroutine_function())`` on the worker."""
    result = run(async_program)
    if run.mode != SESSION:
        result = asyncio.run(result)
    assert [p.answer for p in result] == ["PARIS", "ROME"]


# -- several completions and dspy.majority ---------------------------------------------------------


def completions_program():
    dspy.configure(lm=DummyLM([{"answer": "Paris"}, {"answer": "Lyon"}, {"answer": "Paris"}]))
    return dspy.Predict("question -> answer", n=3)(question="What is the capital of France?")


def test_completions_travel_with_the_prediction(run: Runner) -> None:
    """The Prediction keeps all its completions, so ``dspy.majority`` works on what comes back."""
    pred = run.check(completions_program)
    assert pred.completions.answer == ["Paris", "Lyon", "Paris"]
    assert len(pred.completions) == 3
    assert dspy.majority(pred).answer == "Paris"


# -- a class-based signature (DSPy docs: "Signatures") and a user exception with a payload --------


class Classify(dspy.Signature):
    """Classify sentiment of a given sentence."""

    sentence: str = dspy.InputField()
    sentiment: Literal["positive", "negative", "neutral"] = dspy.OutputField()
    confidence: float = dspy.OutputField()


def test_class_based_signature_through_a_handle(run: Runner) -> None:
    run(dspy.configure, lm=DummyLM([{"sentiment": "positive", "confidence": 0.75}]))
    classify = run.put(dspy.Predict(Classify))
    sentence = "it's a charming and often affecting journey."  # example from the SST dataset.
    result = classify(sentence=sentence)
    assert (result.sentiment, result.confidence) == ("positive", 0.75)
    assert classify.signature.instructions == "Classify sentiment of a given sentence."


class Order(BaseModel):
    item: str
    quantity: int


class ShipOrder(dspy.Signature):
    """Decide how to ship an order."""

    order: Order = dspy.InputField()
    carrier: str = dspy.OutputField()


def test_pydantic_instance_argument_matches_the_signature_type_sent_earlier(run: Runner) -> None:
    """The signature (with its Pydantic input type) travels in one call and an instance of that type
    in a later one: on the worker both must be the same class, or DSPy sees a type mismatch."""
    lm = run.put(DummyLM([{"carrier": "DHL"}]))
    run(dspy.configure, lm=lm, warn_on_type_mismatch=True)
    ship = run.put(dspy.Predict(ShipOrder))
    assert ship(order=Order(item="book", quantity=2)).carrier == "DHL"
    assert run(lambda p, o: isinstance(o, p.signature.input_fields["order"].annotation), ship,
               Order(item="pen", quantity=1)) is True
    assert '"quantity": 2' in str(lm.history[-1]["messages"])


class SpamVerdict(BaseModel):
    label: str
    confidence: float


def judge_with_a_string_signature(text):
    """DSPy docs "Signatures": a custom type named in a string signature is found in the caller's
    module, which the program's code never reads otherwise."""
    dspy.configure(lm=DummyLM([{"verdict": '{"label": "spam", "confidence": 0.9}'}]))
    return dspy.Predict("text: str -> verdict: SpamVerdict")(text=text)


def test_a_custom_type_named_in_a_string_signature(run: Runner) -> None:
    result = run.check(judge_with_a_string_signature, "buy now")
    assert isinstance(result.verdict, SpamVerdict) and result.verdict.label == "spam"


class QuotaError(Exception):
    def __init__(self, message, remaining):
        super().__init__(message)
        self.remaining = remaining


def spend_quota(n):
    if n > 2:
        raise QuotaError(f"asked for {n}", remaining=2)
    return n


def test_user_exception_keeps_its_class_and_payload(run: Runner) -> None:
    with pytest.raises(QuotaError) as info:
        run(spend_quota, 5)
    assert info.value.remaining == 2
    assert str(info.value) == "asked for 5"
    if run.mode == SESSION:
        assert "spend_quota" in info.value.remote_traceback


class ProviderError(Exception):
    """An error that keeps what failed, like an SDK's: a status code and the client's lock."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code
        self.lock = threading.Lock()


def call_provider():
    raise ProviderError("rate limited", code=429)


def test_user_exception_with_an_attribute_that_cannot_travel_keeps_the_others(run: Runner) -> None:
    """A lock cannot be pickled, so the exception cannot go whole: its other attributes still do
    (never the ``code`` of RemoteError in place of the user's own)."""
    with pytest.raises(ProviderError) as info:
        run(call_provider)
    assert info.value.code == 429 and str(info.value) == "rate limited" and info.value.args == ("rate limited",)
    if run.mode == SESSION:
        assert not hasattr(info.value, "lock") and "call_provider" in info.value.remote_traceback


class PageMissing(LookupError):
    """A web framework's kind of HTTP error: class-level ``code``, ``message`` and ``details``."""

    code = 404
    message = "The requested URL was not found."
    details = {"retry": False}  # noqa: RUF012 - as such classes are written


def fetch_after_asking(question):
    dspy.Predict("question -> answer")(question=question)
    raise PageMissing(f"no page for {question}")


def test_user_exception_class_attributes_are_its_own(run: Runner) -> None:
    """``code``, ``message`` and ``details`` are RemoteError's names too: the user's class wins,
    also around ``dspy.track_usage()`` (whose counts ride in the error's wire details)."""
    dspy.configure(lm=DummyLM([{"answer": "x"}]), track_usage=True)
    with dspy.track_usage() as usage, pytest.raises(PageMissing) as info:
        run(fetch_after_asking, "where")
    err = info.value
    assert (err.code, err.message, err.details, str(err)) == (404, "The requested URL was not found.",
                                                              {"retry": False}, "no page for where")
    assert PageMissing.details == {"retry": False} and list(usage.get_total_tokens()) == ["dummy"]


# -- a tool that fails, a callback, a conversation history ----------------------------------------


def failing_tool_program():
    def divide(a: int, b: int) -> float:
        """Divide a by b."""
        return a / b

    dspy.configure(lm=DummyLM([
        {"next_thought": "Divide.", "next_tool_name": "divide", "next_tool_args": {"a": 1, "b": 0}},
        {"next_thought": "It failed; give up.", "next_tool_name": "finish", "next_tool_args": {}},
        {"reasoning": "Division by zero.", "answer": "undefined"},
    ]))
    return dspy.ReAct("question -> answer", tools=[divide])(question="What is 1/0?")


def test_react_tool_error_becomes_an_observation(run: Runner) -> None:
    result = run.check(failing_tool_program)
    assert result.answer == "undefined"
    assert "division by zero" in result.trajectory["observation_0"]


class RecordingCallback(dspy.utils.callback.BaseCallback):
    def __init__(self):
        self.events = []

    def on_module_start(self, call_id, instance, inputs):
        self.events.append(("module_start", type(instance).__name__, sorted(inputs.get("kwargs", {}))))

    def on_lm_end(self, call_id, outputs, exception=None):
        self.events.append(("lm_end", exception is None))


def callback_program():
    callback = RecordingCallback()
    dspy.configure(lm=DummyLM([{"answer": "Paris"}]), callbacks=[callback])
    dspy.Predict("question -> answer")(question="Capital of France?")
    return callback.events


def test_callbacks_defined_by_the_user(run: Runner) -> None:
    events = run.check(callback_program)
    assert ("module_start", "Predict", ["question"]) in events
    assert ("lm_end", True) in events


def history_program():
    class Chat(dspy.Signature):
        question: str = dspy.InputField()
        history: dspy.History = dspy.InputField()
        answer: str = dspy.OutputField()

    lm = DummyLM([{"answer": "Rome"}])
    dspy.configure(lm=lm)
    history = dspy.History(messages=[{"question": "Capital of France?", "answer": "Paris"}])
    result = dspy.Predict(Chat)(question="And of Italy?", history=history)
    return result, [m["content"] for m in lm.history[-1]["messages"]]


def test_conversation_history_input(run: Runner) -> None:
    result, contents = run.check(history_program)
    assert result.answer == "Rome"
    assert any("Capital of France?" in c for c in contents) and any("Paris" in c for c in contents)


# -- dspy.Image from a data URL ----------------------------------------------------------------

PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def image_program(data_url):
    class DescribeImage(dspy.Signature):
        image: dspy.Image = dspy.InputField()
        description: str = dspy.OutputField()

    lm = DummyLM([{"description": "a single pixel"}])
    dspy.configure(lm=lm)
    result = dspy.Predict(DescribeImage)(image=dspy.Image(data_url))
    content = lm.history[-1]["messages"][-1]["content"]
    image_parts = [part["image_url"]["url"] for part in content if part.get("type") == "image_url"]
    return result, image_parts


def test_image_from_data_url(run: Runner) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(PNG_1x1).decode()
    result, image_parts = run.check(image_program, data_url)
    assert result.description == "a single pixel"
    assert image_parts == [data_url]


# -- a Pydantic model as an output type; errors keep their type ---------------------------------


class Ticket(BaseModel):
    category: str
    urgent: bool


def pydantic_output_program():
    class Triage(dspy.Signature):
        """Triage a support ticket."""

        text: str = dspy.InputField()
        ticket: Ticket = dspy.OutputField()

    dspy.configure(lm=DummyLM([{"ticket": {"category": "billing", "urgent": True}}]))
    return dspy.Predict(Triage)(text="I was charged twice!").ticket


def test_pydantic_model_output_field(run: Runner) -> None:
    ticket = run.check(pydantic_output_program)
    assert isinstance(ticket, Ticket)
    assert ticket == Ticket(category="billing", urgent=True)


def local_output_types_program():
    """DSPy's own tests define their types inside the test function (tests/adapters)."""

    class LineItem(BaseModel):
        name: str
        quantity: int

    class Order(dspy.Signature):
        """Read an order."""

        text: str = dspy.InputField()
        lines: list[LineItem] = dspy.OutputField()

    dspy.configure(lm=DummyLM([{"lines": [{"name": "egg", "quantity": 2}]}], adapter=dspy.JSONAdapter()),
                   adapter=dspy.JSONAdapter())
    return dspy.Predict(Order)(text="two eggs")


def test_local_output_types_keep_their_qualified_names(run: Runner) -> None:
    """Classes defined inside a function keep ``__qualname__`` both ways (their repr, ``type(x)``)."""
    pred = run.check(local_output_types_program)
    assert type(pred.lines[0]).__qualname__ == "local_output_types_program.<locals>.LineItem"

    class Local(BaseModel):
        x: int

    assert run(lambda obj: type(obj).__qualname__, Local(x=1)) == Local.__qualname__


def test_output_types_defined_beside_a_session_travel_without_it(run: Runner) -> None:
    """A script's ``main()`` defines its output types next to its client and session (here: ``run``,
    which holds sockets): pydantic keeps the defining function's locals on each class, which
    must not travel with it."""

    class Verdict(BaseModel):
        label: str

    class Judge(dspy.Signature):
        """Judge a text."""

        text: str = dspy.InputField()
        verdict: Verdict = dspy.OutputField()

    dspy.configure(lm=DummyLM([{"verdict": {"label": "fine"}}]))
    verdict = run(lambda: dspy.Predict(Judge)(text="all good").verdict)
    assert verdict.label == "fine" and type(verdict).__qualname__ == Verdict.__qualname__


def parse_error_program():
    dspy.configure(lm=DummyLM([{"something_else": "no answer field"}] * 3), adapter=dspy.ChatAdapter(use_json_adapter_fallback=False))
    return dspy.Predict("question -> answer")(question="What is the capital of France?")


def test_adapter_parse_error_keeps_its_type_and_attributes(run: Runner) -> None:
    from dspy.utils.exceptions import AdapterParseError

    with pytest.raises(AdapterParseError) as info:
        run(parse_error_program)
    assert "no answer field" in info.value.lm_response
    assert info.value.adapter_name == "ChatAdapter"


def test_zero_division_is_caught_as_itself(run: Runner) -> None:
    def divide(a, b):
        return a / b

    with pytest.raises(ZeroDivisionError):
        run(divide, 1, 0)
