"""What an operator reads of calls that fail, against a real supervisord stack (the shipped broker
and triage_pool sections, one worker): ``dspexctl pools status`` as a subprocess and the dashboard
in headless Chromium.

* The dashboard's "Last hour" errors label showed the newest 10 s interval's count (``0`` beside
  a spike of errors a minute ago); it totals the hour shown, as the restarts label does, and says
  what ``pools status``'s ERR says, also after a reload of the page.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import wait_for
from tests.harness.supervisord import SupervisedStack, dashboard_status, dspexctl, small_stack
from tests.test_dashboard import browser, rows  # noqa: F401 - the fixture, used by name

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def stack() -> Iterator[SupervisedStack]:
    with small_stack({"triage_pool": 1}) as s:
        yield s


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
