"""DSPy's own tests/predict/test_aggregation.py (stanfordnlp/dspy), unchanged but for the names
(``test_*`` → ``dspy_test_*``, so that pytest does not collect them here as well): each test
function is the program, run in-process and through a session (``run.check``: its asserts hold on
either side, it returns None).

All its tests: ``dspy.majority`` over Predictions, Completions and lists.
"""

import pytest
from dspy.evaluate import normalize_text
from dspy.predict.aggregation import majority
from dspy.primitives.prediction import Completions, Prediction

from tests.conformance.harness import Runner, dspy_test_id


def dspy_test_majority_with_prediction():
    prediction = Prediction.from_completions([{"answer": "2"}, {"answer": "2"}, {"answer": "3"}])
    result = majority(prediction)
    assert result.completions[0]["answer"] == "2"


def dspy_test_majority_with_completions():
    completions = Completions([{"answer": "2"}, {"answer": "2"}, {"answer": "3"}])
    result = majority(completions)
    assert result.completions[0]["answer"] == "2"


def dspy_test_majority_with_list():
    completions = [{"answer": "2"}, {"answer": "2"}, {"answer": "3"}]
    result = majority(completions)
    assert result.completions[0]["answer"] == "2"


def dspy_test_majority_with_normalize():
    completions = [{"answer": "2"}, {"answer": " 2"}, {"answer": "3"}]
    result = majority(completions, normalize=normalize_text)
    assert result.completions[0]["answer"] == "2"


def dspy_test_majority_with_field():
    completions = [
        {"answer": "2", "other": "1"},
        {"answer": "2", "other": "1"},
        {"answer": "3", "other": "2"},
    ]
    result = majority(completions, field="other")
    assert result.completions[0]["other"] == "1"


def dspy_test_majority_with_no_majority():
    completions = [{"answer": "2"}, {"answer": "3"}, {"answer": "4"}]
    result = majority(completions)
    assert result.completions[0]["answer"] == "2"  # The first completion is returned in case of a tie


# -- the cases: DSPy's test functions as programs, in-process and through a session --

SYNC_TESTS = [
    dspy_test_majority_with_prediction, dspy_test_majority_with_completions, dspy_test_majority_with_list,
    dspy_test_majority_with_normalize, dspy_test_majority_with_field, dspy_test_majority_with_no_majority,
]


@pytest.mark.parametrize("dspy_test", SYNC_TESTS, ids=dspy_test_id)
def test_aggregation_tests_of_dspy(run: Runner, dspy_test) -> None:
    assert run.check(dspy_test) is None  # its asserts held where it ran
