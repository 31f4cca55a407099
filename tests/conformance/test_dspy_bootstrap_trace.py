"""DSPy's own tests/teleprompt/test_bootstrap_trace.py (stanfordnlp/dspy), unchanged but for the names
(``test_*`` → ``dspy_test_*``, so that pytest does not collect them here as well): each test
function is the program, run in-process and through a session (``run.check``: its asserts hold on
either side, it returns None).

Not here, because they monkeypatch: ``test_bootstrap_trace_data_passes_callback_metadata``. Not
here, because they fail in-process on DSPy 3.4.1 (written for another DSPy version: most build a
``dspy.LM("openai/...")`` with no API key, which 3.4.1 refuses before the litellm function they
patch is reached; the others assert prompts or fields of another version):
``test_bootstrap_trace_data``.
"""

import dspy
import pytest
from dspy.primitives.example import Example
from dspy.teleprompt.bootstrap_trace import FailedPrediction, bootstrap_trace_data

from tests.conformance.harness import Runner, dspy_test_id


def dspy_test_capture_crashes_does_not_capture_lm_errors():
    """``capture_crashes`` converts program bugs into FailedPrediction, but an LMError is
    infrastructure: repainting it as a code failure would hand the optimizer an invalid
    evaluation, so it must propagate to the evaluator's error handling instead."""
    from dspy.utils.exceptions import LMRateLimitError

    example = Example(q="x").with_inputs("q")

    class Bug(dspy.Module):
        def forward(self, **kwargs):
            raise RuntimeError("a real code failure")

    data = bootstrap_trace_data(Bug(), dataset=[example], num_threads=1, capture_crashes=True)
    assert isinstance(data[0]["prediction"], FailedPrediction)
    assert "RuntimeError" in data[0]["prediction"].completion_text

    class Flaky(dspy.Module):
        def forward(self, **kwargs):
            raise LMRateLimitError("429 from the provider")

    # raise_on_error=False mirrors the flex GEPA call site (gepa_flex_utils).
    data = bootstrap_trace_data(
        Flaky(), dataset=[example], num_threads=1, capture_crashes=True, raise_on_error=False
    )
    assert data == []  # handled by the evaluator as an error, never repainted as a FailedPrediction


# pydantic warns once per process when it first builds a schema of litellm's types: not the case's
pytestmark = pytest.mark.filterwarnings("ignore:Item '.*' on TypedDict class:UserWarning")

# -- the cases: DSPy's test functions as programs, in-process and through a session --

SYNC_TESTS = [dspy_test_capture_crashes_does_not_capture_lm_errors]


@pytest.mark.parametrize("dspy_test", SYNC_TESTS, ids=dspy_test_id)
def test_bootstrap_trace_tests_of_dspy(run: Runner, dspy_test) -> None:
    assert run.check(dspy_test) is None  # its asserts held where it ran
