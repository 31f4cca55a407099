"""A loopback OpenAI-compatible server that misbehaves on demand (tests only; stdlib http.server).

``GET /v1/models`` and ``POST /v1/chat/completions`` (plain and ``stream: true``). A request's mode is
the first ``rules`` entry whose text (or every text of a tuple) occurs in the request's messages
(a tuple of modes: the first for the first request it matches, the next for the next, the last
for all after), else the server's ``mode``:

* ``normal``     -- the offline stand-in's answer, in the format of the adapter that built the prompt;
* ``unparsable`` -- prose with none of the requested fields (DSPy raises ``AdapterParseError``);
* ``empty``      -- an empty message;
* ``placeholder``-- every requested field answered with its own placeholder (``{category}``), in the
                    adapter's format, as a small model that echoes the prompt does;
* ``endless``    -- generates tokens (``tokens_per_s``) until ``max_tokens`` (``finish_reason=length``),
                    the server's own ``cap_tokens`` or the client hanging up, like a base model with
                    no end-of-turn;
* ``slow``       -- waits ``delay`` seconds, then answers as ``normal``;
* ``rate_limit`` -- HTTP 429 for the first ``fail_first`` requests of that mode, then ``normal``;
* ``error``      -- HTTP 500 for the first ``fail_first`` requests of that mode, then ``normal``.

The token cap is read from the fields in ``honours``: both ``max_tokens`` and
``max_completion_tokens`` by default; ``("max_tokens",)`` is llama-cpp-python, which knows only that
one; ``("max_completion_tokens",)`` a server that reads only the newer name. A request whose cap is in
another field gets none: an ``endless`` answer then runs to ``cap_tokens`` (the server's context).

``models`` names what the server serves (``GET /v1/models`` lists them; a chat request for another
model is a 404, as vLLM and ollama answer); None serves any name and lists ``loopback``.

A refused connection needs no server: :func:`closed_port_base` gives a base URL nobody listens on;
``LMServer(port=...)`` starts a server again on the port of one that was closed (a restart).
Every request is recorded in ``calls`` (mode, status, model, the cap it honoured, the token fields
sent, tokens sent, whether the client hung up before the answer was complete).
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

MODES = ("normal", "unparsable", "empty", "placeholder", "endless", "slow", "rate_limit", "error")
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
Needle = str | tuple[str, ...]
Rule = tuple[Needle, str | tuple[str, ...]]
UNPARSABLE_TEXT = "Sure! This ticket looks important and someone should probably take a look at it soon."


@dataclass
class Call:
    path: str
    mode: str
    status: int
    model: str = ""
    max_tokens: int | None = None  # the cap this server honoured (None: unbounded)
    fields: dict[str, Any] = field(default_factory=dict)  # the token fields the request carried
    stream: bool = False
    tokens: int = 0
    hung_up: bool = False
    auth: str | None = None
    seconds: float = 0.0
    body: dict[str, Any] = field(default_factory=dict)


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def normal_answer(messages: list[dict[str, Any]], model: str) -> str:
    """What the offline stand-in answers to these chat messages (any DSPy adapter's format)."""
    from dspy.lm15 import Message, Request
    from offline_lm import OfflineEngine

    system = "\n".join(_text(m.get("content")) for m in messages if m.get("role") == "system")
    convo = [Message.user(_text(m.get("content"))) if m.get("role") == "user"
             else Message.assistant(_text(m.get("content")))
             for m in messages if m.get("role") in ("user", "assistant")] or [Message.user("")]
    request = Request(model=model or "loopback", messages=tuple(convo), system=system or None)
    return OfflineEngine().complete(request).text or ""


def placeholder_answer(messages: list[dict[str, Any]]) -> str:
    """Every output field the adapter asked for, answered with its placeholder (``{category}``)."""
    from offline_lm import _read_prompt, _render

    system = "\n".join(_text(m.get("content")) for m in messages if m.get("role") == "system")
    users = [_text(m.get("content")) for m in messages if m.get("role") == "user"]
    prompt = _read_prompt(system, users[-1] if users else "")
    if prompt.adapter == "text" or not prompt.outputs:
        return "{answer}"
    return _render(prompt, {name: "{" + name + "}" for name, _ in prompt.outputs})


class LMServer:
    """Start with ``LMServer(mode=...)`` (or as a context manager); ``base`` is the ``api_base``."""

    def __init__(self, mode: str = "normal", *, rules: tuple[Rule, ...] = (), delay: float = 5.0,
                 fail_first: int = 1, tokens_per_s: float = 400.0, cap_tokens: int = 100_000,
                 honours: tuple[str, ...] = TOKEN_FIELDS, models: tuple[str, ...] | None = None,
                 port: int = 0) -> None:
        self.mode, self.rules, self.delay, self.fail_first = mode, tuple(rules), delay, fail_first
        self.tokens_per_s, self.cap_tokens = tokens_per_s, cap_tokens
        if not set(honours) <= set(TOKEN_FIELDS):
            raise ValueError(f"honours: use some of {', '.join(TOKEN_FIELDS)}")
        self.honours, self.models = tuple(honours), models
        self.calls: list[Call] = []
        self.failed: dict[str, int] = {}
        self.hits: dict[int, int] = {}  # requests each rule matched
        self.lock = threading.Lock()
        self._check(mode, rules)
        # import dspy and the offline engine now: a first import inside two handler threads at once
        # takes seconds under load and may fail half-way, which a test would read as the model's fault
        normal_answer([{"role": "user", "content": "warm up"}], "warmup")
        handler = type("Handler", (_Handler,), {"lm": self})
        ThreadingHTTPServer.allow_reuse_address = True  # a restart binds the port its predecessor left
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="lmserver", daemon=True)
        self.thread.start()
        self.closing = threading.Event()
        self.open: set[socket.socket] = set()  # connections being answered, cut on close()

    @staticmethod
    def _check(mode: str, rules: tuple[Rule, ...]) -> None:
        for m in (mode, *(m for r in rules for m in ((r[1],) if isinstance(r[1], str) else r[1]))):
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r}: use one of {', '.join(MODES)}")

    @property
    def port(self) -> int:
        return int(self.httpd.server_port)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def set(self, mode: str | None = None, *, rules: tuple[Rule, ...] | None = None,
            **settings: Any) -> None:
        """Change the behaviour for the next requests (counters of rate_limit/error restart)."""
        self._check(mode or self.mode, rules if rules is not None else self.rules)
        with self.lock:
            self.mode = mode or self.mode
            if rules is not None:
                self.rules = tuple(rules)
                self.hits.clear()
            for k, v in settings.items():
                setattr(self, k, v)
            self.failed.clear()

    def mode_for(self, body: dict[str, Any]) -> str:
        text = "\n".join(_text(m.get("content")) for m in body.get("messages", []) if isinstance(m, dict))
        for i, (needle, modes) in enumerate(self.rules):
            if all(n in text for n in ((needle,) if isinstance(needle, str) else needle)):
                seq = (modes,) if isinstance(modes, str) else modes
                self.hits[i] = self.hits.get(i, 0) + 1
                return seq[min(self.hits[i], len(seq)) - 1]
        return self.mode

    def limit(self, body: dict[str, Any]) -> int | None:
        """The token cap of a request, read from the fields this server honours."""
        value = next((body[f] for f in self.honours if body.get(f)), None)
        return int(value) if value else None

    def completions(self, mode: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.path.endswith("/chat/completions") and (mode is None or c.mode == mode)]

    def close(self) -> None:
        """Stop serving and cut every open connection, as a server process that exits would: a
        client still waiting on a slow or endless answer sees the connection drop at once."""
        self.closing.set()  # endless/slow answers stop at once
        with self.lock:
            conns = list(self.open)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def closed_port_base() -> str:
    """An ``api_base`` on a loopback port nobody listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


class _Handler(BaseHTTPRequestHandler):
    lm: LMServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        call = Call(self.path, "models", 200, auth=self.headers.get("Authorization"))
        self.lm.calls.append(call)
        if self.path.rstrip("/") == "/v1/models":
            names = self.lm.models or ("loopback",)
            self._json(200, {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "dspex"}
                                                        for n in names]})
        else:
            call.status = 404
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        started = time.monotonic()
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        lm = self.lm
        with lm.lock:
            mode = lm.mode_for(body)
            fail = mode in ("rate_limit", "error") and lm.failed.get(mode, 0) < lm.fail_first
            if fail:
                lm.failed[mode] = lm.failed.get(mode, 0) + 1
        call = Call(self.path, mode, 200, str(body.get("model", "")), lm.limit(body),
                    {f: body[f] for f in TOKEN_FIELDS if f in body}, bool(body.get("stream")),
                    auth=self.headers.get("Authorization"), body=body)
        unknown = lm.models is not None and call.model not in lm.models
        lm.calls.append(call)
        with lm.lock:
            lm.open.add(self.connection)
        try:
            if self.path.rstrip("/") != "/v1/chat/completions":
                call.status = 404
                self._json(404, {"error": {"message": f"no route {self.path}"}})
            elif unknown:
                call.status = 404
                self._json(404, {"error": {"message": f"The model `{call.model}` does not exist.",
                                           "type": "invalid_request_error", "code": "model_not_found"}})
            elif fail and mode == "rate_limit":
                call.status = 429
                self._json(429, {"error": {"message": "Rate limit reached, retry shortly", "type": "rate_limit_error",
                                           "code": "rate_limit_exceeded"}}, extra={"Retry-After": "0"})
            elif fail:
                call.status = 500
                self._json(500, {"error": {"message": "upstream overloaded", "type": "server_error"}})
            else:
                self._answer(body, mode, call, call.max_tokens)
        finally:
            call.seconds = time.monotonic() - started
            with lm.lock:
                lm.open.discard(self.connection)
            if call.hung_up:
                self.close_connection = True

    # ------------------------------------------------------------------ answering

    def _answer(self, body: dict[str, Any], mode: str, call: Call, limit: int | None) -> None:
        if mode == "slow" and not self._wait(self.lm.delay):
            call.hung_up = True
            return
        finish = "stop"
        if mode == "endless":
            text, finish = self._generate(call, limit)
            if text is None:
                return
        elif mode == "unparsable":
            text = UNPARSABLE_TEXT
        elif mode == "empty":
            text = ""
        elif mode == "placeholder":
            text = placeholder_answer(body.get("messages", []))
        else:
            text = normal_answer(body.get("messages", []), str(body.get("model", "")))
        call.tokens = call.tokens or len(text.split())
        if body.get("stream"):
            self._stream(body, text, finish)
        else:
            prompt = sum(len(_text(m.get("content")).split()) for m in body.get("messages", []))
            self._json(200, {
                "id": f"chatcmpl-{len(self.lm.calls)}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": call.tokens,
                          "total_tokens": prompt + call.tokens}})

    def _generate(self, call: Call, limit: int | None) -> tuple[str | None, str]:
        """Tokens until the limit, the cap or a hang-up; None when the client left."""
        cap = min(limit or self.lm.cap_tokens, self.lm.cap_tokens)
        words: list[str] = []
        step = 1.0 / self.lm.tokens_per_s
        next_check = time.monotonic()
        while len(words) < cap:
            words.append(f"word{len(words) % 97}")
            time.sleep(step)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.05
                if self._client_gone() or self.lm.closing.is_set():
                    call.tokens, call.hung_up = len(words), True
                    return None, "length"
        call.tokens = len(words)
        return " ".join(words), "length"

    def _wait(self, seconds: float) -> bool:
        """Sleep, watching for a client that hangs up; False when it did."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._client_gone() or self.lm.closing.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                return False
        return True

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _stream(self, body: dict[str, Any], text: str, finish: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        base = {"id": "chatcmpl-stream", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model")}
        pieces = text.split(" ") if text else [""]
        for i, piece in enumerate(pieces):
            delta = {"content": (" " if i else "") + piece}
            self._event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        self._event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _json(self, code: int, payload: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:
            pass
