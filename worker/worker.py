"""The worker process: the main thread runs calls; an I/O thread stands in while it is busy.

One DEALER socket, shared under a lock (a zmq socket may change threads behind a full memory
barrier). The idle main thread polls it, answers control messages and sends heartbeats; a
request runs on the main thread itself and its reply goes straight out: no inproc hop on the hot
path. While user code runs (an LM call of minutes), the I/O thread takes the lock every few
milliseconds to send heartbeats and read what arrives (stream credit, cancels, the next
requests), so the worker is never declared dead. With capacity > 1, calls run on a thread pool
and their replies reach the main thread over an inproc PUSH/PULL pair.
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
import signal
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import zmq
from zmq.backend import Socket as _ZmqBase
from zmq.utils.monitor import parse_monitor_message

from dspex import config, logs
from dspex.zmqfast import NOBLOCK, recv_frames, send_frames
from dspex.errors import (Cancelled, DspexError, InternalError, MessageTooLarge, QueueTimeout, RemoteError, Timeout,
                          UsageError)
from dspex.protocol import (
    B_BYE,
    B_CANCEL,
    B_CREDIT,
    B_DISCONNECT,
    B_HEARTBEAT,
    B_RELEASE_SESSION,
    B_REQUEST,
    B_REREGISTER,
    FLAG_ITEMS,
    FLAG_OUTPUT,
    FLAG_STREAM,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    PROTOCOL_VERSION,
    STREAM_WINDOW,
    W_DISCONNECT,
    W_DRAIN,
    W_HEARTBEAT,
    W_PARTIAL,
    W_READY,
    W_REPLY,
    REQUEST_ENVELOPE_SIZE,
    RequestHeader,
    SessionMode,
    Status,
    pack_reply_envelope,
    pack_reply_header,
    unpack_request_envelope,
    unpack_request_header,
)
from worker import output
from worker.executor import Executor, RefTable, StreamControl, error_frames
from worker.limits import CallTimedOut
from worker.streaming import LazyStream

log = logging.getLogger("dspex.worker")

_get_opt = _ZmqBase.get  # the Cython getsockopt (int option, no sugar)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_BUSY_POLL = 0.002  # how often the I/O thread reads the socket while the main thread runs a call
# A call younger than this runs without the I/O thread: waking it for every call costs a GIL
# hand-off and two context switches on the hot path, and most calls end long before a heartbeat
# is due. The I/O thread checks this often whether a call has become old enough to need it.
_BUSY_GRACE = 0.05
_IDLE_POLL = 0.1
_SEND_TIMEOUT_MS = 5000  # a reply the broker has not taken by then is dropped (the caller times out)


@dataclass(frozen=True)
class WorkerOptions:
    pool: str
    backend: str
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    ref_cap: int = 100_000
    preload_dspy: bool = True
    lm_history: int = 200
    max_message: int = 0  # 0: the configured default
    capacity: int = 1  # calls run at once, in threads
    curve_server_key: bytes | None = None
    curve_keypair: tuple[bytes, bytes] | None = None
    # a call still running this long after its deadline costs the worker (hard time limit)
    hard_grace: float = float(os.environ.get("DSPEX_HARD_GRACE", 5.0))


def _packb(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj)
    return data


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Worker:
    """One worker incarnation. A restarted process is a new incarnation with a new identity."""

    def __init__(self, options: WorkerOptions, context: zmq.Context[Any] | None = None) -> None:
        self.options = options
        self.incarnation = secrets.token_hex(16)
        self.ctx = context or zmq.Context.instance()
        self.max_message = options.max_message or config.max_message_bytes()
        self.capacity = max(1, options.capacity)
        self.executor = Executor(RefTable(options.pool, self.incarnation, options.ref_cap),
                                 capacity=self.capacity, grace=options.hard_grace)
        self.executor.own_frames = not options.backend.startswith("inproc://")
        self.started = time.time()
        self._stop = threading.Event()  # set by SIGTERM or the broker's DISCONNECT
        self._lock = threading.Lock()  # guards the socket and the heartbeat/liveness state below
        self._sock: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None  # the socket's handshake failures (CURVE)
        self._handshake = ""  # why the last CURVE handshake with the broker failed ("" = none seen)
        self._poller: zmq.Poller | None = None  # the main thread's; follows socket renewals
        # requests read by whichever thread held the lock, with their arrival time (their budget
        # counts from it)
        self._inbox: deque[tuple[float, list[zmq.Frame]]] = deque()
        self._busy = False  # the main thread is running user code
        self._busy_since = 0.0
        self._wake = threading.Event()
        self._exiting = False
        interval = options.heartbeat_interval
        self._silence_limit = interval * options.heartbeat_liveness
        self._next_beat = time.monotonic() + interval
        self._deadline = time.monotonic() + self._silence_limit  # broker liveness
        self._backoff = self._silence_limit
        self._replies_addr = f"inproc://dspex-worker-out-{self.incarnation}"
        self._local = threading.local()
        self._active = 0  # calls running on the pool (capacity > 1)
        self._active_lock = threading.Lock()
        self._streams: dict[tuple[bytes, int], StreamControl] = {}
        self._streams_lock = threading.Lock()
        self._running_sessions: dict[str, int] = {}  # session -> calls running (guarded by _active_lock)
        self._session_ends: dict[str, tuple[float, int]] = {}  # session -> (end of last call, pool TTL s)
        self._drain_sent = False
        self._dspy_logs = False  # dspy's logger has our format (dspy installs its own on import)
        self._running = 0  # calls executing now (READY and heartbeats report it to the broker)
        self._next_backstop = time.monotonic() + 1.0

    # -- main thread ------------------------------------------------------------------------
    def run(self) -> int:
        self._sock = self._new_socket()
        replies: zmq.Socket[Any] | None = None
        pool: ThreadPoolExecutor | None = None
        if self.capacity > 1:
            replies = self.ctx.socket(zmq.PULL)
            replies.setsockopt(zmq.LINGER, 0)
            replies.bind(self._replies_addr)
            pool = ThreadPoolExecutor(self.capacity, thread_name_prefix="dspex-call")
        poller = self._poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if replies is not None:
            poller.register(replies, zmq.POLLIN)
        io = threading.Thread(target=self._io_loop, name="dspex-worker-io", daemon=True)
        io.start()
        self.executor.install()  # output capture, time limits: process-wide, from the main thread
        if self.options.preload_dspy:
            self._set_busy(True)  # importing dspy takes a while: the I/O thread heartbeats meanwhile
            try:
                self.executor.enable_dspy(self.options.lm_history)
                logs.adopt("dspy")  # dspy's import installed its own handler and date format
                self._dspy_logs = True
            except Exception:  # a worker without dspy still serves plain Python
                log.exception("could not import dspy; serving without per-session DSPy settings")
            finally:
                self._set_busy(False)
        try:
            while not (self._stop.is_set() and self._active == 0):
                request = self._next_request(poller, replies)
                if request is None or self._stop.is_set():
                    continue  # stopping: a request not started is handed back at our goodbye
                if pool is None:
                    self._set_busy(True)
                    try:
                        self._handle(request, self._send_direct)
                    finally:
                        self._set_busy(False)
                else:
                    with self._active_lock:
                        self._active += 1
                    pool.submit(self._run_pooled, request)
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            with self._lock:
                self._exiting = True
                # replies of the last pooled calls may still sit in the inproc pipe: they go out
                # before the goodbye (the broker hands back whatever is unanswered at goodbye)
                while replies is not None:
                    try:
                        self._send_reply(replies.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
                # say goodbye so the broker drops our sessions now, not at heartbeat expiry
                self._sock.setsockopt(zmq.LINGER, 1000)
                try:
                    self._sock.send(W_DISCONNECT, zmq.NOBLOCK)
                    self._await_goodbye_ack()
                except zmq.Again:
                    pass
            self._wake.set()
            io.join(timeout=5)
            self._close_monitor()
            self._sock.close()
            if replies is not None:
                replies.close(0)
        return 0

    def _await_goodbye_ack(self, timeout: float = 1.0) -> None:
        """Holding the lock. A process that exits right after close() can lose what zmq has not
        written yet (nothing terminates the context): wait until the broker has our goodbye, so
        a clean stop is never taken for a crash. A broker that is gone costs ``timeout``."""
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self._sock.poll(int(left * 1000) + 1):
                return
            frames = recv_frames(self._sock, NOBLOCK)
            if frames[0].bytes == B_BYE:
                return
            # anything else (a request sent before the broker read our goodbye) is handed back

    def _set_busy(self, busy: bool) -> None:
        if busy:
            self._busy_since = time.monotonic()  # the I/O thread takes over after _BUSY_GRACE
        self._busy = busy

    def _next_request(self, poller: zmq.Poller, replies: zmq.Socket[Any] | None
                      ) -> tuple[float, list[zmq.Frame]] | None:
        """Poll the socket (holding the lock); handle control messages; return the next request."""
        assert self._sock is not None
        with self._lock:
            if self._inbox:
                return self._inbox.popleft()
            timeout = min(_IDLE_POLL, max(0.0, self._next_beat - time.monotonic()))
            events = dict(poller.poll(int(timeout * 1000)))
            if replies is not None and replies in events:
                while True:
                    try:
                        out = replies.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._send_reply(out)
            if self._sock in events:
                self._read_socket()
            self._timers()
            return self._inbox.popleft() if self._inbox else None

    def _run_pooled(self, request: tuple[float, list[zmq.Frame]]) -> None:
        try:
            self._handle(request, self._send_pushed)
        finally:
            with self._active_lock:
                self._active -= 1

    def _send_direct(self, frames: list[Any]) -> None:
        with self._lock:
            self._send_reply(frames)

    def _send_reply(self, frames: list[Any]) -> None:
        """Holding the lock. Bounded by SNDTIMEO: a broker gone for good must not wedge us."""
        assert self._sock is not None
        try:
            send_frames(self._sock, frames)
        except zmq.Again:
            log.error("dropped a reply: the broker has not taken messages for %.0fs", _SEND_TIMEOUT_MS / 1000)

    def _send_pushed(self, frames: list[Any]) -> None:
        """From a pool thread: hand the frames to the main thread, which owns the socket."""
        sock: zmq.Socket[Any] | None = getattr(self._local, "out", None)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(self._replies_addr)
            self._local.out = sock
        try:
            sock.send_multipart(frames, copy=False)
        except BaseException:
            # cut between frames (a time limit raised into this thread): a socket with half a
            # message queued would glue it to the next one; linger 0 drops the half
            self._local.out = None
            sock.close(0)
            raise

    def _handle(self, request: tuple[float, list[zmq.Frame]], send: Callable[[list[Any]], None]) -> None:
        """``request``: its arrival time and ``[request envelope, request header, *payload]`` (the
        envelope was checked on arrival); each is parsed once, here."""
        arrived, frames = request
        head = unpack_request_envelope(frames[0].bytes)
        client = head.client
        req_id = 0
        header: RequestHeader | None = None
        stream: StreamControl | LazyStream | None = None
        with self._active_lock:
            self._running += 1
        session = ""
        try:
            header = unpack_request_header(frames[1].buffer)
            req_id = header.req_id
            session = self._session_started(header.session)
            call_ms, queue_ms = head.call_ms, head.queue_ms
            if queue_ms and time.monotonic() > arrived + queue_ms / 1000:
                raise QueueTimeout(f"request {req_id} waited past its queue deadline before this worker reached it",
                                   pool=self.options.pool)
            deadline = arrived + call_ms / 1000 if call_ms else None
            if header.flags & FLAG_STREAM:
                stream = self._open_stream(client, req_id, header.timeout_ms, send, bool(header.flags & FLAG_ITEMS))
            elif header.flags & FLAG_OUTPUT:  # its stream opens at the first output, if any
                stream = LazyStream(partial(self._open_stream, client, req_id, header.timeout_ms, send, False))
            reply = self.executor.execute(header, frames[2:], stream, deadline=deadline,
                                          on_hard=lambda: self._hard_timeout(client, header), client=client,
                                          ephemeral=head.session_mode == SessionMode.EPHEMERAL)
            status = Status.OK.value
            size = sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in reply)
            if size > self.max_message:
                raise MessageTooLarge(f"result is {size} bytes, over the limit of {self.max_message}")
            self.executor.served += 1
        except DspexError as err:
            self.executor.errors += 1
            reply, status = error_frames(err), Status.ERROR.value
            self._log_failure(header, req_id, isinstance(stream, StreamControl), err)
        except (Exception, CallTimedOut) as exc:  # a bug of ours must not kill the worker
            log.exception("internal error handling request")
            self.executor.errors += 1
            reply, status = error_frames(InternalError(f"internal worker error: {exc!r}")), Status.ERROR.value
        finally:
            if isinstance(stream, StreamControl) or (stream is not None and stream.control is not None):
                with self._streams_lock:
                    self._streams.pop((client, req_id), None)
            self._session_ended(session, head.session_ttl_s, head.session_mode)
            with self._active_lock:
                self._running -= 1
            if not self._dspy_logs and "dspy" in sys.modules:  # user code imported it
                self._dspy_logs = True
                logs.adopt("dspy")
        send([pack_reply_envelope(W_REPLY, status, req_id, client),
              pack_reply_header(status, req_id, self.incarnation, self.options.pool), *reply])

    @staticmethod
    def _log_failure(header: RequestHeader | None, req_id: int, streaming: bool, err: DspexError) -> None:
        """One line per failed call: the caller's error has the details, the log says it happened."""
        session, op = (header.session[:8] or "-", header.op) if header is not None else ("-", "?")
        routine = isinstance(err, (RemoteError, UsageError, Cancelled))  # the caller's code, request or choice
        message = err.message if len(err.message) <= 300 else err.message[:300] + "..."
        log.log(logging.INFO if routine else logging.WARNING, "%s failed: session=%s request=%d op=%s error=%s: %s",
                "stream" if streaming else "call", session, req_id, op, err.code, message.replace("\n", " | "))

    def _open_stream(self, client: bytes, req_id: int, timeout_ms: int,
                     send: Callable[[list[Any]], None], items: bool) -> StreamControl:
        heads = {status.value: pack_reply_header(status.value, req_id, self.incarnation, self.options.pool)
                 for status in (Status.PARTIAL, Status.PROGRESS, Status.OUTPUT)}

        first = pack_reply_envelope(W_PARTIAL, Status.PARTIAL.value, req_id, client)

        def emit(kind: str, frames: list[Any]) -> None:
            send([first, heads[kind], *frames])

        # a consumer that stops acknowledging for this long has gone away: stop producing
        stall = timeout_ms / 1000 if timeout_ms > 0 else 300.0
        control = StreamControl(emit, STREAM_WINDOW, stall, items)
        self._busy_since = 0.0  # a stream needs its credit and cancels read at once: no grace
        self._wake.set()
        with self._streams_lock:
            self._streams[(client, req_id)] = control
        return control

    def _hard_timeout(self, client: bytes, header: Any) -> None:
        """From the watchdog: a call ignored its soft time limit. Tell its caller, leave, exit.

        Holding the lock to the end: no other thread touches the socket again. The reply and the
        goodbye reach the broker before the exit, so the caller gets a typed ``Timeout(hard=True)``
        and the session's next call ``SessionWorkerUnavailable``.
        """
        err = Timeout(f"{header.op} ran past its deadline and ignored the interruption for "
                      f"{self.options.hard_grace:g}s; its worker was recycled (the session's objects are lost)",
                      op=header.op, stopped=True, hard=True)
        head = pack_reply_header(Status.ERROR.value, header.req_id, self.incarnation, self.options.pool)
        log.error("hard time limit: %s request %d of session %s; exiting", header.op, header.req_id,
                  header.session[:8])
        self._lock.acquire()
        self._exiting = True
        try:
            assert self._sock is not None
            send_frames(self._sock, [pack_reply_envelope(W_REPLY, Status.ERROR.value, header.req_id, client), head,
                                     *error_frames(err)])
            self._sock.send(W_DISCONNECT)
            # The broker answers a heartbeat of a worker it has dropped with REREGISTER: once that
            # arrives it has read the reply and the goodbye, so closing the connection now cannot
            # make it see a "crash" first and drop the reply
            self._sock.send_multipart([W_HEARTBEAT, self._stats_frame()])
            until = time.monotonic() + 3.0
            while (left := until - time.monotonic()) > 0:
                if not self._sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                    break
                if recv_frames(self._sock)[0].bytes == B_REREGISTER:
                    break
        except BaseException:  # noqa: BLE001 - leaving regardless
            log.exception("could not say goodbye before the hard exit")
        finally:
            logging.shutdown()
            os._exit(3)

    def request_stop(self, *_: Any) -> None:
        """SIGTERM: finish what started, say goodbye. The broker hears W_DRAIN at the next
        socket turn (a signal handler must not take the socket lock) and sends nothing new."""
        self._stop.set()

    # -- session lifecycle: the broker releases; the worker's backstop TTL catches the rest ----
    def _session_started(self, session: str) -> str:
        """A request of ``session`` is about to run: its session counts as running."""
        if session:
            with self._active_lock:
                self._running_sessions[session] = self._running_sessions.get(session, 0) + 1
        return session

    def _session_ended(self, session: str, ttl: int, mode: int) -> None:
        if not session:
            return
        with self._active_lock:
            left = self._running_sessions.pop(session, 1) - 1
            if left:
                self._running_sessions[session] = left
            self._session_ends[session] = (time.monotonic(), ttl)
        if mode == SessionMode.EPHEMERAL and not left:
            self._release(session)  # a ``none`` pool keeps no session state between calls

    def _release(self, session: str) -> int:
        with self._active_lock:
            self._session_ends.pop(session, None)
        return self.executor.refs.release_session(session)

    def _backstop_sweep(self, now: float) -> None:
        """Release sessions idle for twice their pool's TTL (since the end of their last call):
        the broker's release can be lost (a broker restart, a re-pin elsewhere)."""
        with self._active_lock:
            due = [sid for sid, (ended, ttl) in self._session_ends.items()
                   if ttl and sid not in self._running_sessions and now - ended > 2 * ttl]
        for sid in due:
            n = self._release(sid)
            log.info("released session %s (%d refs): idle past the backstop TTL", sid[:8], n)

    # -- either thread, holding the lock -----------------------------------------------------
    def _read_socket(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                return
            self._deadline = time.monotonic() + self._silence_limit
            self._backoff = self._silence_limit
            self._from_broker(frames)
            # ask before reading again: the usual wake-up carries one message, and a zmq.Again
            # raised to end the loop costs more than this query (~8 µs vs ~1 µs)
            if not _get_opt(sock, _EVENTS) & _POLLIN:
                return

    def _timers(self) -> None:
        assert self._sock is not None
        now = time.monotonic()
        if self._stop.is_set() and not self._drain_sent:
            self._drain_sent = True
            self._send_control([W_DRAIN])
        if not self._busy and not self._inbox and self._active == 0:
            self.executor.forget_cancels()  # every request received has ended
        if now >= self._next_backstop:
            self._next_backstop = now + 1.0
            self._backstop_sweep(now)
            output.relax_root_level()
        if now >= self._next_beat:
            self._send_control([W_HEARTBEAT, self._stats_frame()])
            self._next_beat = now + self.options.heartbeat_interval
        self._watch_handshake()
        if now >= self._deadline:
            # The broker is gone, restarted without hearing from us, or zmq gave up on our
            # connection (it never reconnects after a protocol error such as a frame over
            # MAXMSGSIZE): a fresh socket under the same identity, announced with READY. The
            # broker has no handover, so a stale connection of ours must be gone first: its ZMTP
            # heartbeats drop one within the same silence limit. Back off during a long outage.
            if self._handshake:  # not silence: the broker will not talk to us with these keys
                log.error("%s; new socket and READY (next try in %.1fs)", self._handshake, self._backoff)
            else:
                log.warning("broker silent; new socket and READY (next try in %.1fs)", self._backoff)
            self._renew_socket()
            self._deadline = now + self._backoff
            self._backoff = min(self._backoff * 2, 30.0)

    def _watch_handshake(self) -> None:
        """Holding the lock: name a refused key or a wrong server key at once (once per reason),
        instead of waiting silently for a broker that will never answer."""
        if self._monitor is None:
            return
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake = ""
                continue
            why = config.handshake_failure(event["event"], "worker", True)
            if why and why != self._handshake:
                self._handshake = why
                log.error("%s (%s); retrying until the keys are fixed", why, self.options.backend)

    def _send_control(self, frames: list[bytes]) -> None:
        """Heartbeats and READYs never block: with the broker gone for long, the socket's queue
        fills, and a blocking send would wedge the worker (holding the lock) until it returns."""
        assert self._sock is not None
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _from_broker(self, frames: list[zmq.Frame]) -> None:
        assert self._sock is not None
        command = frames[0].bytes
        if command[:1] == B_REQUEST:
            if len(command) <= REQUEST_ENVELOPE_SIZE or len(frames) < 3:
                # v1 sent a bare command byte: this broker runs another dspex version
                log.warning("ignoring a request of %d frames (head of %d bytes) from the broker: is it of "
                            "another protocol version than ours (%d)?", len(frames), len(command), PROTOCOL_VERSION)
                return
            self._inbox.append((time.monotonic(), frames))
        elif command == B_HEARTBEAT:
            pass
        elif command in (B_CREDIT, B_CANCEL) and len(frames) >= 3:
            self._stream_control(command, frames)
        elif command == B_RELEASE_SESSION and len(frames) >= 2:
            session_id = frames[1].bytes.decode(errors="replace")
            n = self._release(session_id)
            log.debug("released session %s (%d refs)", session_id[:8], n)
        elif command == B_DISCONNECT:
            log.info("broker asked us to exit (recycle); finishing current work")
            self._stop.set()
        elif command == B_REREGISTER:
            self._send_control([W_READY, self._ready_frame()])
        else:
            log.warning("ignoring unknown command %r from broker", command[:8])

    def _stream_control(self, command: bytes, frames: list[zmq.Frame]) -> None:
        try:
            req_id, n = msgpack.unpackb(frames[2].buffer)
            key = (frames[1].bytes, int(req_id))
        except Exception:
            log.warning("malformed stream control from broker")
            return
        self._control(command == B_CANCEL, key, n)

    def _control(self, cancel: bool, key: tuple[bytes, int], n: Any) -> None:
        with self._streams_lock:
            control = self._streams.get(key)
        if cancel:
            # a stream waiting for credit to send its next item stops there; one computing an item,
            # and any other call, is interrupted (worker.limits)
            if control is not None and not control.cancel():
                return
            if not self.executor.cancel(key):
                log.debug("cancel of request %d: not running (not started yet, or finished)", key[1])
        elif control is not None:
            control.add_credit(int(n))

    # -- the I/O thread: stands in while the main thread runs user code ----------------------
    def _io_loop(self) -> None:
        while not self._exiting:
            if self._busy and time.monotonic() - self._busy_since >= _BUSY_GRACE:
                time.sleep(_BUSY_POLL)  # outside the lock: the main thread never waits long for it
            else:
                self._wake.wait(_BUSY_GRACE)
                self._wake.clear()
                continue  # the idle main thread (or a short call) needs no help
            with self._lock:
                if self._exiting or not self._busy:
                    continue
                self._read_socket()
                self._timers()

    # -- frames -------------------------------------------------------------------------------
    def _ready_frame(self) -> bytes:
        return _packb(
            {
                "pool": self.options.pool,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "incarnation": self.incarnation,
                "capacity": self.capacity,
                "running": self._running,  # a restarted broker must not over-dispatch
                "version": PROTOCOL_VERSION,
                "started": self.started,
            }
        )

    def _stats_frame(self) -> bytes:
        ex = self.executor
        return _packb({"rss": rss_bytes(), "served": ex.served, "errors": ex.errors, "refs": ex.refs.count,
                       "sessions": len(ex.refs.sessions), "running": self._running})

    def _renew_socket(self) -> None:
        assert self._sock is not None and self._poller is not None
        self._poller.unregister(self._sock)
        self._close_monitor()
        self._sock.close(0)
        self._sock = self._new_socket()
        self._poller.register(self._sock, zmq.POLLIN)

    def _close_monitor(self) -> None:
        if self._monitor is not None and self._sock is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(0)
            self._monitor = None

    def _new_socket(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
        config.tune_socket(sock, max_message=self.max_message)
        sock.setsockopt(zmq.ROUTING_ID, self.incarnation.encode())
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
        if self.options.curve_server_key is not None:
            public, secret = self.options.curve_keypair or zmq.curve_keypair()
            sock.curve_serverkey = self.options.curve_server_key
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | config.HANDSHAKE_EVENTS)
        sock.connect(self.options.backend)
        sock.send_multipart([W_READY, self._ready_frame()])
        return sock


def main(options: WorkerOptions) -> int:
    worker = Worker(options)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    log.info("worker %s pool=%s pid=%d capacity=%d backend=%s", worker.incarnation[:8], options.pool,
             os.getpid(), worker.capacity, options.backend)
    try:
        return worker.run()
    finally:
        ex = worker.executor
        log.info("worker %s (pool %s, pid %d) stopped after %.0fs: %d calls served, %d failed",
                 worker.incarnation[:8], options.pool, os.getpid(), time.time() - worker.started, ex.served,
                 ex.errors)
        logging.shutdown()
