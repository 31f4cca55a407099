"""The synchronous client: ``dspex.connect()``, sessions, refs, and the rehydration helper.

Thread safety: each thread that calls through a Client gets its own DEALER socket (created on
first use), so threads never share a socket and need no lock or I/O thread in the call path.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generic, Sequence, TypeVar

import msgpack
import zmq
from zmq.utils.monitor import parse_monitor_message

from dspex import codec, config
from dspex.zmqfast import recv_frames, send_frames
from dspex.errors import (
    Cancelled,
    ConnectionError,
    DspexError,
    MessageTooLarge,
    ProtocolError,
    Refused,
    SessionClosed,
    SessionWorkerUnavailable,
    Timeout,
    error_from_wire,
)
from dspex.protocol import FLAG_STREAM, STREAM_WINDOW, Op, RequestHeader, Status, unpack_reply_header
from dspex.ref import Ref

log = logging.getLogger("dspex.client")

DEFAULT_TIMEOUT = 60.0

T = TypeVar("T")


class _Channel:
    """One thread's socket to the broker."""

    __slots__ = ("sock", "monitor", "poller", "ids", "streams", "broken", "refused", "__weakref__")

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self.sock = sock
        self.broken = False  # a drop was seen: replace the socket before the next request
        # A lost connection fails the requests waiting on it at once (typed ConnectionError)
        # instead of leaving them to time out: the broker that had them is gone.
        self.monitor: zmq.Socket[Any] = sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.ids = itertools.count(1)
        # replies of this thread's open streams that arrived while it waited for something else
        self.streams: dict[int, deque[tuple[str, str, list[Any]]]] = {}
        self.refused = False  # the broker refused our CURVE key (nothing we send can run)

    def disconnected(self) -> str:
        """Drain the monitor: why the connection to the broker dropped since the last look, or ""."""
        why = ""
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return why
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                why = "the broker refused this client's CURVE key"
                self.refused = True
            elif not why:
                why = "lost the connection to the broker"


class CreditMeter:
    """Counts streamed replies consumed and says when to grant the producer more credit."""

    __slots__ = ("unacked",)

    def __init__(self) -> None:
        self.unacked = 0

    def consumed(self) -> int:
        """Credit to send now (0: not yet): half a window at a time keeps the producer busy."""
        self.unacked += 1
        if self.unacked < STREAM_WINDOW // 2:
            return 0
        n, self.unacked = self.unacked, 0
        return n


