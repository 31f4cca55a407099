"""Code written under ``from __future__ import annotations`` (as this module is), the spelling of
much modern Python: annotations are strings, resolved later in the defining module's globals. A
Signature, a Pydantic model or a tool function defined inside the program reads its types there
(``typing.get_type_hints``, DSPy's ``Tool``, Pydantic's forward references), though no bytecode
reads those names, so they must reach the session's module as in-process they are in this one."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import typing
from typing import ClassVar, Literal, Optional

import dspy
import pydantic
from dspy.utils.dummies import DummyLM

import dspex
from tests.conformance.harness import AsyncRunner, Runner


class Tag(pydantic.BaseModel):
    name: str


Mood = Literal["happy", "sad"]  # a type alias, a global read only by annotations
Kind = str  # rebound by each session below, to a type of its own


@dataclasses.dataclass
class Entry:
    tag: Tag
    mood: Mood
    after: Optional[Entry] = None  # noqa: UP045


class Node(pydantic.BaseModel):
    tag: Tag
    children: list[Node] = []


def classes_of_the_module_read_their_types() -> dict[str, object]:
    return {"hints": {name: str(hint) for name, hint in typing.get_type_hints(Entry).items()},
            "node": repr(Node(tag=Tag(name="root"), children=[Node(tag=Tag(name="leaf"))]))}


def signature_defined_in_the_program() -> dict[str, str]:
    class Tagging(dspy.Signature):
        """Tag the text."""

        text: str = dspy.InputField()
        tags: list[Tag] = dspy.OutputField()
        mood: Mood = dspy.OutputField()
        note: Optional[str] = dspy.OutputField()  # noqa: UP045 (the spelling DSPy's docs use)

    with dspy.context(lm=DummyLM([{"tags": '[{"name": "urgent"}]', "mood": "sad", "note": "None"}])):
        pred = dspy.Predict(Tagging)(text="the server is down")
    fields = {name: str(field.annotation) for name, field in Tagging.fields.items()}
    return {**fields, "tags value": repr(pred.tags), "mood value": pred.mood}


def tool_defined_in_the_program() -> dict[str, object]:
    def find(tag: Tag, limit: Optional[int] = None) -> list[Tag]:  # noqa: UP045
        """Find items by tag."""
        return [tag] * (limit or 1)

    tool = dspy.Tool(find)
    return {"args": tool.args, "result": repr(tool(tag={"name": "x"}, limit=2))}


def model_defined_in_the_program() -> str:
    class Ticket(pydantic.BaseModel):
        tags: list[Tag]
        mood: Mood
        parent: Optional[Ticket] = None  # noqa: UP045

    return repr(Ticket(tags=[Tag(name="a")], mood="happy", parent=Ticket(tags=[], mood="sad")))


def dataclass_defined_in_the_program() -> list[str]:
    @dataclasses.dataclass
    class Counter:
        made: ClassVar[int] = 0  # a class variable, not a field: dataclasses reads the module's typing
        tag: Tag

    return [field.name for field in dataclasses.fields(Counter)]


def test_a_dataclass_defined_in_the_program_tells_class_variables(run: Runner) -> None:
    assert run.check(dataclass_defined_in_the_program) == ["tag"]


def test_a_signature_defined_in_the_program_resolves_its_types(run: Runner) -> None:
    got = run.check(signature_defined_in_the_program)
    assert got["tags"] == f"list[{Tag.__module__}.Tag]" and got["mood value"] == "sad"


def test_a_tool_defined_in_the_program_reads_its_argument_types(run: Runner) -> None:
    got = run.check(tool_defined_in_the_program)
    assert got["args"]["tag"]["title"] == "Tag"


def test_a_model_defined_in_the_program_resolves_its_forward_references(run: Runner) -> None:
    assert run.check(model_defined_in_the_program).startswith("Ticket(tags=[Tag(name='a')]")


def test_classes_of_the_module_read_their_types(run: Runner) -> None:
    """Module-level classes the program uses, sent by value: ``typing.get_type_hints`` of a
    dataclass, a self-referencing Pydantic model."""
    got = run.check(classes_of_the_module_read_their_types)
    assert got["hints"]["tag"] == str(Tag) and got["hints"]["mood"] == str(Mood)
    assert got["node"].startswith("Node(tag=Tag(name='root'), children=[Node(")


async def classes_defined_in_a_coroutine() -> list[object]:
    class Verdict(dspy.Signature):
        """Judge the claim."""

        claim: str = dspy.InputField()
        tags: list[Tag] = dspy.OutputField()

    with dspy.context(lm=DummyLM([{"tags": '[{"name": "true"}]'}])):
        pred = await dspy.Predict(Verdict).acall(claim="the sky is blue")
    # a thread the call starts (asyncio.to_thread) makes its classes in the call's session too
    return [repr(pred.tags), model_defined_in_the_program(), await asyncio.to_thread(model_defined_in_the_program)]


def test_classes_defined_in_a_coroutine_and_its_threads(arun: AsyncRunner) -> None:
    async def main(arun: AsyncRunner) -> object:
        return await arun(classes_defined_in_a_coroutine)

    got = arun.check(main)
    assert got[0] == "[Tag(name='true')]" and got[1] == got[2] and got[1].startswith("Ticket(tags=[Tag(name='a')]")


def model_of_the_session_kind(kind: str, times: int) -> list[str]:
    global Kind
    Kind = Literal[kind]  # type: ignore[valid-type]  # this session's copy of the module only
    out = []
    for _ in range(times):
        class Labelled(pydantic.BaseModel):
            kind: Kind

        out.append(Labelled(kind=kind).kind)
    return out


def test_concurrent_sessions_resolve_in_their_own_module(dx: dspex.Client) -> None:
    """Sessions running at once on one worker (pool c4: capacity 4) each resolve a class's
    annotations in their own copy of the module: ``Kind`` is another type in each."""
    got: dict[str, object] = {}

    def session_of(kind: str) -> None:
        s = dx.session("c4")
        try:
            got[kind] = [s.run(model_of_the_session_kind, kind, 20) for _ in range(5)]
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            got[kind] = exc
        finally:
            s.close(timeout=10)

    threads = [threading.Thread(target=session_of, args=(kind,)) for kind in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert got == {kind: [[kind] * 20] * 5 for kind in ("left", "right")}
