"""DSPy's own tests/clients/test_inspect_global_history.py (stanfordnlp/dspy), unchanged but for the
names (``test_*`` → ``dspy_test_*``, so that pytest does not collect them here as well): each test
function is the program, run in-process and through a session (``run.check``: its asserts hold on
either side, it returns None).

Not here, because they read ``capsys`` of the test process inside the test body:
``test_inspect_history_basic``, ``test_inspect_history_with_n``, ``test_inspect_empty_history``,
``test_inspect_history_n_larger_than_history``.
"""

from io import StringIO

import pytest
from dspy.utils.inspect_history import pretty_print_history

from tests.conformance.harness import Runner, dspy_test_id


def dspy_test_inspect_history_renders_message_tool_calls():
    out = StringIO()
    history = [
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "search", "arguments": '{"query":"cats"}'},
                        }
                    ],
                },
                {"role": "tool", "content": "cat result", "tool_call_id": "call_1", "name": "search"},
            ],
            "outputs": [{"text": "done"}],
            "timestamp": "now",
        }
    ]

    pretty_print_history(history, n=1, file=out)

    text = out.getvalue()
    assert "Assistant message:" in text
    assert "Tool calls:" in text
    assert 'search: {"query": "cats"}' in text
    assert "Tool message:" in text
    assert "cat result" in text


def dspy_test_inspect_history_renders_output_tool_calls_without_text():
    out = StringIO()
    history = [
        {
            "messages": [{"role": "user", "content": "Find cats"}],
            "outputs": [
                {
                    "tool_calls": [
                        {"name": "lookup", "arguments": {"query": "cats"}},
                        {"name": "search", "args": {"query": "dogs"}},
                    ]
                }
            ],
            "timestamp": "now",
        }
    ]

    pretty_print_history(history, n=1, file=out)

    text = out.getvalue()
    assert "Response:" not in text
    assert "Tool calls:" in text
    assert 'lookup: {"query": "cats"}' in text
    assert 'search: {"query": "dogs"}' in text


# -- the cases: DSPy's test functions as programs, in-process and through a session --

SYNC_TESTS = [
    dspy_test_inspect_history_renders_message_tool_calls,
    dspy_test_inspect_history_renders_output_tool_calls_without_text,
]


@pytest.mark.parametrize("dspy_test", SYNC_TESTS, ids=dspy_test_id)
def test_inspect_global_history_tests_of_dspy(run: Runner, dspy_test) -> None:
    assert run.check(dspy_test) is None  # its asserts held where it ran
