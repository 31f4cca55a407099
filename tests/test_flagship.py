"""``dspexctl flagship`` end to end, as a subprocess: offline and through a loopback OpenAI-compatible
server (dspy's real provider path), against a running stack and starting its own under supervisord;
and what Ctrl-C, SIGTERM, SIGHUP and error exits leave behind (nothing it started).

One broker + 3 pools x 2 workers is shared by the runs against a running stack (starting 6 dspy
workers on 2 cores costs ~10-20 s). The flow recycles optimizer workers; with no supervisord there,
a small respawner thread plays ``autorestart=true``: it starts a new worker whenever one it started
exits. The tests marked slow start the shipped supervisor.conf (a private copy) through the command.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from offline_lm import OFFLINE_LABEL

import dspex
from tests.flagship_example import (
    EXAMPLE,
    FlagshipRun,
    cli_env,
    load_flagship,
    run_flagship,
)
from tests.harness import PY, REPO, Stack, free_port, pid_alive, wait_for
from tests.harness.procs import descendants
from tests.harness.supervisord import link_launcher
from tests.lmserver import LMServer

pytestmark = pytest.mark.timeout(300)

flagship = load_flagship("dspex_flagship_example_under_test")

POOL_SPECS = ("triage_pool:strict_queue", "optimizer_pool:strict_queue", "analytics_pool:hint")
POOL_SIZE = 2
VENDORED = re.compile(r"\b(dspy\._vendor|litellm\.types|lm15\.types)\b")


class Respawner:
    """supervisord's ``autorestart=true`` in miniature: keep POOL_SIZE live workers per pool."""

    def __init__(self, stack: Stack, pools: list[str]) -> None:
        self.stack = stack
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {p: [] for p in pools}
        self.respawned = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="respawner", daemon=True)

    def fill(self, counting: bool = False) -> None:
        for pool, procs in self.procs.items():
            procs[:] = [p for p in procs if p.poll() is None]
            while len(procs) < POOL_SIZE and not self._stop.is_set():
                procs.append(self.stack.start_worker(pool))
                self.respawned += counting

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self.fill(counting=True)

    def start(self) -> None:
        self.fill()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def fstack() -> Iterator[tuple[Stack, Respawner]]:
    root = tempfile.mkdtemp(prefix="dxf", dir="/tmp")
    s = Stack(root)
    s.heartbeat, s.liveness = 0.5, 6  # 6 dspy imports on 2 cores: do not expire a starved worker
    s.env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
                 DSPY_CACHEDIR=os.path.join(root, "dspy-cache"))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        s.env.pop(var, None)
    respawner = Respawner(s, [spec.split(":")[0] for spec in POOL_SPECS])
    try:
        s.start_broker(*POOL_SPECS)
        respawner.start()
        for pool in respawner.procs:
            s.wait_workers(pool, POOL_SIZE, timeout=60)
        yield s, respawner
    finally:
        respawner.stop()
        s.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def running(fstack: tuple[Stack, Respawner], request: pytest.FixtureRequest) -> Iterator[Stack]:
    s, _ = fstack
    for pool in ("triage_pool", "optimizer_pool", "analytics_pool"):  # back to full size between tests
        s.wait_workers(pool, POOL_SIZE, timeout=60)
    yield s
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(s.logs())


def _against(stack: Stack, *args: str, timeout: float = 240.0) -> tuple[int, dict[str, Any], str]:
    code, run = run_flagship(list(args), group_args=["--endpoint", stack.frontend], timeout=timeout)
    return code, run.json, run.err


