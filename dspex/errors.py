"""The dspex error tree.

Every error has a stable string ``code`` used on the wire, in ``--json`` output and in logs.
Errors cross process boundaries as ``{"code", "message", **details}`` and are rebuilt on the
client with :func:`error_from_wire`.

The tree is grouped by what the caller may do (dramatiq-style)::

    DspexError
    ├── DidNotRun      refused before any worker ran it: safe to retry (after a pause)
    ├── MayHaveRun     the outcome is unknown: retry only what is idempotent
    ├── UsageError     the request itself is wrong: the same request fails the same way
    └── RemoteError    user code raised on the worker (also an instance of the original type)
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

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.code, self.message, self.details))


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


class QueueTimeout(DidNotRun):
    """A request waited in a queue longer than the pool's queue timeout."""

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


class SessionQuotaExceeded(DidNotRun):
    """The broker holds as many sessions as it allows."""

    code = "session_quota"


class SessionClosed(UsageError):
    """The session was closed (by the client, the broker's idle TTL, or an operator)."""

    code = "session_closed"


class Timeout(MayHaveRun):
    """No answer arrived within the call's timeout (raised on the client)."""

    code = "timeout"


class SessionPoolMismatch(UsageError):
    """The session was opened in another pool: its calls go to that pool."""

    code = "session_pool_mismatch"


class SessionNotYours(UsageError):
    """The session belongs to another client identity (or the op needs an admin key)."""

    code = "session_not_yours"


class RefNotFound(UsageError):
    """A ref is unknown to its worker: released, evicted, from another session, or never existed."""

    code = "ref_not_found"


class RefQuotaExceeded(UsageError):
    """The session holds as many refs as its per-session quota allows: release some (or close the
    session). One session's refs never evict another session's objects."""

    code = "ref_quota"


class RemoteError(DspexError):
    """A Python exception raised inside the worker; the worker keeps running."""

    code = "remote_error"

    @property
    def type_name(self) -> str:
        return str(self.details.get("type", "Exception"))

    @property
    def remote_traceback(self) -> str:
        return str(self.details.get("traceback", ""))

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


class ProtocolError(UsageError):
    """A frame could not be understood."""

    code = "protocol_error"


class UnknownOp(ProtocolError):
    """The op code is not one this peer serves."""

    code = "unknown_op"


class EncodeError(ProtocolError):
    """A value cannot be encoded (and no ref could stand in for it)."""

    code = "encode_error"


class MessageTooLarge(ProtocolError):
    """A message exceeds the configured size limit."""

    code = "message_too_large"


class ConnectionError(DspexError):  # noqa: A001 - the brief names it so; dspex.ConnectionError
    """The broker cannot be reached, or the connection to it dropped (see the two subclasses)."""

    code = "connection_error"


class BrokerUnreachable(ConnectionError, DidNotRun):
    """Nothing answers at the endpoint (no broker, a stale socket file, a closed client): the
    request was never sent."""

    code = "broker_unreachable"


class ConnectionLost(ConnectionError, MayHaveRun):
    """The connection dropped while a request was out: it may or may not have run."""

    code = "connection_lost"


class Refused(DidNotRun):
    """The broker refused this peer (its CURVE key is not allowed, or the operation needs an admin
    key): nothing ran."""

    code = "refused"


class InternalError(MayHaveRun):
    """A bug in dspex itself (not in user code) while handling the request."""

    code = "internal_error"


class ConfigError(UsageError):
    """A setting is missing or invalid (a missing API key, a bad pool spec, an unsafe endpoint)."""

    code = "config_error"


class Cancelled(MayHaveRun):
    """The call was cancelled by the caller."""

    code = "cancelled"


def _all_subclasses(cls: type[DspexError]) -> list[type[DspexError]]:
    out: list[type[DspexError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


ERRORS_BY_CODE: dict[str, type[DspexError]] = {DspexError.code: DspexError}
ERRORS_BY_CODE.update((cls.code, cls) for cls in _all_subclasses(DspexError))


def error_from_wire(payload: Any) -> DspexError:
    """Rebuild a typed error from its wire form; unknown codes become a plain DspexError."""
    if not isinstance(payload, dict):
        return ProtocolError(f"malformed error payload: {payload!r:.200}")
    details = dict(payload)
    code = str(details.pop("code", "dspex_error"))
    message = str(details.pop("message", ""))
    return _rebuild(code, message, details)


def _rebuild(code: str, message: str, details: dict[str, Any]) -> DspexError:
    cls = ERRORS_BY_CODE.get(code, DspexError)
    err = cls(message, **details)
    if cls is DspexError and code != DspexError.code:
        err.code = code  # keep an unknown code visible rather than collapsing it
    return err
