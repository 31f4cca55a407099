"""DSPy's own tests/adapters/test_document.py (stanfordnlp/dspy), unchanged but for the names
(``test_*`` → ``dspy_test_*``, so that pytest does not collect them here as well): each test
function is the program, run in-process and through a session (``run.check``: its asserts hold on
either side, it returns None).

All its tests.
"""

import pydantic
import pytest
from dspy.experimental import Document

from tests.conformance.harness import Runner, dspy_test_id


def dspy_test_document_validate_input():
    # Create a `Document` instance with valid data.
    doc = Document(data="The Earth orbits the Sun.")
    assert doc.data == "The Earth orbits the Sun."

    with pytest.raises(pydantic.ValidationError):
        # Try to create a `Document` instance with invalid type.
        Document(data=123)


def dspy_test_document_in_nested_type():
    class Wrapper(pydantic.BaseModel):
        document: Document

    doc = Document(data="Hello, world!")
    wrapper = Wrapper(document=doc)
    assert wrapper.document.data == "Hello, world!"


def dspy_test_document_with_all_fields():
    doc = Document(
        data="Water boils at 100°C at standard pressure.",
        title="Physics Facts",
        media_type="application/pdf",
        context="Laboratory conditions"
    )
    assert doc.data == "Water boils at 100°C at standard pressure."
    assert doc.title == "Physics Facts"
    assert doc.media_type == "application/pdf"
    assert doc.context == "Laboratory conditions"


def dspy_test_document_format():
    doc = Document(
        data="The sky is blue.",
        title="Color Facts",
        media_type="text/plain"
    )

    formatted = doc.format()

    assert isinstance(formatted, list)
    assert len(formatted) == 1

    doc_block = formatted[0]
    assert doc_block["type"] == "document"
    assert doc_block["source"]["type"] == "text"
    assert doc_block["source"]["media_type"] == "text/plain"
    assert doc_block["source"]["data"] == "The sky is blue."
    assert doc_block["title"] == "Color Facts"
    assert doc_block["citations"]["enabled"] is True


# -- the cases: DSPy's test functions as programs, in-process and through a session --

SYNC_TESTS = [
    dspy_test_document_validate_input, dspy_test_document_in_nested_type, dspy_test_document_with_all_fields,
    dspy_test_document_format,
]


@pytest.mark.parametrize("dspy_test", SYNC_TESTS, ids=dspy_test_id)
def test_document_tests_of_dspy(run: Runner, dspy_test) -> None:
    assert run.check(dspy_test) is None  # its asserts held where it ran