def _check_common(res: dict[str, Any], text: str, *, recycled: bool) -> None:
    lines = text.splitlines()
    sessions = res["sessions"]
    assert sessions["triage_1"]["worker"] and sessions["triage_2"]["worker"]
    assert sessions["triage_1"]["worker"] != sessions["triage_2"]["worker"], "least-loaded placement"
    assert res["triage_on_distinct_workers"] is True
    assert [r["id"] for r in res["triage"]] == [f"INC-00{i}" for i in range(1, 6)]
    assert [r["session"] for r in res["triage"]] == ["triage_1", "triage_2"] * 2 + ["triage_1"]
    for r in res["triage"]:
        assert r["category"] and r["urgency"]
        assert any(line.strip().startswith(f"{r['id']} -> {r['category']}/{r['urgency']} ({r['session']}, ")
                   for line in lines)
    # scores as printed, and numpy's own statistics of them
    scores = [r["score"] for r in res["triage"]]
    for r in res["triage"]:
        _, cat, urg = flagship.TICKETS[r["id"]]
        assert r["score"] == 0.5 * (r["category"].lower() == cat) + 0.5 * (r["urgency"].lower() == urg)
    stats = res["analytics"]
    assert stats["numpy"] == np.__version__
    assert stats["mean"] == pytest.approx(float(np.mean(scores)))
    assert stats["std"] == pytest.approx(float(np.std(scores)))
    assert stats["p80"] == pytest.approx(float(np.percentile(scores, 80)))
    ins = res["insights"]
    high = [r["id"] for r in res["triage"] if r["urgency"].lower() == "high"]
    assert ins["tickets"] == (high or ["INC-001", "INC-002"])
    assert len(ins["results"]) == len(ins["tickets"]) and all(r["summary"] for r in ins["results"])
    if recycled:
        # the planned recycle is reported as planned: no WARNING, the retry's outcome as it was
        assert ins["rehydrated"] and ins["rehydrations"] == 1 and ins["planned_rehydrations"] == 1
        assert ins["retry_succeeded"] is True and ins["warnings"] == []
        assert ins["worker_after"] != ins["worker_before"]
        assert "the call found its worker gone, as planned: SessionWorkerUnavailable" in text
        assert f"the retried call answered ({ins['tickets'][0]})" in text
        assert "WARNING: insights" not in text
        # the durable twin: moved with its checkpoint, no rebuild code, the same answers
        dur = ins["durable"]
        assert dur["moved"] and dur["worker_after"] != dur["worker_before"] and dur["failed"] == 0
        assert dur["same_answers"] and [r["id"] for r in dur["results"]] == ins["tickets"]
        assert "moved with the session's checkpoint (no rebuild code); the same answers" in text
        assert 2 <= len(res["recycles"]) <= 3  # the insights workers (one or two), then gepa's
    else:
        assert not ins["rehydrated"] and ins["rehydrations"] == 0 and res["recycles"] == []
        assert ins["retry_succeeded"] is None and "retried" not in text
        assert not ins["durable"]["moved"] and ins["durable"]["same_answers"]
    g = res["gepa"]
    assert 0 < g["metric_calls"] <= g["budget"] and g["within_budget"]
    assert g["optimized_score"] >= g["baseline_score"]
    assert g["progress_events"] > 0, "GEPA's progress streams from the worker while compile runs"
    hold = res["holdout"]
    assert hold["restored_matches"], hold
    assert hold["restored"]["session"] == sessions["gepa"]["session"]  # the same (durable) session
    if recycled:
        assert hold["restored"]["worker"] != hold["recycled_worker"]
        assert "no snapshot, no rebuild" in text
    # prompt inspection: data with the response as a ref, named by its class, no vendored module path
    for name in ("triage_1", "triage_2", "gepa"):
        entries = res["history"][name]
        assert 0 < len(entries) <= 6, name
        for e in entries:
            assert e["response_is_ref"] and e["response_ref"] and "." not in e["response"], e
            assert (e["tokens"] > 0 or e["cached"]) and e["prompt_preview"]
            assert {"messages", "usage", "model", "outputs"} <= set(e["data_keys"])
    assert not VENDORED.search(text), VENDORED.search(text)
    assert res["summary"]["tickets_triaged"] == 5


def _explains_itself(text: str) -> None:
    """GEPA, the valset and a ref get one line each, before or where they first appear."""
    for word, line in (("ref", "(a ref is a handle whose calls run on the worker)"),
                       ("GEPA", "GEPA (dspy.GEPA) rewrites the program's instructions"),
                       ("valset", "the valset is what every candidate is scored on")):
        explained = text.index(line)
        first = re.search(rf"\b{word}\b", text)
        assert first is not None and text.count("\n", first.start(), explained) <= 1, (word, text[:first.start()])


