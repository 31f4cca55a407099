"""Per-call overhead of a Predict with DummyLM: in-process vs through a session.

    python tests/conformance/bench_overhead.py --compare --main-root /tmp/dxcf-main [--calls 300]
    python tests/conformance/bench_overhead.py --mode after  [--calls 300]
    python tests/conformance/bench_overhead.py --mode before --code-root /tmp/dxcf-main

``--compare`` runs a "before" and an "after" client (each with its own broker and worker) side by
side and alternates batches of 10 calls between them, so a loaded machine slows both alike.

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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def compare(calls: int, main_root: str) -> None:
    """Alternate batches between a before and an after client process; print both medians."""
    here = Path(__file__).resolve()
    procs = {
        mode: subprocess.Popen([sys.executable, str(here), "--mode", mode, "--serve", *(
            ["--code-root", main_root] if mode == "before" else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        for mode in ("before", "after")
    }
    try:
        for proc in procs.values():
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        timings: dict[str, dict[str, list[float]]] = {m: {"in": [], "s": []} for m in procs}
        for _ in range(calls // 10):
            for mode, proc in procs.items():
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write("10\n")
                proc.stdin.flush()
                batch = json.loads(proc.stdout.readline())
                timings[mode]["in"] += batch["in"]
                timings[mode]["s"] += batch["s"]
        for mode, t in timings.items():
            med_in, med_s = statistics.median(t["in"]) * 1e6, statistics.median(t["s"]) * 1e6
            print(json.dumps({"mode": mode, "calls": len(t["s"]), "inprocess_us": round(med_in, 1),
                              "session_us": round(med_s, 1), "overhead_us": round(med_s - med_in, 1),
                              "ratio": round(med_s / med_in, 2)}))
    finally:
        for proc in procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["before", "after"])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--code-root", default=str(Path(__file__).resolve().parents[2]))
    p.add_argument("--serve", action="store_true", help="run batches asked on stdin (used by --compare)")
    p.add_argument("--compare", action="store_true")
    p.add_argument("--main-root", default="/tmp/dxcf-main")
    a = p.parse_args()
    if a.compare:
        compare(a.calls, a.main_root)
        return
    if a.mode is None:
        p.error("--mode or --compare")
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
        if a.serve:
            print("ready", flush=True)
            for line in sys.stdin:
                batch: dict[str, list[float]] = {"in": [], "s": []}
                for _ in range(int(line)):
                    for fn, key in ((inproc, "in"), (remote, "s")):
                        t0 = time.perf_counter()
                        fn()
                        batch[key].append(time.perf_counter() - t0)
                print(json.dumps(batch), flush=True)
            return
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
