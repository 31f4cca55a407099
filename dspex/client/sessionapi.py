"""The user API of a session, defined once for both client kinds (:mod:`dspex.client.api` has the client's).

A method builds a request and hands it to the session's client, which performs it in its own way: a blocking
client returns the value, an asyncio client an awaitable of it. An op of several steps (``close``) is a generator of
its steps (``Steps``) that the client kind drives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence
from typing import Any, Protocol, Self, TypedDict, TypeVar, Unpack

from dspex.client import arguments
from dspex.client.arguments import bound_name, keywords, positional
from dspex.client.config import ClientConfig
from dspex.client.exchange import Callback
from dspex.client.sendcache import SendCache
from dspex.wire.errors import BadArgument, ConnectionError, EncodeError, SessionClosed, Timeout
from dspex.wire.ops import Op
from dspex.wire.protocol import FLAG_DURABLE
from dspex.wire.ref import Ref

log = logging.getLogger("dspex.client")

T = TypeVar("T")
Steps = Generator[Any, Any, T]  # an op of several steps: yields each step's value or awaitable


class RequestOptions(TypedDict, total=False):
    """What a request may say besides its op, pool, session and body (:meth:`ClientAPI.request`)."""

    worker: str  # the incarnation its session is pinned to ("": none yet)
    timeout: float | None
    on_reply: Callable[[str, str], None] | None
    on_progress: Callback | None
    on_output: Callback | None
    bind: Any
    forward: bool | None
    sender: SendCache | None
    flags: int


class CallOptions(TypedDict, total=False):
    """The options every op of a session takes besides its arguments (and ``Client.call``)."""

    timeout: float | None  # seconds: the call's deadline, which also stops it on the worker (None: the client's)
    on_progress: Callback | None  # called with each progress event the call reports
    on_output: Callback | None  # called with what the call prints, warns or logs (dspex.client.output)


_CALL_OPTIONS = CallOptions.__optional_keys__


def call_options(options: CallOptions) -> CallOptions:
    """A user's ``**options``, refused (as Python refuses an unexpected keyword argument: a
    :class:`dspex.BadArgument` is a ``TypeError``) when one is not a :class:`CallOptions` name."""
    if options and not options.keys() <= _CALL_OPTIONS:
        unknown = ", ".join(sorted(options.keys() - _CALL_OPTIONS))
        raise BadArgument(f"unexpected keyword argument {unknown}: a call takes timeout=, on_progress= and "
                          "on_output=")
    return options


class SessionClient(Protocol):
    """What a session asks of its client (:class:`dspex.client.api.ClientAPI`, which imports this module)."""

    client_settings: bool
    config: ClientConfig

    def request(self, op: str, pool: str = "", session: str = "", body: Any = None,
                **options: Unpack[RequestOptions]) -> Any: ...

    def stream(self, op: str, pool: str, session: str, body: Any, **options: Unpack[RequestOptions]) -> Any: ...

    def close_session(self, session_id: str, timeout: float | None = None) -> Any: ...

    def _drive(self, steps: Steps[Any]) -> Any: ...

    def _is_closed(self) -> bool: ...


class SessionAPI:
    """Calls pinned to one worker of a pool; objects stay there as refs until released.

    Every op takes the :class:`CallOptions` ``timeout=`` (the call's deadline, which also stops
    the call on the worker), ``on_progress=`` and ``on_output=`` (what the call prints, warns or
    logs, in addition to this process's streams and loggers: dspex.client.output). Refs the session returns are handles that read
    like their objects (``prog(question=...)``, ``lm.model``). Through a
    :class:`dspex.aio.AsyncSession` every op returns an awaitable of the same value.
    """

    _label = "dspex.Session"
    _ops_awaitable = False  # its ops return awaitables (what a ref handle needs to know)

    def __init__(self, client: SessionClient, pool: str, session_id: str, forward_output: bool | None = None,
                 client_settings: bool | None = None, durable: bool = False) -> None:
        self.client = client
        self.pool = pool
        self.id = session_id
        self.durable = durable  # asked for by this client (a pool's durable = true makes it so too)
        self._flags = FLAG_DURABLE if durable else 0
        self.worker = ""  # incarnation id once pinned
        self.closed = False
        self.forward_output = forward_output  # None: the client's
        # what the session's worker holds of this client's code, and whether the client's DSPy
        # settings go with each call
        self.sender = SendCache(client_settings=client.client_settings if client_settings is None else client_settings,
                                max_entries=client.config.code_cache)

    def __repr__(self) -> str:
        return f"<{self._label} {self.id[:8]} pool={self.pool} worker={self.worker[:8] or '-'}>"

    def __reduce__(self) -> Any:
        # pickled into a call's arguments (or a global its code reads): say what it is, not what it holds
        raise EncodeError(f"a {self._label} {self.id[:8]} (pool {self.pool}) cannot be sent to a worker: it is this "
                          "client's handle of the session. A call runs in its session already: pass the call the "
                          "data or refs it needs (ref = s.put(obj)), not the session", handle=self._label)

    def __copy__(self) -> Self:
        return self  # a handle, as a Ref is: copies are the same session

    def __deepcopy__(self, memo: Any) -> Self:
        return self

    def _closed(self) -> SessionClosed:
        return SessionClosed(f"session {self.id[:8]} is closed, and its refs with it (client.session(pool) "
                             "opens a new one)")

    def _track(self, status: str, worker: str) -> None:
        if worker:
            self.worker = worker

    def _request(self, op: Op, body: list[Any], options: CallOptions) -> Any:
        if self.closed:
            return self.client._drive(_raising(self._closed()))
        return self.client.request(op.value, self.pool, self.id, body, worker=self.worker, on_reply=self._track,
                                   bind=self, forward=self.forward_output, sender=self.sender, flags=self._flags,
                                   **call_options(options))

    # -- code and objects by value -------------------------------------------------------------
    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the session's worker, ``fn`` and the arguments sent by value.

        The same program text as in-process: ``program()`` here, ``s.run(program)`` there. The
        result comes back as data where it can (records, pydantic/dataclass instances...), as refs
        for what must stay on the worker. For ``timeout=`` & co use :meth:`apply`.
        """
        return self.apply(fn, args, kwargs)

    def apply(self, fn: Callable[..., Any] | Ref, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
              **options: Unpack[CallOptions]) -> Any:
        """:meth:`run` with the options: ``fn`` by value (or a ref to a callable on the worker)."""
        return self._request(Op.APPLY, [fn, positional(args), keywords(kwargs)], options)

    def put(self, obj: Any, **options: Unpack[CallOptions]) -> Any:
        """Ship ``obj`` by value and keep it on the worker: its ref (Ray's ``put``)."""
        return self._request(Op.PUT, [obj], options)

    def define(self, obj: Any, name: str | None = None, **options: Unpack[CallOptions]) -> Any:
        """Bind ``obj`` (a function, class or value, sent by value) in the session namespace as
        ``name`` (default ``obj.__name__``), so ``eval``/``exec`` code can use it."""
        return self._request(Op.BIND, [bound_name(obj, name), obj], options)

    # -- the explicit API ---------------------------------------------------------------------------
    def call(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
             **options: Unpack[CallOptions]) -> Any:
        """``module.fn(*args, **kwargs)`` on the session's worker."""
        return self._request(Op.CALL, [module, fn, positional(args), keywords(kwargs)], options)

    def method(self, ref: Ref, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
               **options: Unpack[CallOptions]) -> Any:
        """``ref.name(*args, **kwargs)`` on the worker."""
        return self._request(Op.METHOD, [ref, name, positional(args), keywords(kwargs)], options)

    def attr(self, ref: Ref, name: str, **options: Unpack[CallOptions]) -> Any:
        """``getattr(ref, name)`` on the worker."""
        return self._request(Op.GETATTR, [ref, name], options)

    def set_attr(self, ref: Ref, name: str, value: Any, **options: Unpack[CallOptions]) -> Any:
        """``setattr(ref, name, value)`` on the worker."""
        return self._request(Op.SETATTR, [ref, name, value], options)

    def eval(self, expr: str, namespace: dict[str, Any] | None = None, **options: Unpack[CallOptions]) -> Any:
        """Evaluate an expression on the worker; refs in ``namespace`` resolve to their objects."""
        return self._request(Op.EVAL, [expr, namespace or {}], options)

    def exec(self, source: str, namespace: dict[str, Any] | None = None, **options: Unpack[CallOptions]) -> Any:
        """Run statements in the session's namespace; returns the names they bound (as refs/data)."""
        return self._request(Op.EXEC, [source, namespace or {}], options)

    def to_data(self, ref: Ref, **options: Unpack[CallOptions]) -> Any:
        """Plain data of a dspy.Example / dspy.Prediction (or anything with ``toDict``)."""
        return self._request(Op.TO_DATA, [ref], options)

    def release(self, *refs: Ref, **options: Unpack[CallOptions]) -> Any:
        """Release refs (the number released); other values (data that came back by value) hold
        nothing there: skipped."""
        # ids, not refs: refs in a request body resolve to their objects on the worker
        return self._request(Op.RELEASE, [[r.id for r in refs if isinstance(r, Ref)]], options)

    # -- streams --------------------------------------------------------------------------------
    def _stream(self, op: Op, body: list[Any], options: CallOptions) -> Any:
        if self.closed:
            raise self._closed()
        # the request is built at the stream's first item: a wrong argument or option is refused here, at once
        arguments.checked_body(op, body)
        arguments.check_options(call_options(options))
        return self.client.stream(op.value, self.pool, self.id, body, worker=self.worker, on_reply=self._track,
                                  bind=self, forward=self.forward_output, sender=self.sender, flags=self._flags,
                                  **options)

    def stream(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
               **options: Unpack[CallOptions]) -> Any:
        """Stream the items of the iterable (or async iterable) ``module.fn(...)`` returns."""
        return self._stream(Op.CALL, [module, fn, positional(args), keywords(kwargs)], options)

    def stream_method(self, ref: Ref, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                      **options: Unpack[CallOptions]) -> Any:
        """Stream the items of what a method returns (e.g. a ``dspy.streamify`` program)."""
        return self._stream(Op.METHOD, [ref, name, positional(args), keywords(kwargs)], options)

    def stream_eval(self, expr: str, namespace: dict[str, Any] | None = None, **options: Unpack[CallOptions]) -> Any:
        """Stream the items of what an expression evaluates to."""
        return self._stream(Op.EVAL, [expr, namespace or {}], options)

    def stream_apply(self, fn: Callable[..., Any] | Ref, args: Sequence[Any] = (),
                     kwargs: dict[str, Any] | None = None, **options: Unpack[CallOptions]) -> Any:
        """Stream the items of what ``fn(*args, **kwargs)`` returns (``fn`` by value, as in :meth:`run`)."""
        return self._stream(Op.APPLY, [fn, positional(args), keywords(kwargs)], options)

    def close(self, timeout: float | None = None) -> Any:
        """Release every ref of the session on its worker (a close the broker died with goes again,
        once); a broker that cannot be reached is logged, not raised: its idle TTL releases it."""
        return self.client._drive(self._close(timeout))

    def _close(self, timeout: float | None) -> Steps[None]:
        if self.closed:
            return
        self.closed = True
        self.sender.close()
        if self.client._is_closed():
            log.warning("closing session %s: its client is closed (its idle TTL will release it)", self.id[:8])
            return
        for again in (True, False):  # a close the broker died with goes once more, to the one that
            try:  # comes back: it knows a durable session from its store (closing is idempotent)
                yield self.client.close_session(self.id, timeout=timeout)
                return
            except (ConnectionError, Timeout) as err:
                if not (again and isinstance(err, ConnectionError)):
                    log.warning("closing session %s: %s (its idle TTL will release it)", self.id[:8], err)
                    return


class Closing:
    """``with`` it closes it: a blocking client, session or stream (the asyncio kinds close by
    ``async with``, :class:`AsyncClosing`)."""

    close: Callable[..., Any]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClosing:
    """``async with`` it closes it: an asyncio client or session."""

    close: Callable[..., Any]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Session(SessionAPI, Closing):
    """A session of a blocking client (``dspex.connect``): every op returns its value."""


class AsyncSession(SessionAPI, AsyncClosing):
    """A session of an asyncio client (``dspex.aio.connect``): every op returns an awaitable, and so
    do its refs' handles (``await prog(question=...)``, ``await lm.model``; to set an attribute,
    ``await s.set_attr(ref, name, value)``)."""

    _label = "dspex.aio.AsyncSession"
    _ops_awaitable = True


def _raising(err: BaseException) -> Steps[Any]:
    """An op whose one step is to raise ``err`` (as an awaitable's error with the asyncio client)."""
    raise err
    yield  # a generator: raises when driven
