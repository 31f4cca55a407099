"""Durable sessions through real processes: a broker, workers with DSPy, a client.

The session's program is a ChainOfThought with 4 demos answered by a ``DummyLM`` holding a list
of answers that it hands out in order: the answer a call gets after a move proves the session
still talks to its own LM, and that the LM went on from where it was (a rebuilt LM would start
again at answer 0).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import warnings
from typing import Any

import pytest

import dspex
from dspex.client.sendcache import SendCache
from tests.harness import Stack, wait_for

pytest.importorskip("dspy")
pytestmark = pytest.mark.timeout(120)

ANSWERS = [{"reasoning": f"step {i}", "answer": f"answer {i}"} for i in range(50)]
SETUP = """
import dspy
from dspy.utils import DummyLM
lm = DummyLM(answers)
dspy.configure(lm=lm)
cot = dspy.ChainOfThought("question -> answer")
cot.predict.demos = [dspy.Example(question=f"q{i}", reasoning=f"r{i}", answer=f"a{i}").with_inputs("question")
                     for i in range(4)]
"""


def typical(s: dspex.Session, n: int = 50) -> dict[str, dspex.Ref]:
    """The session's program: its LM (``n`` answers) and ChainOfThought as refs."""
    answers = ANSWERS if n == len(ANSWERS) else [{"reasoning": f"step {i}", "answer": f"answer {i}"} for i in range(n)]
    made = s.exec(SETUP, {"answers": answers})
    return {"lm": made["lm"], "cot": made["cot"]}


def ask(s: dspex.Session, cot: dspex.Ref, question: str) -> str:
    return str(s.method(cot, "__call__", kwargs={"question": question}).answer)


def state_of(s: dspex.Session, refs: dict[str, dspex.Ref]) -> dict[str, Any]:
    """What the session holds, read through the same refs."""
    return s.eval("{'demos': [d.toDict() for d in cot.predict.demos], 'instructions': cot.predict.signature.instructions,"
                  " 'fields': list(cot.predict.signature.fields), 'history': len(lm.history),"
                  " 'same_lm': dspy.settings.lm is lm, 'pid': __import__('os').getpid()}",
                  {"cot": refs["cot"], "lm": refs["lm"]})


def pid_of(s: dspex.Session) -> int:
    return int(s.eval("__import__('os').getpid()"))


def gone(dx: dspex.Client, pool: str, pid: int) -> None:
    """Until the broker has seen worker ``pid`` go (a call sent before that races the kill and may
    get WorkerCrashed, as any call in flight when its worker dies)."""
    wait_for(lambda: pid not in {w["pid"] for w in dx.status()["pools"][pool]["workers"]}, what=f"worker {pid} gone")


def test_kill_9_of_the_pinned_worker_moves_the_session_with_its_state(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 2)
    s = dx.session("p", durable=True)
    refs = typical(s)
    assert ask(s, refs["cot"], "first") == "answer 0"
    before = state_of(s, refs)
    stack.kill(before["pid"])
    gone(dx, "p", before["pid"])
    assert ask(s, refs["cot"], "second") == "answer 1"  # its own LM, moved on by one answer
    after = state_of(s, refs)
    assert after["pid"] != before["pid"]
    assert {k: v for k, v in after.items() if k != "pid"} == {**{k: v for k, v in before.items() if k != "pid"},
                                                               "history": 2}
    assert after["same_lm"] and len(after["demos"]) == 4
    (row,) = [r for r in dx.sessions("p") if r["id"] == s.id]
    assert row["durable"] and row["checkpoint_bytes"] > 0 and row["checkpoint_age_s"] is not None


def test_functions_made_together_share_their_cell_after_a_move(stack: Stack, usercode: Any) -> None:
    """docs/remote-objects.md (closures): ``inc`` and ``get`` of one ``make_counter()`` share the
    counter in the session; moved (kill -9 of its worker), the session keeps it shared, between
    functions sent before the move and with one first sent after it."""
    mod = usercode('''
        def make_counter():
            n = 0

            def inc():
                nonlocal n
                n += 1
                return n

            def get():
                return n

            return inc, get
    ''')
    dx = stack.pool("p:strict_queue", 2)
    s = dx.session("p", durable=True)
    inc, get = mod.make_counter()
    inc_first, get_after = mod.make_counter()
    assert [s.run(inc), s.run(inc), s.run(get), s.run(inc_first)] == [1, 2, 2, 1]
    pid = pid_of(s)
    stack.kill(pid)
    gone(dx, "p", pid)
    assert [s.run(inc), s.run(get)] == [3, 3]
    assert [s.run(get_after), s.run(inc_first), s.run(get_after)] == [1, 2, 2]
    assert pid_of(s) != pid


