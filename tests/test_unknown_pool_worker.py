"""A worker of a pool the broker does not declare (a worker host's conf naming a pool the broker
lacks): the broker's log names it as every other worker line does (its id as text, its pid and
its host), so the operator of the broker host can tell which host to fix."""

from __future__ import annotations

import re
import socket

import pytest

from tests.harness import Stack, wait_for

pytestmark = pytest.mark.timeout(60)


def test_the_broker_names_the_host_of_a_worker_of_an_unknown_pool(stack: Stack) -> None:
    stack.start_broker("apool:strict_queue")
    worker = stack.start_worker("nosuch_pool", "--no-dspy")
    line = wait_for(lambda: next((s for s in stack.procs_reg.log_tail("broker.log", 1 << 16).splitlines()
                                  if "wants unknown pool" in s), None), 20, what="the broker's refusal")
    assert re.search(rf"worker [0-9a-f]{{8}} \(pid {worker.pid}, host {re.escape(socket.gethostname())}\) "
                     r"wants unknown pool 'nosuch_pool'", line), line