def test_offline_default_budget_shows_gepa_improving_and_explains_itself(running: Stack) -> None:
    code, res, text = _against(running)
    assert code == 0 and res["summary"]["failed_calls"] == 0 and res["failures"] == []
    assert res["offline"] and res["label"] == OFFLINE_LABEL and OFFLINE_LABEL in text
    assert "offline_lm.py of this folder: user code, sent to the workers by value" in text
    _check_common(res, text, recycled=True)
    _explains_itself(text)
    for e in res["history"]["triage_1"]:
        assert e["cost_text"] == "$0 (offline)" and e["model"] == "offline/triage" and e["response"] == "Response"
    assert "response=<ref Response>" in text
    # the default budget lets GEPA learn rules, and the learned program survives its worker's recycle
    g = res["gepa"]
    assert g["budget"] == res["summary"]["gepa_budget"] == 30
    assert "budget 30 (the default): 3 metric calls score the baseline" in text
    assert "--max-metric-calls 3, the original flagship's budget, only scores the baseline" in text
    assert g["improved"] and g["optimized_score"] > g["baseline_score"], g
    assert g["reflection_calls"] > 0 and "- If the ticket mentions" in g["instructions"]
    r = g["reflection"]
    assert r["proposed"] >= 1 and r["accepted"] >= 1 and r["skipped_perfect"] >= 1, r
    assert "All subsample scores perfect" not in text and "did not propose" not in text
    assert f"{r['skipped_perfect']} skipped (all subsample scores perfect)" in text
    assert "(improved by +" in text and "raise --max-metric-calls" not in text
    for rule in (ln.strip() for ln in g["instructions"].splitlines() if ln.strip().startswith("- If")):
        assert " ".join(rule.split()[:4]) in text, rule  # printed, wrapped, not cut
    assert "every LM call answered" in text
    # the baseline is a plausible keyword triage, not one label for everything
    assert len({r["category"] for r in res["triage"]}) >= 3
    # every session of the run is closed, including the two whose workers were recycled
    ours = {v["session"] for v in res["sessions"].values()}
    with dspex.connect(running.frontend, timeout=10) as dx:
        assert not ours & {r["id"] for r in dx.sessions()}


def test_the_original_budget_without_recycles(running: Stack) -> None:
    """``--max-metric-calls 3 --no-recycle``: the original's budget, named as such; no line announces a
    recycle that does not happen."""
    code, res, text = _against(running, "--max-metric-calls", "3", "--no-recycle")
    assert code == 0 and res["stack"] == {"endpoint": running.frontend, "started": False, "kept_running": False}
    _check_common(res, text, recycled=False)
    assert res["summary"]["gepa_budget"] == 3 and not res["gepa"]["improved"]
    assert ("--max-metric-calls 3, the original flagship's budget: the baseline evaluation only (3 valset "
            "examples), no reflection; the default 30 lets GEPA reflect") in text
    assert "instructions unchanged: the budget allowed no reflection (the default 30 does)" in text
    assert "recycl" not in text.replace("--no-recycle", "")
    assert "[3] insights on the high-urgency tickets (optimizer_pool)\n" in text
    assert "then the optimized program answers again" in text and "using the running stack" in text


def test_the_script_runs_by_path_from_any_directory(running: Stack, short_tmp: str) -> None:
    """``python examples/flagship_multi_pool_gepa.py``: its sibling modules come from its own folder
    (examples/ is not a package anybody installs); a missing key is one line, exit 2."""
    env = cli_env(PYTHONPATH=str(REPO))  # dspex importable; examples/ only as the script's folder
    script = [PY, str(EXAMPLE), "--endpoint", running.frontend]
    code, run = run_flagship([], command=[*script, "--json", "--no-recycle", "--max-metric-calls", "3"], env=env,
                             cwd=short_tmp)
    assert code == 0 and run.json["offline"] and len(run.json["triage"]) == 5 and "[8] summary" in run.err
    code, run = run_flagship([], command=[*script, "--model", "anthropic/claude-x"], env=env, cwd=short_tmp)
    assert code == 2 and run.err.strip().count("\n") == 0 and "ANTHROPIC_API_KEY" in run.err


