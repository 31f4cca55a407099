"""``python -m bench.ab_executor --base DIR [--rounds N]``: A/B of the worker's executor, no sockets.

``DIR`` holds the baseline source tree (``git archive <commit> | tar -x -C DIR``). One process per
tree (that tree's ``worker.executor`` with dspy enabled, capacity 1, as a worker runs it) executes
requests in blocks that alternate between the trees: a no-op ``call`` (``builtins.len``) and the
``method __call__`` of a ``dspy.Predict`` ref answered by a DummyLM, each under a deadline like a
real request. Per block: CPU per execute (``time.process_time``); prints medians and the medians
of the neighbouring-block ratios new/base. CPU, not wall time: on a shared machine it is what a
change of a few µs can be resolved with.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

QUESTION = "What is the capital of France?"


def _drive() -> None:
    import dspy

    from dspex import codec
    from dspex.protocol import RequestHeader
    from worker.executor import Executor
    from worker.refs import RefTable

    ex = Executor(RefTable("p", "w" * 32), capacity=1)
    ex.install()
    ex.enable_dspy(200)
    sid = "s" * 32
    setup = ("import dspy\nfrom dspy.utils import DummyLM\n"
             f"dspy.configure(lm=DummyLM({{{QUESTION!r}: {{'answer': 'Paris'}}}}))")
    ex.execute(RequestHeader("exec", 1, "p", sid, "", 60000, 0), codec.encode([setup, None], policy=codec.Policy.ALL))
    ref = ex.execute(RequestHeader("put", 2, "p", sid, "", 60000, 0),
                     codec.encode([dspy.Predict("question -> answer")], policy=codec.Policy.ALL))
    prog = codec.decode(ref)
    bodies = {"noop": (RequestHeader("call", 3, "p", sid, "", 60000, 0),
                       codec.encode(["builtins", "len", [[]], {}], policy=codec.Policy.ALL)),
              "predict": (RequestHeader("method", 4, "p", sid, "", 60000, 0),
                          codec.encode([prog, "__call__", [], {"question": QUESTION}], policy=codec.Policy.ALL))}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        header, body = bodies[cmd["op"]]
        n = cmd["n"]
        c0 = time.process_time()
        for _ in range(n):
            ex.execute(header, body, deadline=time.monotonic() + 60)
        print(json.dumps({"cpu": (time.process_time() - c0) / n}), flush=True)


def _start(tree: str) -> subprocess.Popen[str]:
    from bench.common import PY, base_env

    env = base_env()
    env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([PY, os.path.abspath(__file__), "drive"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, cwd=tree, start_new_session=True)
    assert proc.stdout is not None
    if not json.loads(proc.stdout.readline()).get("ready"):
        raise RuntimeError(f"driver for {tree} did not start")
    return proc


def _ask(proc: subprocess.Popen[str], cmd: dict[str, Any]) -> float:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(cmd) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("driver exited")
    return float(json.loads(line)["cpu"])


def main(argv: list[str] | None = None) -> int:
    from bench.common import iter_rotated, median

    p = argparse.ArgumentParser(prog="python -m bench.ab_executor")
    p.add_argument("--base", required=True)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--n", type=int, default=3000, help="no-op executes per block (predict: a tenth)")
    a = p.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        procs = {"new": _start(here), "base": _start(os.path.abspath(a.base))}
        sizes = {"noop": a.n, "predict": max(1, a.n // 10)}
        for proc in procs.values():
            for op, n in sizes.items():
                _ask(proc, {"op": op, "n": n // 2})
        res: dict[str, dict[str, list[float]]] = {op: {k: [] for k in procs} for op in sizes}
        for r in range(a.rounds):
            for op, n in sizes.items():
                for name in iter_rotated(list(procs), r):
                    res[op][name].append(_ask(procs[name], {"op": op, "n": n}))
            print(f"round {r + 1}/{a.rounds}: " + "; ".join(
                f"{op} " + ", ".join(f"{k} {v[-1] * 1e6:.1f}µs" for k, v in x.items()) for op, x in res.items()),
                file=sys.stderr, flush=True)
        out = {"rounds": a.rounds, "cpu_us_per_execute": {op: {k: median(v) * 1e6 for k, v in x.items()}
                                                          for op, x in res.items()},
               "new_vs_base": {op: median([n / b for n, b in zip(x["new"], x["base"])]) for op, x in res.items()}}
        print(json.dumps(out, indent=1))
        return 0
    finally:
        for proc in procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["drive"]:
        sys.path.pop(0)  # this script's directory (bench/) must not shadow anything
        _drive()
        sys.exit(0)
    sys.exit(main())
