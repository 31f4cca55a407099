"""The stand-in: a thread that reads the worker's socket while its main thread runs a long call.

A capacity-1 worker runs calls on its main thread, which is also the socket's reader. A call
younger than ``grace`` runs without help: waking another thread for every call costs a GIL
hand-off and two context switches on the hot path, and most calls end long before a heartbeat
is due. A call that runs longer gets the stand-in, which then waits on the socket and sends the
heartbeats (the link's turn) until the main thread is back. Nothing polls: the stand-in sleeps
until it is needed (the grace of the running call, the next heartbeat, the end of the window of
output the call left waiting) or woken. The first call
after a pause wakes it once to arm its timer; calls that follow while the timer is armed do not.
"""

from __future__ import annotations

import math
import os
import select
import threading
import time
from collections.abc import Callable

# (what the last wait found ready) -> (fds to wait on, seconds until the next timer)
Turn = Callable[[list[tuple[int, int]]], tuple[tuple[int, ...], float]]
Timers = Callable[[float], float]  # run what is due at this time.monotonic(); -> seconds until the next


class Waker:
    """A pipe that wakes the one thread waiting in :meth:`wait`; poked from any thread or from a
    signal handler (a write to a pipe takes no lock)."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._poll = select.poll()
        self._poll.register(self._r, select.POLLIN)
        self._fds: tuple[int, ...] = ()

    def poke(self) -> None:
        try:
            os.write(self._w, b"\0")
        except OSError:  # full: the waiter has a poke pending already (or it is closed: nobody waits)
            pass

    def wait(self, fds: tuple[int, ...], timeout: float | None) -> list[tuple[int, int]]:
        """Until one of ``fds`` is readable, a poke, or ``timeout`` seconds (None: no timeout);
        ``(fd, events)`` of those ready."""
        if fds != self._fds:
            for fd in self._fds:
                self._poll.unregister(fd)
            for fd in fds:
                self._poll.register(fd, select.POLLIN)
            self._fds = fds
        ms = None if timeout is None or timeout == math.inf else math.ceil(max(timeout, 0.0) * 1000)
        ready = self._poll.poll(ms)
        for fd, _ in ready:
            if fd == self._r:
                try:
                    os.read(self._r, 4096)
                except BlockingIOError:
                    pass
        return ready

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class StandIn:
    """Runs ``turn`` (read the socket, run the timers) whenever something may be due while the
    reader is away for longer than ``grace``; idle otherwise. While the reader is away and the
    stand-in does not read yet, it still runs ``timers`` (the call's output to send: the reader
    runs them in its turn, and so does ``turn``)."""

    def __init__(self, turn: Turn, grace: float, timers: Timers) -> None:
        self._turn = turn
        self._grace = grace
        self._timers = timers
        self._state = threading.Lock()  # guards the flags below
        self._away = False  # the reader runs user code
        self._since = 0.0  # ... since then (time.monotonic())
        self._armed = False  # the stand-in has a timer for the current call's grace (or reads already)
        self._engaged = False  # the stand-in reads now
        self._stopped = False
        self._waker = Waker()
        self._thread = threading.Thread(target=self._run, name="dspex-worker-io", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def away(self) -> None:
        with self._state:
            self._away = True
            self._since = time.monotonic()
            wake = not self._armed
            self._armed = True
        if wake:
            self._waker.poke()

    def back(self) -> None:
        with self._state:
            self._away = False
            wake = self._engaged  # it must stop reading: the reader is back
        if wake:
            self._waker.poke()

    def urgent(self) -> None:
        """Read at once, even while the reader runs user code (a stream's credit and cancels)."""
        with self._state:
            if not self._away:
                return  # the reader reads anyway
            self._since = -math.inf
            self._armed = True
        self._waker.poke()

    @property
    def covering(self) -> bool:
        """The reader is away: the stand-in runs the timers."""
        return self._away

    @property
    def engaged(self) -> bool:
        """It reads the socket now (read without the lock: it drains the socket first when it
        engages, so a thread that sees it not engaged yet loses nothing)."""
        return self._engaged

    def poke(self) -> None:
        self._waker.poke()

    def stop(self) -> None:
        with self._state:
            self._stopped = True
        self._waker.poke()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        ready: list[tuple[int, int]] = []
        while True:
            fds: tuple[int, ...] = ()
            timeout: float | None = None
            with self._state:
                if self._stopped:
                    break
                now = time.monotonic()
                if not self._away:
                    self._armed = self._engaged = False
                elif now - self._since >= self._grace:
                    self._engaged = True
                else:
                    self._engaged = False
                    timeout = self._since + self._grace - now
                engaged = self._engaged
            if engaged:
                fds, timeout = self._turn(ready)
            elif timeout is not None:  # away, not reading yet
                timeout = min(timeout, self._timers(now))
            ready = self._waker.wait(fds, timeout)
        self._waker.close()
