"""DSPy's own tests/adapters/test_chat_adapter.py (stanfordnlp/dspy), unchanged but for the names
(``test_*`` → ``dspy_test_*``, so that pytest does not collect them here as well): each test
function is the program, run in-process and through a session (``run.check``: its asserts hold on
either side, it returns None).

Not here, because they call a real model (``lm_for_test``, ``llm_call``, an API key):
``test_chat_adapter_format_exact_messages_with_citations_output_demo``. Not here, because they fail
in-process on DSPy 3.4.1 (written for another DSPy version: most build a ``dspy.LM("openai/...")``
with no API key, which 3.4.1 refuses before the litellm function they patch is reached; the others
assert prompts or fields of another version):
``test_chat_adapter_format_exact_messages_with_history``,
``test_chat_adapter_format_exact_messages_with_history_demo_pydantic_tools_and_image``,
``test_chat_adapter_format_exact_messages_with_non_native_tool_history``,
``test_chat_adapter_format_exact_messages_kitchen_sink``,
``test_chat_adapter_formats_conversation_history``, ``test_chat_adapter_with_pydantic_models``,
``test_chat_adapter_signature_information``, ``test_chat_adapter_with_code``,
``test_chat_adapter_fallback_to_json_adapter_on_exception``,
``test_chat_adapter_fallback_preserves_native_function_calling_flag``,
``test_chat_adapter_respects_use_json_adapter_fallback_flag``,
``test_chat_adapter_toolcalls_native_function_calling``,
``test_chat_adapter_toolcalls_vague_match``, ``test_chat_adapter_native_reasoning``,
``test_chat_adapter_parses_float_with_underscores``,
``test_null_content_raises_adapter_parse_error``,
``test_empty_string_content_raises_adapter_parse_error``,
``test_responses_model_native_tool_calling_round_trips_tool_only_output``,
``test_chat_adapter_fallback_to_json_adapter_on_exception_async``,
``test_chat_adapter_async_fallback_preserves_native_function_calling_flag``,
``test_chat_adapter_quotes_literals_as_expected``,
``test_tool_call_with_null_or_missing_content_does_not_raise``.
"""

import json
from typing import Literal

import dspy
import pydantic
import pytest
from dspy.experimental import Citations, Document

from tests.conformance.dspy_adapter_capture import format_messages_and_lm_kwargs
from tests.conformance.harness import AsyncRunner, Runner, dspy_test_id, dspy_test_params


def dspy_test_chat_adapter_sync_call():
    signature = dspy.make_signature("question->answer")
    adapter = dspy.ChatAdapter()
    lm = dspy.utils.DummyLM([{"answer": "Paris"}])
    result = adapter(lm, {}, signature, [], {"question": "What is the capital of France?"})
    assert result == [{"answer": "Paris"}]


async def dspy_test_chat_adapter_async_call():
    signature = dspy.make_signature("question->answer")
    adapter = dspy.ChatAdapter()
    lm = dspy.utils.DummyLM([{"answer": "Paris"}])
    result = await adapter.acall(lm, {}, signature, [], {"question": "What is the capital of France?"})
    assert result == [{"answer": "Paris"}]


def dspy_test_chat_adapter_format_exact_messages_for_simple_signature():
    class QA(dspy.Signature):
        """Answer the question."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField()

    messages, lm_kwargs = format_messages_and_lm_kwargs(dspy.ChatAdapter(), QA, [], {"question": "What is the capital of France?"})

    expected_lm_kwargs = {}
    assert lm_kwargs == expected_lm_kwargs

    assert messages == [
        {
            "role": "system",
            "content": """Your input fields are:
1. `question` (str):
Your output fields are:
1. `answer` (str):
All interactions will be structured in the following way, with the appropriate values filled in.

