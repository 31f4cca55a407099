"""The flagship against a misbehaving model server (tests/lmserver.py): every failure kind ends with
the flow completed, within its bounds, failures counted in the summary and the results (what
``--json`` prints), or with a clear early error for what cannot work.

One broker with triage_pool x2, optimizer_pool x1, analytics_pool x1 (no recycles: ``recycle=False``)
is shared by the module; each test gets its own server and its own model name, so dspy's cache of
one test never answers another.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Iterator

import pytest

import dspex
from tests.flagship_example import load_flagship
from tests.harness import Stack, wait_for
from tests.lmserver import LMServer, closed_port_base

pytestmark = pytest.mark.timeout(180)

flagship = load_flagship("dspex_flagship_failures_under_test")

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
def client(fstack: Stack, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[dspex.Client]:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("DSPEX_MODEL", raising=False)
    c = dspex.connect(fstack.frontend, timeout=30)
    try:
        yield c
    finally:
        c.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(fstack.logs())


@pytest.fixture
def server() -> Iterator[LMServer]:
    with LMServer() as srv:
        yield srv


def _run(client: dspex.Client, srv_base: str, name: str, **kwargs: Any) -> tuple[dict[str, Any], list[str], float]:
    lines: list[str] = []
    bounds = flagship.resolve_bounds(**kwargs.pop("bounds", {}), env={})
    t0 = time.monotonic()
    kwargs.setdefault("max_metric_calls", 3)
    res = flagship.run_flagship(client, model=f"openai/{name}", api_base=srv_base, recycle=False,
                                out=lines.append, bounds=bounds, **kwargs)
    elapsed = time.monotonic() - t0
    print("\n".join(lines))
    json.dumps(res)  # --json prints exactly this
    return res, lines, elapsed


def _completed(res: dict[str, Any], lines: list[str]) -> None:
    assert len(res["triage"]) == 5 and "[8] summary" in "\n".join(lines)
    assert res["summary"]["failed_calls"] == len(res["failures"])


def test_unparsable_answers_are_scored_zero_and_counted(client: dspex.Client, server: LMServer) -> None:
    server.set("normal", rules=(("Refund still", "unparsable"), ("CSV export", "unparsable")))
    res, lines, _ = _run(client, server.base, "unparsable-two")
    _completed(res, lines)
    failed = {r["id"]: r for r in res["triage"] if r["failed"]}
    assert set(failed) == {"INC-002", "INC-005"}
    for r in failed.values():
        assert r["score"] == 0.0 and r["failed"]["error"] == "AdapterParseError"
        assert r["failed"]["adapter"] == "JSONAdapter" and "instruction-tuned" in r["failed"]["hint"]
        assert r["failed"]["session"] and r["failed"]["worker"]
    assert res["summary"]["tickets_failed"] == 2 and res["summary"]["completed_with_failures"]
    assert res["summary"]["failures_by_type"]["AdapterParseError"] >= 2
    text = "\n".join(lines)
    assert "2/5 tickets failed: AdapterParseError \u00d72" in text
    assert re.search(r"INC-002 -> <unparsed> \(triage_2, [\d.]+s\) failed after [\d.]+s: AdapterParseError \(JSONAdapter\)",
                     text)
    assert "hint: the answer does not follow DSPy's field format" in text
    assert res["analytics"]["scores"][1] == 0.0 and res["analytics"]["scores"][4] == 0.0
    # every call carried the bounds
    assert {c.max_tokens for c in server.completions()} <= {flagship.resolve_bounds(env={}).max_tokens,
                                                             flagship.resolve_bounds(env={}).reflection_max_tokens}

    # the failed answers were not cached: a rerun with a healthy server asks it again and succeeds
    server.set("normal", rules=())
    before = len(server.completions())
    res2, lines2, _ = _run(client, server.base, "unparsable-two")
    assert not any(r["failed"] for r in res2["triage"]), res2["failures"]
    asked = [c for c in server.completions()[before:] if "Refund still" in json.dumps(c.body)]
    assert asked, "the failed ticket's answer was replayed from dspy's cache"
    # while the good answers of the first run were cached (no new request for INC-001)
    assert not [c for c in server.completions()[before:] if "Checkout fails" in json.dumps(c.body)]


def test_endless_answers_stop_at_max_tokens(client: dspex.Client, server: LMServer) -> None:
    server.set("normal", rules=(("Refund still", "endless"),))
    res, lines, elapsed = _run(client, server.base, "endless-capped", bounds={"max_tokens": 40})
    _completed(res, lines)
    endless = server.completions("endless")
    assert endless and all(c.max_tokens == 40 and c.tokens == 40 for c in endless)
    assert [r["id"] for r in res["triage"] if r["failed"]] == ["INC-002"]
    assert "1/5 tickets failed: AdapterParseError \u00d71" in "\n".join(lines)
    assert elapsed < 60


def test_never_ending_answer_is_cut_by_the_lm_timeout(client: dspex.Client, server: LMServer) -> None:
    """No token cap on the server side: the LM timeout ends the call, the server sees the hang-up."""
    server.set("normal", rules=(("Refund still", "endless"),), tokens_per_s=50)
    res, lines, elapsed = _run(client, server.base, "endless-timeout",
                               bounds={"lm_timeout": 1.5, "num_retries": 0, "max_tokens": 100_000})
    _completed(res, lines)
    (row,) = [r for r in res["triage"] if r["failed"]]
    assert row["id"] == "INC-002" and row["failed"]["error"] == "LMTransportError"
    assert "timed out" in row["failed"]["message"] and "--lm-timeout 1.5s" in row["failed"]["hint"]
    assert "1/5 tickets failed: LMTransportError \u00d71" in "\n".join(lines)
    # no orphaned generation: the server sees every cut call hang up (it checks every 50 ms)
    wait_for(lambda: all(c.hung_up for c in server.completions("endless")), timeout=15, what="hang-ups")
    assert elapsed < 90


def test_slow_answers_show_progress_and_durations(client: dspex.Client, server: LMServer) -> None:
    server.set("normal", rules=(("Checkout fails", "slow"),), delay=2.5)
    res, lines, _ = _run(client, server.base, "slow-one", progress_every=1.0)
    _completed(res, lines)
    assert not res["failures"]
    waiting = [ln for ln in lines if "INC-001 on triage_1:" in ln and "waiting on openai/slow-one at " in ln]
    assert waiting, "no progress line while the slow call waited"
    (row,) = [r for r in res["triage"] if r["id"] == "INC-001"]
    assert row["elapsed_s"] >= 2.5
    assert any(re.search(r"INC-001 -> \S+/\S+ \(triage_1, [2-9]\.\d\ds\)", ln) for ln in lines)


@pytest.mark.parametrize("mode,status", [("rate_limit", 429), ("error", 500)])
def test_transient_errors_are_retried_and_succeed(client: dspex.Client, server: LMServer, mode: str,
                                                  status: int) -> None:
    server.set(mode, fail_first=3)
    res, lines, _ = _run(client, server.base, f"transient-{mode}", bounds={"num_retries": 3})
    _completed(res, lines)
    assert not res["failures"] and res["summary"]["completed_with_failures"] is False
    assert [c.status for c in server.completions()].count(status) == 3


def test_rate_limit_past_the_retries_is_a_counted_failure(client: dspex.Client, server: LMServer) -> None:
    server.set("normal", rules=(("Refund still", "rate_limit"),), fail_first=1000)
    res, lines, _ = _run(client, server.base, "ratelimited", bounds={"num_retries": 0})
    _completed(res, lines)
    (row,) = [r for r in res["triage"] if r["failed"]]
    assert row["id"] == "INC-002" and "rate" in row["failed"]["message"].lower()


def test_lm_slower_than_the_call_timeout_is_exit_5_with_what_to_change(fstack: Stack, server: LMServer,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The LM's own timeout is overridden to be longer than dspex's call timeout (derived from
    --lm-timeout): the call times out in dspex and the error names where and what to change."""
    from click.testing import CliRunner
    from types import SimpleNamespace

    import dspexctl.flagship as cli

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.set("normal", rules=(("Checkout fails", "slow"),), delay=60)
    obj = SimpleNamespace(endpoint=fstack.frontend, supervisor_conf=None, timeout=5.0)
    args = ["--model", "openai/too-slow", "--api-base", server.base, "--no-recycle", "--no-preflight",
            "--lm-timeout", "0.5", "--num-retries", "0", "--lm-kwarg", "timeout=120", "--json"]
    t0 = time.monotonic()
    result = CliRunner().invoke(cli.flagship, args, obj=obj)
    print(result.stderr)
    assert result.exit_code == 5, (result.exit_code, result.stderr, result.exception)
    assert time.monotonic() - t0 < 120
    err = json.loads(result.stdout)["error"]
    assert err["exit"] == 5 and err["code"] == "timeout"
    msg = err["message"]
    for part in ("triage INC-001", "on session ", "(worker ", "triage_pool", "openai/too-slow at " + server.base,
                 "--lm-timeout"):
        assert part in msg, (part, msg)
    assert "unreachable" not in msg.lower()
    server.close()  # the worker's HTTP call ends with the server, so the worker is free again


