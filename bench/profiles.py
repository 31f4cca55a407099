"""Where a call's time goes: ``python -m bench.profiles call|perf|spy ...``.

* ``call [--predict | --cot] [--calls N]``: cProfile of both sides of sequential calls through a
  session: the client here, and the worker's main thread (capacity 1: calls run there) for exactly
  the measured calls (switched on and off by SIGUSR2 between calls, plus the one ``eval`` that
  sees it switched on). The call is a
  no-op (``builtins.len``, a ``--no-dspy`` worker) or a ``dspy.Predict`` / ``ChainOfThought`` ref
  answered by a DummyLM (then the same program in-process is profiled too). Own time per call.
* ``perf [--seconds S]``: ``perf record`` (cpu-clock, all threads, native frames) of the broker
  under the pipelined load of ``bench.servers loadgen`` (2 capacity-1 ``--no-dspy`` workers, 100
  sessions): the interpreter, pyzmq, libzmq and the kernel of its main thread and of zmq's I/O
  thread, which cProfile does not see. Needs ``perf`` (and ``kernel.perf_event_paranoid`` <= 1
  for kernel frames); the shares times the printed CPU per call are µs per call.
* ``spy FILE...``: the py-spy raw profiles ``python -m bench --only noop,throughput --profile DIR``
  records, summarised by self and inclusive function.

The broker's routing core alone: ``python -m bench.ab --what core --profile``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import Stack, Workspace, pool_stack, wait_for


def _where(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/bench/../"):
        path = path.split(marker)[-1]
    return path


def _table(stats: pstats.Stats, calls: int, top: int, sort: str = "tottime") -> str:
    key = 2 if sort == "tottime" else 3
    rows: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    return "\n".join(f"  {tt / calls * 1e6:7.2f} µs own  {ct / calls * 1e6:7.2f} µs cum  {nc / calls:5.2f}/call  "
                     f"{_where(func[0])}:{func[1]}({func[2]})"
                     for func, (_, nc, tt, ct, _) in sorted(rows.items(), key=lambda kv: -kv[1][key])[:top])


_WORKER_PROFILER = """
import cProfile
import signal

_wprof, _wprof_on = cProfile.Profile(), [False]


def _switch(*_):
    (_wprof.disable if _wprof_on[0] else _wprof.enable)()
    _wprof_on[0] = not _wprof_on[0]


