"""The asyncio client's socket: one DEALER to the broker per client, its reader and its watcher.

A reader task routes each reply to the queue of its request id, so any number of calls can be in
flight from one event loop. A socket whose connection broke (the broker went away, or a reply
over the size limit, after which zmq never reconnects) fails the calls waiting on it at once and
is replaced before the next request.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable
from typing import Any, cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from dspex.client.channels import LOST as CONNECTION_LOST
from dspex.client.channels import Abandoned, connection_event
from dspex.client.endpoints import probe_endpoint
from dspex.client.exchange import RIDE_THROUGH, cancel_all, close_monitored, closed_error
from dspex.wire.errors import BrokerUnreachable, ProtocolError, UsageError
from dspex.wire.headers import unpack_reply_header

Reply = tuple[str, str, list[Any]]
Connect = Callable[[], tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]]
LOST = "__lost__"  # queued to waiting calls when the broker connection drops or the client closes
REFUSED = "__refused__"  # ... or when the broker refused our CURVE key (nothing we sent ran)
CANCELLED = "__cancelled__"  # ... or when cancel_all() was called


class AsyncChannel:
    """The current socket of an asyncio client, and the reply queues of its requests in flight."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Queue[Reply]] = {}
        self.abandoned = Abandoned()  # read by the reader as they come
        self.on_loop_end: Callable[[], None] = lambda: None  # the client's: stop its open streams
        self._tasks: list[asyncio.Task[None]] = []
        self.broken = False
        self._up = False  # the socket's handshake with the broker completed and its connection did not drop since
        self._drop_seen = -math.inf  # when a connection drop was last seen
        self.closed = False
        self._retiring: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.replaced = 0  # sockets replaced after their connection broke
        self._sock: zmq.asyncio.Socket | None = None  # made by the first request
        self._monitor: zmq.asyncio.Socket | None = None
        # done when the broker refused the socket's key: zmq drops the socket's pipe with the
        # handshake, and a send waiting for one would wait out its timeout
        self._refused: asyncio.Future[None] | None = None

    @property
    def open_sockets(self) -> int:
        """1 once the first request made the socket, until the client closes (0 before and after)."""
        return 0 if self._sock is None or self.closed else 1

    def fail_all(self, reply: Reply) -> None:
        """End the wait of every request in flight with ``reply`` (one of the markers above)."""
        for queue in self.pending.values():
            queue.put_nowait(reply)

    def cancel_all(self) -> None:
        """(``ClientAPI.cancel_all``.) From any thread: from outside the client's loop it is handed
        to the loop."""
        loop = self._loop
        if loop is not None and _running_loop() is not loop:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self.cancel_all)
            return
        self.fail_all((CANCELLED, "", []))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.fail_all((LOST, "the client was closed", []))
        self.abandoned.clear()
        tasks, self._tasks = self._tasks, []
        await cancel_all(tasks)
        for task in self._retiring:
            await task
        if self._sock is not None:
            close_monitored(self._sock, self._monitor)

    async def _read_loop(self, sock: zmq.asyncio.Socket) -> None:
        try:
            while True:
                reply = await sock.recv_multipart(copy=False)
                try:
                    status, rid, worker, _ = unpack_reply_header(reply[0].buffer)
                except ProtocolError:
                    continue
                queue = self.pending.get(rid)
                if queue is not None:
                    queue.put_nowait((status, worker, reply[1:]))
                else:
                    self.abandoned.take(rid, status, worker, reply[1:])
        except asyncio.CancelledError:
            # not by close() or a replacement of the socket: the loop ends (asyncio.run cancels
            # the tasks left), and with it what it left open, as it closes its async generators
            if not self.closed and sock is self._sock:
                self.on_loop_end()
            raise

    async def _watch(self, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        """A dropped broker connection fails every waiting call at once (typed ConnectionLost)."""
        why, curve = "", sock.mechanism == zmq.CURVE
        while not why:
            why = self._saw(parse_monitor_message(await monitor.recv_multipart()), curve)
        self._dropped(why)

    def _saw(self, event: Any, curve: bool) -> str:
        self._up, why = connection_event(event["event"], curve, self._up)
        return why

    def _dropped(self, why: str) -> None:
        self.broken = True  # the next request gets a fresh socket
        self._drop_seen = time.monotonic()
        # a failed CURVE handshake: nothing was sent, and the reason is the key, not the network
        self.fail_all((LOST, "", []) if why is CONNECTION_LOST else (REFUSED, why, []))
        if why is not CONNECTION_LOST and self._refused is not None and not self._refused.done():
            self._refused.set_result(None)

    def _drop_seen_now(self, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> bool:
        """Read what the monitor holds that the watcher has not read yet (it runs when the loop
        next turns), as the blocking client does before each request: a drop that came before
        this request is its socket's end, not the request's (which would wait for the next broker)."""
        curve = sock.mechanism == zmq.CURVE
        while cast(int, monitor.get(zmq.EVENTS)) & zmq.POLLIN:
            try:
                got = cast("asyncio.Future[list[bytes]]", monitor.recv_multipart(zmq.DONTWAIT))
                frames = got.result()  # (done at once: no wait)
            except zmq.Again:
                break
            why = self._saw(parse_monitor_message(frames), curve)
            if why:
                self._dropped(why)
                return True
        return False

    def ready(self, connect: Connect) -> zmq.asyncio.Socket:
        """The socket, with its reader and watcher running on this loop: made (by ``connect``) at
        the first request, replaced when its connection broke. No await: concurrent requests
        share one replacement."""
        if self.closed:
            raise closed_error()
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            self._leave_loop(self._loop)
        sock, monitor = self._sock, self._monitor
        if sock is None or monitor is None or self.broken or self._drop_seen_now(sock, monitor):
            if time.monotonic() - self._drop_seen > RIDE_THROUGH:  # else wait for a restarting broker
                probe_endpoint(self.endpoint)
            if sock is not None:
                retired = self._retire(self._tasks, sock, monitor)
                self._retiring.append(asyncio.get_running_loop().create_task(retired))
                self.replaced += 1
            sock, monitor = self._sock, self._monitor = connect()
            self._tasks, self.broken, self._up = [], False, False
        if not self._tasks:
            loop = self._loop = asyncio.get_running_loop()
            self._refused = loop.create_future()
            self._tasks = [loop.create_task(self._read_loop(sock)), loop.create_task(self._watch(sock, monitor))]
        return sock

    def _leave_loop(self, old: asyncio.AbstractEventLoop) -> None:
        """A request from another loop than the one the socket's tasks run on. One still running
        (in another thread) owns the client: a usage error, before anything is sent. One that
        stopped (``asyncio.run`` again) has the socket closed and what still waited there failed;
        this loop gets a socket of its own."""
        if old.is_running():
            raise UsageError("this dspex.aio client belongs to an event loop that runs in another thread: make "
                             "one client per event loop (dspex.aio.connect() in each); nothing was sent")
        if not old.is_closed():
            self.fail_all((LOST, "the client moved to another event loop", []))
        if self._sock is not None:
            close_monitored(self._sock, self._monitor)
        self._sock = self._monitor = self._loop = None
        self.pending, self.abandoned, self._tasks, self._retiring = {}, Abandoned(), [], []

    async def _retire(self, tasks: list[asyncio.Task[None]], sock: zmq.asyncio.Socket, monitor: Any) -> None:
        """Stop the tasks of a replaced socket, then close it."""
        await cancel_all(tasks)
        close_monitored(sock, monitor)

    async def send(self, frames: list[Any], timeout: float) -> None:
        """Send within ``timeout``. A send that times out queued nothing: the socket stays in use.
        One the broker's refusal of the socket's key ends returns unsent: the refusal waits in the
        queue of every pending request (``_dropped``), which reads it next."""
        assert self._sock is not None and self._refused is not None
        try:
            sent = cast("asyncio.Future[Any]", self._sock.send_multipart(frames, copy=len(frames) <= 2))
            if sent.done():  # the usual case: no wait (on 3.11 wait_for may swallow a cancellation)
                sent.result()
                return
            try:
                await asyncio.wait((sent, self._refused), timeout=timeout if timeout > 0 else None,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                sent.cancel()  # (unless it went out) a timeout, a refusal, a cancellation: nothing is queued
            if sent.done() and not sent.cancelled():
                sent.result()
                return
            if not self._refused.done():
                raise BrokerUnreachable(f"could not send to {self.endpoint} within {timeout:g}s (the broker is not "
                                        "reading): nothing was sent")
        except zmq.ZMQError as exc:
            self.broken = True
            raise BrokerUnreachable(f"cannot send to {self.endpoint}: {exc}") from None

    def send_nowait(self, frames: list[Any]) -> None:
        """Send a control message without awaiting anything (a cancellation must not wait, and
        nobody waits for the answer); from outside the client's loop (garbage collection) it is
        handed to the loop. A broken connection is gone: the broker cancels what it had for it."""
        if self.closed or self.broken or self._sock is None:
            return
        if _running_loop() is not self._loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self.send_nowait, frames)
            return
        try:
            sent = cast("asyncio.Future[Any]", self._sock.send_multipart(frames))
        except zmq.ZMQError:
            return
        # queued behind other sends (a full pipe) it goes out when they do; its failure is nobody's
        sent.add_done_callback(_ignore_outcome)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _ignore_outcome(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: no "exception was never retrieved" at garbage collection
