"""The flagship flow end to end on real processes: offline, through a loopback OpenAI-compatible
server (dspy's real provider path), the missing-key error, and ``dspexctl flagship`` itself.

One broker + 3 pools x 2 workers is shared by the in-process runs (starting 6 dspy workers on 2
cores costs ~10-20 s). The flow recycles optimizer workers; with no supervisord here, a small
respawner thread plays ``autorestart=true``: it starts a new worker whenever one it started exits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import dspex
from tests.flagship_example import load_flagship
from tests.harness import PY, REPO, Stack, base_env, wait_for
from tests.harness.supervisord import link_launcher
from tests.lmserver import LMServer
from examples.offline_lm import OFFLINE_LABEL

pytestmark = pytest.mark.timeout(240)

flagship = load_flagship("dspex_flagship_example_under_test")

POOL_SPECS = ("triage_pool:strict_queue", "optimizer_pool:strict_queue", "analytics_pool:hint")
POOL_SIZE = 2


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
def flagship_client(fstack: tuple[Stack, Respawner], request: pytest.FixtureRequest) -> Iterator[dspex.Client]:
    s, _ = fstack
    for pool in ("triage_pool", "optimizer_pool", "analytics_pool"):  # back to full size between tests
        s.wait_workers(pool, POOL_SIZE, timeout=60)
    client = dspex.connect(s.frontend, timeout=90)  # generous: litellm imports under CPU load
    try:
        yield client
    finally:
        client.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(s.logs())


def _check_common(res: dict[str, Any], lines: list[str], *, recycled: bool) -> None:
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
        text, cat, urg = flagship.TICKETS[r["id"]]
        assert r["score"] == 0.5 * (r["category"].lower() == cat) + 0.5 * (r["urgency"].lower() == urg)
    stats = res["analytics"]
    assert stats["numpy"] == np.__version__
    assert stats["mean"] == pytest.approx(float(np.mean(scores)))
    assert stats["std"] == pytest.approx(float(np.std(scores)))
    assert stats["p80"] == pytest.approx(float(np.percentile(scores, 80)))
    # insights: the rehydration branch fired once and the retry succeeded
    ins = res["insights"]
    high = [r["id"] for r in res["triage"] if r["urgency"].lower() == "high"]
    assert ins["tickets"] == (high or ["INC-001", "INC-002"])
    assert len(ins["results"]) == len(ins["tickets"]) and all(r["summary"] for r in ins["results"])
    if recycled:
        assert ins["rehydrated"] and ins["rehydrations"] == 1 and ins["retry_succeeded"]
        assert ins["worker_after"] != ins["worker_before"]
        assert any("SessionWorkerUnavailable" in line and "WARNING" in line for line in lines)
        assert len(res["recycles"]) == 2
    else:
        assert not ins["rehydrated"] and ins["rehydrations"] == 0 and res["recycles"] == []
    # GEPA within its budget
    g = res["gepa"]
    assert 0 < g["metric_calls"] <= g["budget"] and g["within_budget"]
    assert g["optimized_score"] >= g["baseline_score"]
    assert g["progress_events"] > 0, "GEPA's progress streams from the worker while compile runs"
    # the restored optimized program answers like the optimized one
    hold = res["holdout"]
    assert hold["restored_matches"], hold
    if recycled:
        assert hold["restored"]["worker"] != hold["recycled_worker"]
    # prompt inspection: data with the response as a ref
    for name in ("triage_1", "triage_2", "gepa"):
        entries = res["history"][name]
        assert 0 < len(entries) <= 6, name
        for e in entries:
            assert e["response_is_ref"] and e["response_ref"], e
            assert (e["tokens"] > 0 or e["cached"]) and e["prompt_preview"]
            assert {"messages", "usage", "model", "outputs"} <= set(e["data_keys"])
    assert res["summary"]["tickets_triaged"] == 5
    json.dumps(res)  # --json must be able to print it


def test_flagship_offline_with_recycles(flagship_client: dspex.Client, fstack: tuple[Stack, Respawner]) -> None:
    lines: list[str] = []
    started = time.monotonic()
    res = flagship.run_flagship(flagship_client, model=None, api_base=None, max_metric_calls=3, recycle=True,
                                out=lines.append)
    elapsed = time.monotonic() - started
    print("\n".join(lines))
    print(f"offline flagship wall time: {elapsed:.2f}s")
    assert res["offline"] and res["label"] == OFFLINE_LABEL
    assert any(OFFLINE_LABEL in line for line in lines)
    _check_common(res, lines, recycled=True)
    for e in res["history"]["triage_1"]:
        assert e["cost_text"] == "$0 (offline)" and e["model"] == "offline/triage"
        assert e["response"].endswith("Response")
    # the rebuilt insights session ran on another worker than the recycled one
    assert res["insights"]["worker_after"] != res["recycles"][0]["worker"]
    # both recycled workers exit (after their acknowledged goodbye) and are replaced
    wait_for(lambda: fstack[1].respawned >= 2, timeout=15, what="both recycled workers replaced")
    # the offline baseline is a plausible keyword triage, not one label for everything
    assert len({r["category"] for r in res["triage"]}) >= 3
    text = "\n".join(lines)
    assert "budget 3 = the baseline evaluation only (3 valset examples), as in the original; " \
           "try --max-metric-calls 30" in text
    assert "instructions unchanged: the budget allowed no reflection (try --max-metric-calls 30)" in text
    assert res["summary"]["failed_calls"] == 0 and res["failures"] == []
    # every session of the run is closed, including the two whose workers were recycled
    ours = {v["session"] for v in res["sessions"].values()} | {res["holdout"]["restored"]["session"]}
    assert not ours & {r["id"] for r in flagship_client.sessions()}


def test_flagship_offline_gepa_budget_30(flagship_client: dspex.Client) -> None:
    """A bigger budget: GEPA learns rules, and the learned program survives its worker's recycle."""
    lines: list[str] = []
    res = flagship.run_flagship(flagship_client, max_metric_calls=30, recycle=True, out=lines.append)
    print("\n".join(lines))
    _check_common(res, lines, recycled=True)
    g = res["gepa"]
    assert g["improved"] and g["optimized_score"] > g["baseline_score"], g
    assert g["reflection_calls"] > 0 and "- If the ticket mentions" in g["instructions"]
    assert res["holdout"]["restored_matches"]  # instructions with the learned rules, restored
    # the flagship explains itself: outcomes counted, no flood, proposals whole, the gain shown
    r = g["reflection"]
    assert r["proposed"] >= 1 and r["accepted"] >= 1 and r["skipped_perfect"] >= 1, r
    text = "\n".join(lines)
    assert "All subsample scores perfect" not in text and "did not propose" not in text
    assert f"{r['skipped_perfect']} skipped (all subsample scores perfect)" in text
    assert "(improved by +" in text and "raise --max-metric-calls" not in text
    for rule in (ln.strip() for ln in g["instructions"].splitlines() if ln.strip().startswith("- If")):
        words = rule.split()
        assert any(" ".join(words[:4]) in ln for ln in lines), rule  # printed, wrapped, not cut
        assert "..." not in "".join(ln for ln in lines if "- If" in ln)
    assert g["metric_calls"] <= 30 or f"OVER budget by {g['overshoot']}" in text


