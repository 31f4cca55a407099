"""The dspex flagship: triage tickets in parallel sessions, optimize with GEPA, survive recycles.

Everything runs on dspex workers through the public client API only; this process never imports
dspy. Pools used (declared in supervisor.conf or on the broker's command line):

* ``triage_pool``    -- two sessions (``triage_1``, ``triage_2``), each with its own LM and Predict,
                        placed least-loaded by the broker, so they land on two different workers;
* ``optimizer_pool`` -- ``insights`` (ChainOfThought, rebuilt by ``dspex.Rehydrator`` after its
                        worker is recycled) and ``gepa`` (GEPA with a metric defined in the worker;
                        its optimized program is snapshotted with ``dump_state()`` and restored on
                        a new session after a recycle);
* ``analytics_pool`` -- numpy statistics computed in the worker.

Run it against a running stack with ``python examples/flagship_multi_pool_gepa.py`` or let
``dspexctl flagship`` start (and stop) the stack. With no ``--model`` / ``DSPEX_MODEL`` it uses the
offline stand-in LM (``examples/offline_lm.py``): deterministic, no key, no network.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import dspex
from dspex.errors import ConfigError, DspexError, SessionWorkerUnavailable, Timeout
from examples.offline_lm import OFFLINE_LABEL, OFFLINE_MODEL, is_offline_model

TRIAGE_POOL = "triage_pool"
OPTIMIZER_POOL = "optimizer_pool"
ANALYTICS_POOL = "analytics_pool"
POOLS = (TRIAGE_POOL, OPTIMIZER_POOL, ANALYTICS_POOL)

TRIAGE_SIGNATURE = "ticket -> category, urgency, action"
INSIGHT_SIGNATURE = "ticket -> summary, root_cause"

# id -> (ticket text, expected category, expected urgency)
TICKETS: dict[str, tuple[str, str, str]] = {
    "INC-001": ("Checkout fails with a 500 error for EU users after last deploy.", "outage", "high"),
    "INC-002": ("Refund still not received after 10 business days.", "billing", "medium"),
    "INC-003": ("Requesting a bulk export feature for analytics dashboards.", "feature", "low"),
    "INC-004": ("Admin login locked after SSO update; multiple users blocked.", "account", "high"),
    "INC-005": ("CSV export shows incorrect timezone offsets in reports.", "bug", "medium"),
}
HOLDOUT: dict[str, tuple[str, str, str]] = {
    "HOLDOUT-01": ("Customer cannot update billing address in the portal.", "billing", "medium"),
}
GEPA_TRAIN = ("INC-001", "INC-002", "INC-003")
DEFAULT_MAX_METRIC_CALLS = 3
HISTORY_ENTRIES = 6

# The GEPA metric, defined inside the worker (it must run where the predictions are).
METRIC_SOURCE = '''
import dspy

def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    """0.5 for the category, 0.5 for the urgency; feedback GEPA's reflection can act on."""
    notes, score = [], 0.0
    for name in ("category", "urgency"):
        want = str(gold[name]).strip().lower()
        got = str(getattr(pred, name, "") or "").strip().lower()
        if want == got:
            score += 0.5
        else:
            notes.append(f"{name.capitalize()} mismatch: expected '{want}' got '{got}'.")
    return dspy.Prediction(score=score, feedback=" ".join(notes) or "Perfect match. Keep the intent and be concise.")
'''

TRAINSET_SOURCE = '''
trainset = [dspy.Example(ticket=text, category=category, urgency=urgency).with_inputs("ticket")
            for text, category, urgency in GEPA_ROWS]
'''

STATS_SOURCE = '''
import numpy as np

def score_stats(scores):
    xs = np.asarray(scores, dtype=np.float64)
    return {"numpy": np.__version__, "n": int(xs.size), "mean": float(np.mean(xs)),
            "std": float(np.std(xs)), "p80": float(np.percentile(xs, 80))}
