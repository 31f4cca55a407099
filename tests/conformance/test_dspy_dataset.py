"""DSPy's own tests/datasets/test_dataset.py (stanfordnlp/dspy), unchanged but for the names
(``test_*`` → ``dspy_test_*``, so that pytest does not collect them here as well): each test
function is the program, run in-process and through a session (``run.check``: its asserts hold on
either side, it returns None).

Not here, because they ``pytest.mark.extra``: DSPy skips them without its extras:
``test_input_keys``.
"""

import uuid

import pytest
from dspy import Example
from dspy.datasets.dataset import Dataset

from tests.conformance.harness import Runner, dspy_test_id

dummy_data = """content,question,answer
"This is content 1","What is this?","This is answer 1"
"This is content 2","What is that?","This is answer 2"
"""


class CSVDataset(Dataset):
    def __init__(self, file_path, input_keys=None, **kwargs) -> None:
        import pandas as pd
        super().__init__(input_keys=input_keys, **kwargs)
        df = pd.read_csv(file_path)
        data = df.to_dict(orient="records")
        self._train = [
            Example(**record, dspy_uuid=str(uuid.uuid4()), dspy_split="train").with_inputs(*input_keys)
            for record in data[:1]
        ]
        self._dev = [
            Example(**record, dspy_uuid=str(uuid.uuid4()), dspy_split="dev").with_inputs(*input_keys)
            for record in data[1:2]
        ]


def dspy_test_reset_seeds_accepts_zero():
    dataset = Dataset(train_seed=5, train_size=10, eval_seed=5, dev_size=10, test_size=10)
    dataset.reset_seeds(train_seed=0, train_size=0, eval_seed=0, dev_size=0, test_size=0)

    assert dataset.train_seed == 0
    assert dataset.train_size == 0
    assert dataset.dev_seed == 0
    assert dataset.dev_size == 0
    assert dataset.test_seed == 0
    assert dataset.test_size == 0


def dspy_test_reset_seeds_keeps_existing_values_when_omitted():
    dataset = Dataset(train_seed=5, train_size=10, eval_seed=7, dev_size=20, test_size=30)
    dataset.reset_seeds(train_seed=1)

    assert dataset.train_seed == 1
    # Unspecified values should be left untouched.
    assert dataset.train_size == 10
    assert dataset.dev_seed == 7
    assert dataset.dev_size == 20
    assert dataset.test_seed == 7
    assert dataset.test_size == 30


# -- the cases: DSPy's test functions as programs, in-process and through a session --

SYNC_TESTS = [dspy_test_reset_seeds_accepts_zero, dspy_test_reset_seeds_keeps_existing_values_when_omitted]


@pytest.mark.parametrize("dspy_test", SYNC_TESTS, ids=dspy_test_id)
def test_dataset_tests_of_dspy(run: Runner, dspy_test) -> None:
    assert run.check(dspy_test) is None  # its asserts held where it ran
