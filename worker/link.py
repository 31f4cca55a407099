"""The worker's link to the broker: the only owner of its DEALER socket.

It connects and announces the worker (READY), heartbeats both ways PPP-style, notices a silent
broker and reconnects with backoff under the same identity, names a refused CURVE key at once
(a socket monitor), and carries frames in and out: every message other than its own heartbeats
and re-registration requests goes to ``deliver``; replies go out through :meth:`Link.send` from
whichever thread made them. Its :meth:`Link.leave` is the one goodbye: ``W_DISCONNECT``, then
wait for the broker's ``B_BYE``. The socket itself, its options and its monitor, is a
:class:`BrokerSocket` the link holds; when its heartbeat goes out and when the broker counts as
gone, its :class:`Heartbeats`.

Threads. The socket is used under a lock (a zmq socket may change threads behind a full memory
barrier) and waited on *without* it: a reader blocks in ``poll`` on the socket's file descriptor
(``zmq.FD``), so another thread can send meanwhile. That descriptor is edge-triggered: a thread
that used the socket while not the reader checks ``zmq.EVENTS`` afterwards and wakes the reader
if a message waits. The reader is the thread that runs :meth:`Link.read` (the worker's main
thread) while it is not away running user code (:attr:`Link.standin` is told when it leaves
and comes back), and a call still running ``grace`` seconds later gets the stand-in
(:mod:`worker.standin`) as reader, so heartbeats and a running call's cancels and stream credit
never wait for it.
Nothing polls: every wait ends at the next heartbeat or liveness deadline, when a call's waiting
output is due (worker.sink's flush timer, run by whichever thread waits), or when woken, and
the worker's heartbeat goes out in the same wake-up as the broker's arrives.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from dspex.wire.errors import BrokerUnreachable
from dspex.wire.headers import packb
from dspex.wire.protocol import (
    B_BYE,
    B_HEARTBEAT,
    B_REREGISTER,
    B_SYNC,
    GOODBYE_ABANDONED,
    GOODBYE_HARD_LIMIT,
    RENEW_BACKOFF_MAX,
    W_DISCONNECT,
    W_HEARTBEAT,
    W_HELD,
    W_READY,
)
from dspex.wire.sockets import HANDSHAKE_EVENTS, ZmqThreads, handshake_failure, probe_tcp, tune_socket
from dspex.wire.zmqfast import EVENTS as _EVENTS
from dspex.wire.zmqfast import NOBLOCK, recv_frames, send_frames
from dspex.wire.zmqfast import POLLIN as _POLLIN
from dspex.wire.zmqfast import get_opt as _get_opt
from worker.standin import StandIn, Timers, Waker

log = logging.getLogger("dspex.worker")

# After the broker's heartbeat our timer is set this fraction of an interval late, so the
# broker's next heartbeat (same interval, its own jitter) arrives before it. The longest gap
# between two of ours is then 1.75 intervals, within a liveness of 2 or more.
_ANSWER_SLACK = 0.25
# renewals one silence limit after a handshake the broker then did not answer, before the backoff
_QUICK_TRIES = 2
_SEND_TIMEOUT_MS = 5000  # a reply the broker has not taken by then is dropped (the caller times out)

Frames = list[Any]


class BrokerSocket:
    """The worker's DEALER to the broker, and the monitor of its handshakes: a failed one (a
    refused CURVE key, a wrong server key) is named at once instead of waiting silently for a
    broker that will never answer, and a successful one says the broker runs. A new socket, under
    the same identity, after the broker fell silent."""

    def __init__(self, ctx: zmq.Context[Any], backend: str, identity: str, *, max_message: int,
                 curve_server_key: bytes | None, curve_keypair: tuple[bytes, bytes] | None,
                 curve_server_key_file: str = "") -> None:
        self.ctx = ctx
        self.backend = backend
        self.identity = identity
        self.max_message = max_message
        self._curve = (curve_server_key, curve_keypair)
        self._server_key_file = curve_server_key_file  # named in a failed handshake's line
        self.sock: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None  # the socket's handshakes
        self.fds: tuple[int, ...] = ()  # what a reader waits on: the socket's and the monitor's fd
        # the monitor is read at a turn only when a wait found its fd ready, or (a new socket) it was
        # never read empty: zmq's FD fires for a message only after a read found none. Its
        # EVENTS read costs a ``poll`` and a ``getpid`` system call, twice per call otherwise
        self._monitor_due = True
        self._monitor_fd = -1
        self.handshake = ""  # why the last CURVE handshake with the broker failed ("" = none seen)

    def open(self, ready: bytes) -> None:
        """A new socket, connected, its READY (payload ``ready``) queued."""
        sock, self._monitor = self._dealer()
        sock.send_multipart([W_READY, ready])
        self.sock = sock
        self.fds = tuple(int(s.get(zmq.FD)) for s in (sock, self._monitor) if s is not None)
        self._monitor_fd = self.fds[-1]
        self._monitor_due = True

    def saw(self, ready: list[tuple[int, int]]) -> None:
        """A reader's wait found ``ready`` (``(fd, events)``): the monitor is read at the next turn
        if its fd is among them (any thread: a flag)."""
        if any(fd == self._monitor_fd for fd, _ in ready):
            self._monitor_due = True

    def close(self, linger: int | None = None) -> None:
        if self._monitor is not None and self.sock is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(0)
            self._monitor = None
        if self.sock is not None:
            self.sock.close(linger)
            self.sock = None

    def watch_handshake(self) -> bool:
        """Log a failed handshake once per reason; :attr:`handshake` says why the last failed.
        True if a handshake succeeded since the last look."""
        monitor = self._monitor
        succeeded = False
        if monitor is None or not self._monitor_due:
            return succeeded
        self._monitor_due = False
        while _get_opt(monitor, _EVENTS) & _POLLIN:
            event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshake = ""
                succeeded = True
                continue
            keypair = self._curve[1]
            why = handshake_failure(event["event"], "worker", True, keypair[0] if keypair else None)
            if why and why != self.handshake:
                self.handshake = why
                # the broker host logs only a count of such failures (zmq gives it no address):
                # this line is where the worker, the broker and the key file meet
                read = f", the broker's public key read from {self._server_key_file}" if self._server_key_file else ""
                log.error("%s (the CURVE handshake with the broker at %s failed%s); retrying until the keys are fixed",
                          why, self.backend, read)
        return succeeded

    def _dealer(self) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
        """A DEALER connected to the backend under the identity, and its handshake monitor."""
        server_key, keypair = self._curve
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
        tune_socket(sock, max_message=self.max_message, endpoint=self.backend)
        sock.setsockopt(zmq.ROUTING_ID, self.identity.encode())
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED
        if server_key is not None:
            public, secret = keypair or zmq.curve_keypair()
            sock.curve_serverkey = server_key
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            events |= HANDSHAKE_EVENTS
        monitor = sock.get_monitor_socket(events)
        sock.connect(self.backend)
        return sock, monitor


class Heartbeats:
    """PPP's heartbeats both ways (the link's lock guards them): when the worker's goes out, paced
    by the broker's, and when the link takes the broker for gone (PPP's liveness): a silence limit
    after it was last heard from, and the backoff of the socket's renewals while it stays silent."""

    def __init__(self, interval: float, liveness: int, now: float) -> None:
        self.interval = interval
        self.silence_limit = interval * liveness
        self.next_beat = now + interval  # when ours goes out
        self.last_beat = now  # READY went out (counts as one)
        self.heard(now)

    def theirs(self, now: float) -> bool:
        """The broker's heartbeat arrived: whether ours goes out in this wake-up (unless one went
        out less than half an interval ago). Our timer moves to just after the broker's next one,
        so one wake-up serves both."""
        self.next_beat = now + self.interval * (1 + _ANSWER_SLACK)
        return now - self.last_beat >= self.interval / 2

    def ours(self, now: float) -> None:
        """Ours went out: the next an interval later, or just after the broker's next one when it
        answered the broker's (:meth:`theirs`)."""
        self.last_beat = now
        self.next_beat = max(self.next_beat, now + self.interval)

    def heard(self, now: float) -> None:
        """A message from the broker (the READY going out counts as one)."""
        self.deadline = now + self.silence_limit
        self.backoff = self.silence_limit
        self._quick_tries = _QUICK_TRIES

    def handshake(self, now: float) -> None:
        """A handshake: the broker runs, and it has a full silence limit from now to answer
        (PPP's liveness restarts at a new connection), never less: a try planned while no
        broker listened, due a moment after the handshake, would close a connection over
        which the broker has registered us (its answer on the way), and it takes the close
        for a crash. A sooner try: if it ignored the connection (our old one, closed while
        the broker did not run, still held the identity: no handover) and the READY with
        it, the next try comes one silence limit from now, not after the backoff grown
        meanwhile. Twice at most until it is heard: a broker whose zmq thread answers
        handshakes while its loop is stuck gets the backoff."""
        answer_by = now + self.silence_limit
        if answer_by >= self.deadline:
            self.deadline = answer_by
        elif self._quick_tries:
            self._quick_tries -= 1
            self.deadline = answer_by

    def renewed(self, now: float) -> None:
        """The socket was renewed after a silence: the next try after the backoff, which doubles."""
        self.deadline = now + self.backoff
        self.backoff = min(self.backoff * 2, RENEW_BACKOFF_MAX)


