"""A cleanup job deletes the broker's socket files while it runs (``rm /tmp/dspex-*/*.sock``, a
tmp reaper): the broker runs on, RUNNING in supervisord, and no client or new worker can reach it
until it binds again. ``pools status`` said the likely cause was another stack's conf or run
directory, and said it twice, its own message nested inside itself. It now names what happened and
the fix, once. Real supervisord stack, the CLI as a subprocess.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.harness import wait_for
from tests.harness.supervisord import SupervisedStack, dspexctl, no_traceback, small_stack

pytestmark = [pytest.mark.slow]


@pytest.fixture
def stack() -> Iterator[SupervisedStack]:
    with small_stack({"triage_pool": 1}) as s:
        yield s


@pytest.mark.timeout(240)
def test_a_deleted_socket_file_is_named_once_with_the_fix(stack: SupervisedStack) -> None:
    sock = os.path.join(stack.run_dir, "frontend.sock")
    os.unlink(sock)
    for args in (("pools", "status"), ("sessions", "list")):
        res = dspexctl(stack, *args)
        no_traceback(res)
        assert res.returncode == 4, res.stdout + res.stderr
        out = res.stdout + res.stderr
        assert out.count(f"supervisord of {stack.conf} reports its broker") == 1, out
        assert out.count("nothing is listening at") <= 1, out
        assert f"its socket file {sock} was deleted (or moved) while it ran" in out, out
        assert f"supervisorctl -c {stack.conf} restart broker" in out, out
        assert "another stack's conf" not in out, out

    # the file is back, but as another process's dead socket: the broker's own words, once
    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock)
    stale.close()
    wait_for(lambda: next(p["now"] - p["start"] for p in stack.processes() if p["name"] == "broker") >= 21, 40, 0.2,
             "the broker past its start-up grace")
    res = dspexctl(stack, "pools", "status")
    assert res.returncode == 4, res.stdout + res.stderr
    assert res.stdout.count(f"supervisord of {stack.conf} reports its broker") == 1, res.stdout
    assert res.stdout.count("Likely causes") == 1 and "stale socket file" in res.stdout, res.stdout
