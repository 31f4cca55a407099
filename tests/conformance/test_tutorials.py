"""Programs of DSPy's tutorials as a user's script holds them: a retriever and the program built at
module level, then used in calls (in-process and through a session, compared).

- "RAG" (dspy.ai tutorials/rag): ``search = dspy.retrievers.Embeddings(corpus=..., embedder=...)``
  at the top of the script, a ``RAG`` module whose ``forward`` calls ``search``;
- "Multi-Hop Search" (tutorials/multihop_search): a module generating queries over hops, notes
  gathered from the same retriever;
- "Classification" (tutorials/classification): a typed ``Literal`` output and a float.

The embedder is a user function (no embedding model offline); ``dspy.utils.DummyLM`` answers.
"""

from __future__ import annotations

from typing import Any, Literal

import dspy
import numpy as np
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
