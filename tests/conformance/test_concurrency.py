"""The module cases at the same time in four sessions of one capacity-4 worker (pool ``c4``).

Each program configures its own LM with ``dspy.configure`` and runs while the others run in other
threads of the same process: each must still give exactly its in-process result.
"""

import time

import dspex
from tests.conformance import test_modules as cases
from tests.conformance import test_optimizers as optimizer_cases
from tests.conformance.harness import as_data, fresh_dspy_settings

PROGRAMS = [
    (cases.predict_program, ()),
    (cases.chain_of_thought_program, ()),
    (cases.react_pydantic_program, ()),
    (cases.custom_module_program, ()),
    (cases.parallel_program, ()),
    (cases.acall_program, ()),
    (cases.best_of_n_program, ()),
    (optimizer_cases.evaluate_program, (optimizer_cases.exact_match,)),
]


def test_module_cases_concurrently_on_one_capacity4_worker(dx: dspex.Client) -> None:
    expected = []
    for program, args in PROGRAMS:
        with fresh_dspy_settings():
            expected.append(as_data(program(*args)))
    sessions = [dx.session("c4") for _ in range(4)]
    try:
        def run_all(s: dspex.Session, offset: int) -> list:
            order = PROGRAMS[offset:] + PROGRAMS[:offset]  # different programs overlap in time
            return [(program.__name__, as_data(s.run(program, *args))) for program, args in order * 2]

        started = time.monotonic()
        futures = [dx.submit(run_all, s, 2 * i) for i, s in enumerate(sessions)]
        results = [f.result(timeout=90) for f in futures]
        assert len({s.worker for s in sessions}) == 1
        by_name = {program.__name__: e for (program, _), e in zip(PROGRAMS, expected)}
        for got in results:
            assert len(got) == 2 * len(PROGRAMS)
            for name, g in got:
                assert g == by_name[name], name
        assert time.monotonic() - started < 60
    finally:
        for s in sessions:
            s.close(timeout=10)
