"""DSPy's own tests/signatures/test_adapter_file.py (stanfordnlp/dspy), unchanged but for the names
(``test_*`` → ``dspy_test_*``, so that pytest does not collect them here as well): each test function
is the program, run in-process and through a session (``run.check``: its asserts hold on either side,
it returns None); pytest's ``tmp_path``, and a ``monkeypatch`` made where the program runs, are passed
to the tests that take them (``harness.run_dspy_test``).

Not here:
- takes DSPy's fixture ``sample_text_file``: ``test_file_from_local_path``,
  ``test_file_from_path_method``, ``test_file_from_path_with_custom_filename``,
  ``test_encode_file_to_dict_rejects_path``, ``test_file_in_signature``,
  ``test_file_list_in_signature``, ``test_save_load_file_signature``,
  ``test_file_custom_mime_type``.
"""


import dspy
import pydantic
import pytest
from dspy.adapters.types.file import encode_file_to_dict
from dspy.utils.dummies import DummyLM

from tests.conformance.harness import DSPY_TEST_WARNINGS, Runner, dspy_test_cases, run_dspy_test


def count_messages_with_file_pattern(messages):
    pattern = {"type": "file", "file": lambda x: isinstance(x, dict)}

    def check_pattern(obj, pattern):
        if isinstance(pattern, dict):
            if not isinstance(obj, dict):
                return False
            return all(k in obj and check_pattern(obj[k], v) for k, v in pattern.items())
        if callable(pattern):
            return pattern(obj)
        return obj == pattern

    def count_patterns(obj, pattern):
        count = 0
        if check_pattern(obj, pattern):
            count += 1
        if isinstance(obj, dict):
            count += sum(count_patterns(v, pattern) for v in obj.values())
        if isinstance(obj, list | tuple):
            count += sum(count_patterns(v, pattern) for v in obj)
        return count

    return count_patterns(messages, pattern)


def setup_predictor(signature, expected_output):
    lm = DummyLM([expected_output])
    dspy.settings.configure(lm=lm)
    return dspy.Predict(signature), lm


def dspy_test_file_from_bytes():
    file_bytes = b"Test file content"
    file_obj = dspy.File.from_bytes(file_bytes)
    assert file_obj.file_data is not None
    assert file_obj.file_data.startswith("data:application/octet-stream;base64,")
    assert file_obj.filename is None


def dspy_test_file_from_bytes_with_filename():
    file_bytes = b"Test file content"
    file_obj = dspy.File.from_bytes(file_bytes, filename="test.txt")
    assert file_obj.file_data is not None
    assert file_obj.file_data.startswith("data:application/octet-stream;base64,")
    assert file_obj.filename == "test.txt"


def dspy_test_file_from_file_id():
    file_obj = dspy.File.from_file_id("file-abc123")
    assert file_obj.file_id == "file-abc123"
    assert file_obj.file_data is None


def dspy_test_file_from_file_id_with_filename():
    file_obj = dspy.File.from_file_id("file-abc123", filename="document.pdf")
    assert file_obj.file_id == "file-abc123"
    assert file_obj.filename == "document.pdf"


def dspy_test_file_from_dict_with_file_data():
    file_obj = dspy.File(file_data="data:text/plain;base64,dGVzdA==", filename="test.txt")
    assert file_obj.file_data == "data:text/plain;base64,dGVzdA=="
    assert file_obj.filename == "test.txt"


def dspy_test_file_from_dict_with_file_id():
    file_obj = dspy.File(file_id="file-xyz789")
    assert file_obj.file_id == "file-xyz789"


def dspy_test_file_format_with_file_data():
    file_obj = dspy.File.from_bytes(b"test", filename="test.txt")
    formatted = file_obj.format()
    assert isinstance(formatted, list)
    assert len(formatted) == 1
    assert formatted[0]["type"] == "file"
    assert "file" in formatted[0]
    assert "file_data" in formatted[0]["file"]
    assert "filename" in formatted[0]["file"]


def dspy_test_file_format_with_file_id():
    file_obj = dspy.File.from_file_id("file-123")
    formatted = file_obj.format()
    assert formatted[0]["type"] == "file"
    assert formatted[0]["file"]["file_id"] == "file-123"


def dspy_test_file_repr_with_file_data():
    file_obj = dspy.File.from_bytes(b"Test content", filename="test.txt")
    repr_str = repr(file_obj)
    assert "DATA_URI" in repr_str
    assert "application/octet-stream" in repr_str
    assert "filename='test.txt'" in repr_str


def dspy_test_file_repr_with_file_id():
    file_obj = dspy.File.from_file_id("file-abc", filename="doc.pdf")
    repr_str = repr(file_obj)
    assert "file_id='file-abc'" in repr_str
    assert "filename='doc.pdf'" in repr_str


