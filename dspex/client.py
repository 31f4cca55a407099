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
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generic, Sequence, TypeVar

import msgpack
import zmq

from dspex import codec, config
from dspex.errors import (
    ConnectionError,
    DspexError,
    MessageTooLarge,
    ProtocolError,
    SessionClosed,
    SessionWorkerUnavailable,
    Timeout,
    error_from_wire,
)
from dspex.protocol import Op, RequestHeader, Status, unpack_reply_header
from dspex.ref import Ref

log = logging.getLogger("dspex.client")

DEFAULT_TIMEOUT = 60.0

T = TypeVar("T")


class _Channel:
    """One thread's socket to the broker."""

    __slots__ = ("sock", "ids", "__weakref__")

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self.sock = sock
        self.ids = itertools.count(1)


class Client:
    """A connection to a dspex broker. Safe to share between threads."""

    def __init__(self, endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 *, curve_server_key: bytes | None = None, curve_keypair: tuple[bytes, bytes] | None = None) -> None:
        self.endpoint = config.check_endpoint(config.client_endpoint(endpoint))
        self.timeout = timeout
        self.max_message = config.max_message_bytes()
        self._curve = (curve_server_key, curve_keypair)
        if self.endpoint.startswith("tcp://") and curve_server_key is None:
            curve_server_key, curve_keypair = _curve_from_env()
            self._curve = (curve_server_key, curve_keypair)
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

    def _channel(self) -> _Channel:
        ch: _Channel | None = getattr(self._local, "channel", None)
        if ch is not None:
            return ch
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
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[6:]):
            raise ConnectionError(f"nothing is listening at {self.endpoint} (is the broker running?)")
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            raise ConnectionError(f"cannot connect to {self.endpoint}: {exc}") from None
        ch = _Channel(sock)
        self._local.channel = ch
        return ch

    # -- the request/reply core -------------------------------------------------------------
    def request(self, op: str, pool: str = "", session: str = "", body: Any = None, *,
                worker: str = "", timeout: float | None = None,
                on_reply: Callable[[str, str], None] | None = None) -> Any:
        """Send one request and wait for its reply; raise the typed error it carries."""
        if self._closed:
            raise ConnectionError("client is closed")
        ch = self._channel()
        timeout = self.timeout if timeout is None else timeout
        req_id = next(ch.ids)
        header = RequestHeader(op, req_id, pool, session, worker, int(timeout * 1000)).pack()
        frames = codec.encode(body if body is not None else [])
        size = sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames)
        if size > self.max_message:
            raise MessageTooLarge(f"request is {size} bytes, over the limit of {self.max_message}")
        sock = ch.sock
        sock.send_multipart([header, *frames], copy=len(frames) == 1)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(remaining * 1000):
                raise Timeout(f"no reply to {op} within {timeout:g}s (broker {self.endpoint})", op=op)
            reply = sock.recv_multipart(copy=False)
            try:
                status, rid, rworker, _ = unpack_reply_header(reply[0].buffer)
            except ProtocolError:
                log.warning("dropping a malformed reply from the broker")
                continue
            if rid != req_id:
                continue  # a late reply to a request that timed out earlier
            if status == Status.ERROR.value:
                try:
                    payload = msgpack.unpackb(reply[1].buffer, strict_map_key=False)
                except Exception:
                    payload = {"code": "protocol_error", "message": "unreadable error reply"}
                raise error_from_wire(payload)
            if on_reply is not None:
                on_reply(status, rworker)
            try:
                return codec.decode(reply[1:])
            except Exception as exc:
                raise ProtocolError(f"cannot decode reply: {exc}") from None

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

    def _request(self, op: Op, body: list[Any], timeout: float | None) -> Any:
        if self.closed:
            raise SessionClosed(f"session {self.id[:8]} is closed")
        return self.client.request(op.value, self.pool, self.id, body, worker=self.worker, timeout=timeout,
                                   on_reply=self._track)

    def call(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
             *, timeout: float | None = None) -> Any:
        """``module.fn(*args, **kwargs)`` on the session's worker."""
        return self._request(Op.CALL, [module, fn, list(args), kwargs or {}], timeout)

    def method(self, ref: Ref, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
               *, timeout: float | None = None) -> Any:
        return self._request(Op.METHOD, [ref, name, list(args), kwargs or {}], timeout)

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
            old = self.session
            old.closed = True  # its worker is gone; nothing to release
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


def _curve_from_env() -> tuple[bytes | None, tuple[bytes, bytes] | None]:
    """CURVE settings for tcp endpoints from DSPEX_CURVE_SERVER_KEY / DSPEX_CURVE_CLIENT_KEY files."""
    server_file = os.environ.get("DSPEX_CURVE_SERVER_KEY")
    if not server_file:
        return None, None
    from zmq.auth import load_certificate

    server_public, _ = load_certificate(server_file)
    client_file = os.environ.get("DSPEX_CURVE_CLIENT_KEY")
    keypair = None
    if client_file:
        public, secret = load_certificate(client_file)
        if secret is None:
            raise DspexError(f"{client_file} holds no secret key")
        keypair = (public, secret)
    return server_public, keypair
