"""DSPy optimizers and evaluations run as production jobs through sessions, DSPy's real ``dspy.LM``
against the loopback server (tests/lmserver.py): the same job in-process and through a session
(plain or durable, capacity-1 or capacity-4 workers) gives the same results: BootstrapFewShot and
its random search, ``dspy.Evaluate(num_threads=4)``, ``program.batch``, ``dspy.Parallel``,
``dspy.streamify``, ``dspy.asyncify``, one ticket's answers garbage (AdapterParseError, counted as
failed), another's first request a 429. (MIPROv2 needs optuna, which this environment lacks.)

The durable job compiles in one call and evaluates in the next; between its steps the session's
worker is recycled by ``max_requests``, SIGKILLed, or the broker is SIGKILLed and restarted, and the
compiled program is saved and loaded through the session: its demos and instructions, the
session's LM with its history and its usage tracking are as in-process after every move.
A call that a slow LM keeps running while its worker is asked to recycle finishes there first.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dspex
from tests.conformance.harness import as_data, fresh_dspy_settings
from tests.harness import Stack, wait_for
from tests.lmserver import LMServer, normal_answer
from tests.test_durable import gone

dspy = pytest.importorskip("dspy")

pytestmark = pytest.mark.timeout(90)

TICKETS = [  # (ticket, category, urgency)
    ("Checkout fails with a 500 error for EU users after last deploy.", "outage", "high"),
    ("Refund still not received after 10 business days.", "billing", "medium"),
    ("Requesting a bulk export feature for analytics dashboards.", "feature", "low"),
    ("Admin login locked after SSO update; multiple users blocked.", "account", "high"),
    ("CSV export shows incorrect timezone offsets in reports.", "bug", "medium"),
    ("Invoice PDF shows the wrong VAT number.", "billing", "low"),
]


def examples() -> list[Any]:
    return [dspy.Example(ticket=t, category=c, urgency=u).with_inputs("ticket") for t, c, u in TICKETS]


def metric(gold: Any, pred: Any, trace: Any = None) -> float:
    return (str(pred.category).lower() == gold.category) + (str(pred.urgency).lower() == gold.urgency) / 2


def configure(base: str) -> None:
    """The job's LM, configured where the job runs (in a session: the session's own LM)."""
    dspy.configure(lm=dspy.LM("openai/loopback", api_base=base, api_key="not-a-key", cache=False, num_retries=3),
                   track_usage=True)


def compile_bootstrap(trainset: list[Any]) -> Any:
    optimizer = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=2, max_labeled_demos=1)
    return optimizer.compile(dspy.Predict("ticket -> category, urgency"), trainset=trainset)


def compile_random_search(trainset: list[Any]) -> Any:
    optimizer = dspy.BootstrapFewShotWithRandomSearch(metric=metric, max_bootstrapped_demos=1, max_labeled_demos=1,
                                                      num_candidate_programs=2, num_threads=1)
    return optimizer.compile(dspy.Predict("ticket -> category, urgency"), trainset=trainset)


def evaluate(program: Any, devset: list[Any]) -> Any:
    result = dspy.Evaluate(devset=devset, metric=metric, num_threads=4, display_progress=False)(program)
    return result.score, [(ex.ticket, pred.get("category"), pred.get("urgency"), score)
                          for ex, pred, score in result.results]


def batch_and_parallel(program: Any, devset: list[Any]) -> Any:
    batched = program.batch(devset, num_threads=4, max_errors=2)
    parallel = dspy.Parallel(num_threads=4, max_errors=2)([(program, ex) for ex in devset])
    return [p and (p.category, p.urgency) for p in batched], [p and (p.category, p.urgency) for p in parallel]


def program_state(program: Any) -> dict[str, Any]:
    lm = dspy.settings.lm
    last = program(ticket="Refund still not received after 10 business days.")
    return {"demos": [dict(d.items()) for d in program.demos],
            "instructions": program.signature.instructions,
            "lm": (lm.model, lm.kwargs.get("api_base") is not None, len(lm.history)),
            "last_messages": lm.history[-1]["messages"],  # the last entry: entries of threads come in any order
            "usage": last.get_lm_usage(), "track_usage": dspy.settings.track_usage}


def save(program: Any, path: str) -> None:
    program.save(path)


def load(path: str) -> Any:
    program = dspy.Predict("ticket -> category, urgency")
    program.load(path)
    return program


@pytest.fixture(scope="module")
def lmserver() -> Iterator[LMServer]:
    # one ticket's answers are garbage (DSPy raises AdapterParseError: the evaluation counts it
    # failed); another's first request after each set() is a 429 (the LM retries)
    with LMServer(rules=(("slowly", "slow"), ("CSV export", "unparsable"), ("Admin login", "rate_limit")),
                  delay=21.0) as server:
        yield server


@pytest.fixture(scope="module")
def expected(lmserver: LMServer) -> list[Any]:
    """The job in-process (the LM server answers alike whoever asks)."""
    return in_process(lmserver.base)


def job(run: Callable[..., Any], base: str, between: Callable[[], None], path: str) -> list[Any]:
    """Compile, then evaluate, batch, save, load: ``between`` runs between the steps."""
    run(configure, base)
    train = examples()
    program = run(compile_bootstrap, train[:4])
    out: list[Any] = [run(program_state, program)]
    between()
    out.append(run(evaluate, program, train))
    out.append(run(program_state, program))
    between()
    out.append(run(batch_and_parallel, program, train))
    run(save, program, path)
    between()
    loaded = run(load, path)
    out.append(run(program_state, loaded))
    out.append(run(evaluate, loaded, train))
    return out


def in_process(base: str, fn: Callable[..., Any] = job) -> list[Any]:
    with fresh_dspy_settings(), tempfile.TemporaryDirectory() as tmp:
        return fn(lambda f, *a, **kw: f(*a, **kw), base, lambda: None, os.path.join(tmp, "prog.json"))


def more(run: Callable[..., Any], base: str, between: Callable[[], None], path: str) -> list[Any]:
    """Random search, then the compiled program streamed and asyncified."""
    run(configure, base)
    program = run(compile_random_search, examples()[:4])
    return [run(program_state, program), run(streamed, program), run(asyncified, program)]


def streamed(program: Any) -> Any:
    async def collect() -> list[Any]:
        return [c async for c in dspy.streamify(program)(ticket=TICKETS[0][0])]
    chunks = asyncio.run(collect())
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])  # the LM's raw chunks
    return text, type(chunks[-1]).__name__, chunks[-1].category, chunks[-1].urgency


def asyncified(program: Any) -> Any:
    async def main() -> Any:
        pred = await dspy.asyncify(program)(ticket=TICKETS[2][0])
        return pred.category, pred.urgency
    return asyncio.run(main())


def mover(stack: Stack, dx: dspex.Client, s: dspex.Session, moves: list[str], capacity: str) -> Callable[[], None]:
    """What runs between the job's steps, the next of ``moves``: the session's worker recycled by
    ``max_requests`` (the broker recycles no worker younger than 2 s: calls until it did),
    SIGKILLed, or the broker SIGKILLed and restarted; a replacement worker keeps two in the pool
    (supervisord's part)."""
    def between() -> None:
        how = moves.pop(0)
        pid = int(s.run(os.getpid))
        if how == "max_requests":
            wait_for(lambda: int(s.run(os.getpid)) != pid, timeout=20, what="the recycle by max_requests")
        elif how == "kill":
            stack.kill(pid)
        else:
            assert stack.broker is not None
            stack.kill(stack.broker)
            stack.start_broker()
        if how != "broker":
            gone(dx, "p", pid)
            stack.start_worker("p", "--capacity", capacity)
            assert int(s.run(os.getpid)) != pid
        stack.wait_workers("p", 2)
    return between


@pytest.mark.parametrize(("moves", "capacity"), [(["max_requests"] * 3, "1"), (["kill", "broker", "kill"], "4")])
def test_a_durable_optimizer_job_survives_moves_between_its_steps(stack: Stack, lmserver: LMServer, expected: list[Any],
                                                                   moves: list[str], capacity: str) -> None:
    dx = stack.pool("p:strict_queue:max_requests=4" if "max_requests" in moves else "p:strict_queue", 2,
                    "--capacity", capacity)
    s = dx.session("p", durable=True)
    lmserver.set()
    refused = len(lmserver.completions("rate_limit"))
    got = job(s.run, lmserver.base, mover(stack, dx, s, moves, capacity), os.path.join(stack.root, "prog.json"))
    assert not moves  # each happened
    assert lmserver.completions("rate_limit")[refused].status == 429
    assert as_data(got) == as_data(expected)
    s.close()


def slow_question(program: Any) -> Any:
    return program(ticket="Please answer slowly: refund still not received.").category


def test_a_slow_call_finishes_on_its_worker_before_the_recycle_moves_the_session(stack: Stack,
                                                                                 lmserver: LMServer,
                                                                                 expected: list[Any]) -> None:
    """While the slow call holds its worker (capacity 1, draining), plain sessions run the jobs on
    the pool's other worker (capacity 1) and on a capacity-4 pool, as in-process."""
    more_expected = in_process(lmserver.base, more)
    stack.start_broker("p:strict_queue", "q:strict_queue")
    for pool, capacity in (("p", 1), ("p", 1), ("q", 4)):
        stack.start_worker(pool, "--capacity", str(capacity))
    stack.wait_workers("p", 2)
    stack.wait_workers("q", 1)
    dx = stack.client()
    s = dx.session("p", durable=True)
    s.run(configure, lmserver.base)
    program = s.run(compile_bootstrap, examples()[:4])
    before = s.run(program_state, program)
    pid = int(s.run(os.getpid))
    worker = next(w for w in dx.status()["pools"]["p"]["workers"] if w["pid"] == pid)
    slow: list[Any] = []
    runner = threading.Thread(target=lambda: slow.append(s.apply(slow_question, [program], timeout=60)))
    runner.start()
    wait_for(lambda: lmserver.completions("slow"), what="the slow request at the server")
    dx.recycle("p", worker=worker["incarnation"])

    plain: list[list[Any]] = []
    for pool, fn in (("p", job), ("q", job), ("q", more)):
        with dx.session(pool) as other:
            assert int(other.run(os.getpid)) != pid  # not the draining worker
            plain.append(fn(other.run, lmserver.base, lambda: None, os.path.join(stack.root, f"{pool}.json")))
    assert as_data(plain) == as_data([expected, expected, more_expected])

    runner.join(40)
    request = lmserver.completions("slow")[0]
    assert (request.status, request.hung_up) == (200, False)
    answer = normal_answer(request.body["messages"], "loopback")  # what the slow LM answered
    assert slow == [answer.split("[[ ## category ## ]]")[1].split("[[")[0].strip()]
    after = s.run(program_state, program)
    assert int(s.run(os.getpid)) != pid
    assert after["demos"] == before["demos"] and after["lm"][2] == before["lm"][2] + 2