'''

# Provider -> environment variables that hold its key (any one is enough). Providers not listed
# are checked with litellm.validate_environment when litellm is installed.
PROVIDER_KEYS: dict[str, tuple[str, ...]] = {
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "openai": ("OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "groq": ("GROQ_API_KEY",),
    "mistral": ("MISTRAL_API_KEY",),
    "deepseek": ("DEEPSEEK_API_KEY",),
    "openrouter": ("OPENROUTER_API_KEY",),
    "together_ai": ("TOGETHERAI_API_KEY", "TOGETHER_API_KEY"),
    "fireworks_ai": ("FIREWORKS_AI_API_KEY", "FIREWORKS_API_KEY"),
    "cohere": ("COHERE_API_KEY",),
    "xai": ("XAI_API_KEY",),
    "perplexity": ("PERPLEXITYAI_API_KEY",),
}
KEYLESS_PROVIDERS = frozenset({"ollama", "ollama_chat", "hosted_vllm", "vllm", "lm_studio", "llamafile"})
DUMMY_API_KEY = "dspex-local-no-key"
LM_ENGINES = ("auto", "lm15", "litellm")

Out = Callable[[str], None]


# --------------------------------------------------------------------------- LM settings


@dataclass(frozen=True)
class LMSpec:
    """Which LM the flow uses and the ``dspy.LM`` keyword arguments (minus temperature) for it."""

    model: str
    offline: bool
    label: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def lm_kwargs(self, temperature: float) -> dict[str, Any]:
        return {"temperature": temperature, **self.kwargs}

    def public(self) -> dict[str, Any]:
        """What may be shown: never the key."""
        shown = {k: v for k, v in self.kwargs.items() if not k.startswith("api_key")}
        return {"model": self.model, "offline": self.offline, "label": self.label, "lm_kwargs": shown}


def _provider(model: str) -> str:
    return model.split("/", 1)[0].lower() if "/" in model else ""


def resolve_lm(model: str | None = None, api_base: str | None = None, *, engine: str | None = None,
               env: dict[str, str] | os._Environ[str] | None = None) -> LMSpec:
    """The LM from ``model`` / ``DSPEX_MODEL``; the offline engine when none is given.

    A real model whose provider key is missing raises :class:`dspex.ConfigError` (one line) before
    anything starts. With ``api_base`` (a local OpenAI-compatible server) a dummy key is used when
    none is set. The key found here is passed to ``dspy.LM(api_key=...)`` on the worker, so workers
    started without it in their environment still work (dspy keeps ``api_*`` out of its history).
    """
    env = os.environ if env is None else env
    model = (model or env.get("DSPEX_MODEL") or "").strip()
    engine = (engine or env.get("DSPEX_LM_ENGINE") or "").strip() or None
    if engine is not None and engine not in LM_ENGINES:
        raise ConfigError(f"unknown LM engine {engine!r}: use one of {', '.join(LM_ENGINES)}")
    if is_offline_model(model):
        return LMSpec(model or OFFLINE_MODEL, True, OFFLINE_LABEL)
    kwargs: dict[str, Any] = {}
    notes: list[str] = []
    if api_base:
        kwargs["api_base"] = api_base
    if engine is not None:
        kwargs["engine"] = engine
    provider = _provider(model)
    names = PROVIDER_KEYS.get(provider, ())
    if not provider and re.match(r"(gpt-|o\d|chatgpt-|text-)", model):
        names = PROVIDER_KEYS["openai"]  # litellm treats bare OpenAI names as openai/...
    key = next((env[n] for n in names if env.get(n)), None)
    if key:
        kwargs["api_key"] = key
    elif api_base:
        kwargs["api_key"] = DUMMY_API_KEY
        notes.append(f"no {names[0] if names else 'API key'} set: using a dummy key for {api_base}")
    elif names:
        either = " or ".join(names)
        raise ConfigError(f"model {model!r} needs an API key: set {either} (or pass --api-base for a local "
                          f"OpenAI-compatible server; with no --model the offline stand-in LM is used)")
    elif provider not in KEYLESS_PROVIDERS:
        missing = _litellm_missing_keys(model)
        if missing:
            raise ConfigError(f"model {model!r} needs {', '.join(missing)} in the environment "
                              f"(litellm.validate_environment); with no --model the offline stand-in LM is used")
    where = f" at {api_base}" if api_base else ""
    return LMSpec(model, False, f"{model}{where}", kwargs, tuple(notes))


def _litellm_missing_keys(model: str) -> list[str]:
    """Keys litellm says ``model`` needs and the environment lacks; [] when litellm cannot tell."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its import fetches prices otherwise
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import litellm

            report = litellm.validate_environment(model)
    except Exception:  # noqa: BLE001 - no litellm, or it cannot map the model: let the call tell
        return []
    return [] if report.get("keys_in_environment") else [str(k) for k in report.get("missing_keys", [])]


# --------------------------------------------------------------------------- helpers


def _short(worker: str) -> str:
    return worker[:8] if worker else "-"


def _score(pred: dict[str, Any], category: str, urgency: str) -> float:
    def same(a: Any, b: str) -> bool:
        return str(a or "").strip().lower() == b.strip().lower()

    return 0.5 * same(pred.get("category"), category) + 0.5 * same(pred.get("urgency"), urgency)


def _one_line(text: Any, width: int = 90) -> str:
    flat = re.sub(r"\s+", " ", str(text)).strip()
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _workers(client: dspex.Client) -> dict[str, dict[str, Any]]:
    """incarnation -> worker row (with its pool) from the broker status."""
    rows: dict[str, dict[str, Any]] = {}
    for pool_name, pool in client.status(timeout=10)["pools"].items():
        for w in pool["workers"]:
            rows[w["incarnation"]] = {**w, "pool": pool_name}
    return rows


def wait_pools_ready(client: dspex.Client, pools: tuple[str, ...] = POOLS, *, timeout: float = 60.0,
                     out: Out = print, need: dict[str, int] | None = None,
                     what: str = "waiting for workers") -> dict[str, int]:
    """Wait until each pool has its declared number of ready workers (at least ``need[pool]``).

    Returns ready counts. A pool still short after ``timeout`` but with one worker is a warning; a
    pool with none is an error; an undeclared pool is :class:`dspex.PoolNotFound`.
    """
    need = dict(need or {})
    deadline = time.monotonic() + timeout
    said = ""
    while True:
        status = client.status(timeout=10)["pools"]
        missing = [p for p in pools if p not in status]
        if missing:
            raise dspex.PoolNotFound(f"the broker has no pool {', '.join(missing)} (it serves: "
                                     f"{', '.join(sorted(status)) or 'none'}); declare it in supervisor.conf")
        ready = {p: sum(1 for w in status[p]["workers"] if w["state"] != "draining") for p in pools}
        wanted = {p: max(int(status[p].get("size") or 0), need.get(p, 1)) for p in pools}
        short = {p: (ready[p], wanted[p]) for p in pools if ready[p] < wanted[p]}
        if not short:
            return ready
        line = ", ".join(f"{p} {have}/{want}" for p, (have, want) in short.items())
        if line != said:
            out(f"  {what}: {line}")
            said = line
        if time.monotonic() > deadline:
            empty = [p for p, (have, _) in short.items() if have == 0]
            if empty:
                raise Timeout(f"no ready worker in {', '.join(empty)} after {timeout:g}s", op="wait_pools")
            out(f"WARNING: pools still short after {timeout:g}s ({line}); going on")
            return ready
        time.sleep(0.1)


def recycle_and_wait(client: dspex.Client, pool: str, worker: str, *, out: Out, timeout: float = 60.0,
                     replacement_timeout: float = 30.0) -> float:
    """Recycle one worker incarnation (like ``dspexctl workers recycle``) and wait until it has
    left the broker, then until the pool is back to its declared size (supervisord restarts the
    worker as a new incarnation; without supervisord, going on with >= 1 worker after
    ``replacement_timeout``). Returns the seconds it took."""
    started = time.monotonic()
    client.recycle(pool, worker=worker, timeout=10)
    out(f"  recycling {pool} worker {_short(worker)} (dspexctl workers recycle {pool} {_short(worker)})")
    deadline = started + timeout
    while worker in _workers(client):
        if time.monotonic() > deadline:
            raise Timeout(f"worker {_short(worker)} of {pool} did not leave within {timeout:g}s", op="recycle")
        time.sleep(0.05)
    out(f"  worker {_short(worker)} has left the broker after {time.monotonic() - started:.2f}s")
    ready = wait_pools_ready(client, (pool,), timeout=replacement_timeout, out=out,
                             need={pool: 1}, what="waiting for its replacement (supervisord autorestart)")
    elapsed = time.monotonic() - started
    out(f"  {pool} has {ready[pool]} ready worker(s) again after {elapsed:.2f}s")
    return elapsed


def _format_history(entries: list[Any], *, offline: bool) -> list[dict[str, Any]]:
    """``lm.history`` entries (plain data with the response as a ref) -> rows for output and JSON."""
    rows = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            rows.append({"index": i, "unexpected": repr(entry)[:200]})
            continue
        usage = entry.get("usage") or {}
        tokens = usage.get("total_tokens")
        if tokens is None:
            tokens = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
        cached = not usage  # dspy records no usage for an answer from its cache
        cost = entry.get("cost")
        if cost is None:
            cost_text = "$0 (offline)" if offline else "$? (not priced)"
        else:
            cost_text = f"${float(cost):.6f}"
        messages = entry.get("messages") or []
        user = next((m.get("content") for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
                    entry.get("prompt") or "")
        if isinstance(user, list):
            user = " ".join(str(p.get("text", "")) for p in user if isinstance(p, dict))
        preview = re.sub(r"\[\[ ## (\w+) ## \]\]", r"\1:", str(user))
        preview = preview.split("Respond with the corresponding output fields")[0]
        response = entry.get("response")
        ref = response if isinstance(response, dspex.Ref) else None
        is_ref = ref is not None
        outputs = entry.get("outputs") or []
        rows.append({
            "index": i, "model": entry.get("model"), "cost": cost, "cost_text": cost_text, "tokens": int(tokens),
            "cached": cached,
            "prompt_preview": _one_line(preview, 80),
            "output_preview": _one_line(outputs[0] if outputs else "", 80),
            "response_is_ref": is_ref,
            "response": ref.type_name if ref is not None else type(response).__name__,
            "response_ref": ref.id[:8] if ref is not None else None,
            "data_keys": sorted(k for k in entry if k != "response"),
        })
    return rows


# --------------------------------------------------------------------------- the flow


def run_flagship(client: dspex.Client, *, model: str | None = None, api_base: str | None = None,
                 max_metric_calls: int = DEFAULT_MAX_METRIC_CALLS, recycle: bool = True, out: Out = print,
                 engine: str | None = None, ready_timeout: float = 60.0) -> dict[str, Any]:
    """Run the whole flow against the broker ``client`` talks to; return the results (JSON-able)."""
    started = time.perf_counter()
    spec = resolve_lm(model, api_base, engine=engine)
    if max_metric_calls < len(GEPA_TRAIN):
        raise ConfigError(f"--max-metric-calls must be at least {len(GEPA_TRAIN)} (GEPA first scores the "
                          f"{len(GEPA_TRAIN)}-example valset), got {max_metric_calls}")
    results: dict[str, Any] = {"lm": spec.public(), "offline": spec.offline, "label": spec.label}
    opened: list[dspex.Session] = []
    rehydrators: list[dspex.Rehydrator[Any]] = []
    recycles: list[dict[str, Any]] = []

    def open_session(pool: str) -> dspex.Session:
        s = client.session(pool)
        opened.append(s)
        return s

    def new_lm(s: dspex.Session, temperature: float) -> dspex.Ref:
        lm: dspex.Ref = s.call("dspy", "LM", [spec.model], spec.lm_kwargs(temperature))
        s.call("dspy", "configure", kwargs={"lm": lm})
        return lm

    def predict(s: dspex.Session, program: dspex.Ref, ticket: str) -> dict[str, Any]:
        ref = s.method(program, "__call__", kwargs={"ticket": ticket})
        try:
            return dict(s.to_data(ref))
        finally:
            s.release(ref)

    out("=" * 72)
    out("dspex flagship: parallel triage, rehydration, GEPA across three pools")
    out(f"LM: {spec.label}" if spec.offline else f"LM: {spec.label} (real provider)")
    if spec.offline:
        out(f"  using the {OFFLINE_LABEL}: set --model / DSPEX_MODEL for a real LM")
    for note in spec.notes:
        out(f"  note: {note}")
    out(f"broker: {client.endpoint}")
    wait_pools_ready(client, POOLS, timeout=ready_timeout, out=out, need={TRIAGE_POOL: 2})

    try:
        # ---------------------------------------------------------------- 1. sessions
        out("\n[1] sessions (the broker pins each to the least-loaded worker of its pool)")
        triage: dict[str, tuple[dspex.Session, dspex.Ref, dspex.Ref]] = {}
        for name in ("triage_1", "triage_2"):
            s = open_session(TRIAGE_POOL)
            lm = new_lm(s, 0.2)  # the first call pins the session
            triage[name] = (s, lm, s.call("dspy", "Predict", [TRIAGE_SIGNATURE]))

        def build_insights(s: dspex.Session) -> tuple[dspex.Ref, dspex.Ref]:
            lm = new_lm(s, 0.6)
            return lm, s.call("dspy", "ChainOfThought", [INSIGHT_SIGNATURE])

        insights: dspex.Rehydrator[tuple[dspex.Ref, dspex.Ref]]
        rehydration: dict[str, Any] = {"fired": 0, "warnings": []}

        def on_rehydrate(err: DspexError, new: dspex.Session) -> None:
            rehydration["fired"] += 1
            msg = f"WARNING: insights: {type(err).__name__} ({err.code}): {err.message}"
            rehydration["warnings"].append(msg)
            out(msg)
            out("  rebuilding the insights session on a new session (dspex.Rehydrator): new LM, configure, "
                "ChainOfThought, then one retry")
            old_id = str(err.details.get("session") or "")
            if old_id and old_id != new.id:  # the Rehydrator drops the old session without telling the
                try:                           # broker, which keeps its record until the idle TTL
                    client.close_session(old_id, timeout=5)
                except DspexError:
                    pass

        insights = dspex.Rehydrator(client, OPTIMIZER_POOL, build_insights, on_rehydrate=on_rehydrate)
        rehydrators.append(insights)
        gepa = open_session(OPTIMIZER_POOL)
        gepa_lm = new_lm(gepa, 0.2)
        gepa_program = gepa.call("dspy", "Predict", [TRIAGE_SIGNATURE])
        analytics = open_session(ANALYTICS_POOL)
        analytics.exec(STATS_SOURCE)  # pins it; defines score_stats() in the session's namespace

        rows = _workers(client)
        sessions = {**{n: t[0] for n, t in triage.items()}, "insights": insights.session, "gepa": gepa,
                    "analytics": analytics}
        results["sessions"] = {}
        for name, s in sessions.items():
            pid = rows.get(s.worker, {}).get("pid")
            results["sessions"][name] = {"pool": s.pool, "session": s.id, "worker": s.worker, "pid": pid}
            out(f"  {name:<10} {s.pool:<15} session {s.id[:8]}  worker {_short(s.worker)} (pid {pid})")
        distinct = triage["triage_1"][0].worker != triage["triage_2"][0].worker
        results["triage_on_distinct_workers"] = distinct
        out("  triage_1 and triage_2 run on different workers: " + ("yes" if distinct else
            "NO (the pool has one ready worker?)"))

        # ---------------------------------------------------------------- 2. parallel triage
        out("\n[2] triage: five tickets, alternating sessions, two at a time in parallel")
        triaged: list[dict[str, Any]] = []
        ids = list(TICKETS)
        names = list(triage)

        def triage_one(tid: str, name: str) -> dict[str, Any]:
            s, _, program = triage[name]
            t0 = time.perf_counter()
            pred = predict(s, program, TICKETS[tid][0])
            return {"id": tid, "session": name, "worker": s.worker, "elapsed_s": round(time.perf_counter() - t0, 4),
                    "category": str(pred.get("category", "")), "urgency": str(pred.get("urgency", "")),
                    "action": str(pred.get("action", ""))}

        for i in range(0, len(ids), 2):
            futures = [client.submit(triage_one, tid, names[(i + j) % 2]) for j, tid in enumerate(ids[i:i + 2])]
            for fut in futures:
                row = fut.result()
                triaged.append(row)
                out(f"  {row['id']} -> {row['category']}/{row['urgency']} ({row['session']})")
        results["triage"] = triaged

        # ---------------------------------------------------------------- 3. insights + rehydration
        out("\n[3] insights on the high-urgency tickets (optimizer_pool), surviving a recycle")
        high = [r["id"] for r in triaged if r["urgency"].strip().lower() == "high"]
        chosen = high or ids[:2]
        out(f"  tickets: {', '.join(chosen)}" + ("" if high else " (none predicted high: the first two)"))
        before = insights.session.worker
        recycled_s = None
        if recycle:
            recycled_s = recycle_and_wait(client, OPTIMIZER_POOL, before, out=out)
            recycles.append({"step": "insights", "pool": OPTIMIZER_POOL, "worker": before,
                             "seconds": round(recycled_s, 3)})
        else:
            out("  --no-recycle: no forced recycle")

        def insight(tid: str) -> Callable[[dspex.Session, tuple[dspex.Ref, dspex.Ref]], dict[str, Any]]:
            def run(s: dspex.Session, objs: tuple[dspex.Ref, dspex.Ref]) -> dict[str, Any]:
                ref = s.method(objs[1], "__call__", kwargs={"ticket": TICKETS[tid][0]})
                try:
                    return dict(s.to_data(ref))
                finally:
                    s.release(ref)
            return run

        insight_rows = []
        for tid in chosen:
            data = insights.run(insight(tid))
            row = {"id": tid, "summary": str(data.get("summary", "")), "root_cause": str(data.get("root_cause", "")),
                   "reasoning": str(data.get("reasoning", "")), "worker": insights.session.worker}
            insight_rows.append(row)
            out(f"  {tid}: summary: {_one_line(row['summary'], 70)}")
            out(f"           root cause: {_one_line(row['root_cause'], 70)}")
        results["insights"] = {
            "tickets": chosen, "results": insight_rows, "recycled": recycle, "worker_before": before,
            "worker_after": insights.session.worker, "rehydrated": rehydration["fired"] > 0,
            "rehydrations": insights.rehydrations, "warnings": rehydration["warnings"],
            "retry_succeeded": rehydration["fired"] > 0 and len(insight_rows) == len(chosen),
        }
        if rehydration["fired"]:
            out(f"  rehydrated: worker {_short(before)} -> {_short(insights.session.worker)}; retry succeeded")

        # ---------------------------------------------------------------- 4. scores + numpy
        out("\n[4] scores (0.5 category + 0.5 urgency) and numpy statistics on analytics_pool")
        scores = []
        for row in triaged:
            text, category, urgency = TICKETS[row["id"]]
            row["expected"] = {"category": category, "urgency": urgency}
            row["score"] = _score(row, category, urgency)
            scores.append(row["score"])
            out(f"  {row['id']}: {row['score']:.1f}  (got {row['category']}/{row['urgency']}, "
                f"expected {category}/{urgency})")
        stats = dict(analytics.eval("score_stats(scores)", {"scores": scores}))
        stats["scores"] = scores
        stats["worker"] = analytics.worker
        results["analytics"] = stats
        out(f"  numpy {stats['numpy']} on worker {_short(analytics.worker)}: mean={stats['mean']:.3f} "
            f"std={stats['std']:.3f} p80={stats['p80']:.3f}")

        # ---------------------------------------------------------------- 5. GEPA
        out(f"\n[5] GEPA on the gepa session (max_metric_calls={max_metric_calls})")
        bound = gepa.exec(METRIC_SOURCE)
        out(f"  metric defined in the worker: exec bound {sorted(bound)}")
        metric = bound["metric"]
        rows_train = [list(TICKETS[t]) for t in GEPA_TRAIN]
        trainset = gepa.exec(TRAINSET_SOURCE, {"GEPA_ROWS": rows_train})["trainset"]
        reflection_lm = gepa.call("dspy", "LM", [spec.model], spec.lm_kwargs(0.9))
        optimizer = gepa.call("dspy", "GEPA", [metric], {
            "reflection_lm": reflection_lm, "max_metric_calls": max_metric_calls,
            "reflection_minibatch_size": 1, "track_stats": True})
        t0 = time.perf_counter()
        compile_timeout = max(client.timeout, 120.0 + 20.0 * max_metric_calls)
        progress_events: list[str] = []

        def gepa_progress(event: Any) -> None:
            # GEPA's log lines, streamed from the worker while compile runs (no silent wait)
            message = str(event.get("message", event)) if isinstance(event, dict) else str(event)
            progress_events.append(message)
            first = message.splitlines()[0] if message else ""
            if first.startswith("Iteration") and ("score" in first or "Proposed" in first):
                out(f"  · {first[:110]}")

        optimized = gepa.method(optimizer, "compile", [gepa_program],
                                {"trainset": trainset, "valset": trainset}, timeout=compile_timeout,
                                on_progress=gepa_progress)
        gepa_s = time.perf_counter() - t0
        report = dict(gepa.eval(
            "{'calls': r.total_metric_calls, 'scores': [float(x) for x in r.val_aggregate_scores], "
            "'best': r.best_idx, 'candidates': len(r.candidates), 'full_evals': r.num_full_val_evals, "
            "'instructions': o.signature.instructions, 'base_instructions': p.signature.instructions}",
            {"o": optimized, "r": gepa.attr(optimized, "detailed_results"), "p": gepa_program}))
        reflections = int(gepa.eval("len(lm.history)", {"lm": reflection_lm}))
        gepa_result = {
            "budget": max_metric_calls, "metric_calls": report["calls"], "within_budget":
                report["calls"] is not None and report["calls"] <= max_metric_calls,
            "baseline_score": report["scores"][0], "optimized_score": report["scores"][report["best"]],
            "candidates": report["candidates"], "best_candidate": report["best"], "full_val_evals": report["full_evals"],
            "reflection_calls": reflections, "seconds": round(gepa_s, 3),
            "instructions": report["instructions"], "improved": report["instructions"] != report["base_instructions"],
            "progress_events": len(progress_events),
        }
        results["gepa"] = gepa_result
        out(f"  metric calls used: {gepa_result['metric_calls']}/{max_metric_calls}, candidates: "
            f"{gepa_result['candidates']}, reflection LM calls: {reflections}, {gepa_s:.2f}s")
        out(f"  valset score: baseline {gepa_result['baseline_score']:.3f} -> optimized "
            f"{gepa_result['optimized_score']:.3f}")
        learned = [ln for ln in report["instructions"].splitlines() if ln.lstrip().startswith("- ")]
        if gepa_result["improved"]:
            out(f"  learned instructions ({len(learned)} rules):")
            for ln in learned[:6]:
                out(f"    {_one_line(ln, 110)}")
        else:
            out("  instructions unchanged (raise --max-metric-calls to let GEPA reflect)")

        # ---------------------------------------------------------------- 6. holdout + restore
        out("\n[6] holdout: baseline (triage_1) vs optimized (gepa), then snapshot -> recycle -> restore")
        (hid, (htext, hcat, hurg)), = HOLDOUT.items()
        base = predict(triage["triage_1"][0], triage["triage_1"][2], htext)
        opt = predict(gepa, optimized, htext)
        hold: dict[str, Any] = {"id": hid, "ticket": htext, "expected": {"category": hcat, "urgency": hurg},
                "baseline": {**_labels(base), "score": _score(base, hcat, hurg)},
                "optimized": {**_labels(opt), "score": _score(opt, hcat, hurg)}}
        out(f"  {hid}: \"{htext}\" (expected {hcat}/{hurg})")
        out(f"    baseline : {base.get('category')}/{base.get('urgency')}  score {hold['baseline']['score']:.1f}")
        out(f"    optimized: {opt.get('category')}/{opt.get('urgency')}  score {hold['optimized']['score']:.1f}")
        snapshot = gepa.method(optimized, "dump_state")
        if _has_ref(snapshot):
            raise DspexError("the optimized program's dump_state() holds objects that are not plain data; "
                             "it cannot be restored in another session")
        out(f"  snapshot: dump_state() -> {len(repr(snapshot))} bytes of plain data "
            f"({len(snapshot.get('demos', []))} demos, instructions {len(report['instructions'])} chars)")
        # prompt inspection of the gepa session must read its LM before the worker goes away
        gepa_history = gepa.eval(f"list(lm.history[-{HISTORY_ENTRIES}:])", {"lm": gepa_lm})
        gepa_worker = gepa.worker
        if recycle:
            secs = recycle_and_wait(client, OPTIMIZER_POOL, gepa_worker, out=out)
            recycles.append({"step": "gepa", "pool": OPTIMIZER_POOL, "worker": gepa_worker, "seconds": round(secs, 3)})
            try:
                gepa.eval("1")
                out("WARNING: the gepa session still answers after its worker was recycled")
            except SessionWorkerUnavailable as err:
                out(f"  gepa session is gone with its worker, as expected: {err.code}")

        def restore(s: dspex.Session) -> dspex.Ref:
            new_lm(s, 0.2)
            program: dspex.Ref = s.call("dspy", "Predict", [TRIAGE_SIGNATURE])
            s.method(program, "load_state", [snapshot])
            return program

        restored = dspex.Rehydrator(client, OPTIMIZER_POOL, restore)
        rehydrators.append(restored)
        again = restored.run(lambda s, program: predict(s, program, htext))
        restored_instr = restored.run(lambda s, program: s.eval("p.signature.instructions", {"p": program}))
        same_answer = _labels(again) == _labels(opt)
        hold["restored"] = {**_labels(again), "score": _score(again, hcat, hurg), "worker": restored.session.worker,
                            "session": restored.session.id}
        hold["restored_matches"] = same_answer and restored_instr == report["instructions"]
        hold["recycled_worker"] = gepa_worker if recycle else None
        results["holdout"] = hold
        out(f"    restored : {again.get('category')}/{again.get('urgency')}  on worker "
            f"{_short(restored.session.worker)} (was {_short(gepa_worker)}): "
            + ("same answer and instructions as the optimized program" if hold["restored_matches"]
               else "DIFFERS from the optimized program"))

        # ---------------------------------------------------------------- 7. prompt inspection
        out(f"\n[7] prompt inspection: last {HISTORY_ENTRIES} lm.history entries per session "
            "(response stays a ref, the rest is data)")
        history: dict[str, list[dict[str, Any]]] = {}
        sources: list[tuple[str, Any]] = [
            (name, s.eval(f"list(lm.history[-{HISTORY_ENTRIES}:])", {"lm": lm})) for name, (s, lm, _) in triage.items()]
        sources.append(("gepa", gepa_history))
        for name, entries in sources:
            rows_h = _format_history(list(entries), offline=spec.offline)
            history[name] = rows_h
            suffix = " (read before its worker was recycled)" if name == "gepa" and recycle else ""
            out(f"  {name}{suffix}:")
            for r in rows_h:
                if "unexpected" in r:
                    out(f"    [{r['index']}] {r['unexpected']}")
                    continue
                cached = " (dspy cache hit)" if r["cached"] else ""
                out(f"    [{r['index']}] model={r['model']}, cost={r['cost_text']}, tokens={r['tokens']}{cached}, "
                    f"response=<ref {r['response']}>")
                out(f"        prompt: {r['prompt_preview']}")
        results["history"] = history

        # ---------------------------------------------------------------- 8. summary
        wall = time.perf_counter() - started
        summary = {
            "sessions": len(results["sessions"]) + insights.rehydrations + 1 + restored.rehydrations,
            "tickets_triaged": len(triaged), "insights": len(insight_rows), "rehydrations": insights.rehydrations,
            "recycles": len(recycles), "mean_score": stats["mean"], "std_score": stats["std"],
            "p80_score": stats["p80"], "gepa_metric_calls": gepa_result["metric_calls"],
            "gepa_budget": max_metric_calls, "gepa_baseline": gepa_result["baseline_score"],
            "gepa_optimized": gepa_result["optimized_score"], "holdout_restored_matches": hold["restored_matches"],
            "wall_time_s": round(wall, 3),
        }
        results["recycles"] = recycles
        results["summary"] = summary
        out("\n[8] summary")
        out(f"  sessions opened: {summary['sessions']} (incl. {summary['rehydrations']} rehydrated, 1 restored), "
            f"tickets triaged: {summary['tickets_triaged']}, insights: {summary['insights']}, "
            f"recycles: {summary['recycles']}")
        out(f"  triage score: mean {summary['mean_score']:.3f}, std {summary['std_score']:.3f}")
        out(f"  GEPA: {summary['gepa_metric_calls']}/{max_metric_calls} metric calls, valset "
            f"{summary['gepa_baseline']:.3f} -> {summary['gepa_optimized']:.3f}")
        out(f"  wall time: {wall:.2f}s" + (f"  [{OFFLINE_LABEL}]" if spec.offline else ""))
        return results
    finally:
        for rh in rehydrators:
            _quiet_close(rh.session)
        for s in opened:
            _quiet_close(s)


def _labels(pred: dict[str, Any]) -> dict[str, str]:
    return {k: str(pred.get(k, "")) for k in ("category", "urgency", "action")}


def _has_ref(value: Any) -> bool:
    if isinstance(value, dspex.Ref):
        return True
    if isinstance(value, dict):
        return any(_has_ref(k) or _has_ref(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_has_ref(v) for v in value)
    return False


def _quiet_close(s: dspex.Session) -> None:
    try:
        s.close(timeout=5)
    except DspexError:
        pass


# --------------------------------------------------------------------------- script entry


def main(argv: list[str] | None = None) -> int:
    """``python examples/flagship_multi_pool_gepa.py``: run against a running stack."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--endpoint", default=None, help="broker frontend (default: DSPEX_ENDPOINT or the run dir)")
    p.add_argument("--model", default=None, help="dspy/litellm model string (default: DSPEX_MODEL, else offline)")
    p.add_argument("--api-base", default=None, help="base URL of a local OpenAI-compatible server")
    p.add_argument("--lm-engine", default=None, choices=LM_ENGINES, help="dspy.LM engine (default: dspy's auto)")
    p.add_argument("--max-metric-calls", type=int, default=DEFAULT_MAX_METRIC_CALLS)
    p.add_argument("--no-recycle", action="store_true", help="skip the forced recycles")
    p.add_argument("--timeout", type=float, default=60.0, help="per-call timeout in seconds")
    p.add_argument("--json", action="store_true", help="print the results as one JSON document")
    args = p.parse_args(argv)
    out: Out = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else print
    try:
        resolve_lm(args.model, args.api_base, engine=args.lm_engine)  # a missing key fails before connecting
        with dspex.connect(args.endpoint, timeout=args.timeout) as client:
            client.ping(timeout=5)
            results = run_flagship(client, model=args.model, api_base=args.api_base,
                                   max_metric_calls=args.max_metric_calls, recycle=not args.no_recycle,
                                   out=out, engine=args.lm_engine)
    except DspexError as err:
        print(f"error: {err.code}: {_one_line(err.message or err, 300)}", file=sys.stderr)
        if isinstance(err, dspex.Timeout) and "ping" in str(err):
            print("hint: start the stack first (supervisord -c supervisor.conf) or run `dspexctl flagship`",
                  file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    if args.json:
        import json

        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
