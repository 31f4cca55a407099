"""The error tree's public module: ``from dspex.errors import Timeout``. Both ends of the wire
define it in :mod:`dspex.wire.errors` (RemoteError, with how errors are rebuilt from the wire, in
:mod:`dspex.wire.remoteerror`); this is the path users import it by."""

from dspex.wire.errors import *
from dspex.wire.remoteerror import RemoteError

# the error classes, the public part of what the star import brings
__all__ = [
    "BadArgument",
    "BrokerUnreachable",
    "Cancelled",
    "CheckpointRefused",
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
    "RefNotFound",
    "RefQuotaExceeded",
    "Refused",
    "RemoteError",
    "ResultNeedsModule",
    "ResultTooLarge",
    "SessionClosed",
    "SessionNotDurable",
    "SessionNotHeld",
    "SessionNotYours",
    "SessionPoolMismatch",
    "SessionQuotaExceeded",
    "SessionWorkerUnavailable",
    "Timeout",
    "UndecodableResult",
    "UnknownOp",
    "UsageError",
    "WorkerBusy",
    "WorkerCrashed",
]
