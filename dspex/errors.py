"""The error tree's public module: ``from dspex.errors import Timeout``. Both ends of the wire
define it in :mod:`dspex.wire.errors`; this is the path users import it by."""

from dspex.wire.errors import (
    BrokerUnreachable as BrokerUnreachable,
)
from dspex.wire.errors import (
    Cancelled as Cancelled,
)
from dspex.wire.errors import (
    CheckpointRefused as CheckpointRefused,
)
from dspex.wire.errors import (
    CodeCacheMiss as CodeCacheMiss,
)
from dspex.wire.errors import (
    ConfigError as ConfigError,
)
from dspex.wire.errors import (
    ConnectionError as ConnectionError,
)
from dspex.wire.errors import (
    ConnectionLost as ConnectionLost,
)
from dspex.wire.errors import (
    DidNotRun as DidNotRun,
)
from dspex.wire.errors import (
    DspexError as DspexError,
)
from dspex.wire.errors import (
    EncodeError as EncodeError,
)
from dspex.wire.errors import (
    InternalError as InternalError,
)
from dspex.wire.errors import (
    MayHaveRun as MayHaveRun,
)
from dspex.wire.errors import (
    MessageTooLarge as MessageTooLarge,
)
from dspex.wire.errors import (
    MissingModule as MissingModule,
)
from dspex.wire.errors import (
    NotDurableWarning as NotDurableWarning,
)
from dspex.wire.errors import (
    PoolNotFound as PoolNotFound,
)
from dspex.wire.errors import (
    PoolSaturated as PoolSaturated,
)
from dspex.wire.errors import (
    ProtocolError as ProtocolError,
)
from dspex.wire.errors import (
    QueueTimeout as QueueTimeout,
)
from dspex.wire.errors import (
    RefNotFound as RefNotFound,
)
from dspex.wire.errors import (
    RefQuotaExceeded as RefQuotaExceeded,
)
from dspex.wire.errors import (
    Refused as Refused,
)
from dspex.wire.errors import (
    RemoteError as RemoteError,
)
from dspex.wire.errors import (
    SessionClosed as SessionClosed,
)
from dspex.wire.errors import (
    SessionNotDurable as SessionNotDurable,
)
from dspex.wire.errors import (
    SessionNotYours as SessionNotYours,
)
from dspex.wire.errors import (
    SessionPoolMismatch as SessionPoolMismatch,
)
from dspex.wire.errors import (
    SessionQuotaExceeded as SessionQuotaExceeded,
)
from dspex.wire.errors import (
    SessionWorkerUnavailable as SessionWorkerUnavailable,
)
from dspex.wire.errors import (
    Timeout as Timeout,
)
from dspex.wire.errors import (
    UnknownOp as UnknownOp,
)
from dspex.wire.errors import (
    UsageError as UsageError,
)
from dspex.wire.errors import (
    WorkerBusy as WorkerBusy,
)
from dspex.wire.errors import (
    WorkerCrashed as WorkerCrashed,
)
