"""What a worker does with a request: resolve refs, run the op in its session, encode the result.

The executor knows nothing about sockets: it turns (header, payload frames) into reply frames.
Its parts live in modules of one job each: what each op does (worker.ops), refs (worker.refs),
the session's module (worker.namespace), DSPy settings isolation (worker.dspy_settings), time
limits (worker.limits), output capture (worker.output, worker.sink), streams/progress/awaitables
(worker.streaming) and exception payloads (worker.remote_errors).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import secrets
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from dspex.wire import codec, codestore
from dspex.wire.errors import (
    Cancelled,
    DspexError,
    EncodeError,
    ProtocolError,
    RefNotFound,
    Timeout,
)
from dspex.wire.headers import RequestHeader
from dspex.wire.protocol import FLAG_CONTEXT, FLAG_HELD, FLAG_ITEMS, MAX_MESSAGE_BYTES, Durable, Status, log_level_of
from dspex.wire.ref import EPHEMERAL_SESSION, Ref
from dspex.wire.remoteerror import RemoteError
from dspex.wire.zmqfast import frame_buffer
from worker import forking, limits, lm_history, namespace, output, threads, warnfilters
from worker.checkpoint import naming_unbound
from worker.dspy_settings import SessionSettings, current_session
from worker.durable import DurableSessions
from worker.ops import SessionOps
from worker.refs import RefTable, type_name
from worker.remote_errors import guarded, remote_error
from worker.sink import Emit, Event, Offer, OutputSink
from worker.streaming import (
    LazyStream,
    StreamControl,
    drain,
    progress_scope,
    within_limit,
)

T = TypeVar("T")


class Executor:
    """Runs worker ops against a RefTable, each call in its session's module and DSPy settings.

    ``capacity`` is how many calls the worker runs at once: with 1 (calls on the main thread),
    the soft time limit interrupts blocking sleeps and socket reads (a signal). Threads a call
    starts carry it (worker.threads).
    """

    def __init__(self, refs: RefTable, *, capacity: int = 1, grace: float = limits.DEFAULT_GRACE,
                 max_message: int = MAX_MESSAGE_BYTES) -> None:
        self.refs = refs
        self.max_message = max_message  # a bigger result is not sent (DSPEX_MAX_MESSAGE)
        self.alone = capacity <= 1
        self.settings = SessionSettings()
        self.watchdog = limits.Watchdog(grace)
        self.served = 0
        self.errors = 0
        # (client, req_id) -> its running call, for B_CANCEL; and cancels of requests received but
        # not started yet (or finished already: the worker forgets those when it is idle), each
        # with whether its session closed
        self._calls: dict[tuple[bytes, int], limits._Call] = {}
        self._early_cancels: dict[tuple[bytes, int], bool] = {}
        self.own_frames = False  # request frames come from an ipc/tcp socket: arrays decode without a copy
        self.durable = DurableSessions(refs)
        self.ops = SessionOps(refs)
        refs.on_session_closed.append(namespace.drop_session_module)
        refs.on_session_closed.append(lambda state: state.code.release())
        refs.on_session_closed.append(lambda state: state.loop.close())
        codestore.on_user_module.append(namespace.present_user_module)

    def install(self) -> None:
        """Process-wide hooks, from the main thread before the first call: output capture, the
        time-limit signal handler and watchdog, ``inspect.getsource`` for by-value classes, the
        session's code in processes user code starts (``multiprocessing``), and the call in
        threads it starts."""
        output.install()
        warnfilters.install(current_session.get)
        namespace.install_getsource()
        forking.install()
        self.watchdog.install()
        threads.install(self.settings.thread_entry)

    def enable_dspy(self, max_history: int) -> None:
        """Import dspy and keep its settings per session (see worker.dspy_settings)."""
        self.settings.install(max_history)
        lm_history.install()
        self.durable.history_limit = max_history
        namespace.install_getsource()  # dspy replaced inspect.getfile on import: go first again
        output.share_progress_bars()

    # -- cancellation ----------------------------------------------------------------------
    def cancel(self, key: tuple[bytes, int], session_closed: bool = False) -> bool:
        """Its caller cancelled request ``key`` (``(client_id, req_id)``), or its session closed:
        stop it if it runs (True), else stop it before it starts. No lock: the remembered cancel is
        added before the running calls are looked at, and :meth:`execute` registers its call before
        it looks for a remembered cancel, so one of the two always sees the other."""
        if len(self._early_cancels) < _EARLY_CANCELS_MAX:
            self._early_cancels[key] = session_closed
        call = self._calls.get(key)
        if call is None:
            return False
        self._early_cancels.pop(key, None)
        self.watchdog.cancel(call, session_closed)
        return True

    def forget_cancels(self) -> None:
        """The worker has nothing received and unfinished: remembered cancels are of requests that
        ended before their cancel arrived."""
        if self._early_cancels:
            self._early_cancels.clear()

    # -- ops ---------------------------------------------------------------------------------
    def execute(self, header: RequestHeader, payload: list[Any], stream: StreamControl | LazyStream | None = None,
                *, deadline: float | None = None, on_hard: Callable[[], None] | None = None,
                client: bytes = b"", ephemeral: bool = False, durable: int = 0,
                checkpoint: list[Any] | None = None) -> list[Any]:
        """Return codec frames of the result; raise DspexError for a typed failure.

        ``deadline`` (``time.monotonic()`` scale, None for none) is when the caller stops waiting:
        the call is interrupted then (soft limit, ``Timeout(stopped=True)``); ``on_hard`` runs if
        it is still running ``grace`` seconds later. ``client`` and ``header.req_id`` name the
        call for :meth:`cancel`: a cancelled call is interrupted the same way (``Cancelled``).

        With ``stream`` (the caller listens for events), what the call prints, warns or logs is
        sent through it while it runs, and with ``FLAG_STREAM`` also progress events (dspy/gepa
        log records, ``dspex.progress.report``). With ``FLAG_ITEMS``
        (the caller iterates the result) any iterable result is iterated here and its items sent
        as partial replies (the reply is ``{"items": n, "value": v}``, ``v`` a generator's return
        value), and a non-iterable one is an error.

        By-value code in the request is rebuilt in the session's code store (dspex.wire.codestore); a
        request that refers to code the store lacks fails ``CodeCacheMiss`` before anything runs
        (``ephemeral``: the session keeps nothing between calls, a ``none`` pool). With
        ``FLAG_CONTEXT`` the last payload frame is the session context: the client's DSPy settings
        (applied to this call, under the session's own) and keys the client forgot.

        A durable session (``durable``: the request envelope's ``Durable.CHECKPOINT``/``Durable.FULL``) is
        checkpointed after the call, whatever its outcome; the checkpoint's frames go to
        ``checkpoint`` (left empty when nothing changed); one that moved here was restored first
        (:meth:`DurableSessions.restore`).
        """
        sessionless = not header.session
        state = self.refs.session(header.session or EPHEMERAL_SESSION + secrets.token_hex(8))

        made: list[str] = []  # refs this call made: dropped if it fails (the caller never sees them)

        def to_ref(obj: Any) -> Ref:
            return self.refs.put(state, obj, made)

        emit: Emit | None = None
        offer: Offer | None = None
        if stream is not None:
            live = stream

            def emit(event: Event) -> None:
                live.send(Status.OUTPUT.value, codec.encode(event))

            def offer(event: Event, on_credit: Callable[[], None]) -> bool:
                return live.offer(Status.OUTPUT.value, codec.encode(event), on_credit)

        call = None
        key = (client, header.req_id)
        usage: Any = None  # the call's usage tracker (dspy.track_usage() around the call on the client)
        history: Any = None  # the log of the client's LMs' history entries (lm_history.start)
        context_vars: list[tuple[Any, Any]] = []  # (variable, token) of the client's ContextVars set for the call
        extras = False  # the reply is [result, {"usage", "history"}]
        try:
            with limits.Limit(self.watchdog, deadline, on_hard or _no_hard) as call, \
                    output.capture(f"{state.id[:8]} {header.req_id}", emit, self.alone,
                                   log_level_of(header.flags), offer, state) as sink, \
                    self.settings.scope(state) as scope, \
                    (progress_scope(stream, to_ref) if isinstance(stream, StreamControl) else _NO_SCOPE), \
                    _Interpreter():
                self._calls[key] = call
                if isinstance(stream, StreamControl):
                    stream.before_item = sink.send_pending  # what it printed before goes first
                if self._early_cancels and key in self._early_cancels:
                    why = "its session was closed" if self._early_cancels.pop(key) else "it was cancelled by its caller"
                    raise Cancelled(f"{header.op} did not start: {why}", op=header.op)
                context: dict[str, Any] | None = None
                failed: DspexError | None = None
                try:
                    body = payload
                    if header.flags & FLAG_CONTEXT:
                        body, context = payload[:-1], _session_context(payload[-1])
                    prefix = _field(context, "c", "")
                    if context is not None and "f" in context:
                        state.code.inherit(prefix, _lineage(context["f"]))
                    with codestore.loading(state.code, ephemeral or sessionless, prefix, _field(context, "at", 0)):
                        if header.flags & FLAG_HELD:
                            codestore.check_held(_field(context, "v", 0))
                        resolve_ref = functools.partial(self.refs.get, state)
                        args = codec.decode(body, resolve_ref=resolve_ref, own_frames=self.own_frames, side="worker")
                        if context is not None:  # the client's settings may hold refs (an LM it s.put)
                            _decode_context(context, functools.partial(_setting_ref, resolve_ref))
                except DspexError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a malformed body: the caller's error
                    failed = ProtocolError(f"malformed request body: {exc}")
                except limits.CallTimedOut:
                    raise
                except BaseException as exc:  # noqa: BLE001 - unpickling by-value objects runs user code
                    failed = remote_error(exc)
                if failed is not None:
                    # raised out of the except clause, as remote_errors.guarded's: the original and
                    # its frames go within the call, and what dropping them warns is the call's
                    raise failed from None
                if context is not None:
                    state.code.drop(context.get("drop") or [])
                    state.code.reached(prefix, _field(context, "v", 0), _field(context, "to", 0))
                    scope.add_client(context.get("dspy"), context.get("pinned"))
                    context_vars = _set_context_vars(context.get("vars"), state.code.objects)
                    if context.get("usage"):
                        usage = scope.track_usage()
                    if "history" in context:
                        history = lm_history.start(context["history"], state.code.objects, state.late_history)
                    extras = bool(context.get("usage")) or "history" in context
                # in a copy of the thread's context, as a task runs: what the call sets (its
                # ContextVars) stays in it, also where its caller has none set
                own = contextvars.copy_context()
                result = own.run(self.ops.run, header.op, state, args)
                if isinstance(stream, StreamControl) and header.flags & FLAG_ITEMS and (
                        hasattr(result, "__iter__") or hasattr(result, "__aiter__")):
                    def encode_item(item: Any) -> list[Any]:
                        frames = guarded(_encoded, item, to_ref)
                        within_limit(frames, f"an item of {header.op}", self.max_message)
                        made.clear()  # streamed out: the caller holds these refs now
                        if call is not None and header.timeout_ms > 0:
                            call.extend(header.timeout_ms / 1000)  # a stream's timeout is per item
                        return frames

                    result = own.run(guarded, naming_unbound, state, drain, result, stream, encode_item, state.loop)
                elif header.flags & FLAG_ITEMS:
                    raise RemoteError(f"{type_name(result)} object is not iterable: nothing to stream",
                                      type="TypeError", module="builtins", traceback="")
                frames = guarded(_encoded, [result, _extras(usage, history)] if extras else result, to_ref)
                limits.settle(call)
                within_limit(frames, f"the result of {header.op}", self.max_message)
            if call is not None and call.timed_out:
                raise limits.CallTimedOut()
            return frames
        except (limits.CallTimedOut, DspexError) as exc:
            for ref_id in made:
                self.refs.release(state, ref_id, "the call that made it failed")
            if isinstance(exc, DspexError) and not (call is not None and call.timed_out and not (
                    call.cancelled and exc.details.get("closing"))):
                # (an interrupted stream's producer whose close() raised: that error is its caller's close()'s)
                raise _with_extras(exc, usage, history)
            # interrupted (an error user code made of the interruption too)
            raise _with_extras(_stopped(header, call), usage, history) from None
        finally:
            for variable, token in reversed(context_vars):
                variable.reset(token)
            if history is not None:
                lm_history.stop(history)
            self._calls.pop(key, None)
            if sessionless:
                self.refs.release_session(state.id, "it came from a sessionless call; use a session to keep objects")
            elif durable and checkpoint is not None:
                # after the call's time limit and output capture: a soft limit never cuts a
                # checkpoint short; what it leaves out goes to the caller as a warning
                sink = OutputSink(f"{state.id[:8]} {header.req_id}", emit)
                checkpoint.extend(self.durable.after_call(state, bool(durable & Durable.FULL), sink) or ())
            elif state.checkpoint is not None:  # the broker turned the session plain: what it held goes
                state.checkpoint = None

    def holds(self, session: str) -> bool:
        """This worker holds durable session ``session`` (it ran or restored it)."""
        state = self.refs.sessions.get(session)
        return state is not None and state.checkpoint is not None


def _encoded(result: Any, to_ref: Callable[[Any], Ref]) -> list[Any]:
    """The reply frames of ``result`` (run it under ``guarded``: encoding runs user code,
    ``__reduce__``, ``__iter__``)."""
    # data comes back as data (records, pydantic/dataclass instances...), the rest as refs
    repeats = codec.Repeats(plain_only=True)
    frames = codec.encode(result, to_ref=to_ref, policy=codec.Policy.DATA, repeats=repeats)
    if repeats.seen and repeats.plain:
        # one object in two places of plain data: one pickle keeps it one object there
        try:
            return codec.encode_whole(result)
        except EncodeError:
            pass  # (what the walk made of it still stands: equal copies)
    return frames


def _session_context(frame: Any) -> dict[str, Any]:
    """A request's session context frame, unpacked before anything of the request is loaded: its
    binding versions are read first (``v``, ``at``); its ext values (the client's settings, context
    variables, bindings to catch up on) stay undecoded until :func:`_decode_context`."""
    context = msgpack.unpackb(frame_buffer(frame))
    if not isinstance(context, dict):
        raise ProtocolError("malformed session context")
    return context


def _field(context: dict[str, Any] | None, name: str, default: T) -> T:
    """The session context's ``name`` (a binding version, the client's key prefix ``c`` that
    ``v``, ``to`` and ``at`` count for); absent or malformed: ``default``."""
    value = context.get(name, default) if context is not None else default
    return value if isinstance(value, type(default)) else default


def _lineage(value: Any) -> list[tuple[str, int]]:
    """A forked child's ancestors (its context's ``f``): (key prefix, binding version at the fork)."""
    if not isinstance(value, list):
        return []
    return [(p[0], p[1]) for p in value
            if isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], int)]


def _decode_context(context: dict[str, Any], resolve_ref: Callable[[Ref], Any]) -> None:
    """Decode the ext values of an unpacked session context in place (in the request's load)."""
    for name, value in context.items():
        if isinstance(value, msgpack.ExtType):
            context[name] = codec.decode_ext(value, resolve_ref, side="worker")


def _set_context_vars(values: Any, objects: dict[str, Any]) -> list[tuple[Any, Any]]:
    """Set the session's ContextVars (of the client's code, held by key) to the values the calling
    client's context holds, for this call: (variable, token) to reset after it."""
    if not isinstance(values, dict):
        return []
    out = []
    for key, value in values.items():
        variable = objects.get(key) if isinstance(key, str) else None
        if type(variable) is contextvars.ContextVar:
            out.append((variable, variable.set(value)))
    return out


class _Interpreter:
    """Interpreter state a call may leave changed that the worker's own code and the next call on
    its thread (perhaps another session's) rely on, put back as the call's block ends, before any
    of the worker's code after it: a trace or profile function set on the call's thread (it would
    trace the worker and the next calls, and CPython 3.11 can spin forever in a traced frame when a
    time limit's interruption lands), and a recursion limit lowered below the worker's own (other
    sessions' calls and the worker's encoding would hit it; a raised one harms no one and stays).
    A class, not a generator context manager: it is entered on every call."""

    __slots__ = ("profile", "trace")

    def __enter__(self) -> None:
        self.trace = sys.gettrace()
        self.profile = sys.getprofile()

    def __exit__(self, *exc: object) -> None:
        if sys.gettrace() is not self.trace:
            sys.settrace(self.trace)
        if sys.getprofile() is not self.profile:
            sys.setprofile(self.profile)
        if sys.getrecursionlimit() < _RECURSION_LIMIT:
            sys.setrecursionlimit(_RECURSION_LIMIT)


_RECURSION_LIMIT = sys.getrecursionlimit()  # the worker's own
_NO_SCOPE = contextlib.nullcontext()  # reusable: a call without a stream has no progress scope
_EARLY_CANCELS_MAX = 10_000  # remembered cancels (a flood of cancels for unknown requests stays bounded)


def _usage_data(tracker: Any) -> dict[str, list[Any]]:
    """What a call's LM calls used (``{lm: [entry, ...]}``), as plain data (an error reply's
    details must pack with msgpack)."""
    if tracker is None:  # a worker without DSPy: no LM call
        return {}
    try:
        data = json.loads(json.dumps(dict(tracker.usage_data), default=str))
    except (TypeError, ValueError):  # a provider's odd usage fields: better none than no reply
        return {}
    return data if isinstance(data, dict) else {}


def _extras(tracker: Any, history: Any) -> dict[str, Any]:
    """What comes back beside a call's result when the request asked (its context's ``"usage"``,
    ``"history"``): what its LM calls used, and the history entries of the client's LMs."""
    out: dict[str, Any] = {}
    if tracker is not None:
        out["usage"] = _usage_data(tracker)
    if history is not None:
        out.update(lm_history.extras(history[0]))
    return out


def _with_extras(err: DspexError, tracker: Any, history: Any) -> DspexError:
    """``err`` carrying what the call used and recorded before it failed, for the caller."""
    err.details.update(_extras(tracker, history))
    return err


def _setting_ref(resolve: Callable[[Ref], Any], ref: Ref) -> Any:
    try:
        return resolve(ref)
    except RefNotFound as err:
        raise RefNotFound(f"the client's DSPy settings hold a ref this session cannot use: {err.message} (configure "
                          "the object of this session, or open the session with client_settings=False)",
                          **err.details) from None


def _no_hard() -> None:
    """No hard-limit action given (an executor used without a worker process)."""


def _stopped(header: RequestHeader, call: limits._Call | None) -> DspexError:
    """What the caller of an interrupted call gets: ``Cancelled`` if it cancelled, else ``Timeout``."""
    if call is not None and call.session_closed:
        return Cancelled(f"{header.op} was stopped: its session was closed", op=header.op, stopped=True)
    if call is not None and call.cancelled:
        return Cancelled(f"{header.op} was cancelled by its caller and stopped; the session and its objects are "
                         "intact", op=header.op, stopped=True)
    return Timeout(f"{header.op} ran past its deadline ({header.timeout_ms / 1000:g}s) and was stopped; "
                   "the session and its objects are intact", op=header.op, stopped=True, hard=False)