signal.signal(signal.SIGUSR2, _switch)
"""


def call(a: argparse.Namespace) -> int:
    kind = "cot" if a.cot else "predict" if a.predict else "noop"
    with pool_stack("s", *([] if kind != "noop" else ["--no-dspy"])) as (ws, _, client):
        out = ws.path("worker.prof")
        s = client.session("p")
        # the profiler's own session; the worker puts back a profile function that a call sets
        # (worker/executor.py, _Interpreter), so a signal switches it, between calls, on the
        # worker's main thread (where a capacity-1 worker runs its calls)
        profiled = client.session("p")
        profiled.exec(_WORKER_PROFILER)
        worker_pid = int(profiled.call("os", "getpid"))

        def switch(on: bool) -> None:
            os.kill(worker_pid, signal.SIGUSR2)
            wait_for(lambda: profiled.eval("_wprof_on[0]") is on, what="the worker's profiler switched")
        if kind == "noop":
            def one() -> Any:
                return s.call("builtins", "len", [[]])
            local: Any = None
        else:
            import dspy

            from bench.ab_drivers import ANSWERS, CONFIGURE, QUESTION
            from bench.predict import dummy_lm, programs

            prog = programs()[kind]
            s.exec(CONFIGURE.format(question=QUESTION, answers=ANSWERS[kind]))
            ref = s.put(prog)

            def one() -> Any:
                return ref(question=QUESTION)

            def local() -> Any:
                with dspy.context(lm=dummy_lm(kind)):
                    return prog(question=QUESTION)
        for _ in range(200):
            one()
        switch(True)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(a.calls):
            one()
        prof.disable()
        wall = time.perf_counter() - t0
        switch(False)
        profiled.exec(f"_wprof.dump_stats({out!r})")
        print(f"{a.calls} sequential {kind} calls through a session: {wall / a.calls * 1e6:.0f} µs per call "
              "under cProfile\n\nclient:")
        print(_table(pstats.Stats(prof, stream=io.StringIO()), a.calls, a.top, a.sort))
        print("\nworker main thread:")
        print(_table(pstats.Stats(out, stream=io.StringIO()), a.calls, a.top, a.sort))
    if local is not None:
        for _ in range(200):
            local()
        lp = cProfile.Profile()
        t0 = time.perf_counter()
        lp.enable()
        for _ in range(a.calls):
            local()
        lp.disable()
        print(f"\nin-process ({(time.perf_counter() - t0) / a.calls * 1e6:.0f} µs per call under cProfile):")
        print(_table(pstats.Stats(lp, stream=io.StringIO()), a.calls, a.top, a.sort))
    return 0


def perf(a: argparse.Namespace) -> int:
    from bench.hop import loadgen

    perf_bin = shutil.which("perf")
    if perf_bin is None:
        print("perf is not installed", file=sys.stderr)
        return 2
    out_dir = tempfile.mkdtemp(prefix="dxperf")
    data = f"{out_dir}/perf.data"
    try:
        with Workspace() as ws:
            st = Stack(ws, "n")
            broker = st.start_broker("p:strict_queue")
            workers = [st.start_worker("p", "--no-dspy") for _ in range(2)]
            st.wait_workers("p", 2)
            rec = subprocess.Popen([perf_bin, "record", "-F", "4000", "-e", "cpu-clock", "-g", "-o", data, "-p",
                                    str(broker.pid), "--", "sleep", str(a.seconds + 0.5)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            time.sleep(0.3)  # perf attached: its own start-up is not broker time
            res = loadgen(ws, "loadgen", st.frontend, a.seconds, 0.2, [broker.pid, *(w.pid for w in workers)])
            rec.wait(timeout=60)
        print(f"{res['rate']:.0f} calls/s; broker {res['cpu'][str(broker.pid)] / res['calls'] * 1e6:.1f} µs CPU "
              f"per call (all threads), {res['errors']} errors")
        for sort in ("comm,dso", "comm,sym"):
            rep = subprocess.run([perf_bin, "report", "-i", data, "--no-children", "--sort", sort, "--stdio", "-g",
                                  "none"], capture_output=True, text=True, timeout=120, check=False)
            lines = [ln for ln in rep.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
            print(f"\nby {sort}:\n" + "\n".join(lines[:a.top]))
        return 0
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")


def spy(a: argparse.Namespace) -> int:
    for path in a.files:
        own: Counter[str] = Counter()
        incl: Counter[str] = Counter()
        total = 0
        for raw in Path(path).read_text().splitlines():
            m = _LINE.match(raw)
            if not m:
                continue
            frames = [f for f in m[1].split(";") if f and not f.startswith("thread (")]  # py-spy --threads
            folded = [f"{x['fn']} ({_where(x['file'])})" if (x := _FRAME.match(f.strip())) else f.strip()
                      for f in frames]
            if folded:
                total += int(m[2])
                own[folded[-1]] += int(m[2])
                for f in set(folded):
                    incl[f] += int(m[2])
        print(f"== {path}: {total} samples")
        for title, counts in (("self", own), ("incl", incl)):
            print(f"  {title}%   function")
            for f, n in counts.most_common(a.top):
                print(f"  {100 * n / max(1, total):5.1f}   {f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profiles", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("call")
    kind = c.add_mutually_exclusive_group()
    kind.add_argument("--predict", action="store_true")
    kind.add_argument("--cot", action="store_true")
    c.add_argument("--calls", type=int, default=2000)
    c.add_argument("--sort", default="tottime", choices=("tottime", "cumtime"))
    f = sub.add_parser("perf")
    f.add_argument("--seconds", type=float, default=4.0)
    s = sub.add_parser("spy")
    s.add_argument("files", nargs="+")
    for x in (c, f, s):
        x.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    return {"call": call, "perf": perf, "spy": spy}[a.mode](a)


if __name__ == "__main__":
    sys.exit(main())
