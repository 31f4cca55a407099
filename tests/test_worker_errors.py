"""User code never takes a worker down; every exception comes back as a typed RemoteError."""

from __future__ import annotations

import os
import pickle
import signal
import textwrap

import pytest

import dspex
from tests.harness import Stack, wait_for

RAISERS = {
    "SystemExit": ("raise SystemExit(3)", "SystemExit"),
    "sys.exit": ("import sys; sys.exit('bye')", "SystemExit"),
    "KeyboardInterrupt": ("raise KeyboardInterrupt", "KeyboardInterrupt"),
    "GeneratorExit": ("raise GeneratorExit", "GeneratorExit"),
    "argparse": ("import argparse; argparse.ArgumentParser().parse_args(['--nope'])", "SystemExit"),
    "lone surrogate": ("raise ValueError('bad \\udcff byte')", "ValueError"),
    "raising __str__": (textwrap.dedent("""
        class Weird(Exception):
            def __str__(self):
                raise RuntimeError('no str for you')
        raise Weird('payload')
    """), "Weird"),
}


def _original(err: dspex.RemoteError) -> BaseException:
    """The exception by value, as the worker pickled it into the payload."""
    pickled = err.details.get("pickled")
    assert isinstance(pickled, bytes), "the payload carries the pickled exception"
    loaded = pickle.loads(pickled)
    assert isinstance(loaded, BaseException)
    return loaded


