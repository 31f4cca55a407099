"""dspex: DSPy programs in pools of worker processes behind a ZeroMQ broker.

>>> import dspex
>>> with dspex.connect() as dx:
...     s = dx.session("triage_pool")
...     lm = s.call("dspy", "LM", ["offline/triage"])
"""

from dspex.client import Client, Rehydrator, Session, connect
from dspex.errors import (
    BrokerUnreachable,
    ConnectionLost,
    DidNotRun,
    InternalError,
    MayHaveRun,
    Refused,
    UsageError,
    Cancelled,
    ConfigError,
    ConnectionError,
    DspexError,
    MessageTooLarge,
    PoolNotFound,
    PoolSaturated,
    ProtocolError,
    QueueTimeout,
    RefNotFound,
    RefQuotaExceeded,
    RemoteError,
    SessionClosed,
    SessionNotYours,
    SessionPoolMismatch,
    SessionQuotaExceeded,
    SessionWorkerUnavailable,
    Timeout,
    UnknownOp,
    WorkerBusy,
    WorkerCrashed,
)
from dspex.ref import Ref

__version__ = "0.1.0"

__all__ = [
    "BrokerUnreachable", "ConnectionLost", "DidNotRun", "InternalError", "MayHaveRun", "Refused", "UsageError",
    "Cancelled", "Client", "ConfigError", "ConnectionError", "DspexError", "MessageTooLarge", "PoolNotFound",
    "PoolSaturated", "ProtocolError", "QueueTimeout", "Ref", "RefNotFound", "RefQuotaExceeded", "Rehydrator", "RemoteError",
    "Session", "SessionClosed", "SessionNotYours", "SessionPoolMismatch", "SessionQuotaExceeded", "SessionWorkerUnavailable", "Timeout", "UnknownOp",
    "WorkerBusy", "WorkerCrashed", "connect",
]
