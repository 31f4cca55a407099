"""The one process harness of the tests and the benchmarks.

* :mod:`tests.harness.procs`: spawn in own process groups, kill by pid, short temp dirs, polling;
* :mod:`tests.harness.stack`: a broker and its workers as subprocesses;
* :mod:`tests.harness.supervisord`: a real supervisord (the shipped conf, or a generated one);
* :mod:`tests.harness.chaos` and :mod:`tests.harness.fuzz`: the chaos and frame-fuzzing drivers
  (``python -m tests.harness.chaos``, ``python -m tests.harness.fuzz`` for the long runs).
"""

from tests.harness.procs import (
    PY,
    REPO,
    Procs,
    WaitTimeout,
    Workspace,
    base_env,
    free_port,
    pid_alive,
    rss_kb,
    short_tmpdir,
    wait_for,
)
from tests.harness.stack import Stack, shared_pool

__all__ = ["PY", "REPO", "Procs", "Stack", "WaitTimeout", "Workspace", "base_env", "free_port", "pid_alive",
           "rss_kb", "shared_pool", "short_tmpdir", "wait_for"]
