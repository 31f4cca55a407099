"""What an operator reads of calls that fail, against a real supervisord stack (the shipped broker
and triage_pool sections, one worker): ``dspexctl pools status`` as a subprocess and the dashboard
in headless Chromium.

* An LM provider that answers 429 or refuses connections fails every LM call of the pool. Those
  are the callers' errors (never WARN), but ``pools status`` showed only ``USER 3``: nothing named
  the provider. The last one's cause is now under the failed-answers table, in ``--json`` and on
  the page, in the same words.
* The dashboard's "Last hour" errors label showed the newest 10 s interval's count (``0`` beside
  a spike of errors a minute ago); it totals the hour shown, as the restarts label does, and says
  what ``pools status``'s ERR says, also after a reload of the page.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

import dspex
from tests.harness import wait_for
from tests.harness.supervisord import SupervisedStack, cli_status, dashboard_status, dspexctl, small_stack
from tests.lmserver import LMServer, closed_port_base
from tests.test_dashboard import browser, rows  # noqa: F401 - the fixture, used by name

pytestmark = [pytest.mark.slow]

PREDICT = """
import dspy
lm = dspy.LM('openai/loopback', api_base=BASE, api_key='x', num_retries=0, cache=False)
dspy.configure(lm=lm)
predict = dspy.Predict('question -> answer')
"""


@pytest.fixture(scope="module")
def stack() -> Iterator[SupervisedStack]:
    with small_stack({"triage_pool": 1}) as s:
        yield s


def lm_calls(stack: SupervisedStack, base: str, n: int) -> list[dspex.RemoteError]:
    """``n`` DSPy predictions through a session against the LM at ``base``: the errors they raised."""
    errors = []
    with stack.client() as dx:
        s = dx.session("triage_pool")
        s.exec(PREDICT.replace("BASE", repr(base)))
        for _ in range(n):
            with pytest.raises(dspex.RemoteError) as info:
                s.eval("predict(question='why?').answer")
            errors.append(info.value)
        s.close()
    return errors


def not_ago(text: str) -> str:
    return re.sub(r"\d+s ago", "Ns ago", text)


@pytest.mark.timeout(240)
def test_a_failing_lm_provider_is_named_by_pools_status_and_the_page(stack: SupervisedStack, browser: Any) -> None:  # noqa: F811
    with LMServer(mode="rate_limit", fail_first=100) as srv:
        limited = lm_calls(stack, srv.base, 3)
    assert {e.type_name for e in limited} == {"LMRateLimitError"}
    rc, doc, text = cli_status(stack)
    assert rc == 0, text  # the provider's failures are the callers', not the service's
    (pool,) = doc["pools"]
    assert pool["failures"]["user"] == {"remote_error": 3} and pool["failures"]["service"] == {}
    last = pool["last_failures"]["user"]
    assert last["code"] == "remote_error" and last["cause"].startswith("LMRateLimitError: [openai/loopback] Rate limit")
    line = next(x for x in text.splitlines() if "last USER failure" in x)
    assert line.startswith("    triage_pool: last USER failure ") and "LMRateLimitError: [openai/loopback] Rate limit" in line
    assert "\n" not in last["cause"] and len(line) < 200, "one line, cut short: the worker's log has it whole"

    refused = lm_calls(stack, closed_port_base(), 1)  # the provider went away: the newest cause is shown
    assert refused[0].type_name == "LMTransportError"
    rc, doc, text = cli_status(stack)
    assert rc == 0, text
    assert doc["pools"][0]["failures"]["user"] == {"remote_error": 4}
    line = next(x for x in text.splitlines() if "last USER failure" in x)
    assert "LMTransportError: " in line and "Connection refused" in line, line

    browser.get(f"http://127.0.0.1:{stack.metrics_port}/")
    shown = wait_for(lambda: [li.text for li in browser.find_elements("css selector", "#failures li")], 30, 0.2,
                     "the last failure on the page")
    assert [not_ago(x) for x in shown] == [not_ago(line.strip())], (shown, line)


@pytest.mark.timeout(240)
def test_the_hours_errors_label_totals_the_hour_as_pools_status_counts_them(stack: SupervisedStack,
                                                                            browser: Any) -> None:  # noqa: F811
    with stack.client() as dx:
        for _ in range(5):
            with pytest.raises(ZeroDivisionError):
                dx.call("operator", "truediv", [1, 0], pool="triage_pool")
        dx.call("operator", "add", [1, 1], pool="triage_pool")

    def quiet_after_errors() -> list[list[Any]] | None:
        # the errors in one 10 s point, and a newer point without any: the label must not read 0 then
        h = dashboard_status(stack)["pools"]["triage_pool"]["history"]
        return h if sum(pt[5] for pt in h) >= 5 and h[-1][5] == 0 else None

    history = wait_for(quiet_after_errors, 60, 0.5, "an interval without errors after those with them")
    res = dspexctl(stack, "--json", "pools", "status")
    errors = json.loads(res.stdout)["pools"][0]["requests_error"]
    assert errors == sum(pt[5] for pt in history) >= 5, (errors, history)
    url = f"http://127.0.0.1:{stack.metrics_port}/"
    for _ in range(2):  # the history is the broker's: a reload shows the same hour
        browser.get(url)
        label = wait_for(lambda: {r["pool"]: r for r in rows(browser, "history")}.get("triage_pool"), 30, 0.2,
                         "the history row")["td_errors"]
        assert label == f"{errors} failed", label


def test_the_newest_failure_of_each_kind_keeps_its_cause_for_the_window_only() -> None:
    from broker.answers import CAUSE_CHARS, one_line
    from broker.stats import RecentFailures

    recent = RecentFailures(60)
    recent.add("user", "remote_error", 100.0, "ValueError: first")
    recent.add("user", "remote_error", 110.0, "LMRateLimitError: second")
    recent.add("service", "crash", 105.0)
    assert recent.latest(115.0) == {"user": {"code": "remote_error", "cause": "LMRateLimitError: second", "ago_s": 5.0},
                                    "service": {"code": "crash", "cause": "", "ago_s": 10.0}}
    assert recent.latest(166.0) == {"user": {"code": "remote_error", "cause": "LMRateLimitError: second", "ago_s": 56.0}}
    assert recent.latest(171.0) == {}, "out of the window: gone, as its count is"
    assert one_line("\n  E: a\n\n  To fix: b\n") == "E: a"
    cut = one_line("E: " + "x" * 500)
    assert len(cut) == CAUSE_CHARS and cut.endswith("…")


@pytest.mark.timeout(240)
def test_the_warn_line_of_a_service_failure_quotes_the_newest_ones_cause(stack: SupervisedStack) -> None:
    """``WARN: triage_pool failed 1 time(s) ...: call stopped at its deadline ×1`` named the kind,
    not the call's deadline; an internal error or a queue timeout said no more (why it waited)."""
    with stack.client() as dx, pytest.raises(dspex.Timeout):
        dx.call("time", "sleep", [5], pool="triage_pool", timeout=1)
    rc, doc, text = cli_status(stack)
    assert rc == 6, text
    (warn,) = [line for line in text.splitlines() if line.startswith("WARN: triage_pool failed")]
    assert "call stopped at its deadline ×1; last: timeout: call ran past its deadline (1s)" in warn, warn
    assert doc["pools"][0]["last_failures"]["service"]["code"] == "timeout"
    page = dashboard_status(stack)["pools"]["triage_pool"]["reasons"]
    assert warn.removeprefix("WARN: ") in page, (page, warn)
