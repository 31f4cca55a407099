"""DSPy's own tests/retrievers/test_colbertv2.py (stanfordnlp/dspy), unchanged but for the names
(``test_*`` → ``dspy_test_*``, so that pytest does not collect them here as well): each test function
is the program, run in-process and through a session (``run.check``: its asserts hold on either side,
it returns None); pytest's ``tmp_path``, and a ``monkeypatch`` made where the program runs, are passed
to the tests that take them (``harness.run_dspy_test``).

All its tests.
"""

from unittest.mock import MagicMock, patch

import pytest
from dspy.dsp.colbertv2 import colbertv2_get_request_v2, colbertv2_post_request_v2

from tests.conformance.harness import DSPY_TEST_WARNINGS, Runner, dspy_test_cases, run_dspy_test


def dspy_test_get_request_raises_on_server_error():
    mock_response = MagicMock()
    mock_response.json.return_value = {"error": True, "message": "connection failed"}

    with patch("dspy.dsp.colbertv2.requests.get", return_value=mock_response):
        with pytest.raises(ValueError, match="connection failed"):
            colbertv2_get_request_v2("http://test", "query", k=3)


def dspy_test_post_request_raises_on_server_error():
    mock_response = MagicMock()
    mock_response.json.return_value = {"error": True, "message": "server error"}

    with patch("dspy.dsp.colbertv2.requests.post", return_value=mock_response):
        with pytest.raises(ValueError, match="server error"):
            colbertv2_post_request_v2("http://test2", "query", k=3)


def dspy_test_get_request_success():
    mock_response = MagicMock()
    mock_response.json.return_value = {"topk": [{"text": "doc1", "score": 0.9}]}

    with patch("dspy.dsp.colbertv2.requests.get", return_value=mock_response):
        result = colbertv2_get_request_v2("http://test3", "query", k=3)
        assert result[0]["long_text"] == "doc1"


def dspy_test_post_request_success():
    mock_response = MagicMock()
    mock_response.json.return_value = {"topk": [{"text": "doc1", "score": 0.9}]}

    with patch("dspy.dsp.colbertv2.requests.post", return_value=mock_response):
        result = colbertv2_post_request_v2("http://test4", "query", k=3)
        assert result[0]["text"] == "doc1"


pytestmark = DSPY_TEST_WARNINGS

# -- the cases: DSPy's test functions as programs, in-process and through a session --


SYNC_TESTS = [dspy_test_get_request_raises_on_server_error, dspy_test_post_request_raises_on_server_error,
    dspy_test_get_request_success, dspy_test_post_request_success]


@pytest.mark.parametrize(("dspy_test", "kwargs"), dspy_test_cases(SYNC_TESTS))
def test_colbertv2_tests_of_dspy(run: Runner, dspy_test, kwargs, tmp_path) -> None:
    assert run.check(run_dspy_test, dspy_test, tmp_path, **kwargs) is None  # its asserts held where it ran
