"""What a worker does with a request: resolve refs, run the op in its session, encode the result.

The executor knows nothing about sockets: it turns (header, payload frames) into reply frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import inspect
import logging
import threading
import reprlib
import secrets
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterator

import msgpack

from dspex import codec
from dspex import progress
from dspex.errors import Cancelled, DspexError, ProtocolError, RefNotFound, RemoteError, UnknownOp
from dspex.protocol import Op, RequestHeader, Status
from dspex.ref import Ref

log = logging.getLogger("dspex.worker")

DEFAULT_REF_CAP = 100_000
# How many released/evicted ref ids we remember to explain a stale ref. Keyed by hash(ref id), an
# int, not the 32-char str; ~150 B an entry with the OrderedDict node, so ~1.5 MB at most (50_000
# str keys grew a dspy worker's RSS by ~10% over 50k session open/close cycles; target < 5%).
_GONE_MEMORY = 10_000

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 200

# The session a request runs in; read by the dspy.configure interceptor.
current_session: contextvars.ContextVar["SessionState | None"] = contextvars.ContextVar(
    "dspex_session", default=None
)


@dataclass
class SessionState:
    """Everything one session owns on this worker."""

    id: str
    refs: dict[str, Any] = field(default_factory=dict)
    ref_of_object: dict[int, str] = field(default_factory=dict)
    dspy_settings: dict[str, Any] = field(default_factory=dict)
    namespace: dict[str, Any] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)


class StreamControl:
    """Flow control of one streamed call: credit from the consumer, and cancellation.

    The producer may run ``window`` items ahead of the consumer's acknowledgements, so a slow
    consumer makes the producer wait instead of making the broker buffer without bound.
    """

    def __init__(self, emit: Callable[[str, list[Any]], None], window: int, stall_timeout: float) -> None:
        self._emit = emit
        self._cond = threading.Condition()
        self.credit = window
        self.cancelled = False
        self.stall_timeout = stall_timeout

    def add_credit(self, n: int) -> None:
        with self._cond:
            self.credit += n
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()

    def send(self, kind: str, frames: list[Any]) -> bool:
        """Send one item or progress event; False once the consumer cancelled or went away."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.cancelled or self.credit > 0, self.stall_timeout):
                log.warning("stream consumer silent for %.0fs; cancelling the stream", self.stall_timeout)
                self.cancelled = True
            if self.cancelled:
                return False
            self.credit -= 1
        self._emit(kind, frames)
        return True


class _ProgressLogHandler(logging.Handler):
    """Forwards dspy/gepa log records of one call's thread as progress events."""

    def __init__(self, stream: StreamControl, to_ref: Callable[[Any], Ref]) -> None:
        super().__init__(logging.INFO)
        self.stream = stream
        self.thread = threading.get_ident()
        self.to_ref = to_ref

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread or not record.name.startswith(("dspy", "gepa")):
            return
        try:
            message = record.getMessage()
        except Exception:
            return
        self.stream.send(Status.PROGRESS.value, codec.encode({"log": record.name, "message": message[:2000]}))


