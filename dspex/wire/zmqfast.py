"""send/recv of multipart messages without pyzmq's Python sugar, for the per-message hot paths.

``Socket.send_multipart``/``recv_multipart`` spend most of their time in Python: per frame an
isinstance check, ``zmq.SNDMORE | flags`` (IntFlag arithmetic), the sugar ``send`` checking
routing_id/group, and a ``getsockopt(RCVMORE)`` per received frame. These call the Cython methods
of ``zmq.backend.Socket`` with int flags: same semantics (``zmq.Again``/``ZMQError`` raised the
same way, ``copy=False`` frames), about half the CPU (bench: docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq
from zmq.backend import Socket as _Base

_send = _Base.send
_recv = _Base.recv
SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)


def send_frames(sock: Any, parts: Sequence[Any], flags: int = 0, copy: bool = False) -> None:
    """``sock.send_multipart(parts, flags, copy=copy)``."""
    last = len(parts) - 1
    for i in range(last):
        _send(sock, parts[i], SNDMORE | flags, copy)
    _send(sock, parts[last], flags, copy)


def recv_frames(sock: Any, flags: int = 0) -> list[zmq.Frame]:
    """``sock.recv_multipart(flags, copy=False)``."""
    f = _recv(sock, flags, False)
    frames = [f]
    while f.more:
        f = _recv(sock, 0, False)
        frames.append(f)
    return frames
