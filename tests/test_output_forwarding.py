"""What a call prints, warns and logs reaches the client where it would in-process (dspex.client.output).

Most cases run the client as a subprocess (a user's script) and assert on the stdout and stderr
it really wrote; the flow-control cases run the client here and watch the worker.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from dspex.wire.protocol import STREAM_WINDOW
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.timeout(120)

HEAD = """
import asyncio, contextlib, io, json, logging, sys, threading, warnings
import dspex
"""


def client(stack: Stack, tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    """Run ``body`` as a user's script (``FRONTEND`` is the broker's endpoint); its output."""
    script = tmp_path / "user_script.py"
    script.write_text(HEAD + f"FRONTEND = {stack.frontend!r}\n" + textwrap.dedent(body))
    raw = subprocess.run([sys.executable, str(script)], env=stack.env, cwd=tmp_path, capture_output=True,
                         timeout=100, check=False)
    # decoded without newline translation: a progress bar's carriage returns stay what they are
    out = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode())
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def worker_log(stack: Stack) -> str:
    return Path(stack.root, "worker-p.log").read_text(errors="replace")


def test_print_and_stderr_reach_the_clients_streams_as_they_are(stack: Stack, tmp_path: Path) -> None:
    stack.pool("p:strict_queue", 1, "--no-dspy")
    out = client(stack, tmp_path, """
        def program():
            print("hello from the worker")
            print("to stderr", file=sys.stderr)
            sys.stdout.write("partial ")
            sys.stdout.write("line\\n")
            t = threading.Thread(target=lambda: print("from a thread the program started"))
            t.start(); t.join()
            print("no newline at the end", end="")
            return 42

        with dspex.connect(FRONTEND) as dx:
            s = dx.session("p")
            print("result", s.run(program))
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):  # whatever sys.stdout is at that moment
                s.run(print, "redirected")
            print("buffer", repr(buf.getvalue()))
    """)
    assert out.stdout == ("hello from the worker\npartial line\nfrom a thread the program started\n"
                          "no newline at the endresult 42\nbuffer 'redirected\\n'\n")
    assert out.stderr == "to stderr\n"


def test_bytes_written_to_the_binary_streams_arrive_as_in_process(stack: Stack, tmp_path: Path) -> None:
    """``sys.stdout.buffer`` / ``sys.stderr.buffer`` (what ``click.echo`` and other CLIs' helpers
    write bytes to) and ``reconfigure`` exist on the worker as in-process: a program that uses
    them writes the same text, a UTF-8 character split across two writes included."""
    stack.pool("p:strict_queue", 1, "--no-dspy")
    out = client(stack, tmp_path, """
        import click

        def program():
            sys.stdout.reconfigure(line_buffering=True)
            sys.stdout.buffer.write("caf\\u00e9 ".encode()[:4])
            sys.stdout.buffer.write("caf\\u00e9 ".encode()[4:] + b"bytes\\n")
            sys.stdout.flush()
            sys.stderr.buffer.write(b"to stderr\\n")
            click.echo("click says hi")
            click.echo("click to stderr", err=True)
            print("text after bytes")
            return [sys.stdout.buffer.writable(), sys.stdout.buffer.fileno() == sys.stdout.fileno()]

        local = program()
        with dspex.connect(FRONTEND) as dx:
            remote = dx.session("p").run(program)
        print(json.dumps([local, remote]))
    """)
    once = "caf\u00e9 bytes\nclick says hi\ntext after bytes\n"
    assert out.stdout == once + once + "[[true, true], [true, true]]\n"
    assert out.stderr == "to stderr\nclick to stderr\n" * 2


def test_warnings_are_reissued_through_the_clients_warnings(stack: Stack, tmp_path: Path) -> None:
    stack.pool("p:strict_queue", 1, "--no-dspy")
    out = client(stack, tmp_path, """
        class OwnWarning(UserWarning):
            pass

        def warn(message, category=UserWarning):
            warnings.warn(message, category)

        with dspex.connect(FRONTEND) as dx:
            s = dx.session("p")
            s.run(warn, "shown as usual")
            with warnings.catch_warnings(record=True) as got:  # what pytest.warns uses
                warnings.simplefilter("always")
                s.run(warn, "recorded", OwnWarning)
                s.run(warn, "a future change", FutureWarning)
            print(json.dumps([[w.category.__name__, str(w.message), w.category is OwnWarning] for w in got]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s.run(warn, "ignored here")
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # cannot raise into a call that went on: shown
                print("returned", s.run(warn, "an error filter") is None)
    """)
    lines = out.stdout.splitlines()
    assert json.loads(lines[0]) == [["OwnWarning", "recorded", True], ["FutureWarning", "a future change", False]]
    assert lines[1] == "returned True"
    assert re.search(r"user_script\.py:\d+: UserWarning: shown as usual\n", out.stderr), out.stderr
    assert "UserWarning: an error filter" in out.stderr
    assert "ignored here" not in out.stderr and "recorded" not in out.stderr


def test_a_warning_shows_once_per_place_as_in_process(stack: Stack, tmp_path: Path) -> None:
    """Python's default filter shows a warning once per place (the registry of the module that
    warns): a loop that warns, run by two sessions (each has its own copy of the module on the
    worker), through the asyncio client, then in-process, shows each warning once."""
    stack.pool("p:strict_queue", 1, "--no-dspy")
    out = client(stack, tmp_path, """
        def warn_in_a_loop():
            for _ in range(3):
                warnings.warn("repeated")
            warnings.warn("another place")

        async def through_asyncio():
            async with dspex.aio.connect(FRONTEND) as dx:
                await dx.session("p").run(warn_in_a_loop)

        with dspex.connect(FRONTEND) as dx:
            dx.session("p").run(warn_in_a_loop)
            dx.session("p").run(warn_in_a_loop)
        asyncio.run(through_asyncio())
        warn_in_a_loop()  # in-process, at the same places: shown already
        with warnings.catch_warnings(record=True) as got:  # the filters changed: shown again, once
            warnings.simplefilter("default")
            with dspex.connect(FRONTEND) as dx:
                dx.session("p").run(warn_in_a_loop)
                dx.session("p").run(warn_in_a_loop)
        print(json.dumps([str(w.message) for w in got]))
    """)
    assert out.stderr.count("UserWarning: repeated") == 1, out.stderr
    assert out.stderr.count("UserWarning: another place") == 1, out.stderr
    assert json.loads(out.stdout) == ["repeated", "another place"]


def test_a_progress_bar_is_drawn_on_the_clients_stderr(stack: Stack, tmp_path: Path) -> None:
    stack.pool("p:strict_queue", 1, "--no-dspy")
    out = client(stack, tmp_path, """
        def loop():
            from tqdm import tqdm
            for _ in tqdm(range(20), desc="bar", mininterval=0, miniters=1):
                pass

        with dspex.connect(FRONTEND) as dx:
            dx.session("p").run(loop)
    """)
    assert out.stdout == ""
    states = out.stderr.split("\r")
    assert len(states) > 10, out.stderr  # every redraw, as tqdm wrote it
    assert states[-1].startswith("bar: 100%|") and "20/20" in states[-1] and states[-1].endswith("\n")
    assert out.stderr.count("\n") == 1


PROGRAM_THAT_LOGS = """
def logs():
    log = logging.getLogger("myapp.tools")
    log.debug("debug line")
    log.info("info line %d", 1)
    log.warning("warning line")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("it broke")
    import os
    return os.getpid()
"""


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING"])
def test_log_records_are_reemitted_on_the_clients_loggers_at_its_level(stack: Stack, tmp_path: Path,
                                                                        level: str) -> None:
    stack.pool("p:strict_queue", 1, "--no-dspy")
    out = client(stack, tmp_path, PROGRAM_THAT_LOGS + f"""
logging.basicConfig(level=logging.{level}, format="%(levelname)s %(name)s %(process)d %(dspex_session)s: %(message)s")
with dspex.connect(FRONTEND) as dx:
    s = dx.session("p")
    events = []
    pid = s.apply(logs, on_output=events.append)
    sent = [e["message"] for e in events if e["stream"] == "log"]
    print(json.dumps({{"pid": pid, "session": s.id, "sent": sent}}))
""")
    got = json.loads(out.stdout)
    pid, session = got["pid"], got["session"]
    wanted = {"DEBUG": ["debug line", "info line 1", "warning line", "it broke"],
              "INFO": ["info line 1", "warning line", "it broke"],
              "WARNING": ["warning line", "it broke"]}[level]
    assert got["sent"] == wanted  # records below the client's level were never sent
    prefix = f"myapp.tools {pid} {session}: "
    expected = "".join(f"{lvl} {prefix}{msg}\n" for lvl, msg in
                       [("DEBUG", "debug line"), ("INFO", "info line 1"), ("WARNING", "warning line")]
                       if msg in wanted)
    assert out.stderr.startswith(expected + f"ERROR {prefix}it broke\nTraceback (most recent call last):\n"), out.stderr
    assert out.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    # the worker log keeps its own level: a client at DEBUG does not make it log DEBUG records
    wait_for(lambda: "warning line" in worker_log(stack), what="the record in the worker log")
    assert "debug line" not in worker_log(stack)


def test_a_records_extra_fields_reach_the_clients_formatter(stack: Stack, tmp_path: Path) -> None:
    """``log.info(..., extra={...})`` (structured logging): the client's format that names the
    extra fields formats the forwarded record as the local one, instead of a logging error."""
    stack.pool("p:strict_queue", 1, "--no-dspy")
    out = client(stack, tmp_path, """
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s [%(user)s %(attempt)d %(tags)s] %(message)s")

        def program():
            logging.getLogger("myapp").info("signed in", extra={"user": "ada", "attempt": 2, "tags": {"a": 1}})

        program()
        with dspex.connect(FRONTEND) as dx:
            events = []
            dx.session("p").apply(program, on_output=events.append)
        print(json.dumps(events[0]["extra"]))
    """)
    assert out.stderr == "INFO myapp [ada 2 {'a': 1}] signed in\n" * 2
    assert json.loads(out.stdout) == {"user": "ada", "attempt": 2, "tags": "{'a': 1}"}


def test_without_logging_configured_warnings_reach_stderr_as_in_process(stack: Stack, tmp_path: Path) -> None:
    """No handler at all: Python's last-resort handler prints WARNING and above, message only."""
    stack.pool("p:strict_queue", 1, "--no-dspy")
    out = client(stack, tmp_path, PROGRAM_THAT_LOGS + """
with dspex.connect(FRONTEND) as dx:
    dx.session("p").run(logs)
""")
    assert out.stderr.startswith("warning line\nit broke\nTraceback (most recent call last):\n"), out.stderr


def test_logging_configured_inside_a_call_is_the_workers_the_clients_shows_its_records(stack: Stack,
                                                                                      tmp_path: Path) -> None:
    """A ``main()`` that configures logging first configures the worker's: its records show by
    the client's loggers (none configured: the last-resort handler, WARNING and up, the bare
    message), until the client configures its own (docs/remote-objects.md, *Output*)."""
    stack.pool("p:strict_queue", 1, "--no-dspy")
    out = client(stack, tmp_path, """
def main():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s|%(name)s|%(message)s")
    logging.getLogger("app").info("info line")
    logging.getLogger("app").warning("warning line")

with dspex.connect(FRONTEND) as dx:
    s = dx.session("p")
    s.run(main)
    sys.stderr.flush()
    print("-- configured here", file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s|%(name)s|%(message)s")
    s.run(main)
""")
    assert out.stderr == "warning line\n-- configured here\nINFO|app|info line\nWARNING|app|warning line\n", out.stderr


def test_dspy_logs_and_bars_reach_the_client_as_in_process(stack: Stack, tmp_path: Path) -> None:
    """DSPy's own logger (its handler and format on the client) and Evaluate's progress bar: the
    same program in-process and through a session writes the same lines."""
    stack.pool("p:strict_queue", 1)
    out = client(stack, tmp_path, """
        import dspy
        from dspy.utils.dummies import DummyLM

        def evaluate():
            lm = DummyLM([{"answer": "Paris"}, {"answer": "Rome"}, {"answer": "Paris"}])
            dspy.configure(lm=lm)
            devset = [dspy.Example(question=q, answer="Paris").with_inputs("question") for q in "abc"]
            metric = lambda example, pred, trace=None: example.answer == pred.answer
            result = dspy.Evaluate(devset=devset, metric=metric, display_progress=True, num_threads=1)(
                dspy.Predict("question -> answer"))
            logging.getLogger("dspy.custom").warning("done with %d examples", len(devset))
            return result.score

        class Stream(io.StringIO):
            encoding = "utf-8"  # as a terminal's or a pipe's (tqdm draws ASCII bars on a stream without one)

        def captured(fn):
            out, err = Stream(), Stream()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                score = fn()
            return score, out.getvalue(), err.getvalue()

        local = captured(evaluate)
        dspy.configure(lm=None)
        with dspex.connect(FRONTEND) as dx:
            remote = captured(lambda: dx.session("p").run(evaluate))
        print(json.dumps({"local": local, "remote": remote}))
    """)
    got = json.loads(out.stdout)
    assert got["local"][0] == got["remote"][0] == pytest.approx(66.67, abs=0.01)

    def lines(text: str) -> list[str]:
        """Each line's last state (bars redraw in place), without times and rates."""
        finals = [line.split("\r")[-1] for line in text.split("\n")]
        return [re.sub(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d|\[[^\]]*\]", "<t>", line) for line in finals if line]

    local = [lines(got["local"][1]), lines(got["local"][2])]
    remote = [lines(got["remote"][1]), lines(got["remote"][2])]
    assert remote == local  # stdout and stderr: the same lines
    stdout, stderr = remote
    assert any(line.startswith("Average Metric: 2.00 / 3 (66.7%): 100%|") for line in stdout), stdout
    assert any("INFO dspy.evaluate.evaluate: Average Metric: 2 / 3 (66.7%)" in line for line in stderr), stderr
    assert any("WARNING dspy.custom: done with 3 examples" in line for line in stderr), stderr


def test_concurrent_sessions_print_whole_lines(stack: Stack, tmp_path: Path) -> None:
    stack.pool("p:strict_queue", 2, "--no-dspy")
    out = client(stack, tmp_path, """
        from concurrent.futures import ThreadPoolExecutor

        def chatty(tag):
            for i in range(300):
                print(f"{tag}-{i:03d}-" + tag * 60)

        with dspex.connect(FRONTEND) as dx:
            sessions = {tag: dx.session("p") for tag in "ab"}
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda tag: sessions[tag].run(chatty, tag), "ab"))
    """)
    lines = out.stdout.splitlines()
    assert len(lines) == 600
    for tag in "ab":
        mine = [line for line in lines if line.startswith(tag + "-")]
        assert mine == [f"{tag}-{i:03d}-" + tag * 60 for i in range(300)]  # whole, in order


def test_forwarding_can_be_turned_off_and_callbacks_still_receive(stack: Stack, tmp_path: Path) -> None:
    stack.pool("p:strict_queue", 1, "--no-dspy")
    out = client(stack, tmp_path, """
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

        def program():
            from dspex.progress import report
            print("printed")
            logging.getLogger("myapp").info("logged")
            report({"step": 1})
            return "done"

        with dspex.connect(FRONTEND) as dx:  # default: forwarded, and the callbacks get it too
            events, progress = [], []
            dx.session("p").apply(program, on_output=events.append, on_progress=progress.append)
            print("both", json.dumps([[e["stream"], e["text"]] for e in events]), json.dumps(progress))
            dx.session("p", forward_output=False).run(program)  # this session: off
        with dspex.connect(FRONTEND, forward_output=False) as dx:  # this client: off
            s = dx.session("p")
            s.run(program)
            events = []
            s.apply(program, on_output=events.append)
            print("callback only", json.dumps([[e["stream"], e["text"]] for e in events]))
            dx.session("p", forward_output=True).run(print, "this session: on")
    """)
    assert out.stdout.splitlines() == [
        "printed",
        'both [["stdout", "printed\\n"], ["log", "INFO:myapp:logged\\n"]] [{"step": 1}]',
        'callback only [["stdout", "printed\\n"], ["log", "INFO:myapp:logged\\n"]]',
        "this session: on",
    ]
    assert out.stderr == "INFO myapp: logged\n"


def test_the_asyncio_client_forwards_the_same(stack: Stack, tmp_path: Path) -> None:
    stack.pool("p:strict_queue", 1, "--no-dspy")
    out = client(stack, tmp_path, """
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

        def program(n):
            print("printed", n)
            logging.getLogger("myapp").info("logged %d", n)
            warnings.warn(f"warned {n}")
            return n

        async def main():
            async with dspex.aio.connect(FRONTEND) as dx:
                sessions = [dx.session("p") for _ in range(2)]
                return await asyncio.gather(*(s.run(program, n) for n, s in enumerate(sessions)))

        print("results", asyncio.run(main()))
    """)
    assert sorted(out.stdout.splitlines()) == ["printed 0", "printed 1", "results [0, 1]"]
    assert "INFO myapp: logged 0\n" in out.stderr and "INFO myapp: logged 1\n" in out.stderr
    assert "UserWarning: warned 0" in out.stderr and "UserWarning: warned 1" in out.stderr


@pytest.mark.parametrize("kind", ["sync", "asyncio"])
def test_a_print_to_a_closed_pipe_raises_in_the_caller_and_stops_the_call(stack: Stack, tmp_path: Path,
                                                                          kind: str) -> None:
    """``python client.py | head -1``: in-process the program's next ``print`` raises
    BrokenPipeError and the program stops there. Through a session the same: the call is cancelled
    on its worker (not run to its end into a pipe nobody reads) and the caller gets the
    BrokenPipeError; the session serves its next call."""
    stack.pool("p:strict_queue", 1, "--no-dspy")
    lines = tmp_path / "lines"
    call = "await s.run(program, PATH)" if kind == "asyncio" else "s.run(program, PATH)"
    body = textwrap.indent(textwrap.dedent(f"""
        try:
            {call}
            sys.stderr.write("returned\\n")
        except BrokenPipeError:
            sys.stderr.write("raised BrokenPipeError\\n")
        sys.stderr.write(f"next call {{{call.replace("program, PATH", "len, [1, 2]")}}}\\n")
    """), "    ")
    if kind == "asyncio":
        session = "async def main():\n    async with dspex.aio.connect(FRONTEND) as dx:\n        s = dx.session('p')\n"
        tail = "asyncio.run(main())\n"
        body = textwrap.indent(body, "    ")
    else:
        session = "with dspex.connect(FRONTEND) as dx:\n    s = dx.session('p')\n"
        tail = ""
    script = tmp_path / "user_script.py"
    script.write_text(HEAD + f"FRONTEND = {stack.frontend!r}\nPATH = {str(lines)!r}\n" + textwrap.dedent("""
        def program(path):
            import time
            from pathlib import Path

            for i in range(1000):  # about 10 s to run to its end
                print("line", i, flush=True)
                Path(path + ".new").write_text(str(i))
                Path(path + ".new").replace(path)  # whole: the cancel may land inside a write
                time.sleep(0.01)
            return i
    """) + session + body + tail)
    proc = subprocess.Popen([sys.executable, str(script)], env=stack.env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"line 0\n"
        proc.stdout.close()  # as ``head -1`` does after its line
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert err.decode().splitlines()[-2:] == ["raised BrokenPipeError", "next call 2"], err.decode()[-3000:]
    ran = int(lines.read_text()) if lines.exists() else -1  # (-1: stopped before its first write)
    assert ran < 500, "the call ran on after its client's pipe closed"


@pytest.mark.timeout(240)
def test_a_print_loop_waits_for_a_client_that_does_not_read(stack: Stack, tmp_path: Path) -> None:
    """Flow control: a client that stops reading stops the printing program after one stream
    window of events (each at most MAX_EVENT_CHARS of coalesced lines), instead of letting the
    broker or the client buffer without bound."""
    from worker.sink import MAX_EVENT_CHARS

    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    progress = tmp_path / "printed"
    reading = threading.Event()
    events: list[dict[str, Any]] = []

    def slow_reader(event: dict[str, Any]) -> None:
        events.append(event)
        reading.wait(60)

    def print_loop(path: str, n: int) -> int:
        from pathlib import Path

        for i in range(n):
            print(f"line {i:05d} " + "x" * 989)
            Path(path).write_text(str(i))
        return n

    n = 20_000  # 20 MB of 1,000-character lines: far more than one window of events holds
    s = dx.session("p", forward_output=False)
    # its own deadline, not the client's 20 s: 20,000 prints and file writes took 90 s on a loaded
    # 2-core host (what is timed here is where the loop waits, not how fast it runs)
    future = dx.submit(s.apply, print_loop, [str(progress), n], on_output=slow_reader, timeout=180)
    seen: list[int] = []

    def stalled() -> bool:  # the printed count stopped moving for a few polls
        seen.append(int(progress.read_text() or 0) if progress.exists() else -1)
        return len(seen) > 20 and seen[-1] >= 0 and len(set(seen[-20:])) == 1

    wait_for(stalled, 30, 0.05, "the print loop to wait for the client")
    most = (STREAM_WINDOW + 1) * (MAX_EVENT_CHARS // 1000 + 1)
    assert seen[-1] <= most, f"{seen[-1]} lines printed with one read"
    reading.set()
    assert future.result(190) == n
    assert "".join(e["text"] for e in events) == "".join(f"line {i:05d} " + "x" * 989 + "\n" for i in range(n))


def test_output_past_one_credit_window_all_arrives_in_order(stack: Stack, capsys: Any) -> None:
    """More output events than one credit window: the client grants credit as it reads, nothing is
    lost or reordered, with and without a callback."""
    from worker.sink import MAX_EVENT_CHARS

    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    events: list[dict[str, Any]] = []
    n = 3 * STREAM_WINDOW * MAX_EVENT_CHARS // 2000  # lines of 2,000 characters: 3 windows of full events
    assert s.run(print_many, n, 2000) == n
    assert s.apply(print_many, [n, 2000], on_output=events.append) == n
    expected = "".join(f"{i:06d}".ljust(1999, "-") + "\n" for i in range(n))
    assert capsys.readouterr().out == expected * 2
    assert "".join(e["text"] for e in events) == expected
    assert len(events) > STREAM_WINDOW


def print_many(n: int, width: int) -> int:
    for i in range(n):
        print(f"{i:06d}".ljust(width - 1, "-"))
    return n


def end_a_redirection() -> str:
    sys.stdout = io.StringIO()
    print("kept by the program")
    sys.stdout = sys.__stdout__  # the usual way back (in-process: the terminal)
    print("after the redirection")
    print("straight to the original stderr", file=sys.__stderr__)
    sys.stderr = sys.__stderr__
    print("and to the restored stderr", file=sys.stderr)
    return type(sys.stdout).__name__


@pytest.mark.parametrize("capacity", [1, 4])
def test_output_through_sys_dunder_stdout_reaches_the_client(stack: Stack, capsys: Any, capacity: int) -> None:
    # sys.__stdout__ was the worker's own stream: what a call printed after `sys.stdout = sys.__stdout__`
    # went to the worker's log
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", str(capacity))
    s = dx.session("p")
    s.run(end_a_redirection)
    out, err = capsys.readouterr()
    assert out == "after the redirection\n"
    assert err == "straight to the original stderr\nand to the restored stderr\n"
    s.run(print, "the next call")
    assert capsys.readouterr().out == "the next call\n"


def close_stdout_then_print() -> str:
    sys.stdout.close()
    try:
        print("into a closed stream")
    except ValueError as exc:  # as in-process
        return str(exc)
    return "printed"


def delete_the_streams() -> int:
    del sys.stdout, sys.stderr, sys.__stdout__
    return 1


@pytest.mark.parametrize("capacity", [1, 4])
def test_a_call_that_closes_or_deletes_the_streams_leaves_the_next_calls_theirs(stack: Stack, capsys: Any,
                                                                                capacity: int) -> None:
    # `del sys.stdout` failed every later call of every session with an InternalError; a closed
    # sys.stdout stayed closed for them (`sys.stdout.closed`, libraries that check it)
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", str(capacity))
    s, other = dx.session("p"), dx.session("p")
    assert s.run(close_stdout_then_print) == "I/O operation on closed file."
    assert other.run(lambda: (print("still here"), sys.stdout.closed)[1]) is False
    assert s.run(delete_the_streams) == 1
    assert other.run(lambda: (print("and here"), print("on stderr", file=sys.stderr), sys.stdout.closed)[2]) is False
    out, err = capsys.readouterr()
    assert (out, err) == ("still here\nand here\n", "on stderr\n")


def take_over_input_and_warnings() -> int:
    import warnings

    sys.stdin = io.StringIO("this session's secret\n")
    warnings.showwarning = lambda *args, **kwargs: None
    return 1


def warn_then_read() -> str:
    import warnings

    warnings.warn("the other session's warning", UserWarning)
    try:
        return input()
    except EOFError:
        return "EOFError"


@pytest.mark.parametrize("capacity", [1, 4])
def test_a_calls_stdin_and_showwarning_do_not_reach_other_sessions(stack: Stack, capacity: int) -> None:
    # a session's sys.stdin fed its text to another session's input(), and its showwarning
    # swallowed every later warning of the worker's sessions
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", str(capacity))
    s, other = dx.session("p"), dx.session("p")
    assert s.run(take_over_input_and_warnings) == 1
    with pytest.warns(UserWarning, match="the other session's warning"):
        assert other.run(warn_then_read) == "EOFError"


def test_output_of_a_call_on_a_client_in_this_process_goes_to_capsys(stack: Stack, capsys: Any,
                                                                      caplog: Any) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    caplog.set_level(logging.INFO, logger="tests.forwarded")
    s = dx.session("p")
    s.run(print, "to capsys")
    s.run(logging.getLogger("tests.forwarded").info, "to caplog")
    assert capsys.readouterr().out == "to capsys\n"
    [record] = [r for r in caplog.records if r.name == "tests.forwarded"]
    assert record.getMessage() == "to caplog" and record.dspex_session == s.id
    assert record.process != os.getpid() and record.dspex_worker == s.worker


def test_a_large_print_arrives_whole(stack: Stack, tmp_path: Path) -> None:
    """10 MB of lines printed at once (a report, a dump) reaches the client's stdout byte for
    byte, well within the call's timeout; so do 100,000 lines printed one by one."""
    stack.pool("p:strict_queue", 1, "--no-dspy")
    out = client(stack, tmp_path, """
        def dump(n, at_once):
            lines = [f"{i:09d}" + "x" * 90 + "\\n" for i in range(n)]
            if at_once:
                print("".join(lines), end="")
            else:
                for line in lines:
                    sys.stdout.write(line)
            return n

        with dspex.connect(FRONTEND) as dx:
            s = dx.session("p")
            results = [s.apply(dump, [100_000, True], timeout=30), s.apply(dump, [100_000, False], timeout=60)]
        print(json.dumps(results))
    """)
    *printed, results = out.stdout.split("\n")[:-1]
    assert results == "[100000, 100000]"
    expected = [f"{i:09d}" + "x" * 90 for i in range(100_000)]
    assert printed == expected + expected


def test_a_write_of_many_lines_is_sent_in_few_events() -> None:
    """One write of many lines goes to the caller as one event per 64 KiB or so, cut at line
    ends (so concurrent sessions' lines still never splice); the worker log gets every line."""
    from worker.sink import MAX_EVENT_CHARS, OutputSink

    sent: list[str] = []
    logged: list[str] = []
    sink = OutputSink("t", lambda event: sent.append(event["text"]))
    sink._log = lambda stream, line: logged.append(line)  # type: ignore[method-assign]
    lines = [f"{i:05d} " + "y" * 94 + "\n" for i in range(10_000)]  # 1 MB
    sink.write("stdout", "".join(lines) + "tail")
    sink.write("stdout", " end\r\nbar 1\rbar 2\n")
    sink.close()
    assert "".join(sent) == "".join(lines) + "tail end\r\nbar 1\rbar 2\n"
    assert len(sent) <= 2 + len("".join(lines)) // MAX_EVENT_CHARS + 2
    assert all(piece.endswith(("\n", "\r")) for piece in sent)
    assert logged == [line[:-1] for line in lines] + ["tail end", "bar 2"]


def test_the_log_threshold_follows_the_clients_levels() -> None:
    from dspex.client.output import log_threshold

    mine = logging.getLogger("tests.threshold.probe")
    before = log_threshold()
    try:
        mine.setLevel(5)
        assert log_threshold() == 5
        logging.disable(logging.INFO)
        assert log_threshold() == logging.INFO + 1
    finally:
        logging.disable(logging.NOTSET)
        mine.setLevel(logging.NOTSET)
    assert log_threshold() == before


@pytest.mark.parametrize("capacity", [1, 4])
@pytest.mark.parametrize("how", ["thread", "pool task"])
def test_what_a_thread_prints_after_its_call_returned_reaches_its_own_session_only(
        stack: Stack, tmp_path: Path, capacity: int, how: str) -> None:
    """A thread (or a thread pool's task) a call started and left running prints after that call
    returned: in-process the line shows; through a session it reaches that session's client with
    its next call (before that call's own output), never another session's call that runs
    meanwhile on the worker."""
    stack.pool(f"p:strict_queue:capacity={capacity}", 1, "--no-dspy", "--capacity", str(capacity))
    out = client(stack, tmp_path, f"""
        import os, time
        from concurrent.futures import ThreadPoolExecutor
        FLAGS = {str(tmp_path)!r}
        HOW = {how!r}

        def start_background():
            def later():
                while not os.path.exists(os.path.join(FLAGS, "b-running")):
                    time.sleep(0.01)
                print("late line of session a", flush=True)
                print("and a second one", file=sys.stderr, flush=True)
                open(os.path.join(FLAGS, "a-printed"), "w").close()
            if HOW == "thread":
                threading.Thread(target=later, daemon=True).start()
            else:
                ThreadPoolExecutor(1).submit(later)
            return "started"

        def other_session_call():
            open(os.path.join(FLAGS, "b-running"), "w").close()
            deadline = time.monotonic() + 20
            while not os.path.exists(os.path.join(FLAGS, "a-printed")) and time.monotonic() < deadline:
                time.sleep(0.01)
            return "b done"

        def next_call():
            print("a's next call")
            return 1

        with dspex.connect(FRONTEND) as dx:
            a, b = dx.session("p"), dx.session("p")
            print("a:", a.run(start_background))
            b_events = []
            print("b:", b.apply(other_session_call, on_output=b_events.append))
            print("b's events:", json.dumps(b_events))
            a_events = []
            a.apply(next_call, on_output=a_events.append)
            print("a's events:", json.dumps(a_events))
    """)
    lines = out.stdout.splitlines()
    assert lines[:3] == ["a: started", "b: b done", "b's events: []"], out.stdout  # nothing of a's reaches b
    assert lines[3:5] == ["late line of session a", "a's next call"], out.stdout
    events = json.loads(lines[5].removeprefix("a's events: "))
    assert "".join(e["text"] for e in events if e["stream"] == "stdout") == "late line of session a\na's next call\n"
    assert "and a second one\n" in out.stderr
    assert re.search(r"\] stdout: late line of session a", worker_log(stack))  # the log has it too, tagged


@pytest.mark.parametrize("capacity", [1, 4])
def test_a_shared_pool_thread_prints_for_the_call_that_gave_it_the_task(stack: Stack, tmp_path: Path,
                                                                         capacity: int) -> None:
    """A thread pool shared by sessions (a library's) whose thread a call of session a started:
    a task session b's call submits there prints to b, as the task is b's."""
    stack.pool(f"p:strict_queue:capacity={capacity}", 1, "--no-dspy", "--capacity", str(capacity))
    out = client(stack, tmp_path, """
        def start_shared_pool():
            import builtins
            from concurrent.futures import ThreadPoolExecutor
            builtins.SHARED_POOL = ThreadPoolExecutor(1)
            builtins.SHARED_POOL.submit(print, "a's task").result()  # its thread starts in a's call

        def use_shared_pool():
            import builtins
            builtins.SHARED_POOL.submit(print, "b's task").result()

        with dspex.connect(FRONTEND) as dx:
            a, b = dx.session("p"), dx.session("p")
            a.run(start_shared_pool)
            b_events = []
            b.apply(use_shared_pool, on_output=b_events.append)
            print("b's events:", json.dumps(b_events))
            a_events = []
            a.apply(int, on_output=a_events.append)
            print("a's events:", json.dumps(a_events))
    """)
    lines = out.stdout.splitlines()
    assert lines[0] == "a's task"
    assert json.loads(lines[-2].removeprefix("b's events: ")) == [{"stream": "stdout", "text": "b's task\n"}]
    assert json.loads(lines[-1].removeprefix("a's events: ")) == []


def sleeps_then_says_stopped(marker: str) -> None:
    try:
        Path(marker).touch()
        time.sleep(100)
    finally:
        print("stopped")


def counts(n: int) -> Any:
    yield from range(n)


def test_what_a_call_prints_as_ctrl_c_stops_it_shows_before_the_next_call_whichever_socket_it_takes(
        stack: Stack, capsys: Any, tmp_path: Path) -> None:
    """A call stopped by Ctrl-C prints in its ``finally`` after the client stopped waiting; in-process
    that line comes before the next call's output. Here it arrives on the stopped call's socket, so
    the next request must read that socket first, even when another socket went back to the
    client's idle ones after it (a stream of another session ended, as its garbage collection may
    end it at any moment)."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s, other = dx.session("p"), dx.session("p")
    stream = other.stream_apply(counts, [100])
    assert next(stream) == 0  # its socket is lent to it
    marker = str(tmp_path / "sleeping")

    def interrupt_once_asleep() -> None:
        wait_for(lambda: os.path.exists(marker), timeout=30, what="the call asleep")
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_once_asleep)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            s.run(sleeps_then_says_stopped, marker)
    finally:
        interrupter.join()
    stream.close()  # its socket goes back to the idle ones after the stopped call's
    s.run(print, "next")
    assert capsys.readouterr().out == "stopped\nnext\n"


def errors_on_warnings() -> None:
    warnings.simplefilter("error")


def warns() -> str:
    try:
        warnings.warn("careful", UserWarning)
    except UserWarning:
        return "raised"
    return "warned"


@pytest.mark.parametrize(("how", "capacity"), [("code", 1), ("call", 1), ("code", 4)])
def test_the_warning_filters_a_sessions_code_sets_are_its_own(stack: Stack, how: str, capacity: int) -> None:
    """In-process a filter holds for the program's later code: the session's later calls; never
    another session's on the same worker (it raised their warnings into their code)."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", str(capacity))
    mine, other = dx.session("p"), dx.session("p")
    with warnings.catch_warnings(record=True) as shown_here:  # a warning shown there shows here
        assert other.run(warns) == "warned"
        if how == "code":
            mine.run(errors_on_warnings)
        else:
            mine.run(warnings.simplefilter, "error")
        assert mine.run(warns) == "raised"
        assert other.run(warns) == "warned" and dx.session("p").run(warns) == "warned"
        mine.run(warnings.resetwarnings)
        assert mine.run(warns) == "warned"
    assert [(w.category, str(w.message)) for w in shown_here] == [(UserWarning, "careful")] * 4


def shown(message: str) -> int:
    """How many warnings ``warnings.warn(message)`` shows under the filters in force."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn(message, UserWarning)
    return len(seen)


# a library's module (not the session's code) that adds a filter, as some do when imported
LIBRARY_SETUP = """
import types
lib = types.ModuleType("noisylib")
exec("import warnings\\ndef setup():\\n    warnings.filterwarnings('ignore', message='lib noise')", vars(lib))
lib.setup()
"""


def test_a_filter_a_library_adds_in_a_sessions_call_is_every_sessions(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    mine, other = dx.session("p"), dx.session("p")
    mine.run(errors_on_warnings)  # the session has filters of its own: the library's goes to both
    mine.exec(LIBRARY_SETUP)
    assert mine.run(shown, "lib noise") == 0 and mine.run(warns) == "raised"
    assert other.run(shown, "lib noise") == 0 and other.run(shown, "other text") == 1
