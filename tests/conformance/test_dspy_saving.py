"""DSPy's own tests/utils/test_saving.py (stanfordnlp/dspy), unchanged but for the names (``test_*`` →
``dspy_test_*``, so that pytest does not collect them here as well): each test function is the
program, run in-process and through a session (``run.check``: its asserts hold on either side, it
returns None).

Not here, because they ``pytest.mark.extra``: DSPy skips them without its extras:
``test_save_compiled_model``.
"""

import logging
from unittest.mock import patch

import dspy
import pytest

from tests.conformance.harness import Runner, dspy_test_id


def dspy_test_save_predict(tmp_path):
    predict = dspy.Predict("question->answer")
    predict.save(tmp_path, save_program=True)

    assert (tmp_path / "metadata.json").exists()
    assert (tmp_path / "program.pkl").exists()

    loaded_predict = dspy.load(tmp_path, allow_pickle=True)
    assert isinstance(loaded_predict, dspy.Predict)

    assert predict.signature == loaded_predict.signature


def dspy_test_save_custom_model(tmp_path):
    class CustomModel(dspy.Module):
        def __init__(self):
            self.cot1 = dspy.ChainOfThought("question->refined_question")
            self.cot2 = dspy.ChainOfThought("refined_question->answer")

    model = CustomModel()
    model.save(tmp_path, save_program=True)

    loaded_model = dspy.load(tmp_path, allow_pickle=True)
    assert isinstance(loaded_model, CustomModel)

    assert len(model.predictors()) == len(loaded_model.predictors())
    for predictor, loaded_predictor in zip(model.predictors(), loaded_model.predictors(), strict=False):
        assert predictor.signature == loaded_predictor.signature


def dspy_test_save_model_with_custom_signature(tmp_path):
    import datetime

    class MySignature(dspy.Signature):
        """Just a custom signature."""

        current_date: datetime.date = dspy.InputField()
        target_date: datetime.date = dspy.InputField()
        date_diff: int = dspy.OutputField(desc="The difference in days between the current_date and the target_date")

    predict = dspy.Predict(MySignature)
    predict.signature = predict.signature.with_instructions("You are a helpful assistant.")
    predict.save(tmp_path, save_program=True)

    loaded_predict = dspy.load(tmp_path, allow_pickle=True)
    assert isinstance(loaded_predict, dspy.Predict)

    assert predict.signature == loaded_predict.signature


def dspy_test_load_with_version_mismatch(tmp_path):
    from dspy.utils.saving import logger

    # Mock versions during save
    save_versions = {"python": "3.9", "dspy": "2.4.0", "cloudpickle": "2.0"}

    # Mock versions during load
    load_versions = {"python": "3.10", "dspy": "2.5.0", "cloudpickle": "2.1"}

    predict = dspy.Predict("question->answer")

    # Create a custom handler to capture log messages
    class ListHandler(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    # Add handler and set level
    handler = ListHandler()
    original_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)

    try:
        # Mock version during save
        with patch("dspy.primitives.base_module.get_dependency_versions", return_value=save_versions):
            predict.save(tmp_path, save_program=True)

        # Mock version during load
        with patch("dspy.utils.saving.get_dependency_versions", return_value=load_versions):
            loaded_predict = dspy.load(tmp_path, allow_pickle=True)

        # Assert warnings were logged, and one warning for each mismatched dependency.
        assert len(handler.messages) == 3

        for msg in handler.messages:
            assert "There is a mismatch of" in msg

        # Verify the model still loads correctly despite version mismatches
        assert isinstance(loaded_predict, dspy.Predict)
        assert predict.signature == loaded_predict.signature

    finally:
        # Clean up: restore original level and remove handler
        logger.setLevel(original_level)
        logger.removeHandler(handler)


def dspy_test_pickle_loading_requires_explicit_permission(tmp_path):
    """Test that loading pickle files requires explicit permission."""
    predict = dspy.Predict("question->answer")
    predict.save(tmp_path, save_program=True)

    # Should fail without dangerously_allow_pickle
    with pytest.raises(ValueError, match="Loading with pickle is not allowed"):
        dspy.load(tmp_path)

    # Should succeed with dangerously_allow_pickle
    loaded_predict = dspy.load(tmp_path, allow_pickle=True)
    assert isinstance(loaded_predict, dspy.Predict)


def dspy_test_pkl_file_loading_requires_explicit_permission(tmp_path):
    """Test that loading .pkl files requires explicit permission."""
    predict = dspy.Predict("question->answer")
    pkl_path = tmp_path / "model.pkl"
    predict.save(pkl_path)

    # Should fail without allow_pickle
    new_predict = dspy.Predict("question->answer")
    with pytest.raises(ValueError, match="Loading .pkl files can run arbitrary code"):
        new_predict.load(pkl_path)

    # Should succeed with allow_pickle
    new_predict.load(pkl_path, allow_pickle=True)
    assert new_predict.dump_state() == predict.dump_state()


def dspy_test_json_file_loading_works_without_permission(tmp_path):
    """Test that loading .json files works without explicit permission."""
    predict = dspy.Predict("question->answer")
    json_path = tmp_path / "model.json"
    predict.save(json_path)

    # Should succeed without allow_pickle
    new_predict = dspy.Predict("question->answer")
    new_predict.load(json_path)
    assert new_predict.dump_state() == predict.dump_state()


# -- the cases: DSPy's test functions as programs, in-process and through a session --



TMP_PATH_TESTS = [
    dspy_test_save_predict, dspy_test_save_custom_model, dspy_test_save_model_with_custom_signature,
    dspy_test_load_with_version_mismatch, dspy_test_pickle_loading_requires_explicit_permission,
    dspy_test_pkl_file_loading_requires_explicit_permission,
    dspy_test_json_file_loading_works_without_permission,
]


@pytest.mark.parametrize("dspy_test", TMP_PATH_TESTS, ids=dspy_test_id)
def test_saving_tests_of_dspy_with_a_tmp_path(run: Runner, dspy_test, tmp_path) -> None:
    assert run.check(dspy_test, tmp_path) is None  # its asserts held where it ran
