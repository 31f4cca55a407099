"""``python -m worker --pool NAME [--backend EP]`` (the options: :mod:`worker.settings`)."""

from __future__ import annotations

import faulthandler
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch litellm's price list

from dspex.stack import logs
from dspex.wire.errors import ConfigError
from worker.settings import parse
from worker.worker import main


def run(argv: list[str] | None = None) -> int:
    # a segfault or abort in C code a call reached (ctypes, an extension) kills the process: its log
    # (stderr, under supervisord) then shows every thread's Python stack, the call's among them
    faulthandler.enable()
    try:
        options = parse(argv)
    except ConfigError as err:
        logs.early(f"worker[{os.getpid()}]", f"worker: {err.message}")
        return 2
    return main(options)


if __name__ == "__main__":
    sys.exit(run())
