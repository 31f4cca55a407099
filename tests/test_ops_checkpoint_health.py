"""``pools status`` when durable sessions lose their checkpoints: the broker's checkpoint store
refusing a write (over its total cap, a full disk) is the service failing every durable session
of the pool from then on, so it is WARN with the cause, as a crash is; a session over its own
per-session cap is the caller's (counted as USER, never WARN). Before, both read OK, exit 0, while
the callers got ``SessionNotDurable``. Real supervisord; the CLI as a subprocess.
"""

from __future__ import annotations

import os

import pytest

import dspex
from tests.harness.supervisord import cli_status, dashboard_status, small_conf_text, small_stack

pytestmark = pytest.mark.timeout(180)


def test_a_checkpoint_store_that_refuses_writes_is_warn_with_its_cause_a_session_over_its_cap_is_not() -> None:
    conf = small_conf_text({"triage_pool": 1}, triage_pool={"durable": "true"}).replace(
        '-m broker --config "%(here)s/supervisor.conf"',
        '-m broker --config "%(here)s/supervisor.conf" --checkpoint-cap 0.1 --checkpoint-total-cap 0.2', 1)
    with small_stack({"triage_pool": 1}, conf_text=conf) as stack, stack.client() as dx:
        big = dx.session("triage_pool")
        with pytest.raises(dspex.SessionNotDurable, match="over the per-session cap"):
            big.put(os.urandom(150_000))  # the caller's own session is too big: not the service's failure
        code, doc, text = cli_status(stack)
        pool = doc["pools"][0]
        assert code == 0 and pool["health"] == "ok", text
        assert pool["failures"]["user"] == {"session_not_durable": 1}, pool["failures"]

        kept = [dx.session("triage_pool") for _ in range(3)]
        kept[0].put(os.urandom(80_000))
        kept[1].put(os.urandom(80_000))
        with pytest.raises(dspex.SessionNotDurable, match="over their total cap"):
            kept[2].put(os.urandom(80_000))  # the store is full: every durable session's next write fails too
        code, doc, text = cli_status(stack)
        pool = doc["pools"][0]
        assert code == 6 and pool["health"] == "warn", text
        assert pool["failures"]["service"] == {"checkpoint_refused": 1}, pool["failures"]
        (reason,) = pool["reasons"]
        assert reason.startswith("triage_pool failed 1 time(s) in the last 5m: checkpoint not kept ×1; last: "
                                 "the broker's checkpoints would hold "), reason
        assert "over their total cap of 204.8 KB" in reason, reason
        assert f"WARN: {reason}" in text, text
        page = dashboard_status(stack)["pools"]["triage_pool"]
        assert (page["state"], page["reasons"]) == ("warn", [reason]), page


def test_a_checkpoint_store_near_its_total_cap_is_warn_before_it_refuses() -> None:
    """As a queue 80% full is WARN before pool_saturated: the store's checkpoints at 80% of its
    total cap, past which every durable session's next checkpoint is refused."""
    conf = small_conf_text({"triage_pool": 1}, triage_pool={"durable": "true"}).replace(
        '-m broker --config "%(here)s/supervisor.conf"',
        '-m broker --config "%(here)s/supervisor.conf" --checkpoint-total-cap 0.2', 1)
    with small_stack({"triage_pool": 1}, conf_text=conf) as stack, stack.client() as dx:
        dx.session("triage_pool").put(os.urandom(100_000))
        code, doc, text = cli_status(stack)
        assert code == 0 and doc["health"] == "ok", text  # under half: nothing to say
        dx.session("triage_pool").put(os.urandom(80_000))
        code, doc, text = cli_status(stack)
        assert code == 6 and doc["health"] == "warn", text
        (issue,) = [i for i in doc["issues"] if i["state"] == "warn"]
        assert issue["pool"] is None, issue  # the store is the broker's, every durable pool's
        assert issue["text"].startswith("the checkpoint store holds 17"), issue
        assert "KB of its 204.8 KB total cap (8" in issue["text"], issue
        assert "%): past it, every durable session's next checkpoint is refused (raise --checkpoint-total-cap, " \
               "or close durable sessions)" in issue["text"], issue
        assert f"WARN: {issue['text']}" in text, text
