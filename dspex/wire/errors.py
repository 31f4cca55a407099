"""The dspex error tree: its classes and their codes.

Every error has a stable string ``code`` used on the wire, in ``--json`` output and in logs.
Errors cross process boundaries as ``{"code", "message", **details}`` and are rebuilt on the
client with :func:`dspex.wire.remoteerror.error_from_wire`.

The tree is grouped by what the caller may do (dramatiq-style)::

    DspexError
    ├── DidNotRun      refused before any worker ran it: safe to retry (after a pause)
    ├── MayHaveRun     the outcome is unknown: retry only what is idempotent
    ├── UsageError     the request itself is wrong: the same request fails the same way
    └── RemoteError    user code raised on the worker (dspex.wire.remoteerror: also an instance
                       of the original type)

``Timeout`` and ``QueueTimeout`` are also builtin ``TimeoutError`` (``except TimeoutError`` catches them).
"""

from __future__ import annotations

from typing import Any


class DspexError(Exception):
    """Root of every error dspex raises."""

    code = "dspex_error"

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    @property
    def wire_details(self) -> dict[str, Any]:
        """The details that came with the error (a remote error's ``details`` may be its user
        class's own)."""
        return self.details

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}

    def __reduce__(self) -> tuple[Any, ...]:
        return (typed_error, (self.code, self.message, self.details))


class DidNotRun(DspexError):
    """Refused before any worker ran it (saturated, queue timeout, busy, worker unavailable,
    refused, broker unreachable): nothing happened, so a retry is safe."""

    code = "did_not_run"


class MayHaveRun(DspexError):
    """The outcome is unknown (worker crashed, connection lost, timeout): the call may have run,
    wholly or in part. Retry only idempotent work."""

    code = "may_have_run"


class UsageError(DspexError):
    """The request is wrong (unknown pool, closed session, released ref, bad frame or setting):
    fix the call; sending it again fails the same way."""

    code = "usage_error"


class PoolNotFound(UsageError):
    """The named pool is not declared in the broker."""

    code = "pool_not_found"


class PoolSaturated(DidNotRun):
    """The pool's bounded queue is full."""

    code = "pool_saturated"


class QueueTimeout(DidNotRun, TimeoutError):
    """A request waited in a queue longer than the pool's queue timeout. Also a builtin
    ``TimeoutError``, as :class:`Timeout` is."""

    code = "queue_timeout"


class WorkerBusy(DidNotRun):
    """The session's pinned worker is busy and the pool is strict_fail_fast."""

    code = "worker_busy"


class WorkerCrashed(MayHaveRun):
    """The worker running this request died before answering."""

    code = "worker_crashed"


class SessionWorkerUnavailable(DidNotRun):
    """The session's pinned worker (incarnation) is gone: crashed, recycled or expired."""

    code = "session_worker_unavailable"


class CheckpointRefused(SessionWorkerUnavailable):
    """A durable session moved to a new worker, and its checkpoint could not be restored there
    (corrupt, written by other Python / cloudpickle / DSPy versions, or an object that fails to
    load). The call did not run; the session is lost, as a session whose worker is gone:
    ``details["reason"]`` says why. ``dspex.Rehydrator`` rebuilds it like any lost session."""

    code = "checkpoint_refused"


class CodeCacheMiss(DidNotRun):
    """The request referred to code or values its session's worker does not hold (evicted, a
    re-pinned ``hint`` session, a restarted worker, a ``none`` pool that keeps nothing). Nothing
    ran; the client resends the request in full, once, without the caller seeing it.
    ``details["ephemeral"]``: the worker keeps no session state between calls."""

    code = "code_cache_miss"


class SessionNotHeld(DidNotRun):
    """Between a worker and the broker: a durable session's call reached a worker that does not
    hold the session (the broker stored its pin there before the worker got its checkpoint, and
    restarted). Nothing ran; the broker restores the session from its checkpoint and runs the call
    there, without its caller seeing this."""

    code = "session_not_held"


class SessionQuotaExceeded(DidNotRun):
    """The broker holds as many sessions as it allows."""

    code = "session_quota"


class SessionClosed(UsageError):
    """The session was closed (by the client, the broker's idle TTL, or an operator)."""

    code = "session_closed"


class Timeout(MayHaveRun, TimeoutError):
    """No answer arrived within the call's timeout. Also a builtin ``TimeoutError`` (as Ray's
    ``GetTimeoutError`` is): ``except TimeoutError`` catches it as it catches asyncio's and
    concurrent.futures' timeouts."""

    code = "timeout"


class SessionPoolMismatch(UsageError):
    """The session was opened in another pool: its calls go to that pool."""

    code = "session_pool_mismatch"


class SessionNotYours(UsageError):
    """The session belongs to another client identity (or the op needs an admin key)."""

    code = "session_not_yours"