def test_an_object_that_cannot_be_durable_is_named_when_it_enters_and_gone_after_a_move(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 2)
    s = dx.session("p", durable=True)
    kept = s.put({"plain": [1, 2, 3]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lock = s.call("threading", "Lock")
    said = [str(w.message) for w in caught if issubclass(w.category, dspex.NotDurableWarning)]
    assert len(said) == 1 and f"ref {lock.id[:8]} (_thread.lock) is not durable" in said[0], said
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        holder = s.eval("__import__('types').SimpleNamespace(name='cfg', parts=[1, __import__('threading').Lock()])")
    said = [str(w.message) for w in caught if issubclass(w.category, dspex.NotDurableWarning)]
    assert isinstance(holder, dspex.Ref) and len(said) == 1, said
    assert "cannot pickle '_thread.lock' object at .parts[1] (_thread.lock)" in said[0], said  # where, inside
    pid = pid_of(s)
    stack.kill(pid)
    gone(dx, "p", pid)
    assert s.eval("x['plain']", {"x": kept}) == [1, 2, 3]
    with pytest.raises(dspex.RefNotFound, match=r"not durable \(TypeError: cannot pickle '_thread.lock' object\)"):
        s.eval("x.locked()", {"x": lock})


def test_a_session_over_its_checkpoint_cap_gets_a_clear_error_and_stays_usable(stack: Stack) -> None:
    stack.start_broker("p:strict_queue", extra=["--checkpoint-cap", "0.1"])
    stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 1)
    dx = stack.client()
    s = dx.session("p", durable=True)
    small = s.put([1, 2, 3])
    with pytest.raises(dspex.SessionNotDurable, match="over the per-session cap of 102.4 KB") as info:
        s.put(os.urandom(200_000))
    assert info.value.details["ran"] is True
    assert s.eval("x + [4]", {"x": small}) == [1, 2, 3, 4]  # a plain session now
    (row,) = dx.sessions("p")
    assert row["durable"] is False
    # and the worker lets go of what it kept of the session's checkpoint (up to the cap, in memory)
    assert s.apply(holds_a_checkpoint) is False


def test_a_failed_call_whose_checkpoint_is_refused_says_its_own_error_too(stack: Stack) -> None:
    """The refusal replaces the call's reply; a call that raised would lose its error with it."""
    stack.start_broker("p:strict_queue", extra=["--checkpoint-cap", "0.1"])
    stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 1)
    s = stack.client().session("p", durable=True)
    with pytest.raises(dspex.SessionNotDurable, match="over the per-session cap") as info:
        s.exec("import os\nbig = os.urandom(200_000)\nraise ValueError('the tickets file is empty')\n")
    assert "The call itself failed: ValueError: the tickets file is empty" in str(info.value)
    assert info.value.details["call_error"] == "ValueError: the tickets file is empty"
    assert info.value.details["ran"] is True
    assert s.eval("len(big)") == 200_000  # the session goes on, plain, with what the call did


def holds_a_checkpoint() -> bool:
    from worker.dspy_settings import current_session

    state = current_session.get()
    assert state is not None
    return state.checkpoint is not None


