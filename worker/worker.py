"""The worker process: an I/O thread that owns the broker socket, and threads that run calls.

The I/O thread sends READY and heartbeats and keeps doing so while user code runs for minutes,
so a long LM call never gets the worker declared dead. Requests cross to the main thread over an
inproc PAIR; the main thread runs them itself (capacity 1) or on a thread pool (capacity > 1);
replies come back to the I/O thread over a PUSH/PULL pair that any thread may use.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from dspex import config
from dspex.errors import DspexError, MessageTooLarge, ProtocolError
from dspex.protocol import (
    B_CANCEL,
    B_CREDIT,
    B_DISCONNECT,
    B_HEARTBEAT,
    B_RELEASE_SESSION,
    B_REQUEST,
    B_REREGISTER,
    FLAG_STREAM,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    PROTOCOL_VERSION,
    STREAM_WINDOW,
    W_DISCONNECT,
    W_HEARTBEAT,
    W_PARTIAL,
    W_READY,
    W_REPLY,
    Status,
    pack_reply_header,
    unpack_request_header,
)
from worker.executor import Executor, RefTable, StreamControl, error_frames

log = logging.getLogger("dspex.worker")

# I/O thread -> main thread (first frame)
_M_REQUEST = b"q"
_M_RELEASE = b"s"
_M_DRAIN = b"d"
# any thread -> I/O thread
_C_REPLY = b"r"
_C_PARTIAL = b"p"
_C_EXIT = b"x"


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
    capacity: int = 1  # calls run at once, in threads
    curve_server_key: bytes | None = None
    curve_keypair: tuple[bytes, bytes] | None = None


def _packb(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj)
    return data


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
        self.capacity = max(1, options.capacity)
        self.executor = Executor(RefTable(options.pool, self.incarnation, options.ref_cap))
        self._stop = threading.Event()  # set by SIGTERM or the broker's DISCONNECT
        self._pipe_addr = f"inproc://dspex-worker-{self.incarnation}"
        self._out_addr = f"inproc://dspex-worker-out-{self.incarnation}"
        self._out_bound = threading.Event()
        self._local = threading.local()
        self._streams: dict[tuple[bytes, int], StreamControl] = {}
        self._early_cancels: set[tuple[bytes, int]] = set()
        self._streams_lock = threading.Lock()
        self.started = time.time()

    # -- main thread ------------------------------------------------------------------------
    def run(self) -> int:
        pipe = self.ctx.socket(zmq.PAIR)
        pipe.setsockopt(zmq.LINGER, 0)
        pipe.bind(self._pipe_addr)
        io = threading.Thread(target=self._io_loop, name="dspex-worker-io", daemon=True)
        io.start()
        self._out_bound.wait(10)
        if self.options.preload_dspy:
            try:
                self.executor.enable_dspy(self.options.lm_history)
            except Exception:  # a worker without dspy still serves plain Python
                log.exception("could not import dspy; serving without per-session DSPy settings")
        pool = ThreadPoolExecutor(self.capacity, thread_name_prefix="dspex-call") if self.capacity > 1 else None
        try:
            while not self._stop.is_set():
                if not pipe.poll(200):
                    continue
                frames = pipe.recv_multipart(copy=False)
                kind = frames[0].bytes
                if kind == _M_REQUEST:
                    if pool is None:
                        self._handle(frames[1:])
                    else:
                        pool.submit(self._handle, frames[1:])
                elif kind == _M_RELEASE:
                    n = self.executor.refs.release_session(frames[1].bytes.decode())
                    log.debug("released session %s (%d refs)", frames[1].bytes.decode()[:8], n)
                elif kind == _M_DRAIN:
                    self._stop.set()
        finally:
            if pool is not None:
                pool.shutdown(wait=True)  # a recycle finishes the calls it has
            self._out().send(_C_EXIT)
            io.join(timeout=5)
            pipe.close(0)
        return 0

    def _out(self) -> zmq.Socket[Any]:
        """This thread's socket to the I/O thread."""
        sock: zmq.Socket[Any] | None = getattr(self._local, "out", None)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(self._out_addr)
            self._local.out = sock
        return sock

    def _handle(self, frames: list[zmq.Frame]) -> None:
        client = frames[0].bytes
        req_id = 0
        out = self._out()
        stream: StreamControl | None = None
        try:
            header = unpack_request_header(frames[1].buffer)
            req_id = header.req_id
            if header.flags & FLAG_STREAM:
                stream = self._open_stream(client, header.req_id, header.timeout_ms, out)
            reply = self.executor.execute(header, frames[2:], stream)
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
        finally:
            if stream is not None:
                with self._streams_lock:
                    self._streams.pop((client, req_id), None)
        head = pack_reply_header(status, req_id, self.incarnation, self.options.pool)
        out.send_multipart([_C_REPLY, client, head, *reply], copy=False)

    def _open_stream(self, client: bytes, req_id: int, timeout_ms: int, out: zmq.Socket[Any]) -> StreamControl:
        head_part = pack_reply_header(Status.PARTIAL.value, req_id, self.incarnation, self.options.pool)
        head_prog = pack_reply_header(Status.PROGRESS.value, req_id, self.incarnation, self.options.pool)

        def emit(kind: str, frames: list[Any]) -> None:
            head = head_part if kind == Status.PARTIAL.value else head_prog
            out.send_multipart([_C_PARTIAL, client, head, *frames], copy=False)

        # a consumer that stops acknowledging for this long has gone away: stop producing
        stall = timeout_ms / 1000 if timeout_ms > 0 else 300.0
        control = StreamControl(emit, STREAM_WINDOW, stall)
        key = (client, req_id)
        with self._streams_lock:
            self._streams[key] = control
            if key in self._early_cancels:
                self._early_cancels.discard(key)
                control.cancel()
        return control

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    # -- I/O thread ---------------------------------------------------------------------------
    def _ready_frame(self) -> bytes:
        return _packb(
            {
                "pool": self.options.pool,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "incarnation": self.incarnation,
                "capacity": self.capacity,
                "version": PROTOCOL_VERSION,
                "started": self.started,
            }
        )

    def _stats_frame(self) -> bytes:
        ex = self.executor
        return _packb({"rss": rss_bytes(), "served": ex.served, "errors": ex.errors, "refs": ex.refs.count})

    def _new_socket(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
        config.tune_socket(sock, max_message=self.max_message)
        sock.setsockopt(zmq.ROUTING_ID, self.incarnation.encode())
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if self.options.curve_server_key is not None:
            public, secret = self.options.curve_keypair or zmq.curve_keypair()
            sock.curve_serverkey = self.options.curve_server_key
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        sock.connect(self.options.backend)
        sock.send_multipart([W_READY, self._ready_frame()])
        return sock

    def _io_loop(self) -> None:
        pipe = self.ctx.socket(zmq.PAIR)
        pipe.setsockopt(zmq.LINGER, 0)
        pipe.connect(self._pipe_addr)
        replies = self.ctx.socket(zmq.PULL)
        replies.setsockopt(zmq.LINGER, 0)
        replies.bind(self._out_addr)
        self._out_bound.set()
        sock = self._new_socket()
        poller = zmq.Poller()
        poller.register(replies, zmq.POLLIN)
        poller.register(sock, zmq.POLLIN)
        interval = self.options.heartbeat_interval
        silence_limit = interval * self.options.heartbeat_liveness
        backoff = silence_limit
        deadline = time.monotonic() + silence_limit
        next_beat = time.monotonic() + interval
        try:
            while True:
                timeout = max(0.0, min(next_beat, deadline) - time.monotonic())
                events = dict(poller.poll(int(timeout * 1000)))
                if replies in events:
                    while True:
                        try:
                            frames = replies.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        kind = frames[0].bytes
                        if kind == _C_EXIT:
                            # say goodbye so the broker drops our sessions now, not at expiry
                            sock.setsockopt(zmq.LINGER, 1000)
                            try:
                                sock.send(W_DISCONNECT, zmq.NOBLOCK)
                            except zmq.Again:
                                pass
                            return
                        command = W_REPLY if kind == _C_REPLY else W_PARTIAL
                        sock.send_multipart([command, *frames[1:]], copy=False)
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
            replies.close(0)
            pipe.close(0)

    def _from_broker(self, frames: list[zmq.Frame], pipe: zmq.Socket[Any], sock: zmq.Socket[Any]) -> None:
        command = frames[0].bytes
        if command == B_REQUEST:
            pipe.send_multipart([_M_REQUEST, *frames[1:]], copy=False)
        elif command == B_HEARTBEAT:
            pass
        elif command in (B_CREDIT, B_CANCEL) and len(frames) >= 3:
            self._stream_control(command, frames)
        elif command == B_RELEASE_SESSION and len(frames) >= 2:
            pipe.send_multipart([_M_RELEASE, frames[1]], copy=False)
        elif command == B_DISCONNECT:
            log.info("broker asked us to exit (recycle); finishing current work")
            pipe.send(_M_DRAIN)
        elif command == B_REREGISTER:
            sock.send_multipart([W_READY, self._ready_frame()])
        else:
            log.warning("ignoring unknown command %r from broker", command[:8])

    def _stream_control(self, command: bytes, frames: list[zmq.Frame]) -> None:
        try:
            req_id, n = msgpack.unpackb(frames[2].buffer)
            key = (frames[1].bytes, int(req_id))
        except Exception:
            log.warning("malformed stream control from broker")
            return
        with self._streams_lock:
            control = self._streams.get(key)
            if control is None:
                if command == B_CANCEL and len(self._early_cancels) < 10_000:
                    self._early_cancels.add(key)  # the request may still be on its way to a thread
                return
        if command == B_CANCEL:
            control.cancel()
        else:
            control.add_credit(int(n))


def main(options: WorkerOptions) -> int:
    worker = Worker(options)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    log.info("worker %s pool=%s pid=%d capacity=%d backend=%s", worker.incarnation[:8], options.pool,
             os.getpid(), worker.capacity, options.backend)
    return worker.run()
