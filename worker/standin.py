"""The stand-in: a thread that reads the worker's socket while its main thread runs a long call.

A capacity-1 worker runs calls on its main thread, which is also the socket's reader. A call
younger than ``grace`` runs without help: waking another thread for every call costs a GIL
hand-off and two context switches on the hot path, and most calls end long before a heartbeat
is due. The stand-in checks this often whether the running call has become old enough to need
it; then it runs the link's turn (read the socket, send the heartbeats) every few milliseconds
until the main thread is back.
"""

from __future__ import annotations

import math
import os
import select
import threading
import time
from collections.abc import Callable

Turn = Callable[[], tuple[tuple[int, ...], float]]  # -> (fds to wait on, seconds until the next timer)
_BUSY_POLL = 0.002  # how often the stand-in reads the socket while the reader runs a call


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

    def wait(self, fds: tuple[int, ...], timeout: float | None) -> None:
        """Until one of ``fds`` is readable, a poke, or ``timeout`` seconds (None: no timeout)."""
        if fds != self._fds:
            for fd in self._fds:
                self._poll.unregister(fd)
            for fd in fds:
                self._poll.register(fd, select.POLLIN)
            self._fds = fds
        ms = None if timeout is None or timeout == math.inf else math.ceil(max(timeout, 0.0) * 1000)
        for fd, _ in self._poll.poll(ms):
            if fd == self._r:
                try:
                    os.read(self._r, 4096)
                except BlockingIOError:
                    pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class StandIn:
    """Runs ``turn`` (read the socket, run the timers) while the reader is away for longer than
    ``grace``."""

    def __init__(self, turn: Turn, grace: float) -> None:
        self._turn = turn
        self._grace = grace
        self._away = False  # the reader runs user code
        self._since = 0.0  # ... since then (time.monotonic())
        self._stopped = False
        self._waker = Waker()
        self._thread = threading.Thread(target=self._run, name="dspex-worker-io", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def away(self) -> None:
        self._since = time.monotonic()
        self._away = True

    def back(self) -> None:
        self._away = False

    def urgent(self) -> None:
        self._since = -math.inf
        self._waker.poke()

    def poke(self) -> None:
        self._waker.poke()

    def stop(self) -> None:
        self._stopped = True
        self._waker.poke()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopped:
            if self._away and time.monotonic() - self._since >= self._grace:
                time.sleep(_BUSY_POLL)  # outside the socket's lock: the reader never waits long for it
            else:
                self._waker.wait((), self._grace)  # the idle reader (or a short call) needs no help
                continue
            if self._away and not self._stopped:
                self._turn()
        self._waker.close()
