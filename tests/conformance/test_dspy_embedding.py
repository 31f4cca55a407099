"""DSPy's own tests/clients/test_embedding.py (stanfordnlp/dspy), unchanged but for the names
(``test_*`` → ``dspy_test_*``, so that pytest does not collect them here as well): each test function
is the program, run in-process and through a session (``run.check``: its asserts hold on either side,
it returns None); pytest's ``tmp_path``, and a ``monkeypatch`` made where the program runs, are passed
to the tests that take them (``harness.run_dspy_test``).

Not here:
- takes DSPy's fixture ``cache``: ``test_litellm_embedding``, ``test_callable_embedding``,
  ``test_callable_numpy_embedding_persists_to_disk``,
  ``test_call_caching_false_overrides_instance_true``,
  ``test_call_caching_true_overrides_instance_false``,
  ``test_acall_caching_false_overrides_instance_true``,
  ``test_acall_caching_true_overrides_instance_false``.
"""

from unittest.mock import patch

import numpy as np
import pytest
from dspy.clients.embedding import Embedder

from tests.conformance.harness import (
    DSPY_TEST_WARNINGS,
    AsyncRunner,
    Runner,
    arun_dspy_test,
    dspy_test_cases,
    run_dspy_test,
)


# Mock response format similar to litellm's embedding response.
class MockEmbeddingResponse:
    def __init__(self, embeddings):
        self.data = [{"embedding": emb} for emb in embeddings]
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        self.model = "mock_model"
        self.object = "list"


def dspy_test_invalid_model_type():
    # Test that invalid model type raises ValueError
    with pytest.raises(ValueError):
        embedding = Embedder(123)  # Invalid model type
        embedding(["test"])


async def dspy_test_async_embedding():
    model = "text-embedding-ada-002"
    inputs = ["hello", "world"]
    mock_embeddings = [
        [0.1, 0.2, 0.3],  # embedding for "hello"
        [0.4, 0.5, 0.6],  # embedding for "world"
    ]

    with patch("litellm.aembedding") as mock_litellm:
        # Configure mock to return proper response format.
        mock_litellm.return_value = MockEmbeddingResponse(mock_embeddings)

        # Create embedding instance and call it.
        embedding = Embedder(model, caching=False)
        result = await embedding.acall(inputs)

        # Verify litellm was called with correct parameters.
        mock_litellm.assert_called_once_with(model=model, input=inputs, caching=False)

        assert len(result) == len(inputs)
        np.testing.assert_allclose(result, mock_embeddings)


pytestmark = DSPY_TEST_WARNINGS

# -- the cases: DSPy's test functions as programs, in-process and through a session --


SYNC_TESTS = [dspy_test_invalid_model_type]


@pytest.mark.parametrize(("dspy_test", "kwargs"), dspy_test_cases(SYNC_TESTS))
def test_embedding_tests_of_dspy(run: Runner, dspy_test, kwargs, tmp_path) -> None:
    assert run.check(run_dspy_test, dspy_test, tmp_path, **kwargs) is None  # its asserts held where it ran


ASYNC_TESTS = [dspy_test_async_embedding]


@pytest.mark.parametrize(("dspy_test", "kwargs"), dspy_test_cases(ASYNC_TESTS))
def test_async_embedding_tests_of_dspy(arun: AsyncRunner, dspy_test, kwargs, tmp_path) -> None:
    async def main(arun: AsyncRunner) -> None:
        return await arun(arun_dspy_test, dspy_test, tmp_path, **kwargs)

    assert arun.check(main) is None  # its asserts held where it ran