class Client:
    """A connection to a dspex broker. Safe to share between threads."""

    def __init__(self, endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 *, curve_server_key: bytes | None = None, curve_keypair: tuple[bytes, bytes] | None = None) -> None:
        self.endpoint = config.check_endpoint(config.client_endpoint(endpoint))
        self.timeout = timeout
        self.max_message = config.max_message_bytes()
        if self.endpoint.startswith("tcp://") and curve_server_key is None:
            curve_server_key, curve_keypair = config.curve_client_keys(
                self.endpoint, os.environ.get("DSPEX_CURVE_SERVER_KEY"), os.environ.get("DSPEX_CURVE_CLIENT_KEY"))
        self._curve = (curve_server_key, curve_keypair)
        self._own_frames = not self.endpoint.startswith("inproc://")  # arrays decode without a copy
        self._ctx = zmq.Context()
        self._local = threading.local()
        self._channels: weakref.WeakSet[_Channel] = weakref.WeakSet()
        self._socks: list[zmq.Socket[Any]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        for sock in self._socks:
            sock.close(0)
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _drop_channel(self, ch: _Channel) -> None:
        """Forget this thread's socket; the next request makes a fresh one."""
        self._local.channel = None
        with self._lock:
            for sock in (ch.monitor, ch.sock):
                if sock in self._socks:
                    self._socks.remove(sock)
        ch.sock.disable_monitor()
        ch.monitor.close(0)
        ch.sock.close(0)

    def _channel(self, probe: bool = True) -> _Channel:
        ch: _Channel | None = getattr(self._local, "channel", None)
        if ch is not None:
            return ch
        if probe:  # before making a socket: a failed probe must not leave one behind
            config.probe_ipc(self.endpoint)
        with self._lock:
            if self._closed:
                raise ConnectionError("client is closed")
            sock = self._ctx.socket(zmq.DEALER)
            self._socks.append(sock)
        config.tune_socket(sock, max_message=self.max_message)
        # a fixed identity lets replies find us again after the broker restarts
        sock.setsockopt(zmq.ROUTING_ID, b"c" + secrets.token_bytes(15))
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        server_key, keypair = self._curve
        if server_key is not None:
            if keypair is None:
                keypair = zmq.curve_keypair()
            sock.curve_serverkey = server_key
            sock.curve_publickey, sock.curve_secretkey = keypair
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            with self._lock:
                self._socks.remove(sock)
            sock.close(0)
            raise ConnectionError(f"cannot connect to {self.endpoint}: {exc}") from None
        ch = _Channel(sock)
        self._socks.append(ch.monitor)
        self._local.channel = ch
        return ch

    # -- the request/reply core -------------------------------------------------------------
    def _send(self, op: str, pool: str, session: str, body: Any, worker: str, timeout: float,
              flags: int = 0) -> tuple[_Channel, int]:
        if self._closed:
            raise ConnectionError("client is closed")
        ch = self._channel()
        if (ch.broken or ch.disconnected()) and not ch.streams:
            # zmq reconnects by itself after a broker restart, but never after a protocol error
            # (a reply over this socket's MAXMSGSIZE): a fresh socket works in both cases
            self._drop_channel(ch)
            ch = self._channel(probe=False)
        req_id = next(ch.ids)
        header = RequestHeader(op, req_id, pool, session, worker, int(timeout * 1000), flags).pack()
        frames = codec.encode(body if body is not None else [])
        size = sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames)
        if size > self.max_message:
            raise MessageTooLarge(f"request is {size} bytes, over the limit of {self.max_message}")
        send_frames(ch.sock, [header, *frames], copy=len(frames) == 1)
        return ch, req_id

    def _recv(self, ch: _Channel, req_id: int, timeout: float, op: str) -> tuple[str, str, list[Any]]:
        """The next reply frame set for ``req_id`` on this thread's socket: (status, worker, body)."""
        mailbox = ch.streams.get(req_id)
        if mailbox:
            return mailbox.popleft()
        deadline = time.monotonic() + timeout
        sock = ch.sock
        while True:
            remaining = deadline - time.monotonic()
            events = dict(ch.poller.poll(int(remaining * 1000) + 1)) if remaining > 0 else {}
            if sock not in events:
                why = ch.disconnected() if ch.monitor in events else ""
                if why:
                    ch.broken = True
                    if ch.refused:  # the CURVE handshake failed: the request never left this client
                        raise Refused(f"{why} ({self.endpoint}); the {op} did not run", op=op)
                    raise ConnectionError(
                        f"{why} ({self.endpoint}) while waiting for {op}; the call may or may not have run", op=op)
                if time.monotonic() < deadline:
                    continue
                raise Timeout(f"no reply to {op} within {timeout:g}s (broker {self.endpoint})", op=op)
            reply = recv_frames(sock)
            try:
                status, rid, rworker, _ = unpack_reply_header(reply[0].buffer)
            except ProtocolError:
                log.warning("dropping a malformed reply from the broker")
                continue
            if rid != req_id:
                other = ch.streams.get(rid)
                if other is not None:  # another open stream of this thread: keep it for later
                    other.append((status, rworker, reply[1:]))
                continue  # else a late reply to a request that timed out earlier
            return status, rworker, reply[1:]

    @staticmethod
    def _raise_error(body: list[Any]) -> None:
        try:
            payload = msgpack.unpackb(body[0].buffer, strict_map_key=False)
        except Exception:
            payload = {"code": "protocol_error", "message": "unreadable error reply"}
        raise error_from_wire(payload)

    @staticmethod
    def _decode(body: list[Any], own_frames: bool = False) -> Any:
        try:
            return codec.decode(body, own_frames=own_frames)
        except DspexError:
            raise
        except Exception as exc:
            raise ProtocolError(f"cannot decode reply: {exc}") from None

    def request(self, op: str, pool: str = "", session: str = "", body: Any = None, *,
                worker: str = "", timeout: float | None = None,
                on_reply: Callable[[str, str], None] | None = None,
                on_progress: Callable[[Any], None] | None = None) -> Any:
        """Send one request and wait for its reply; raise the typed error it carries.

        With ``on_progress``, the worker streams progress events of the call (dspy/gepa log
        records, ``dspex.progress.report``) to it while the call runs.
        """
        timeout = self.timeout if timeout is None else timeout
        flags = FLAG_STREAM if on_progress is not None else 0
        ch, req_id = self._send(op, pool, session, body, worker, timeout, flags)
        meter = CreditMeter()
        while True:
            status, rworker, frames = self._recv(ch, req_id, timeout, op)
            if status == Status.PROGRESS.value or status == Status.PARTIAL.value:
                if n := meter.consumed():
                    self._credit(pool, session, req_id, n)
                if on_progress is not None:
                    on_progress(self._decode(frames))
                continue
            if status == Status.ERROR.value:
                self._raise_error(frames)
            if on_reply is not None:
                on_reply(status, rworker)
            return self._decode(frames, self._own_frames)

    def _credit(self, pool: str, session: str, req_id: int, n: int) -> None:
        ch = self._channel()
        ch.sock.send_multipart([RequestHeader(Op.CREDIT.value, req_id, pool, session).pack(), msgpack.packb(n)])

    def _cancel(self, pool: str, session: str, req_id: int) -> None:
        ch = self._channel()
        ch.sock.send_multipart([RequestHeader(Op.CANCEL.value, req_id, pool, session).pack(), msgpack.packb(0)])

    def stream(self, op: str, pool: str, session: str, body: Any, *, worker: str = "",
               timeout: float | None = None, on_reply: Callable[[str, str], None] | None = None) -> "Stream":
        """Start a call whose generator result is streamed item by item (see :class:`Stream`)."""
        timeout = self.timeout if timeout is None else timeout
        ch, req_id = self._send(op, pool, session, body, worker, timeout, FLAG_STREAM)
        ch.streams[req_id] = deque()
        return Stream(self, ch, req_id, op, pool, session, timeout, on_reply)

    # -- user API -------------------------------------------------------------------------
    def session(self, pool: str, session_id: str | None = None) -> "Session":
        """A new session on ``pool``; it is pinned to a worker on its first call."""
        return Session(self, pool, session_id or secrets.token_hex(16))

    def call(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
             *, pool: str, timeout: float | None = None) -> Any:
        """A call outside any session: any worker of the pool; objects it returns are not kept."""
        return self.request(Op.CALL.value, pool, "", [module, fn, list(args), kwargs or {}], timeout=timeout)

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        return dict(self.request(Op.STATUS.value, body={}, timeout=timeout))

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        return dict(self.request(Op.PING.value, body={}, timeout=timeout))

    def sessions(self, pool: str | None = None, timeout: float | None = None) -> list[dict[str, Any]]:
        return list(self.request(Op.SESSIONS.value, body={"pool": pool or ""}, timeout=timeout))

    def close_session(self, session_id: str, timeout: float | None = None) -> dict[str, Any]:
        return dict(self.request(Op.CLOSE_SESSION.value, session=session_id, body={"session": session_id},
                                 timeout=timeout))

    def recycle(self, pool: str, worker: str | None = None, all: bool = False,
                timeout: float | None = None) -> dict[str, Any]:
        """Ask the broker to recycle workers gracefully (rolling, one at a time)."""
        return dict(self.request(Op.RECYCLE.value, pool, body={"pool": pool, "worker": worker or "", "all": all},
                                 timeout=timeout))

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Future[T]":
        """Run ``fn(*args, **kwargs)`` on the client's thread pool: parallel sessions from one thread."""
        with self._lock:
            if self._closed:
                raise ConnectionError("client is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=int(os.environ.get("DSPEX_CLIENT_THREADS", 16)),
                                                    thread_name_prefix="dspex-client")
            return self._executor.submit(fn, *args, **kwargs)


