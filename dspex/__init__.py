"""dspex: DSPy programs in pools of worker processes behind a ZeroMQ broker.

>>> import dspex
>>> with dspex.connect() as dx:
...     s = dx.session("triage_pool")
...     prog = s.put(dspy.ChainOfThought("question -> answer"))
...     prog(question="...").answer
"""

from dspex import aio, errors
from dspex.client.rehydrator import Rehydrator
from dspex.client.sync import Client, Session, Stream, connect
from dspex.errors import *  # the error tree is in the top-level API too
from dspex.wire.record import Record
from dspex.wire.ref import Ref, RemoteMethod
from dspex.wire.sessiondir import SessionDir

__version__ = "0.1.0"

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