@pytest.mark.parametrize("engine", ["auto", "lm15"])
def test_the_real_provider_path_on_loopback(running: Stack, engine: str) -> None:
    """dspy's real HTTP path to an OpenAI-compatible server, every call bounded: with dspy's engine
    "auto" the cap goes in both fields (extra_body, which dspy sends through litellm), with the native
    "lm15" in the one field it sends, and the header says which."""
    name = f"dspex-loopback-{engine}"  # its own dspy cache entries per engine
    with LMServer(models=(name,)) as srv:
        code, res, text = _against(running, "--model", f"openai/{name}", "--api-base", srv.base, "--lm-engine", engine)
        calls = srv.completions()
    assert code == 0, res.get("failures")
    assert not res["offline"] and OFFLINE_LABEL not in text
    assert res["lm"]["lm_kwargs"]["api_base"] == srv.base and "api_key" not in res["lm"]["lm_kwargs"]
    assert res["preflight"]["ok"] and f"lists {name}" in text
    _check_common(res, text, recycled=True)
    # 5 triage + 2 insights + the holdout, all real HTTP (GEPA's calls on the same prompts at the same
    # temperature, and the restored program's, are answered by dspy's cache: the history shows them)
    assert len(calls) >= 8, len(calls)
    assert {c.path for c in calls} == {"/v1/chat/completions"}
    assert {c.auth for c in calls} == {f"Bearer {flagship.DUMMY_API_KEY}"} and {c.model for c in calls} == {name}
    bounds = flagship.resolve_bounds(env={})
    fields = ("max_tokens", "max_completion_tokens") if engine == "auto" else ("max_completion_tokens",)
    for c in calls:  # every call bounded
        assert c.max_tokens in (bounds.max_tokens, bounds.reflection_max_tokens), c
        assert c.fields == dict.fromkeys(fields, c.max_tokens), c
    assert ("token cap sent as max_tokens and max_completion_tokens" if engine == "auto" else
            "token cap sent as max_completion_tokens only (--lm-engine lm15)") in text
    for e in res["history"]["triage_1"]:
        assert e["model"] == f"openai/{name}" and e["cost_text"] != "$0 (offline)"
        assert e["response"] == ("ModelResponse" if engine == "auto" else "Response")


def test_a_retry_that_fails_after_rehydration_is_reported_as_failed(running: Stack) -> None:
    """The Rehydrator's retry gets an answer that does not parse: the report says the retry failed
    (never "succeeded"), counts it and exits 9."""
    name = "retry-fails"
    rules = ((("root_cause", "Checkout fails"), "unparsable"),)  # the insight of INC-001, the retried call
    with LMServer(models=(name,), rules=rules) as srv:
        code, res, text = _against(running, "--model", f"openai/{name}", "--api-base", srv.base, "--no-preflight",
                                   "--max-metric-calls", "3")
    ins = res["insights"]
    assert code == 9 and ins["rehydrated"] and ins["retry_succeeded"] is False
    assert ins["retried"]["ticket"] == "INC-001" and ins["retried"]["failed"]["kind"] == "unparsed"
    assert "the retried call failed too: <unparsed> (INC-001)" in text
    assert "succeeded" not in text and "retried call answered" not in text
    assert "1/2 insights failed: AdapterParseError" in text


def test_missing_key_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"PATH": os.environ.get("PATH", "")}
    with pytest.raises(dspex.ConfigError) as info:
        flagship.resolve_lm("gemini/gemini-flash-lite-latest", env=env)
    msg = str(info.value)
    assert "GEMINI_API_KEY" in msg and "\n" not in msg and info.value.code == "config_error"
    with pytest.raises(dspex.ConfigError, match="OPENAI_API_KEY"):
        flagship.resolve_lm("openai/gpt-4o-mini", env=env)
    # a key present, a local server without one, and offline all resolve
    spec = flagship.resolve_lm("gemini/gemini-flash-lite-latest", env={"GEMINI_API_KEY": "k"})
    assert spec.kwargs["api_key"] == "k" and "api_key" not in spec.public()["lm_kwargs"]
    local = flagship.resolve_lm("openai/x", "http://127.0.0.1:9/v1", env=env)
    assert local.kwargs == {"api_base": "http://127.0.0.1:9/v1", "api_key": flagship.DUMMY_API_KEY}
    assert flagship.resolve_lm(None, env=env).offline
    assert flagship.resolve_lm(None, env={"DSPEX_MODEL": "openai/x", "OPENAI_API_KEY": "k"}).model == "openai/x"
    # run_flagship refuses before touching the broker (no client call is made)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(dspex.ConfigError):
        flagship.run_flagship(None, model="gemini/gemini-flash-lite-latest", max_metric_calls=3)


# ----------------------------------------------------------------------------- stacks it starts