class Stream:
    """Items of a generator running on a worker, as they are produced.

    Iterate it on the thread that started it. Items arrive with credit-based flow control: the
    worker runs at most ``STREAM_WINDOW`` items ahead of this consumer. ``close()`` (or leaving a
    ``with`` block, or ``break`` + garbage collection) cancels the generator on the worker.
    Progress events sent during the stream are collected in ``progress``; ``result`` holds the
    final summary (``{"items": n}``) once the stream ended.
    """

    def __init__(self, client: Client, ch: _Channel, req_id: int, op: str, pool: str, session: str,
                 timeout: float, on_reply: Callable[[str, str], None] | None) -> None:
        self._client = client
        self._ch = ch
        self._req_id = req_id
        self._op = op
        self._pool = pool
        self._session = session
        self._timeout = timeout
        self._on_reply = on_reply
        self._thread = threading.get_ident()
        self._meter = CreditMeter()
        self.done = False
        self.result: Any = None
        self.progress: list[Any] = []

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Any:
        if self.done:
            raise StopIteration
        if threading.get_ident() != self._thread:
            raise DspexError("a Stream must be consumed on the thread that started it")
        while True:
            try:
                status, rworker, frames = self._client._recv(self._ch, self._req_id, self._timeout, self._op)
            except BaseException:
                self._finish()
                raise
            if status == Status.PARTIAL.value or status == Status.PROGRESS.value:
                if n := self._meter.consumed():
                    self._client._credit(self._pool, self._session, self._req_id, n)
                value = Client._decode(frames)
                if status == Status.PARTIAL.value:
                    return value
                self.progress.append(value)
                continue
            self._finish()
            if status == Status.ERROR.value:
                Client._raise_error(frames)
            if self._on_reply is not None:
                self._on_reply(status, rworker)
            self.result = Client._decode(frames)
            raise StopIteration

    def _finish(self) -> None:
        self.done = True
        self._ch.streams.pop(self._req_id, None)

    def close(self) -> None:
        """Cancel the producer on the worker (if still running) and wait for its end."""
        if self.done:
            return
        if threading.get_ident() != self._thread:
            return  # garbage collection on another thread: the worker's stall timeout ends it
        try:
            self._client._cancel(self._pool, self._session, self._req_id)
            while True:  # drain until the final reply (the Cancelled error) arrives
                next(self)
        except (StopIteration, Cancelled):
            pass
        except DspexError as err:
            log.debug("stream %d ended with %s while cancelling", self._req_id, err.code)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not self.done:
            try:
                self.close()
            except Exception:
                pass


