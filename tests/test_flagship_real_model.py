"""Optional: the flagship against a real model server (skipped unless DSPEX_TEST_MODEL_BASE is set).

    DSPEX_TEST_MODEL_BASE=http://127.0.0.1:8000/v1 DSPEX_TEST_MODEL=openai/qwen2.5-0.5b \\
        pytest tests/test_flagship_real_model.py -s

Whatever a small model answers, the flow must complete within its bounds, with every failure
counted (see docs/flagship.md, "A laptop run against a small local model").
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Iterator

import pytest

import dspex
from tests.flagship_example import load_flagship
from tests.harness import Stack

BASE = os.environ.get("DSPEX_TEST_MODEL_BASE", "")
MODEL = os.environ.get("DSPEX_TEST_MODEL", "openai/local")
LM_TIMEOUT = float(os.environ.get("DSPEX_TEST_LM_TIMEOUT", "120"))

pytestmark = [pytest.mark.skipif(not BASE, reason="set DSPEX_TEST_MODEL_BASE to a model server's /v1 base URL"),
              pytest.mark.timeout(1800)]

flagship = load_flagship("dspex_flagship_real_model_under_test")


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


def test_flagship_completes_against_a_real_model(stack: Stack) -> None:
    from examples.flagship_preflight import preflight

    bounds = flagship.resolve_bounds(lm_timeout=LM_TIMEOUT, env={})
    spec = flagship.resolve_lm(MODEL, BASE, bounds=bounds)
    lines: list[str] = []
    checked = preflight(spec, lines.append)
    t0 = time.monotonic()
    with dspex.connect(stack.frontend, timeout=60) as client:
        res = flagship.run_flagship(client, model=MODEL, api_base=BASE, max_metric_calls=6, recycle=False,
                                    out=lines.append, bounds=bounds)
    wall = time.monotonic() - t0
    print("\n".join(lines))
    print(f"real model {MODEL} at {BASE}: flow wall time {wall:.1f}s, preflight {checked.get('seconds')}s, "
          f"failed calls {res['summary']['failed_calls']}")
    json.dumps(res)
    assert len(res["triage"]) == 5 and "[8] summary" in "\n".join(lines)
    assert res["summary"]["failed_calls"] == len(res["failures"])
    for row in res["triage"]:
        assert row["failed"] or row["category"] or row["urgency"]
        assert row["elapsed_s"] <= bounds.call_timeout