class SessionNotDurable(UsageError):
    """The call ran and its effects stay in the session, but its checkpoint could not be kept
    (over the per-session or total checkpoint cap, too big for one message, or the session as a
    whole cannot be pickled):
    its result is not returned, and the session goes on as a plain, non-durable one.
    ``details["reason"]`` says why; ``details["ran"]`` is true."""

    code = "session_not_durable"


class NotDurableWarning(UserWarning):
    """An object entered a durable session that its checkpoints cannot hold (an open file, a
    socket, a lock, a generator): it stays usable on its worker, and is gone after a move."""


class RefNotFound(UsageError):
    """A ref is unknown to its worker: released, evicted, from another session, or never existed."""

    code = "ref_not_found"


class RefQuotaExceeded(UsageError):
    """The session holds as many refs as its per-session quota allows: release some (or close the
    session). One session's refs never evict another session's objects."""

    code = "ref_quota"


class BadArgument(UsageError, TypeError, ValueError):
    """An argument of a client method is wrong (a pool that is not a str, a timeout that is no
    deadline, ``args`` that is not a list...): refused before anything is sent. Also a
    ``TypeError`` and a ``ValueError``, as Python's own argument errors are."""

    code = "bad_argument"


class ProtocolError(UsageError):
    """A frame could not be understood."""

    code = "protocol_error"


class UnknownOp(ProtocolError):
    """The op code is not one this peer serves."""

    code = "unknown_op"


class EncodeError(ProtocolError):
    """A value cannot be encoded (and no ref could stand in for it)."""

    code = "encode_error"


class MissingModule(UsageError, ModuleNotFoundError):
    """A value arrived that needs a module not installed where it arrived (by-value code whose module imports a
    package the worker lacks: the request did not run). Also a ``ModuleNotFoundError``: ``.name`` is the module;
    ``details["side"]`` (``"worker"``, ``"client"``) is where, and the message says where to install it. A call's
    result that needs a module the client lacks is a :class:`ResultNeedsModule` instead (the call ran)."""

    code = "missing_module"

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message, **details)
        self.name = details.get("module")


class MessageTooLarge(ProtocolError):
    """A request over the size limit (DSPEX_MAX_MESSAGE): nothing was sent (a result: :class:`ResultTooLarge`)."""

    code = "message_too_large"


class ConnectionError(DspexError):
    """The broker cannot be reached, or the connection to it dropped (see the two subclasses)."""

    code = "connection_error"


class BrokerUnreachable(ConnectionError, DidNotRun):
    """Nothing answers at the endpoint (no broker, a stale socket file): the request was never
    sent. (A closed client's requests are a ``UsageError``: connect again, do not retry.)"""

    code = "broker_unreachable"


class ConnectionLost(ConnectionError, MayHaveRun):
    """The connection dropped while a request was out: it may or may not have run."""

    code = "connection_lost"


class Refused(DidNotRun):
    """The broker refused this peer (its CURVE key is not allowed, or the operation needs an admin
    key): nothing ran."""

    code = "refused"


class UndecodableResult(MayHaveRun):
    """A reply the client cannot decode. A result (an item, an event): the call ran; ``details["type"]`` is the class
    that failed to load here. An error reply (``details["reply"] == "error"``): whether the call ran is unknown."""

    code = "undecodable_result"


class ResultNeedsModule(UndecodableResult, ModuleNotFoundError):
    """A result (an item, an event) needs a module the client lacks: the call ran, its value is lost. Also a
    ``ModuleNotFoundError``, as in-process: ``.name`` is the module, and the message says to install it."""

    code = "result_needs_module"

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message, **details)
        self.name = details.get("module")


class ResultTooLarge(MayHaveRun):
    """The call ran; its result (or an item) over DSPEX_MAX_MESSAGE was not sent, the refs made for it dropped."""

    code = "result_too_large"


class InternalError(MayHaveRun):
    """A bug in dspex itself (not in user code) while handling the request."""

    code = "internal_error"


class ConfigError(UsageError):
    """A setting is missing or invalid (a missing API key, a bad pool spec, an unsafe endpoint)."""

    code = "config_error"


class Cancelled(MayHaveRun):
    """The call was cancelled by the caller."""

    code = "cancelled"


def _by_code(cls: type[DspexError]) -> dict[str, type[DspexError]]:
    """``cls`` and its subclasses by code."""
    return {cls.code: cls, **{code: sub for direct in cls.__subclasses__() for code, sub in _by_code(direct).items()}}


ERRORS_BY_CODE = _by_code(DspexError)


def typed_error(code: str, message: str, details: dict[str, Any]) -> DspexError:
    """The error of the tree that ``code`` names; a code unknown here is a MayHaveRun that keeps
    it. (``remote_error`` is not of this module: see :mod:`dspex.wire.remoteerror`.)"""
    cls = ERRORS_BY_CODE.get(code, MayHaveRun)  # a peer's code unknown here (a newer version): it ran or not
    err = cls(message, **details)
    if cls is MayHaveRun and code != MayHaveRun.code:
        err.code = code  # keep an unknown code visible rather than collapsing it
    return err
