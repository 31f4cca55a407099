"""Nudge supervisord after a worker leaves, so it restarts it now rather than on its next tick.

supervisord reaps an exited program when SIGCHLD interrupts its main loop, but starts the
replacement only on the loop's next turn, which waits up to a second in select(). Any XML-RPC
request wakes that loop: a few cheap ``getState`` calls in the first half second after a recycle
or crash cut the gap to a new incarnation from 1-2 s to a fraction of one.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from dspex.stack.supervisor import Supervisor, SupervisorConf
from dspex.wire.errors import DspexError

log = logging.getLogger("dspex.broker.nudge")

_DELAYS = (0.05, 0.1, 0.2, 0.35, 0.6)  # seconds after the worker left


class SupervisorNudge:
    """Wakes the supervisord of ``conf`` from a background thread; never blocks the broker."""

    def __init__(self, conf: SupervisorConf) -> None:
        self.conf = conf
        self._pending = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dspex-supervisor-nudge", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, path: str | Path | None) -> SupervisorNudge | None:
        """A nudger when ``path`` is a supervisor.conf with a reachable control socket declared."""
        if not path:
            return None
        try:
            return cls(SupervisorConf.load(path))
        except (DspexError, OSError) as err:
            log.info("not nudging supervisord (%s)", err)
            return None

    def worker_left(self) -> None:
        self._pending.set()

    def _run(self) -> None:
        while True:
            self._pending.wait()
            self._pending.clear()
            started = time.monotonic()
            try:
                with Supervisor(self.conf, timeout=1.0) as sup:
                    for delay in _DELAYS:
                        time.sleep(max(0.0, started + delay - time.monotonic()))
                        sup.state()
            except DspexError as err:
                log.debug("supervisord nudge failed: %s", err)
