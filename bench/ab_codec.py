"""``python -m bench.ab_codec --base DIR [--rounds N]``: A/B of the codec on plain data, no sockets.

``DIR`` holds the baseline source tree (``git archive <commit> | tar -x -C DIR``). One process per
tree encodes and decodes, in blocks that alternate between the trees, the plain data that is
every message's common case (None/bool/int/float/str/bytes/list/dict): a request body under the
client policy, a small dict result and a 200-row list of dicts under the worker policy (with a
``to_ref``). Per block: CPU per encode+decode (``time.process_time``); prints medians and the
medians of the neighbouring-block ratios new/base.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

ROW = {"id": 7, "text": "The capital of France is Paris.", "tokens": [101, 2003, 3007, 102], "score": 0.875,
       "ok": True, "meta": {"source": None, "blob": b"\x00\x01\x02"}}


def _payloads() -> dict[str, tuple[Any, str]]:
    return {
        "body": (["builtins", "len", [[1, 2, 3], "question", 2.5, None], {"flag": True, "n": 3}], "all"),
        "small": ({"answer": "Paris", "reasoning": "It is the capital.", "score": 0.9, "ok": True, "n": None}, "data"),
        "rows": ([dict(ROW, id=i) for i in range(200)], "data"),
    }


def _drive() -> None:
    from dspex import codec
    from dspex.ref import Ref

    def to_ref(obj: object) -> Ref:
        raise AssertionError(f"plain data made a ref: {obj!r}")

    work = {}
    for name, (value, policy) in _payloads().items():
        pol = codec.Policy.ALL if policy == "all" else codec.Policy.DATA
        ref = to_ref if policy == "data" else None
        assert codec.decode(codec.encode(value, ref, policy=pol)) == value
        work[name] = (value, pol, ref)
    print(json.dumps({"ready": True}), flush=True)
    encode, decode = codec.encode, codec.decode
    for line in sys.stdin:
        cmd = json.loads(line)
        value, pol, ref = work[cmd["op"]]
        n = cmd["n"]
        c0 = time.process_time()
        for _ in range(n):
            decode(encode(value, ref, policy=pol))
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

    p = argparse.ArgumentParser(prog="python -m bench.ab_codec")
    p.add_argument("--base", required=True)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--n", type=int, default=20000, help="encode+decode per block of the small payloads (rows: /100)")
    a = p.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        procs = {"new": _start(here), "base": _start(os.path.abspath(a.base))}
        sizes = {"body": a.n, "small": a.n, "rows": max(1, a.n // 100)}
        for proc in procs.values():
            for op, n in sizes.items():
                _ask(proc, {"op": op, "n": n // 2})
        res: dict[str, dict[str, list[float]]] = {op: {k: [] for k in procs} for op in sizes}
        for r in range(a.rounds):
            for op, n in sizes.items():
                for name in iter_rotated(list(procs), r):
                    res[op][name].append(_ask(procs[name], {"op": op, "n": n}))
            print(f"round {r + 1}/{a.rounds}: " + "; ".join(
                f"{op} " + ", ".join(f"{k} {v[-1] * 1e6:.2f}µs" for k, v in x.items()) for op, x in res.items()),
                file=sys.stderr, flush=True)
        out = {"rounds": a.rounds, "cpu_us_per_roundtrip": {op: {k: median(v) * 1e6 for k, v in x.items()}
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
