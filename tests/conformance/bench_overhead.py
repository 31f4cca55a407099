"""Per-call overhead of a Predict with DummyLM: in-process vs through a session.

    python tests/conformance/bench_overhead.py --mode after  [--calls 300]
    python tests/conformance/bench_overhead.py --mode before --code-root /tmp/dxcf-main

``before`` is the explicit path of main's API (``s.method(prog, "__call__")`` returns a ref to the
Prediction, ``s.attr(ref, "answer")`` reads it, ``s.release(ref)`` frees it: 3 round trips);
``after`` is the handle/data path (``prog(question=...)`` returns the Prediction: 1 round trip).
Calls alternate in-process / session so machine load hits both alike; the medians are printed as
JSON. ``--code-root`` runs broker, worker and client from another checkout (e.g. ``git archive
main``) with this venv. Not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["before", "after"], required=True)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--code-root", default=str(Path(__file__).resolve().parents[2]))
    a = p.parse_args()
    root = Path(a.code_root).resolve()
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(root / "tests"))
    spec = importlib.util.spec_from_file_location("bench_conftest", root / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(conftest)

    import dspy
    from dspy.utils.dummies import DummyLM

    import dspex
    assert Path(dspex.__file__).resolve().is_relative_to(root), dspex.__file__

    answers = {"capital": {"answer": "Paris"}}
    dspy.configure(lm=DummyLM(answers))
    local = dspy.Predict("question -> answer")

    tmp = tempfile.mkdtemp(prefix="dxb", dir="/tmp")
    stack = conftest.Stack(tmp)
    try:
        dx = stack.pool("b:strict_queue", 1)
        s = dx.session("b")
        if a.mode == "before":
            lm = s.call("dspy.utils.dummies", "DummyLM", [answers])
            s.call("dspy", "configure", kwargs={"lm": lm})
            prog = s.call("dspy", "Predict", ["question -> answer"])

            def remote() -> str:
                ref = s.method(prog, "__call__", kwargs={"question": "What is the capital of France?"})
                answer = s.attr(ref, "answer")
                s.release(ref)
                return answer
        else:
            s.run(dspy.configure, lm=DummyLM(answers))
            prog = s.put(dspy.Predict("question -> answer"))

            def remote() -> str:
                return prog(question="What is the capital of France?").answer

        def inproc() -> str:
            return local(question="What is the capital of France?").answer

        for _ in range(20):  # warm both paths
            assert inproc() == remote() == "Paris"
        t_in: list[float] = []
        t_s: list[float] = []
        for _ in range(a.calls):
            for fn, out in ((inproc, t_in), (remote, t_s)):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        med_in, med_s = statistics.median(t_in) * 1e6, statistics.median(t_s) * 1e6
        print(json.dumps({"mode": a.mode, "calls": a.calls, "inprocess_us": round(med_in, 1),
                          "session_us": round(med_s, 1), "overhead_us": round(med_s - med_in, 1),
                          "ratio": round(med_s / med_in, 2)}))
    finally:
        stack.close()


if __name__ == "__main__":
    main()
