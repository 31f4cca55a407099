"""DSPy's real ``dspy.LM`` path (litellm over HTTP) against an OpenAI-compatible loopback server.

The program is DSPy's quick-start (``dspy.LM("openai/...")`` + ``dspy.Predict``); the server
answers in ChatAdapter format and records every request, so the in-process and the session run
must send the same requests and get the same results. A question containing "slow" makes the
server wait: a timeout must stop the call blocked in its socket read (capacity 1: SIGALRM).
"""

import importlib
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import dspy
import pytest

import dspex
from tests.conformance.harness import SESSION, Runner, fresh_dspy_settings

CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid"}


class ChatCompletions(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict[str, Any]]] = []
    release = threading.Event()  # set at teardown: a slow answer stops waiting

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        type(self).requests.append(body)
        user = str(body["messages"][-1]["content"])
        if "slow" in user:
            type(self).release.wait(20)
        answer = next((a for c, a in CAPITALS.items() if c in user), "unknown")
        text = f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"
        data = json.dumps({
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": 0,
            "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the caller gave up (a timeout): nothing to answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def api_base() -> Iterator[str]:
    ChatCompletions.release.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatCompletions)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="chat-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        ChatCompletions.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def quickstart_program(api_base, countries):
    lm = dspy.LM("openai/conformance-model", api_base=api_base, api_key="not-a-key", cache=False)
    dspy.configure(lm=lm)
    qa = dspy.Predict("question -> answer")
    answers = [qa(question=f"What is the capital of {c}?").answer for c in countries]
    usage = [entry["usage"] for entry in lm.history]
    return answers, [entry["messages"] for entry in lm.history], usage


def test_real_lm_over_http(run: Runner, api_base: str) -> None:
    ChatCompletions.requests = []
    answers, _messages, usage = run.check(quickstart_program, api_base, ["France", "Spain"])
    assert answers == ["Paris", "Madrid"]
    assert usage[0]["total_tokens"] == 13
    sent = [r["messages"] for r in ChatCompletions.requests]
    if run.mode == SESSION:  # check() ran it in-process, then through the session: the same requests
        assert len(sent) == 4 and sent[:2] == sent[2:]
    else:
        assert len(sent) == 2


def ask_capitals(countries):
    qa = dspy.Predict("question -> answer")
    preds = [qa(question=f"What is the capital of {c}?") for c in countries]
    return [p.answer for p in preds], [p.get_lm_usage() for p in preds]


def fail_after_one_call(country):
    dspy.Predict("question -> answer")(question=f"What is the capital of {country}?")
    raise ValueError("after the LM call")


@pytest.mark.parametrize("track_usage", [False, True], ids=["plain", "track_usage"])
def test_track_usage_around_calls_counts_what_they_used(run: Runner, api_base: str, track_usage: bool) -> None:
    """DSPy docs "Tracking usage": ``with dspy.track_usage() as usage:`` around a program counts
    every LM call it made, also when it raised (and then a prediction carries no usage of its own)."""
    dspy.configure(lm=dspy.LM("openai/conformance-model", api_base=api_base, api_key="not-a-key", cache=False),
                   track_usage=track_usage)
    with dspy.track_usage() as usage:
        answers, per_prediction = run(ask_capitals, ["France", "Italy"])
        with pytest.raises(ValueError, match="after the LM call"):
            run(fail_after_one_call, "Spain")
    assert answers == ["Paris", "Rome"] and per_prediction == [None, None]
    totals = usage.get_total_tokens()["openai/conformance-model"]
    assert (totals["prompt_tokens"], totals["completion_tokens"], totals["total_tokens"]) == (30, 9, 39)
    # outside the block a prediction carries its own usage when track_usage is set
    (alone,) = run(ask_capitals, ["Spain"])[1]
    assert (alone["openai/conformance-model"]["total_tokens"] == 13) if track_usage else alone is None


def async_quickstart_program(api_base, countries):
    import asyncio

    async def main():
        with dspy.context(lm=dspy.LM("openai/conformance-model", api_base=api_base, api_key="not-a-key",
                                     cache=False)):
            qa = dspy.Predict("question -> answer")
            preds = await asyncio.gather(*(qa.acall(question=f"What is the capital of {c}?") for c in countries))
            return [p.answer for p in preds]

    return asyncio.run(main())


def test_real_lm_over_http_async(run: Runner, api_base: str) -> None:
    assert run.check(async_quickstart_program, api_base, ["Italy", "France", "Spain"]) == ["Rome", "Paris", "Madrid"]


def test_timeout_stops_a_call_blocked_on_a_slow_provider(dx: dspex.Client, api_base: str) -> None:
    s = dx.session("t")
    try:
        pid = s.run(os.getpid)
        started = time.monotonic()
        with pytest.raises(dspex.Timeout) as info:
            s.apply(quickstart_program, [api_base, ["slow France"]], timeout=2.0)
        assert info.value.details.get("stopped") is True and not info.value.details.get("hard")
        assert time.monotonic() - started < 10
        started = time.monotonic()
        answers, _, _ = s.run(quickstart_program, api_base, ["Italy"])
        assert answers == ["Rome"] and time.monotonic() - started < 10
        assert s.run(os.getpid) == pid
    finally:
        s.close(timeout=10)


def test_the_clients_lm_history_is_as_in_process(session: dspex.Session, api_base: str) -> None:
    """DSPy's quick-start debugging: ``dspy.configure(lm=dspy.LM(...))`` here, the program run, then
    ``lm.history`` and ``dspy.inspect_history``. Through a session the history is the same: the
    provider's response comes back by value, of its own class."""
    import io
    import re

    base_lm = importlib.import_module("dspy.clients.base_lm")
    seen = []
    for mode in ("inprocess", "session"):
        base_lm.GLOBAL_HISTORY.clear()
        lm = dspy.LM("openai/conformance-model", api_base=api_base, api_key="not-a-key", cache=False)
        with fresh_dspy_settings():
            dspy.configure(lm=lm)
            answers = ask_capitals(["France", "Spain"]) if mode == "inprocess" else \
                session.run(ask_capitals, ["France", "Spain"])
        out = io.StringIO()
        dspy.inspect_history(n=2, file=out)
        seen.append((answers, [(e["messages"], e["outputs"], e["usage"], e["model"], type(e["response"]))
                               for e in lm.history], re.sub(r"\[\d{4}-[\d\-T:.]+\]", "", out.getvalue())))
    assert seen[1] == seen[0]
    assert len(seen[0][1]) == 2 and "What is the capital of Spain?" in seen[0][2]