def test_user_exceptions_never_end_the_worker(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    pid = s.call("os", "getpid")
    s.exec("state = 'kept'")
    for name, (source, type_name) in RAISERS.items():
        with pytest.raises(dspex.RemoteError) as info:
            s.exec(source)
        err = info.value
        assert err.details["type"] == type_name, name
        assert err.remote_traceback, name
        if name == "lone surrogate":
            assert "\\udcff" in err.message
        if name == "raising __str__":
            assert "Weird" in err.message  # repr stands in for the raising __str__
        assert s.call("os", "getpid") == pid, f"{name} ended the worker"
    assert s.eval("state") == "kept"
    # a generator raising SystemExit while streamed is contained too
    s.exec("def gen():\n    yield 1\n    raise SystemExit(1)\n")
    stream = s.stream_eval("gen()")
    with pytest.raises(dspex.RemoteError, match="SystemExit"):
        list(stream)
    assert s.call("os", "getpid") == pid
    assert stack.workers("p")[0]["pid"] == pid


def test_remote_error_carries_the_original_exception(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec(textwrap.dedent("""
        class ParseFailure(Exception):
            def __init__(self, message, lm_response):
                super().__init__(message)
                self.lm_response = lm_response
    """))
    with pytest.raises(dspex.RemoteError) as info:
        s.exec("raise ParseFailure('could not parse', lm_response='[[ answer ]]')")
    err = info.value
    assert err.details["type"] == "ParseFailure"
    assert err.details["module"].startswith("dspex_session_")
    original = _original(err)
    assert type(original).__name__ == "ParseFailure"
    assert original.lm_response == "[[ answer ]]"  # type: ignore[attr-defined]
    with pytest.raises(dspex.RemoteError) as info:
        s.eval("1 / 0")
    assert isinstance(_original(info.value), ZeroDivisionError)
    # an exception with an attribute that cannot be pickled comes back without that attribute
    with pytest.raises(dspex.RemoteError) as info:
        s.exec("import threading\ne = ValueError('x')\ne.lock = threading.Lock()\ne.status = 503\nraise e")
    original = _original(info.value)
    assert type(original) is ValueError and original.args == ("x",)
    assert original.status == 503 and not hasattr(original, "lock")  # type: ignore[attr-defined]
    # one that cannot be pickled at all (its class's __reduce__ raises) still comes back, without the pickle
    with pytest.raises(dspex.RemoteError) as info:
        s.exec("class Sealed(Exception):\n    def __reduce__(self):\n        raise TypeError('sealed')\nraise Sealed('x')")
    assert info.value.details["type"] == "Sealed" and "pickled" not in info.value.details
    # the values of its __slots__, which vars() lacks, travel too
    with pytest.raises(dspex.RemoteError) as info:
        s.exec("class OverQuota(Exception):\n    __slots__ = ('limit',)\n    def __init__(self, limit):\n"
               "        super().__init__(f'over {limit}')\n        self.limit = limit\nraise OverQuota(5)")
    assert info.value.limit == 5 and _original(info.value).limit == 5  # type: ignore[attr-defined]


def test_errors_whose_class_makes_its_own_instances_come_back_typed(stack: Stack) -> None:
    # MemoryError's __new__ (a free list) refused the RemoteError subclass, and an ExceptionGroup's
    # needs its exceptions: the client raised that TypeError in place of the call's error
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    with pytest.raises(MemoryError) as info:
        s.exec("raise MemoryError('no room for the batch')")
    assert isinstance(info.value, dspex.RemoteError) and str(info.value) == "no room for the batch"
    assert info.value.args == ("no room for the batch",)
    # a group that cannot be pickled (an exception of it refuses) comes back as a RemoteError naming it
    with pytest.raises(dspex.RemoteError) as group_info:
        s.exec("class Sealed(Exception):\n    def __reduce__(self):\n        raise TypeError('sealed')\n"
               "raise ExceptionGroup('two failed', [Sealed('x'), ValueError('y')])")
    assert group_info.value.type_name == "ExceptionGroup" and "two failed" in str(group_info.value)
    assert s.eval("1 + 1") == 2


def test_an_attribute_or_name_error_keeps_the_name_it_looked_up(stack: Stack) -> None:
    # Python's reduce of AttributeError/NameError leaves their name out: it came back None
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("class Box:\n    pass")
    with pytest.raises(AttributeError) as attr_info:
        s.eval("Box().missing")
    assert attr_info.value.name == "missing" and isinstance(attr_info.value, dspex.RemoteError)
    with pytest.raises(NameError) as name_info:
        s.eval("not_defined_here")
    assert name_info.value.name == "not_defined_here"
    with pytest.raises(ValueError) as chained:  # with a chain too (the name rides with it)
        s.exec("try:\n    Box().gone\nexcept AttributeError as e:\n    raise ValueError('no') from e")
    assert isinstance(chained.value.__cause__, AttributeError) and chained.value.__cause__.name == "gone"


class ExitsOnLoad:
    """Unpickling it on the worker raises SystemExit (user code runs in __setstate__)."""

    def __init__(self) -> None:
        self.state = 1

    def __setstate__(self, state: object) -> None:
        raise SystemExit("no")


def test_an_argument_that_exits_while_unpickled_is_contained(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    pid = s.call("os", "getpid")
    with pytest.raises(dspex.RemoteError) as info:
        s.run(lambda x: 1, ExitsOnLoad())
    assert info.value.details["type"] == "SystemExit"
    assert s.call("os", "getpid") == pid


def test_a_sigterm_handler_set_by_user_code_does_not_outlive_the_call(stack: Stack) -> None:
    """A program (or a library it imports) that ignores SIGTERM must not leave its worker deaf
    to supervisord's stop: after the call the worker's own handler is back and it exits cleanly."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)")
    (proc,) = stack.worker_procs
    os.kill(proc.pid, signal.SIGTERM)
    wait_for(lambda: proc.poll() is not None, 15, what="the worker's exit after SIGTERM")
    assert proc.returncode == 0
    wait_for(lambda: any(e["event"] == "exit" for e in dx.status()["events"]), what="the broker saw a clean exit")
    assert dx.status()["pools"]["p"]["crashes"] == 0


def forked_child_dies_of_sigterm() -> bool:
    """What multiprocessing's Pool.terminate() relies on: a forked child ends on SIGTERM."""
    import os
    import signal
    import time

    ready, started = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(started, b"1")
            time.sleep(30)
        finally:
            os._exit(0)
    os.read(ready, 1)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def pool_of_processes() -> list[int]:
    import multiprocessing

    with multiprocessing.Pool(2) as pool:
        return pool.map(abs, [-1, -2, -3])


def test_processes_forked_by_user_code_have_default_signal_handlers(stack: Stack) -> None:
    """A process user code forks (multiprocessing's default on Linux) is a fresh program's child,
    not a worker: SIGTERM ends it, so Pool.terminate() never hangs a call."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    assert forked_child_dies_of_sigterm()  # in-process
    assert s.apply(forked_child_dies_of_sigterm, timeout=15) is True
    for _ in range(5):
        assert s.apply(pool_of_processes, timeout=15) == [1, 2, 3]


def forked_children_die_of_a_sigterm_sent_at_once(n: int) -> int:
    """How many of ``n`` forked children, each sent SIGTERM the moment ``fork`` returns in the
    parent (before the child can have run anything: ``Pool.terminate`` right after the pool
    started), end of it within 5 s."""
    import os
    import signal
    import time

    ended = 0
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                time.sleep(30)
            finally:
                os._exit(0)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        elif os.WIFSIGNALED(done[1]) and os.WTERMSIG(done[1]) == signal.SIGTERM:
            ended += 1
    return ended


def test_a_sigterm_that_reaches_a_forked_child_before_its_handlers_are_reset_still_ends_it(stack: Stack) -> None:
    """The window between ``fork`` and the child's new handlers: a SIGTERM sent then is held and
    delivered to the default handler, never run by the worker's or dropped (the child would live
    on and ``Pool.terminate`` would wait for it forever)."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    assert forked_children_die_of_a_sigterm_sent_at_once(20) == 20  # in-process
    assert s.apply(forked_children_die_of_a_sigterm_sent_at_once, [20], timeout=120) == 20
