"""The dashboard never calls old data live.

* A broker that stops answering (SIGSTOP, a VM pause, a swap storm): the page's request hung with
  no timeout, so the page kept its green "live · updated HH:MM:SS" and its last tables for as long
  as the browser waited. It gives up after a few seconds and says so, and is live again once the
  broker answers. Real supervisord stack, headless Chromium.
* A broker whose own thread does not turn (the HTTP thread answers with the last snapshot it
  has) was stamped with the time of the request: old counts read as fresh. The page's JSON now
  carries the snapshot's own time and age, and the page says how old it is (pure logic).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker.dashboard import view
from tests.harness import wait_for
from tests.harness.supervisord import SupervisedStack, small_stack
from tests.test_dashboard import browser, rows  # noqa: F401 - the fixture, used by name


@pytest.fixture(scope="module")
def stack() -> Iterator[SupervisedStack]:
    with small_stack({"triage_pool": 1}) as s:
        yield s


def live_label(driver: Any) -> tuple[str, str]:
    cls, text = driver.execute_script("const l = document.getElementById('live'); return [l.className, l.textContent];")
    return str(cls), str(text)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_broker_that_stops_answering_is_not_shown_live(stack: SupervisedStack, browser: Any) -> None:  # noqa: F811
    browser.get(f"http://127.0.0.1:{stack.metrics_port}/")
    wait_for(lambda: [r["pool"] for r in rows(browser, "pools")] == ["triage_pool"], 30, 0.2, "the pools table")
    wait_for(lambda: live_label(browser)[0] == "live", 10, 0.2, "the page live")
    pid = stack.status()["broker"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        text = wait_for(lambda: (got := live_label(browser))[0] == "live lost" and got, 30, 0.2,
                        "the page saying the broker does not answer")[1]
        assert "no answer within 5s" in text, text
        assert time.monotonic() - began < 15
    finally:
        os.kill(pid, signal.SIGCONT)
    text = wait_for(lambda: (got := live_label(browser))[0] == "live" and got, 30, 0.2, "live again")[1]
    assert text.startswith("live · updated "), text


def test_the_pages_json_carries_its_snapshots_own_time_and_age() -> None:
    made = time.time() - 40  # the broker's thread made it 40 s ago, and has not turned since
    snap = {"broker": {"pid": 1, "uptime_s": 100.0}, "events": [], "sessions": [], "pools": {},
            "published": {"time": made, "monotonic": 0.0}}
    doc = view(snap, [])
    assert doc["time"] == made
    assert 40 <= doc["age_s"] < 45
