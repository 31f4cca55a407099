"""The misbehaving loopback OpenAI-compatible server, through DSPy's real ``dspy.LM`` HTTP path.

In-process (no dspex stack): each mode produces what a real model server would make DSPy see.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError, LMError

from tests.harness import PY, base_env
from tests.lmserver import LMServer, closed_port_base

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[LMServer]:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with LMServer() as srv:
        yield srv


def _triage(base: str, **kwargs: Any) -> dspy.Prediction:
    lm = dspy.LM("openai/loopback", api_base=base, api_key="x", cache=False, **kwargs)
    with dspy.context(lm=lm):
        return dspy.Predict("ticket -> category, urgency")(ticket="Refund still not received after 10 days.")


def test_normal_answers_parse_and_models_lists(server: LMServer) -> None:
    pred = _triage(server.base)
    assert pred.category and pred.urgency in ("low", "medium", "high")
    import urllib.request

    with urllib.request.urlopen(server.base + "/models", timeout=5) as resp:
        assert resp.status == 200 and b"loopback" in resp.read()
    assert [c.mode for c in server.completions()] == ["normal"]


@pytest.mark.parametrize("mode", ["unparsable", "empty"])
def test_unusable_answers_raise_adapter_parse_error(server: LMServer, mode: str) -> None:
    server.set(mode)
    with pytest.raises(AdapterParseError):
        _triage(server.base)
    # ChatAdapter, then its JSONAdapter fallback: two real HTTP calls
    assert [c.mode for c in server.completions()] == [mode, mode]


def test_rules_pick_the_mode_per_request(server: LMServer) -> None:
    server.set("normal", rules=(("Refund", "unparsable"),))
    with pytest.raises(AdapterParseError):
        _triage(server.base)
    lm = dspy.LM("openai/loopback", api_base=server.base, api_key="x", cache=False)
    with dspy.context(lm=lm):
        assert dspy.Predict("ticket -> category")(ticket="Checkout fails with 500").category


def test_endless_answer_stops_at_max_tokens(server: LMServer) -> None:
    server.set("endless")
    with pytest.raises(AdapterParseError):
        _triage(server.base, max_tokens=40)
    calls = server.completions()
    assert calls and all(c.max_tokens == 40 and c.tokens == 40 for c in calls)


def test_endless_answer_without_cap_is_cut_by_the_lm_timeout(server: LMServer) -> None:
    server.set("endless")
    t0 = time.monotonic()
    with pytest.raises(LMError, match="timed out"):
        _triage(server.base, timeout=1, num_retries=0)
    assert time.monotonic() - t0 < 10
    # the server notices the hang-up and stops generating (no orphaned generation)
    from tests.harness import wait_for

    wait_for(lambda: any(c.hung_up for c in server.completions()), timeout=10, what="server saw the hang-up")


def test_slow_answer_within_timeout_succeeds(server: LMServer) -> None:
    server.set("slow", delay=0.5)
    assert _triage(server.base, timeout=5).category


@pytest.mark.parametrize("mode,status", [("rate_limit", 429), ("error", 500)])
def test_transient_failures_are_retried(server: LMServer, mode: str, status: int) -> None:
    server.set(mode, fail_first=2)
    assert _triage(server.base, num_retries=3).category
    assert [c.status for c in server.completions()] == [status, status, 200]


def test_without_retries_a_rate_limit_is_an_error(server: LMServer) -> None:
    server.set("rate_limit", fail_first=5)
    with pytest.raises(LMError):
        _triage(server.base, num_retries=0)


def test_refused_connection() -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    with pytest.raises(LMError, match="refused"):
        _triage(closed_port_base(), num_retries=0)


# dspy calls whose engine is litellm run in a child process: litellm keeps its clients (and an event
# loop) for the life of the process that called it, which pytest would report as leaked resources
STRICT_CALLS = """
import json, sys
import dspy
from dspy.utils.exceptions import AdapterParseError

base, engine = sys.argv[1], sys.argv[2]
outcomes = []
for extra in ({}, {"extra_body": {"max_tokens": 40, "max_completion_tokens": 40}}):
    lm = dspy.LM("openai/loopback", api_base=base, api_key="x", cache=False, max_tokens=40, engine=engine, **extra)
    try:
        with dspy.context(lm=lm):
            dspy.Predict("ticket -> category, urgency")(ticket="Refund still not received after 10 days.")
        outcomes.append("parsed")
    except AdapterParseError:
        outcomes.append("unparsed")
print(json.dumps(outcomes))
"""


@pytest.mark.parametrize("engine", ["auto", "litellm"])
@pytest.mark.parametrize("honours", [("max_tokens",), ("max_completion_tokens",)],
                         ids=["reads-max_tokens", "reads-max_completion_tokens"])
def test_a_strict_server_honours_only_its_own_token_field(server: LMServer, engine: str,
                                                          honours: tuple[str, ...]) -> None:
    """dspy 3.4's native engine sends the cap as max_completion_tokens and litellm as max_tokens, so a
    server that reads only the other name (llama-cpp-python reads only max_tokens) generates to its
    context; sent in both fields (what the flagship does for a local server), every server stops."""
    server.set("endless", honours=honours, cap_tokens=300)
    done = subprocess.run([PY, "-c", STRICT_CALLS, server.base, engine], capture_output=True, text=True, check=False,
                          timeout=120,
                          env=base_env(NO_PROXY="127.0.0.1", no_proxy="127.0.0.1"))
    assert done.returncode == 0 and json.loads(done.stdout) == ["unparsed", "unparsed"], done.stderr[-3000:]
    sent = "max_completion_tokens" if engine == "auto" else "max_tokens"
    one = [c for c in server.completions() if set(c.fields) == {sent}]
    both = [c for c in server.completions() if set(c.fields) == {"max_tokens", "max_completion_tokens"}]
    assert one and both and len(one) + len(both) == len(server.completions())
    bounded = sent in honours
    assert all(c.max_tokens == (40 if bounded else None) and c.tokens == (40 if bounded else 300) for c in one), one
    assert all(c.max_tokens == 40 and c.tokens == 40 for c in both), both


def test_a_server_serves_only_its_models(server: LMServer) -> None:
    import json
    import urllib.request

    server.set(models=("qwen2.5-0.5b",))
    with urllib.request.urlopen(server.base + "/models", timeout=5) as resp:
        assert [m["id"] for m in json.loads(resp.read())["data"]] == ["qwen2.5-0.5b"]
    with pytest.raises(LMError, match="does not exist"):
        _triage(server.base, num_retries=0)  # asks for openai/loopback
    assert [c.status for c in server.completions()] == [404]


def test_placeholder_answers_parse_as_the_fields_own_names(server: LMServer) -> None:
    """A small model that echoes the prompt: DSPy parses it, and the values are the placeholders."""
    server.set("placeholder")
    pred = _triage(server.base)
    assert (pred.category, pred.urgency) == ("{category}", "{urgency}")


def test_a_server_restarts_on_the_port_of_the_one_that_was_closed(server: LMServer) -> None:
    port = server.port
    server.close()
    with pytest.raises(LMError, match="refused"):
        _triage(server.base, num_retries=0)
    with LMServer(port=port) as again:
        assert again.base == server.base and _triage(again.base).category
