"""dspex: DSPy programs in pools of worker processes behind a ZeroMQ broker.

>>> import dspex
>>> with dspex.connect() as dx:
...     s = dx.session("triage_pool")
...     prog = s.put(dspy.ChainOfThought("question -> answer"))
...     prog(question="...").answer
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dspex import errors
from dspex.errors import *  # the error tree is in the top-level API too

if TYPE_CHECKING:
    from dspex import aio
    from dspex.client.rehydrator import Rehydrator
    from dspex.client.sync import Client, Session, Stream, connect
    from dspex.wire.record import Record
    from dspex.wire.ref import Ref, RemoteMethod
    from dspex.wire.sessiondir import SessionDir

__version__ = "0.1.0"

# The client's names load on first use: the broker, the workers and dspexctl import
# dspex.wire and dspex.stack (which runs this file) and would otherwise pay for the client stack
# (the codec, numpy) before they parse their options, so a bad config exits within supervisord's
# startsecs and ends FATAL instead of in a restart loop.
_LAZY = {
    "Client": "dspex.client.sync",
    "Session": "dspex.client.sync",
    "Stream": "dspex.client.sync",
    "connect": "dspex.client.sync",
    "Rehydrator": "dspex.client.rehydrator",
    "Record": "dspex.wire.record",
    "Ref": "dspex.wire.ref",
    "RemoteMethod": "dspex.wire.ref",
    "SessionDir": "dspex.wire.sessiondir",
}

if not TYPE_CHECKING:  # mypy sees the imports above, so a misspelt name stays an error there

    def __getattr__(name: str) -> object:
        if name == "aio":
            return importlib.import_module("dspex.aio")  # the import binds it here for the next lookup
        if name not in _LAZY:
            raise AttributeError(f"module 'dspex' has no attribute {name!r}")
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "Client",
    "Record",
    "Ref",
    "Rehydrator",
    "RemoteMethod",
    "Session",
    "SessionDir",
    "Stream",
    "aio",
    "connect",
]
__all__ += errors.__all__
