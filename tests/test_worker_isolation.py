"""Per-session DSPy settings on one worker, for every way code changes them, capacity 1 and 4."""

from __future__ import annotations

import textwrap
import threading

import pytest

import dspex
from tests.harness import Stack

SPELLINGS = {
    "dspy.configure": "dspy.configure(lm=lm)",
    "dspy.settings.configure": "dspy.settings.configure(lm=lm)",
    "dspy.settings.lm =": "dspy.settings.lm = lm",
}

SETUP = textwrap.dedent("""
    import threading, time
    import dspy
    from dspy.utils import DummyLM
    lm = DummyLM([{{"answer": {answer!r}}}] * 20)
    qa = dspy.Predict("question -> answer")
""")


def _session(dx: dspex.Client, answer: str) -> dspex.Session:
    s = dx.session("p")
    s.exec(SETUP.format(answer=answer))
    return s


@pytest.mark.parametrize("capacity", [1, 4])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_settings_are_per_session(stack: Stack, capacity: int, spelling: str) -> None:
    dx = stack.pool("p:strict_queue", 1, "--capacity", str(capacity))
    a, b = _session(dx, "from a"), _session(dx, "from b")
    a.exec(SPELLINGS[spelling])
    b.exec(SPELLINGS[spelling])
    assert a.eval("qa(question='q').answer") == "from a"
    assert b.eval("qa(question='q').answer") == "from b"
    assert a.eval("dspy.settings.lm is lm") and b.eval("dspy.settings.lm is lm")
    fresh = dx.session("p")
    assert fresh.eval("__import__('dspy').settings.lm") is None  # a new session sees no LM
    assert a.call("os", "getpid") == fresh.call("os", "getpid")  # all on one worker
    if capacity > 1:  # at the same time, on two pool threads
        results: dict[str, object] = {}

        def run(name: str, s: dspex.Session) -> None:
            results[name] = s.eval("[time.sleep(0.3), qa(question='q').answer][1]")

        threads = [threading.Thread(target=run, args=(n, s)) for n, s in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == {"a": "from a", "b": "from b"}


@pytest.mark.parametrize("capacity", [1, 4])
def test_dspy_context_is_scoped(stack: Stack, capacity: int) -> None:
    dx = stack.pool("p:strict_queue", 1, "--capacity", str(capacity))
    a = _session(dx, "ctx")
    seen = a.exec(textwrap.dedent("""
        with dspy.context(lm=lm):
            inside = qa(question='q').answer
        after = dspy.settings.lm
    """))
    assert seen["inside"] == "ctx" and seen["after"] is None
    assert a.eval("dspy.settings.lm") is None


def test_threads_user_code_starts_see_the_session_settings_on_capacity_1(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1)
    a = _session(dx, "threaded")
    a.exec("dspy.configure(lm=lm)")
    out = a.exec(textwrap.dedent("""
        out = []
        t = threading.Thread(target=lambda: out.append(qa(question='q').answer))
        t.start(); t.join()
    """))["out"]
    assert out == ["threaded"]
    # what the thread's LM call recorded is in the session's own history
    assert "threaded" in a.exec("import io\nbuf = io.StringIO()\ndspy.inspect_history(n=1, file=buf)\n"
                                "shown = buf.getvalue()")["shown"]
    # after the call the process configuration is DSPy's default again
    fresh = dx.session("p")
    assert fresh.exec(textwrap.dedent("""
        import threading, dspy
        seen = []
        t = threading.Thread(target=lambda: seen.append(dspy.settings.lm))
        t.start(); t.join()
    """))["seen"] == [None]


def test_lm_history_is_per_session(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1)
    a, b = _session(dx, "for a"), _session(dx, "for b")
    for s, secret in ((a, "secret of a"), (b, "secret of b")):
        s.exec("dspy.configure(lm=lm)")
        s.exec(f"qa(question={secret!r})")
    show = "import io\nbuf = io.StringIO()\ndspy.inspect_history(n=10, file=buf)\nshown = buf.getvalue()"
    shown_a, shown_b = a.exec(show)["shown"], b.exec(show)["shown"]
    assert "secret of a" in shown_a and "secret of b" not in shown_a
    assert "secret of b" in shown_b and "secret of a" not in shown_b
    assert dx.session("p").exec(show.replace("import io", "import io, dspy"))["shown"].strip() == ""


@pytest.mark.parametrize("capacity", [1, 4])
def test_a_thread_left_running_keeps_its_sessions_settings(stack: Stack, capacity: int, tmp_path) -> None:
    """A thread one session's call started and left running reads DSPy's settings while another
    session's call runs: it sees its own session's LM (in-process: its program's), never the other
    session's (its LM, its API key)."""
    dx = stack.pool("p:strict_queue", 1, "--capacity", str(capacity))
    a, b = _session(dx, "from a"), _session(dx, "from b")
    flags = str(tmp_path)
    a.exec("dspy.configure(lm=lm)")
    a.exec(textwrap.dedent(f"""
        import os
        seen = []
        def watch():
            while not os.path.exists(os.path.join({flags!r}, "b-running")):
                time.sleep(0.01)
            seen.append(qa(question='q').answer)
            open(os.path.join({flags!r}, "a-read"), "w").close()
        threading.Thread(target=watch, daemon=True).start()
    """))
    b.exec("dspy.configure(lm=lm)")
    b.exec(textwrap.dedent(f"""
        import os
        open(os.path.join({flags!r}, "b-running"), "w").close()
        deadline = time.monotonic() + 20
        while not os.path.exists(os.path.join({flags!r}, "a-read")) and time.monotonic() < deadline:
            time.sleep(0.01)
    """))
    assert a.eval("seen") == ["from a"]


@pytest.mark.parametrize("capacity", [1, 4])
def test_a_thread_a_call_starts_inherits_no_context_variable_of_the_users(stack: Stack, capacity: int) -> None:
    """In-process a new thread starts with an empty context: a ContextVar set before its start
    reads its default there. The same on the worker, where the thread still carries its call."""
    dx = stack.pool("p:strict_queue", 1, "--capacity", str(capacity))
    a = _session(dx, "threaded")
    a.exec("dspy.configure(lm=lm)")
    source = textwrap.dedent("""
        import contextvars, threading
        REQUEST = contextvars.ContextVar("request", default="none")
        REQUEST.set("set in the call")
        seen = []
        t = threading.Thread(target=lambda: seen.append((REQUEST.get(), qa(question='q').answer)))
        t.start(); t.join()
    """)
    in_process: dict[str, object] = {}
    exec(compile(SETUP.format(answer="threaded") + "dspy.configure(lm=lm)\n", "<setup>", "exec"), in_process)  # noqa: S102
    try:
        exec(compile(source, "<case>", "exec"), in_process)  # noqa: S102 - the same code in-process
    finally:
        in_process["dspy"].configure(lm=None)  # type: ignore[attr-defined]
    assert in_process["seen"] == [("none", "threaded")]
    assert a.exec(source)["seen"] == [("none", "threaded")]
