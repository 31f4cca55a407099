"""``python -m bench.perf_broker [--seconds S]``: where the broker's CPU goes, native frames included.

``perf record`` (cpu-clock sampling, all threads) of this tree's broker process under the
pipelined load of ``bench.ab_tree`` (a ``strict_queue`` pool of 2 capacity-1 ``--no-dspy``
workers, 100 sessions), then ``perf report`` by thread and shared object and by symbol: the
Python interpreter, pyzmq, libzmq and the kernel (context switches, syscalls) of the main thread
and of zmq's I/O thread, which cProfile does not see. Needs ``perf`` and permission to sample the
broker (``kernel.perf_event_paranoid`` <= 1 for kernel frames). The percentages times the
printed broker CPU per call give µs per call.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time

from bench.common import Stack, Workspace
from bench.figures import _loadgen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.perf_broker")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    perf_bin = shutil.which("perf")
    if perf_bin is None:
        print("perf is not installed", file=sys.stderr)
        return 2
    out_dir = tempfile.mkdtemp(prefix="dxperf")
    data = f"{out_dir}/perf.data"
    ws = Workspace()
    try:
        st = Stack(ws, "n")
        broker = st.start_broker("p:strict_queue")
        workers = [st.start_worker("p", "--no-dspy") for _ in range(2)]
        c = st.client()
        st.wait_workers("p", 2, client=c)
        c.close()
        perf = subprocess.Popen([perf_bin, "record", "-F", "4000", "-e", "cpu-clock", "-g", "-o", data, "-p",
                                 str(broker.pid), "--", "sleep", str(a.seconds + 0.5)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        time.sleep(0.3)  # perf attached (its own startup is not broker time)
        res = _loadgen(ws, "loadgen", st.frontend, a.seconds, 0.2, [broker.pid, *(w.pid for w in workers)])
        perf.wait(timeout=60)
        print(f"{res['rate']:.0f} calls/s; broker {res['cpu'][str(broker.pid)] / res['calls'] * 1e6:.1f} µs CPU "
              f"per call (all threads), {res['errors']} errors")
        for sort in ("comm,dso", "comm,sym"):
            rep = subprocess.run([perf_bin, "report", "-i", data, "--no-children", "--sort", sort, "--stdio", "-g",
                                  "none"], capture_output=True, text=True, timeout=120)
            lines = [ln for ln in rep.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
            print(f"\nby {sort}:")
            print("\n".join(lines[:a.top]))
        return 0
    finally:
        ws.close()
        shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
