"""``dspexctl flagship`` against a misbehaving model server (tests/lmserver.py), as a subprocess:
every failure kind ends with the flow completed within its bounds, every line of the report true
(what failed, why, what to do), the exit code saying whether every LM call answered; or with a
clear early error for what cannot work.

One broker with triage_pool x2, optimizer_pool x1, analytics_pool x1 (no recycles: ``--no-recycle``)
is shared by the module; each test gets its own server and its own model name, so dspy's cache of
one test never answers another.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dspex
from tests.flagship_example import FlagshipRun, cli_env, run_flagship
from tests.harness import PY, REPO, Stack, wait_for
from tests.lmserver import LMServer, closed_port_base

pytestmark = pytest.mark.timeout(240)

POOLS = {"triage_pool:strict_queue": 2, "optimizer_pool:strict_queue": 1, "analytics_pool:hint": 1}


@pytest.fixture(scope="module")
def fstack() -> Iterator[Stack]:
    root = tempfile.mkdtemp(prefix="dxff", dir="/tmp")
    s = Stack(root)
    s.heartbeat, s.liveness = 0.5, 6
    s.env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
                 DSPY_CACHEDIR=os.path.join(root, "dspy-cache"))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        s.env.pop(var, None)
    try:
        s.start_broker(*POOLS)
        for spec, n in POOLS.items():
            for _ in range(n):
                s.start_worker(spec.split(":")[0])
        for spec, n in POOLS.items():
            s.wait_workers(spec.split(":")[0], n, timeout=90)
        yield s
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def stack(fstack: Stack, request: pytest.FixtureRequest) -> Iterator[Stack]:
    for spec, n in POOLS.items():  # a test that stopped mid-call leaves every worker free again
        fstack.wait_workers(spec.split(":")[0], n, timeout=60)
    yield fstack
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(fstack.logs())


def _server(name: str, **settings: Any) -> LMServer:
    return LMServer(models=(name,), **settings)


def _args(srv: LMServer, name: str, *extra: str) -> list[str]:
    return ["--model", f"openai/{name}", "--api-base", srv.base, "--no-recycle", "--max-metric-calls", "3", *extra]


def _run(stack: Stack, srv: LMServer, name: str, *extra: str, env: dict[str, str] | None = None,
         timeout: float = 200.0) -> tuple[int, dict[str, Any], str]:
    code, run = run_flagship(_args(srv, name, *extra), group_args=["--endpoint", stack.frontend], env=env,
                             timeout=timeout)
    res = run.json
    if "summary" in res:
        assert res["summary"]["failed_calls"] == len(res["failures"])
        assert len(res["triage"]) == 5 and "[8] summary" in run.err
        assert code == (9 if res["failures"] else 0), (code, res["failures"])  # 0 only when every LM call answered
        assert ("every LM call answered" in run.err) is (code == 0)
    return code, res, run.err


def _tickets(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in res["triage"]}


def test_unparsable_answers_are_scored_zero_counted_and_never_cached(stack: Stack) -> None:
    with _server("unparsable-two", rules=(("Refund still", "unparsable"), ("CSV export", "unparsable"))) as srv:
        code, res, err = _run(stack, srv, "unparsable-two", "--max-tokens", "300", "--lm-timeout", "20")
        failed = {k: r for k, r in _tickets(res).items() if r["failed"]}
        assert set(failed) == {"INC-002", "INC-005"}
        for r in failed.values():
            assert r["score"] == 0.0 and r["failed"]["error"] == "AdapterParseError"
            assert r["failed"]["kind"] == "unparsed" and r["failed"]["adapter"] == "JSONAdapter"
            assert "instruction-tuned" in r["failed"]["hint"] and r["failed"]["session"] and r["failed"]["worker"]
        assert res["summary"]["tickets_failed"] == 2 and res["summary"]["completed_with_failures"]
        assert "2/5 tickets failed: AdapterParseError \u00d72" in err
        assert re.search(r"INC-002 -> <unparsed> \(triage_2, [\d.]+s\) failed after [\d.]+s: AdapterParseError "
                         r"\(JSONAdapter\)", err)
        assert "hint: the answer does not follow DSPy's field format" in err
        assert res["analytics"]["scores"][1] == 0.0 and res["analytics"]["scores"][4] == 0.0
        assert res["lm"]["bounds"]["max_tokens"] == 300 and res["lm"]["bounds"]["timeout_s"] == 20
        assert res["preflight"]["ok"] is True and res["preflight"]["warnings"] == []
        assert "preflight: openai/unparsable-two at" in err and "lists unparsable-two" in err
        assert "token cap sent as max_tokens and max_completion_tokens" in err
        # this test broker's pools keep the default queue_timeout (30 s): said before it bites
        assert "WARNING: triage_pool's queue_timeout 30s is shorter than one LM call may take (78s)" in err
        # every call carried the cap in both fields
        assert {json.dumps(c.fields, sort_keys=True) for c in srv.completions()} <= {
            json.dumps({"max_completion_tokens": n, "max_tokens": n}, sort_keys=True) for n in (300, 2048)}

        # the failed answers were not cached: a rerun with a healthy server asks it again and succeeds
        srv.set("normal", rules=())
        before = len(srv.completions())
        code, res2, _ = _run(stack, srv, "unparsable-two", "--max-tokens", "300", "--lm-timeout", "20",
                             "--no-preflight")
        assert code == 0 and not any(r["failed"] for r in res2["triage"]), res2["failures"]
        asked = [c for c in srv.completions()[before:] if "Refund still" in json.dumps(c.body)]
        assert asked, "the failed ticket's answer was replayed from dspy's cache"
        # while the good answers of the first run were cached (no new request for INC-001)
        assert not [c for c in srv.completions()[before:] if "Checkout fails" in json.dumps(c.body)]


@pytest.mark.parametrize("engine,honours", [("auto", ("max_tokens",)), ("litellm", ("max_completion_tokens",))],
                         ids=["auto-engine+server-reads-max_tokens", "litellm+server-reads-max_completion_tokens"])
def test_the_token_cap_reaches_a_server_that_reads_only_one_field(stack: Stack, engine: str,
                                                                   honours: tuple[str, ...]) -> None:
    """dspy's native engine names the cap max_completion_tokens, litellm max_tokens; a server that
    reads only the other one (llama-cpp-python: max_tokens) would generate to its context. The
    flagship sends both: an answer that never ends stops at the cap on either server."""
    name = f"strict-{engine}"
    with _server(name, rules=(("Refund still", "endless"),), honours=honours) as srv:
        code, res, err = _run(stack, srv, name, "--lm-engine", engine, "--max-tokens", "40", "--no-preflight")
        endless = srv.completions("endless")
        assert endless and all(c.max_tokens == 40 and c.tokens == 40 for c in endless), endless
        assert all(c.max_tokens is not None for c in srv.completions())  # every call bounded
        assert [r["id"] for r in res["triage"] if r["failed"]] == ["INC-002"]
        assert "1/5 tickets failed: AdapterParseError \u00d71" in err and code == 9
        assert "a truncated answer needs a larger --max-tokens (now 40)" in err


def test_a_never_ending_answer_is_cut_by_the_lm_timeout_and_reported_as_a_timeout(stack: Stack) -> None:
    """No token cap anywhere: the LM timeout ends the call, the report says timed out (not unparsed),
    and the server sees the hang-up (no orphaned generation)."""
    with _server("endless-timeout", rules=(("Refund still", "endless"),), tokens_per_s=50) as srv:
        _, res, err = _run(stack, srv, "endless-timeout", "--lm-timeout", "1.5", "--num-retries", "0",
                              "--max-tokens", "100000", "--no-preflight")
        (row,) = [r for r in res["triage"] if r["failed"]]
        f = row["failed"]
        assert row["id"] == "INC-002" and f["kind"] == "timed out" and "timed out" in f["message"].lower()
        assert f["error"] in ("LMTimeoutError", "LMTransportError") and f["then"] is None
        assert "--lm-timeout 1.5s" in f["hint"]
        assert re.search(r"INC-002 -> <timed out> \(triage_2, [\d.]+s\) failed after [\d.]+s: LMT", err)
        assert re.search(r"1/5 tickets failed: LMT\w+Error \(timed out\) \u00d71", err)
        assert "<unparsed>" not in err
        wait_for(lambda: all(c.hung_up for c in srv.completions("endless")), timeout=15, what="hang-ups")


def test_a_retried_timeout_is_the_cause_of_the_parse_error_that_followed(stack: Stack) -> None:
    """The first attempt times out and dspy retries it; the retry's answer does not parse: the report
    names the timeout as the cause, then the parse error, and counts the retried attempt."""
    rules = (("Refund still", ("slow", "unparsable")),)
    with _server("timeout-then-parse", rules=rules, delay=30) as srv:
        _, res, err = _run(stack, srv, "timeout-then-parse", "--lm-timeout", "1.5", "--num-retries", "1",
                              "--no-preflight")
        (row,) = [r for r in res["triage"] if r["failed"]]
        f = row["failed"]
        assert row["id"] == "INC-002" and f["kind"] == "timed out", f
        assert f["then"].startswith("AdapterParseError") and f["adapter"] == "JSONAdapter"
        assert "; then AdapterParseError" in err and "INC-002 -> <timed out>" in err
        retried = [r for r in res["retried_attempts"] if r["item"] == "INC-002"]
        assert len(retried) == 1 and retried[0]["kind"] == "timed out"
        assert re.search(r"dspy retried \d+ LM call attempt\(s\): LMT\w+Error \(timed out\)", err)


def test_slow_answers_show_progress_and_durations(stack: Stack) -> None:
    with _server("slow-one", rules=(("Checkout fails", "slow"),), delay=2.5) as srv:
        code, res, err = _run(stack, srv, "slow-one", "--no-preflight", env=cli_env(DSPEX_PROGRESS_EVERY="1"))
        assert code == 0 and not res["failures"]
        assert re.search(r"INC-001 on triage_1: \d+s, waiting on openai/slow-one at ", err), err
        assert _tickets(res)["INC-001"]["elapsed_s"] >= 2.5
        assert re.search(r"INC-001 -> \S+/\S+ \(triage_1, [2-9]\.\d\ds\)", err)


@pytest.mark.parametrize("mode,status", [("rate_limit", 429), ("error", 500)])
def test_transient_errors_are_retried_and_succeed(stack: Stack, mode: str, status: int) -> None:
    with _server(f"transient-{mode}", mode=mode, fail_first=3) as srv:
        code, res, _ = _run(stack, srv, f"transient-{mode}", "--num-retries", "3", "--no-preflight")
        assert code == 0 and not res["failures"] and res["summary"]["completed_with_failures"] is False
        assert [c.status for c in srv.completions()].count(status) == 3


def test_rate_limit_past_the_retries_is_a_counted_failure(stack: Stack) -> None:
    with _server("ratelimited", rules=(("Refund still", "rate_limit"),), fail_first=1000) as srv:
        code, res, err = _run(stack, srv, "ratelimited", "--num-retries", "0", "--no-preflight")
        (row,) = [r for r in res["triage"] if r["failed"]]
        assert row["id"] == "INC-002" and row["failed"]["kind"] == "rate limited" and code == 9
        assert "INC-002 -> <rate limited>" in err and "raise --num-retries" in err


def test_a_refused_connection_is_labelled_refused_and_advice_names_the_server(stack: Stack) -> None:
    """Nothing listens (and --no-preflight let it through): every prediction fails as refused, the
    report says so, and no line suggests a bigger GEPA budget, which cannot help."""
    base = closed_port_base()
    code, run = run_flagship(["--model", "openai/nobody", "--api-base", base, "--no-recycle", "--no-preflight",
                              "--num-retries", "0"], group_args=["--endpoint", stack.frontend])
    res, err = run.json, run.err
    assert code == 9 and all(r["failed"]["kind"] == "connection refused" for r in res["triage"])
    assert "INC-001 -> <connection refused>" in err and "<unparsed>" not in err
    assert f"nothing answers at {base}: start the model server or fix --api-base" in err
    assert "raise --max-metric-calls" not in err
    assert "a larger budget cannot help" in err and res["summary"]["gepa_failed_predictions"] > 0
    assert re.search(r"! LM server 127\.0\.0\.1:\d+ is down \(Connection refused\)", err)


def test_nothing_parsed_gets_advice_about_the_lm_not_the_budget(stack: Stack) -> None:
    with _server("never-parses", mode="unparsable") as srv:
        code, res, err = _run(stack, srv, "never-parses", "--no-preflight", "--max-metric-calls", "6")
        assert code == 9 and all(r["failed"] for r in res["triage"])
        g = res["gepa"]
        assert g["failed_predictions"] and {f["kind"] for f in g["failed_predictions"]} == {"unparsed"}
        assert f"{len(g['failed_predictions'])} of GEPA's {g['predictions']} predictions failed" in err
        assert "fix the LM first" in err and "raise --max-metric-calls" not in err


def test_failed_reflection_is_counted_exits_9_and_is_never_replayed_from_the_cache(stack: Stack) -> None:
    """GEPA's reflection answers do not parse: GEPA's own failure lines reach the console, the
    failures count (exit 9: not every LM call answered), the advice names the LM, and every
    reflection call is a real request (the reflection LM never uses dspy's cache)."""
    with _server("reflection-fails", rules=(("current_instruction", "unparsable"),)) as srv:
        code, res, err = _run(stack, srv, "reflection-fails", "--max-metric-calls", "12", "--no-preflight")
        g = res["gepa"]
        assert g["reflection_calls"] >= 2 and not g["improved"]
        r = g["reflection"]
        assert r["failed"] + r["no_proposal"] >= 1 and r["proposed"] == 0, r
        assert code == 9 and g["failed_predictions"] and all(f["step"] == "gepa" for f in res["failures"])
        assert {f["item"].split()[0] for f in g["failed_predictions"]} == {"reflection"}
        assert f"reflection: 0 proposed, 0 accepted, 0 rejected, {r['failed']} failed" in err
        assert "raise --max-metric-calls" not in err and "fix the LM first" in err
        assert re.search(r"GEPA: \d+ failed: AdapterParseError", err)
        asked = [c for c in srv.completions() if "current_instruction" in json.dumps(c.body)]
        assert len(asked) == g["reflection_calls"], (len(asked), g["reflection_calls"])
        assert g["within_budget"] or f"OVER budget by {g['overshoot']}" in err


def test_a_server_down_mid_run_is_reported_and_recovered(stack: Stack) -> None:
    """The model server stops and comes back while the flow runs: dspy's retries recover the calls,
    and the report says the server was down and for how long."""
    srv = _server("down-and-up")
    again: LMServer | None = None
    run = FlagshipRun(_args(srv, "down-and-up", "--no-preflight", "--num-retries", "5"),
                      group_args=["--endpoint", stack.frontend])
    try:
        run.wait_line("[1] sessions")
        srv.close()
        run.wait_line("is down (Connection refused)", timeout=30)
        again = LMServer(port=srv.port, models=("down-and-up",))
        code = run.wait(200)
    finally:
        run.close()
        print(run.err)
        srv.close()
        if again is not None:
            again.close()
    res = run.json
    assert code == 0 and not res["failures"] and len(res["lm_outages"]) == 1, res.get("failures")
    assert res["lm_outages"][0]["seconds"] > 0
    assert re.search(r"LM server 127\.0\.0\.1:\d+ accepts connections again after [\d.]+s down", run.err)
    assert "was down 1 time(s)" in run.err and "every LM call answered" in run.err


def test_lm_slower_than_the_call_timeout_is_exit_10_with_what_to_change(stack: Stack) -> None:
    """The LM's own timeout is overridden to be longer than dspex's call timeout (derived from
    --lm-timeout): the call times out in dspex, the error names where and what to change, and the
    other call in flight is cancelled on its worker."""
    with _server("too-slow", rules=(("Checkout fails", "slow"), ("Refund still", "slow")), delay=60) as srv:
        code, run = run_flagship(_args(srv, "too-slow", "--no-preflight", "--lm-timeout", "0.5", "--num-retries", "0",
                                       "--lm-kwarg", "timeout=120"), group_args=["--endpoint", stack.frontend])
        assert code == 10, run.err
        assert run.seconds < 120
        err = run.json["error"]
        assert err["exit"] == 10 and err["code"] == "timeout"
        for part in ("triage INC-00", "on session ", "(worker ", "triage_pool", "openai/too-slow at " + srv.base,
                     "--lm-timeout"):
            assert part in err["message"], (part, err["message"])
        assert "unreachable" not in err["message"].lower()
        # both slow calls hung up: the one that timed out and the one cancelled with it
        wait_for(lambda: len(srv.completions("slow")) == 2 and all(c.hung_up for c in srv.completions("slow")),
                 timeout=20, what="both slow calls stopped on their workers")


def test_sighup_cancels_the_calls_in_flight_on_a_running_stack(stack: Stack) -> None:
    """SIGHUP (the terminal went away) on a run against a running stack: exit 129, the two LM calls in
    flight stopped on their workers at once (the server sees them hang up), the workers free."""
    with _server("hung-up", mode="slow", delay=120) as srv:
        run = FlagshipRun(_args(srv, "hung-up", "--no-preflight", "--lm-timeout", "150"),
                          group_args=["--endpoint", stack.frontend])
        try:
            run.wait_line("[2] triage")
            wait_for(lambda: len(srv.completions("slow")) == 2, timeout=30, what="two LM calls in flight")
            sent = run.signal(signal.SIGHUP)
            wait_for(lambda: all(c.hung_up for c in srv.completions("slow")), timeout=5, what="calls cancelled")
            cancelled_after = time.monotonic() - sent
            code = run.wait(30)
        finally:
            run.close()
            print(run.err)
        assert code == 129 and run.json["error"] == {"code": "interrupted", "message": "interrupted by SIGHUP",
                                                     "exit": 129}
        assert cancelled_after < 3.0, cancelled_after
        assert "interrupted: cancelled 2 call(s) in flight on their workers" in run.err
        assert "stopping the stack" not in run.err  # it started none
        with dspex.connect(stack.frontend, timeout=10) as dx:  # both triage workers answer at once
            for s in (dx.session("triage_pool"), dx.session("triage_pool")):
                assert s.eval("1 + 1", timeout=5) == 2


def test_refused_connection_is_an_early_clear_error_before_anything_starts(short_tmp: str) -> None:
    """The preflight: nothing listens at --api-base -> exit 11 before any stack is started."""
    base = closed_port_base()
    conf = Path(short_tmp, "supervisor.conf")
    shutil.copy(Path(__file__).resolve().parents[1] / "supervisor.conf", conf)
    code, run = run_flagship(["--model", "openai/nobody", "--api-base", base],
                             group_args=["--supervisor-conf", str(conf)], env=cli_env(os.path.join(short_tmp, "r")))
    assert code == 11, run.err
    err = run.err.strip().splitlines()[-1]
    assert err.startswith("Error: lm_unusable: nothing is listening at " + base)
    assert "connection refused" in err and "--api-base" in err and "Traceback" not in run.err
    assert not Path(short_tmp, "run", "supervisord.pid").exists() and "starting" not in run.err


@pytest.mark.parametrize("served,mode,expected", [
    (None, "empty", "answered the probe with nothing"),
    (None, "placeholder", "answered the probe with '{category}'"),
    ("qwen2.5-0.5b", "normal", ("does not serve model 'pre': its /models lists qwen2.5-0.5b (use --model "
                                "openai/qwen2.5-0.5b")),
], ids=["empty", "placeholder", "model-not-served"])
def test_the_preflight_refuses_an_lm_that_cannot_do_the_task(short_tmp: str, served: str | None, mode: str,
                                                             expected: str) -> None:
    with LMServer(mode, models=(served,) if served else ("pre",)) as srv:
        code, run = run_flagship(["--model", "openai/pre", "--api-base", srv.base],
                                 group_args=["--endpoint", f"ipc://{short_tmp}/nobody.sock"])
    assert code == 11, run.err
    assert run.json["error"]["code"] == "lm_unusable" and expected in run.json["error"]["message"]
    assert "no stack answers" not in run.err  # it stopped before looking for one


PREFLIGHT = """
import json, sys
from flagship_lm import resolve_bounds, resolve_lm
from flagship_preflight import LMUnusable, preflight

lines = []
spec = resolve_lm("openai/pre", sys.argv[1], env={}, bounds=resolve_bounds(env={}, **json.loads(sys.argv[2])))
try:
    report = preflight(spec, lines.append)
except LMUnusable as err:
    report = {"unusable": err.message}
print(json.dumps({"report": report, "text": "\\n".join(lines)}, default=str))
"""


@pytest.mark.slow  # it starts processes without a fixture conftest knows
def test_preflight_warns_about_unparsable_and_truncated_answers() -> None:
    """Answers that degrade the run but do not stop it are warnings with their likely cause; a server
    that reads neither token field is refused. (The preflight runs in a child process, as in the
    command: litellm keeps clients alive in the process that calls it.)"""

    def check(srv: LMServer, mode: str, **bounds: Any) -> tuple[dict[str, Any], str]:
        srv.set(mode)
        done = subprocess.run([PY, "-c", PREFLIGHT, srv.base, json.dumps(bounds)], capture_output=True, text=True, check=False,
                              timeout=120, env=cli_env(PYTHONPATH=f"{REPO / 'examples'}{os.pathsep}{REPO}"))
        assert done.returncode == 0, done.stderr[-3000:]
        got = json.loads(done.stdout)
        return got["report"], got["text"]

    with LMServer(models=("pre",)) as srv:
        report, text = check(srv, "normal")
        assert report["ok"] and not report["warnings"] and "the LM answers and DSPy parses it" in text
        assert "lists pre" in text
        report, text = check(srv, "unparsable")
        assert not report["ok"] and "AdapterParseError (unparsed)" in text and "instruction-tuned" in text
        report, text = check(srv, "endless", max_tokens=20)
        assert report["finish_reason"] == "length" and "finish_reason=length" in text and "chat template" in text
    with LMServer("endless", models=("pre",), honours=()) as deaf:  # reads neither field: runs to its context
        deaf.set(cap_tokens=200)
        report, _ = check(deaf, "endless", max_tokens=20)
        assert "ignored the token cap: one answer took 200 tokens with max_tokens 20" in report["unusable"]


def test_endless_stream_stops_at_max_tokens() -> None:
    import urllib.request

    with LMServer("endless") as srv:
        body = json.dumps({"model": "m", "stream": True, "max_tokens": 25,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        req = urllib.request.Request(srv.base + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            events = [ln[6:] for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(text.split()) == 25 and chunks[-1]["choices"][0]["finish_reason"] == "length"
