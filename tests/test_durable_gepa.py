"""A GEPA compile in a durable session, its ``log_dir`` a ``dspex.SessionDir``: run in steps (each
call compiles on to a bigger ``max_metric_calls``), the step that a kill -9 of the worker
interrupts is run again after the move and resumes from GEPA's own state (``gepa_state.bin``) as
of the last acknowledged step. Real processes; the LM is the examples' offline engine (sent by
value, as the flagship does), the metric the flagship's, counted in the session.
"""

from __future__ import annotations

import os
import shutil
import threading
from typing import Any

import pytest
from offline_lm import offline_lm

import dspex
from tests.harness import Stack, wait_for
from tests.test_durable import gone, pid_of

pytest.importorskip("dspy")
pytestmark = pytest.mark.timeout(240)

TICKETS = [  # (ticket, category, urgency): the flagship's five
    ("Checkout fails with a 500 error for EU users after last deploy.", "outage", "high"),
    ("Refund still not received after 10 business days.", "billing", "medium"),
    ("Requesting a bulk export feature for analytics dashboards.", "feature", "low"),
    ("Admin login locked after SSO update; multiple users blocked.", "account", "high"),
    ("CSV export shows incorrect timezone offsets in reports.", "bug", "medium"),
]
SETUP = """
import os, tempfile, time
import dspy, dspex

calls = [0]  # metric calls: session state, so they count what acknowledged calls did
block_after = [0]

def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    calls[0] += 1
    if block_after[0] and calls[0] >= block_after[0] and os.path.exists(block):
        open(block + ".hit", "w").close()  # the test kills this worker now
        time.sleep(120)
    notes, score = [], 0.0
    for name in ("category", "urgency"):
        want, got = str(gold[name]).lower(), str(getattr(pred, name, "") or "").strip().lower()
        if want == got:
            score += 0.5
        else:
            notes.append(f"{name.capitalize()} mismatch: expected '{want}' got '{got}'.")
    return dspy.Prediction(score=score, feedback=" ".join(notes) or "Perfect match.")

train = [dspy.Example(ticket=t, category=c, urgency=u).with_inputs("ticket") for t, c, u in tickets]
program = dspy.Predict("ticket -> category, urgency")
logs = dspex.SessionDir("gepa")

def compile_to(budget, log_dir=None):
    before = calls[0]
    optimizer = dspy.GEPA(metric=metric, reflection_lm=lm, max_metric_calls=budget, reflection_minibatch_size=1,
                          log_dir=log_dir or logs.path)
    optimizer.compile(program, trainset=train, valset=train)
    return calls[0] - before

def compile_fresh(budget):
    with tempfile.TemporaryDirectory() as scratch:
        return compile_to(budget, scratch)
"""


def step(s: dspex.Session, budget: int, fresh: bool = False) -> int:
    """Metric calls of one compile step (``fresh``: in a new directory, from scratch)."""
    return int(s.eval("compile_fresh(b)" if fresh else "compile_to(b)", {"b": budget}, timeout=120))


def test_a_gepa_step_interrupted_by_a_kill_resumes_from_the_last_acknowledged_step(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 2)
    s = dx.session("p", durable=True)
    lm = s.run(offline_lm, cache=False)
    s.call("dspy", "configure", kwargs={"lm": lm})
    block = os.path.join(stack.root, "block")
    s.exec(SETUP, {"lm": lm, "tickets": TICKETS, "block": block})
    first, second = step(s, 50), step(s, 100)
    assert first >= 50 and 0 < second <= 70, (first, second)
    assert s.eval("sorted(os.listdir(logs.path))")[-2:] == ["gepa_state.bin", "run_log.json"]

    # the third step: its worker is killed halfway (the metric waits at its 25th call)
    s.exec("block_after[0] = calls[0] + 25")
    pid, old_dir = pid_of(s), str(s.eval("logs.path"))
    open(block, "w").close()
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(_try(step, s, 150)), daemon=True)
    runner.start()
    wait_for(lambda: os.path.exists(block + ".hit"), 90, 0.05, "the third step halfway")
    stack.kill(pid)
    runner.join(60)
    assert outcome and isinstance(outcome[0], dspex.WorkerCrashed), outcome
    os.unlink(block)
    shutil.rmtree(old_dir)  # as if the dead worker's disk were on another host: only the checkpoint has it
    gone(dx, "p", pid)

    resumed = step(s, 150)  # on the other worker, from GEPA's state as of the second step
    assert pid_of(s) != pid and s.eval("logs.path") != old_dir
    assert s.eval("calls[0]") == first + second + resumed  # the interrupted step: none of it
    scratch = step(s, 150, fresh=True)  # the same step from scratch, for comparison
    print(f"GEPA step to 150 metric calls after the kill: {resumed} calls resumed, {scratch} from scratch")
    assert resumed <= 70 and scratch >= 150 and resumed < scratch / 2, (resumed, scratch)
    # the worker removes it when the object goes (the session's module is a reference cycle: when
    # the garbage collector gets to it); the stack's teardown kills the worker first
    shutil.rmtree(str(s.eval("logs.path")))


def _try(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except dspex.DspexError as err:
        return err
