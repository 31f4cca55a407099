"""The flagship's GEPA step: run ``dspy.GEPA`` on a worker session, stream its log lines, and say
what happened -- what GEPA and its valset are, the budget in words, reflection outcomes counted
(proposed / accepted / rejected / failed / without a proposal / skipped because every subsample
score was already perfect), GEPA's own failed predictions counted with their cause, budget
overshoot flagged, learned instructions shown whole, advice that matches the cause. Public dspex
client API only; no dspy."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flagship_helpers import one_line, wrapped
from flagship_lm import Failure, failure_from_record, failure_of, kinds_text

import dspex
from dspex.errors import RemoteError, Timeout

ORIGINAL_MAX_METRIC_CALLS = 3  # the original flagship's budget: GEPA only scores the baseline


def budget_text(budget: int, default: int, valset: int = 3) -> str:
    """What GEPA's metric-call budget allows, in words."""
    original = f"--max-metric-calls {ORIGINAL_MAX_METRIC_CALLS}, the original flagship's budget"
    if budget <= valset:
        which = original if budget == ORIGINAL_MAX_METRIC_CALLS else f"budget {budget}"
        return (f"{which}: the baseline evaluation only ({valset} valset examples), no reflection; "
                f"the default {default} lets GEPA reflect")
    which = f"budget {budget} (the default)" if budget == default else f"budget {budget}"
    return (f"{which}: {valset} metric calls score the baseline, the other {budget - valset} go to reflection "
            f"minibatches and to scoring new candidates ({original}, only scores the baseline)")


# GEPA log line -> reflection outcome (gepa 0.x's messages, forwarded by the worker as progress)
GEPA_OUTCOMES = (
    ("All subsample scores perfect", "skipped_perfect"),
    ("Proposed new text", "proposed"),
    ("Found a better program", "accepted"),
    ("is not better than", "rejected"),
    ("rejected by acceptance", "rejected"),
    ("worse than both parents", "rejected"),
    ("reflection failed", "failed"),
    ("Exception during optimization", "failed"),
    ("Exception building reflective dataset", "failed"),
    ("did not propose", "no_proposal"),
    ("returned no text updates", "no_proposal"),
)


def gepa_outcome(message: str) -> str | None:
    first = message.splitlines()[0] if message else ""
    return next((kind for needle, kind in GEPA_OUTCOMES if needle.lower() in first.lower()), None)



