"""The dspex flagship: triage tickets in parallel sessions, optimize with GEPA, survive recycles.

Everything runs on dspex workers through the public client API only; this process never imports
dspy (only the optional preflight, flagship_preflight.py, makes one call in-process). The LM is
user code like the metric: a real model is ``dspy.LM(model, ...)`` made on the worker, the offline
stand-in (offline_lm.py) is this folder's code sent by value. Pools used (declared in
supervisor.conf or on the broker's command line):

* ``triage_pool``    -- two sessions (``triage_1``, ``triage_2``), each with its own LM and Predict,
                        placed least-loaded by the broker, so they land on two different workers;
* ``optimizer_pool`` -- ``insights`` (ChainOfThought, rebuilt by ``dspex.Rehydrator`` after its
                        worker is recycled), its durable twin ``insights_durable`` (the same
                        program; a recycle moves it with its state, no rebuild code) and ``gepa``
                        (GEPA with a metric defined in the worker, in a durable session: its
                        optimized program answers again after its worker is recycled);
* ``analytics_pool`` -- numpy statistics computed in the worker.

A prediction whose LM answer fails (does not parse, times out, is rate limited past its retries)
is recorded with its cause and scored 0, and the flow goes on, as ``dspy.Evaluate`` does; GEPA's
own failed predictions are counted too, and the summary counts them all. Real models get bounded
calls (flagship_lm.py).

Run it against a running stack with ``python examples/flagship_multi_pool_gepa.py`` or let
``dspexctl flagship`` start (and stop) the stack. With no ``--model`` / ``DSPEX_MODEL`` it uses the
offline stand-in LM (offline_lm.py): deterministic, no key, no network. Its sibling modules are
imported by name: run it as a script (Python puts this folder first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future
from concurrent.futures import wait as futures_wait
from typing import Any

from flagship_gepa import ORIGINAL_MAX_METRIC_CALLS, fmt, run_gepa
from flagship_helpers import (
    Out,
    ServerWatch,
    format_history,
    one_line,
    recycle_and_wait,
    score,
    short,
    shown,
    wait_pools_ready,
    workers_by_incarnation,
)
from flagship_lm import (
    DUMMY_API_KEY,
    EXIT_COMPLETED_WITH_FAILURES,
    EXIT_FAILED,
    EXIT_LM_TOO_SLOW,
    EXIT_LM_UNUSABLE,
    EXIT_OK,
    EXIT_USAGE,
    LM_ENGINES,
    Failure,
    LMBounds,
    LMSpec,
    count_line,
    failure_from_record,
    failure_of,
    kinds_text,
    resolve_bounds,
    resolve_lm,
)
from flagship_preflight import LMUnusable, preflight
from offline_lm import OFFLINE_LABEL, offline_lm

import dspex
from dspex.errors import (
    ConfigError,
    DspexError,
    QueueTimeout,
    RemoteError,
    Timeout,
)

__all__ = [
    "DEFAULT_MAX_METRIC_CALLS",
    "DUMMY_API_KEY",
    "ORIGINAL_MAX_METRIC_CALLS",
    "TICKETS",
    "LMUnusable",
    "exit_code_for",
    "main",
    "preflight",
    "resolve_bounds",
    "resolve_lm",
    "run_flagship",
]

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
DEFAULT_MAX_METRIC_CALLS = 30  # lets GEPA reflect; the original flagship's 3 only scores the baseline
HISTORY_ENTRIES = 6

# The GEPA metric and the numpy statistics are plain client functions: dspex sends them by value
# (with their source) to the worker that runs GEPA / the analytics session.
def metric(gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None) -> Any:
    """0.5 for the category, 0.5 for the urgency; feedback GEPA's reflection can act on."""
    import dspy

    notes, score = [], 0.0
    for name in ("category", "urgency"):
        want = str(gold[name]).strip().lower()
        got = str(getattr(pred, name, "") or "").strip().lower()
        if want == got:
            score += 0.5
        else:
            notes.append(f"{name.capitalize()} mismatch: expected '{want}' got '{got}'.")
    return dspy.Prediction(score=score, feedback=" ".join(notes) or "Perfect match. Keep the intent and be concise.")


def gepa_trainset(ticket_ids: tuple[str, ...]) -> list[Any]:
    """The GEPA train/val examples, built here: dspy.Example values travel as data."""
    import dspy

    return [dspy.Example(ticket=text, category=category, urgency=urgency).with_inputs("ticket")
            for text, category, urgency in (TICKETS[t] for t in ticket_ids)]


def score_stats(scores: list[float]) -> dict[str, Any]:
    import numpy as np

    xs = np.asarray(scores, dtype=np.float64)
    return {"numpy": np.__version__, "n": int(xs.size), "mean": float(np.mean(xs)),
            "std": float(np.std(xs)), "p80": float(np.percentile(xs, 80))}


