"""The worker process: an I/O thread that owns the broker socket, and a main thread that runs calls.

The I/O thread sends READY and heartbeats and keeps doing so while user code runs for minutes,
so a long LM call never gets the worker declared dead. Requests cross to the main thread over an
inproc PAIR; replies come back the same way.
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from dspex import config
from dspex.errors import DspexError, MessageTooLarge, ProtocolError
from dspex.protocol import (
    B_CANCEL,
    B_DISCONNECT,
    B_HEARTBEAT,
    B_RELEASE_SESSION,
    B_REQUEST,
    B_REREGISTER,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    PROTOCOL_VERSION,
    W_DISCONNECT,
    W_HEARTBEAT,
    W_READY,
    W_REPLY,
    Status,
    pack_reply_header,
    unpack_request_header,
)
from worker.executor import Executor, RefTable, error_frames

log = logging.getLogger("dspex.worker")

# main thread -> I/O thread control messages (first frame)
_C_REPLY = b"r"
_C_EXIT = b"x"
# I/O thread -> main thread
_M_REQUEST = b"q"
_M_RELEASE = b"s"
_M_DRAIN = b"d"


@dataclass(frozen=True)
class WorkerOptions:
    pool: str
    backend: str
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    ref_cap: int = 100_000
    preload_dspy: bool = True
    lm_history: int = 200
    max_message: int = 0  # 0: the configured default


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Worker:
    """One worker incarnation. A restarted process is a new incarnation with a new identity."""

    def __init__(self, options: WorkerOptions, context: zmq.Context[Any] | None = None) -> None:
        self.options = options
        self.incarnation = secrets.token_hex(16)
        self.ctx = context or zmq.Context.instance()
        self.max_message = options.max_message or config.max_message_bytes()
        self.executor = Executor(RefTable(options.pool, self.incarnation, options.ref_cap))
        self._stop = threading.Event()  # set by SIGTERM or the broker's DISCONNECT
        self._pipe_addr = f"inproc://dspex-worker-{self.incarnation}"
        self._io_ready = threading.Event()
        self.started = time.time()

    # -- main thread ------------------------------------------------------------------------
    def run(self) -> int:
        pipe = self.ctx.socket(zmq.PAIR)
        pipe.setsockopt(zmq.LINGER, 0)
        pipe.bind(self._pipe_addr)
        io = threading.Thread(target=self._io_loop, name="dspex-worker-io", daemon=True)
        io.start()
        if self.options.preload_dspy:
            try:
                self.executor.enable_dspy(self.options.lm_history)
            except Exception:  # a worker without dspy still serves plain Python
                log.exception("could not import dspy; serving without per-session DSPy settings")
        try:
            while not self._stop.is_set():
                if not pipe.poll(200):
                    continue
                frames = pipe.recv_multipart(copy=False)
                kind = frames[0].bytes
                if kind == _M_REQUEST:
                    self._handle(pipe, frames[1:])
                elif kind == _M_RELEASE:
                    n = self.executor.refs.release_session(frames[1].bytes.decode())
                    log.debug("released session %s (%d refs)", frames[1].bytes.decode()[:8], n)
                elif kind == _M_DRAIN:
                    self._stop.set()
        finally:
            pipe.send(_C_EXIT)
            io.join(timeout=5)
            pipe.close(0)
        return 0

    def _handle(self, pipe: zmq.Socket[Any], frames: list[zmq.Frame]) -> None:
        client = frames[0].bytes
        req_id = 0
        try:
            header = unpack_request_header(frames[1].buffer)
            req_id = header.req_id
            reply = self.executor.execute(header, frames[2:])
            status = Status.OK.value
            size = sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in reply)
            if size > self.max_message:
                raise MessageTooLarge(f"result is {size} bytes, over the limit of {self.max_message}")
            self.executor.served += 1
        except DspexError as err:
            self.executor.errors += 1
            reply, status = error_frames(err), Status.ERROR.value
        except Exception as exc:  # a bug of ours must not kill the worker
            log.exception("internal error handling request")
            self.executor.errors += 1
            reply, status = error_frames(ProtocolError(f"internal worker error: {exc!r}")), Status.ERROR.value
        head = pack_reply_header(status, req_id, self.incarnation, self.options.pool)
        pipe.send_multipart([_C_REPLY, client, head, *reply], copy=False)

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    # -- I/O thread ---------------------------------------------------------------------------
    def _ready_frame(self) -> bytes:
        return msgpack.packb(
            {
                "pool": self.options.pool,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "incarnation": self.incarnation,
                "capacity": 1,
                "version": PROTOCOL_VERSION,
                "started": self.started,
            }
        )

    def _stats_frame(self) -> bytes:
        ex = self.executor
        return msgpack.packb({"rss": rss_bytes(), "served": ex.served, "errors": ex.errors, "refs": ex.refs.count})

    def _new_socket(self) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.DEALER)
        config.tune_socket(sock, max_message=self.max_message)
        sock.setsockopt(zmq.ROUTING_ID, self.incarnation.encode())
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.connect(self.options.backend)
        sock.send_multipart([W_READY, self._ready_frame()])
        return sock

    def _io_loop(self) -> None:
        pipe = self.ctx.socket(zmq.PAIR)
        pipe.setsockopt(zmq.LINGER, 0)
        pipe.connect(self._pipe_addr)
        sock = self._new_socket()
        poller = zmq.Poller()
        poller.register(pipe, zmq.POLLIN)
        poller.register(sock, zmq.POLLIN)
        interval = self.options.heartbeat_interval
        silence_limit = interval * self.options.heartbeat_liveness
        backoff = silence_limit
        deadline = time.monotonic() + silence_limit
        next_beat = time.monotonic() + interval
        try:
            while True:
                timeout = max(0.0, min(next_beat, deadline) - time.monotonic())
                events = dict(poller.poll(timeout * 1000))
                if pipe in events:
                    frames = pipe.recv_multipart(copy=False)
                    kind = frames[0].bytes
                    if kind == _C_EXIT:
                        # say goodbye so the broker drops our sessions now, not at heartbeat expiry
                        sock.setsockopt(zmq.LINGER, 1000)
                        try:
                            sock.send(W_DISCONNECT, zmq.NOBLOCK)
                        except zmq.Again:
                            pass
                        return
                    if kind == _C_REPLY:
                        sock.send_multipart([W_REPLY, *frames[1:]], copy=False)
                if sock in events:
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        deadline = time.monotonic() + silence_limit
                        backoff = silence_limit
                        self._from_broker(frames, pipe, sock)
                now = time.monotonic()
                if now >= next_beat:
                    sock.send_multipart([W_HEARTBEAT, self._stats_frame()])
                    next_beat = now + interval
                if now >= deadline:
                    # The broker is gone, or restarted without hearing from us. zmq reconnects
                    # by itself; we re-announce on the same socket (a new socket would race its
                    # own stale connection for our identity), backing off during a long outage.
                    log.warning("broker silent; re-sending READY (next try in %.1fs)", backoff)
                    sock.send_multipart([W_READY, self._ready_frame()])
                    deadline = now + backoff
                    backoff = min(backoff * 2, 30.0)
        finally:
            sock.close(0)
            pipe.close(0)

    def _from_broker(self, frames: list[zmq.Frame], pipe: zmq.Socket[Any], sock: zmq.Socket[Any]) -> None:
        command = frames[0].bytes
        if command == B_REQUEST:
            pipe.send_multipart([_M_REQUEST, *frames[1:]], copy=False)
        elif command == B_HEARTBEAT:
            pass
        elif command == B_RELEASE_SESSION and len(frames) >= 2:
            pipe.send_multipart([_M_RELEASE, frames[1]], copy=False)
        elif command == B_DISCONNECT:
            log.info("broker asked us to exit (recycle); finishing current work")
            pipe.send(_M_DRAIN)
        elif command == B_REREGISTER:
            sock.send_multipart([W_READY, self._ready_frame()])
        elif command == B_CANCEL:
            pass  # calls are not cancellable yet; the reply is discarded by the client
        else:
            log.warning("ignoring unknown command %r from broker", command[:8])


def main(options: WorkerOptions) -> int:
    worker = Worker(options)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    log.info("worker %s pool=%s pid=%d backend=%s", worker.incarnation[:8], options.pool, os.getpid(), options.backend)
    return worker.run()
