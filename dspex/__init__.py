"""dspex: DSPy programs in pools of worker processes behind a ZeroMQ broker.

>>> import dspex
>>> with dspex.connect() as dx:
...     s = dx.session("triage_pool")
...     prog = s.put(dspy.ChainOfThought("question -> answer"))
...     prog(question="...").answer
"""

from dspex import aio
from dspex.client.sync import Client, Rehydrator, Session, Stream, connect
from dspex.wire.errors import (
    BrokerUnreachable,
    Cancelled,
    CheckpointRefused,
    CodeCacheMiss,
    ConfigError,
    ConnectionError,
    ConnectionLost,
    DidNotRun,
    DspexError,
    EncodeError,
    InternalError,
    MayHaveRun,
    MessageTooLarge,
    MissingModule,
    NotDurableWarning,
    PoolNotFound,
    PoolSaturated,
    ProtocolError,
    QueueTimeout,
    RefNotFound,
    RefQuotaExceeded,
    Refused,
    RemoteError,
    SessionClosed,
    SessionNotDurable,
    SessionNotYours,
    SessionPoolMismatch,
    SessionQuotaExceeded,
    SessionWorkerUnavailable,
    Timeout,
    UnknownOp,
    UsageError,
    WorkerBusy,
    WorkerCrashed,
)
from dspex.wire.record import Record
from dspex.wire.ref import Ref, RemoteMethod
from dspex.wire.sessiondir import SessionDir

__version__ = "0.1.0"

__all__ = [
    "BrokerUnreachable",
    "Cancelled",
    "CheckpointRefused",
    "Client",
    "CodeCacheMiss",
    "ConfigError",
    "ConnectionError",
    "ConnectionLost",
    "DidNotRun",
    "DspexError",
    "EncodeError",
    "InternalError",
    "MayHaveRun",
    "MessageTooLarge",
    "MissingModule",
    "NotDurableWarning",
    "PoolNotFound",
    "PoolSaturated",
    "ProtocolError",
    "QueueTimeout",
    "Record",
    "Ref",
    "RefNotFound",
    "RefQuotaExceeded",
    "Refused",
    "Rehydrator",
    "RemoteError",
    "RemoteMethod",
    "Session",
    "SessionClosed",
    "SessionDir",
    "SessionNotDurable",
    "SessionNotYours",
    "SessionPoolMismatch",
    "SessionQuotaExceeded",
    "SessionWorkerUnavailable",
    "Stream",
    "Timeout",
    "UnknownOp",
    "UsageError",
    "WorkerBusy",
    "WorkerCrashed",
    "aio",
    "connect",
]
