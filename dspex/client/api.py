"""The user API of clients, defined once for both client kinds (:mod:`dspex.client.sessionapi` has the session's).

Every user method here builds a request and hands it to its client, which performs it in its own way:
:class:`dspex.client.sync.Client` (``dspex.connect``) blocks and returns the value, :class:`dspex.aio.AsyncClient`
(``dspex.aio.connect``) returns an awaitable of it. Ref handles (:mod:`dspex.wire.ref`) work the same way. A method of
several steps (``SessionAPI.close``, :class:`dspex.client.rehydrator.Rehydrator`) is written once as a generator that
yields each step's result-or-awaitable; the client kind drives it (``_drive``): the blocking client sends each value
straight back, the asyncio client awaits each awaitable first and throws its exception in where it was yielded.
Constructor options, the ops and their arguments live here only; what a client kind implements is marked below.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar, Unpack

import zmq

from dspex.client import arguments, processwide, senderrors
from dspex.client.arguments import keywords, positional
from dspex.client.config import ClientConfig
from dspex.client.endpoints import ANY_POOL
from dspex.client.exchange import Exchange, close_monitored, closed_error
from dspex.client.sessionapi import CallOptions, RequestOptions, SessionAPI, Steps, call_options
from dspex.wire.errors import BrokerUnreachable, EncodeError, Refused
from dspex.wire.ops import WORKER_OPS, Op
from dspex.wire.sockets import HANDSHAKE_EVENTS, curve_client_keys, tune_socket

log = logging.getLogger("dspex.client")

DEFAULT_TIMEOUT = 60.0

S = TypeVar("S", bound=SessionAPI)


class Sockets(Protocol):
    """A client kind's sockets (:class:`dspex.client.channels.ChannelPool`, :class:`dspex.client.aiochannel.AsyncChannel`)."""

    closed: bool
    replaced: int  # sockets replaced after their connection broke

    @property
    def open_sockets(self) -> int: ...

    def cancel_all(self) -> None: ...


