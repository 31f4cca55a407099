"""A loopback OpenAI-compatible chat server: a fixed latency (the serving bench) or a fixed amount
of CPU work per request (a local model's stand-in, the localmodel bench).

``python -m bench.lmserver --latency 0.3`` binds 127.0.0.1 on a free port and prints
``{"port": N}`` on stdout once it listens. Every ``POST .../chat/completions`` is answered
``latency`` seconds after its body arrived with a ChatAdapter-formatted ``reasoning`` + ``answer``
(what ``dspy.ChainOfThought("question -> answer")`` parses); ``GET /stats`` returns the number of
completions answered and the seconds spent computing them. asyncio with keep-alive connections:
thousands of concurrent requests cost one coroutine each, so the server's own CPU never sets the
pace of the serving benchmark.

``--burn-ms B --burn-threads T``: like a local model server with one slot, requests are computed
one at a time, each the same fixed work (SHA-256 over 256 KB blocks, which releases the GIL, split
over T threads: T cores busy, as a model's threads are); its size is what takes B ms on this
machine at start-up (``{"burn_blocks": N}`` in the first line). A process that wakes up on a core
meanwhile preempts it, and the request's compute time (``/stats`` ``compute_s``) grows.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

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


_BLOCK = bytes(256 * 1024)


def _hash_blocks(n: int) -> None:
    for _ in range(n):
        hashlib.sha256(_BLOCK).digest()


def calibrate(burn_ms: float) -> int:
    """Blocks whose hashing takes ``burn_ms`` on one core now (the fastest of a few tries)."""
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        _hash_blocks(20)
        best = min(best, (time.perf_counter() - t) / 20)
    return max(1, round(burn_ms / 1e3 / best))


class Server:
    def __init__(self, latency: float, burn_blocks: int = 0, burn_threads: int = 2) -> None:
        self.latency = latency
        self.answered = 0
        self.compute_s = 0.0
        self.burn_blocks = burn_blocks
        self.burn_threads = burn_threads
        self.pool = ThreadPoolExecutor(burn_threads) if burn_blocks else None
        self.slot = asyncio.Lock()  # one request computed at a time

    async def compute(self) -> None:
        if self.pool is None:
            await asyncio.sleep(self.latency)
            return
        loop = asyncio.get_running_loop()
        share = [self.burn_blocks // self.burn_threads + (i < self.burn_blocks % self.burn_threads)
                 for i in range(self.burn_threads)]
        async with self.slot:
            t = time.perf_counter()
            await asyncio.gather(*(loop.run_in_executor(self.pool, _hash_blocks, n) for n in share))
            self.compute_s += time.perf_counter() - t

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
                    await self.compute()
                    self.answered += 1
                    writer.write(_response("200 OK", _BODY))
                elif method == "GET" and path.rstrip("/") == "/stats":
                    writer.write(_response("200 OK", json.dumps({"answered": self.answered, "compute_s": self.compute_s}).encode()))
                else:
                    writer.write(_response("404 Not Found", b'{"error": {"message": "no route"}}'))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


async def serve(latency: float, port: int, burn_ms: float = 0.0, burn_threads: int = 2) -> None:
    blocks = calibrate(burn_ms) if burn_ms else 0
    srv = Server(latency, blocks, burn_threads)
    server = await asyncio.start_server(srv.handle, "127.0.0.1", port, backlog=4096)
    print(json.dumps({"port": server.sockets[0].getsockname()[1], "burn_blocks": blocks}), flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lmserver")
    p.add_argument("--latency", type=float, default=0.3)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--burn-ms", type=float, default=0.0, help="fixed CPU work per request instead of --latency")
    p.add_argument("--burn-threads", type=int, default=2)
    a = p.parse_args(argv)
    try:
        asyncio.run(serve(a.latency, a.port, a.burn_ms, a.burn_threads))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