def test_cli_completed_with_failures_exit_code_and_json(fstack: Stack, server: LMServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner
    from types import SimpleNamespace

    import dspexctl.flagship as cli

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.set("normal", rules=(("Refund still", "unparsable"),))
    obj = SimpleNamespace(endpoint=fstack.frontend, supervisor_conf=None, timeout=30.0)
    args = ["--model", "openai/cli-failures", "--api-base", server.base, "--no-recycle", "--json",
            "--max-tokens", "300", "--lm-timeout", "20"]
    result = CliRunner().invoke(cli.flagship, args, obj=obj)
    print(result.stderr)
    assert result.exit_code == 3, (result.stderr, result.exception)
    res = json.loads(result.stdout)
    assert res["summary"]["tickets_failed"] == 1 and res["failures"][0]["error"] == "AdapterParseError"
    assert res["lm"]["bounds"]["max_tokens"] == 300 and res["lm"]["bounds"]["timeout_s"] == 20
    assert res["preflight"]["ok"] is True and res["preflight"]["warnings"] == []
    assert "bounds: max_tokens 300 (triage/insights), 2048 (GEPA reflection); LM timeout 20s" in result.stderr
    assert "preflight: openai/cli-failures at" in result.stderr
    # this test broker's pools keep the default queue_timeout (30 s): said before it bites
    assert "WARNING: triage_pool's queue_timeout 30s is shorter than one LM call may take (78s)" in result.stderr


def test_refused_connection_is_an_early_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import dspexctl.flagship as cli

    def no_stack(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the stack must not be started when the LM endpoint refuses connections")

    monkeypatch.setattr(cli, "_ensure_stack", no_stack)
    monkeypatch.setattr(cli, "_reachable", lambda *a, **k: False)
    base = closed_port_base()
    result = CliRunner().invoke(cli.flagship, ["--model", "openai/nobody", "--api-base", base])
    assert result.exit_code == 6, (result.stderr, result.exception)
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("Error: lm_unusable: nothing is listening at " + base)
    assert "connection refused" in err and "--api-base" in err and "Traceback" not in result.stderr


def test_preflight_warns_about_unparsable_truncated_and_empty(server: LMServer) -> None:
    from examples.flagship_preflight import preflight

    def check(mode: str, **bounds: Any) -> tuple[dict[str, Any], str]:
        server.set(mode)
        lines: list[str] = []
        spec = flagship.resolve_lm("openai/pre", server.base, env={}, bounds=flagship.resolve_bounds(**bounds, env={}))
        return preflight(spec, lines.append), "\n".join(lines)

    report, text = check("normal")
    assert report["ok"] and not report["warnings"] and "the LM answers and DSPy parses it" in text
    assert "lists loopback" in text
    report, text = check("unparsable")
    assert not report["ok"] and "AdapterParseError" in text and "instruction-tuned" in text
    report, text = check("endless", max_tokens=20)
    assert report["finish_reason"] == "length" and "finish_reason=length" in text and "chat template" in text
    report, text = check("empty")
    assert "empty" in text and "system message" in text


def test_failed_reflection_is_counted_and_never_replayed_from_the_cache(client: dspex.Client,
                                                                         server: LMServer) -> None:
    """GEPA's reflection answers do not parse: GEPA's own failure lines reach the console, the
    outcomes are counted, the hint does not blame the budget, and every reflection call is a real
    request (the reflection LM never uses dspy's cache)."""
    server.set("normal", rules=(("current_instruction", "unparsable"),))
    res, lines, _ = _run(client, server.base, "reflection-fails", max_metric_calls=12)
    _completed(res, lines)
    g = res["gepa"]
    assert g["reflection_calls"] >= 2 and not g["improved"]
    r = g["reflection"]
    assert r["failed"] + r["no_proposal"] >= 1 and r["proposed"] == 0, r
    text = "\n".join(lines)
    assert f"reflection: 0 proposed, 0 accepted, 0 rejected, {r['failed']} failed" in text
    assert "instructions unchanged: GEPA reflected" in text and "raise --max-metric-calls" not in text
    asked = [c for c in server.completions() if "current_instruction" in json.dumps(c.body)]
    assert len(asked) == g["reflection_calls"], (len(asked), g["reflection_calls"])
    assert g["within_budget"] or f"OVER budget by {g['overshoot']}" in text


def test_endless_stream_stops_at_max_tokens(server: LMServer) -> None:
    import urllib.request

    server.set("endless")
    body = json.dumps({"model": "m", "stream": True, "max_tokens": 25,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(server.base + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
        events = [ln[6:] for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(text.split()) == 25 and chunks[-1]["choices"][0]["finish_reason"] == "length"