@pytest.fixture
def private_conf(short_tmp: str) -> Iterator[tuple[Path, dict[str, str]]]:
    """A private copy of supervisor.conf (its supervisord socket, pidfile and logs in short_tmp) and
    the command's environment for it; any supervisord it leaves is stopped."""
    conf = Path(short_tmp, "supervisor.conf")
    shutil.copy(REPO / "supervisor.conf", conf)
    link_launcher(short_tmp)  # its command= lines run %(here)s/bin/dspex-python
    env = cli_env(os.path.join(short_tmp, "r"), DSPEX_SUPERVISOR_CONF=str(conf), DSPEX_PYTHON=PY,
                  DSPEX_METRICS_PORT=str(free_port()), DSPY_CACHEDIR=os.path.join(short_tmp, "dspy-cache"))
    try:
        yield conf, env
    finally:
        _stop_leftover_supervisord(Path(short_tmp, "run", "supervisord.pid"))


def _stack_pids(conf: Path) -> set[int]:
    """supervisord (from the conf's pidfile) and every process under it: broker and workers."""
    pid = int(Path(conf.parent, "run", "supervisord.pid").read_text().strip())
    return {pid, *(p for p, _ in descendants(pid))}


def _all_gone(pids: set[int], timeout: float = 5.0) -> None:
    wait_for(lambda: not [p for p in pids if pid_alive(p)], timeout=timeout,
             what=f"every process the flagship started to exit: {sorted(p for p in pids if pid_alive(p))}")


@pytest.mark.slow
def test_dspexctl_flagship_starts_and_stops_supervisord(private_conf: tuple[Path, dict[str, str]]) -> None:
    """The real thing: no stack answers, so ``dspexctl flagship`` starts supervisord, runs the flow
    with supervisord restarting the recycled workers, and shuts down what it started."""
    conf, env = private_conf
    run = FlagshipRun([], env=env, cwd=conf.parent)
    try:
        run.wait_line("[1] sessions")
        pids = _stack_pids(conf)
        run.wait_line("[8] summary")
        pids |= _stack_pids(conf)  # the recycled workers' replacements too
        code = run.wait(240)
    finally:
        run.close()
        print(run.err)
    assert code == 0, run.err[-4000:]
    res = run.json  # stdout is the one JSON document and nothing else
    assert res["offline"] and len(res["triage"]) == 5 and res["triage_on_distinct_workers"]
    assert res["insights"]["rehydrated"] and res["insights"]["retry_succeeded"] is True
    assert res["holdout"]["restored_matches"] and res["gepa"]["within_budget"] and res["gepa"]["improved"]
    assert res["stack"]["started"] is True and res["stack"]["kept_running"] is False
    assert "starting supervisord" in run.err and "stopping the stack this command started" in run.err
    assert "nothing is listening" not in run.err and "WARNING" not in run.err
    assert res["stack"]["endpoint"].startswith(f"ipc://{env['DSPEX_RUN_DIR']}/")
    _all_gone(pids)


def _slow_run(private_conf: tuple[Path, dict[str, str]], srv: LMServer) -> FlagshipRun:
    conf, env = private_conf
    return FlagshipRun(["--model", "openai/slow", "--api-base", srv.base, "--no-preflight", "--lm-timeout", "150"],
                       env=env, cwd=conf.parent)


@pytest.mark.slow
@pytest.mark.parametrize("sig,group,code", [(signal.SIGTERM, False, 143), (signal.SIGINT, True, 130)],
                         ids=["SIGTERM", "ctrl-c"])
def test_an_interruption_cancels_the_calls_at_once_and_stops_what_it_started(
        private_conf: tuple[Path, dict[str, str]], sig: int, group: bool, code: int) -> None:
    """SIGTERM (a supervisor or ``kill``), or Ctrl-C (SIGINT to the terminal's process group) while
    two LM calls are in flight: both are cancelled on their workers at once (the model server sees
    them hang up), the stack the command started is stopped, nothing it started is left, and the
    exit code is 128 + the signal."""
    with LMServer(mode="slow", delay=120, models=("slow",)) as srv:
        run = _slow_run(private_conf, srv)
        try:
            run.wait_line("[2] triage")
            wait_for(lambda: len(srv.completions("slow")) == 2, timeout=30, what="two LM calls in flight")
            pids = _stack_pids(private_conf[0])
            sent = run.signal(sig, group=group)
            wait_for(lambda: all(c.hung_up for c in srv.completions("slow")), timeout=5, what="calls cancelled")
            cancelled_after = time.monotonic() - sent
            exit_code = run.wait(60)
            exited_after = time.monotonic() - sent
        finally:
            run.close()
            print(run.err)
    name = signal.Signals(sig).name
    assert exit_code == code and run.json["error"] == {"code": "interrupted", "message": f"interrupted by {name}",
                                                       "exit": code}
    assert cancelled_after < 2.0, cancelled_after
    assert "interrupted: cancelled 2 call(s) in flight on their workers" in run.err
    assert "stopping the stack this command started" in run.err and "Aborted!" not in run.err
    _all_gone(pids)
    print(f"{name}: calls cancelled {cancelled_after:.2f}s, exit {exited_after:.2f}s after the signal")
    assert exited_after < 20.0, exited_after  # the stack's shutdown included; a loaded machine


