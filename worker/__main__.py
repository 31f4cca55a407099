"""``python -m worker --pool NAME [--backend EP]`` (the options: :mod:`worker.settings`)."""

from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import resource
import sys
import threading
from typing import NoReturn

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch litellm's price list

from dspex.stack import logs
from dspex.wire.errors import ConfigError
from worker.settings import parse


def run(argv: list[str] | None = None) -> int:
    # a segfault or abort in C code a call reached (ctypes, an extension) kills the process: its log
    # (stderr, under supervisord) then shows every thread's Python stack, the call's among them
    faulthandler.enable()
    try:
        options = parse(argv)
    except ConfigError as err:
        logs.early(f"worker[{os.getpid()}]", f"worker: {err.message}")
        return 2
    # only now: serving imports the client codec and numpy (seconds on a loaded host), and a config
    # error must end the process within supervisord's startsecs, or it restarts it forever
    # instead of marking it FATAL with the cause
    from worker.worker import main

    _more_descriptors()
    return main(options)


# what the soft limit of open descriptors is raised to, at most (within the hard limit)
DESCRIPTORS = 65536


def _more_descriptors() -> None:
    """Raise the soft limit of open descriptors towards the hard one. Every session that awaited
    something keeps its event loop (an epoll and a socketpair: 3 descriptors) while it is open
    (worker/session_loop.py), so a worker of a few hundred such sessions would run out at the
    common default of 1024, and its next call of any session would fail with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = DESCRIPTORS if hard == resource.RLIM_INFINITY else min(hard, DESCRIPTORS)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:  # (a container's policy may refuse it: the limit stays)
            logging.getLogger("dspex.worker").warning("could not raise the open-descriptor limit from %d to %d: %s",
                                                      soft, want, exc)


# how long the atexit handlers (user code registers some) may run once the worker has stopped
ATEXIT_BOUND = 3.0


def exit_now(code: int) -> NoReturn:
    """End the process after the worker's goodbye, never hanging on what user code left behind: the
    atexit handlers run for at most ``ATEXIT_BOUND`` seconds (one that never returns would make
    every stop wait for supervisord's SIGKILL), and threads it started are not waited for (the
    interpreter's exit joins every non-daemon thread)."""
    handlers = threading.Thread(target=atexit._run_exitfuncs, name="dspex-atexit", daemon=True)
    handlers.start()
    handlers.join(ATEXIT_BOUND)
    if handlers.is_alive():
        logging.getLogger("dspex.worker").warning("atexit handlers still running after %gs: exiting without them",
                                                  ATEXIT_BOUND)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing more to say there
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_now(run())
