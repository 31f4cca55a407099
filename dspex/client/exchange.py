"""The request core shared by the sync and asyncio clients: everything about one request except
the socket I/O (encoding and its limits, request headers, reply handling, credit, error decoding,
the reply deadline).

A client sends ``exchange.frames(req_id, worker)`` and feeds each reply frame set to
``exchange.feed(...)``, which forwards the call's output (dspex.client.output), calls the progress/output
callbacks, says how much credit to grant,
raises the typed error of an error reply and decodes the final result. The driver only waits:
until ``exchange.wait`` seconds pass (then ``exchange.timed_out()``), or the connection drops
(``exchange.lost(why)``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import msgpack
import zmq

from dspex.client import codeindex, output, senderrors
from dspex.client.arguments import checked_body
from dspex.client.callglobals import as_module_globals
from dspex.client.config import DEFAULT_REPLY_GRACE
from dspex.client.lmhistory import add_usage, client_usage_tracker, record_history
from dspex.client.sendcache import Receipt, SendCache
from dspex.client.sendsettings import client_settings, settings_ext
from dspex.client.sessionpickle import Message, _transient_dumps
from dspex.client.standins import Rebind
from dspex.wire import codec, codestore
from dspex.wire.codec import Policy
from dspex.wire.errors import (
    Cancelled,
    CodeCacheMiss,
    ConnectionLost,
    DspexError,
    EncodeError,
    MessageTooLarge,
    MissingModule,
    ProtocolError,
    ResultNeedsModule,
    Timeout,
    UndecodableResult,
    UsageError,
)
from dspex.wire.headers import RequestHeader
from dspex.wire.ops import OPS, WORKER_OPS, Op, Side
from dspex.wire.protocol import FLAG_CONTEXT, FLAG_HELD, FLAG_ITEMS, FLAG_STREAM, STREAM_WINDOW, Status
from dspex.wire.remoteerror import error_from_wire
from dspex.wire.zmqfast import frame_buffer

log = logging.getLogger("dspex.client")

# What the top-level items of each worker op's body are called in an EncodeError's path.
BODY_NAMES: dict[str, tuple[str, ...]] = {op.value: tuple(a.name for a in op.args) for op in Op}

Callback = Callable[[Any], Any]  # a plain function; an asyncio client's may be async def
_SESSIONLESS = SendCache.transient()  # remembers nothing: one serves every request outside a session
OnReply = Callable[[str, str], None]
_EXTRAS = ("usage", "history", "history_codec", "history_left")  # what an error reply's details carry beside the error
EVENT_STATUSES = (Status.PARTIAL.value, Status.PROGRESS.value, Status.OUTPUT.value)  # replies before the final one
# seconds after a dropped connection during which a new socket is made without the ipc probe: a
# request made while the broker restarts waits for the new one (within its timeout) instead of
# failing at once on the dead broker's socket file
RIDE_THROUGH = 5.0


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


def encode_request(op: str, body: Any, max_message: int, sender: SendCache | None = None,
                   usage: bool = False, *, full: bool = False, lms: dict[str, Any] | None = None,
                   receipt: list[Receipt] | None = None, since: int | None = None) -> tuple[list[Any], int]:
    """(payload frames, header flags) of a request. A worker op of a session (``sender``) pickles
    its code with what the session's worker holds (dspex.client.sendcache), says whether it refers
    to that (``FLAG_HELD``) and adds the session context as the last frame (``FLAG_CONTEXT``): the
    client's DSPy settings and the keys the worker may forget; with ``lms`` (filled here: key ->
    LM) also the keys of this client's LMs the worker holds, whose history entries come back; with
    ``receipt`` (filled here) what the session holds only once the worker loads the request
    (``SendCache.confirm``); with the binding version the request relies on (``v``: a worker
    whose store has not loaded it refuses the request) and the one it brings the store to (``to``);
    one that carries bindings, the version they are stamped with (``at``: the worker never binds
    them over a binding of a later request of this client); with any of these, the client's key
    prefix (``c``: versions of two clients of one session count apart) and, from a forked child,
    its ancestors' prefixes and versions at the forks (``f``: where its count starts).
    ``since`` (with ``full``): the binding version the store that refused the request holds; the
    request carries every binding changed after it. A body that does not fit its op's definition (dspex.wire.ops.Op)
    is a BadArgument here, before anything is sent."""
    spec = OPS.get(op)  # (an op this client does not know is the broker's to refuse)
    if spec is not None and spec.side is not Side.CONTROL:
        body = checked_body(spec, body)
    if op not in WORKER_OPS:
        frames = codec.encode(body, policy=Policy.REFS, names=BODY_NAMES.get(op))
        flags = 0
    else:
        msg = Message(sender or _SESSIONLESS, full=full)
        client = client_settings(msg)
        if sender is not None and spec is not None:
            body = as_module_globals(msg.cache, BODY_NAMES[op], body, client[0])
        repeats = codec.Repeats()
        frames = codec.encode(body, policy=Policy.ALL, names=BODY_NAMES.get(op), sender=msg, repeats=repeats)
        if repeats.seen:
            # one object in two places of the arguments (or inside itself): the whole body as one
            # pickle, which keeps it one object there, as in-process (what the first encoding
            # defined is not sent)
            msg = Message(msg.cache, full=full)
            frames = [codec.packb(codec.session_ext(msg, body))]
        context: dict[str, Any] = {}
        if since is not None:
            changed = catch_up(msg, since)
            if changed is not None:
                context["bind"] = changed
        settings = settings_ext(msg, codec.session_ext, client)
        if settings is not None:
            context["dspy"] = settings
            if msg.pinned:
                context["pinned"] = msg.pinned
        variables = msg.cache.context_values(msg) if sender is not None else None
        if variables:  # the user's ContextVars as the calling task sees them
            try:
                context["vars"] = codec.session_ext(msg, {key: value for key, (_, value) in variables.items()})
            except EncodeError as err:
                raise senderrors.context_value_error(list(variables.values()), err, _transient_dumps) from None
        if usage:
            context["usage"] = True
        if lms is not None and sender is not None:
            lms.update(msg.cache.held_lms(msg))
            if lms:
                context["history"] = list(lms)
        drops = msg.cache.pending_drops()
        if drops:
            context["drop"] = drops
        flags = FLAG_HELD if sender is not None and msg.relies else 0
        sent = msg.cache.commit(msg, drops)
        if sent is not None:
            held, relies, reaches = sent
            if since is not None:  # it carries every binding after ``since``
                relies = since
            if receipt is not None:
                receipt.append(held)
            if held[0]:  # the order of its bindings among this client's (codestore.CodeStore.stamps)
                context["at"] = reaches
            if reaches > relies:
                context["to"] = reaches
            if relies and (msg.globals.relied or "to" in context):  # (a key the worker lacks is a miss anyway)
                context["v"] = relies
            if "at" in context or "to" in context or "v" in context:  # whose versions they are
                context["c"] = msg.cache.prefix
                if msg.cache.lineage:
                    context["f"] = msg.cache.lineage
        if context:
            frames.append(msgpack.packb(context))
            flags |= FLAG_CONTEXT
    size = sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames)
    if size > max_message:
        raise MessageTooLarge(f"request is {size} bytes, over the limit of {max_message} (DSPEX_MAX_MESSAGE): "
                              "nothing was sent; make or load large data on the worker (s.run) and pass its ref")
    return frames, flags


def catch_up(msg: Message, since: int) -> Any:
    """The session's bindings changed after binding version ``since`` that ``msg`` does not carry
    yet, as an ext 25 the worker binds when it loads it (None: none)."""
    extra: list[Any] = []
    for (nsid, name), obj in msg.cache.changed_since(since):
        if (nsid, name) not in msg.globals.bindings:
            msg.globals.bind(extra, [], nsid, name, _bound_now(nsid, name, obj))
    return codec.session_ext(msg, Rebind(extra)) if extra else None


def _bound_now(nsid: str, name: str, sent: Any) -> Any:
    """What the client binds at (``nsid``, ``name``) now (``sent``, the object sent last, when it
    cannot tell): the catch-up must not bind an older object than the request's own code reads."""
    if nsid == codestore.IMPORTED:
        return sys.modules.get(name, sent)
    module = sys.modules.get(nsid[2:]) if nsid.startswith("m:") else None
    return vars(module).get(name, sent) if module is not None else sent