@pytest.mark.slow
def test_sigterm_while_the_stack_starts_stops_supervisord(private_conf: tuple[Path, dict[str, str]]) -> None:
    conf, env = private_conf
    run = FlagshipRun([], env=env, cwd=conf.parent)
    try:
        run.wait_line("supervisord running (pid")
        # the broker and the 6 workers spawned (they take seconds to import dspy and register)
        pids = wait_for(lambda: (found := _stack_pids(conf)) and len(found) >= 8 and found, timeout=30,
                        what="supervisord's programs")
        assert "stack ready" not in run.err
        run.signal(signal.SIGTERM)
        exit_code = run.wait(60)
    finally:
        run.close()
        print(run.err)
    assert exit_code == 143 and "interrupted by SIGTERM" in run.err
    assert "the start was interrupted: stopping the supervisord this command started" in run.err
    _all_gone(pids, timeout=30)
    assert not Path(conf.parent, "run", "supervisord.pid").exists()


@pytest.mark.slow
def test_an_error_after_the_stack_started_stops_it(private_conf: tuple[Path, dict[str, str]]) -> None:
    """A conf without analytics_pool: the stack starts, the flow cannot run (exit 2, the pool named),
    and the stack it started is stopped."""
    conf, env = private_conf
    text = conf.read_text()
    conf.write_text(re.sub(r"\n\[(dspex:pool|group|program):analytics_pool\]\n.*?(?=\n\[|\Z)", "", text, flags=re.DOTALL))
    run = FlagshipRun([], env=env, cwd=conf.parent)
    try:
        run.wait_line("stack ready at")
        pids = _stack_pids(conf)
        exit_code = run.wait(120)
    finally:
        run.close()
        print(run.err)
    assert exit_code == 2 and "analytics_pool" in run.json["error"]["message"]
    assert "stopping the stack this command started" in run.err
    _all_gone(pids)


@pytest.mark.slow
def test_a_stack_that_fails_to_start_is_stopped(private_conf: tuple[Path, dict[str, str]]) -> None:
    """analytics_pool's workers exit at once: supervisord gives up on them (FATAL), the start fails,
    and the supervisord the command launched is stopped with everything it runs."""
    conf, env = private_conf
    text = conf.read_text()
    head, _, rest = text.partition("[program:analytics_pool]\n")
    rest = re.sub(r"(?m)^command = .*$", "command = /bin/false", rest, count=1)
    rest = re.sub(r"(?m)^startretries = .*$", "startretries = 1", rest, count=1)
    conf.write_text(head + "[program:analytics_pool]\n" + rest)
    run = FlagshipRun([], env=env, cwd=conf.parent)
    try:
        run.wait_line("supervisord running (pid")
        pids = _stack_pids(conf)
        exit_code = run.wait(120)
    finally:
        run.close()
        print(run.err)
    assert exit_code == 1 and "FATAL" in run.json["error"]["message"], run.err
    assert "the start failed: stopping the supervisord this command started" in run.err
    _all_gone(pids)
    assert not Path(conf.parent, "run", "supervisord.pid").exists()


def test_a_missing_key_exits_2_before_starting_anything(private_conf: tuple[Path, dict[str, str]]) -> None:
    conf, env = private_conf
    for extra in ([], ["--json"]):
        cmd = [PY, "-m", "dspexctl", "flagship", "--model", "gemini/gemini-flash-lite-latest", *extra]
        code, run = run_flagship([], command=cmd, env=env, cwd=conf.parent)
        assert code == 2, run.err
        assert run.err.strip().count("\n") == 0 and "GEMINI_API_KEY" in run.err
        if extra:
            assert run.json["error"]["code"] == "config_error"
    assert not Path(conf.parent, "run", "supervisord.pid").exists()


def _stop_leftover_supervisord(pidfile: Path) -> None:
    """Safety net: the supervisord this test's command started (its private pidfile) must not outlive it."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)  # supervisord stops its programs, then exits
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
