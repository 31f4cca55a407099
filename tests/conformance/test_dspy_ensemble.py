"""DSPy's own tests/teleprompt/test_ensemble.py (stanfordnlp/dspy), unchanged but for the names (``test_*`` → ``dspy_test_*``, so that pytest does not collect them here
as well): each test function is the program, run
in-process and through a session (``run.check``: its asserts hold on either side, it returns None).

Not here, because they patch litellm or DSPy internals of the test process with ``unittest.mock`` (meaningless on a worker): ``test_ensemble_without_reduction``, ``test_ensemble_with_reduction``, ``test_ensemble_with_size_limitation``.
"""

import dspy
import pytest
from dspy.teleprompt import Ensemble

from tests.conformance.harness import Runner, dspy_test_id


class MockProgram(dspy.Module):
    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


# Simple reduction function to test with
def mock_reduce_fn(outputs):
    return sum(outputs) / len(outputs)


def dspy_test_ensemble_deterministic_behavior():
    """Verify that the Ensemble class raises an assertion for deterministic behavior."""
    with pytest.raises(
        AssertionError,
        match="TODO: Implement example hashing for deterministic ensemble.",
    ):
        Ensemble(deterministic=True)


# -- the cases: each test function of DSPy's teleprompt/test_ensemble.py is the program, run in-process and through a session --

SYNC_TESTS = [dspy_test_ensemble_deterministic_behavior]


@pytest.mark.parametrize("dspy_test", SYNC_TESTS, ids=dspy_test_id)
def test_ensemble_tests_of_dspy(run: Runner, dspy_test) -> None:
    assert run.check(dspy_test) is None  # its asserts held where it ran
