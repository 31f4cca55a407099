"""A client made before ``os.fork()`` (a pre-fork server: gunicorn's ``preload_app``, a
multiprocessing pool with the fork start method) works in the child: the child gets sockets of its
own at its first request, never the parent's, whose I/O threads did not survive the fork; the
parent's client goes on unchanged. A session of the parent used in both processes stays one
session whose calls never cross: each process's new code is its own on the worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import dspex
import dspex.aio
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.timeout(120)

CHILD_LIMIT = 30.0  # a child still running after this hung: it is SIGKILLed by pid and the test fails


def in_child(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a forked child; its JSON result (an exception comes back as its type and text).
    A child that does not end within ``CHILD_LIMIT`` is killed and fails the test."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            try:
                out: Any = {"value": fn()}
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                out = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write_end, json.dumps(out).encode())
        except BaseException:  # noqa: BLE001 - whatever happens, the child must end here
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        ended = wait_for(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, CHILD_LIMIT, 0.02, "the forked child to end")
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child hung using the client it inherited") from None
    finally:
        data = b""
        while chunk := os.read(read_end, 65536):
            data += chunk
        os.close(read_end)
    assert ended
    out = json.loads(data or b"{}")
    assert "value" in out, out
    return out["value"]


def tagged_calls(s: dspex.Session, tag: str, n: int) -> list[list[Any]]:
    return [s.eval("[tag, i, __import__('os').getpid()]", {"tag": tag, "i": i}) for i in range(n)]


def test_a_sync_client_used_before_fork_works_in_the_child_and_in_the_parent(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy", "--capacity", "2")
    dx.timeout = 5.0  # a child stuck on an inherited socket would wait far past it
    shared = dx.session("p")
    assert shared.eval("1") == 1  # the client's sockets and I/O threads exist before the fork

    def child() -> Any:
        started = time.monotonic()
        own = dx.session("p")
        return {"own": tagged_calls(own, "child", 50), "shared": tagged_calls(shared, "child", 50),
                "pid": os.getpid(), "seconds": time.monotonic() - started}

    got = in_child(child)
    assert got["own"] == [["child", i, got["own"][0][2]] for i in range(50)]
    assert [c[:2] for c in got["shared"]] == [["child", i] for i in range(50)]
    assert got["seconds"] < 10
    # the parent's client is untouched by the child's life and exit
    assert [c[:2] for c in tagged_calls(shared, "parent", 20)] == [["parent", i] for i in range(20)]
    assert dx.session("p").eval("2") == 2


def test_parent_and_child_call_at_once_and_each_gets_its_own_replies(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy", "--capacity", "2")
    dx.timeout = 10.0
    shared = dx.session("p")
    assert shared.eval("1") == 1
    read_go, write_go = os.pipe()

    def child() -> Any:
        os.read(read_go, 1)  # both start together
        return tagged_calls(shared, "child", 300)

    # the child runs while the parent calls too: its replies and ours come through one session
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(in_child, child)
        os.write(write_go, b"x")
        mine = tagged_calls(shared, "parent", 300)
        theirs = fut.result(CHILD_LIMIT + 10)
    os.close(read_go)
    os.close(write_go)
    assert [c[:2] for c in mine] == [["parent", i] for i in range(300)]
    assert [c[:2] for c in theirs] == [["child", i] for i in range(300)]


def test_a_session_shared_across_fork_runs_each_processes_own_code(stack: Stack) -> None:
    """New functions sent after the fork by the parent and by the child through one session are
    two objects on the worker: neither process ever runs the other's."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    shared = dx.session("p")
    assert shared.run(lambda: "before") == "before"

    def child() -> Any:
        return [shared.run(lambda i=i: f"child {i}") for i in range(5)]

    mine = [shared.run(lambda i=i: f"parent {i}") for i in range(5)]  # the parent's new keys first
    theirs = in_child(child)
    mine += [shared.run(lambda i=i: f"parent {i}") for i in range(5, 10)]
    assert theirs == [f"child {i}" for i in range(5)]
    assert mine == [f"parent {i}" for i in range(10)]


def test_an_asyncio_client_used_before_fork_works_in_the_childs_event_loop(stack: Stack) -> None:
    stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", "2")
    dx = dspex.aio.connect(stack.frontend, timeout=5)
    shared = dx.session("p")

    async def calls(tag: str, n: int) -> list[Any]:
        return list(await asyncio.gather(*(shared.eval("[tag, i]", {"tag": tag, "i": i}) for i in range(n))))

    loop = asyncio.new_event_loop()  # the parent's loop: it runs again after the fork
    try:
        assert loop.run_until_complete(calls("parent", 10)) == [["parent", i] for i in range(10)]

        def child() -> Any:
            async def main() -> list[Any]:
                try:
                    return await calls("child", 50)
                finally:
                    await dx.close()
            return asyncio.run(main())

        assert in_child(child) == [["child", i] for i in range(50)]
        assert loop.run_until_complete(calls("parent", 10)) == [["parent", i] for i in range(10)]
    finally:
        loop.run_until_complete(dx.close())
        loop.close()


COUNTED = '''
X = 0
Z = 0


def get():
    return [X, Z]
'''


def test_a_forked_child_rebinding_globals_of_a_shared_session_reads_its_own(stack: Stack, usercode: Any) -> None:
    """The parent brings the session's binding versions far along (``X`` rebound many times, after
    the fork too); the child counts its own from the fork on: its rebinding of ``Z`` and the
    parent's later ones of ``X`` all reach the worker, each process reads what it bound last."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    mod = usercode(COUNTED)
    shared = dx.session("p")
    assert shared.run(mod.get) == [0, 0]
    read_go, write_go = os.pipe()
    read_forked, write_forked = os.pipe()

    def child() -> Any:
        os.write(write_forked, b"x")  # the parent rebinds only after the fork
        os.read(read_go, 1)  # and the child goes on after that
        mod.Z = 7
        return [shared.run(mod.get) for _ in range(3)]

    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(in_child, child)
        os.read(read_forked, 1)
        for value in range(1, 20):
            mod.X = value
            assert shared.run(mod.get) == [value, 0]
        os.write(write_go, b"x")
        theirs = fut.result(CHILD_LIMIT + 10)
    for fd in (read_go, write_go, read_forked, write_forked):
        os.close(fd)
    assert theirs == [[19, 7]] * 3  # the parent's X (one module state), the child's Z
    assert shared.run(mod.get) == [19, 7]  # the parent left Z alone: the child's binding stands
    mod.Z = 1
    assert shared.run(mod.get) == [19, 1]
