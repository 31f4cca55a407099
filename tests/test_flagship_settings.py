"""The flagship's LM settings, failure records, budget words and start-up progress: pure logic."""

from __future__ import annotations

import pytest
from flagship_gepa import budget_text, gepa_outcome
from flagship_lm import (
    DEFAULT_LM_TIMEOUT,
    LMBounds,
    count_line,
    failure_from_record,
    failure_kind,
    failure_of,
    parse_lm_kwarg,
    resolve_bounds,
    resolve_lm,
)

import dspex
from tests.flagship_example import load_flagship

flagship = load_flagship("dspex_flagship_settings_under_test")


def test_bounds_flags_then_environment_then_defaults() -> None:
    assert resolve_bounds(env={}) == LMBounds()
    env = {"DSPEX_MAX_TOKENS": "256", "DSPEX_LM_TIMEOUT": "12.5", "DSPEX_LM_NUM_RETRIES": "4",
           "DSPEX_REFLECTION_MAX_TOKENS": "999", "DSPEX_LM_KWARGS": "top_p=0.9 stop=[\"END\"]", "DSPEX_LM_CACHE": "0"}
    b = resolve_bounds(env=env)
    assert (b.max_tokens, b.reflection_max_tokens, b.timeout, b.num_retries, b.cache) == (256, 999, 12.5, 4, False)
    assert dict(b.extra) == {"top_p": 0.9, "stop": ["END"]}
    b = resolve_bounds(max_tokens=64, lm_timeout=3, num_retries=0, lm_kwargs=["top_p=0.5", "seed=7"], env=env)
    assert (b.max_tokens, b.timeout, b.num_retries, dict(b.extra)) == (64, 3.0, 0, {"top_p": 0.5, "stop": ["END"],
                                                                                   "seed": 7})
    assert resolve_bounds(no_cache=True, env={}).cache is False
    for bad in ({"max_tokens": 0}, {"lm_timeout": 0}, {"num_retries": -1}):
        with pytest.raises(dspex.ConfigError):
            resolve_bounds(**bad, env={})  # type: ignore[arg-type]
    with pytest.raises(dspex.ConfigError, match="KEY=VALUE"):
        parse_lm_kwarg("novalue")
    with pytest.raises(dspex.ConfigError, match="environment variable"):
        parse_lm_kwarg("api_key=secret")


def test_call_timeout_outlives_every_lm_attempt() -> None:
    for timeout, retries in ((DEFAULT_LM_TIMEOUT, 2), (1.0, 0), (30.0, 5)):
        b = LMBounds(timeout=timeout, num_retries=retries)
        assert b.call_timeout > timeout * (retries + 1) and b.call_timeout > 2 * timeout


def test_kwargs_per_role_and_offline() -> None:
    spec = resolve_lm("openai/m", "http://127.0.0.1:9/v1", env={}, bounds=LMBounds(max_tokens=100,
                      reflection_max_tokens=900, timeout=7, num_retries=1, extra=(("top_p", 0.5),)))
    task, refl = spec.lm_kwargs(0.2), spec.lm_kwargs(0.9, "reflection")
    assert (task["max_tokens"], task["timeout"], task["num_retries"], task["cache"], task["top_p"]) == (100, 7, 1, True, 0.5)
    assert refl["max_tokens"] == 900 and refl["cache"] is False  # reflection never replays the cache
    assert spec.public()["bounds"]["call_timeout_s"] == spec.bounds.call_timeout
    assert "api_key" not in spec.public()["lm_kwargs"]
    offline = resolve_lm(None, env={})
    assert offline.lm_kwargs(0.2) == {"temperature": 0.2}  # the custom engine refuses client settings
    assert "LM timeout 7s" in spec.bounds.describe() and "max_tokens 100 (triage/insights)" in spec.bounds.describe()


