"""Deterministic profile of the client and worker side of a sequential no-op call:
``python -m bench.profile_worker [--calls N]``.

A broker subprocess, a worker subprocess run under ``python -m cProfile`` (its main thread runs
the calls at capacity 1), and ``Session.call("builtins", "len", [[]])`` in a loop here under
cProfile. Prints both sides' functions by own time per call. The worker's I/O thread is not
seen by cProfile; ``python -m bench --only noop --profile DIR`` samples it with py-spy.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import signal
import sys
import time

from bench.common import PY, Stack, Workspace, wait_for


def _table(stats: pstats.Stats, calls: int, top: int, sort: str = "tottime") -> str:
    out = []
    key = 2 if sort == "tottime" else 3
    for func, (cc, nc, tt, ct, callers) in sorted(stats.stats.items(), key=lambda kv: -kv[1][key])[:top]:  # type: ignore[attr-defined]
        fn = f"{func[0].split('/site-packages/')[-1].split('/work/main/')[-1].split('/work/wt/predict/')[-1].split('lib/python3.11/')[-1]}:{func[1]}({func[2]})"
        out.append(f"  {tt / calls * 1e6:7.2f} µs own  {ct / calls * 1e6:7.2f} µs cum  {nc / calls:5.2f}/call  {fn}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_worker")
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--dspy", action="store_true", help="worker preloads dspy (per-session dspy.context)")
    p.add_argument("--save", metavar="DIR", help="keep client.prof and worker.prof (pstats files) in DIR")
    a = p.parse_args(argv)
    with Workspace("dxw") as ws:
        st = Stack(ws, "s")
        st.start_broker("p:strict_queue")
        out = ws.path("worker.prof")
        worker = ws.procs.spawn(
            [PY, "-m", "cProfile", "-o", out, "-m", "worker", "--pool", "p", "--backend", st.backend,
             "--log-level", "WARNING", *([] if a.dspy else ["--no-dspy"])], "worker.log", st.env)
        client = st.client()
        try:
            st.wait_workers("p", 1, 30, client=client)
            s = client.session("p")
            for _ in range(200):
                s.call("builtins", "len", [[]])
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            for _ in range(a.calls):
                s.call("builtins", "len", [[]])
            prof.disable()
            wall = time.perf_counter() - t0
        finally:
            client.close()
        os.kill(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
        wait_for(lambda: os.path.exists(out), 10, 0.05, "the worker's profile")
        print(f"{a.calls} sequential calls, {wall / a.calls * 1e6:.0f} µs per call under cProfile\n")
        print(f"client ({a.calls} calls):")
        print(_table(pstats.Stats(prof, stream=io.StringIO()), a.calls, a.top))
        wstats = pstats.Stats(out, stream=io.StringIO())
        if a.save:
            import shutil

            os.makedirs(a.save, exist_ok=True)
            shutil.copy(out, os.path.join(a.save, "worker.prof"))
            prof.dump_stats(os.path.join(a.save, "client.prof"))
        total = a.calls + 201  # + warm-up and the pinning call
        print(f"\nworker main thread ({total} calls; poll = waiting for the next request):")
        print(_table(wstats, total, a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