class Link:
    """One worker incarnation's connection to the broker.

    ``ready`` and ``stats`` make the READY and heartbeat payloads; ``held()`` the requests it
    holds and the last it received, ``(client, req_id)``, the answer to the broker's B_SYNC; ``deliver(command, frames)``
    gets every other message from the broker (called holding the socket: it must not send);
    ``on_beat(now)`` runs at each heartbeat, outside the socket's lock; ``timers(now)`` (a call's
    waiting output) runs at every turn of whichever thread waits, outside the lock, and says how
    soon it is due again (:meth:`wake_timers` when that is sooner than the waiting thread wakes).
    """

    def __init__(self, ctx: zmq.Context[Any], backend: str, identity: str, *, max_message: int,
                 heartbeat_interval: float, heartbeat_liveness: int, curve_server_key: bytes | None,
                 curve_keypair: tuple[bytes, bytes] | None, ready: Callable[[], bytes], stats: Callable[[], bytes],
                 curve_server_key_file: str = "",
                 deliver: Callable[[bytes, list[zmq.Frame]], None], held: Callable[[], tuple[list[tuple[bytes, int]], list[tuple[bytes, int]]]],
                 on_beat: Callable[[float], None],
                 grace: float, timers: Timers) -> None:
        self._zmq_threads = ZmqThreads(ctx)  # batch while no call comes (before the context's first socket)
        self._dealer = BrokerSocket(ctx, backend, identity, max_message=max_message,
                                    curve_server_key=curve_server_key, curve_keypair=curve_keypair,
                                    curve_server_key_file=curve_server_key_file)
        self._ready = ready
        self._stats = stats
        self._deliver = deliver
        self._held = held
        self._on_beat = on_beat
        self._timers = timers
        self._lock = threading.Lock()  # guards the socket and the heartbeat/liveness state below
        self._beats = Heartbeats(heartbeat_interval, heartbeat_liveness, time.monotonic())
        self._beat_due = False  # a heartbeat went out: on_beat runs once the lock is let go
        self._sent = False  # _tick sent something
        self._outbox: collections.deque[Frames] = collections.deque()  # control messages for the next turn
        self._left = False  # the goodbye is said: nothing is sent any more
        self._reader = 0  # the thread that runs read()
        self._waker = Waker()  # wakes the reader
        self.standin = StandIn(self._stand_in_turn, grace, timers)

    # -- the reader (the worker's main thread) --------------------------------------------------
    def connect(self) -> None:
        """The first socket and READY; from the thread that will run :meth:`read`."""
        self._reader = threading.get_ident()
        with self._lock:
            self._dealer.open(self._ready())
        self.standin.start()

    def read(self) -> bool:
        """Handle what the broker sent and the timers that are due; unless a message for the
        worker arrived, wait until something may have (a message, :meth:`wake`, the next timer).
        True if one arrived. The link's own traffic (the broker's heartbeat, answered here) ends
        in the wait of the same call: an idle worker turns once per heartbeat, not twice."""
        turn = self._turn()
        if turn is None:  # a hard time limit said goodbye from the watchdog: the process ends now
            self._waker.wait((), None)
            return False
        got, fds, timeout = turn
        if not got:
            self._dealer.saw(self._waker.wait(fds, timeout))
        return got

    def wake(self) -> None:
        """Wake the reader (any thread, or a signal handler)."""
        self._waker.poke()

    def wake_timers(self) -> None:
        """A timer is due sooner than the thread that runs them wakes: wake it (any thread)."""
        if self.standin.covering:
            self.standin.poke()
        else:
            self._waker.poke()

    def say_soon(self, frames: Frames) -> None:
        """Send a control message at the next turn of whichever thread reads (safe in a signal
        handler: takes no lock)."""
        self._outbox.append(frames)
        self._waker.poke()
        self.standin.poke()

    # -- any thread -----------------------------------------------------------------------------
    def send(self, frames: Frames) -> None:
        """Send a reply (bounded by SNDTIMEO: a broker gone for good must not wedge us)."""
        with self._lock:
            if self._left:
                return
            sock = self._dealer.sock
            assert sock is not None
            self._zmq_threads.serving()
            try:
                send_frames(sock, frames)
            except zmq.Again:
                log.error("dropped a reply: the broker has not taken messages for %.0fs", _SEND_TIMEOUT_MS / 1000)
            # a send may take the edge of the socket's fd that a reader waiting on it needs (a
            # reader's own sends are followed by its drain)
            engaged = self.standin.engaged
            if (engaged or threading.get_ident() != self._reader) and _get_opt(sock, _EVENTS) & _POLLIN:
                (self.standin if engaged else self._waker).poke()

    def leave(self, last: Frames | None = None, *, abandoned: bool = False, hard_limit: bool = False,
              timeout: float = 1.0) -> None:
        """The goodbye: send ``last`` (a reply), then ``W_DISCONNECT`` (with ``abandoned``: calls
        this worker started are still running, they may have run; with ``hard_limit``: it leaves
        because a call ignored its hard time limit), and wait up to ``timeout``
        for the broker's ``B_BYE``. A process that exits right after close() can lose what zmq has
        not written yet (nothing terminates the context): waiting for the acknowledgement means
        a clean stop is never taken for a crash. A broker that is gone costs ``timeout``.
        Nothing is sent after this."""
        self.standin.stop()
        with self._lock:
            if self._left:
                return
            self._left = True
            sock = self._dealer.sock
            assert sock is not None
            if last is not None:
                send_frames(sock, last)
            while self._outbox:  # said soon (W_DRAIN): before the goodbye
                self._send_control(self._outbox.popleft())
            sock.setsockopt(zmq.LINGER, 1000)
            try:
                why = [GOODBYE_ABANDONED] if abandoned else [GOODBYE_HARD_LIMIT] if hard_limit else []
                sock.send_multipart([W_DISCONNECT, *why], zmq.NOBLOCK)
            except zmq.Again:
                log.warning("could not say goodbye: the broker has taken nothing from us for long")
                return
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                # anything but the acknowledgement (a request sent before the broker read our
                # goodbye) is handed back by the broker
                if sock.poll(int(left * 1000) + 1) and recv_frames(sock, NOBLOCK)[0].bytes == B_BYE:
                    return
            log.warning("the broker did not acknowledge our goodbye within %gs (is it gone?)", timeout)

    def close(self) -> None:
        self.standin.stop()
        self.standin.join(5)
        with self._lock:
            self._left = True
            self._dealer.close()
        self._waker.close()

    # -- a turn of whichever thread reads: the reader, or the stand-in while it runs user code -----
    def _turn(self) -> tuple[bool, tuple[int, ...], float] | None:
        """Handle what arrived and the timers that are due: whether a message for the worker
        arrived, what to wait on and for how long; None once the goodbye is said."""
        with self._lock:
            if self._left:
                return None
            got = self._drain()
            timeout = self._tick(time.monotonic())
            if self._sent:  # a send may have taken the fd's edge: look again before waiting
                got = self._drain() or got
            fds = self._dealer.fds
        if self._beat_due:
            self._beat_due = False
            self._on_beat(time.monotonic())
        return got, fds, min(timeout, self._timers(time.monotonic()))

    def _stand_in_turn(self, ready: list[tuple[int, int]]) -> tuple[tuple[int, ...], float]:
        self._dealer.saw(ready)
        turn = self._turn()
        return ((), math.inf) if turn is None else (turn[1], turn[2])

    # -- holding the lock -------------------------------------------------------------------------
    def _drain(self) -> bool:
        """Read every message waiting; True if one was for the worker (``deliver``)."""
        sock = self._dealer.sock
        assert sock is not None
        got = False
        while _get_opt(sock, _EVENTS) & _POLLIN:
            frames = recv_frames(sock, NOBLOCK)
            now = time.monotonic()
            self._beats.heard(now)
            command = frames[0].bytes
            if command == B_HEARTBEAT:
                if self._beats.theirs(now):
                    self._beat(now)
                self._zmq_threads.quiet()
                continue
            self._zmq_threads.serving()
            if command == B_REREGISTER:
                self._send_control([W_READY, self._ready()])
                continue
            if command == B_SYNC and len(frames) >= 2:  # answered here, even while calls run
                held, received = self._held()
                self._send_control([W_HELD, frames[1].bytes, packb(held), packb(received)])
                continue
            self._deliver(command, frames)
            got = True
        return got

    def _tick(self, now: float) -> float:
        """The timers: heartbeat, the broker's liveness, handshake failures, control messages
        said soon. Returns the seconds to the next timer; ``_sent`` says whether it sent (then
        the socket is drained again before waiting on it: a send may take its fd's edge)."""
        self._sent = False
        while self._outbox:
            self._send_control(self._outbox.popleft())
        beats = self._beats
        if now >= beats.next_beat:
            self._beat(now)
        if self._dealer.watch_handshake():
            beats.handshake(now)
        if now >= beats.deadline:
            # The broker is gone, restarted without hearing from us, or zmq gave up on our
            # connection (it never reconnects after a protocol error such as a frame over
            # MAXMSGSIZE): a fresh socket under the same identity, announced with READY. The
            # broker has no handover: it ignores the new connection until our old one's close
            # reaches it, and a READY lost that way is sent again at the next try. Back off
            # during a long outage.
            if self._dealer.handshake:  # not silence: the broker will not talk to us with these keys
                log.error("%s; new socket and READY (next try in %.1fs)", self._dealer.handshake, beats.backoff)
            else:
                log.warning("broker silent; new socket and READY (next try in %.1fs): %s",
                            beats.backoff, unreachable(self._dealer.backend))
            self._renew_socket()
            beats.renewed(now)
        return max(0.0, min(beats.next_beat, beats.deadline) - now)

    def _beat(self, now: float) -> None:
        self._send_control([W_HEARTBEAT, self._stats()])
        self._beats.ours(now)
        self._beat_due = True

    def _send_control(self, frames: Frames) -> None:
        """Heartbeats and READYs never block: with the broker gone for long, the socket's queue
        fills, and a blocking send would wedge the worker (holding the lock) until it returns."""
        sock = self._dealer.sock
        assert sock is not None
        self._sent = True
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _renew_socket(self) -> None:
        # linger 0: a lingering old socket finishes its handshake with a broker that runs again and
        # hands it our identity, then closes, and what the broker sends meanwhile is lost. A reply
        # dropped here is found by the broker's B_SYNC (it fails that call: it ran)
        self._dealer.close(0)
        self._dealer.open(self._ready())
        # a thread waiting on the old socket's fd would not see the new one's messages
        self._waker.poke()
        self.standin.poke()


def unreachable(backend: str) -> str:
    """Why the broker may be silent, for the worker host's log: a tcp:// backend whose host name
    does not resolve or where nothing listens (a typo, a closed port), else no reply from it."""
    if backend.startswith("tcp://"):
        try:
            probe_tcp(backend)
        except BrokerUnreachable as err:
            return err.message
    return f"no reply from {backend}"
