"""The process harness's own promise: what a test or a bench run starts never outlives it, even
when the process that started it is killed before its cleanup runs (a pytest or a script under
``timeout``): the children sit in sessions of their own, so nothing else would stop them."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.harness import REPO, wait_for
from tests.harness.procs import kill_pid, starttime

pytestmark = pytest.mark.timeout(60)

STARTER = textwrap.dedent(f'''
    import sys, time
    sys.path.insert(0, {str(REPO)!r})
    from tests.harness.procs import Workspace
    ws = Workspace()
    child = ws.procs.spawn([sys.executable, "-c", "import time; time.sleep(300)"], "sleep.log")
    print(child.pid, ws.root, flush=True)
    time.sleep(300)  # killed here: ws.close() is never reached
    ws.close()
''')


def test_a_process_the_harness_started_dies_with_the_process_that_started_it() -> None:
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    child, started, root = 0, None, ""
    try:
        assert starter.stdout is not None
        pid, root = starter.stdout.readline().split()
        child = int(pid)
        started = starttime(child)
        assert started is not None, "the child never ran"
        starter.send_signal(signal.SIGKILL)
        starter.wait(10)
        wait_for(lambda: starttime(child) != started, timeout=10, what="the child gone with its starter")
    finally:
        starter.kill()
        starter.wait(10)
        if starter.stdout is not None:
            starter.stdout.close()
        if child:
            kill_pid(child, started=started)
        if root:
            shutil.rmtree(root, ignore_errors=True)