def test_cli_against_running_stack_json(flagship_client: dspex.Client, fstack: tuple[Stack, Respawner]) -> None:
    """``dspexctl flagship --json`` on a running stack: it just runs; stdout is one JSON document."""
    from types import SimpleNamespace

    from click.testing import CliRunner

    import dspexctl.flagship as cli

    obj = SimpleNamespace(endpoint=fstack[0].frontend, supervisor_conf=None, timeout=30.0)
    result = CliRunner().invoke(cli.flagship, ["--json", "--no-recycle"], obj=obj)
    assert result.exit_code == 0, (result.stderr, result.exception)
    res = json.loads(result.stdout)
    assert res["stack"] == {"endpoint": fstack[0].frontend, "started": False, "kept_running": False}
    assert res["offline"] and len(res["triage"]) == 5 and res["summary"]["gepa_budget"] == 3
    assert res["recycles"] == [] and not res["insights"]["rehydrated"]
    # headings follow --no-recycle: nothing announces a recycle that does not happen
    assert "recycl" not in result.stderr.replace("--no-recycle", "")
    assert "[3] insights on the high-urgency tickets (optimizer_pool)\n" in result.stderr
    assert "snapshot -> restore on a new session" in result.stderr
    assert "using the running stack" in result.stderr and "[8] summary" in result.stderr
    assert "INC-001 -> " in result.stderr and "INC-001 -> " not in result.stdout


