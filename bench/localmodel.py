"""Group ``localmodel``: the same DSPy requests to a local model, plain vs through the stack.

A local model server uses every core, so anything else that wakes up preempts it. The requests are
``dspy.ChainOfThought("question -> answer")`` through ``dspy.LM`` (cache off), one at a time, to
``bench.lmserver --burn-ms``: a stand-in that computes each request with the same fixed CPU work on
as many threads as the machine has cores, one request at a time, and reports the seconds it spent
computing (so "server time" is measured, not guessed). Three systems alternate block by block,
the order rotating each round:

* **plain**: the program in this process, no dspex process running;
* **alongside**: the same, with the shipped stack (``supervisor.conf``: broker + 6 workers) up
  and idle;
* **dspex**: through the stack: ``prog = s.put(program)`` on a ``triage_pool`` worker, then
  ``prog(question=...)`` (the worker makes the LM request).

Per block: wall time per request (what the user waits), the server's compute time per request,
and the stack's CPU and wake-ups per second. Ratios are medians over rounds of neighbouring blocks.
A real server instead of the stand-in: ``BENCH_LM_BASE=http://127.0.0.1:8000/v1
BENCH_LM_MODEL=openai/NAME python -m bench --only localmodel`` (wall time only: its compute time
is not known here).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from typing import Any

from bench.common import (
    Config,
    Row,
    Workspace,
    iter_rotated,
    median,
    verdict,
)
from bench.idle import counters, rates, settle
from bench.serving import MODEL, QUESTION, configure_lm, start_lm_server
from bench.shipped import ShippedStack

GOAL = 1.02  # dspex wall ÷ plain wall
SYSTEMS = ("plain", "alongside", "dspex")


def _compute_s(base: str) -> float | None:
    try:
        with urllib.request.urlopen(base.rsplit("/v1", 1)[0] + "/stats", timeout=10) as r:
            return float(json.load(r)["compute_s"])
    except (OSError, KeyError, ValueError):
        return None


class _Through:
    """The stack, its session and the program's ref (while the stack is up)."""

    def __init__(self, ws: Workspace, base: str, model: str) -> None:
        self.ws, self.base, self.model = ws, base, model
        self.stack: ShippedStack | None = None
        self.client: Any = None
        self.prog: Any = None

    def up(self, settle_limit: float) -> dict[str, int]:
        if self.client is None:
            import dspy

            import dspex

            self.stack = self.stack or ShippedStack(self.ws)
            self.stack.start()
            self.client = dspex.connect(self.stack.endpoint, timeout=120)
            s = self.client.session("triage_pool")
            s.run(configure_lm, self.base, self.model)  # the same LM as the plain side
            self.prog = s.put(dspy.ChainOfThought("question -> answer"))
            self.prog(question=QUESTION)  # the worker's first LM request (imports, connection)
            settle(self.stack.pids, settle_limit)  # the start-up's CPU is over before a block counts
        assert self.stack is not None
        return dict(self.stack.pids)

    def down(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.stack is not None:
            self.stack.stop()  # the same private copy starts again for the next block that needs it
        self.client = self.prog = None


def localmodel(cfg: Config) -> list[Row]:
    import dspy

    external = os.environ.get("BENCH_LM_BASE", "")
    model = os.environ.get("BENCH_LM_MODEL", MODEL)
    burn_ms, per_block, settle_limit = (20.0, 2, 1.0) if cfg.smoke else (200.0, 12, 30.0)
    rounds = cfg.n_rounds(5, 1)
    ws = Workspace("dxl")
    through = _Through(ws, "", model)
    try:
        base = external or start_lm_server(ws, "--burn-ms", str(burn_ms), "--burn-threads", str(os.cpu_count() or 2))
        through.base = base
        lm = dspy.LM(model, api_base=base, api_key="x", cache=False)
        program = dspy.ChainOfThought("question -> answer")

        def plain() -> Any:
            with dspy.context(lm=lm):
                return program(question=QUESTION)

        plain()  # imports, the connection
        res: dict[str, list[dict[str, Any]]] = {k: [] for k in SYSTEMS}
        for r in range(rounds):
            for name in iter_rotated(list(SYSTEMS), r):
                if name == "plain":
                    through.down()
                pids = {} if name == "plain" else through.up(settle_limit)
                call = through.prog.__call__ if name == "dspex" else None
                before = {k: counters(p) for k, p in pids.items()}
                c0 = _compute_s(base)
                t0 = time.perf_counter()
                for _ in range(per_block):
                    pred = call(question=QUESTION) if call is not None else plain()
                    if not external and pred.answer != "42":
                        raise AssertionError(f"{name}: unexpected answer {pred!r}")
                wall = time.perf_counter() - t0
                c1 = _compute_s(base)
                stack = {k: rates(before[k], counters(p), wall) for k, p in pids.items()}
                res[name].append({"wall": wall / per_block,
                                  "compute": (c1 - c0) / per_block if c0 is not None and c1 is not None else None,
                                  "stack_cpu": sum(x["cpu"] for x in stack.values()),
                                  "stack_wakeups": sum(x["wakeups"] for x in stack.values())})
            cfg.log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {v[-1]['wall'] * 1e3:.0f} ms" + (f" (server {v[-1]['compute'] * 1e3:.0f})" if v[-1]["compute"] else "")
                for k, v in res.items()))
    finally:
        through.down()
        ws.close()

    def ratio(a: str, b: str, f: str) -> float | None:
        xs = [x[f] / y[f] for x, y in zip(res[a], res[b]) if x[f] and y[f]]
        return median(xs) if xs else None

    med = {k: {f: (median([x[f] for x in v if x[f] is not None]) if any(x[f] is not None for x in v) else None)
               for f in ("wall", "compute", "stack_cpu", "stack_wakeups")} for k, v in res.items()}
    wall_ratio = ratio("dspex", "plain", "wall")
    data: dict[str, Any] = {"burn_ms": None if external else burn_ms, "server": external or "bench.lmserver", "model": model,
            "requests_per_block": per_block, "rounds": rounds, "medians": med, "raw": res}

    def ms(v: float | None) -> str:
        return f"{v * 1e3:.0f} ms" if v is not None else "n/a"

    def x(v: float | None) -> str:
        return f"{v:.3f}×" if v is not None else "n/a"

    rt: dict[str, float | None] = {f"{a}_vs_plain_{f}": ratio(a, "plain", f) for a in ("alongside", "dspex")
                                   for f in ("wall", "compute")}
    data["ratios"] = rt
    stack_cpu = med["dspex"]["stack_cpu"] or 0.0
    stack_wakeups = med["dspex"]["stack_wakeups"] or 0.0
    return [Row("localmodel", f"the same ChainOfThought requests to a local model "
                f"({'stand-in: ' + str(int(burn_ms)) + ' ms of CPU work on every core' if not external else external}), "
                "through the stack vs plain",
                f"{ms(med['dspex']['wall'])}/request (server {ms(med['dspex']['compute'])}); stack "
                f"{stack_cpu * 100:.1f}% of a core, {stack_wakeups:.0f} wake-ups/s",
                f"plain {ms(med['plain']['wall'])} (server {ms(med['plain']['compute'])}); idle stack alongside "
                f"{ms(med['alongside']['wall'])} (server {ms(med['alongside']['compute'])})",
                f"wall {x(wall_ratio)}, server {x(rt['dspex_vs_plain_compute'])}; alongside: wall "
                f"{x(rt['alongside_vs_plain_wall'])}, server {x(rt['alongside_vs_plain_compute'])}",
                f"≤ {GOAL}× wall", "" if cfg.smoke or wall_ratio is None else verdict(wall_ratio <= GOAL), data=data)]
