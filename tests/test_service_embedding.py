"""dspex embedded as production services embed it: one client answering many users at once.

A threaded HTTP server (stdlib ``ThreadingHTTPServer``) shares one blocking client among its
request threads, with a session per user (cached) or per request, each running a DSPy program
answered by DSPy's own ``DummyLM``: every reply is the one the same call gives in-process. An
asyncio service shares one ``dspex.aio`` client among a thousand concurrent tasks, a fifth of
them cancelled mid-call as users who leave: the others' replies stay right, the client keeps no
state for the cancelled calls, and every session answers at once after."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import tracemalloc
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dspy
import pytest
from dspy.utils.dummies import DummyLM

import dspex
import dspex.aio
from tests.harness import Stack

pytestmark = pytest.mark.timeout(120)

USERS = 10
QUESTIONS = [f"question {u}-{i}" for u in range(USERS) for i in range(10)]
SEEN: dict[str, str] = {}  # module state: each session's copy lives on its worker


def answer(question: str) -> tuple[str, int]:
    pred = dspy.Predict("question -> answer")(question=question)
    SEEN[question] = pred.answer
    return pred.answer, len(SEEN)


def test_a_threaded_http_service_shares_one_client_among_its_request_threads(stack: Stack) -> None:
    # the shipped heartbeat (1 s x liveness 3), not the tests' quicker one (0.75 s of silence): two
    # capacity-4 workers running DSPy beside 80 client and server threads on a loaded 2-core host
    # can leave a worker's reader without the CPU for that long, and its calls fail as crashed
    stack.heartbeat = 1.0
    stack.pool("p:strict_queue:queue_max=1000", 2, "--capacity", "4")
    dx = stack.client(timeout=30)
    lm = DummyLM({q: {"answer": "answer to " + q} for q in QUESTIONS})
    with dspy.context(lm=lm):
        # in-process, one at a time (the program without its module state, which stays empty here)
        expected = {q: dspy.Predict("question -> answer")(question=q).answer for q in QUESTIONS}
    sessions: dict[str, dspex.Session] = {}
    lock = threading.Lock()

    def session_of(user: str) -> dspex.Session:
        with lock:
            if user not in sessions:
                sessions[user] = dx.session("p")
            return sessions[user]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            _, mode, user, question = self.path.split("/", 3)
            question = urllib.request.unquote(question)
            with dspy.context(lm=lm):  # what a request handler configures travels with its calls
                if mode == "user":
                    reply, _ = session_of(user).run(answer, question)
                else:
                    with dx.session("p") as s:
                        reply, _ = s.run(answer, question)
            body = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def request(item: tuple[str, str]) -> tuple[str, str]:
        mode, question = item
        user = question.split()[1].split("-")[0]
        url = f"http://127.0.0.1:{port}/{mode}/{user}/{urllib.request.quote(question)}"
        with urllib.request.urlopen(url, timeout=60) as reply:
            return question, json.loads(reply.read())

    try:
        work = [(mode, q) for mode in ("user", "request") for q in QUESTIONS * 2]
        with ThreadPoolExecutor(40) as pool:
            got = list(pool.map(request, work))
    finally:
        server.shutdown()
        server.server_close()
    assert len(got) == 400
    assert all(reply == expected[q] for q, reply in got)
    # each user's session kept its module state: its ten questions, asked twice, once each
    assert {u: s.run(lambda: len(SEEN)) for u, s in sessions.items()} == {str(u): 10 for u in range(USERS)}
    assert dx.open_sockets <= dx.config.idle_sockets


def test_an_asyncio_service_keeps_its_replies_right_while_users_leave_mid_call(stack: Stack) -> None:
    stack.pool("p:strict_queue:queue_max=2000", 2, "--no-dspy")

    async def main() -> tuple[int, int, int, int, list[Any]]:
        dx = dspex.aio.connect(stack.frontend, timeout=30)
        try:
            sessions = [dx.session("p") for _ in range(50)]
            await asyncio.gather(*(s.eval("1") for s in sessions))
            tracemalloc.start()
            try:
                before = 0
                wrong = 0
                for round_ in range(5):
                    leaving = [asyncio.create_task(sessions[i % 50].eval("__import__('time').sleep(5)"))
                               for i in range(200)]
                    staying = [(i, asyncio.create_task(sessions[i % 50].eval("[sid, i]", {"sid": sessions[i % 50].id,
                                                                                          "i": i})))
                               for i in range(800)]
                    await asyncio.sleep(0.01)
                    for task in leaving:
                        task.cancel()
                    replies = [(i, await task) for i, task in staying]
                    wrong += sum(r != [sessions[i % 50].id, i] for i, r in replies)
                    assert all(t.cancelled() or t.done() for t in leaving)
                    del leaving, staying, replies
                    gc.collect()
                    if round_ == 0:
                        before = tracemalloc.get_traced_memory()[0]
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            after = await asyncio.wait_for(asyncio.gather(*(s.eval("sid", {"sid": s.id}) for s in sessions)), 10)
            return wrong, len(dx._sockets.pending), grown, sum(a != s.id for a, s in zip(after, sessions)), after
        finally:
            await dx.close()

    wrong, pending, grown, wrong_after, _ = asyncio.run(main())
    assert wrong == 0, "a reply reached another call"
    assert pending == 0, "the client kept state for calls nobody waits for"
    assert grown < 1_000_000, f"the client's memory grew {grown} bytes over 800 cancelled calls"
    assert wrong_after == 0
