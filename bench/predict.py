"""Group ``predict``: a DSPy program called through a session vs the same program in-process.

``dspy.Predict("question -> answer")`` and ``dspy.ChainOfThought`` of the same signature, each
answered by a ``dspy.utils.DummyLM`` (no network, no cache: the figure is the cost of DSPy plus
what dspex adds). In-process the program runs here under ``dspy.context(lm=...)``; through dspex
it is ``prog = session.put(program)`` on a capacity-1 worker that imports dspy, with the same
DummyLM configured in the session, and ``prog(question=...)``: one round trip that returns the
``dspy.Prediction`` by value (a real ``dspy.Prediction`` here, since this process has dspy).

Blocks of sequential calls alternate (the order rotates each round); a block's figure is its
median latency, and the ratio is the median over rounds of the two neighbouring blocks' ratio.
A no-op call (``builtins.len``) on the same worker is measured in the same rounds: the floor any
call through a session pays (its round trip and the executor's scopes). The Predict is also
called through ``s.run(run_predict, question)``: a function of this module (user code to dspex,
so sent by value, once per session) that calls the program, a global of this module; and so
again under the client's ``dspy.context(lm=...)`` (row ``run_client_lm``): the LM travels once
per session and each call's history entry comes back to it, as in-process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.ab_drivers import ANSWERS, CONFIGURE, QUESTION
from bench.common import (
    Row,
    iter_rotated,
    median,
    pool_stack,
    quantile,
    timed,
    us,
    verdict,
)

TARGET = "≤ 1.5× in-process"
_PROGRAM: Any = None  # what ``run_predict`` calls: a global of the user's module, sent with it


def run_predict(question: str) -> Any:
    """The user's own function that ``s.run`` sends (by value: this module is not installed)."""
    return _PROGRAM(question=question)


def programs() -> dict[str, Any]:
    import dspy

    return {"predict": dspy.Predict("question -> answer"), "cot": dspy.ChainOfThought("question -> answer")}


def dummy_lm(kind: str) -> Any:
    from dspy.utils import DummyLM

    return DummyLM({QUESTION: ANSWERS[kind]})


def _check(pred: Any, kind: str) -> None:
    import dspy

    if type(pred) is not dspy.Prediction or pred.answer != "Paris":
        raise AssertionError(f"{kind}: unexpected result {pred!r}")


def predict(cfg: Any) -> list[Row]:
    global _PROGRAM
    import dspy

    rounds = cfg.n_rounds(15, 2)
    per_block = 20 if cfg.smoke else 150
    with pool_stack("pr") as (_, _, client):
        systems: dict[str, dict[str, Callable[[], Any]]] = {}
        sessions = []
        for kind, prog in programs().items():
            lm = dummy_lm(kind)

            def local(prog: Any = prog, lm: Any = lm) -> Any:
                with dspy.context(lm=lm):
                    return prog(question=QUESTION)

            s = client.session("p")
            sessions.append(s)
            s.exec(CONFIGURE.format(  # the same LM in the session (dspy.configure is per session on a worker)
                question=QUESTION, answers=ANSWERS[kind]))
            ref = s.put(prog)

            def remote(ref: Any = ref) -> Any:
                return ref(question=QUESTION)

            _check(local(), kind)
            _check(remote(), kind)
            systems[kind] = {"inprocess": local, "session": remote}
            if kind == "predict":
                _PROGRAM = prog

                def run(s: Any = s) -> Any:
                    return s.run(run_predict, QUESTION)

                _check(run(), kind)
                systems[kind]["run"] = run
                client_lm = dummy_lm(kind)

                def run_client_lm(s: Any = s, client_lm: Any = client_lm) -> Any:
                    with dspy.context(lm=client_lm):  # the client's LM: travels once, its history comes back
                        return s.run(run_predict, QUESTION)

                _check(run_client_lm(), kind)
                if len(client_lm.history) != 1:
                    raise AssertionError("the client's LM did not record the call made through the session")
                systems[kind]["client_lm"] = run_client_lm
        # the floor: a no-op call on the same worker (its round trip and the executor's scopes)
        floor_session = sessions[0]

        def noop() -> Any:
            return floor_session.call("builtins", "len", [[]])

        systems["noop"] = {"session": noop}
        for pair in systems.values():  # warm up both paths (imports, caches, the connection)
            for fn in pair.values():
                timed(fn, 30 if cfg.smoke else 100)
        lat: dict[str, dict[str, list[list[float]]]] = {k: {side: [] for side in v} for k, v in systems.items()}
        for r in range(rounds):
            for kind in iter_rotated(list(systems), r):
                for side in iter_rotated(list(systems[kind]), r):
                    lat[kind][side].append(timed(systems[kind][side], per_block))
            cfg.log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {side} {quantile(v[side][-1], 0.5) * 1e6:.0f}µs" for k, v in lat.items() for side in v))
        rows = []
        labels = {"predict": 'dspy.Predict("question -> answer"), DummyLM',
                  "cot": 'dspy.ChainOfThought("question -> answer"), DummyLM'}
        floor = median([quantile(b, 0.5) for b in lat.pop("noop")["session"]])
        for kind, res in lat.items():
            p50 = {side: median([quantile(b, 0.5) for b in blocks]) for side, blocks in res.items()}
            for side, name, how in (("session", kind, "via a session (ref call)"),
                                    ("run", "run", "via s.run (the user's function, sent by value)"),
                                    ("client_lm", "run_client_lm", "via s.run with the client's LM, its history back")):
                if side not in res:
                    continue
                ratio = median([quantile(s, 0.5) / quantile(i, 0.5) for s, i in zip(res[side], res["inprocess"])])
                data = {"rounds": rounds, "calls_per_block": per_block,
                        "p50_us": {k: p50[k] * 1e6 for k in ("inprocess", side)},
                        "extra_us": (p50[side] - p50["inprocess"]) * 1e6, "ratio": ratio,
                        "noop_call_p50_us": floor * 1e6,
                        "raw_p50_us": {k: [quantile(b, 0.5) * 1e6 for b in res[k]] for k in ("inprocess", side)}}
                rows.append(Row(f"predict.{name}", f"{labels[kind]} {how} vs in-process",
                                f"{us(p50[side])} (+{us(p50[side] - p50['inprocess'])})",
                                f"in-process {us(p50['inprocess'])}; no-op call {us(floor)}",
                                f"{ratio:.2f}× in-process", TARGET,
                                "" if cfg.smoke else verdict(ratio <= 1.5), data=data))
        for s in sessions:
            s.close(timeout=10)
        return rows


ROWS = ["predict.predict", "predict.run", "predict.run_client_lm", "predict.cot"]