def closed_error() -> UsageError:
    """What a closed client's requests and new sessions raise (either kind): a usage error, not
    ``BrokerUnreachable`` (a retry of a closed client's request never succeeds)."""
    return UsageError("this client is closed (client.close() was called): nothing was sent; dspex.connect() "
                      "(dspex.aio.connect()) makes a new client")


def close_monitored(sock: Any, monitor: Any) -> None:
    """Close a socket and the monitor socket watching it (sync or asyncio sockets alike)."""
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(0)
    sock.close(0)


def control_frames(op: Op, pool: str, session: str, req_id: int, n: int) -> list[bytes]:
    """A credit or cancel message for a streamed request (no reply)."""
    return [RequestHeader(op.value, req_id, pool, session).pack(), msgpack.packb(n)]


def decode_error(frames: list[Any], stream: bool = False) -> DspexError:
    """An error reply's typed error (``stream``: a stream's, :func:`error_from_wire`). One that
    cannot be read says the call failed, not how: it is an :class:`UndecodableResult`, as whether
    the call ran is unknown."""
    try:
        payload = msgpack.unpackb(frame_buffer(frames[0]), strict_map_key=False)
        if not isinstance(payload, dict):
            raise TypeError(f"{type(payload).__name__}, not a map")
    except Exception as exc:  # noqa: BLE001 - whatever an error reply's bytes make msgpack raise
        return UndecodableResult(f"an error reply cannot be read here ({type(exc).__name__}: {str(exc)[:200]}): the "
                                 "call failed, and may or may not have run", reply="error")
    err = error_from_wire(payload, stream)
    if isinstance(err, ModuleNotFoundError):
        _note_a_user_module(err)
    return err