[[ ## question ## ]]
{question}

[[ ## answer ## ]]
{answer}

[[ ## completed ## ]]
In adhering to this structure, your objective is:\x20
        Answer the question.""",
        },
        {
            "role": "user",
            "content": """[[ ## question ## ]]
What is the capital of France?

Respond with the corresponding output fields, starting with the field `[[ ## answer ## ]]`, and then ending with the marker for `[[ ## completed ## ]]`.""",
        },
    ]


def dspy_test_chat_adapter_format_exact_messages_with_demo_and_typed_outputs():
    class MultiAnswer(dspy.Signature):
        """Answer the question with multiple answers and scores"""

        question: str = dspy.InputField()
        answers: list[str] = dspy.OutputField()
        scores: list[float] = dspy.OutputField()

    messages, lm_kwargs = format_messages_and_lm_kwargs(dspy.ChatAdapter(),
        MultiAnswer,
        demos=[{"question": "Q1", "answers": ["A1", "A2"], "scores": [0.1, 0.9]}],
        inputs={"question": "Q2"},
    )

    expected_lm_kwargs = {}
    assert lm_kwargs == expected_lm_kwargs

    assert messages == [
        {
            "role": "system",
            "content": """Your input fields are:
1. `question` (str):
Your output fields are:
1. `answers` (list[str]):\x20
2. `scores` (list[float]):
All interactions will be structured in the following way, with the appropriate values filled in.

[[ ## question ## ]]
{question}

[[ ## answers ## ]]
{answers}        # note: the value you produce must adhere to the JSON schema: {"type": "array", "items": {"type": "string"}}

[[ ## scores ## ]]
{scores}        # note: the value you produce must adhere to the JSON schema: {"type": "array", "items": {"type": "number"}}

[[ ## completed ## ]]
In adhering to this structure, your objective is:\x20
        Answer the question with multiple answers and scores""",
        },
        {"role": "user", "content": """[[ ## question ## ]]
Q1"""},
        {
            "role": "assistant",
            "content": """[[ ## answers ## ]]
["A1", "A2"]

[[ ## scores ## ]]
[0.1, 0.9]

[[ ## completed ## ]]
""",
        },
        {
            "role": "user",
            "content": """[[ ## question ## ]]
Q2

Respond with the corresponding output fields, starting with the field `[[ ## answers ## ]]` (must be formatted as a valid Python list[str]), then `[[ ## scores ## ]]` (must be formatted as a valid Python list[float]), and then ending with the marker for `[[ ## completed ## ]]`.""",
        },
    ]


def dspy_test_chat_adapter_format_exact_messages_with_nested_pydantic_models():
    class Address(pydantic.BaseModel):
        city: str
        country: str

    class Person(pydantic.BaseModel):
        name: str
        address: Address
        tags: list[str]

    class Summary(pydantic.BaseModel):
        headline: str
        score: float

    class PydanticSignature(dspy.Signature):
        person: Person = dspy.InputField()
        summary: Summary = dspy.OutputField()

    messages, lm_kwargs = format_messages_and_lm_kwargs(dspy.ChatAdapter(),
        PydanticSignature,
        [],
        {"person": Person(name="Ada", address=Address(city="London", country="UK"), tags=["math", "code"])},
    )

    expected_messages = [{"role": "system",
      "content": 'Your input fields are:\n'
                 '1. `person` (Person):\n'
                 'Your output fields are:\n'
                 '1. `summary` (Summary):\n'
                 'All interactions will be structured in the following way, with the appropriate '
                 'values filled in.\n'
                 '\n'
                 '[[ ## person ## ]]\n'
                 '{person}\n'
                 '\n'
                 '[[ ## summary ## ]]\n'
                 '{summary}        # note: the value you produce must adhere to the JSON schema: '
                 '{"type": "object", "properties": {"headline": {"type": "string", "title": '
                 '"Headline"}, "score": {"type": "number", "title": "Score"}}, "required": '
                 '["headline", "score"], "title": "Summary"}\n'
                 '\n'
                 '[[ ## completed ## ]]\n'
                 'In adhering to this structure, your objective is: \n'
                 '        Given the fields `person`, produce the fields `summary`.'},
     {"role": "user",
      "content": '[[ ## person ## ]]\n'
                 '{"name": "Ada", "address": {"city": "London", "country": "UK"}, "tags": ["math", '
                 '"code"]}\n'
                 '\n'
                 'Respond with the corresponding output fields, starting with the field `[[ ## summary '
                 '## ]]` (must be formatted as a valid Python Summary), and then ending with the '
                 'marker for `[[ ## completed ## ]]`.'}]
    assert messages == expected_messages
    expected_lm_kwargs = {}
    assert lm_kwargs == expected_lm_kwargs


def dspy_test_chat_adapter_format_exact_messages_with_incomplete_demo():
    class IncompleteDemoSignature(dspy.Signature):
        question: str = dspy.InputField()
        context: str = dspy.InputField()
        answer: str = dspy.OutputField()
        confidence: float = dspy.OutputField()

    messages, lm_kwargs = format_messages_and_lm_kwargs(dspy.ChatAdapter(),
        IncompleteDemoSignature,
        [{"question": "Q1", "answer": "A1"}],
        {"question": "Q2", "context": "C2"},
    )

    expected_messages = [{"role": "system",
      "content": "Your input fields are:\n"
                 "1. `question` (str): \n"
                 "2. `context` (str):\n"
                 "Your output fields are:\n"
                 "1. `answer` (str): \n"
                 "2. `confidence` (float):\n"
                 "All interactions will be structured in the following way, with the appropriate "
                 "values filled in.\n"
                 "\n"
                 "[[ ## question ## ]]\n"
                 "{question}\n"
                 "\n"
                 "[[ ## context ## ]]\n"
                 "{context}\n"
                 "\n"
                 "[[ ## answer ## ]]\n"
                 "{answer}\n"
                 "\n"
                 "[[ ## confidence ## ]]\n"
                 "{confidence}        # note: the value you produce must be a single float value\n"
                 "\n"
                 "[[ ## completed ## ]]\n"
                 "In adhering to this structure, your objective is: \n"
                 "        Given the fields `question`, `context`, produce the fields `answer`, "
                 "`confidence`."},
     {"role": "user",
      "content": "This is an example of the task, though some input or output fields are not "
                 "supplied.\n"
                 "\n"
                 "[[ ## question ## ]]\n"
                 "Q1"},
     {"role": "assistant",
      "content": "[[ ## answer ## ]]\n"
                 "A1\n"
                 "\n"
                 "[[ ## confidence ## ]]\n"
                 "Not supplied for this particular example.\n"
                 "\n"
                 "[[ ## completed ## ]]\n"},
     {"role": "user",
      "content": "[[ ## question ## ]]\n"
                 "Q2\n"
                 "\n"
                 "[[ ## context ## ]]\n"
                 "C2\n"
                 "\n"
                 "Respond with the corresponding output fields, starting with the field `[[ ## answer "
                 "## ]]`, then `[[ ## confidence ## ]]` (must be formatted as a valid Python float), "
                 "and then ending with the marker for `[[ ## completed ## ]]`."}]
    assert messages == expected_messages
    expected_lm_kwargs = {}
    assert lm_kwargs == expected_lm_kwargs


def dspy_test_chat_adapter_format_exact_messages_with_list_value_for_string_input():
    class ListAsStringSignature(dspy.Signature):
        context: str = dspy.InputField()
        answer: str = dspy.OutputField()

    messages, lm_kwargs = format_messages_and_lm_kwargs(dspy.ChatAdapter(), ListAsStringSignature, [], {"context": ["alpha", "beta"]})

    expected_messages = [{"role": "system",
      "content": "Your input fields are:\n"
                 "1. `context` (str):\n"
                 "Your output fields are:\n"
                 "1. `answer` (str):\n"
                 "All interactions will be structured in the following way, with the appropriate "
                 "values filled in.\n"
                 "\n"
                 "[[ ## context ## ]]\n"
                 "{context}\n"
                 "\n"
                 "[[ ## answer ## ]]\n"
                 "{answer}\n"
                 "\n"
                 "[[ ## completed ## ]]\n"
                 "In adhering to this structure, your objective is: \n"
                 "        Given the fields `context`, produce the fields `answer`."},
     {"role": "user",
      "content": "[[ ## context ## ]]\n"
                 "[1] «alpha»\n"
                 "[2] «beta»\n"
                 "\n"
                 "Respond with the corresponding output fields, starting with the field `[[ ## answer "
                 "## ]]`, and then ending with the marker for `[[ ## completed ## ]]`."}]
    assert messages == expected_messages
    expected_lm_kwargs = {}
    assert lm_kwargs == expected_lm_kwargs


def dspy_test_chat_adapter_format_exact_messages_with_literal_output():
    class LiteralSignature(dspy.Signature):
        question: str = dspy.InputField()
        verdict: Literal["yes", "no"] = dspy.OutputField()

    messages, lm_kwargs = format_messages_and_lm_kwargs(dspy.ChatAdapter(), LiteralSignature, [], {"question": "Is the sky blue?"})

    expected_messages = [{"role": "system",
      "content": "Your input fields are:\n"
                 "1. `question` (str):\n"
                 "Your output fields are:\n"
                 "1. `verdict` (Literal['yes', 'no']):\n"
                 "All interactions will be structured in the following way, with the appropriate "
                 "values filled in.\n"
                 "\n"
                 "[[ ## question ## ]]\n"
                 "{question}\n"
                 "\n"
                 "[[ ## verdict ## ]]\n"
                 "{verdict}        # note: the value you produce must exactly match (no extra "
                 "characters) one of: yes; no\n"
                 "\n"
                 "[[ ## completed ## ]]\n"
                 "In adhering to this structure, your objective is: \n"
                 "        Given the fields `question`, produce the fields `verdict`."},
     {"role": "user",
      "content": "[[ ## question ## ]]\n"
                 "Is the sky blue?\n"
                 "\n"
                 "Respond with the corresponding output fields, starting with the field `[[ ## verdict "
                 "## ]]` (must be formatted as a valid Python Literal['yes', 'no']), and then ending "
                 "with the marker for `[[ ## completed ## ]]`."}]
    assert messages == expected_messages
    expected_lm_kwargs = {}
    assert lm_kwargs == expected_lm_kwargs


def dspy_test_chat_adapter_format_exact_messages_with_multimodal_custom_type_inputs():
    class CustomTypeSignature(dspy.Signature):
        image: dspy.Image = dspy.InputField()
        audio: dspy.Audio = dspy.InputField()
        file: dspy.File = dspy.InputField()
        document: Document = dspy.InputField()
        answer: str = dspy.OutputField()

    messages, lm_kwargs = format_messages_and_lm_kwargs(dspy.ChatAdapter(),
        CustomTypeSignature,
        [],
        {
            "image": dspy.Image("https://example.com/cat.png"),
            "audio": dspy.Audio(data="QUJD", audio_format="wav"),
            "file": dspy.File.from_file_id("file-123", filename="notes.txt"),
            "document": Document(data="Alpha beta", title="Doc"),
        },
    )

    expected_messages = [{"role": "system",
      "content": "Your input fields are:\n"
                 "1. `image` (Image): \n"
                 "2. `audio` (Audio): \n"
                 "3. `file` (File): \n"
                 "4. `document` (Document): \n"
                 "    Type description of Document: A document containing text content that can be "
                 "referenced and cited. Include the full text content and optionally a title for "
                 "proper referencing.\n"
                 "Your output fields are:\n"
                 "1. `answer` (str):\n"
                 "All interactions will be structured in the following way, with the appropriate "
                 "values filled in.\n"
                 "\n"
                 "[[ ## image ## ]]\n"
                 "{image}\n"
                 "\n"
                 "[[ ## audio ## ]]\n"
                 "{audio}\n"
                 "\n"
                 "[[ ## file ## ]]\n"
                 "{file}\n"
                 "\n"
                 "[[ ## document ## ]]\n"
                 "{document}\n"
                 "\n"
                 "[[ ## answer ## ]]\n"
                 "{answer}\n"
                 "\n"
                 "[[ ## completed ## ]]\n"
                 "In adhering to this structure, your objective is: \n"
                 "        Given the fields `image`, `audio`, `file`, `document`, produce the fields "
                 "`answer`."},
     {"role": "user",
      "content": [{"type": "text", "text": "[[ ## image ## ]]\n"},
                  {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                  {"type": "text", "text": "\n\n[[ ## audio ## ]]\n"},
                  {"type": "input_audio", "input_audio": {"data": "QUJD", "format": "wav"}},
                  {"type": "text", "text": "\n\n[[ ## file ## ]]\n"},
                  {"type": "file", "file": {"file_id": "file-123", "filename": "notes.txt"}},
                  {"type": "text", "text": "\n\n[[ ## document ## ]]\n"},
                  {"type": "document",
                   "source": {"type": "text", "media_type": "text/plain", "data": "Alpha beta"},
                   "citations": {"enabled": True},
                   "title": "Doc"},
                  {"type": "text",
                   "text": "\n"
                           "\n"
                           "Respond with the corresponding output fields, starting with the field `[[ "
                           "## answer ## ]]`, and then ending with the marker for `[[ ## completed ## "
                           "]]`."}]}]
    assert messages == expected_messages
    expected_lm_kwargs = {}
    assert lm_kwargs == expected_lm_kwargs


def dspy_test_chat_adapter_format_exact_messages_with_base_custom_type_input():
    class Event(dspy.Type):
        label: str

        def format(self):
            return [{"type": "event", "event": {"label": self.label}}]

        @classmethod
        def description(cls):
            return "An event block."

    class EventSignature(dspy.Signature):
        event: Event = dspy.InputField()
        answer: str = dspy.OutputField()

    messages, lm_kwargs = format_messages_and_lm_kwargs(dspy.ChatAdapter(), EventSignature, [], {"event": Event(label="launch")})

    expected_messages = [{"role": "system",
      "content": "Your input fields are:\n"
                 "1. `event` (Event): \n"
                 "    Type description of Event: An event block.\n"
                 "Your output fields are:\n"
                 "1. `answer` (str):\n"
                 "All interactions will be structured in the following way, with the appropriate "
                 "values filled in.\n"
                 "\n"
                 "[[ ## event ## ]]\n"
                 "{event}\n"
                 "\n"
                 "[[ ## answer ## ]]\n"
                 "{answer}\n"
                 "\n"
                 "[[ ## completed ## ]]\n"
                 "In adhering to this structure, your objective is: \n"
                 "        Given the fields `event`, produce the fields `answer`."},
     {"role": "user",
      "content": [{"type": "text", "text": "[[ ## event ## ]]\n"},
                  {"type": "event", "event": {"label": "launch"}},
                  {"type": "text",
                   "text": "\n"
                           "\n"
                           "Respond with the corresponding output fields, starting with the field `[[ "
                           "## answer ## ]]`, and then ending with the marker for `[[ ## completed ## "
                           "]]`."}]}]
    assert messages == expected_messages
    expected_lm_kwargs = {}
    assert lm_kwargs == expected_lm_kwargs


def dspy_test_chat_adapter_format_exact_messages_and_lm_kwargs_with_native_citations():
    class AnthropicLM(dspy.utils.DummyLM):
        def __init__(self):
            super().__init__([{}])
            self.model = "anthropic/claude-3-5-sonnet"

    class CitationSignature(dspy.Signature):
        question: str = dspy.InputField()
        answer: str = dspy.OutputField()
        citations: Citations = dspy.OutputField()

    messages, lm_kwargs = format_messages_and_lm_kwargs(
        dspy.ChatAdapter(),
        CitationSignature,
        [],
        {"question": "Q?"},
        lm=AnthropicLM(),
    )

    expected_messages = [{"role": "system",
      "content": "Your input fields are:\n"
                 "1. `question` (str):\n"
                 "Your output fields are:\n"
                 "1. `answer` (str):\n"
                 "All interactions will be structured in the following way, with the appropriate "
                 "values filled in.\n"
                 "\n"
                 "[[ ## question ## ]]\n"
                 "{question}\n"
                 "\n"
                 "[[ ## answer ## ]]\n"
                 "{answer}\n"
                 "\n"
                 "[[ ## completed ## ]]\n"
                 "In adhering to this structure, your objective is: \n"
                 "        Given the fields `question`, produce the fields `answer`, `citations`."},
     {"role": "user",
      "content": "[[ ## question ## ]]\n"
                 "Q?\n"
                 "\n"
                 "Respond with the corresponding output fields, starting with the field `[[ ## answer "
                 "## ]]`, and then ending with the marker for `[[ ## completed ## ]]`."}]
    assert messages == expected_messages
    expected_lm_kwargs = {}
    assert lm_kwargs == expected_lm_kwargs

def dspy_test_chat_adapter_format_exact_messages_preserves_passthrough_lm_kwargs():
    class PassthroughSignature(dspy.Signature):
        question: str = dspy.InputField()
        answer: str = dspy.OutputField()

    messages, lm_kwargs = format_messages_and_lm_kwargs(
        dspy.ChatAdapter(),
        PassthroughSignature,
        [],
        {"question": "Q?"},
        lm_kwargs={"temperature": 0.7, "max_tokens": 42, "stream": True, "cache": False},
    )

    expected_messages = [{"role": "system",
      "content": "Your input fields are:\n"
                 "1. `question` (str):\n"
                 "Your output fields are:\n"
                 "1. `answer` (str):\n"
                 "All interactions will be structured in the following way, with the appropriate "
                 "values filled in.\n"
                 "\n"
                 "[[ ## question ## ]]\n"
                 "{question}\n"
                 "\n"
                 "[[ ## answer ## ]]\n"
                 "{answer}\n"
                 "\n"
                 "[[ ## completed ## ]]\n"
                 "In adhering to this structure, your objective is: \n"
                 "        Given the fields `question`, produce the fields `answer`."},
     {"role": "user",
      "content": "[[ ## question ## ]]\n"
                 "Q?\n"
                 "\n"
                 "Respond with the corresponding output fields, starting with the field `[[ ## answer "
                 "## ]]`, and then ending with the marker for `[[ ## completed ## ]]`."}]
    assert messages == expected_messages
    expected_lm_kwargs = {"temperature": 0.7, "max_tokens": 42, "stream": True, "cache": False}
    assert lm_kwargs == expected_lm_kwargs

def dspy_test_chat_adapter_format_exact_messages_and_lm_kwargs_with_native_reasoning():
    class ReasoningLM(dspy.utils.DummyLM):
        @property
        def supports_reasoning(self):
            return True

    class NativeReasoningSignature(dspy.Signature):
        question: str = dspy.InputField()
        reasoning: dspy.Reasoning = dspy.OutputField()
        answer: str = dspy.OutputField()

    messages, lm_kwargs = format_messages_and_lm_kwargs(
        dspy.ChatAdapter(),
        NativeReasoningSignature,
        [],
        {"question": "Q?"},
        lm=ReasoningLM([{}]),
    )

    expected_messages = [{"role": "system",
      "content": "Your input fields are:\n"
                 "1. `question` (str):\n"
                 "Your output fields are:\n"
                 "1. `answer` (str):\n"
                 "All interactions will be structured in the following way, with the appropriate "
                 "values filled in.\n"
                 "\n"
                 "[[ ## question ## ]]\n"
                 "{question}\n"
                 "\n"
                 "[[ ## answer ## ]]\n"
                 "{answer}\n"
                 "\n"
                 "[[ ## completed ## ]]\n"
                 "In adhering to this structure, your objective is: \n"
                 "        Given the fields `question`, produce the fields `reasoning`, `answer`."},
     {"role": "user",
      "content": "[[ ## question ## ]]\n"
                 "Q?\n"
                 "\n"
                 "Respond with the corresponding output fields, starting with the field `[[ ## answer "
                 "## ]]`, and then ending with the marker for `[[ ## completed ## ]]`."}]
    assert messages == expected_messages
    expected_lm_kwargs = {"reasoning_effort": "low"}
    assert lm_kwargs == expected_lm_kwargs


def dspy_test_chat_adapter_native_tool_calling_still_enables_native_reasoning():
    class NativeToolReasoningLM(dspy.utils.DummyLM):
        @property
        def supports_function_calling(self):
            return True

        @property
        def supports_reasoning(self):
            return True

    def search(query: str) -> str:
        return query

    class NativeToolReasoningSignature(dspy.Signature):
        question: str = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        next_thought: dspy.Reasoning = dspy.OutputField()
        tool_calls: dspy.ToolCalls = dspy.OutputField()

    _, lm_kwargs = format_messages_and_lm_kwargs(
        dspy.ChatAdapter(use_native_function_calling=True),
        NativeToolReasoningSignature,
        [],
        {"question": "Q?", "tools": [dspy.Tool(search)]},
        lm=NativeToolReasoningLM([{}]),
    )

    assert "tools" in lm_kwargs
    assert lm_kwargs["reasoning_effort"] == "low"


def dspy_test_chat_adapter_nonnative_strips_native_tool_kwargs():
    def search(query: str) -> str:
        return query

    class NonNativeToolSignature(dspy.Signature):
        question: str = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        tool_calls: dspy.ToolCalls = dspy.OutputField()

    _, lm_kwargs = format_messages_and_lm_kwargs(
        dspy.ChatAdapter(use_native_function_calling=False),
        NonNativeToolSignature,
        [],
        {"question": "Q?", "tools": [dspy.Tool(search)]},
        lm_kwargs={
            "tools": [{"type": "function", "function": {"name": "submit"}}],
            "tool_choice": {"type": "function", "function": {"name": "submit"}},
            "parallel_tool_calls": True,
        },
    )

    assert "tools" not in lm_kwargs
    assert "tool_choice" not in lm_kwargs
    assert "parallel_tool_calls" not in lm_kwargs


def dspy_test_chat_adapter_format_exact_messages_with_reasoning_and_code_outputs():
    python_code = dspy.Code["python"]

    class CodeSignature(dspy.Signature):
        question: str = dspy.InputField()
        reasoning: dspy.Reasoning = dspy.OutputField()
        code: python_code = dspy.OutputField()

    messages, lm_kwargs = format_messages_and_lm_kwargs(dspy.ChatAdapter(),
        CodeSignature,
        [{"question": "Q1", "reasoning": dspy.Reasoning(content="Think"), "code": python_code(code="print('hi')")}],
        {"question": "Q2"},
    )

    expected_messages = [{"role": "system",
      "content": "Your input fields are:\n"
                 "1. `question` (str):\n"
                 "Your output fields are:\n"
                 "1. `reasoning` (str): \n"
                 "2. `code` (Code_python): \n"
                 "    Type description of Code_python: Code represented in a string, specified in the "
                 "`code` field. If this is an output field, the code field should follow the markdown "
                 "code block format, e.g. \n"
                 "```python\n"
                 "{code}\n"
                 "```\n"
                 "Programming language: python\n"
                 "All interactions will be structured in the following way, with the appropriate "
                 "values filled in.\n"
                 "\n"
                 "[[ ## question ## ]]\n"
                 "{question}\n"
                 "\n"
                 "[[ ## reasoning ## ]]\n"
                 "{reasoning}\n"
                 "\n"
                 "[[ ## code ## ]]\n"
                 "{code}\n"
                 "\n"
                 "[[ ## completed ## ]]\n"
                 "In adhering to this structure, your objective is: \n"
                 "        Given the fields `question`, produce the fields `reasoning`, `code`."},
     {"role": "user", "content": "[[ ## question ## ]]\nQ1"},
     {"role": "assistant",
      "content": "[[ ## reasoning ## ]]\n"
                 "Think\n"
                 "\n"
                 "[[ ## code ## ]]\n"
                 "print('hi')\n"
                 "\n"
                 "[[ ## completed ## ]]\n"},
     {"role": "user",
      "content": "[[ ## question ## ]]\n"
                 "Q2\n"
                 "\n"
                 "Respond with the corresponding output fields, starting with the field `[[ ## "
                 "reasoning ## ]]` (must be formatted as a valid Python str), then `[[ ## code ## ]]` "
                 "(must be formatted as a valid Python Code_python), and then ending with the marker "
                 "for `[[ ## completed ## ]]`."}]
    assert messages == expected_messages
    expected_lm_kwargs = {}
    assert lm_kwargs == expected_lm_kwargs


def dspy_test_chat_adapter_format_exact_messages_and_lm_kwargs_with_native_tool_calling():
    class FunctionCallingLM(dspy.utils.DummyLM):
        @property
        def supports_function_calling(self):
            return True

    def search(query: str, k: int = 3) -> str:
        """Search for documents."""
        return query

    class NativeToolSignature(dspy.Signature):
        question: str = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        tool_calls: dspy.ToolCalls = dspy.OutputField()

    messages, lm_kwargs = format_messages_and_lm_kwargs(
        dspy.ChatAdapter(use_native_function_calling=True),
        NativeToolSignature,
        [],
        {"question": "Q?", "tools": [dspy.Tool(search)]},
        lm=FunctionCallingLM([{}]),
    )

    expected_messages = [{"role": "system",
      "content": "Your input fields are:\n"
                 "1. `question` (str):\n"
                 "Your output fields are:\n"
                 "\n"
                 "All interactions will be structured in the following way, with the appropriate "
                 "values filled in.\n"
                 "\n"
                 "[[ ## question ## ]]\n"
                 "{question}\n"
                 "\n"
                 "\n"
                 "\n"
                 "[[ ## completed ## ]]\n"
                 "In adhering to this structure, your objective is: \n"
                 "        Given the fields `question`, `tools`, produce the fields `tool_calls`."},
     {"role": "user",
      "content": "[[ ## question ## ]]\n"
                 "Q?\n"
                 "\n"
                 "Respond with the corresponding output fields, starting with the field , and then "
                 "ending with the marker for `[[ ## completed ## ]]`."}]
    assert messages == expected_messages
    expected_lm_kwargs = {"tools": [{"type": "function",
                "function": {"name": "search",
                             "description": "Search for documents.",
                             "parameters": {"type": "object",
                                            "properties": {"query": {"type": "string"},
                                                           "k": {"type": "integer", "default": 3}},
                                            "required": ["query"]}}}]}
    assert lm_kwargs == expected_lm_kwargs


@pytest.mark.parametrize(
    "adapter",
    [
        dspy.ChatAdapter(use_native_function_calling=True, parallel_tool_calls=True),
        dspy.JSONAdapter(use_native_function_calling=True, parallel_tool_calls=True),
        dspy.XMLAdapter(use_native_function_calling=True, parallel_tool_calls=True),
    ],
)
def dspy_test_adapter_native_tool_calling_can_request_parallel_tool_calls(adapter):
    class FunctionCallingLM(dspy.utils.DummyLM):
        @property
        def supports_function_calling(self):
            return True

    def search(query: str) -> str:
        return query

    class NativeToolSignature(dspy.Signature):
        question: str = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        tool_calls: dspy.ToolCalls = dspy.OutputField()

    _messages, lm_kwargs = format_messages_and_lm_kwargs(
        adapter,
        NativeToolSignature,
        [],
        {"question": "Q?", "tools": [dspy.Tool(search)]},
        lm=FunctionCallingLM([{}]),
    )

    assert lm_kwargs["tool_choice"] == "auto"
    assert lm_kwargs["parallel_tool_calls"] is True


def dspy_test_adapter_native_tool_calling_respects_lm_kwargs_parallel_tool_call_override():
    class FunctionCallingLM(dspy.utils.DummyLM):
        @property
        def supports_function_calling(self):
            return True

    def search(query: str) -> str:
        return query

    class NativeToolSignature(dspy.Signature):
        question: str = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        tool_calls: dspy.ToolCalls = dspy.OutputField()

    _messages, lm_kwargs = format_messages_and_lm_kwargs(
        dspy.ChatAdapter(use_native_function_calling=True, parallel_tool_calls=True),
        NativeToolSignature,
        [],
        {"question": "Q?", "tools": [dspy.Tool(search)]},
        lm_kwargs={"parallel_tool_calls": False},
        lm=FunctionCallingLM([{}]),
    )

    assert lm_kwargs["tool_choice"] == "auto"
    assert lm_kwargs["parallel_tool_calls"] is False


def dspy_test_chat_adapter_native_tool_history_replay():
    class FunctionCallingLM(dspy.utils.DummyLM):
        @property
        def supports_function_calling(self):
            return True

    def search(query: str) -> str:
        """Search for documents."""
        return query

    class NativeToolHistorySignature(dspy.Signature):
        question: str = dspy.InputField()
        history: dspy.History = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        next_thought: dspy.Reasoning = dspy.OutputField()
        tool_calls: dspy.ToolCalls = dspy.OutputField()

    tool_call = dspy.ToolCalls.ToolCall(id="call_1", name="search", args={"query": "cats"})
    tool_call_results = dspy.ToolCallResults.from_tool_calls_and_values([tool_call], [{"items": ["cat"]}])
    history = dspy.History(
        messages=[
            {
                "question": "Q1",
                "next_thought": dspy.Reasoning(content="I should search."),
                "tool_calls": dspy.ToolCalls(tool_calls=[tool_call], tool_call_results=tool_call_results),
            }
        ]
    )

    messages, lm_kwargs = format_messages_and_lm_kwargs(
        dspy.ChatAdapter(use_native_function_calling=True),
        NativeToolHistorySignature,
        [],
        {"question": "Q2", "history": history, "tools": [dspy.Tool(search)]},
        lm=FunctionCallingLM([{}]),
    )

    assert messages[1]["role"] == "user"
    assert "Q1" in messages[1]["content"]
    assert messages[2] == {
        "role": "assistant",
        "content": "[[ ## next_thought ## ]]\nI should search.\n\n[[ ## completed ## ]]\n",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "search", "arguments": '{"query": "cats"}'},
                "id": "call_1",
            }
        ],
    }
    assert json.loads(messages[2]["tool_calls"][0]["function"]["arguments"]) == {"query": "cats"}
    assert messages[3] == {
        "role": "tool",
        "content": '{"items": ["cat"]}',
        "tool_call_id": "call_1",
        "name": "search",
    }
    assert messages[4]["role"] == "user"
    assert "Q2" in messages[4]["content"]
    assert "history" not in messages[4]["content"]
    assert "tools" not in messages[4]["content"]
    assert "tool_call_results" not in messages[4]["content"]
    assert "None" not in messages[4]["content"]
    assert "tools" in lm_kwargs


def dspy_test_chat_adapter_native_tool_history_replays_parallel_tool_results():
    class FunctionCallingLM(dspy.utils.DummyLM):
        @property
        def supports_function_calling(self):
            return True

    def search(query: str) -> str:
        return query

    class NativeToolHistorySignature(dspy.Signature):
        question: str = dspy.InputField()
        history: dspy.History = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        next_thought: dspy.Reasoning = dspy.OutputField()
        tool_calls: dspy.ToolCalls = dspy.OutputField()

    tool_calls = dspy.ToolCalls(
        tool_calls=[
            dspy.ToolCalls.ToolCall(id="call_1", name="search", args={"query": "cats"}),
            dspy.ToolCalls.ToolCall(id="call_2", name="search", args={"query": "dogs"}),
        ]
    )
    tool_call_results = dspy.ToolCallResults.from_tool_calls_and_values(
        tool_calls,
        [{"items": ["cat"]}, {"items": ["dog"]}],
    )
    history = dspy.History(
        messages=[
            {
                "question": "Q1",
                "next_thought": dspy.Reasoning(content="I should search twice."),
                "tool_calls": tool_calls.model_copy(update={"tool_call_results": tool_call_results}),
            }
        ]
    )

    messages, _lm_kwargs = format_messages_and_lm_kwargs(
        dspy.ChatAdapter(use_native_function_calling=True),
        NativeToolHistorySignature,
        [],
        {"question": "Q2", "history": history, "tools": [dspy.Tool(search)]},
        lm=FunctionCallingLM([{}]),
    )

    assert [tool_call["id"] for tool_call in messages[2]["tool_calls"]] == ["call_1", "call_2"]
    assert [
        (message["role"], message["tool_call_id"], message["content"])
        for message in messages[3:5]
    ] == [
        ("tool", "call_1", '{"items": ["cat"]}'),
        ("tool", "call_2", '{"items": ["dog"]}'),
    ]


def dspy_test_chat_adapter_native_tool_history_skips_empty_user_message():
    class FunctionCallingLM(dspy.utils.DummyLM):
        @property
        def supports_function_calling(self):
            return True

    def search(query: str) -> str:
        return query

    class NativeToolHistorySignature(dspy.Signature):
        history: dspy.History = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        next_thought: dspy.Reasoning = dspy.OutputField()
        tool_calls: dspy.ToolCalls = dspy.OutputField()

    tool_call = dspy.ToolCalls.ToolCall(id="call_1", name="search", args={"query": "cats"})
    tool_call_results = dspy.ToolCallResults.from_tool_calls_and_values([tool_call], ["cat result"])
    history = dspy.History(
        messages=[
            {
                "tool_calls": dspy.ToolCalls(tool_calls=[tool_call], tool_call_results=tool_call_results),
            }
        ]
    )

    messages, _ = format_messages_and_lm_kwargs(
        dspy.ChatAdapter(use_native_function_calling=True),
        NativeToolHistorySignature,
        [],
        {"history": history, "tools": [dspy.Tool(search)]},
        lm=FunctionCallingLM([{}]),
    )

    assert messages[1]["role"] == "assistant"
    assert messages[1]["content"] is None
    assert messages[2]["role"] == "tool"


@pytest.mark.parametrize(
    "tool_call_id, tool_call_results",
    [
        ("call_1", None),
        (
            "call_1",
            dspy.ToolCallResults(
                tool_call_results=[
                    dspy.ToolCallResults.ToolCallResult(call_id="other_call", name="search", value="cat result")
                ]
            ),
        ),
        (
            None,
            dspy.ToolCallResults(
                tool_call_results=[
                    dspy.ToolCallResults.ToolCallResult(call_id=None, name="search", value="cat result")
                ]
            ),
        ),
    ],
)
def dspy_test_chat_adapter_native_tool_history_skips_unmatched_tool_calls(tool_call_id, tool_call_results):
    class FunctionCallingLM(dspy.utils.DummyLM):
        @property
        def supports_function_calling(self):
            return True

    def search(query: str) -> str:
        return query

    class NativeToolHistorySignature(dspy.Signature):
        question: str = dspy.InputField()
        history: dspy.History = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        next_thought: dspy.Reasoning = dspy.OutputField()
        tool_calls: dspy.ToolCalls = dspy.OutputField()

    tool_call = dspy.ToolCalls.ToolCall(id=tool_call_id, name="search", args={"query": "cats"})
    tool_calls = dspy.ToolCalls(tool_calls=[tool_call], tool_call_results=tool_call_results)
    history = dspy.History(
        messages=[
            {
                "question": "Q1",
                "next_thought": dspy.Reasoning(content="I should search."),
                "tool_calls": tool_calls,
            }
        ]
    )

    messages, _ = format_messages_and_lm_kwargs(
        dspy.ChatAdapter(use_native_function_calling=True),
        NativeToolHistorySignature,
        [],
        {"question": "Q2", "history": history, "tools": [dspy.Tool(search)]},
        lm=FunctionCallingLM([{}]),
    )

    assert all("tool_calls" not in message for message in messages)
    assert all(message["role"] != "tool" for message in messages)
    assert messages[2]["role"] == "assistant"
    assert "I should search." in messages[2]["content"]


@pytest.mark.parametrize(
    "adapter",
    [dspy.ChatAdapter(use_native_function_calling=False), dspy.JSONAdapter(use_native_function_calling=False)],
)
def dspy_test_non_native_tool_history_remains_text_based(adapter):
    def search(query: str) -> str:
        return query

    class ToolHistorySignature(dspy.Signature):
        question: str = dspy.InputField()
        history: dspy.History = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        next_thought: str = dspy.OutputField()
        tool_calls: dspy.ToolCalls = dspy.OutputField()

    tool_call = dspy.ToolCalls.ToolCall(id="call_1", name="search", args={"query": "cats"})
    tool_call_results = dspy.ToolCallResults.from_tool_calls_and_values([tool_call], ["cat"])
    messages = adapter.format(
        ToolHistorySignature,
        [],
        {
            "question": "Q2",
            "history": dspy.History(
                messages=[
                    {
                        "question": "Q1",
                        "next_thought": "I should search.",
                        "tool_calls": dspy.ToolCalls(tool_calls=[tool_call], tool_call_results=tool_call_results),
                    }
                ]
            ),
            "tools": [dspy.Tool(search)],
        },
    )

    assert all(message["role"] != "tool" for message in messages)
    assert [message["role"] for message in messages[1:]] == ["user", "assistant", "user", "user"]
    assert "Q1" in messages[1]["content"]
    assert "tool_call_results" not in messages[1]["content"]
    assert "tool_calls" in messages[2]["content"]
    assert "[[ ## tool_call_results ## ]]" in messages[3]["content"]
    assert "cat" in messages[3]["content"]
    assert "Q2" not in messages[3]["content"]
    assert "Q2" in messages[4]["content"]
    assert "None" not in messages[3]["content"]


def dspy_test_chat_adapter_format_accepts_custom_history_formatter_returning_messages_only():
    class CustomHistoryAdapter(dspy.ChatAdapter):
        def format_conversation_history(self, signature, history_field_name, inputs):
            del inputs[history_field_name]
            return [{"role": "user", "content": "custom history"}]

    class HistorySignature(dspy.Signature):
        question: str = dspy.InputField()
        history: dspy.History = dspy.InputField()
        answer: str = dspy.OutputField()

    messages = CustomHistoryAdapter().format(
        HistorySignature,
        [],
        {
            "question": "Q2",
            "history": dspy.History(messages=[{"question": "Q1"}]),
        },
    )

    assert messages[1] == {"role": "user", "content": "custom history"}
    assert messages[2]["role"] == "user"
    assert "Q2" in messages[2]["content"]


def dspy_test_chat_adapter_format_exact_messages_with_tool_input():
    def search(query: str, k: int = 3) -> str:
        """Search for documents."""
        return query

    class ToolSignature(dspy.Signature):
        question: str = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        answer: str = dspy.OutputField()

    messages, lm_kwargs = format_messages_and_lm_kwargs(dspy.ChatAdapter(),
        ToolSignature,
        [],
        {"question": "Q?", "tools": [dspy.Tool(search)]},
    )

    expected_messages = [{"role": "system",
      "content": "Your input fields are:\n"
                 "1. `question` (str): \n"
                 "2. `tools` (list[Tool]):\n"
                 "Your output fields are:\n"
                 "1. `answer` (str):\n"
                 "All interactions will be structured in the following way, with the appropriate "
                 "values filled in.\n"
                 "\n"
                 "[[ ## question ## ]]\n"
                 "{question}\n"
                 "\n"
                 "[[ ## tools ## ]]\n"
                 "{tools}\n"
                 "\n"
                 "[[ ## answer ## ]]\n"
                 "{answer}\n"
                 "\n"
                 "[[ ## completed ## ]]\n"
                 "In adhering to this structure, your objective is: \n"
                 "        Given the fields `question`, `tools`, produce the fields `answer`."},
     {"role": "user",
      "content": '[[ ## question ## ]]\n'
                 'Q?\n'
                 '\n'
                 '[[ ## tools ## ]]\n'
                 '["search, whose description is <desc>Search for documents.</desc>. It takes '
                 "arguments {'query': {'type': 'string'}, 'k': {'type': 'integer', 'default': "
                 '3}}."]\n'
                 '\n'
                 'Respond with the corresponding output fields, starting with the field `[[ ## answer '
                 '## ]]`, and then ending with the marker for `[[ ## completed ## ]]`.'}]
    assert messages == expected_messages
    expected_lm_kwargs = {}
    assert lm_kwargs == expected_lm_kwargs


def dspy_test_chat_adapter_exception_raised_on_failure():
    """
    This test ensures that on an error, ChatAdapter raises an explicit exception.
    """
    signature = dspy.make_signature("question->answer")
    adapter = dspy.ChatAdapter()
    invalid_completion = "{'output':'mismatched value'}"
    with pytest.raises(dspy.utils.exceptions.AdapterParseError, match=r"Adapter ChatAdapter failed to parse.*"):
        adapter.parse(signature, invalid_completion)


def dspy_test_chat_adapter_formats_image():
    # Test basic image formatting
    image = dspy.Image(url="https://example.com/image.jpg")

    class MySignature(dspy.Signature):
        image: dspy.Image = dspy.InputField()
        text: str = dspy.OutputField()

    adapter = dspy.ChatAdapter()
    messages = adapter.format(MySignature, [], {"image": image})

    assert len(messages) == 2
    user_message_content = messages[1]["content"]
    assert user_message_content is not None

    # The message should have 3 chunks of types: text, image_url, text
    assert len(user_message_content) == 3
    assert user_message_content[0]["type"] == "text"
    assert user_message_content[2]["type"] == "text"

    # Assert that the image is formatted correctly
    expected_image_content = {"type": "image_url", "image_url": {"url": "https://example.com/image.jpg"}}
    assert expected_image_content in user_message_content


def dspy_test_chat_adapter_formats_image_with_few_shot_examples():
    class MySignature(dspy.Signature):
        image: dspy.Image = dspy.InputField()
        text: str = dspy.OutputField()

    adapter = dspy.ChatAdapter()

    demos = [
        dspy.Example(
            image=dspy.Image(url="https://example.com/image1.jpg"),
            text="This is a test image",
        ),
        dspy.Example(
            image=dspy.Image(url="https://example.com/image2.jpg"),
            text="This is another test image",
        ),
    ]
    messages = adapter.format(MySignature, demos, {"image": dspy.Image(url="https://example.com/image3.jpg")})

    # 1 system message, 2 few shot examples (1 user and assistant message for each example), 1 user message
    assert len(messages) == 6

    assert "[[ ## completed ## ]]\n" in messages[2]["content"]
    assert "[[ ## completed ## ]]\n" in messages[4]["content"]

    assert {"type": "image_url", "image_url": {"url": "https://example.com/image1.jpg"}} in messages[1]["content"]
    assert {"type": "image_url", "image_url": {"url": "https://example.com/image2.jpg"}} in messages[3]["content"]
    assert {"type": "image_url", "image_url": {"url": "https://example.com/image3.jpg"}} in messages[5]["content"]


def dspy_test_chat_adapter_formats_image_with_nested_images():
    class ImageWrapper(pydantic.BaseModel):
        images: list[dspy.Image]
        tag: list[str]

    class MySignature(dspy.Signature):
        image: ImageWrapper = dspy.InputField()
        text: str = dspy.OutputField()

    image1 = dspy.Image(url="https://example.com/image1.jpg")
    image2 = dspy.Image(url="https://example.com/image2.jpg")
    image3 = dspy.Image(url="https://example.com/image3.jpg")

    image_wrapper = ImageWrapper(images=[image1, image2, image3], tag=["test", "example"])

    adapter = dspy.ChatAdapter()
    messages = adapter.format(MySignature, [], {"image": image_wrapper})

    expected_image1_content = {"type": "image_url", "image_url": {"url": "https://example.com/image1.jpg"}}
    expected_image2_content = {"type": "image_url", "image_url": {"url": "https://example.com/image2.jpg"}}
    expected_image3_content = {"type": "image_url", "image_url": {"url": "https://example.com/image3.jpg"}}

    assert expected_image1_content in messages[1]["content"]
    assert expected_image2_content in messages[1]["content"]
    assert expected_image3_content in messages[1]["content"]


def dspy_test_chat_adapter_formats_image_with_few_shot_examples_with_nested_images():
    class ImageWrapper(pydantic.BaseModel):
        images: list[dspy.Image]
        tag: list[str]

    class MySignature(dspy.Signature):
        image: ImageWrapper = dspy.InputField()
        text: str = dspy.OutputField()

    image1 = dspy.Image(url="https://example.com/image1.jpg")
    image2 = dspy.Image(url="https://example.com/image2.jpg")
    image3 = dspy.Image(url="https://example.com/image3.jpg")

    image_wrapper = ImageWrapper(images=[image1, image2, image3], tag=["test", "example"])
    demos = [
        dspy.Example(
            image=image_wrapper,
            text="This is a test image",
        ),
    ]

    image_wrapper_2 = ImageWrapper(images=[dspy.Image(url="https://example.com/image4.jpg")], tag=["test", "example"])
    adapter = dspy.ChatAdapter()
    messages = adapter.format(MySignature, demos, {"image": image_wrapper_2})

    assert len(messages) == 4

    # Image information in the few-shot example's user message
    expected_image1_content = {"type": "image_url", "image_url": {"url": "https://example.com/image1.jpg"}}
    expected_image2_content = {"type": "image_url", "image_url": {"url": "https://example.com/image2.jpg"}}
    expected_image3_content = {"type": "image_url", "image_url": {"url": "https://example.com/image3.jpg"}}
    assert expected_image1_content in messages[1]["content"]
    assert expected_image2_content in messages[1]["content"]
    assert expected_image3_content in messages[1]["content"]

    # The query image is formatted in the last user message
    assert {"type": "image_url", "image_url": {"url": "https://example.com/image4.jpg"}} in messages[-1]["content"]


def dspy_test_chat_adapter_with_tool():
    class MySignature(dspy.Signature):
        """Answer question with the help of the tools"""

        question: str = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        answer: str = dspy.OutputField()
        tool_calls: dspy.ToolCalls = dspy.OutputField()

    def get_weather(city: str) -> str:
        """Get the weather for a city"""
        return f"The weather in {city} is sunny"

    def get_population(country: str, year: int) -> str:
        """Get the population for a country"""
        return f"The population of {country} in {year} is 1000000"

    tools = [dspy.Tool(get_weather), dspy.Tool(get_population)]

    adapter = dspy.ChatAdapter()
    messages = adapter.format(MySignature, [], {"question": "What is the weather in Tokyo?", "tools": tools})

    assert len(messages) == 2

    # The output field type description should be included in the system message even if the output field is nested
    assert dspy.ToolCalls.description() in messages[0]["content"]

    # The user message should include the question and the tools
    assert "What is the weather in Tokyo?" in messages[1]["content"]
    assert "get_weather" in messages[1]["content"]
    assert "get_population" in messages[1]["content"]

    # Tool arguments format should be included in the user message
    assert "{'city': {'type': 'string'}}" in messages[1]["content"]
    assert "{'country': {'type': 'string'}, 'year': {'type': 'integer'}}" in messages[1]["content"]


def dspy_test_code_output_field_omits_json_schema_in_prompt():
    """Regression test for #9251: dspy.Code should avoid duplicating large JSON schema text."""
    class CodeGeneration(dspy.Signature):
        """Generate code to answer the question"""
        question: str = dspy.InputField()
        code: dspy.Code = dspy.OutputField()

    adapter = dspy.ChatAdapter()
    messages = adapter.format(CodeGeneration, [], {"question": "Hello"})
    system_content = messages[0]["content"]

    assert dspy.Code.description() in system_content
    assert "JSON schema" not in system_content
    assert '"properties"' not in system_content
    assert "Code type in DSPy" not in system_content


def dspy_test_citations_output_field_keeps_json_schema_in_prompt():
    """Non-Code custom types should keep schema guidance for structured output reliability."""

    class CitationGeneration(dspy.Signature):
        question: str = dspy.InputField()
        citations: Citations = dspy.OutputField()

    adapter = dspy.ChatAdapter()
    messages = adapter.format(CitationGeneration, [], {"question": "Hello"})
    system_content = messages[0]["content"]

    assert "must adhere to the JSON schema" in system_content
    assert "Type description of Citations" in system_content


def dspy_test_format_system_message():
    class MySignature(dspy.Signature):
        """Answer the question with multiple answers and scores"""

        question: str = dspy.InputField()
        answers: list[str] = dspy.OutputField()
        scores: list[float] = dspy.OutputField()

    adapter = dspy.ChatAdapter()
    system_message = adapter.format_system_message(MySignature)
    expected_system_message = """Your input fields are:
1. `question` (str):
Your output fields are:
1. `answers` (list[str]):\x20
2. `scores` (list[float]):
All interactions will be structured in the following way, with the appropriate values filled in.

[[ ## question ## ]]
{question}

[[ ## answers ## ]]
{answers}        # note: the value you produce must adhere to the JSON schema: {"type": "array", "items": {"type": "string"}}

[[ ## scores ## ]]
{scores}        # note: the value you produce must adhere to the JSON schema: {"type": "array", "items": {"type": "number"}}

[[ ## completed ## ]]
In adhering to this structure, your objective is:\x20
        Answer the question with multiple answers and scores"""
    assert system_message == expected_system_message


def dspy_test_tool_call_with_unstructured_content_does_not_raise():
    """Provider tool calls are authoritative even when content is not adapter-formatted."""
    adapter = dspy.ChatAdapter(use_native_function_calling=True)
    original_sig = dspy.Signature(
        "question, tools: list[dspy.Tool] -> next_thought: dspy.Reasoning, tool_calls: dspy.ToolCalls"
    )
    processed_sig = original_sig.delete("tools").delete("tool_calls").delete("next_thought")
    outputs = [
        {
            "text": "I'll search for that now.",
            "tool_calls": [
                {"function": {"name": "search", "arguments": '{"query": "test"}'}, "id": "call_1", "type": "function"}
            ],
            "reasoning_content": "I need a search result.",
        }
    ]

    result = adapter._call_postprocess(processed_sig, original_sig, outputs, None, {})

    assert result[0]["tool_calls"].tool_calls[0].id == "call_1"
    assert result[0]["next_thought"] == dspy.Reasoning(content="I need a search result.")


def dspy_test_tool_call_with_structured_content_preserves_other_outputs():
    adapter = dspy.ChatAdapter(use_native_function_calling=True)
    original_sig = dspy.Signature("question, tools: list[dspy.Tool] -> answer, tool_calls: dspy.ToolCalls")
    processed_sig = original_sig.delete("tools").delete("tool_calls")
    outputs = [
        {
            "text": "[[ ## answer ## ]]\nI should use a tool.\n\n[[ ## completed ## ]]",
            "tool_calls": [
                {"function": {"name": "search", "arguments": '{"query": "test"}'}, "id": "call_1", "type": "function"}
            ],
        }
    ]

    result = adapter._call_postprocess(processed_sig, original_sig, outputs, None, {})

    assert result[0]["answer"] == "I should use a tool."
    assert result[0]["tool_calls"].tool_calls[0].id == "call_1"


def dspy_test_provider_tool_calls_preserve_id_and_repair_arguments():
    adapter = dspy.ChatAdapter(use_native_function_calling=True)
    sig_cls = dspy.Signature("question, tools: list[dspy.Tool] -> tool_calls: dspy.ToolCalls")

    outputs = [
        {
            "text": None,
            "tool_calls": [
                {
                    "function": {"name": "search", "arguments": '{"query": "cats",}'},
                    "call_id": "call_from_responses",
                    "type": "function",
                }
            ],
        }
    ]

    result = adapter._call_postprocess(sig_cls, sig_cls, outputs, None, {})

    assert result[0]["tool_calls"] == dspy.ToolCalls(
        tool_calls=[
            dspy.ToolCalls.ToolCall(id="call_from_responses", name="search", args={"query": "cats"})
        ]
    )


class OptionalOutputSignature(dspy.Signature):
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()
    note: str | None = dspy.OutputField(default="No note")
    tags: list[str] = dspy.OutputField(default_factory=list)
    maybe: str | None = dspy.OutputField()


def dspy_test_missing_optional_output_fields_fall_back_to_defaults():
    from dspy.utils.dummies import DummyLM

    with dspy.context(lm=DummyLM([{"answer": "42"}]), adapter=dspy.ChatAdapter()):
        pred = dspy.Predict(OptionalOutputSignature)(question="anything")

    assert pred.answer == "42"
    assert pred.note == "No note"
    assert pred.tags == []
    assert pred.maybe is None


def dspy_test_output_field_default_is_overridden_by_lm_response():
    from dspy.utils.dummies import DummyLM

    with dspy.context(lm=DummyLM([{"answer": "42", "note": "hello", "tags": '["a"]', "maybe": "yes"}]),
                      adapter=dspy.ChatAdapter()):
        pred = dspy.Predict(OptionalOutputSignature)(question="anything")

    assert pred.note == "hello"
    assert pred.tags == ["a"]
    assert pred.maybe == "yes"


def dspy_test_missing_required_output_field_still_raises():
    from dspy.utils.dummies import DummyLM
    from dspy.utils.exceptions import AdapterParseError

    # Two identical responses: ChatAdapter retries via the JSONAdapter fallback before raising.
    responses = [{"note": "present"}, {"note": "present"}]
    with dspy.context(lm=DummyLM(responses), adapter=dspy.ChatAdapter()):
        with pytest.raises(AdapterParseError):
            dspy.Predict(OptionalOutputSignature)(question="anything")


def dspy_test_optional_type_syntax_output_fields_fall_back_to_defaults():
    from typing import Optional

    from dspy.utils.dummies import DummyLM

    class OptionalSyntaxSignature(dspy.Signature):
        question: str = dspy.InputField()
        answer: str = dspy.OutputField()
        note: Optional[str] = dspy.OutputField(default="No note")
        maybe: Optional[str] = dspy.OutputField()

    with dspy.context(lm=DummyLM([{"answer": "42"}]), adapter=dspy.ChatAdapter()):
        pred = dspy.Predict(OptionalSyntaxSignature)(question="anything")

    assert pred.answer == "42"
    assert pred.note == "No note"
    assert pred.maybe is None


def dspy_test_optional_type_syntax_missing_required_output_field_still_raises():
    from typing import Optional

    from dspy.utils.dummies import DummyLM
    from dspy.utils.exceptions import AdapterParseError

    class OptionalSyntaxSignature(dspy.Signature):
        question: str = dspy.InputField()
        answer: str = dspy.OutputField()
        note: Optional[str] = dspy.OutputField(default="No note")
        maybe: Optional[str] = dspy.OutputField()

    responses = [{"note": "present"}, {"maybe": "present"}]
    with dspy.context(lm=DummyLM(responses), adapter=dspy.ChatAdapter()):
        with pytest.raises(AdapterParseError):
            dspy.Predict(OptionalSyntaxSignature)(question="anything")


# pydantic warns once per process when it first builds a schema of litellm's types: not the case's
pytestmark = pytest.mark.filterwarnings("ignore:Item '.*' on TypedDict class:UserWarning")

# -- the cases: DSPy's test functions as programs, in-process and through a session --

SYNC_TESTS = [
    dspy_test_chat_adapter_sync_call, dspy_test_chat_adapter_format_exact_messages_for_simple_signature,
    dspy_test_chat_adapter_format_exact_messages_with_demo_and_typed_outputs,
    dspy_test_chat_adapter_format_exact_messages_with_nested_pydantic_models,
    dspy_test_chat_adapter_format_exact_messages_with_incomplete_demo,
    dspy_test_chat_adapter_format_exact_messages_with_list_value_for_string_input,
    dspy_test_chat_adapter_format_exact_messages_with_literal_output,
    dspy_test_chat_adapter_format_exact_messages_with_multimodal_custom_type_inputs,
    dspy_test_chat_adapter_format_exact_messages_with_base_custom_type_input,
    dspy_test_chat_adapter_format_exact_messages_and_lm_kwargs_with_native_citations,
    dspy_test_chat_adapter_format_exact_messages_preserves_passthrough_lm_kwargs,
    dspy_test_chat_adapter_format_exact_messages_and_lm_kwargs_with_native_reasoning,
    dspy_test_chat_adapter_native_tool_calling_still_enables_native_reasoning,
    dspy_test_chat_adapter_nonnative_strips_native_tool_kwargs,
    dspy_test_chat_adapter_format_exact_messages_with_reasoning_and_code_outputs,
    dspy_test_chat_adapter_format_exact_messages_and_lm_kwargs_with_native_tool_calling,
    dspy_test_adapter_native_tool_calling_respects_lm_kwargs_parallel_tool_call_override,
    dspy_test_chat_adapter_native_tool_history_replay,
    dspy_test_chat_adapter_native_tool_history_replays_parallel_tool_results,
    dspy_test_chat_adapter_native_tool_history_skips_empty_user_message,
    dspy_test_chat_adapter_format_accepts_custom_history_formatter_returning_messages_only,
    dspy_test_chat_adapter_format_exact_messages_with_tool_input,
    dspy_test_chat_adapter_exception_raised_on_failure, dspy_test_chat_adapter_formats_image,
    dspy_test_chat_adapter_formats_image_with_few_shot_examples,
    dspy_test_chat_adapter_formats_image_with_nested_images,
    dspy_test_chat_adapter_formats_image_with_few_shot_examples_with_nested_images,
    dspy_test_chat_adapter_with_tool, dspy_test_code_output_field_omits_json_schema_in_prompt,
    dspy_test_citations_output_field_keeps_json_schema_in_prompt, dspy_test_format_system_message,
    dspy_test_tool_call_with_unstructured_content_does_not_raise,
    dspy_test_tool_call_with_structured_content_preserves_other_outputs,
    dspy_test_provider_tool_calls_preserve_id_and_repair_arguments,
    dspy_test_missing_optional_output_fields_fall_back_to_defaults,
    dspy_test_output_field_default_is_overridden_by_lm_response,
    dspy_test_missing_required_output_field_still_raises,
    dspy_test_optional_type_syntax_output_fields_fall_back_to_defaults,
    dspy_test_optional_type_syntax_missing_required_output_field_still_raises,
]


@pytest.mark.parametrize("dspy_test", SYNC_TESTS, ids=dspy_test_id)
def test_chat_adapter_tests_of_dspy(run: Runner, dspy_test) -> None:
    assert run.check(dspy_test) is None  # its asserts held where it ran


ASYNC_TESTS = [dspy_test_chat_adapter_async_call]


@pytest.mark.parametrize("dspy_test", ASYNC_TESTS, ids=dspy_test_id)
def test_async_chat_adapter_tests_of_dspy(arun: AsyncRunner, dspy_test) -> None:
    async def main(arun: AsyncRunner) -> None:
        return await arun(dspy_test)

    assert arun.check(main) is None  # its asserts held where it ran


# its parametrized tests, with DSPy's own parameters (read from their marks)


@pytest.mark.parametrize("args", dspy_test_params(dspy_test_adapter_native_tool_calling_can_request_parallel_tool_calls))
def test_adapter_native_tool_calling_can_request_parallel_tool_calls_of_dspy(run: Runner, args) -> None:
    assert run.check(dspy_test_adapter_native_tool_calling_can_request_parallel_tool_calls, *args) is None  # its asserts held where it ran


@pytest.mark.parametrize("args", dspy_test_params(dspy_test_chat_adapter_native_tool_history_skips_unmatched_tool_calls))
def test_chat_adapter_native_tool_history_skips_unmatched_tool_calls_of_dspy(run: Runner, args) -> None:
    assert run.check(dspy_test_chat_adapter_native_tool_history_skips_unmatched_tool_calls, *args) is None  # its asserts held where it ran


@pytest.mark.parametrize("args", dspy_test_params(dspy_test_non_native_tool_history_remains_text_based))
def test_non_native_tool_history_remains_text_based_of_dspy(run: Runner, args) -> None:
    assert run.check(dspy_test_non_native_tool_history_remains_text_based, *args) is None  # its asserts held where it ran