def test_script_main_json(flagship_client: dspex.Client, fstack: tuple[Stack, Respawner],
                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``python examples/flagship_multi_pool_gepa.py --json`` against a running stack."""
    monkeypatch.delenv("DSPEX_MODEL", raising=False)
    assert flagship.main(["--endpoint", fstack[0].frontend, "--json", "--no-recycle"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res["offline"] and len(res["triage"]) == 5 and "[8] summary" in captured.err
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert flagship.main(["--model", "anthropic/claude-x", "--endpoint", fstack[0].frontend]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ANTHROPIC_API_KEY" in err


@pytest.fixture
def chat_server() -> Iterator[LMServer]:
    """The loopback OpenAI-compatible server (tests/lmserver.py) in its normal mode."""
    with LMServer() as srv:
        yield srv


@pytest.mark.parametrize("engine", [None, "litellm"], ids=["dspy-auto", "litellm"])
def test_flagship_real_provider_path_on_loopback(flagship_client: dspex.Client, chat_server: LMServer,
                                                 engine: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("DSPEX_MODEL", raising=False)
    lines: list[str] = []
    name = f"dspex-loopback-{engine or 'auto'}"  # its own dspy cache entries per engine
    res = flagship.run_flagship(flagship_client, model=f"openai/{name}", api_base=chat_server.base,
                                max_metric_calls=3, recycle=True, out=lines.append, engine=engine)
    print("\n".join(lines))
    assert not res["offline"] and OFFLINE_LABEL not in "\n".join(lines)
    assert res["lm"]["lm_kwargs"]["api_base"] == chat_server.base and "api_key" not in res["lm"]["lm_kwargs"]
    _check_common(res, lines, recycled=True)
    calls = chat_server.completions()
    # 5 triage + 2 insights + the holdout, all real HTTP (GEPA's calls on the same prompts at the same
    # temperature, and the restored program's, are answered by dspy's cache: the history shows them)
    assert len(calls) >= 8, len(calls)
    assert {c.path for c in calls} == {"/v1/chat/completions"}
    assert {c.auth for c in calls} == {f"Bearer {flagship.DUMMY_API_KEY}"}
    assert {c.model for c in calls} == {name}
    bounds = flagship.resolve_bounds(env={})
    assert {c.max_tokens for c in calls} <= {bounds.max_tokens, bounds.reflection_max_tokens}  # bounded calls
    expected_response = "ModelResponse" if engine == "litellm" else "Response"
    for e in res["history"]["triage_1"]:
        assert e["model"] == f"openai/{name}" and e["response"].endswith(expected_response)
        assert e["cost_text"] != "$0 (offline)"


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


def test_cli_missing_key_exits_nonzero_before_starting_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import dspexctl.flagship as cli

    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)

    def no_stack(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the stack must not be started when the key is missing")

    monkeypatch.setattr(cli, "_ensure_stack", no_stack)
    for extra in ([], ["--json"]):
        result = CliRunner().invoke(cli.flagship, ["--model", "gemini/gemini-flash-lite-latest", *extra])
        assert result.exit_code == 2, result.output
        err = result.stderr.strip()
        assert err.count("\n") == 0 and "GEMINI_API_KEY" in err, err
        if extra:
            assert json.loads(result.stdout)["error"]["code"] == "config_error"
        else:
            assert result.stdout == ""


def _stack_module() -> Any:
    try:
        import dspexctl.stack as stack
    except ImportError:
        return None
    return stack


def _registered() -> bool:
    try:
        from dspexctl.cli import main
    except ImportError:
        return False
    return "flagship" in getattr(main, "commands", {})


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(_stack_module() is None, reason="dspexctl.stack (ensure_stack/shutdown_stack) has not landed yet")
@pytest.mark.timeout(300)
def test_dspexctl_flagship_starts_and_stops_supervisord(short_tmp: str) -> None:
    """The real thing: no stack answers, so ``dspexctl flagship`` starts supervisord, runs the flow
    with supervisord restarting the recycled workers, and shuts down what it started."""
    # a private copy of supervisor.conf: its supervisord socket, pidfile and logs live in short_tmp
    conf = Path(short_tmp, "supervisor.conf")
    shutil.copy(REPO / "supervisor.conf", conf)
    link_launcher(short_tmp)  # its command= lines run %(here)s/bin/dspex-python
    run_dir = os.path.join(short_tmp, "r")
    env = base_env(run_dir, DSPEX_SUPERVISOR_CONF=str(conf), DSPEX_PYTHON=PY,
                   DSPEX_METRICS_PORT=str(_free_port()))
    env.pop("DSPEX_MODEL", None)
    cmd = [PY, "-m", "dspexctl", "flagship", "--json"]  # the real command, through the group
    if not _registered():
        cmd = [PY, "-c", "from dspexctl.flagship import flagship; flagship()", "--json"]
    proc = subprocess.Popen(cmd, cwd=short_tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        try:
            stdout, stderr = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        err_text = stderr.decode(errors="replace")
        print(err_text[-6000:])
        assert proc.returncode == 0, err_text[-4000:]
        res = json.loads(stdout)  # stdout is the one JSON document and nothing else
        assert res["offline"] and len(res["triage"]) == 5 and res["triage_on_distinct_workers"]
        assert res["insights"]["rehydrated"] and res["insights"]["retry_succeeded"]
        assert res["holdout"]["restored_matches"] and res["gepa"]["within_budget"]
        assert res["stack"]["started"] is True and res["stack"]["kept_running"] is False
        assert "starting supervisord" in err_text and "stopping the stack" in err_text
        assert "nothing is listening" not in err_text  # no alarming lines on a normal start
        endpoint = res["stack"]["endpoint"]
        assert endpoint.startswith(f"ipc://{run_dir}/")

        def gone() -> bool:  # it stopped what it started: nothing answers on the frontend any more
            try:
                with dspex.connect(endpoint, timeout=1) as c:
                    c.ping(timeout=1)
                return False
            except dspex.DspexError:
                return True

        wait_for(gone, timeout=30, what="stack stopped")
    finally:
        _stop_leftover_supervisord(Path(short_tmp, "run", "supervisord.pid"))


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
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