def test_a_local_server_gets_the_token_cap_in_both_fields() -> None:
    """dspy's native engine sends max_completion_tokens, litellm max_tokens; llama-cpp-python reads only
    max_tokens: a local server gets both (tests/test_flagship_failures.py checks it on the wire)."""
    local = resolve_lm("openai/m", "http://127.0.0.1:9/v1", env={}, bounds=LMBounds(max_tokens=100,
                       reflection_max_tokens=900))
    assert local.lm_kwargs(0.2)["extra_body"] == {"max_tokens": 100, "max_completion_tokens": 100}
    assert local.lm_kwargs(0.9, "reflection")["extra_body"] == {"max_tokens": 900, "max_completion_tokens": 900}
    assert "token cap sent as max_tokens and max_completion_tokens" in local.bounds_line()
    # a hosted provider gets dspy's own field only; --lm-kwarg extra_body=... replaces ours
    hosted = resolve_lm("gemini/g", env={"GEMINI_API_KEY": "k"})
    assert "extra_body" not in hosted.lm_kwargs(0.2) and hosted.token_fields() == ()
    mine = resolve_lm("openai/m", "http://127.0.0.1:9/v1", env={},
                      bounds=resolve_bounds(lm_kwargs=["extra_body={}"], env={}))
    assert mine.lm_kwargs(0.2)["extra_body"] == {} and mine.token_fields() == ()


@pytest.mark.parametrize("error,message,kind", [
    ("AdapterParseError", "Adapter JSONAdapter failed to parse the LM response.", "unparsed"),
    ("LMTransportError", "[openai/x] failed to connect to 127.0.0.1:48015: [Errno 111] Connection refused",
     "connection refused"),
    ("LMServerError", "[x] litellm.InternalServerError: InternalServerError: OpenAIException - Connection error.",
     "connection failed"),
    ("LMTransportError", "[openai/x] read timed out waiting for headers: no bytes for 1s", "timed out"),
    ("LMTimeoutError", "[x] litellm.Timeout: APITimeoutError - Request timed out.", "timed out"),
    ("LMRateLimitError", "[openai/x] Rate limit reached (429)", "rate limited"),
    ("LMServerError", "[openai/x] upstream overloaded", "server error"),
    ("LMProviderError", "[openai/x] The model `nope` does not exist.", "model not found"),
])
def test_failure_kinds_name_what_happened(error: str, message: str, kind: str) -> None:
    """The messages dspy 3.4's engines give (lm15 and litellm), labelled by what happened."""
    assert failure_kind(error, message) == kind

def test_failure_records_type_adapter_and_hint() -> None:
    spec = resolve_lm("openai/m", "http://127.0.0.1:9/v1", env={})
    err = dspex.RemoteError("LM response cannot be serialized to a JSON object.\n\nAdapter JSONAdapter failed to "
                            "parse the LM response.", type="AdapterParseError", traceback="")
    f = failure_of("triage", "INC-002", err, spec, session="s1", worker="w1", seconds=1.23456)
    assert (f.error, f.adapter, f.seconds, f.label()) == ("AdapterParseError", "JSONAdapter", 1.235,
                                                         "AdapterParseError (JSONAdapter)")
    assert "instruction-tuned" in f.hint and "\n" not in f.message and f.tag() == "<unparsed>"
    slow = failure_of("triage", "INC-1", dspex.RemoteError("[openai/m] read timed out waiting for headers",
                                                           type="LMTransportError", traceback=""), spec)
    assert "--lm-timeout 60s" in slow.hint and slow.tag() == "<timed out>"
    assert count_line([f, f, slow], 5, "tickets") == ("3/5 tickets failed: AdapterParseError \u00d72, "
                                                      "LMTransportError (timed out) \u00d71")
    assert count_line([], 5, "tickets") == ""
    # a timeout the JSONAdapter fallback turned into a parse error is reported as the timeout it was
    record = {"error": "LMTransportError", "message": "[openai/m] read timed out waiting for headers",
              "then": "AdapterParseError: Adapter JSONAdapter failed to parse the LM response."}
    both = failure_from_record("triage", "INC-2", record, spec)
    assert (both.kind, both.error, both.adapter) == ("timed out", "LMTransportError", "JSONAdapter")
    assert both.label() == "LMTransportError" and both.then and both.then.startswith("AdapterParseError")


def test_exit_codes() -> None:
    import signal

    from dspexctl.flagship import Interrupted, _exit_code

    assert flagship.exit_code_for(dspex.Timeout("x", lm_too_slow=True)) == 10
    assert flagship.exit_code_for(dspex.Timeout("x")) == 1
    assert flagship.exit_code_for(dspex.ConfigError("x")) == 2
    assert flagship.exit_code_for(flagship.LMUnusable("x")) == 11
    for err, code in ((Interrupted(signal.SIGINT), 130), (Interrupted(signal.SIGTERM), 143),
                      (Interrupted(signal.SIGHUP), 129), (flagship.LMUnusable("x"), 11),
                      (dspex.Timeout("x", lm_too_slow=True), 10), (dspex.ConfigError("x"), 2),
                      (dspex.BrokerUnreachable("x"), 4), (dspex.Timeout("x"), 8)):
        assert _exit_code(err, flagship) == code, err


