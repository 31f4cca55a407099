"""A loopback OpenAI-compatible chat server that answers after a fixed latency (the serving bench).

``python -m bench.lmserver --latency 0.3`` binds 127.0.0.1 on a free port and prints
``{"port": N}`` on stdout once it listens. Every ``POST .../chat/completions`` is answered
``latency`` seconds after its body arrived with a ChatAdapter-formatted ``reasoning`` + ``answer``
(what ``dspy.ChainOfThought("question -> answer")`` parses); ``GET /stats`` returns the number of
completions answered. asyncio with keep-alive connections: thousands of concurrent requests cost
one coroutine each, so the server's own CPU never sets the pace of the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

CONTENT = ("[[ ## reasoning ## ]]\nThe question asks for a number; the answer is the one asked for.\n\n"
           "[[ ## answer ## ]]\n42\n\n[[ ## completed ## ]]")
_BODY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "loopback",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": CONTENT}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 100, "completion_tokens": 30, "total_tokens": 130},
}).encode()


def _response(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: keep-alive\r\n\r\n").encode() + body


class Server:
    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.answered = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = (lines[0].split(" ") + ["", ""])[:2]
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                if length:
                    await reader.readexactly(length)
                if method == "POST" and path.rstrip("/").endswith("/chat/completions"):
                    await asyncio.sleep(self.latency)
                    self.answered += 1
                    writer.write(_response("200 OK", _BODY))
                elif method == "GET" and path.rstrip("/") == "/stats":
                    writer.write(_response("200 OK", json.dumps({"answered": self.answered}).encode()))
                else:
                    writer.write(_response("404 Not Found", b'{"error": {"message": "no route"}}'))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


async def serve(latency: float, port: int) -> None:
    srv = Server(latency)
    server = await asyncio.start_server(srv.handle, "127.0.0.1", port, backlog=4096)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lmserver")
    p.add_argument("--latency", type=float, default=0.3)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)
    try:
        asyncio.run(serve(a.latency, a.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
