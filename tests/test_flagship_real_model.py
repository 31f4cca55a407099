"""Optional: ``dspexctl flagship`` against a real model server (skipped unless DSPEX_TEST_MODEL_BASE is set).

    DSPEX_TEST_MODEL_BASE=http://127.0.0.1:8000/v1 DSPEX_TEST_MODEL=openai/qwen2.5-0.5b \\
        pytest tests/test_flagship_real_model.py -s

The model must do the task: the preflight passes, answers parse (a run whose every LM call failed
is a failed test, not a completed flow), every call stays within its bounds and every failure is
counted (see docs/flagship.md, "A laptop run against a small local model").
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests.flagship_example import cli_env, run_flagship
from tests.harness import Stack

BASE = os.environ.get("DSPEX_TEST_MODEL_BASE", "")
MODEL = os.environ.get("DSPEX_TEST_MODEL", "openai/local")
LM_TIMEOUT = os.environ.get("DSPEX_TEST_LM_TIMEOUT", "120")

pytestmark = [pytest.mark.skipif(not BASE, reason="set DSPEX_TEST_MODEL_BASE to a model server's /v1 base URL"),
              pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    root = tempfile.mkdtemp(prefix="dxrm", dir="/tmp")
    s = Stack(root)
    s.heartbeat, s.liveness = 0.5, 6
    s.env.update(DSPY_CACHEDIR=os.path.join(root, "dspy-cache"))
    pools = {"triage_pool:strict_queue:queue_timeout=900": 2, "optimizer_pool:strict_queue:queue_timeout=1800": 1,
             "analytics_pool:hint": 1}
    try:
        s.start_broker(*pools)
        for spec, n in pools.items():
            for _ in range(n):
                s.start_worker(spec.split(":")[0])
        for spec, n in pools.items():
            s.wait_workers(spec.split(":")[0], n, timeout=120)
        yield s
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


def test_flagship_answers_with_a_real_model(stack: Stack) -> None:
    code, run = run_flagship(["--model", MODEL, "--api-base", BASE, "--lm-timeout", LM_TIMEOUT, "--no-recycle",
                              "--max-metric-calls", "6"], group_args=["--endpoint", stack.frontend],
                             env=cli_env(), timeout=1700)
    res = run.json
    assert "error" not in res, res
    print(f"real model {MODEL} at {BASE}: exit {code} in {run.seconds:.1f}s, preflight "
          f"{res['preflight'].get('seconds')}s, failed calls {res['summary']['failed_calls']}")
    assert res["preflight"]["ok"], res["preflight"]
    assert len(res["triage"]) == 5 and res["summary"]["failed_calls"] == len(res["failures"])
    assert code == (9 if res["failures"] else 0)
    parsed = [r for r in res["triage"] if not r["failed"]]
    assert parsed, f"no triage answer parsed: {[r['failed'] for r in res['triage']]}"
    assert all(r["category"] and r["urgency"] for r in parsed)
    assert not res["holdout"]["baseline"]["failed"] or not res["holdout"]["optimized"]["failed"]
    bounds = res["lm"]["bounds"]
    for row in res["triage"]:
        assert row["elapsed_s"] <= bounds["call_timeout_s"]
