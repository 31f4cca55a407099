"""send/recv of multipart messages without pyzmq's Python sugar, for the per-message hot paths.

``Socket.send_multipart``/``recv_multipart`` spend most of their time in Python: per frame an
isinstance check, ``zmq.SNDMORE | flags`` (IntFlag arithmetic), the sugar ``send`` checking
routing_id/group, and a ``getsockopt(RCVMORE)`` per received frame. These call the Cython methods
of ``zmq.backend.Socket`` with int flags: same semantics (``zmq.Again``/``ZMQError`` raised the
same way, ``copy=False`` frames).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import zmq
from zmq.backend import Socket as _Base
from zmq.backend import zmq_poll as _zmq_poll

_send = _Base.send
_recv = _Base.recv
# one frame: send_frame(sock, data, flags, copy) / recv_frame(sock, flags, copy) -> Frame (copy False)
send_frame = cast("Callable[[Any, Any, int, bool], None]", _send)
recv_frame = cast("Callable[[Any, int, bool], Any]", _recv)
SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
get_opt = cast("Callable[[Any, int], int]", _Base.get)  # the Cython getsockopt (int option, no sugar)
# zmq_poll([(socket or fd, events), ...], timeout_ms) -> [(socket or fd, revents), ...] in the
# order given, only those with events (zmq.Poller.poll without its sugar)
zmq_poll = cast("Callable[[Sequence[tuple[Any, int]], int], list[tuple[Any, int]]]", _zmq_poll)


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


def frame_buffer(frame: Any) -> Any:
    """The bytes of a received frame without a copy: a ``zmq.Frame``'s buffer, else the value."""
    return frame.buffer if hasattr(frame, "buffer") else frame
