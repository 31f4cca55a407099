"""User code that changes process-wide interpreter state the worker relies on: the worker puts it
back when the call ends, so the session's next call and other sessions' calls are served as before."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import pytest

import dspex
from tests.harness import Stack, wait_for

DEPTH = "(lambda f: f(f, 300))(lambda f, n: n and 1 + f(f, n - 1))"  # 300 frames deep


@pytest.mark.parametrize("capacity", [1, 4])
def test_a_lowered_recursion_limit_ends_with_its_call(stack: Stack, capacity: int) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", str(capacity))
    rude, other = dx.session("p"), dx.session("p")
    assert other.eval(DEPTH) == 300
    with pytest.raises(dspex.RemoteError) as info:  # within its call the limit holds, as in-process
        rude.exec(f"import sys\nsys.setrecursionlimit(50)\n{DEPTH}")
    assert info.value.details["type"] == "RecursionError"
    assert other.eval(DEPTH) == 300  # another session's call is not cut short by it
    assert rude.eval(DEPTH) == 300
    rude.exec("import sys\nsys.setrecursionlimit(20_000)")  # a raised limit harms no one: it stays
    assert other.eval("__import__('sys').getrecursionlimit()") == 20_000


@pytest.mark.parametrize("capacity", [1, 4])
def test_a_trace_function_left_by_a_call_ends_with_it(stack: Stack, capacity: int) -> None:
    """``sys.settrace``/``sys.setprofile`` left set on the thread that ran the call: the next call
    on that thread (perhaps another session's) is not traced, and its time limit still stops it."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", str(capacity))
    rude = dx.session("p")
    rude.exec("import sys\ndef tr(*a):\n    return tr\nsys.settrace(tr)\nsys.setprofile(lambda *a: None)")
    for _ in range(8):  # on a capacity-4 worker: whichever pool thread takes it
        assert rude.eval("(__import__('sys').gettrace(), __import__('sys').getprofile())") == (None, None)
        with pytest.raises(dspex.Timeout) as info:
            rude.exec("while True: pass", timeout=0.5)
        assert info.value.details["stopped"] is True and not info.value.details.get("hard")
    for _ in range(4):  # a call whose time limit lands while its own trace function is set
        with pytest.raises(dspex.Timeout) as info:
            rude.exec("sys.settrace(tr)\nwhile True: pass", timeout=0.5)
        assert info.value.details["stopped"] is True and not info.value.details.get("hard")
    assert dx.session("p").eval("6 * 7", timeout=10) == 42


@pytest.mark.parametrize("capacity", [1, 4])
def test_stdout_and_stderr_rebound_for_good_are_put_back(stack: Stack, capacity: int, tmp_path: Path) -> None:
    """A call that rebinds ``sys.stdout``/``sys.stderr`` and never restores them: once no call
    runs, they are the worker's again, so the next calls' output (another session's) reaches its
    own caller and never the file the rude session opened."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", str(capacity))
    rude, other = dx.session("p"), dx.session("p")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    rude.exec(f"import sys\nsys.stdout = open({str(out)!r}, 'w', buffering=1)\n"
              f"sys.stderr = open({str(err)!r}, 'w', buffering=1)\nprint('into the file')")
    for s, name in ((other, "other"), (rude, "rude")):
        events: list[dict[str, object]] = []
        s.exec(f"import sys\nprint('{name} out')\nprint('{name} err', file=sys.stderr)", on_output=events.append)
        assert [(e["stream"], e["text"]) for e in events] == [("stdout", f"{name} out\n"), ("stderr", f"{name} err\n")]
    assert out.read_text() == "into the file\n" and err.read_text() == ""


@pytest.mark.parametrize("capacity", [1, 4])
def test_a_graceful_stop_never_waits_for_what_user_code_left_behind(stack: Stack, capacity: int,
                                                                    tmp_path: Path) -> None:
    """An ``atexit`` handler that never returns and a non-daemon thread that never ends (in-process
    the interpreter's exit waits for both): the worker's stop runs its atexit handlers for a bounded
    time and exits without waiting for user threads, so supervisord's stop never hangs."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", str(capacity))
    s = dx.session("p")
    ran = tmp_path / "ran.txt"
    s.exec("import atexit, threading, time\natexit.register(time.sleep, 1000)\n"
           f"atexit.register(lambda: open({str(ran)!r}, 'w').write('ran'))\n"
           "threading.Thread(target=time.sleep, args=(1000,), daemon=False).start()")
    (proc,) = stack.worker_procs
    os.kill(proc.pid, signal.SIGTERM)
    wait_for(lambda: proc.poll() is not None, 20, what="the worker's exit after SIGTERM")
    assert proc.returncode == 0
    assert ran.read_text() == "ran"  # the handlers that return still run, as at an in-process exit


LOGGING_CHANGES = {
    "logging.disable": "import logging\nlogging.disable(logging.CRITICAL)",
    "root handlers removed": "import logging\nfor h in list(logging.root.handlers):\n    logging.root.removeHandler(h)",
    "basicConfig(force=True)": "import logging\nlogging.basicConfig(force=True, format='%(message)s')",
}


@pytest.mark.parametrize("capacity", [1, 4])
@pytest.mark.parametrize("change", list(LOGGING_CHANGES))
def test_the_workers_logging_is_put_back_after_a_call(stack: Stack, capacity: int, change: str) -> None:
    """A call that disables logging or replaces the root logger's handlers: the next calls' log
    records (another session's) still reach their clients as records, and the worker log still
    gets its own lines."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", str(capacity))
    rude, other = dx.session("p"), dx.session("p")
    received: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = received.append  # type: ignore[method-assign]
    probe = logging.getLogger("rude_code_probe")
    probe.addHandler(handler)
    try:
        rude.exec(LOGGING_CHANGES[change])
        events: list[dict[str, object]] = []
        other.exec("import logging\nlogging.getLogger('rude_code_probe').warning('from other')", on_output=events.append)
        assert [r.getMessage() for r in received] == ["from other"]
        assert [e["stream"] for e in events] == ["log"]  # a record, not also a line of text on stderr
        with pytest.raises(dspex.RemoteError):
            other.eval("1 / 0")
        wait_for(lambda: "op=eval error=remote_error" in stack.logs(), 10, what="the worker log's line")
    finally:
        probe.removeHandler(handler)


@pytest.mark.parametrize("capacity", [1, 4])
def test_dspys_process_wide_configuration_written_directly_is_put_back(stack: Stack, capacity: int) -> None:
    """A call that writes DSPy's process-wide configuration itself, past ``dspy.configure``: the
    worker's is back when the call ends, so no other session (a fresh one included) sees its LM."""
    dx = stack.pool("p:strict_queue", 1, "--capacity", str(capacity))
    rude, other = dx.session("p"), dx.session("p")
    assert other.eval("__import__('dspy').settings.lm") is None
    rude.exec("import importlib\nfrom dspy.utils import DummyLM\n"
              "internals = importlib.import_module('dspy.dsp.utils.settings')\n"
              "internals.main_thread_config['lm'] = DummyLM([{'answer': 'leaked'}])\n"
              "internals.main_thread_config['adapter'] = 'junk'")
    assert other.eval("__import__('dspy').settings.lm") is None
    assert dx.session("p").eval("(__import__('dspy').settings.lm, __import__('dspy').settings.adapter)") == \
        (None, None)


STOP_HANDLERS = {
    "ignored": "signal.SIG_IGN",
    "own handler": "lambda signum, frame: heard.append(signum)",
}


@pytest.mark.parametrize("handler", list(STOP_HANDLERS))
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_that_arrives_while_a_call_took_it_over_still_stops_the_worker(
        stack: Stack, tmp_path: Path, stop: signal.Signals, handler: str) -> None:
    """A call that ignores the worker's stop signal, or installs its own handler for it, is running
    when supervisord (or a deploy) sends it: the call's handler runs as in-process, the call ends,
    and the worker drains and exits as it would have without the call."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    running, go = tmp_path / "running", tmp_path / "go"
    (proc,) = stack.worker_procs
    call = threading.Thread(target=lambda: result.append(s.exec(
        f"import os, signal, time\nheard = []\nsignal.signal(signal.{stop.name}, {STOP_HANDLERS[handler]})\n"
        f"open({str(running)!r}, 'w').close()\n"
        f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.01)", timeout=60)["heard"]))
    result: list[object] = []
    call.start()
    try:
        wait_for(running.exists, 30, what="the call to take the signal over")
        os.kill(proc.pid, stop)
    finally:
        go.touch()
        call.join(60)
    assert result == ([[int(stop)]] if handler == "own handler" else [[]])
    wait_for(lambda: proc.poll() is not None, 20, what=f"the worker's exit after {stop.name}")
    assert proc.returncode == 0


@pytest.mark.parametrize("handler", list(STOP_HANDLERS))
def test_a_call_that_took_sigint_over_is_still_stopped_at_its_deadline(stack: Stack, handler: str) -> None:
    """SIGINT is how a capacity-1 worker stops a call at its deadline: a call that ignores it or
    handles it itself is stopped all the same (``Timeout``, stopped), not left to the hard limit."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    pid = s.call("os", "getpid")
    for _ in range(2):
        with pytest.raises(dspex.Timeout) as info:
            s.exec(f"import signal, time\nheard = []\nsignal.signal(signal.SIGINT, {STOP_HANDLERS[handler]})\n"
                   "while True:\n    time.sleep(0.05)", timeout=0.5)
        assert info.value.details["stopped"] is True and not info.value.details.get("hard")
    assert s.call("os", "getpid") == pid
    assert s.eval("__import__('signal').getsignal(__import__('signal').SIGINT)") is not None


def test_a_stop_signal_cannot_be_taken_over_from_a_pool_thread(stack: Stack) -> None:
    """On a capacity-N worker calls run on pool threads: ``signal.signal`` raises ValueError there,
    as on any thread but the main one in-process."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", "4")
    with pytest.raises(dspex.RemoteError) as info:
        dx.session("p").exec("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)")
    assert info.value.details["type"] == "ValueError"