class ClientAPI(Generic[S]):
    """A connection to a dspex broker: the options and user ops both client kinds share.

    ``endpoint``: the broker's frontend (else ``DSPEX_ENDPOINT``, else the default ipc path; ``dspex.connect`` also
    takes a map of several brokers, :mod:`dspex.client.routing`), and ``endpoints`` the map of pool names (``"*"``:
    every pool) to endpoints; ``timeout``: the default deadline of every call; ``curve_server_key`` (the broker's public
    key) and ``curve_keypair`` (this client's ``(public, secret)``; a fresh one when omitted) for a ``tcp://`` endpoint,
    else read from the files ``DSPEX_CURVE_SERVER_KEY`` and ``DSPEX_CURVE_CLIENT_KEY`` name; ``forward_output=False``:
    calls' output stays off this process's streams and loggers (:mod:`dspex.client.output`); ``client_settings=False``:
    this process's DSPy settings do not go with its sessions' calls. Nothing is sent before the first request: an
    unreachable broker is that request's ``BrokerUnreachable``.
    """

    session_kind: type[S]
    _socket_prefix: bytes  # its sockets' routing ids start with it (b"c" blocking, b"a" asyncio)
    _ctx: Any  # this process's zmq context of its kind (dspex.client.processwide), set by _init_transport

    def __init__(self, endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT, *,
                 curve_server_key: bytes | None = None, curve_keypair: tuple[bytes, bytes] | None = None,
                 forward_output: bool = True, client_settings: bool = True) -> None:
        config = self._options(timeout, forward_output, client_settings)
        self.endpoint = config.endpoint_or_default(endpoint)
        self.endpoints = {ANY_POOL: self.endpoint}
        if self.endpoint.startswith("tcp://") and curve_server_key is None:
            curve_server_key, curve_keypair = curve_client_keys(
                self.endpoint, config.curve_server_key, config.curve_client_key)
        if curve_server_key is not None and curve_keypair is None:
            # one key for all of this client's sockets: the broker knows a session's owner by it
            curve_keypair = zmq.curve_keypair()
        self._curve = (curve_server_key, curve_keypair)
        self._own_frames = not self.endpoint.startswith("inproc://")  # arrays decode without a copy
        self._init_transport()

    def _options(self, timeout: float, forward_output: bool, client_settings: bool) -> ClientConfig:
        """The options every client has, and the environment, read when a client is made."""
        self.config = config = ClientConfig.from_env()
        self.timeout = arguments.checked_timeout(timeout)
        self.forward_output = forward_output
        self.client_settings = client_settings
        self.max_message = config.max_message
        return config

    # -- what a client kind implements ----------------------------------------------------------
    _init_transport: Callable[[], None]  # sets ``_sockets`` and registers the client (processwide)
    _sockets: Sockets
    close: Callable[[], Any]
    _drive: Callable[[Steps[Any]], Any]  # runs an op of several steps: its result (or an awaitable of it)

    def _is_closed(self) -> bool:
        return self._sockets.closed

    @property
    def open_sockets(self) -> int:
        """Sockets this client holds (a blocking client's lent to running requests and streams, or
        idle; an asyncio client's one socket once made at its first request)."""
        return self._sockets.open_sockets

    @property
    def replaced_sockets(self) -> int:
        """Sockets replaced after their connection broke."""
        return self._sockets.replaced

    def _after_fork(self) -> None:
        """In a forked child (:mod:`dspex.client.processwide`): the child's context and sockets (an
        asyncio client's at its first request, on its loop); the parent's stay behind, unused."""
        old = self._sockets
        processwide.keep(old)
        self._init_transport()
        self._sockets.closed = old.closed

    def request(self, op: str, pool: str = "", session: str = "", body: Any = None,
                **options: Unpack[RequestOptions]) -> Any:
        """Send one request; its value (or an awaitable of it). Raises the typed error of the reply.

        ``on_progress`` receives the call's progress events while it runs (dspy/gepa log records,
        ``dspex.progress.report``); ``on_output`` what it prints, warns or logs
        (``{"stream": "stdout" | "stderr" | "warning" | "log", "text": str, ...}``), in addition
        to this process's streams and loggers unless ``forward`` (default: the client's
        ``forward_output``) is false. Refs in the result become handles of ``bind`` (a session).
        ``sender``: the session's record of the code its worker holds (a request that refers to
        code the worker lacks goes again in full, once). ``flags``: request header flags of the
        caller's own (``FLAG_DURABLE``). The caller that stops waiting before the final reply
        (Ctrl-C, a cancelled task, any exception) stops the request on the worker.
        """
        raise NotImplementedError

    def stream(self, op: str, pool: str, session: str, body: Any, **options: Unpack[RequestOptions]) -> Any:
        """Start a call whose iterable result is streamed item by item: a Stream (an AsyncStream)."""
        raise NotImplementedError

    def cancel_all(self) -> None:
        """Cancel every request and stream of this client in flight: each stops as a Ctrl-C (a
        cancelled task) stops it (the broker drops it if still queued, its worker interrupts it if
        running) and raises :class:`dspex.Cancelled` where it was awaited. Requests made afterwards
        run as usual. From any thread (a signal handler, one outside an asyncio client's loop)."""
        self._sockets.cancel_all()

    # -- shared by the kinds --------------------------------------------------------------------
    def _exchange(self, op: str, pool: str, session: str, body: Any, *, items: bool = False,
                  timeout: float | None = None, forward: bool | None = None, **options: Any) -> Exchange:
        if self._is_closed():
            raise closed_error()
        arguments.check_name("pool", pool)
        arguments.check_name("session id", session)
        arguments.check_options(options)
        timeout = self._call_timeout(timeout)
        try:
            return Exchange(op, pool, session, body, timeout, max_message=self.max_message, endpoint=self.endpoint,
                            items=items, own_frames=self._own_frames, reply_grace=self.config.reply_grace,
                            forward=self.forward_output if forward is None else forward,
                            awaits=self.session_kind._ops_awaitable, **options)
        except EncodeError as err:
            if op not in WORKER_OPS:
                raise
            raise senderrors.argument_error(err) from None

    def _call_timeout(self, timeout: float | None) -> float:
        """The deadline (seconds from now) of a call given ``timeout=``."""
        return self.timeout if timeout is None else arguments.checked_timeout(timeout)

    def _connect(self) -> tuple[Any, Any]:
        """A DEALER connected to the broker, and its monitor (a dropped connection, a refused key)."""
        sock = self._ctx.socket(zmq.DEALER)
        tune_socket(sock, max_message=self.max_message, endpoint=self.endpoint)
        # a fixed identity lets replies find us again after the broker restarts
        sock.setsockopt(zmq.ROUTING_ID, self._socket_prefix + secrets.token_bytes(15))
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        server_key, keypair = self._curve
        if server_key is not None and keypair is not None:
            sock.curve_serverkey = server_key
            sock.curve_publickey, sock.curve_secretkey = keypair
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_EVENTS)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            close_monitored(sock, monitor)
            raise BrokerUnreachable(f"cannot connect to {self.endpoint}: {exc}") from None
        return sock, monitor

    def __reduce__(self) -> Any:
        raise EncodeError(f"a dspex client ({self.endpoint}) cannot be sent to a worker: it is this process's "
                          "connection to the broker. Call the session from here, and pass the call the data or refs "
                          "it needs", handle="client")

    def _refused(self, why: str, op: str) -> Refused:
        """The CURVE handshake failed: the request never left this client."""
        return Refused(f"{why} ({self.endpoint}); the {op} did not run", op=op)

    # -- user ops -----------------------------------------------------------------------------
    def session(self, pool: str, session_id: str | None = None, *, durable: bool = False,
                forward_output: bool | None = None, client_settings: bool | None = None) -> S:
        """A new session on ``pool`` (or the session ``session_id`` of this client identity); it is
        pinned to a worker on its first call. ``durable``: its state outlives its worker and the
        broker (checkpointed after each call that changed it; when its worker is gone, its next
        call runs on another with the state restored, the same refs valid); a pool with
        ``durable = true`` makes every session durable. ``forward_output`` (default: the
        client's) says whether its calls' output reaches this process's streams and loggers;
        ``client_settings`` (default: the client's) whether this process's DSPy settings go with
        its calls."""
        arguments.check_session_args(pool, session_id)
        if self._is_closed():
            raise closed_error()
        return self.session_kind(self, pool, session_id or secrets.token_hex(16), forward_output, client_settings,
                                 durable)

    def call(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
             *, pool: str, **options: Unpack[CallOptions]) -> Any:
        """``module.fn(*args, **kwargs)`` outside any session: any worker of the pool; objects it
        returns are not kept."""
        return self.request(Op.CALL.value, pool, "", [module, fn, positional(args), keywords(kwargs)],
                            **call_options(options))

    def status(self, timeout: float | None = None, *, pool: str | None = None) -> Any:
        """The broker's view of its pools, workers and sessions (a dict). With several brokers,
        ``pool``'s broker's, or without it every broker's, merged (:func:`dspex.client.routing.merge`)."""
        return self.request(Op.STATUS.value, pool or "", body={}, timeout=timeout)

    def ping(self, timeout: float | None = None, *, pool: str | None = None) -> Any:
        """What the broker says about its stack (a dict): a cheap liveness check. With several
        brokers, ``pool``'s broker's, or ``{"brokers": {endpoint: ...}}`` of every one."""
        return self.request(Op.PING.value, pool or "", body={}, timeout=timeout)

    def sessions(self, pool: str | None = None, timeout: float | None = None) -> Any:
        """This client identity's sessions (every session for an admin key): a list of dicts.
        With several brokers, ``pool``'s broker's, or every broker's, each with its ``endpoint``."""
        return self.request(Op.SESSIONS.value, pool or "", body={"pool": pool or ""}, timeout=timeout)

    def close_session(self, session_id: str, timeout: float | None = None) -> Any:
        """Close a session by id: every worker it touched releases its objects. With several
        brokers, every broker is asked (a session's own ``close`` asks only its broker)."""
        return self.request(Op.CLOSE_SESSION.value, session=session_id, body={"session": session_id},
                            timeout=timeout)

    def recycle(self, pool: str, worker: str | None = None, all: bool = False,
                timeout: float | None = None) -> Any:
        """Ask the broker to recycle workers gracefully (rolling, one at a time)."""
        return self.request(Op.RECYCLE.value, pool, body={"pool": pool, "worker": worker or "", "all": all},
                            timeout=timeout)