def test_a_dspexctl_exit_code_means_one_thing_whichever_command_returns_it() -> None:
    """The flagship's own codes (defined by the example it runs) and every other command's
    (dspexctl.commands) share a number only where they share the meaning."""
    from dspexctl import commands

    same = {"EXIT_OK": "EXIT_OK", "EXIT_FAILED": "EXIT_ERROR", "EXIT_USAGE": "EXIT_USAGE",
            "EXIT_UNREACHABLE": "EXIT_UNREACHABLE"}  # the flagship's name -> dspexctl's
    theirs = {getattr(commands, n): n for n in dir(commands)
              if n.startswith("EXIT_") and isinstance(getattr(commands, n), int)}
    assert len(theirs) == len([n for n in dir(commands)  # (EXIT_FOR_STATE maps states to these codes)
                               if n.startswith("EXIT_") and isinstance(getattr(commands, n), int)]), "one meaning per code"
    for name in (n for n in dir(flagship) if n.startswith("EXIT_")):
        code = getattr(flagship, name)
        assert theirs.get(code, same.get(name)) == same.get(name), f"{name} = {code} is {theirs.get(code)} too"


def test_budget_words_and_gepa_outcomes() -> None:
    assert flagship.DEFAULT_MAX_METRIC_CALLS == 30 and flagship.ORIGINAL_MAX_METRIC_CALLS == 3
    assert budget_text(3, 30) == ("--max-metric-calls 3, the original flagship's budget: the baseline evaluation "
                                  "only (3 valset examples), no reflection; the default 30 lets GEPA reflect")
    assert budget_text(30, 30).startswith("budget 30 (the default): 3 metric calls score the baseline, the other 27")
    assert budget_text(12, 30).startswith("budget 12: 3 metric calls")
    assert gepa_outcome("Iteration 4: All subsample scores perfect for parent 0. Skipping.") == "skipped_perfect"
    assert gepa_outcome("Iteration 2: Proposed new text for self: Do X") == "proposed"
    assert gepa_outcome("Batched reflection failed (boom); retrying per task.") == "failed"
    assert gepa_outcome("Iteration 3: New subsample score 0.5 is not better than old score 1.0, skipping") == "rejected"
    assert gepa_outcome("Iteration 5: Reflective mutation did not propose a new candidate") == "no_proposal"
    assert gepa_outcome("Iteration 1: Found a better program on the valset with score 1.0.") == "accepted"
    assert gepa_outcome("Iteration 1: Selected program 0 score: 0.5") is None


def test_stack_stack_progress_has_no_alarming_lines() -> None:
    from dspexctl.flagship import _stack_progress

    said: list[str] = []
    progress = _stack_progress(said.append)
    progress("starting supervisord -c supervisor.conf")
    for _ in range(3):
        progress("waiting for the broker (broker: nothing is listening at ipc:///tmp/x/f.sock (is the broker running?))")
    progress("ready: triage_pool 2/2")
    assert said == ["  starting supervisord -c supervisor.conf", "  waiting for the broker to start",
                    "  ready: triage_pool 2/2"]


class _QueuedSession:
    """What the flow needs of a session whose call waited out the pool's queue_timeout."""

    id, worker, pool = "5e5510a1deadbeef", "w0rker00", "triage_pool"

    def eval(self, *args: object, **kwargs: object) -> None:
        raise dspex.QueueTimeout("waited 30.0s in pool 'triage_pool', over its queue timeout of 30s",
                                 pool="triage_pool")


def test_queue_timeout_of_an_lm_call_says_why_and_where_to_change_it() -> None:
    from types import SimpleNamespace

    spec = resolve_lm("openai/m", "http://127.0.0.1:9/v1", env={}, bounds=LMBounds(timeout=60, num_retries=2))
    flow = flagship._Flow(SimpleNamespace(timeout=60.0), spec, print, 10.0)
    with pytest.raises(dspex.QueueTimeout) as info:
        flow.predict(_QueuedSession(), None, {"ticket": "x"}, step="triage", item="INC-003")  # type: ignore[arg-type]
    msg = info.value.message
    assert msg.startswith("triage INC-003: waited 30.0s in pool 'triage_pool'")
    assert f"up to {spec.bounds.call_timeout:g}s" in msg and "[dspex:pool:triage_pool]" in msg
    assert info.value.details["pool"] == "triage_pool"