def _note_a_user_module(err: ModuleNotFoundError) -> None:
    """A module the worker could not import that is the user's own code here is no package to
    install there (what the worker's message says): the session has it once a call imports it.
    Pickle is what names such a module out of sight of the code the client sends (``dspy.load``
    of a program saved whole, DSPy's disk cache)."""
    top = (err.name or "").partition(".")[0]
    module = sys.modules.get(top)
    if module is None or top == "__main__" or not codeindex.user_module(module):
        return
    err.add_note(f"{top!r} is a module of your own code here ({getattr(module, '__file__', None) or top}), which the "
                 f"workers cannot import: a session has its copy once the code of a call imports it (`import {top}` "
                 "in the function you run), as code you send reaches the session")


def decode_value(frames: list[Any], own_frames: bool = False, bind: Any = None) -> Any:
    """A reply's value; refs in it become handles of ``bind`` (a session) when given. One that does
    not decode here is an :class:`UndecodableResult`: the call ran (a module missing here is a
    :class:`ResultNeedsModule`, also a ``ModuleNotFoundError``, which says where to install it)."""
    resolve = None if bind is None else (lambda ref: ref.bind(bind))
    try:
        return codec.decode(frames, resolve, own_frames=own_frames)
    except MissingModule as err:
        raise ResultNeedsModule(f"the call ran, but its result cannot be decoded here: {err.message}",
                                **err.details) from None
    except ProtocolError as err:
        raise UndecodableResult(f"the call ran, but its result cannot be decoded here: {err.message}",
                                **err.details) from None
    except DspexError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a reply's bytes make the decoder raise
        raise UndecodableResult(f"the call ran, but its result cannot be decoded here: {type(exc).__name__}: "
                                f"{str(exc)[:300]}") from None



def _refuse(callback: Callback) -> NoReturn:
    raise TypeError(f"{callback!r} is async: a blocking client's callbacks are plain functions (an asyncio "
                    "client, dspex.aio, awaits async ones)")


