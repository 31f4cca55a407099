"""Deterministic profile of both sides of a Predict ref call: ``python -m bench.profile_predict``.

Like :mod:`bench.profile_worker` but the call is ``prog(question=...)`` on a
``dspy.Predict("question -> answer")`` (``--cot``: ChainOfThought) put in a session whose LM is a
DummyLM; the worker (with dspy) profiles its main thread during exactly the measured calls
(started and stopped by two ``exec`` calls of the session). Prints both sides by own (or
cumulative) time per call, and the in-process call's profile for comparison.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

from bench.common import Stack, Workspace
from bench.predict import _CONFIGURE, ANSWERS, QUESTION, dummy_lm, programs
from bench.profile_worker import _table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_predict")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--cot", action="store_true")
    p.add_argument("--sort", default="tottime", choices=("tottime", "cumtime"))
    a = p.parse_args(argv)
    import dspy

    kind = "cot" if a.cot else "predict"
    prog = programs()[kind]
    with Workspace("dxp") as ws:
        st = Stack(ws, "s")
        st.start_broker("p:strict_queue")
        out = ws.path("worker.prof")
        st.start_worker("p")
        client = st.client(timeout=60)
        try:
            st.wait_workers("p", 1, 90, client=client)
            s = client.session("p")
            s.exec(_CONFIGURE.format(question=QUESTION, answers=ANSWERS[kind]))
            ref = s.put(prog)
            for _ in range(200):
                ref(question=QUESTION)
            # the worker's profiler runs on its main thread (capacity 1: calls run there) for exactly
            # the measured calls: started and stopped by two calls of the session
            s.exec("import cProfile as _cp; _wprof = _cp.Profile(); _wprof.enable()")
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            for _ in range(a.calls):
                ref(question=QUESTION)
            prof.disable()
            wall = time.perf_counter() - t0
            s.exec(f"_wprof.disable(); _wprof.dump_stats({out!r})")
            lm = dummy_lm(kind)
            local = cProfile.Profile()
            with dspy.context(lm=lm):
                for _ in range(200):
                    prog(question=QUESTION)
                t0 = time.perf_counter()
                local.enable()
                for _ in range(a.calls):
                    prog(question=QUESTION)
                local.disable()
            lwall = time.perf_counter() - t0
        finally:
            client.close()
        print(f"{a.calls} sequential {kind} calls: session {wall / a.calls * 1e6:.0f} µs, in-process "
              f"{lwall / a.calls * 1e6:.0f} µs per call under cProfile\n")
        print("client:")
        print(_table(pstats.Stats(prof, stream=io.StringIO()), a.calls, a.top, a.sort))
        print("\nworker main thread:")
        print(_table(pstats.Stats(out, stream=io.StringIO()), a.calls, a.top, a.sort))
        print("\nin-process:")
        print(_table(pstats.Stats(local, stream=io.StringIO()), a.calls, a.top, a.sort))
    return 0


if __name__ == "__main__":
    sys.exit(main())
