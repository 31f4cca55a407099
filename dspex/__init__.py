"""dspex: DSPy programs in pools of worker processes behind a ZeroMQ broker.

>>> import dspex
>>> with dspex.connect() as dx:
...     s = dx.session("triage_pool")
...     prog = s.put(dspy.ChainOfThought("question -> answer"))
...     prog(question="...").answer
"""

from dspex.client import Client, Rehydrator, Session, Stream, connect
from dspex.errors import (
    BrokerUnreachable,
    EncodeError,
    ConnectionLost,
    DidNotRun,
    InternalError,
    MayHaveRun,
    Refused,
    UsageError,
    Cancelled,
    CheckpointRefused,
    CodeCacheMiss,
    ConfigError,
    ConnectionError,
    DspexError,
    MessageTooLarge,
    MissingModule,
    NotDurableWarning,
    PoolNotFound,
    PoolSaturated,
    ProtocolError,
    QueueTimeout,
    RefNotFound,
    RefQuotaExceeded,
    RemoteError,
    SessionClosed,
    SessionNotDurable,
    SessionNotYours,
    SessionPoolMismatch,
    SessionQuotaExceeded,
    SessionWorkerUnavailable,
    Timeout,
    UnknownOp,
    WorkerBusy,
    WorkerCrashed,
)
from dspex.record import Record
from dspex.ref import Ref, RemoteMethod
from dspex.sessiondir import SessionDir

from dspex import aio  # noqa: E402 - after the client: `import dspex` then `dspex.aio.connect()` works

__version__ = "0.1.0"

__all__ = [
    "BrokerUnreachable", "ConnectionLost", "DidNotRun", "InternalError", "MayHaveRun", "Refused", "UsageError",
    "Cancelled", "CheckpointRefused", "Client", "CodeCacheMiss", "ConfigError", "ConnectionError", "DspexError", "EncodeError", "MessageTooLarge", "MissingModule", "NotDurableWarning", "PoolNotFound",
    "PoolSaturated", "ProtocolError", "QueueTimeout", "Record", "Ref", "RemoteMethod", "Stream", "aio", "RefNotFound", "RefQuotaExceeded", "Rehydrator", "RemoteError",
    "Session", "SessionClosed", "SessionDir", "SessionNotDurable", "SessionNotYours", "SessionPoolMismatch", "SessionQuotaExceeded", "SessionWorkerUnavailable", "Timeout", "UnknownOp",
    "WorkerBusy", "WorkerCrashed", "connect",
]