def test_a_corrupt_checkpoint_is_refused_the_session_reported_lost_and_nothing_crashes(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p", durable=True)
    other = dx.session("p", durable=True)
    s.put([1, 2, 3])
    other.put("fine")
    pid = pid_of(s)
    path = os.path.join(stack.run_dir, "checkpoints.sqlite")
    with sqlite3.connect(path) as db:  # the disk under the broker rots: one byte of the state flips
        (skeleton,) = db.execute("SELECT skeleton FROM sessions WHERE id = ?", (s.id,)).fetchone()
        rotten = skeleton[:-3] + bytes([skeleton[-3] ^ 0x40]) + skeleton[-2:]
        db.execute("UPDATE sessions SET skeleton = ? WHERE id = ?", (rotten, s.id))
    stack.kill(pid)
    gone(dx, "p", pid)
    with pytest.raises(dspex.CheckpointRefused, match="is corrupt") as info:
        s.eval("1")
    assert info.value.details["session"] == s.id
    with pytest.raises(dspex.CheckpointRefused):
        s.eval("1")  # lost, from now on
    assert other.eval("1 + 1") == 2  # the broker and the worker go on
    assert len(stack.workers("p")) == 1 and stack.broker is not None and stack.broker.poll() is None
    fresh = dx.session("p", durable=True)
    assert fresh.eval("2 + 2") == 4


def test_the_asyncio_client_opens_durable_sessions_too_and_closing_deletes_the_checkpoint(stack: Stack) -> None:
    import asyncio

    stack.pool("p:strict_queue", 2, "--no-dspy")
    path = os.path.join(stack.run_dir, "checkpoints.sqlite")

    def stored() -> set[str]:
        with sqlite3.connect(path) as db:
            return {row[0] for row in db.execute("SELECT id FROM sessions")}

    async def main() -> None:
        async with dspex.aio.connect(stack.frontend, timeout=30) as dx:
            s = dx.session("p", durable=True)
            box = await s.put({"n": 1})
            await s.exec("counter = 41")
            pid = int(await s.eval("__import__('os').getpid()"))
            assert s.id in stored()
            stack.kill(pid)
            async with asyncio.timeout(15):
                while pid in {w["pid"] for w in (await dx.status())["pools"]["p"]["workers"]}:
                    await asyncio.sleep(0.01)  # (as gone(): the broker has seen the kill)
            assert await s.eval("counter + 1") == 42  # moved, with its namespace
            assert await s.eval("b['n']", {"b": box}) == 1  # and the same ref
            assert int(await s.eval("__import__('os').getpid()")) != pid
            await s.close()
        assert s.id not in stored()

    asyncio.run(main())


def test_a_ref_released_before_a_move_is_gone_after_it_and_the_error_says_why(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p", durable=True)
    kept, dropped = s.put({"k": 1}), s.put({"d": 2})
    s.release(dropped)
    pid = pid_of(s)
    stack.kill(pid)
    gone(dx, "p", pid)
    assert s.eval("x['k']", {"x": kept}) == 1
    with pytest.raises(dspex.RefNotFound, match=r"not in its session's checkpoint \(released, or made by a call"):
        s.eval("x", {"x": dropped})


STUBBORN = """
import time
def stubborn():
    global counter
    counter = 1000  # an effect of the call that its worker's end takes with it
    while True:
        try:
            time.sleep(60)
        except BaseException:
            pass
"""


def test_a_call_past_its_hard_limit_moves_the_session_without_its_effects_and_says_so(stack: Stack) -> None:
    stack.env["DSPEX_HARD_GRACE"] = "0.5"
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p", durable=True)
    s.exec("counter = 41" + STUBBORN)
    with pytest.raises(dspex.Timeout, match="the session moves with its last checkpoint") as info:
        s.eval("stubborn()", timeout=0.5)
    assert info.value.details["hard"] is True and "objects are lost" not in info.value.message
    assert s.eval("counter") == 41  # none of the call's effects


REBOUND = '''
import os
import time

X = 1
Y = 1


def get_x():
    return X


def get_y():
    return Y


def hold_then_x(gate):
    """Read X after the file ``gate + ".running"`` was written and ``gate`` appeared (or 30 s); its
    output tells the client the worker loaded the request."""
    print("holding", flush=True)
    open(gate + ".running", "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return X
'''


def test_module_globals_rebound_before_a_kill_9_are_the_clients_latest_after_the_move(
        stack: Stack, usercode: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A durable session's rebound globals after its worker is SIGKILLed: ``Y`` (rebound by a call
    that finished, so in the checkpoint) and ``X`` (carried by the call the kill ended: loaded, the
    client was told, by the dead worker only) are both the client's latest on the new worker. The
    restored store holds the checkpoint's binding version: a call relying on ``X``'s is refused
    there (CodeCacheMiss) and sent again with every binding changed since, never run with the
    checkpoint's older value. Another session object on the session id (its own binding versions)
    reads them too."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    mod = usercode(REBOUND)
    s = dx.session("p", durable=True)
    caught_up: list[int] = []  # the binding versions a refusing store held (the resends' catch-ups)
    changed_since = SendCache.changed_since
    monkeypatch.setattr(SendCache, "changed_since",
                        lambda cache, version: caught_up.append(version) or changed_since(cache, version))
    assert (s.run(mod.get_x), s.run(mod.get_y)) == (1, 1)
    mod.Y = 2
    assert s.run(mod.get_y) == 2
    pid = pid_of(s)
    gate = str(tmp_path / "gate")
    mod.X = 3

    def kill_once_loaded() -> None:  # the client counts X's binding as the worker's: it heard the call's output
        wait_for(lambda: os.path.exists(gate + ".running") and not s.sender.globals.unconfirmed, 30, what="the call loaded")
        stack.kill(pid)

    with pytest.raises(dspex.WorkerCrashed):
        killer = threading.Thread(target=kill_once_loaded)
        killer.start()
        try:
            s.run(mod.hold_then_x, gate)
        finally:
            killer.join(40)
    gone(dx, "p", pid)
    assert (s.run(mod.get_x), s.run(mod.get_y)) == (3, 2)
    assert len(caught_up) == 1  # refused once, at the checkpoint's version: X's change went again
    assert pid_of(s) != pid
    other = dx.session("p", s.id)
    assert (other.run(mod.get_x), other.run(mod.get_y)) == (3, 2)
    mod.X, mod.Y = 4, 5
    assert (s.run(mod.get_x), s.run(mod.get_y)) == (4, 5)


class Tag:
    """A class of this module (``from __future__ import annotations``) that a model made on the
    worker names in a string annotation."""

    def __init__(self, name: str) -> None:
        self.name = name


def tagged() -> tuple[str, int]:
    import pydantic

    class Ticket(pydantic.BaseModel, arbitrary_types_allowed=True):
        tag: Tag
        parent: Ticket | None = None

    ticket = Ticket(tag=Tag("t"), parent=Ticket(tag=Tag("p")))
    return ticket.parent.tag.name if ticket.parent else "", os.getpid()


def test_a_class_made_after_a_move_resolves_its_annotations_in_the_restored_module(stack: Stack) -> None:
    """The restored worker's copy of this module is where a model made in the program looks its
    annotations' names up (the restore makes the copy: the client does not send the module again)."""
    dx = stack.pool("p:strict_queue", 2)
    s = dx.session("p", durable=True)
    name, pid = s.run(tagged)
    assert name == "p"
    stack.kill(pid)
    gone(dx, "p", pid)
    name, moved_to = s.run(tagged)
    assert name == "p" and moved_to != pid


def test_a_global_left_out_of_its_module_is_still_explained_after_a_move(stack: Stack, usercode: Any) -> None:
    """A module used as a module goes whole but for a global that cannot be pickled (a lock no
    call reads): code that reaches it gets a NameError noting why it is not there, and after the
    durable session's worker is SIGKILLed the same note comes from the worker it moved to (the
    reasons the client gave went with the checkpoint)."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    store = usercode("""
        import threading

        _LOCK = threading.Lock()
        ITEMS = []


        def add(x):
            ITEMS.append(x)
            return len(ITEMS)


        def add_locked(x):
            with _LOCK:
                ITEMS.append(x)
    """)
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(f"import {store.__name__} as store\n"  # noqa: S102 - a script using the app's module
                 "def add(x):\n    return store.add(x)\n"
                 "def add_locked(x):\n    return store.add_locked(x)\n", "<script>", "exec"), ns)
    why = f"dspex: _LOCK was not sent with its module: cannot send _LOCK (_thread.lock) from module {store.__name__}"
    s = dx.session("p", durable=True)
    assert s.run(ns["add"], "a") == 1
    with pytest.raises(NameError) as before:
        s.run(ns["add_locked"], "b")
    assert why in "\n".join(getattr(before.value, "__notes__", [])), before.value
    pid = pid_of(s)
    stack.kill(pid)
    gone(dx, "p", pid)
    with pytest.raises(NameError) as after:
        s.run(ns["add_locked"], "c")
    assert pid_of(s) != pid
    assert why in "\n".join(getattr(after.value, "__notes__", [])), after.value
    assert s.run(ns["add"], "d") == 2  # the module's state moved with it