class RefTable:
    """All refs of this worker, LRU-capped across sessions."""

    def __init__(self, pool: str, worker: str, cap: int = DEFAULT_REF_CAP) -> None:
        self.pool = pool
        self.worker = worker
        self.cap = cap
        self.sessions: dict[str, SessionState] = {}
        self._lru: OrderedDict[str, str] = OrderedDict()  # ref id -> session id
        self._gone: OrderedDict[int, str] = OrderedDict()  # ref id -> why it is gone
        self._lock = threading.RLock()  # calls of different sessions may run in threads

    def session(self, session_id: str) -> SessionState:
        with self._lock:
            state = self.sessions.get(session_id)
            if state is None:
                state = self.sessions[session_id] = SessionState(session_id)
        state.last_used = time.monotonic()
        return state

    def put(self, session: SessionState, obj: Any) -> Ref:
        with self._lock:
            ref_id = session.ref_of_object.get(id(obj))
            if ref_id is None or ref_id not in session.refs:
                ref_id = secrets.token_hex(16)  # 128 bits: refs are unguessable
                session.refs[ref_id] = obj
                session.ref_of_object[id(obj)] = ref_id
                self._lru[ref_id] = session.id
                self._evict()
            else:
                self._lru.move_to_end(ref_id)
        try:
            text = _REPR.repr(obj)  # bounded: a huge or deep object must not cost a full repr
        except Exception as exc:  # a broken __repr__ must not break the call
            text = f"<unrepresentable: {type(exc).__name__}>"
        return Ref(ref_id, session.id, self.pool, self.worker, _type_name(obj), text[:200])

    def get(self, session: SessionState, ref: Ref) -> Any:
        if ref.session != session.id:
            raise RefNotFound(
                f"ref {ref.id[:8]} belongs to session {ref.session[:8]}, not to this session {session.id[:8]}",
                ref=ref.id,
            )
        with self._lock:
            try:
                obj = session.refs[ref.id]
            except KeyError:
                why = self._gone.get(hash(ref.id))
                if why is None and ref.worker != self.worker:
                    why = f"it was made by worker {ref.worker[:8]}, not this one ({self.worker[:8]})"
                raise RefNotFound(f"ref {ref.id[:8]} ({ref.type_name}) is gone: {why or 'unknown ref'}",
                                  ref=ref.id) from None
            self._lru.move_to_end(ref.id)
        return obj

    def release(self, session: SessionState, ref_id: str, why: str = "released") -> bool:
        with self._lock:
            if ref_id not in session.refs:
                return False  # unknown, already gone, or another session's: nothing to do
            obj = session.refs.pop(ref_id)
            session.ref_of_object.pop(id(obj), None)
            self._lru.pop(ref_id, None)
            self._forget(ref_id, why)
        return True

    def release_session(self, session_id: str, why: str = "its session was closed") -> int:
        with self._lock:
            state = self.sessions.pop(session_id, None)
            if state is None:
                return 0
            for ref_id in state.refs:
                self._lru.pop(ref_id, None)
                self._forget(ref_id, why)
        return len(state.refs)

    def _forget(self, ref_id: str, why: str) -> None:
        self._gone[hash(ref_id)] = why
        if len(self._gone) > _GONE_MEMORY:
            self._gone.popitem(last=False)

    def _evict(self) -> None:
        while len(self._lru) > self.cap:
            ref_id, session_id = self._lru.popitem(last=False)
            state = self.sessions.get(session_id)
            if state is not None:
                obj = state.refs.pop(ref_id, None)
                state.ref_of_object.pop(id(obj), None)
            self._forget(ref_id, f"evicted: this worker holds at most {self.cap} refs (least recently used go first)")

    @property
    def count(self) -> int:
        return len(self._lru)


def _type_name(obj: Any) -> str:
    cls = type(obj)
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


