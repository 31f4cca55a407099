"""``python -m worker --pool NAME [--backend EP]`` (the options: :mod:`worker.settings`)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch litellm's price list

from dspex.stack import logs
from dspex.wire.errors import ConfigError
from worker.settings import parse
from worker.worker import main


def run(argv: list[str] | None = None) -> int:
    try:
        options = parse(argv)
    except ConfigError as err:
        logs.early(f"worker[{os.getpid()}]", f"worker: {err.message}")
        return 2
    return main(options)


if __name__ == "__main__":
    sys.exit(run())