class Session:
    """Calls pinned to one worker of a pool; objects stay there as refs until released."""

    def __init__(self, client: Client, pool: str, session_id: str) -> None:
        self.client = client
        self.pool = pool
        self.id = session_id
        self.worker = ""  # incarnation id once pinned
        self.closed = False

    def __repr__(self) -> str:
        return f"<dspex.Session {self.id[:8]} pool={self.pool} worker={self.worker[:8] or '-'}>"

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _track(self, status: str, worker: str) -> None:
        if worker:
            self.worker = worker

    def _request(self, op: Op, body: list[Any], timeout: float | None,
                 on_progress: Callable[[Any], None] | None = None) -> Any:
        if self.closed:
            raise SessionClosed(f"session {self.id[:8]} is closed")
        return self.client.request(op.value, self.pool, self.id, body, worker=self.worker, timeout=timeout,
                                   on_reply=self._track, on_progress=on_progress)

    def call(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
             *, timeout: float | None = None, on_progress: Callable[[Any], None] | None = None) -> Any:
        """``module.fn(*args, **kwargs)`` on the session's worker.

        ``on_progress`` receives the call's progress events while it runs (see dspex.progress).
        """
        return self._request(Op.CALL, [module, fn, list(args), kwargs or {}], timeout, on_progress)

    def method(self, ref: Ref, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
               *, timeout: float | None = None, on_progress: Callable[[Any], None] | None = None) -> Any:
        return self._request(Op.METHOD, [ref, name, list(args), kwargs or {}], timeout, on_progress)

    def _stream(self, op: Op, body: list[Any], timeout: float | None) -> Stream:
        if self.closed:
            raise SessionClosed(f"session {self.id[:8]} is closed")
        return self.client.stream(op.value, self.pool, self.id, body, worker=self.worker, timeout=timeout,
                                  on_reply=self._track)

    def stream(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
               *, timeout: float | None = None) -> Stream:
        """Stream the items of the generator (or async generator) ``module.fn(...)`` returns."""
        return self._stream(Op.CALL, [module, fn, list(args), kwargs or {}], timeout)

    def stream_method(self, ref: Ref, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                      *, timeout: float | None = None) -> Stream:
        """Stream the items of the generator a method returns (e.g. a ``dspy.streamify`` program)."""
        return self._stream(Op.METHOD, [ref, name, list(args), kwargs or {}], timeout)

    def stream_eval(self, expr: str, namespace: dict[str, Any] | None = None, *,
                    timeout: float | None = None) -> Stream:
        return self._stream(Op.EVAL, [expr, namespace or {}], timeout)

    def attr(self, ref: Ref, name: str, *, timeout: float | None = None) -> Any:
        return self._request(Op.GETATTR, [ref, name], timeout)

    def set_attr(self, ref: Ref, name: str, value: Any, *, timeout: float | None = None) -> None:
        self._request(Op.SETATTR, [ref, name, value], timeout)

    def eval(self, expr: str, namespace: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Evaluate an expression on the worker; refs in ``namespace`` resolve to their objects."""
        return self._request(Op.EVAL, [expr, namespace or {}], timeout)

    def exec(self, source: str, namespace: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Run statements in the session's namespace; returns the names they bound (as refs/data)."""
        return self._request(Op.EXEC, [source, namespace or {}], timeout)

    def to_data(self, ref: Ref, *, timeout: float | None = None) -> Any:
        """Plain data of a dspy.Example / dspy.Prediction (which otherwise stay refs)."""
        return self._request(Op.TO_DATA, [ref], timeout)

    def release(self, *refs: Ref, timeout: float | None = None) -> int:
        # ids, not refs: refs in a request body resolve to their objects on the worker
        return int(self._request(Op.RELEASE, [[r.id for r in refs]], timeout))

    def close(self, timeout: float | None = None) -> None:
        """Release every ref of the session on its worker."""
        if self.closed:
            return
        self.closed = True
        try:
            self.client.close_session(self.id, timeout=timeout)
        except (ConnectionError, Timeout) as err:
            log.warning("closing session %s: %s (its idle TTL will release it)", self.id[:8], err)


R = TypeVar("R")


class Rehydrator(Generic[T]):
    """A session that rebuilds itself once when its worker is gone.

    ``rebuild(session)`` recreates the session's objects and returns them; ``run(fn)`` calls
    ``fn(session, objects)`` and, on :class:`SessionWorkerUnavailable`, opens a new session,
    rebuilds, and retries once.
    """

    def __init__(self, client: Client, pool: str, rebuild: Callable[[Session], T],
                 on_rehydrate: Callable[[DspexError, Session], None] | None = None) -> None:
        self.client = client
        self.pool = pool
        self._rebuild = rebuild
        self._on_rehydrate = on_rehydrate
        self.rehydrations = 0
        self.session = client.session(pool)
        self.objects: T = rebuild(self.session)

    def run(self, fn: Callable[[Session, T], R]) -> R:
        try:
            return fn(self.session, self.objects)
        except SessionWorkerUnavailable as err:
            self.session.close(timeout=5)  # drops the broker's record; its worker and refs are gone already
            self.session = self.client.session(self.pool)
            if self._on_rehydrate is not None:
                self._on_rehydrate(err, self.session)
            self.objects = self._rebuild(self.session)
            self.rehydrations += 1
            return fn(self.session, self.objects)

    def close(self) -> None:
        self.session.close()


def connect(endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Client:
    """Connect to the broker at ``endpoint`` (or ``DSPEX_ENDPOINT``, or the default ipc path)."""
    return Client(endpoint, timeout, **kwargs)