def dspy_test_file_str():
    file_obj = dspy.File.from_bytes(b"test")
    str_repr = str(file_obj)
    assert "<<CUSTOM-TYPE-START-IDENTIFIER>>" in str_repr
    assert "<<CUSTOM-TYPE-END-IDENTIFIER>>" in str_repr


def dspy_test_encode_file_to_dict_from_bytes():
    result = encode_file_to_dict(b"test content")
    assert "file_data" in result
    assert result["file_data"].startswith("data:application/octet-stream;base64,")


def dspy_test_file_constructor_from_bytes():
    file_obj = dspy.File(b"test content", filename="test.txt")
    assert file_obj.file_data.startswith("data:application/octet-stream;base64,")
    assert file_obj.filename == "test.txt"


def dspy_test_file_constructor_from_data_uri():
    data_uri = "data:text/plain;base64,aGVsbG8="
    file_obj = dspy.File(data_uri)
    assert file_obj.file_data == data_uri


def dspy_test_file_constructor_rejects_conflicting_keyword():
    with pytest.raises(TypeError, match="file_data"):
        dspy.File(b"test content", file_data="data:text/plain;base64,aGVsbG8=")


def dspy_test_invalid_file_string():
    with pytest.raises(ValueError, match=r"File\.from_path"):
        encode_file_to_dict("https://this_is_not_a_file_path")


def dspy_test_invalid_dict():
    with pytest.raises(ValueError, match="must contain at least one"):
        dspy.File(invalid="dict")


def dspy_test_optional_file_field():
    class OptionalFileSignature(dspy.Signature):
        document: dspy.File | None = dspy.InputField()
        output: str = dspy.OutputField()

    predictor, lm = setup_predictor(OptionalFileSignature, {"output": "Hello"})
    result = predictor(document=None)
    assert result.output == "Hello"
    assert count_messages_with_file_pattern(lm.history[-1]["messages"]) == 0


def dspy_test_file_frozen():
    file_obj = dspy.File.from_bytes(b"test")
    with pytest.raises((TypeError, ValueError, pydantic.ValidationError)):
        file_obj.file_data = "new_data"


def dspy_test_file_with_all_fields():
    file_data_uri = "data:text/plain;base64,dGVzdA=="
    file_obj = dspy.File(file_data=file_data_uri, file_id="file-123", filename="test.txt")
    assert file_obj.file_data == file_data_uri
    assert file_obj.file_id == "file-123"
    assert file_obj.filename == "test.txt"

    formatted = file_obj.format()
    assert formatted[0]["file"]["file_data"] == file_data_uri
    assert formatted[0]["file"]["file_id"] == "file-123"
    assert formatted[0]["file"]["filename"] == "test.txt"


def dspy_test_file_path_not_found():
    with pytest.raises(ValueError, match="File not found"):
        dspy.File.from_path("/nonexistent/path/file.txt")


def dspy_test_file_from_bytes_custom_mime():
    file_obj = dspy.File.from_bytes(b"audio data", mime_type="audio/mp3")
    assert file_obj.file_data.startswith("data:audio/mp3;base64,")


def dspy_test_file_data_uri_in_format():
    file_obj = dspy.File.from_bytes(b"test", filename="test.txt", mime_type="text/plain")
    formatted = file_obj.format()
    assert "data:text/plain;base64," in formatted[0]["file"]["file_data"]


pytestmark = DSPY_TEST_WARNINGS

# -- the cases: DSPy's test functions as programs, in-process and through a session --


SYNC_TESTS = [dspy_test_file_from_bytes, dspy_test_file_from_bytes_with_filename, dspy_test_file_from_file_id,
    dspy_test_file_from_file_id_with_filename, dspy_test_file_from_dict_with_file_data,
    dspy_test_file_from_dict_with_file_id, dspy_test_file_format_with_file_data, dspy_test_file_format_with_file_id,
    dspy_test_file_repr_with_file_data, dspy_test_file_repr_with_file_id, dspy_test_file_str,
    dspy_test_encode_file_to_dict_from_bytes, dspy_test_file_constructor_from_bytes,
    dspy_test_file_constructor_from_data_uri, dspy_test_file_constructor_rejects_conflicting_keyword,
    dspy_test_invalid_file_string, dspy_test_invalid_dict, dspy_test_optional_file_field, dspy_test_file_frozen,
    dspy_test_file_with_all_fields, dspy_test_file_path_not_found, dspy_test_file_from_bytes_custom_mime,
    dspy_test_file_data_uri_in_format]


@pytest.mark.parametrize(("dspy_test", "kwargs"), dspy_test_cases(SYNC_TESTS))
def test_adapter_file_tests_of_dspy(run: Runner, dspy_test, kwargs, tmp_path) -> None:
    assert run.check(run_dspy_test, dspy_test, tmp_path, **kwargs) is None  # its asserts held where it ran
