"""The worker process: a loop that wires its link, its session book and its runner.

- :class:`worker.link.Link`: the socket to the broker (heartbeats, reconnects, the goodbye);
  frames in and out.
- :class:`worker.sessions.SessionBook`: the sessions this worker holds state for, and when that
  state goes.
- :class:`worker.runner.Runner`: runs requests ``capacity`` at a time and sends their replies.

The loop runs on the main thread: it reads what the broker sends (:meth:`Link.read`), answers
control messages and starts requests. A capacity-1 worker runs each request right there and its
reply goes straight out, with no hop to another thread; the link's stand-in reads the socket if a
call runs long. With capacity N the calls run on the runner's threads, each sending its own
reply.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import resource
import secrets
import signal
import socket
import threading
import time
from collections import deque
from typing import Any

import zmq

from dspex.stack import logs
from dspex.wire.headers import REQUEST_ENVELOPE_SIZE, packb
from dspex.wire.protocol import (
    B_CANCEL,
    B_CREDIT,
    B_DISCONNECT,
    B_RELEASE_SESSION,
    B_REQUEST,
    PROTOCOL_VERSION,
    W_DRAIN,
    W_HEARTBEAT,
)
from worker import output
from worker.executor import Executor
from worker.link import Link
from worker.runner import Frames, Request, Runner
from worker.sessions import SessionBook
from worker.settings import WorkerOptions
from worker.sink import flush_timer

log = logging.getLogger("dspex.worker")

# A call younger than this runs without the link's stand-in reading for the main thread (it
# reads the socket when the call ends).
_STAND_IN_GRACE = 0.05
PROBLEM_MAX = 500  # characters of a problem a heartbeat carries


class _Rss:
    """The process's resident memory, read at every heartbeat: ``/proc/self/statm`` stays open and
    is read again from its start (one ``pread``; opening it each time cost an idle worker a file
    object and eight more syscalls per heartbeat). Without /proc: the peak, from ``getrusage``."""

    def __init__(self) -> None:
        self._page = resource.getpagesize()
        self._fd = self._open()  # at start: a descriptor that came later would look leaked by a call

    @staticmethod
    def _open() -> int:
        try:
            return os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def __call__(self) -> int:
        for _ in range(2):
            try:
                return int(os.pread(self._fd, 128, 0).split()[1]) * self._page
            except (OSError, ValueError, IndexError):
                self._fd = self._open()  # user code closed it (its number may be another file's now)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


rss_bytes = _Rss()


class Worker:
    """One worker incarnation. A restarted process is a new incarnation with a new identity."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.incarnation = secrets.token_hex(16)
        self.started = time.time()
        self._started_at = time.monotonic()  # (its age goes with READY: no other host's clock in it)
        self.capacity = max(1, options.capacity)
        max_message = options.max_message
        self.book = SessionBook(options.pool, self.incarnation, options.ref_cap)
        self.executor = Executor(self.book.refs, capacity=self.capacity, grace=options.hard_grace,
                                 max_message=max_message)
        self.executor.own_frames = not options.backend.startswith("inproc://")
        self.link = Link(zmq.Context.instance(), options.backend, self.incarnation,
                         max_message=max_message, heartbeat_interval=options.heartbeat_interval,
                         heartbeat_liveness=options.heartbeat_liveness, curve_server_key=options.curve_server_key,
                         curve_keypair=options.curve_keypair, curve_server_key_file=options.curve_server_key_file,
                         ready=self._ready_frame, stats=self._stats_frame,
                         deliver=self._from_broker, held=lambda: self.runner.held_keys(), on_beat=self._on_beat,
                         grace=_STAND_IN_GRACE,
                         timers=self._timers)
        flush_timer.wake = self.link.wake_timers
        self.runner = Runner(self.executor, self.book, self.link.send, pool=options.pool,
                             incarnation=self.incarnation, capacity=self.capacity, max_message=max_message,
                             hard_grace=options.hard_grace, urgent=self.link.standin.urgent, leave=self._hard_exit,
                             idle=self._pooled_call_ended)
        # what keeps this worker from its job (its dspy import failed): the broker shows it to the
        # operator as the pool's DEGRADED reason, so a broken install does not look healthy
        self.problem = ""
        # its dspy import is under way: the broker says so, and `pools start` waits for its outcome
        self.preparing = options.preload_dspy
        self._stop = threading.Event()  # set by SIGTERM or the broker's DISCONNECT
        # requests read by whichever thread read the socket, with their arrival time; the main
        # loop takes them in order, the reading thread those whose deadline passes while they wait
        self._inbox: deque[Request] = deque()
        self._inbox_lock = threading.Lock()

    # -- main thread ------------------------------------------------------------------------
    def run(self) -> int:
        link, runner = self.link, self.runner
        link.connect()
        self.executor.install()  # output capture, time limits: process-wide, from the main thread
        if self.options.preload_dspy:
            link.standin.away()  # importing dspy takes a while: the stand-in heartbeats meanwhile
            try:
                self.executor.enable_dspy(self.options.lm_history)
                logs.adopt("dspy")  # dspy's import installed its own handler and date format
                runner.dspy_logs_adopted()
            except Exception as exc:  # it still serves plain Python; its heartbeats tell the operator
                self.problem = f"cannot import dspy: {type(exc).__name__}: {exc}"[:PROBLEM_MAX]
                log.exception("could not import dspy; serving plain Python only (run with --no-dspy to mean it)")
            finally:
                link.standin.back()
                self.preparing = False
                # the outcome (a problem, or none) reaches the broker now, not at the next heartbeat
                link.say_soon([W_HEARTBEAT, self._stats_frame()])
        # What the start made (dspy, litellm, pydantic) lives as long as the process: out of the
        # collector's generations (its garbage collected first), a full collection walks only what
        # calls made, not all of it every few thousand calls (docs/benchmarks.md, "The worker's collector")
        gc.collect()
        gc.freeze()
        inbox = self._inbox
        try:
            while not (self._stop.is_set() and runner.active == 0):
                if not inbox:
                    if runner.active == 0:
                        self.executor.forget_cancels()  # every request received has ended
                    link.read()
                    continue
                with self._inbox_lock:
                    request = inbox.popleft()
                if self._stop.is_set():
                    continue  # stopping: a request not started is handed back at our goodbye
                if runner.inline:
                    link.standin.away()
                    try:
                        runner.start(request)
                    finally:
                        link.standin.back()
                else:
                    runner.start(request)
        finally:
            runner.shutdown()
            # say goodbye so the broker drops our sessions now, not at heartbeat expiry
            link.leave()
            link.close()
        return 0

    def request_stop(self, *_: Any) -> None:
        """SIGTERM, or the broker's DISCONNECT: finish what started, say goodbye. The broker hears
        W_DRAIN at the link's next turn (a signal handler must not take the socket's lock) and
        sends nothing new."""
        if not self._stop.is_set():
            self._stop.set()
            self.link.say_soon([W_DRAIN])

    def _pooled_call_ended(self) -> None:
        if self._stop.is_set() and self.runner.active == 0:
            self.link.wake()  # the loop waits for the last call before its goodbye

    def _hard_exit(self, last: Frames, abandoned: bool) -> None:
        """From the watchdog: a call ignored its hard time limit. Its reply and the goodbye reach
        the broker before the exit; no other thread touches the socket again."""
        try:
            self.link.leave(last, abandoned=abandoned, hard_limit=True, timeout=3.0)
        except BaseException:
            log.exception("could not say goodbye before the hard exit")
        finally:
            logging.shutdown()
            os._exit(3)

    def _timers(self, now: float) -> float:
        """The timers of whichever thread reads the socket: the call's waiting output, and the
        requests waiting here; seconds until the next is due."""
        due = flush_timer.run(now)
        return min(due, self._expire_waiting(now)) if self._inbox else due

    def _expire_waiting(self, now: float) -> float:
        """Answer the requests whose deadline passed while they waited in the inbox (prefetched to
        a capacity-1 worker behind a call that runs long): QueueTimeout, at their deadline, from the
        thread that reads the socket. The others keep their order. Seconds until the next one's."""
        runner = self.runner
        expired: list[Request] = []
        with self._inbox_lock:
            waiting = [(runner.waits_until(request), request) for request in self._inbox]
            if any(until <= now for until, _ in waiting):
                self._inbox.clear()
                for until, request in waiting:
                    (expired if until <= now else self._inbox).append(request)
        for request in expired:
            runner.expire(request)
        return max(0.0, min((until for until, _ in waiting if until > now), default=math.inf) - now)

    def _on_beat(self, now: float) -> None:
        """Once per heartbeat, from whichever thread reads: the session backstop, the root logger."""
        self.book.sweep(now)
        output.root_level.relax()

    # -- from the broker (holding the link's socket) ----------------------------------------------
    def _from_broker(self, command: bytes, frames: list[zmq.Frame]) -> None:
        if command[:1] == B_REQUEST:
            if len(command) <= REQUEST_ENVELOPE_SIZE or len(frames) < 3:
                # v1 sent a bare command byte: this broker runs another dspex version
                log.warning("ignoring a request of %d frames (head of %d bytes) from the broker: is it of "
                            "another protocol version than ours (%d)?", len(frames), len(command), PROTOCOL_VERSION)
                return
            request = (time.monotonic(), frames)
            self.runner.deliver(request)
            self._inbox.append(request)
        elif command in (B_CREDIT, B_CANCEL) and len(frames) >= 3:
            self.runner.streams.control(command == B_CANCEL, frames)
        elif command == B_RELEASE_SESSION and len(frames) >= 2:
            session_id = frames[1].bytes.decode(errors="replace")
            n = self.book.release(session_id)
            log.debug("released session %s (%d refs)", session_id[:8], n)
        elif command == B_DISCONNECT and len(frames) >= 2:  # turned away at its READY, with why
            log.error("the broker turned this worker away: %s", frames[1].bytes.decode(errors="replace"))
            self.request_stop()
        elif command == B_DISCONNECT:
            log.info("broker asked us to exit (recycle); finishing current work")
            self.request_stop()
        else:
            log.warning("ignoring unknown command %r from broker", command[:8])

    # -- frames -------------------------------------------------------------------------------
    def _ready_frame(self) -> bytes:
        return packb(
            {
                "pool": self.options.pool,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "incarnation": self.incarnation,
                "capacity": self.capacity,
                "running": self.runner.running,  # a restarted broker must not over-dispatch
                "version": PROTOCOL_VERSION,
                "started": self.started,
                "age": round(time.monotonic() - self._started_at, 3),
                **({"preparing": True} if self.preparing else {}),
            }
        )

    def _stats_frame(self) -> bytes:
        ex = self.executor
        return packb({"rss": rss_bytes(), "served": ex.served, "errors": ex.errors, "refs": ex.refs.count,
                       "sessions": self.book.count, "running": self.runner.running,
                       **({"problem": self.problem} if self.problem else {}),
                       **({"preparing": True} if self.preparing else {})})


# The stop signals stay blocked across a fork until the child has a new program's handlers: a
# SIGTERM that reaches the child before then (``Pool.terminate`` right after the pool started)
# would run the worker's handler, or be dropped by the reset, and the child would never end
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_forking = threading.local()


def _before_fork() -> None:
    _forking.mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)


def _after_fork_in_parent() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, _forking.mask)


def _child_of_user_code() -> None:
    """A process user code forks (``multiprocessing``'s default on Linux) is that program's child,
    not a worker: it gets a new program's signal handlers, so SIGTERM ends it (``Pool.terminate``
    relies on that) and SIGINT raises KeyboardInterrupt; one sent meanwhile is delivered now."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, _forking.mask)


def main(options: WorkerOptions) -> int:
    worker = Worker(options)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_child_of_user_code)
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
