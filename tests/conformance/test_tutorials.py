"""Programs of DSPy's tutorials as a user's script holds them: a retriever and the program built at
module level, then used in calls (in-process and through a session, compared).

- "RAG" (dspy.ai tutorials/rag): ``search = dspy.retrievers.Embeddings(corpus=..., embedder=...)``
  at the top of the script, a ``RAG`` module whose ``forward`` calls ``search``;
- "Multi-Hop Search" (tutorials/multihop_search): a module generating queries over hops, notes
  gathered from the same retriever;
- "Classification" (tutorials/classification): a typed ``Literal`` output and a float, scored by
  ``dspy.Evaluate`` over a ``dspy.Example`` devset with a metric returning a float and one returning
  ``dspy.Prediction(score=, feedback=)``;
- "Entity Extraction" (tutorials/entity_extraction): ``list[str]`` and ``list[<pydantic model>]``
  outputs;
- "Agents" / "Customer Service Agent" (tutorials/agents, tutorials/customer_service_agent): ReAct
  whose tools are methods of an object holding state, and module-level functions taking Pydantic
  arguments and writing to a module-level dict "database".

The embedder is a user function (no embedding model offline); ``dspy.utils.DummyLM`` answers.
"""

from __future__ import annotations

from typing import Any, Literal

import dspy
import numpy as np
import pydantic
from dspy.utils import DummyLM

from tests.conformance.harness import Runner

CORPUS = ["Paris is the capital of France.", "Rome is the capital of Italy.", "Cats purr.", "Dogs bark."]


def embed(texts: list[str]) -> Any:
    return np.array([[t.count("capital"), t.count("Paris"), t.count("Rome"), len(t) / 100] for t in texts])


# as the tutorial's script: the retriever is a module global (it holds DSPy's batching thread)
search = dspy.retrievers.Embeddings(corpus=CORPUS, embedder=dspy.Embedder(embed), k=2)


class RAG(dspy.Module):
    def __init__(self) -> None:
        self.respond = dspy.ChainOfThought("context, question -> response")

    def forward(self, question: str) -> Any:
        context = search(question).passages
        return self.respond(context=context, question=question)


class Hop(dspy.Module):
    def __init__(self, num_hops: int = 2) -> None:
        self.generate_query = dspy.ChainOfThought("claim, notes: list[str] -> query")
        self.num_hops = num_hops

    def forward(self, claim: str) -> Any:
        notes: list[str] = []
        for _ in range(self.num_hops):
            query = self.generate_query(claim=claim, notes=notes).query
            notes.extend(search(query).passages)
        return dspy.Prediction(notes=notes)


RAG_PROGRAM = RAG()


def rag_and_multihop() -> Any:
    dspy.configure(lm=DummyLM([{"reasoning": "r", "response": "Paris"}, {"reasoning": "r", "query": "capital Rome"},
                               {"reasoning": "r", "query": "Paris"}]))
    answer = RAG_PROGRAM(question="What is the capital of France, Paris?")
    hops = Hop()(claim="Rome is a capital")
    return answer, hops, [len(h["messages"]) for h in dspy.settings.lm.history]


def test_rag_and_multihop_with_a_module_level_retriever(run: Runner) -> None:
    answer, hops, _ = run.check(rag_and_multihop)
    assert answer.response == "Paris"
    assert hops.notes == ["Rome is the capital of Italy.", "Paris is the capital of France.",
                          "Paris is the capital of France.", "Cats purr."]


class Classify(dspy.Signature):
    """Classify the sentiment of a sentence."""

    sentence: str = dspy.InputField()
    sentiment: Literal["positive", "negative", "neutral"] = dspy.OutputField()
    confidence: float = dspy.OutputField()


def classify() -> Any:
    dspy.configure(lm=DummyLM([{"sentiment": "positive", "confidence": "0.75"}]))
    return dspy.Predict(Classify)(sentence="This book was super fun to read, though not the last chapter.")


def test_classification_with_a_literal_output(run: Runner) -> None:
    pred = run.check(classify)
    assert (pred.sentiment, pred.confidence) == ("positive", 0.75)


DEVSET = [dspy.Example(sentence="What a great day", sentiment="positive").with_inputs("sentence"),
          dspy.Example(sentence="Awful service", sentiment="negative").with_inputs("sentence")]


def sentiment_matches(example: dspy.Example, pred: dspy.Prediction, trace: Any = None) -> float:
    return float(example.sentiment == pred.sentiment)


def sentiment_with_feedback(gold: dspy.Example, pred: dspy.Prediction, trace: Any = None, pred_name: Any = None,
                            pred_trace: Any = None) -> dspy.Prediction:
    right = gold.sentiment == pred.sentiment
    return dspy.Prediction(score=float(right), feedback="right" if right else f"expected {gold.sentiment}")


def evaluate_classifier() -> Any:
    dspy.configure(lm=DummyLM([{"sentiment": "positive", "confidence": "0.9"}] * 4))
    classifier = dspy.Predict(Classify)
    plain = dspy.Evaluate(devset=DEVSET, metric=sentiment_matches, num_threads=1, display_progress=False)(classifier)
    judged = dspy.Evaluate(devset=DEVSET, metric=sentiment_with_feedback, num_threads=1,
                           display_progress=False)(classifier)
    return plain, judged


