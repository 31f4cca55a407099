"""Prototype for the report: a worker that recycles by re-exec'ing itself instead of exiting.

``python -m bench.reexec_worker --pool P ...`` takes ``python -m worker``'s arguments. When the
broker recycles it (DISCONNECT), it finishes like the real worker, then ``execv``s a fresh
interpreter in the same process: a new incarnation (new identity, fresh memory) without waiting
for supervisord, whose main loop restarts an exited program only 1-2 s later. SIGTERM/SIGINT
still end the process as usual.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def main() -> int:
    from worker.__main__ import parse
    from worker.worker import Worker

    options = parse(sys.argv[1:])
    worker = Worker(options)
    terminated: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        terminated.append(signum)
        worker.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rc = worker.run()
    if terminated:
        return rc
    worker.ctx.destroy(linger=1000)  # flush the DISCONNECT
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
    return rc  # not reached


if __name__ == "__main__":
    sys.exit(main())