# Worker-side code of each session (exec'd in it, registered with dspy.configure(callbacks=...); GEPA
# evaluates in threads of the same session, which see the same callbacks):
#
# * dspy caches the LM's answer before the adapter parses it, so an answer that does not parse would
#   be replayed from the cache on every rerun (and by GEPA's evaluations). DspexEvictFailedAnswers
#   evicts the entry of an LM call whose answer then failed to parse: cache.put is wrapped (once per
#   worker process) to remember, per thread, the last entry written since that thread's LM call began.
# * dspy.Evaluate and GEPA score a failed prediction 0 and go on without a word, and dspy retries a
#   timed-out, refused or rate-limited LM call (num_retries) without one. DspexLedger records the
#   outcome of every prediction of the session, GEPA's own included, with its cause: the first LM
#   error inside it, a retried attempt's included (a timed-out attempt whose retry's answer does not
#   parse is a timeout, then a parse error). The retried attempts are seen through dspy's backoff
#   function (dspy.clients.execution._delay, wrapped once per worker process; without it, as in
#   another dspy version, they go unseen). dspex_answer returns a prediction or its failure as data.
GUARD_SOURCE = '''
import threading
import dspy
from dspy.utils.callback import BaseCallback

def _dspex_recorder():
    cache = dspy.cache
    rec = getattr(cache, "_dspex_recorder", None)
    if rec is None:
        rec = threading.local()
        put = cache.put

        def put_recorded(request, value, ignored_args_for_cache_key=None, enable_memory_cache=True):
            rec.last = (request, ignored_args_for_cache_key)
            return put(request, value, ignored_args_for_cache_key, enable_memory_cache)

        cache.put = put_recorded
        cache._dspex_recorder = rec
    return cache, rec

def _dspex_retries():
    import dspy.clients.execution as execution
    rec = getattr(execution, "_dspex_retries", None)
    if rec is None:
        rec = threading.local()
        delay = getattr(execution, "_delay", None)
        if delay is not None:
            def delay_recorded(exc, attempt):
                rec.errors = [*getattr(rec, "errors", []), exc]
                return delay(exc, attempt)

            execution._delay = delay_recorded
        execution._dspex_retries = rec
    return rec

class DspexEvictFailedAnswers(BaseCallback):
    """Failed parses leave nothing in dspy's cache (memory and disk)."""

    def on_lm_start(self, call_id, instance, inputs):
        _dspex_recorder()[1].last = None

    def on_adapter_parse_end(self, call_id, outputs, exception=None):
        cache, rec = _dspex_recorder()
        last, rec.last = getattr(rec, "last", None), None
        if exception is None or last is None:
            return
        try:
            key = cache.cache_key(*last)
            cache.memory_cache.pop(key, None)
            cache.disk_cache.pop(key, None)
        except Exception:
            pass

class DspexLedger(BaseCallback):
    """Every prediction of this session: answered, or failed with its cause."""

    def __init__(self):
        self.lock = threading.Lock()
        self.local = threading.local()
        self.answered = 0
        self.failed = []
        self.retried = []  # attempts dspy retried, of calls that went on

    def __getstate__(self):  # a durable session's checkpoint keeps the counts; a lock is made anew
        return {k: v for k, v in self.__dict__.items() if k not in ("lock", "local")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lock = threading.Lock()
        self.local = threading.local()

    def _stack(self):
        stack = getattr(self.local, "stack", None)
        if stack is None:
            stack = self.local.stack = []
        return stack

    def describe(self, exc, cause=None, role="task"):
        first = cause if cause is not None else exc
        message, root, seen = str(first)[:600], first, set()
        while id(root) not in seen and (root.__cause__ or root.__context__) is not None:
            seen.add(id(root))
            root = root.__cause__ or root.__context__
        if root is not first and str(root) and str(root) not in message:  # litellm: "Connection error." over "refused"
            message += f" (from {type(root).__name__}: {str(root)[:200]})"
        then = None
        if cause is not None and (type(exc), str(exc)) != (type(cause), str(cause)):
            then = f"{type(exc).__name__}: {str(exc)[:300]}"
        return {"role": role, "error": type(first).__name__, "message": message, "then": then}

    def on_module_start(self, call_id, instance, inputs):
        if isinstance(instance, dspy.Predict):
            self._stack().append({"id": call_id, "role": "task", "cause": None})

    def on_module_end(self, call_id, outputs, exception=None):
        stack = self._stack()
        if not stack or stack[-1]["id"] != call_id:
            return
        frame = stack.pop()
        if exception is None:
            with self.lock:
                self.answered += 1
        elif isinstance(exception, Exception):  # not a cancel or a deadline: those are not the LM's doing
            entry = self.describe(exception, frame["cause"], frame["role"])
            self.local.last = entry
            with self.lock:
                self.failed.append(entry)

    def on_lm_start(self, call_id, instance, inputs):
        _dspex_retries().errors = []
        role = self.local.role = getattr(instance, "dspex_role", "task")
        stack = self._stack()
        if stack:
            stack[-1]["role"] = role

    def on_lm_end(self, call_id, outputs, exception=None):
        retried, _dspex_retries().errors = getattr(_dspex_retries(), "errors", []), []
        stack = self._stack()
        if retried:
            with self.lock:
                self.retried.extend(self.describe(e) for e in retried)
            if stack and stack[-1]["cause"] is None:
                stack[-1]["cause"] = retried[0]
        if not isinstance(exception, Exception):
            return
        if stack:
            if stack[-1]["cause"] is None:
                stack[-1]["cause"] = exception
        else:  # an LM called outside any Predict
            with self.lock:
                self.failed.append(self.describe(exception, retried[0] if retried else None,
                                                 getattr(self.local, "role", "task")))

    def mark(self):
        with self.lock:
            return {"answered": self.answered, "failed": len(self.failed), "retried": len(self.retried)}

    def since(self, mark):
        with self.lock:
            return {"answered": self.answered - mark["answered"], "failed": list(self.failed[mark["failed"]:]),
                    "retried": list(self.retried[mark["retried"]:])}

_dspex_recorder()
_dspex_retries()
dspex_ledger = DspexLedger()
dspex_callbacks = [DspexEvictFailedAnswers(), dspex_ledger]

def dspex_answer(program, inputs):
    """{"answer": fields} or {"failed": what failed and why}, and the attempts dspy retried, as plain data."""
    dspex_ledger.local.last = None
    mark = dspex_ledger.mark()
    try:
        got = {"answer": {k: v for k, v in program(**inputs).items()}}
    except Exception as exc:
        got = {"failed": getattr(dspex_ledger.local, "last", None) or dspex_ledger.describe(exc)}
    got["retried"] = dspex_ledger.since(mark)["retried"]
    return got
'''