class Exchange:
    """One request from the client's side: what to send, and what each reply means."""

    __slots__ = (
        "_max_message",
        "_raw",
        "at",
        "awaiting",
        "bind",
        "body",
        "endpoint",
        "flags",
        "forward",
        "grace",
        "items",
        "lms",
        "meter",
        "on_output",
        "on_progress",
        "on_reply",
        "op",
        "own_frames",
        "pool",
        "receipt",
        "sender",
        "session",
        "timeout",
        "usage",
        "wait",
    )

    def __init__(self, op: str, pool: str, session: str, body: Any, timeout: float, *, max_message: int,
                 endpoint: str = "", items: bool = False, on_reply: OnReply | None = None,
                 on_progress: Callback | None = None, on_output: Callback | None = None, bind: Any = None,
                 own_frames: bool = False, forward: bool = False, sender: SendCache | None = None,
                 flags: int = 0, reply_grace: float = DEFAULT_REPLY_GRACE, awaits: bool = False) -> None:
        self.op, self.pool, self.session, self.timeout = op, pool, session, timeout
        # what the callbacks returned to await (an asyncio client's async def callbacks) before
        # the next reply; None: the client kind cannot await them
        self.awaiting: list[Awaitable[Any]] | None = [] if awaits else None
        for callback in (on_progress, on_output) if not awaits else ():
            if callback is not None and inspect.iscoroutinefunction(callback):
                _refuse(callback)  # before anything is sent
        # The worker stops a call at its deadline and replies Timeout(stopped=True); one that
        # ignores the interruption for its grace costs its worker, which still replies (hard=True).
        # A client that hears nothing waits ``reply_grace`` past the deadline, so the worker's
        # typed reply normally wins. Broker ops have no worker to wait for.
        self.grace = reply_grace if op in WORKER_OPS else 0.0
        self.wait = timeout + self.grace
        self.items = items
        self.sender = sender
        self._raw = body if sender is not None else None  # kept to send again in full after a cache miss
        self._max_message = max_message
        # the caller's dspy.track_usage() block: the worker sends back what the call used
        self.usage = client_usage_tracker() if sender is not None and sender.client_settings and op in WORKER_OPS \
            else None
        # the client's LMs the worker holds (key -> LM): the call's entries in their history come back
        self.lms: dict[str, Any] = {}
        # what the session counts as held once the worker shows it loaded the request (_loaded)
        self.receipt: list[Receipt] = []
        # before anything is sent: EncodeError costs nothing
        self.body, context = encode_request(op, body, max_message, sender, self.usage is not None, lms=self.lms,
                                            receipt=self.receipt)
        self.flags = (FLAG_STREAM if items or on_progress is not None else 0) | (FLAG_ITEMS if items else 0) | context \
            | flags  # the caller's own (FLAG_DURABLE)
        # the call's output goes where it would in-process (``forward``) and/or to ``on_output``
        self.forward = forward and op in WORKER_OPS
        if self.forward or (on_output is not None and op in WORKER_OPS):
            self.flags |= output.request_flags()
        self.on_reply, self.on_progress, self.on_output = on_reply, on_progress, on_output
        self.bind, self.own_frames, self.endpoint = bind, own_frames, endpoint
        self.meter = CreditMeter()
        self.at: output.Place | None = None  # where the user's code made the call, if not where it reads it

    def frames(self, req_id: int, worker: str) -> list[Any]:
        header = RequestHeader(self.op, req_id, self.pool, self.session, worker, int(self.timeout * 1000),
                               self.flags).pack()
        return [header, *self.body]

    def _notify(self, callback: Callback, value: Any) -> None:
        result = callback(value)
        if inspect.isawaitable(result):
            if self.awaiting is None:
                if inspect.iscoroutine(result):
                    result.close()
                _refuse(callback)
            self.awaiting.append(result)

    def feed(self, status: str, worker: str, frames: list[Any]) -> tuple[str, Any, int]:
        """One reply of this request -> (kind, value, credit to grant now).

        kind: ``"item"`` (a streamed item, in item mode), ``"more"`` (an event was handled),
        ``"done"`` (the final value). An error reply raises its typed error.
        """
        if status in EVENT_STATUSES:
            self._loaded()
            credit = self.meter.consumed()
            value = decode_value(frames, bind=self.bind)
            if status == Status.OUTPUT.value:
                self._output(value, worker)
            elif status == Status.PARTIAL.value and self.items:
                return "item", value, credit
            elif self.on_progress is not None:
                self._notify(self.on_progress, value)
            return "more", None, credit
        if status == Status.ERROR.value:
            err = decode_error(frames, self.items)
            if self.usage is not None or self.lms:
                details = err.wire_details
                self._extras({k: details.pop(k) for k in _EXTRAS if k in details})
            if self.sender is not None and isinstance(err, (ProtocolError, MissingModule)):
                # the request did not load on the worker: what it sent is not held there
                self.sender.missed(False, self.receipt[-1] if self.receipt else None)
            raise err
        self._loaded()
        if self.on_reply is not None:
            self.on_reply(status, worker)
        value = decode_value(frames, self.own_frames, self.bind)
        if self.usage is not None or self.lms:  # [value, extras]: the worker answers so when the request asked
            value, extras = value
            self._extras(extras)
        return "done", value, 0

    def late(self, status: str, worker: str, frames: list[Any]) -> bool:
        """A reply of this request after its caller cancelled it: what the producer prints, warns
        or logs while it stops goes where the call's output went. True at the final reply."""
        if status != Status.OUTPUT.value:
            return status not in EVENT_STATUSES
        self._output(decode_value(frames, bind=self.bind), worker)
        return False

    def _output(self, value: Any, worker: str) -> None:
        if self.forward:
            output.forward(value, self.session, worker, self.at)
        if self.on_output is not None:
            self._notify(self.on_output, value)

    def _loaded(self) -> None:
        """A reply that shows the worker loaded the request (an event, the result): what it sent is
        the session's there. Not an error: one raised while the request was loaded (a by-value
        object's ``__setstate__``) may have left the rest of it unloaded."""
        if self.receipt and self.sender is not None:
            self.sender.confirm(self.receipt.pop())

    def _extras(self, extras: Any) -> None:
        """What came back beside the result: usage for the caller's ``dspy.track_usage()``, the
        history entries of its LMs (recorded as in-process, in call order)."""
        if not isinstance(extras, dict):
            return
        if self.usage is not None:
            add_usage(self.usage, extras.get("usage"))
        if self.lms and ("history" in extras or "history_codec" in extras):
            record_history(self.lms, extras)

    def collect_progress(self, progress: list[Any]) -> None:
        """Collect the progress events a stream receives in its list ``progress`` (and pass them to
        ``on_progress``). The list, not the stream, is held here: no cycle delays the stream's ``__del__``."""
        user_progress = self.on_progress

        def on_progress(event: Any) -> None:
            progress.append(event)
            if user_progress is not None:
                user_progress(event)

        self.on_progress = on_progress

    def resend_in_full(self, err: DspexError) -> bool:
        """After ``err``: whether to send this request again, now encoded in full. True once, for
        a :class:`CodeCacheMiss` of a session's request (nothing ran; the worker lacked code the
        request referred to)."""
        if self.sender is None or self._raw is None or not isinstance(err, CodeCacheMiss):
            return False
        raw, self._raw = self._raw, None
        self.sender.missed(bool(err.details.get("ephemeral")))
        self.lms.clear()
        self.receipt.clear()
        since = err.details.get("version")
        self.body, context = encode_request(self.op, raw, self._max_message, self.sender, self.usage is not None,
                                            full=True, lms=self.lms, receipt=self.receipt,
                                            since=since if isinstance(since, int) and self.sender.keep else None)
        self.flags = (self.flags & ~(FLAG_CONTEXT | FLAG_HELD)) | context
        return True

    def timed_out(self) -> Timeout:
        return Timeout(f"no reply to {self.op} within {self.timeout:g}s (+{self.grace:g}s grace) from "
                       f"{self.endpoint}: the call may still be running", op=self.op, stopped=False)

    def cancelled(self, client_kind: str) -> Cancelled:
        return Cancelled(f"{self.op} was cancelled by {client_kind}.cancel_all() and stopped", op=self.op)

    def lost(self, why: str) -> ConnectionLost:
        return ConnectionLost(f"{why} ({self.endpoint}) while waiting for {self.op}; the call may or may not have "
                              "run", op=self.op)


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the asyncio client's reader tasks and wait for their end (whatever they raise)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - only their end is awaited
            pass
