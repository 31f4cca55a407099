"""The synchronous client: ``dspex.connect()``, sessions, refs, and the rehydration helper.

Thread safety: a request borrows a DEALER socket from the client's small pool for its duration
(a stream for its whole life), so threads never share a socket and need no lock or I/O thread in
the call path, and a thread that ends leaves nothing behind: at most ``DSPEX_CLIENT_IDLE_SOCKETS``
(default 8) idle sockets are kept. What a request means (encoding, replies, credit, errors) is
:mod:`dspex.core`, shared with the asyncio client.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generic, Sequence, TypeVar

import zmq
from zmq.utils.monitor import parse_monitor_message

from dspex import config
from dspex.core import CreditMeter, Exchange, bound_name, close_monitored, control_frames  # noqa: F401 - CreditMeter: public name
from dspex.errors import (
    BrokerUnreachable,
    Cancelled,
    CodeCacheMiss,
    ConnectionError,
    DspexError,
    ProtocolError,
    Refused,
    SessionClosed,
    SessionWorkerUnavailable,
    Timeout,
)
from dspex.protocol import WORKER_OPS, Op, unpack_reply_header
from dspex.ref import Ref
from dspex.sendcache import SendCache
from dspex.zmqfast import recv_frames, send_frames

log = logging.getLogger("dspex.client")

DEFAULT_TIMEOUT = 60.0
IDLE_SOCKETS = int(os.environ.get("DSPEX_CLIENT_IDLE_SOCKETS", "8"))
RIDE_THROUGH = 5.0  # seconds after a drop during which new sockets wait for the broker to return
CANCEL_CHECK_MS = 100  # a waiting request sees a cancel_all() from another thread within this


class _CancelRequested(Exception):
    """cancel_all() was called while this thread waited for its reply."""

T = TypeVar("T")
Callback = Callable[[Any], None]


class _Channel:
    """One socket to the broker, used by one request (or stream) at a time."""

    __slots__ = ("sock", "curve", "monitor", "poller", "ids", "broken", "refused")

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self.sock = sock
        self.curve = sock.mechanism == zmq.CURVE
        self.broken = False  # a drop or a failed send was seen: close it instead of reusing it
        # A lost connection fails the requests waiting on it at once (typed ConnectionLost)
        # instead of leaving them to time out: the broker that had them is gone.
        self.monitor: zmq.Socket[Any] = sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | config.HANDSHAKE_EVENTS)
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.ids = itertools.count(1)  # per socket: a late reply to an earlier request never matches
        self.refused = False  # the broker refused our CURVE key (nothing we send can run)

    def disconnected(self) -> str:
        """Drain the monitor: why the connection to the broker dropped since the last look, or ""."""
        why = ""
        while True:
            # ZMQ_EVENTS first: nothing pending (every call's case) costs one getsockopt instead
            # of a failed NOBLOCK recv and the zmq.Again it raises
            if not self.monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return why
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return why
            failure = config.handshake_failure(event["event"], "client", self.curve)
            if failure:
                why = failure
                self.refused = True
            elif not why:
                why = "lost the connection to the broker"

    def close(self) -> None:
        close_monitored(self.sock, self.monitor)


class Client:
    """A connection to a dspex broker. Safe to share between threads."""

    def __init__(self, endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 *, curve_server_key: bytes | None = None, curve_keypair: tuple[bytes, bytes] | None = None,
                 forward_output: bool = True, client_settings: bool = True) -> None:
        self.endpoint = config.check_endpoint(config.client_endpoint(endpoint))
        self.timeout = timeout
        self.forward_output = forward_output  # calls' output to this process's streams and loggers (dspex.output)
        self.client_settings = client_settings  # sessions send this process's DSPy settings with their calls
        self.max_message = config.max_message_bytes()
        if self.endpoint.startswith("tcp://") and curve_server_key is None:
            curve_server_key, curve_keypair = config.curve_client_keys(
                self.endpoint, os.environ.get("DSPEX_CURVE_SERVER_KEY"), os.environ.get("DSPEX_CURVE_CLIENT_KEY"))
        self._curve = (curve_server_key, curve_keypair)
        self._own_frames = not self.endpoint.startswith("inproc://")  # arrays decode without a copy
        self._ctx = zmq.Context()
        self._idle: list[_Channel] = []  # LIFO: the warmest socket first
        self._open: set[_Channel] = set()  # every socket not yet closed, lent out or idle
        self._lock = threading.Lock()
        self._closed = False
        self._drop_seen = -math.inf  # when a connection drop was last seen
        self._cancels = 0  # cancel_all() calls so far: a request started before the latest one stops
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
        with self._lock:
            channels, self._open, self._idle = list(self._open), set(), []
        for ch in channels:
            ch.close()
        self._ctx.term()

    def cancel_all(self) -> None:
        """Cancel every request of this client in flight, from any thread (a signal handler, the
        thread that waits on ``submit`` futures): each stops as Ctrl-C in its own thread stops it
        (the broker drops it if still queued, its worker interrupts it if running) and raises
        :class:`dspex.Cancelled` in the thread that made it. Requests made afterwards run as usual."""
        with self._lock:
            self._cancels += 1

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def open_sockets(self) -> int:
        """Sockets this client holds (lent to running requests and streams, or idle)."""
        return len(self._open)

    def _closed_error(self) -> BrokerUnreachable:
        return BrokerUnreachable("client is closed: nothing was sent")

    def _checkout(self) -> _Channel:
        """A socket for one request: an idle one that is still connected, else a new one."""
        while True:
            with self._lock:
                if self._closed:
                    raise self._closed_error()
                ch = self._idle.pop() if self._idle else None
            if ch is None:
                # shortly after a drop, skip the probe: across a broker restart the request waits
                # in the new socket for the broker to come back (within its timeout) instead of
                # failing at once; otherwise nothing listening is BrokerUnreachable at once
                return self._new_channel(probe=time.monotonic() - self._drop_seen > RIDE_THROUGH)
            if not ch.broken and not ch.disconnected():
                return ch
            # zmq reconnects by itself after a broker restart, but never after a protocol error
            # (a reply over this socket's MAXMSGSIZE): a fresh socket works in both cases
            self._drop_seen = time.monotonic()
            self._discard(ch)

    def _checkin(self, ch: _Channel) -> None:
        if ch.broken:
            self._drop_seen = time.monotonic()
        with self._lock:
            if not self._closed and not ch.broken and len(self._idle) < IDLE_SOCKETS:
                self._idle.append(ch)
                return
        self._discard(ch)

    def _discard(self, ch: _Channel) -> None:
        with self._lock:
            if ch not in self._open:
                return  # closed by close() already
            self._open.discard(ch)
        ch.close()

    def _new_channel(self, probe: bool = True) -> _Channel:
        if probe:  # before making a socket: a failed probe leaves none behind
            config.probe_ipc(self.endpoint)
        with self._lock:
            if self._closed:
                raise self._closed_error()
            sock = self._ctx.socket(zmq.DEALER)
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
            sock.close(0)
            raise BrokerUnreachable(f"cannot connect to {self.endpoint}: {exc}") from None
        ch = _Channel(sock)
        with self._lock:
            if self._closed:
                ch.close()
                raise self._closed_error()
            self._open.add(ch)
        return ch

    # -- the request/reply loop (its meaning is dspex.core.Exchange) -------------------------
    def _send(self, ch: _Channel, frames: list[Any], timeout: float) -> None:
        """Send within ``timeout`` (a broker that stops reading must not hang the caller)."""
        try:
            ch.sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)) if timeout > 0 else -1)
            send_frames(ch.sock, frames, copy=len(frames) <= 2)
        except zmq.Again:
            ch.broken = True
            raise BrokerUnreachable(f"could not send to {self.endpoint} within {timeout:g}s (the broker is not "
                                    "reading): nothing was sent") from None
        except zmq.ZMQError as exc:
            ch.broken = True
            if self._closed:
                raise self._closed_error() from None
            raise BrokerUnreachable(f"cannot send to {self.endpoint}: {exc}") from None

    def _recv(self, ch: _Channel, req_id: int, deadline: float, ex: Exchange,
              cancels: int | None = None) -> tuple[str, str, list[Any]]:
        """The next reply frame set for ``req_id``: (status, worker, body frames). With ``cancels``
        (the client's cancel_all() count when the request started), a later cancel_all() ends the
        wait with :class:`_CancelRequested`."""
        sock = ch.sock
        while True:
            remaining = deadline - time.monotonic()
            wait_ms = int(remaining * 1000) + 1
            if cancels is not None:
                wait_ms = min(wait_ms, CANCEL_CHECK_MS)
            try:
                events = dict(ch.poller.poll(wait_ms)) if remaining > 0 else {}
            except zmq.ZMQError:
                ch.broken = True
                raise ex.lost("the client was closed") from None
            if sock not in events:
                why = ch.disconnected() if ch.monitor in events else ""
                if why:
                    ch.broken = True
                    if ch.refused:  # the CURVE handshake failed: the request never left this client
                        raise Refused(f"{why} ({self.endpoint}); the {ex.op} did not run", op=ex.op)
                    raise ex.lost(why)
                if cancels is not None and self._cancels != cancels:
                    raise _CancelRequested
                if time.monotonic() < deadline:
                    continue
                raise ex.timed_out()
            reply = recv_frames(sock)
            try:
                status, rid, rworker, _ = unpack_reply_header(reply[0].buffer)
            except ProtocolError:
                log.warning("dropping a malformed reply from the broker")
                continue
            if rid == req_id:
                return status, rworker, reply[1:]
            # else a late reply to a request of this socket that timed out earlier

    def _exchange(self, op: str, pool: str, session: str, body: Any, timeout: float | None, *,
                  items: bool = False, forward: bool | None = None, **options: Any) -> Exchange:
        if self._closed:
            raise self._closed_error()
        timeout = self.timeout if timeout is None else timeout
        return Exchange(op, pool, session, body, timeout, max_message=self.max_message, endpoint=self.endpoint,
                        items=items, own_frames=self._own_frames,
                        forward=self.forward_output if forward is None else forward, **options)

    def request(self, op: str, pool: str = "", session: str = "", body: Any = None, *,
                worker: str = "", timeout: float | None = None,
                on_reply: Callable[[str, str], None] | None = None,
                on_progress: Callback | None = None, on_output: Callback | None = None,
                bind: Any = None, forward: bool | None = None, sender: SendCache | None = None) -> Any:
        """Send one request and wait for its reply; raise the typed error it carries.

        ``on_progress`` receives the call's progress events while it runs (dspy/gepa log records,
        ``dspex.progress.report``); ``on_output`` what it prints, warns or logs
        (``{"stream": "stdout" | "stderr" | "warning" | "log", "text": str, ...}``), in addition
        to this process's streams and loggers unless ``forward`` (default: the client's
        ``forward_output``) is false. Refs in the result become handles of ``bind`` (a session).
        Ctrl-C while it waits stops the request on the worker (``cancel``) before
        ``KeyboardInterrupt`` propagates. ``sender``: the session's record of the code its worker
        holds (a request that refers to code the worker lacks goes again in full, once).
        """
        ex = self._exchange(op, pool, session, body, timeout, on_reply=on_reply, on_progress=on_progress,
                            on_output=on_output, bind=bind, forward=forward, sender=sender)
        while True:
            try:
                return self._request(ex, op, pool, session, worker)
            except CodeCacheMiss as miss:
                if not ex.resend_in_full(miss):
                    raise

    def _request(self, ex: Exchange, op: str, pool: str, session: str, worker: str) -> Any:
        cancels = self._cancels
        ch = self._checkout()
        waiting = False  # the request is out and no send is under way (Ctrl-C may send a cancel)
        req_id = 0
        try:
            req_id = next(ch.ids)
            self._send(ch, ex.frames(req_id, worker), ex.timeout)
            waiting = True
            deadline = time.monotonic() + ex.wait
            while True:
                kind, value, credit = ex.feed(*self._recv(ch, req_id, deadline, ex, cancels))
                if credit:
                    waiting = False
                    self._send(ch, control_frames(Op.CREDIT, pool, session, req_id, credit), ex.timeout)
                    waiting = True
                if kind == "done":
                    return value
        except KeyboardInterrupt:
            self._interrupted(ch, op, pool, session, req_id, waiting)
            raise
        except _CancelRequested:
            self._interrupted(ch, op, pool, session, req_id, waiting)
            raise Cancelled(f"{op} was cancelled by Client.cancel_all() and stopped", op=op) from None
        finally:
            self._checkin(ch)

    @staticmethod
    def _interrupted(ch: _Channel, op: str, pool: str, session: str, req_id: int, waiting: bool) -> None:
        """Ctrl-C during a request: stop it as an asyncio cancel does (the broker drops it if still
        queued, its worker interrupts it if running), without waiting for anything; its late reply
        is skipped by request id. An interrupt that cut a send may leave half a message in the
        socket: no cancel then (it would be glued to that half), and the socket is not reused."""
        if not waiting:
            ch.broken = True
            return
        if op in WORKER_OPS:
            try:
                send_frames(ch.sock, control_frames(Op.CANCEL, pool, session, req_id, 0), zmq.NOBLOCK)
            except zmq.ZMQError:
                ch.broken = True

    def stream(self, op: str, pool: str, session: str, body: Any, *, worker: str = "",
               timeout: float | None = None, on_reply: Callable[[str, str], None] | None = None,
               on_progress: Callback | None = None, on_output: Callback | None = None,
               bind: Any = None, forward: bool | None = None, sender: SendCache | None = None) -> "Stream":
        """Start a call whose (iterable) result is streamed item by item (see :class:`Stream`)."""
        ex = self._exchange(op, pool, session, body, timeout, items=True, on_reply=on_reply,
                            on_progress=on_progress, on_output=on_output, bind=bind, forward=forward, sender=sender)
        ch = self._checkout()
        try:
            req_id = next(ch.ids)
            self._send(ch, ex.frames(req_id, worker), ex.timeout)
        except BaseException:
            self._checkin(ch)
            raise
        return Stream(self, ch, req_id, ex, worker)

    # -- user API -------------------------------------------------------------------------
    def session(self, pool: str, session_id: str | None = None, *, forward_output: bool | None = None,
                client_settings: bool | None = None) -> "Session":
        """A new session on ``pool``; it is pinned to a worker on its first call. ``forward_output``
        (default: the client's) says whether its calls' output reaches this process's streams
        and loggers; ``client_settings`` (default: the client's) whether this process's DSPy
        settings go with its calls."""
        return Session(self, pool, session_id or secrets.token_hex(16), forward_output, client_settings)

    def call(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
             *, pool: str, timeout: float | None = None, on_progress: Callback | None = None,
             on_output: Callback | None = None) -> Any:
        """A call outside any session: any worker of the pool; objects it returns are not kept."""
        return self.request(Op.CALL.value, pool, "", [module, fn, list(args), kwargs or {}], timeout=timeout,
                            on_progress=on_progress, on_output=on_output)

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
                raise self._closed_error()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=int(os.environ.get("DSPEX_CLIENT_THREADS", 16)),
                                                    thread_name_prefix="dspex-client")
            return self._executor.submit(fn, *args, **kwargs)


class Stream:
    """Items of an iterable result on a worker, as they are produced.

    Iterate it on the thread that started it. Items arrive with credit-based flow control: the
    worker runs at most ``STREAM_WINDOW`` items ahead of this consumer. ``close()`` (or leaving a
    ``with`` block, or ``break`` + garbage collection) cancels the generator on the worker.
    Progress events sent during the stream are collected in ``progress`` (and passed to
    ``on_progress`` when given); ``result`` holds the final summary (``{"items": n}``) once the
    stream ended. The stream holds its own socket until it ends.
    """

    def __init__(self, client: Client, ch: _Channel, req_id: int, ex: Exchange, worker: str = "") -> None:
        self._client = client
        self._ch: _Channel | None = ch
        self._req_id = req_id
        self._ex = ex
        self._worker = worker
        self._started = False  # an item or event arrived: the request ran
        self._thread = threading.get_ident()
        self.done = False
        self.result: Any = None
        self.progress: list[Any] = []
        user_progress = ex.on_progress

        def on_progress(event: Any) -> None:
            self.progress.append(event)
            if user_progress is not None:
                user_progress(event)

        ex.on_progress = on_progress

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Any:
        if self.done or self._ch is None:
            raise StopIteration
        if threading.get_ident() != self._thread:
            raise DspexError("a Stream must be consumed on the thread that started it")
        ch, ex = self._ch, self._ex
        while True:
            try:
                reply = self._client._recv(ch, self._req_id, time.monotonic() + ex.wait, ex)
                kind, value, credit = ex.feed(*reply)
                self._started = True
                if credit:
                    self._client._send(ch, control_frames(Op.CREDIT, ex.pool, ex.session, self._req_id, credit),
                                       ex.timeout)
            except CodeCacheMiss as miss:
                if self._started or not ex.resend_in_full(miss):
                    self._finish()
                    raise
                try:  # nothing ran: the same request again, in full
                    self._req_id = next(ch.ids)
                    self._client._send(ch, ex.frames(self._req_id, self._worker), ex.timeout)
                except BaseException:
                    self._finish()
                    raise
                continue
            except BaseException:
                self._finish()
                raise
            if kind == "item":
                return value
            if kind == "done":
                self._finish()
                self.result = value
                raise StopIteration

    def _finish(self) -> None:
        self.done = True
        ch, self._ch = self._ch, None
        if ch is not None:
            self._client._checkin(ch)

    def close(self) -> None:
        """Cancel the producer on the worker (if still running) and wait for its end."""
        if self.done or self._ch is None:
            return
        if threading.get_ident() != self._thread:
            # garbage collection on another thread: drop the socket (the worker's stall timeout
            # ends the producer), never reuse one that may still receive this stream's items
            self._ch.broken = True
            self._finish()
            return
        try:
            ex = self._ex
            self._client._send(self._ch, control_frames(Op.CANCEL, ex.pool, ex.session, self._req_id, 0),
                               ex.timeout)
            while True:  # drain until the final reply (the Cancelled error) arrives
                next(self)
        except (StopIteration, Cancelled):
            pass
        except DspexError as err:
            log.debug("stream %d ended with %s while cancelling", self._req_id, err.code)
        finally:
            if not self.done:
                self._finish()

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
    """Calls pinned to one worker of a pool; objects stay there as refs until released.

    Every op takes ``timeout=`` (the call's deadline, which also stops the call on the worker),
    ``on_progress=`` and ``on_output=`` (what the call prints, warns or logs, in addition to this
    process's streams and loggers: dspex.output). Refs the session returns are handles that read
    like their objects (``prog(question=...)``, ``lm.model``).
    """

    def __init__(self, client: Client, pool: str, session_id: str, forward_output: bool | None = None,
                 client_settings: bool | None = None) -> None:
        self.client = client
        self.pool = pool
        self.id = session_id
        self.worker = ""  # incarnation id once pinned
        self.closed = False
        self.forward_output = forward_output  # None: the client's
        # what the session's worker holds of this client's code, and whether the client's DSPy
        # settings go with each call
        self.sender = SendCache(client_settings=client.client_settings if client_settings is None else client_settings)

    def __repr__(self) -> str:
        return f"<dspex.Session {self.id[:8]} pool={self.pool} worker={self.worker[:8] or '-'}>"

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _track(self, status: str, worker: str) -> None:
        if worker:
            self.worker = worker

    def _request(self, op: Op, body: list[Any], timeout: float | None, on_progress: Callback | None = None,
                 on_output: Callback | None = None) -> Any:
        if self.closed:
            raise SessionClosed(f"session {self.id[:8]} is closed")
        return self.client.request(op.value, self.pool, self.id, body, worker=self.worker, timeout=timeout,
                                   on_reply=self._track, on_progress=on_progress, on_output=on_output, bind=self,
                                   forward=self.forward_output, sender=self.sender)

    # -- code and objects by value -------------------------------------------------------------
    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the session's worker, ``fn`` and the arguments sent by value.

        The same program text as in-process: ``program()`` here, ``s.run(program)`` there. The
        result comes back as data where it can (records, pydantic/dataclass instances...), as refs
        for what must stay on the worker. For ``timeout=`` & co use :meth:`apply`.
        """
        return self.apply(fn, args, kwargs)  # type: ignore[no-any-return]

    def apply(self, fn: Callable[..., Any] | Ref, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
              *, timeout: float | None = None, on_progress: Callback | None = None,
              on_output: Callback | None = None) -> Any:
        """:meth:`run` with the options: ``fn`` by value (or a ref to a callable on the worker)."""
        return self._request(Op.APPLY, [fn, list(args), kwargs or {}], timeout, on_progress, on_output)

    def put(self, obj: Any, *, timeout: float | None = None, on_progress: Callback | None = None,
            on_output: Callback | None = None) -> Ref:
        """Ship ``obj`` by value and keep it on the worker: its ref (Ray's ``put``)."""
        ref = self._request(Op.PUT, [obj], timeout, on_progress, on_output)
        if not isinstance(ref, Ref):
            raise ProtocolError(f"put returned {type(ref).__name__}, not a ref")
        return ref

    def define(self, obj: Any, name: str | None = None, *, timeout: float | None = None,
               on_progress: Callback | None = None, on_output: Callback | None = None) -> None:
        """Bind ``obj`` (a function, class or value, sent by value) in the session namespace as
        ``name`` (default ``obj.__name__``), so ``eval``/``exec`` code can use it."""
        self._request(Op.BIND, [bound_name(obj, name), obj], timeout, on_progress, on_output)

    # -- the explicit API ---------------------------------------------------------------------------
    def call(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
             *, timeout: float | None = None, on_progress: Callback | None = None,
             on_output: Callback | None = None) -> Any:
        """``module.fn(*args, **kwargs)`` on the session's worker."""
        return self._request(Op.CALL, [module, fn, list(args), kwargs or {}], timeout, on_progress, on_output)

    def method(self, ref: Ref, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
               *, timeout: float | None = None, on_progress: Callback | None = None,
               on_output: Callback | None = None) -> Any:
        return self._request(Op.METHOD, [ref, name, list(args), kwargs or {}], timeout, on_progress, on_output)

    def attr(self, ref: Ref, name: str, *, timeout: float | None = None, on_progress: Callback | None = None,
             on_output: Callback | None = None) -> Any:
        return self._request(Op.GETATTR, [ref, name], timeout, on_progress, on_output)

    def set_attr(self, ref: Ref, name: str, value: Any, *, timeout: float | None = None,
                 on_progress: Callback | None = None, on_output: Callback | None = None) -> None:
        self._request(Op.SETATTR, [ref, name, value], timeout, on_progress, on_output)

    def eval(self, expr: str, namespace: dict[str, Any] | None = None, *, timeout: float | None = None,
             on_progress: Callback | None = None, on_output: Callback | None = None) -> Any:
        """Evaluate an expression on the worker; refs in ``namespace`` resolve to their objects."""
        return self._request(Op.EVAL, [expr, namespace or {}], timeout, on_progress, on_output)

    def exec(self, source: str, namespace: dict[str, Any] | None = None, *, timeout: float | None = None,
             on_progress: Callback | None = None, on_output: Callback | None = None) -> Any:
        """Run statements in the session's namespace; returns the names they bound (as refs/data)."""
        return self._request(Op.EXEC, [source, namespace or {}], timeout, on_progress, on_output)

    def to_data(self, ref: Ref, *, timeout: float | None = None, on_progress: Callback | None = None,
                on_output: Callback | None = None) -> Any:
        """Plain data of a dspy.Example / dspy.Prediction (or anything with ``toDict``)."""
        return self._request(Op.TO_DATA, [ref], timeout, on_progress, on_output)

    def release(self, *refs: Ref, timeout: float | None = None, on_progress: Callback | None = None,
                on_output: Callback | None = None) -> int:
        """Release refs; other values (data that came back by value) hold nothing there: skipped."""
        # ids, not refs: refs in a request body resolve to their objects on the worker
        return int(self._request(Op.RELEASE, [[r.id for r in refs if isinstance(r, Ref)]], timeout, on_progress,
                                 on_output))

    # -- streams --------------------------------------------------------------------------------
    def _stream(self, op: Op, body: list[Any], timeout: float | None, on_progress: Callback | None,
                on_output: Callback | None) -> Stream:
        if self.closed:
            raise SessionClosed(f"session {self.id[:8]} is closed")
        return self.client.stream(op.value, self.pool, self.id, body, worker=self.worker, timeout=timeout,
                                  on_reply=self._track, on_progress=on_progress, on_output=on_output, bind=self,
                                  forward=self.forward_output, sender=self.sender)

    def stream(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
               *, timeout: float | None = None, on_progress: Callback | None = None,
               on_output: Callback | None = None) -> Stream:
        """Stream the items of the iterable (or async iterable) ``module.fn(...)`` returns."""
        return self._stream(Op.CALL, [module, fn, list(args), kwargs or {}], timeout, on_progress, on_output)

    def stream_method(self, ref: Ref, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                      *, timeout: float | None = None, on_progress: Callback | None = None,
                      on_output: Callback | None = None) -> Stream:
        """Stream the items of what a method returns (e.g. a ``dspy.streamify`` program)."""
        return self._stream(Op.METHOD, [ref, name, list(args), kwargs or {}], timeout, on_progress, on_output)

    def stream_eval(self, expr: str, namespace: dict[str, Any] | None = None, *, timeout: float | None = None,
                    on_progress: Callback | None = None, on_output: Callback | None = None) -> Stream:
        return self._stream(Op.EVAL, [expr, namespace or {}], timeout, on_progress, on_output)

    def stream_apply(self, fn: Callable[..., Any] | Ref, args: Sequence[Any] = (),
                     kwargs: dict[str, Any] | None = None, *, timeout: float | None = None,
                     on_progress: Callback | None = None, on_output: Callback | None = None) -> Stream:
        """Stream the items of what ``fn(*args, **kwargs)`` returns (``fn`` by value, as in :meth:`run`)."""
        return self._stream(Op.APPLY, [fn, list(args), kwargs or {}], timeout, on_progress, on_output)

    def close(self, timeout: float | None = None) -> None:
        """Release every ref of the session on its worker."""
        if self.closed:
            return
        self.closed = True
        self.sender.close()
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
    """Connect to the broker at ``endpoint`` (or ``DSPEX_ENDPOINT``, or the default ipc path).
    ``forward_output=False``: calls' output stays off this process's streams and loggers."""
    return Client(endpoint, timeout, **kwargs)
