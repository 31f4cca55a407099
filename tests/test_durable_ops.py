"""What an operator sees of durable sessions (``dspexctl sessions list``) through real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import dspex
from tests.harness import Stack, base_env

pytestmark = pytest.mark.timeout(120)


def dspexctl(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "dspexctl", "--timeout", "5", *args], cwd=stack.root,
                         env=base_env(stack.run_dir, DSPEX_ENDPOINT=stack.frontend), capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stdout + res.stderr
    return res


def test_sessions_list_tells_a_session_that_is_no_longer_durable_from_one_never_durable(stack: Stack) -> None:
    stack.start_broker("p:strict_queue", extra=["--checkpoint-cap", "0.1"])
    stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 1)
    dx = stack.client()
    durable, plain, turned = dx.session("p", durable=True), dx.session("p"), dx.session("p", durable=True)
    durable.put([1])
    plain.put([1])
    with pytest.raises(dspex.SessionNotDurable):
        turned.put(os.urandom(200_000))
    rows = {r["id"]: r for r in json.loads(dspexctl(stack, "sessions", "list", "--json").stdout)["sessions"]}
    assert rows[durable.id]["durable"] is True and rows[durable.id]["no_longer_durable"] is None
    assert rows[plain.id]["durable"] is False and rows[plain.id]["no_longer_durable"] is None
    assert rows[turned.id]["durable"] is False
    assert "over the per-session cap of 102.4 KB" in rows[turned.id]["no_longer_durable"]
    lines = {line.split()[0]: line for line in dspexctl(stack, "sessions", "list").stdout.splitlines()[1:]}
    assert lines[plain.id].rstrip().endswith(" no")
    assert "no longer: its checkpoint would hold" in lines[turned.id]
    assert " yes (" in lines[durable.id]