def test_evaluate_with_a_float_metric_and_a_feedback_metric(run: Runner) -> None:
    plain, judged = run.check(evaluate_classifier)
    assert type(plain).__name__ == type(judged).__name__ == "EvaluationResult"
    assert plain.score == judged.score == 50.0
    assert [score for _, _, score in plain.results] == [1.0, 0.0]
    assert judged.results[1][2].feedback == "expected negative"


class Entity(pydantic.BaseModel):
    name: str
    kind: Literal["PERSON", "PLACE"]


class ExtractEntities(dspy.Signature):
    """Extract the people and the named entities of the tokens."""

    tokens: list[str] = dspy.InputField()
    people: list[str] = dspy.OutputField()
    entities: list[Entity] = dspy.OutputField()


def extract_entities() -> Any:
    dspy.configure(lm=DummyLM([{"people": '["Ada"]',
                                "entities": '[{"name": "Ada", "kind": "PERSON"}, {"name": "London", "kind": "PLACE"}]'}]))
    return dspy.Predict(ExtractEntities)(tokens=["Ada", "lived", "in", "London"])


def test_entity_extraction_with_typed_outputs(run: Runner) -> None:
    pred = run.check(extract_entities)
    assert pred.people == ["Ada"]
    assert [type(e).__name__ for e in pred.entities] == ["Entity", "Entity"]
    assert pred.entities[1].kind == "PLACE"


class Bank:
    """Tools of the agent: methods of one object holding the balances (the agents tutorial's style)."""

    def __init__(self) -> None:
        self.balances = {"alice": 10}

    def get_balance(self, name: str) -> int:
        """Get the balance of a customer."""
        return self.balances[name]

    def deposit(self, name: str, amount: int) -> str:
        """Deposit an amount for a customer."""
        self.balances[name] += amount
        return f"new balance {self.balances[name]}"


BANK = Bank()
TELLER = dspy.ReAct("request -> answer", tools=[BANK.get_balance, BANK.deposit], max_iters=4)


def deposit_five() -> Any:
    dspy.configure(lm=DummyLM([
        {"next_thought": "look", "next_tool_name": "get_balance", "next_tool_args": {"name": "alice"}},
        {"next_thought": "pay", "next_tool_name": "deposit", "next_tool_args": {"name": "alice", "amount": 5}},
        {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}},
        {"reasoning": "r", "answer": "deposited"}]))
    pred = TELLER(request="Deposit 5 for alice")
    return pred.answer, pred.trajectory["observation_0"], pred.trajectory["observation_1"]


def alice_balance() -> int:
    return BANK.balances["alice"]


def test_agent_tools_that_are_methods_of_an_object_holding_state(run: Runner) -> None:
    """The module-level object the tools are methods of is the program's: a deposit is seen by the
    next call of the session, as by the next statement in-process."""
    before = run(alice_balance)
    answer, seen, deposited = run(deposit_five)
    assert (answer, seen, deposited) == ("deposited", before, f"new balance {before + 5}")
    assert run(alice_balance) == before + 5


class Date(pydantic.BaseModel):
    year: int
    month: int
    day: int


class Flight(pydantic.BaseModel):
    flight_id: str
    date: Date
    origin: str


FLIGHTS = {"DA123": Flight(flight_id="DA123", date=Date(year=2025, month=9, day=1), origin="SFO")}
ITINERARIES: dict[str, dict[str, Any]] = {}


def fetch_flight_info(date: Date, origin: str) -> list[Flight]:
    """Fetch the flights leaving origin on date."""
    return [f for f in FLIGHTS.values() if f.date == date and f.origin == origin]


def book_flight(flight: Flight, user_name: str) -> str:
    """Book a flight for a user; returns the confirmation number."""
    confirmation = f"{flight.flight_id}-{user_name}"
    ITINERARIES[confirmation] = {"flight": flight, "user_name": user_name}
    return confirmation


class AirlineService(dspy.Signature):
    """You are an airline customer service agent: fulfil the user's request with the tools."""

    user_request: str = dspy.InputField()
    process_result: str = dspy.OutputField()


def book_with_the_agent() -> Any:
    sfo = {"year": 2025, "month": 9, "day": 1}
    dspy.configure(lm=DummyLM([
        {"next_thought": "find", "next_tool_name": "fetch_flight_info", "next_tool_args": {"date": sfo, "origin": "SFO"}},
        {"next_thought": "book", "next_tool_name": "book_flight",
         "next_tool_args": {"flight": {"flight_id": "DA123", "date": sfo, "origin": "SFO"}, "user_name": "Adam"}},
        {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}},
        {"reasoning": "r", "process_result": "Booked DA123-Adam"}]))
    agent = dspy.ReAct(AirlineService, tools=[fetch_flight_info, book_flight])
    pred = agent(user_request="Book me the SFO flight on 2025-09-01, I am Adam")
    return pred.process_result, pred.trajectory["observation_0"], ITINERARIES["DA123-Adam"]


def test_customer_service_agent_with_pydantic_tool_arguments(run: Runner) -> None:
    result, found, booked = run.check(book_with_the_agent)
    assert result == "Booked DA123-Adam"
    assert found == [FLIGHTS["DA123"]] and type(found[0]).__name__ == "Flight"
    assert booked == {"flight": FLIGHTS["DA123"], "user_name": "Adam"}