PROGRESS_EVERY_S = 10.0  # a "still waiting" line per pending LM call this often (DSPEX_PROGRESS_EVERY)


def exit_code_for(err: BaseException) -> int:
    """The flagship's exit code for an error that stopped it (see docs/flagship.md)."""
    if isinstance(err, Timeout) and err.details.get("lm_too_slow"):
        return EXIT_LM_TOO_SLOW
    if getattr(err, "code", None) == "lm_unusable":
        return EXIT_LM_UNUSABLE
    if isinstance(err, ConfigError):
        return EXIT_USAGE
    return EXIT_FAILED


CANCEL_WAIT_S = 5.0  # how long an interrupted flow waits for its cancelled calls to come back


class _Flow:
    """State shared by the steps: where LM calls go, their bounds, the failures recorded so far."""

    def __init__(self, client: dspex.Client, spec: LMSpec, out: Out, every: float) -> None:
        self.client, self.spec, self.out, self.every = client, spec, out, every
        # LM-backed calls get the timeout the LM bounds imply; other calls keep the client's
        self.call_timeout = client.timeout if spec.offline else spec.bounds.call_timeout
        self.failures: list[Failure] = []
        self.retried: list[Failure] = []  # attempts dspy retried (the call may have answered in the end)
        self.hinted: set[str] = set()

    def make_lm(self, s: dspex.Session, temperature: float, role: str = "task") -> dspex.Ref:
        """The session's LM, kept on its worker: ``dspy.LM(model, ...)`` there for a real model, the
        offline stand-in sent by value (this folder's code, which the worker cannot import)."""
        kwargs = self.spec.lm_kwargs(temperature, role)
        lm: dspex.Ref
        if self.spec.offline:
            lm = s.run(offline_lm, self.spec.model, **kwargs)
        else:
            lm = s.call("dspy", "LM", [self.spec.model], kwargs)
        if role != "task":
            s.set_attr(lm, "dspex_role", role)  # the ledger names the role of a failed prediction's LM
        return lm

    def new_lm(self, s: dspex.Session, temperature: float) -> dspex.Ref:
        """The session's LM and the flow's callbacks, configured in that session."""
        lm = self.make_lm(s, temperature)
        callbacks = s.exec(GUARD_SOURCE)["dspex_callbacks"]
        s.call("dspy", "configure", kwargs={"lm": lm, "callbacks": callbacks})
        return lm

    def predict(self, s: dspex.Session, program: dspex.Ref, inputs: dict[str, Any], *, step: str,
                item: str) -> tuple[dict[str, Any] | None, Failure | None, float]:
        """(fields, None, seconds) or (None, failure, seconds): a failed prediction is recorded, not raised."""
        t0 = time.perf_counter()
        try:
            got = dict(s.eval("dspex_answer(p, kw)", {"p": program, "kw": inputs}, timeout=self.call_timeout))
        except RemoteError as err:
            failure = failure_of(step, item, err, self.spec, session=s.id, worker=s.worker,
                                 seconds=time.perf_counter() - t0)
        except Timeout as err:
            raise self.too_slow(err, step, item, s) from None
        except QueueTimeout as err:
            raise QueueTimeout(
                f"{step} {item}: {err.message}; one LM call may take up to {self.call_timeout:g}s "
                f"(--lm-timeout {self.spec.bounds.timeout:g}s, {self.spec.bounds.num_retries} retries), so the "
                f"pool's queue_timeout must be at least that: raise it in supervisor.conf [dspex:pool:{s.pool}]",
                **err.details) from None
        else:
            self.note_retries(step, item, got.get("retried") or [], s)
            if "answer" in got:
                return dict(got["answer"]), None, time.perf_counter() - t0
            failure = failure_from_record(step, item, dict(got["failed"]), self.spec, session=s.id,
                                          worker=s.worker, seconds=time.perf_counter() - t0)
        self.failures.append(failure)
        return None, failure, time.perf_counter() - t0

    def note_retries(self, step: str, item: str, records: list[Any], s: dspex.Session) -> None:
        self.retried.extend(failure_from_record(step, item, dict(r), self.spec, session=s.id, worker=s.worker)
                            for r in records)

    def retry_note(self, step: str, item: str) -> str:
        """`` after 1 retried attempt (timed out)`` for an item whose LM calls dspy retried."""
        mine = [f for f in self.retried if f.step == step and f.item == item]
        if not mine:
            return ""
        kinds = ", ".join(dict.fromkeys(f.kind for f in mine))
        return f" after {len(mine)} retried attempt{'s' if len(mine) > 1 else ''} ({kinds})"

    def too_slow(self, err: Timeout, step: str, item: str, s: dspex.Session | None) -> Timeout:
        where = f" on session {s.id[:8]} (worker {short(s.worker)}, {s.pool})" if s is not None else ""
        flag = ("--lm-timeout (dspex's call timeout follows it) or lower --max-tokens" if not self.spec.offline
                else "--timeout")
        return Timeout(
            f"{step} {item}{where} got no answer within {self.call_timeout:g}s from LM {self.spec.endpoint}: "
            f"the LM is slower than the bounds allow; raise {flag}",
            step=step, item=item, session=s.id if s else None, worker=s.worker if s else None,
            lm=self.spec.endpoint, lm_too_slow=True, cause=err.message)

    def wait_all(self, batch: list[tuple[str, Future[Any]]]) -> list[Any]:
        """Results in order; a line per call still pending every ``every`` seconds. When one fails or
        the wait is interrupted (Ctrl-C, SIGTERM), the calls still in flight are cancelled on their
        workers before the error goes on: nothing keeps running for a flow that has stopped."""
        t0 = time.monotonic()
        tick = t0 + self.every
        futures = [f for _, f in batch]
        try:
            while True:
                done, pending = futures_wait(futures, timeout=max(0.0, tick - time.monotonic()),
                                             return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:
                        f.result()  # raises it
                if not pending:
                    return [f.result() for f in futures]
                if time.monotonic() >= tick:
                    for label, f in batch:
                        if f in pending:
                            self.out(f"  ... {label}: {time.monotonic() - t0:.0f}s, waiting on {self.spec.endpoint}")
                    tick += self.every
        except BaseException as err:
            self.cancel(batch, interrupted=isinstance(err, KeyboardInterrupt))
            raise

    def cancel(self, batch: list[tuple[str, Future[Any]]], *, interrupted: bool) -> None:
        running = [(label, f) for label, f in batch if not f.done() and not f.cancel()]
        if not running:
            return
        self.client.cancel_all()
        futures_wait([f for _, f in running], timeout=CANCEL_WAIT_S)
        if interrupted:
            labels = ", ".join(label for label, _ in running)
            self.out(f"  interrupted: cancelled {len(running)} call(s) in flight on their workers: {labels}")

    def failed_line(self, failure: Failure) -> list[str]:
        then = f"; then {one_line(failure.then, 70)}" if failure.then else ""
        lines = [f"failed after {failure.seconds or 0:.2f}s: {failure.label()}: {one_line(failure.message, 110)}{then}"]
        if failure.hint and failure.kind not in self.hinted:
            self.hinted.add(failure.kind)
            lines.append(f"hint: {failure.hint}")
        return lines

    def by_step(self, step: str) -> list[Failure]:
        return [f for f in self.failures if f.step == step]


# --------------------------------------------------------------------------- the flow


def run_flagship(client: dspex.Client, *, model: str | None = None, api_base: str | None = None,
                 max_metric_calls: int = DEFAULT_MAX_METRIC_CALLS, recycle: bool = True, out: Out = print,
                 engine: str | None = None, ready_timeout: float = 60.0, bounds: LMBounds | None = None,
                 progress_every: float | None = None) -> dict[str, Any]:
    """Run the whole flow against the broker ``client`` talks to; return the results (JSON-able).

    Ctrl-C (or a signal handled as one) cancels the calls in flight on their workers and closes the
    flow's sessions before the ``KeyboardInterrupt`` goes on."""
    started = time.perf_counter()
    spec = resolve_lm(model, api_base, engine=engine, bounds=bounds)
    if max_metric_calls < len(GEPA_TRAIN):
        raise ConfigError(f"--max-metric-calls must be at least {len(GEPA_TRAIN)} (GEPA first scores the "
                          f"{len(GEPA_TRAIN)}-example valset), got {max_metric_calls}")
    every = progress_every or float(os.environ.get("DSPEX_PROGRESS_EVERY") or PROGRESS_EVERY_S)
    flow = _Flow(client, spec, out, every)
    predict = flow.predict
    results: dict[str, Any] = {"lm": spec.public(), "offline": spec.offline, "label": spec.label}
    opened: list[dspex.Session] = []
    rehydrators: list[dspex.Rehydrator[Any]] = []
    recycles: list[dict[str, Any]] = []
    recycled: set[str] = set()  # workers this flow recycled on purpose

    def open_session(pool: str, durable: bool = False) -> dspex.Session:
        s = client.session(pool, durable=durable)
        opened.append(s)
        return s

    out("=" * 72)
    out("dspex flagship: parallel triage" + (", worker recycles" if recycle else "")
        + " and prompt optimization across three pools")
    if spec.offline:
        out(f"LM: {OFFLINE_LABEL}; set --model / DSPEX_MODEL for a real LM")
        out("  (offline_lm.py of this folder: user code, sent to the workers by value like the metric)")
    else:
        out(f"LM: {spec.label} (real provider)")
        out(f"  bounds: {spec.bounds_line()}")
    for note in spec.notes:
        out(f"  note: {note}")
    out(f"broker: {client.endpoint}")
    wait_pools_ready(client, POOLS, timeout=ready_timeout, out=out, need={TRIAGE_POOL: 2})
    if not spec.offline:
        pools = client.status(timeout=10)["pools"]
        for pool in (TRIAGE_POOL, OPTIMIZER_POOL):
            limit = float(pools.get(pool, {}).get("queue_timeout") or 0)
            if 0 < limit < flow.call_timeout:
                out(f"  WARNING: {pool}'s queue_timeout {limit:g}s is shorter than one LM call may take "
                    f"({flow.call_timeout:g}s): a second call queued in a session may fail with QueueTimeout; "
                    f"raise queue_timeout in [dspex:pool:{pool}] or lower --lm-timeout")
    # dspy retries a refused or dropped LM call without a word: the watch says when the server was down
    watch = ServerWatch(spec.api_base, out) if spec.api_base else None
    if watch is not None:
        watch.start()

    interrupted = False
    try:
        # ---------------------------------------------------------------- 1. sessions
        out("\n[1] sessions (the broker pins each to the least-loaded worker of its pool)")
        out("  each session's LM and program stay on its worker; this process holds refs to them "
            "(a ref is a handle whose calls run on the worker)")
        triage: dict[str, tuple[dspex.Session, dspex.Ref, dspex.Ref]] = {}
        for name in ("triage_1", "triage_2"):
            s = open_session(TRIAGE_POOL)
            lm = flow.new_lm(s, 0.2)  # the first call pins the session
            triage[name] = (s, lm, s.call("dspy", "Predict", [TRIAGE_SIGNATURE]))

        def build_insights(s: dspex.Session) -> tuple[dspex.Ref, dspex.Ref]:
            lm = flow.new_lm(s, 0.6)
            return lm, s.call("dspy", "ChainOfThought", [INSIGHT_SIGNATURE])

        insights: dspex.Rehydrator[tuple[dspex.Ref, dspex.Ref]]
        rehydration: dict[str, Any] = {"fired": 0, "planned": 0, "warnings": []}

        def on_rehydrate(err: DspexError, new: dspex.Session) -> None:
            rehydration["fired"] += 1
            gone = str(err.details.get("worker") or "")
            if gone in recycled or (not gone and recycled):
                rehydration["planned"] += 1
                out(f"  the call found its worker gone, as planned: {type(err).__name__} ({err.code})")
            else:
                msg = f"WARNING: insights: {type(err).__name__} ({err.code}): {err.message}"
                rehydration["warnings"].append(msg)
                out(msg)
            out("  dspex.Rehydrator rebuilds the session on a new one (new LM, configure, ChainOfThought) "
                "and retries the call once")

        insights = dspex.Rehydrator(client, OPTIMIZER_POOL, build_insights, on_rehydrate=on_rehydrate)
        rehydrators.append(insights)
        # its durable twin: the same LM and ChainOfThought, built once; a recycle moves it, state and all
        insights_durable = open_session(OPTIMIZER_POOL, durable=True)
        durable_objs = build_insights(insights_durable)
        gepa = open_session(OPTIMIZER_POOL, durable=True)
        gepa_lm = flow.new_lm(gepa, 0.2)
        gepa_program = gepa.call("dspy", "Predict", [TRIAGE_SIGNATURE])
        analytics = open_session(ANALYTICS_POOL)
        analytics.define(score_stats)  # pins it; binds the client's score_stats() in the session

        rows = workers_by_incarnation(client)
        sessions = {**{n: t[0] for n, t in triage.items()}, "insights": insights.session,
                    "insights_durable": insights_durable, "gepa": gepa, "analytics": analytics}
        results["sessions"] = {}
        for name, s in sessions.items():
            pid = rows.get(s.worker, {}).get("pid")
            results["sessions"][name] = {"pool": s.pool, "session": s.id, "worker": s.worker, "pid": pid}
            out(f"  {name:<16} {s.pool:<15} session {s.id[:8]}  worker {short(s.worker)} (pid {pid})"
                + ("  durable" if s.durable else ""))
        out("  insights_durable and gepa are durable sessions: checkpointed after each call that changes them, "
            "moved with their state when their worker goes")
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
            pred, failure, secs = predict(s, program, {"ticket": TICKETS[tid][0]}, step="triage", item=tid)
            got = pred or {}
            return {"id": tid, "session": name, "worker": s.worker, "elapsed_s": round(secs, 4),
                    "category": str(got.get("category", "") or ""), "urgency": str(got.get("urgency", "") or ""),
                    "action": str(got.get("action", "") or ""), "failed": failure.public() if failure else None}

        for i in range(0, len(ids), 2):
            batch = [(f"{tid} on {names[(i + j) % 2]}", client.submit(triage_one, tid, names[(i + j) % 2]))
                     for j, tid in enumerate(ids[i:i + 2])]
            for row in flow.wait_all(batch):
                triaged.append(row)
                where = f"({row['session']}, {row['elapsed_s']:.2f}s)"
                if row["failed"]:
                    failure = Failure(**row["failed"])
                    lines = flow.failed_line(failure)
                    out(f"  {row['id']} -> {failure.tag()} {where} {lines[0]}")
                    for extra in lines[1:]:
                        out(f"      {extra}")
                else:
                    out(f"  {row['id']} -> {shown(row['category'])}/{shown(row['urgency'])} {where}"
                        + flow.retry_note("triage", row["id"]))
        results["triage"] = triaged

        # ---------------------------------------------------------------- 3. insights + rehydration
        out("\n[3] insights on the high-urgency tickets (optimizer_pool)" + (", surviving a recycle" if recycle else ""))
        high = [r["id"] for r in triaged if r["urgency"].strip().lower() == "high"]
        chosen = high or ids[:2]
        out(f"  tickets: {', '.join(chosen)}" + ("" if high else " (none predicted high: the first two)"))
        before = insights.session.worker
        durable_before = insights_durable.worker
        if recycle:
            out("  planned: recycle the workers of both insights sessions, so that their next calls find them gone: "
                "the plain one is rebuilt by dspex.Rehydrator (its rebuild code: new LM, configure, "
                "ChainOfThought), the durable one moves with its checkpoint (no rebuild code)")
            for gone in dict.fromkeys((before, durable_before)):
                recycled.add(gone)
                recycled_s = recycle_and_wait(client, OPTIMIZER_POOL, gone, out=out)
                recycles.append({"step": "insights", "pool": OPTIMIZER_POOL, "worker": gone,
                                 "seconds": round(recycled_s, 3)})

        def insight(tid: str) -> Callable[[dspex.Session, tuple[dspex.Ref, dspex.Ref]], Any]:
            def run(s: dspex.Session, objs: tuple[dspex.Ref, dspex.Ref]) -> Any:
                return predict(s, objs[1], {"ticket": TICKETS[tid][0]}, step="insights", item=tid)
            return run

        insight_rows = []
        durable_rows: list[dict[str, Any]] = []
        retried: dict[str, Any] | None = None  # the call the Rehydrator retried, and how it went
        for tid in chosen:
            fired = rehydration["fired"]
            (data, failure, secs), = flow.wait_all([(f"insight {tid}", client.submit(insights.run, insight(tid)))])
            if rehydration["fired"] > fired:
                retried = {"ticket": tid, "answered": failure is None,
                           "failed": failure.public() if failure else None}
            got = data or {}
            row = {"id": tid, "summary": str(got.get("summary", "") or ""),
                   "root_cause": str(got.get("root_cause", "") or ""), "reasoning": str(got.get("reasoning", "") or ""),
                   "worker": insights.session.worker, "elapsed_s": round(secs, 4),
                   "failed": failure.public() if failure else None}
            insight_rows.append(row)
            if failure is not None:
                lines = flow.failed_line(failure)
                out(f"  {tid}: {failure.tag()} {lines[0]}")
                for extra in lines[1:]:
                    out(f"      {extra}")
                continue
            out(f"  {tid}: summary: {one_line(shown(row['summary']), 70)}  ({secs:.2f}s)")
            out(f"           root cause: {one_line(shown(row['root_cause']), 70)}")
        for tid in chosen:  # the durable session: the same calls, no rebuild code
            d_data, d_fail, d_secs = predict(insights_durable, durable_objs[1], {"ticket": TICKETS[tid][0]},
                                             step="insights_durable", item=tid)
            d_got = d_data or {}
            durable_rows.append({"id": tid, "summary": str(d_got.get("summary", "") or ""),
                                 "root_cause": str(d_got.get("root_cause", "") or ""),
                                 "worker": insights_durable.worker, "elapsed_s": round(d_secs, 4),
                                 "failed": d_fail.public() if d_fail else None})
            if d_fail is not None:
                out(f"  {tid} (durable session): {d_fail.tag()} {flow.failed_line(d_fail)[0]}")
                continue
            out(f"  {tid} (durable session): summary: {one_line(shown(d_got.get('summary')), 54)}  ({d_secs:.2f}s)")
        answered = [r for r in insight_rows if not r["failed"]]
        moved = insights_durable.worker != durable_before
        same = all(d["summary"] == r["summary"] and d["root_cause"] == r["root_cause"]
                   for d, r in zip(durable_rows, insight_rows) if not d["failed"] and not r["failed"])
        results["insights"] = {
            "tickets": chosen, "results": insight_rows, "recycled": recycle, "worker_before": before,
            "worker_after": insights.session.worker, "rehydrated": rehydration["fired"] > 0,
            "rehydrations": insights.rehydrations, "planned_rehydrations": rehydration["planned"],
            "warnings": rehydration["warnings"], "retried": retried,
            "retry_succeeded": None if retried is None else retried["answered"],
            "failed": len(insight_rows) - len(answered),
            "durable": {"session": insights_durable.id, "worker_before": durable_before,
                        "worker_after": insights_durable.worker, "moved": moved, "results": durable_rows,
                        "failed": sum(1 for d in durable_rows if d["failed"]), "same_answers": same},
        }
        if retried is not None:
            outcome = ("the retried call answered" if retried["answered"] else
                       f"the retried call failed too: {Failure(**retried['failed']).tag()}")
            out(f"  rehydrated: worker {short(before)} -> {short(insights.session.worker)}; "
                f"{outcome} ({retried['ticket']})")
        if moved:
            out(f"  durable: worker {short(durable_before)} -> {short(insights_durable.worker)}: the same LM and "
                "ChainOfThought answered after the recycle, moved with the session's checkpoint (no rebuild code)"
                + ("; the same answers as the rebuilt session" if same else "; answers DIFFER from the rebuilt session"))

        # ---------------------------------------------------------------- 4. scores + numpy
        out("\n[4] scores (0.5 category + 0.5 urgency; a failed call scores 0) and numpy statistics on analytics_pool")
        scores = []
        for row in triaged:
            _, category, urgency = TICKETS[row["id"]]
            row["expected"] = {"category": category, "urgency": urgency}
            row["score"] = 0.0 if row["failed"] else score(row, category, urgency)
            scores.append(row["score"])
            got = (f"failed: {Failure(**row['failed']).tag()}" if row["failed"]
                   else f"got {shown(row['category'])}/{shown(row['urgency'])}")
            out(f"  {row['id']}: {row['score']:.1f}  ({got}, expected {category}/{urgency})")
        stats = dict(analytics.eval("score_stats(scores)", {"scores": scores}))
        stats["scores"] = scores
        stats["worker"] = analytics.worker
        results["analytics"] = stats
        out(f"  numpy {stats['numpy']} on worker {short(analytics.worker)}: mean={stats['mean']:.3f} "
            f"std={stats['std']:.3f} p80={stats['p80']:.3f}")

        # ---------------------------------------------------------------- 5. GEPA
        gepa_result, optimized = run_gepa(flow, gepa, gepa_program, max_metric_calls, metric=metric,
                                          trainset=gepa_trainset(GEPA_TRAIN), default_budget=DEFAULT_MAX_METRIC_CALLS)
        results["gepa"] = gepa_result

        # ---------------------------------------------------------------- 6. holdout + restore
        out("\n[6] holdout: a ticket GEPA never saw, through the baseline (triage_1) and the optimized program "
            "(gepa); then " + ("its worker is recycled and the durable gepa session answers again"
                               if recycle else "the optimized program answers again"))
        (hid, (htext, hcat, hurg)), = HOLDOUT.items()
        base, base_fail, _ = predict(triage["triage_1"][0], triage["triage_1"][2], {"ticket": htext},
                                     step="holdout", item=f"{hid} baseline")
        opt, opt_fail, _ = predict(gepa, optimized, {"ticket": htext}, step="holdout", item=f"{hid} optimized")

        def graded(pred: dict[str, Any] | None, failure: Failure | None) -> dict[str, Any]:
            if failure is not None or pred is None:
                return {"category": "", "urgency": "", "action": "", "score": 0.0,
                        "failed": failure.public() if failure else None}
            return {**_labels(pred), "score": score(pred, hcat, hurg), "failed": None}

        hold: dict[str, Any] = {"id": hid, "ticket": htext, "expected": {"category": hcat, "urgency": hurg},
                                "baseline": graded(base, base_fail), "optimized": graded(opt, opt_fail)}
        out(f"  {hid}: \"{htext}\" (expected {hcat}/{hurg})")
        for label, g in (("baseline ", hold["baseline"]), ("optimized", hold["optimized"])):
            what = (f"{Failure(**g['failed']).tag()} ({g['failed']['error']})" if g["failed"]
                    else f"{shown(g['category'])}/{shown(g['urgency'])}")
            out(f"    {label}: {what}  score {g['score']:.1f}")
        gepa_worker = gepa.worker
        if recycle:
            out("  planned: recycle the gepa session's worker; the session is durable: its next call moves it, "
                "the optimized program with its instructions and demos, the LM and its history with it")
            recycled.add(gepa_worker)
            secs = recycle_and_wait(client, OPTIMIZER_POOL, gepa_worker, out=out)
            recycles.append({"step": "gepa", "pool": OPTIMIZER_POOL, "worker": gepa_worker, "seconds": round(secs, 3)})
        again, again_fail, _ = predict(gepa, optimized, {"ticket": htext}, step="holdout", item=f"{hid} after the move")
        restored_instr = gepa.eval("p.signature.instructions", {"p": optimized})
        hold["restored"] = {**graded(again, again_fail), "worker": gepa.worker, "session": gepa.id}
        both = again_fail is None and opt_fail is None
        hold["restored_matches"] = (both and _labels(again or {}) == _labels(opt or {})
                                    and restored_instr == gepa_result["instructions"])
        hold["recycled_worker"] = gepa_worker if recycle else None
        results["holdout"] = hold
        if not both:
            verdict = "not compared: an answer failed"
        elif hold["restored_matches"]:
            verdict = "same answer and instructions as before"
        else:
            verdict = "DIFFERS from the optimized program before"
        what = (f"{again_fail.tag()} ({again_fail.error})" if again_fail is not None
                else f"{shown((again or {}).get('category'))}/{shown((again or {}).get('urgency'))}")
        where = (f"on worker {short(gepa.worker)} (was {short(gepa_worker)}, no snapshot, no rebuild)" if recycle
                 else f"on worker {short(gepa.worker)}")
        out(f"    again    : {what}  {where}: {verdict}")

        # ---------------------------------------------------------------- 7. prompt inspection
        out(f"\n[7] prompt inspection: last {HISTORY_ENTRIES} lm.history entries per session "
            "(each entry comes back as data, its provider response as a ref)")
        history: dict[str, list[dict[str, Any]]] = {}
        sources: list[tuple[str, Any]] = [
            (name, s.eval(f"list(lm.history[-{HISTORY_ENTRIES}:])", {"lm": lm})) for name, (s, lm, _) in triage.items()]
        sources.append(("gepa", gepa.eval(f"list(lm.history[-{HISTORY_ENTRIES}:])", {"lm": gepa_lm})))
        for name, entries in sources:
            rows_h = format_history(list(entries), offline=spec.offline)
            history[name] = rows_h
            suffix = " (after its worker was recycled: the history moved with the session)" if (
                name == "gepa" and recycle) else ""
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
        if watch is not None:
            watch.stop()
        outages = watch.outages() if watch is not None else []
        results["lm_outages"] = outages
        wall = time.perf_counter() - started
        failures = flow.failures
        summary = {
            "sessions": len(results["sessions"]) + insights.rehydrations,
            "tickets_triaged": len(triaged), "tickets_failed": len(flow.by_step("triage")),
            "insights": len(answered), "insights_failed": len(flow.by_step("insights")),
            "rehydrations": insights.rehydrations,
            "recycles": len(recycles), "mean_score": stats["mean"], "std_score": stats["std"],
            "p80_score": stats["p80"], "gepa_metric_calls": gepa_result["metric_calls"],
            "gepa_budget": max_metric_calls, "gepa_baseline": gepa_result["baseline_score"],
            "gepa_optimized": gepa_result["optimized_score"], "gepa_failed": gepa_result["failed"] is not None,
            "gepa_failed_predictions": len(flow.by_step("gepa")) - (gepa_result["failed"] is not None),
            "holdout_restored_matches": hold["restored_matches"],
            "failed_calls": len(failures), "failures_by_type": _count_types(failures),
            "lm_outages": len(outages),
            "completed_with_failures": bool(failures), "wall_time_s": round(wall, 3),
        }
        results["failures"] = [f.public() for f in failures]
        results["recycles"] = recycles
        results["summary"] = summary
        out("\n[8] summary")
        out(f"  sessions opened: {summary['sessions']} (incl. {summary['rehydrations']} rehydrated), "
            f"tickets triaged: {summary['tickets_triaged']}, insights: {summary['insights']}"
            + (f", planned recycles: {summary['recycles']}" if recycle else ""))
        out(f"  triage score: mean {summary['mean_score']:.3f}, std {summary['std_score']:.3f}")
        calls = gepa_result["metric_calls"]
        out(f"  GEPA: {calls if calls is not None else '-'}/{max_metric_calls} metric calls, valset "
            f"{fmt(summary['gepa_baseline'])} -> {fmt(summary['gepa_optimized'])}")
        for step, total, what in (("triage", len(triaged), "tickets"), ("insights", len(chosen), "insights"),
                                  ("insights_durable", len(chosen), "durable insights"),
                                  ("holdout", 3, "holdout answers")):
            line = count_line(flow.by_step(step), total, what)
            if line:
                out(f"  {line}")
        if flow.by_step("gepa"):
            out(f"  GEPA: {len(flow.by_step('gepa'))} failed: {kinds_text(flow.by_step('gepa'))}")
        results["retried_attempts"] = [f.public() for f in flow.retried]
        summary["retried_attempts"] = len(flow.retried)
        if flow.retried:
            out(f"  dspy retried {len(flow.retried)} LM call attempt(s): {kinds_text(flow.retried)} "
                f"(--num-retries {spec.bounds.num_retries}); the calls' outcomes are counted above")
        if outages:
            down = sum(o["seconds"] for o in outages if o["seconds"] is not None)
            out(f"  LM server {watch.where if watch else ''} was down {len(outages)} time(s), {down:.1f}s in all "
                f"(dspy retried the calls it refused: --num-retries {spec.bounds.num_retries})")
        if failures:
            out(f"  completed with failures: {len(failures)} LM-backed call(s) failed and scored 0 "
                f"(exit {EXIT_COMPLETED_WITH_FAILURES}); details in --json under \"failures\"")
        else:
            out("  every LM call answered")
        out(f"  wall time: {wall:.2f}s" + (f"  [{OFFLINE_LABEL}]" if spec.offline else ""))
        return results
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if watch is not None:
            watch.stop()
        # closing a session releases its refs on the worker; when interrupted, quickly: a signal's
        # sender waits, and a stack this run started is stopped next anyway
        close_timeout = 1.0 if interrupted else 5.0
        for rh in rehydrators:
            _quiet_close(rh.session, close_timeout)
        for s in opened:
            _quiet_close(s, close_timeout)


def _count_types(failures: list[Failure]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in failures:
        counts[f.error] = counts.get(f.error, 0) + 1
    return counts


def _labels(pred: dict[str, Any]) -> dict[str, str]:
    return {k: str(pred.get(k, "")) for k in ("category", "urgency", "action")}


def _quiet_close(s: dspex.Session, timeout: float) -> None:
    try:
        s.close(timeout=timeout)
    except DspexError:
        pass


# --------------------------------------------------------------------------- script entry


def add_lm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=None, help="max_tokens of triage/insights calls (DSPEX_MAX_TOKENS)")
    p.add_argument("--reflection-max-tokens", type=int, default=None,
                   help="max_tokens of GEPA's reflection calls (DSPEX_REFLECTION_MAX_TOKENS)")
    p.add_argument("--lm-timeout", type=float, default=None, help="seconds per LM HTTP call (DSPEX_LM_TIMEOUT)")
    p.add_argument("--num-retries", type=int, default=None, help="retries of 429/5xx/dropped calls (DSPEX_LM_NUM_RETRIES)")
    p.add_argument("--lm-kwarg", action="append", default=[], metavar="K=V", help="extra dspy.LM keyword (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="do not use dspy's response cache")
    p.add_argument("--no-preflight", action="store_true", help="skip the LM endpoint check before the flow")


def main(argv: list[str] | None = None) -> int:
    """``python examples/flagship_multi_pool_gepa.py``: run against a running stack."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--endpoint", default=None, help="broker frontend (default: DSPEX_ENDPOINT or the run dir)")
    p.add_argument("--model", default=None, help="dspy/litellm model string (default: DSPEX_MODEL, else offline)")
    p.add_argument("--api-base", default=None, help="base URL of a local OpenAI-compatible server")
    p.add_argument("--lm-engine", default=None, choices=LM_ENGINES, help="dspy.LM engine (default: dspy's auto)")
    p.add_argument("--max-metric-calls", type=int, default=DEFAULT_MAX_METRIC_CALLS,
                   help=f"GEPA budget (default {DEFAULT_MAX_METRIC_CALLS}; the original flagship's is "
                        f"{ORIGINAL_MAX_METRIC_CALLS}, the baseline evaluation only)")
    p.add_argument("--no-recycle", action="store_true", help="skip the forced recycles")
    p.add_argument("--timeout", type=float, default=60.0, help="per-call timeout in seconds")
    p.add_argument("--json", action="store_true", help="print the results as one JSON document")
    add_lm_arguments(p)
    args = p.parse_args(argv)
    out: Out = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else print
    try:
        bounds = resolve_bounds(max_tokens=args.max_tokens, reflection_max_tokens=args.reflection_max_tokens,
                                lm_timeout=args.lm_timeout, num_retries=args.num_retries,
                                lm_kwargs=args.lm_kwarg, no_cache=args.no_cache)
        spec = resolve_lm(args.model, args.api_base, engine=args.lm_engine, bounds=bounds)  # before connecting
        checked = None
        if not args.no_preflight and not spec.offline:
            checked = preflight(spec, out)
        # the flagship shows its own view of the flow (--json: stdout is one JSON document), so
        # the programs' prints and logs stay in the worker log instead of reaching this process
        with dspex.connect(args.endpoint, timeout=args.timeout, forward_output=False) as client:
            client.ping(timeout=5)
            results = run_flagship(client, model=args.model, api_base=args.api_base,
                                   max_metric_calls=args.max_metric_calls, recycle=not args.no_recycle,
                                   out=out, engine=args.lm_engine, bounds=bounds)
            results["preflight"] = checked
    except Exception as err:  # dspex errors and the preflight's LMUnusable; anything else is a bug
        if not isinstance(err, DspexError) and getattr(err, "code", None) != "lm_unusable":
            raise
        message = getattr(err, "message", None) or str(err)
        print(f"error: {getattr(err, 'code', 'error')}: {one_line(message, 400)}", file=sys.stderr)
        if isinstance(err, dspex.Timeout) and "ping" in str(err):
            print("hint: start the stack first (supervisord -c supervisor.conf) or run `dspexctl flagship`",
                  file=sys.stderr)
        return exit_code_for(err)
    except KeyboardInterrupt:  # the calls in flight were cancelled on their workers on the way out
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        import json

        print(json.dumps(results, default=str))
    return EXIT_COMPLETED_WITH_FAILURES if results["summary"]["failed_calls"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