def run_gepa(flow: Any, gepa: dspex.Session, program: dspex.Ref, budget: int, *, metric: Callable[..., Any],
             trainset: list[Any], default_budget: int) -> tuple[dict[str, Any], dspex.Ref]:
    """GEPA on the gepa session; (result, optimized program). A compile that fails is recorded and
    the baseline program goes on as the 'optimized' one; GEPA's own failed predictions (it scores
    them 0 and goes on) are recorded as the flow's failures."""
    out, spec = flow.out, flow.spec
    out(f"\n[5] GEPA on the gepa session (max_metric_calls={budget})")
    out("  GEPA (dspy.GEPA) rewrites the program's instructions: a reflection LM reads the metric's feedback "
        "on the answers and proposes new instructions, kept when they score better")
    out(f"  the valset is what every candidate is scored on: here the {len(trainset)} training tickets "
        f"INC-001..INC-00{len(trainset)}")
    out(f"  {budget_text(budget, default_budget, len(trainset))}")
    out(f"  metric: the client's {metric.__name__}() (sent by value), {len(trainset)} examples")
    reflection_lm = flow.make_lm(gepa, 0.9, "reflection")
    optimizer = gepa.call("dspy", "GEPA", [metric], {
        "reflection_lm": reflection_lm, "max_metric_calls": budget,
        "reflection_minibatch_size": 1, "track_stats": True})
    compile_timeout = max(flow.call_timeout, 120.0 + 20.0 * budget,
                          0.0 if spec.offline else flow.call_timeout * (budget + 2))
    outcomes: dict[str, int] = {}
    events: list[str] = []
    shown_failures = 0

    def gepa_progress(event: Any) -> None:
        # GEPA's log lines, streamed from the worker while compile runs (no silent wait)
        nonlocal shown_failures
        message = str(event.get("message", event)) if isinstance(event, dict) else str(event)
        events.append(message)
        first = message.splitlines()[0] if message else ""
        kind = gepa_outcome(message)
        if kind is not None:
            outcomes[kind] = outcomes.get(kind, 0) + 1
        if kind in ("skipped_perfect", "no_proposal"):
            return  # counted, not printed: at larger budgets there are a dozen of them
        if kind == "proposed":
            head, _, text = first.partition(": Proposed new text for ")
            name, _, body = text.partition(": ")
            out(f"  · {head}: proposed a new instruction for {name} ({len(message) - len(first) + len(body)} chars)")
        elif kind == "failed":
            if shown_failures < 3:
                out(f"  ! {one_line(first, 150)}")
            shown_failures += 1
        elif kind in ("accepted", "rejected") or "Base program full valset score" in first:
            out(f"  · {one_line(first, 150)}")

    t0 = time.perf_counter()
    failure: Failure | None = None
    optimized = program
    mark = gepa.eval("dspex_ledger.mark()")
    try:
        (optimized,) = flow.wait_all([("GEPA compile", flow.client.submit(
            gepa.method, optimizer, "compile", [program], {"trainset": trainset, "valset": trainset},
            timeout=compile_timeout, on_progress=gepa_progress))])
    except RemoteError as err:
        failure = failure_of("gepa", "compile", err, spec, session=gepa.id, worker=gepa.worker,
                             seconds=time.perf_counter() - t0)
        flow.failures.append(failure)
        for line in flow.failed_line(failure):
            out(f"  GEPA {line}")
        out("  going on with the unoptimized program")
    except Timeout as err:
        raise flow.too_slow(err, "GEPA", "compile", gepa) from None
    seconds = time.perf_counter() - t0
    ledger = gepa.eval("dspex_ledger.since(m)", {"m": mark})
    inner = [failure_from_record("gepa", f"{rec.get('role') or 'task'} {i}", dict(rec), spec, session=gepa.id,
                                 worker=gepa.worker) for i, rec in enumerate(ledger["failed"], 1)]
    flow.failures.extend(inner)
    flow.note_retries("gepa", "compile", list(ledger["retried"]), gepa)
    predictions = int(ledger["answered"]) + len(inner)
    reflections = int(gepa.eval("len(lm.history)", {"lm": reflection_lm}))
    base_instr = str(gepa.eval("p.signature.instructions", {"p": program}))
    if failure is None:
        report = dict(gepa.eval(
            "{'calls': r.total_metric_calls, 'scores': [float(x) for x in r.val_aggregate_scores], "
            "'best': r.best_idx, 'candidates': len(r.candidates), 'full_evals': r.num_full_val_evals, "
            "'instructions': o.signature.instructions}",
            {"o": optimized, "r": gepa.attr(optimized, "detailed_results")}))
    else:
        report = {"calls": None, "scores": [None], "best": 0, "candidates": 0, "full_evals": 0,
                  "instructions": base_instr}
    calls = report["calls"]
    result = {
        "budget": budget, "metric_calls": calls, "within_budget": calls is not None and calls <= budget,
        "overshoot": max(0, calls - budget) if calls is not None else 0,
        "baseline_score": report["scores"][0], "optimized_score": report["scores"][report["best"]],
        "candidates": report["candidates"], "best_candidate": report["best"], "full_val_evals": report["full_evals"],
        "reflection_calls": reflections, "predictions": predictions,
        "failed_predictions": [f.public() for f in inner],
        "reflection": {k: outcomes.get(k, 0) for k in dict.fromkeys(kind for _, kind in GEPA_OUTCOMES)},
        "seconds": round(seconds, 3), "instructions": report["instructions"],
        "improved": report["instructions"] != base_instr, "progress_events": len(events),
        "failed": failure.public() if failure else None,
    }
    over = f" (OVER budget by {result['overshoot']}: GEPA finishes the evaluation it started)" if result["overshoot"] else ""
    out(f"  metric calls used: {calls if calls is not None else '-'}/{budget}{over}, candidates: "
        f"{result['candidates']}, reflection LM calls: {reflections}, {seconds:.2f}s")
    r = result["reflection"]
    if reflections or any(r.values()):
        # gepa logs "did not propose" after each skip for perfect scores too: count those once
        idle = max(0, r["no_proposal"] - r["skipped_perfect"])
        out(f"  reflection: {r['proposed']} proposed, {r['accepted']} accepted, {r['rejected']} rejected, "
            f"{r['failed']} failed, {idle} without a proposal, "
            f"{r['skipped_perfect']} skipped (all subsample scores perfect)")
    if inner:
        out(f"  ! {len(inner)} of GEPA's {predictions} predictions failed (scored 0, GEPA went on): "
            f"{kinds_text(inner)}")
        for line in flow.failed_line(inner[0])[1:]:
            out(f"  {line}")
    gain = ""
    if result["optimized_score"] is not None and result["baseline_score"] is not None:
        delta = float(result["optimized_score"]) - float(result["baseline_score"])
        gain = f" (improved by {delta:+.3f})" if delta > 0 else ""
    out(f"  valset score: baseline {fmt(result['baseline_score'])} -> optimized {fmt(result['optimized_score'])}{gain}")
    if result["improved"]:
        out("  learned instructions:")
        for ln in wrapped(report["instructions"], "    "):
            out(ln)
    elif failure is not None:
        out("  instructions unchanged (GEPA failed, see above)")
    elif inner:
        out(f"  instructions unchanged: {len(inner)} of GEPA's predictions failed ({kinds_text(inner)}); fix the LM "
            "first (see the hint): a larger budget cannot help")
    elif reflections == 0:
        out(f"  instructions unchanged: the budget allowed no reflection (the default {default_budget} does)"
            if budget <= len(trainset) else
            "  instructions unchanged: GEPA did not reflect within this budget; raise --max-metric-calls")
    else:
        out(f"  instructions unchanged: GEPA reflected ({reflections} LM calls) but no proposal beat the baseline "
            f"({r['proposed']} proposed, {r['rejected']} rejected, {r['failed']} failed)")
    return result, optimized


def fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"