class Executor:
    """Runs worker ops against a RefTable, with per-session DSPy settings."""

    def __init__(self, refs: RefTable) -> None:
        self.refs = refs
        self._dspy: Any = None
        self.served = 0
        self.errors = 0
        self.own_frames = False  # request frames come from an ipc/tcp socket: arrays decode without a copy

    # -- DSPy integration ------------------------------------------------------------------
    def enable_dspy(self, max_history: int = 200) -> None:
        """Import dspy and route ``dspy.configure`` of a session into that session's settings.

        ``dspy.configure`` is process-global and owned by the first thread that calls it; two
        sessions on one worker must not see each other's LM, so a configure inside a session is
        stored on the session and applied with ``dspy.context`` around each of its calls.
        """
        import dspy

        # the module, not the `settings` object that dspy.dsp.utils re-exports under that name
        settings_module = importlib.import_module("dspy.dsp.utils.settings")

        dspy.configure(max_history_size=max_history)
        original = dspy.settings.configure

        def session_configure(**kwargs: Any) -> None:
            state = current_session.get()
            if state is None:
                original(**kwargs)
                return
            state.dspy_settings.update(kwargs)
            # make the new settings visible for the rest of this call too
            overrides = settings_module.thread_local_overrides.get()
            settings_module.thread_local_overrides.set(type(overrides)({**overrides, **kwargs}))

        dspy.settings.configure = session_configure
        dspy.configure = session_configure
        self._dspy = dspy

    @contextlib.contextmanager
    def _session_scope(self, state: SessionState) -> Iterator[None]:
        token = current_session.set(state)
        try:
            if self._dspy is not None:
                with self._dspy.context(**state.dspy_settings):
                    yield
            else:
                yield
        finally:
            current_session.reset(token)

    # -- ops ---------------------------------------------------------------------------------
    def execute(self, header: RequestHeader, payload: list[Any], stream: StreamControl | None = None,
                *, deadline: float | None = None) -> list[Any]:
        """Return codec frames of the result; raise DspexError for a typed failure.

        ``deadline`` (``time.monotonic()`` scale, None for none) is when the caller stops waiting.

        With ``stream`` (the caller asked for streaming), a generator result is iterated here and
        its items sent as partial replies; any other call reports progress events (dspy/gepa log
        records and ``dspex.progress.report``) through it while it runs.
        """
        ephemeral = not header.session
        state = self.refs.session(header.session or "eph-" + secrets.token_hex(8))

        def to_ref(obj: Any) -> Ref:
            return self.refs.put(state, obj)

        try:
            with self._session_scope(state), self._progress_scope(stream, to_ref):
                try:
                    args = codec.decode(payload, resolve_ref=lambda r: self.refs.get(state, r), own_frames=self.own_frames)
                except DspexError:
                    raise
                except Exception as exc:
                    raise ProtocolError(f"malformed request body: {exc}") from None
                result = self._run(header.op, state, args)
                if stream is not None and (inspect.isgenerator(result) or inspect.isasyncgen(result)):
                    return codec.encode(self._drain_stream(result, stream, to_ref), to_ref=to_ref)
                return codec.encode(result, to_ref=to_ref)
        finally:
            if ephemeral:
                self.refs.release_session(state.id, "it came from a sessionless call; use a session to keep objects")

    @contextlib.contextmanager
    def _progress_scope(self, stream: StreamControl | None, to_ref: Callable[[Any], Ref]) -> Iterator[None]:
        if stream is None:
            yield
            return

        def report(data: Any) -> None:
            stream.send(Status.PROGRESS.value, codec.encode(data, to_ref=to_ref))

        handler = _ProgressLogHandler(stream, to_ref)
        # dspy's logger does not propagate to the root: listen on it directly
        loggers = [logging.getLogger()] + [
            lg for lg in (logging.getLogger("dspy"), logging.getLogger("gepa")) if not lg.propagate]
        for lg in loggers:
            lg.addHandler(handler)
        token = progress.current_reporter.set(report)
        try:
            yield
        finally:
            progress.current_reporter.reset(token)
            for lg in loggers:
                lg.removeHandler(handler)

    def _drain_stream(self, gen: Any, stream: StreamControl, to_ref: Callable[[Any], Ref]) -> dict[str, Any]:
        """Send a generator's items as partial replies; stop it when the consumer cancels."""
        count = 0
        items = _iterate(gen)  # a generator: close() runs the producer's finally blocks
        try:
            for item in items:
                try:
                    frames = codec.encode(item, to_ref=to_ref)
                except DspexError:
                    raise
                except Exception as exc:
                    raise _remote(exc) from None
                if not stream.send(Status.PARTIAL.value, frames):
                    raise Cancelled(f"stream cancelled by its consumer after {count} items", items=count)
                count += 1
        except DspexError:
            raise
        except Exception as exc:
            raise _remote(exc) from None
        finally:
            items.close()  # runs the producer's finally blocks now, not at garbage collection
        return {"items": count}

    def _run(self, op: str, state: SessionState, args: Any) -> Any:
        if not isinstance(args, (list, tuple)):
            raise ProtocolError(f"request body for {op!r} must be a list, got {type(args).__name__}")
        handler = self._handlers.get(op)
        if handler is None:
            raise UnknownOp(f"unknown op {op!r}")
        try:
            return handler(self, state, *args)
        except DspexError:
            raise
        except TypeError as exc:
            if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                raise ProtocolError(f"wrong arguments for {op!r}: {exc}") from None
            raise _remote(exc) from None
        except Exception as exc:
            raise _remote(exc) from None

    def _call(self, state: SessionState, module: str, name: str, args: list[Any] | None = None,
              kwargs: dict[str, Any] | None = None) -> Any:
        fn = _resolve_callable(module, name)
        return _invoke(fn, args, kwargs)

    def _method(self, state: SessionState, target: Any, name: str, args: list[Any] | None = None,
                kwargs: dict[str, Any] | None = None) -> Any:
        return _invoke(_getattr_remote(target, name), args, kwargs)

    def _getattr(self, state: SessionState, target: Any, name: str) -> Any:
        return _getattr_remote(target, name)

    def _setattr(self, state: SessionState, target: Any, name: str, value: Any) -> None:
        try:
            setattr(target, name, value)
        except Exception as exc:
            raise _remote(exc) from None

    def _eval(self, state: SessionState, expr: str, namespace: dict[str, Any] | None = None) -> Any:
        scope = {**state.namespace, **(namespace or {})}
        return eval(compile(expr, "<dspex eval>", "eval"), scope)  # noqa: S307 - the op's purpose

    def _exec(self, state: SessionState, source: str, namespace: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run ``source`` in the session's namespace; return the names it bound."""
        scope = state.namespace
        before = dict(scope)
        scope.update(namespace or {})
        exec(compile(source, "<dspex exec>", "exec"), scope)  # noqa: S102 - the op's purpose
        return {k: v for k, v in scope.items() if k != "__builtins__" and before.get(k, _MISSING) is not v}

    def _release(self, state: SessionState, ref_ids: list[str]) -> int:
        return sum(self.refs.release(state, str(ref_id)) for ref_id in ref_ids)

    def _to_data(self, state: SessionState, target: Any) -> Any:
        """Plain data of a dspy.Example/Prediction (or anything with toDict / a dict view)."""
        for attr in ("toDict", "to_dict"):
            fn = getattr(target, attr, None)
            if callable(fn):
                return fn()
        if isinstance(target, dict):
            return dict(target)
        raise RemoteError(f"{_type_name(target)} has no plain-data form", type="TypeError", traceback="")

    _handlers: dict[str, Callable[..., Any]] = {
        Op.CALL.value: _call,
        Op.METHOD.value: _method,
        Op.GETATTR.value: _getattr,
        Op.SETATTR.value: _setattr,
        Op.EVAL.value: _eval,
        Op.EXEC.value: _exec,
        Op.RELEASE.value: _release,
        Op.TO_DATA.value: _to_data,
    }


_MISSING = object()


def _iterate(gen: Any) -> Generator[Any, None, None]:
    """Items of a generator or an async generator (driven on a private event loop); closes it."""
    if inspect.isasyncgen(gen):
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(gen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(gen.aclose())
            loop.close()
    else:
        try:
            yield from gen
        finally:
            gen.close()


def _make_lm(model: str, *args: Any, **kwargs: Any) -> Any:
    """``dspy.LM`` as called through dspex: ``offline/...`` models get the offline engine."""
    import dspy

    from examples.offline_lm import is_offline_model, offline_lm

    if is_offline_model(model) and "engine" not in kwargs:
        return offline_lm(model or "offline/triage", **kwargs)
    return dspy.LM(model, *args, **kwargs)


_SPECIAL_CALLABLES: dict[tuple[str, str], Callable[..., Any]] = {("dspy", "LM"): _make_lm}


def _resolve_callable(module: str, name: str) -> Any:
    special = _SPECIAL_CALLABLES.get((module, name))
    if special is not None:
        return special
    try:
        obj: Any = importlib.import_module(module)
    except Exception as exc:
        raise _remote(exc) from None
    for part in name.split("."):
        obj = _getattr_remote(obj, part)
    return obj


def _getattr_remote(target: Any, name: str) -> Any:
    try:
        return getattr(target, name)
    except Exception as exc:
        raise _remote(exc) from None


def _invoke(fn: Any, args: list[Any] | None, kwargs: dict[str, Any] | None) -> Any:
    if not callable(fn):
        raise RemoteError(f"{_type_name(fn)} object is not callable", type="TypeError", traceback="")
    try:
        return fn(*(args or ()), **(kwargs or {}))
    except Exception as exc:
        raise _remote(exc) from None


def _remote(exc: BaseException) -> RemoteError:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return RemoteError(str(exc), type=type(exc).__name__, traceback=tb[-8000:])


def error_frames(err: DspexError) -> list[bytes]:
    return [msgpack.packb(err.to_wire(), default=str)]
