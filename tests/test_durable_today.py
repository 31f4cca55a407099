"""Durable sessions carrying what landed beside them: a client's DSPy setting changed in place
(lmk17), history mirrored to the client (hist14/hist17), a stream read ahead while another call
of the session runs (explore17), type annotations returned as values. Real broker and workers,
the pinned worker SIGKILLed by pid, the broker SIGKILLed and restarted on the same run dir."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import dspy
import pytest

import dspex
from dspex.client.sendcache import SendCache
from tests.conformance.harness import fresh_dspy_settings
from tests.harness import Stack, wait_for
from tests.test_durable import gone, pid_of

pytestmark = pytest.mark.timeout(180)

SETTINGS = '''
import os, time
import dspy


def lm_state():
    lm = dspy.settings.lm
    return lm.model, lm.kwargs.get("temperature"), lm.kwargs.get("max_tokens")


def lm_id():
    return id(dspy.settings.lm), os.getpid()


def held_until(gate):
    """The LM's state, read once ``gate`` appeared (or 30 s); ``gate + ".running"`` says the call runs."""
    open(gate + ".running", "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return lm_state()


JUDGE = dspy.LM("openai/judge", api_key="k", cache=False)


def the_judge():
    return dspy.settings.lm is JUDGE, JUDGE.kwargs.get("temperature")


def adapter_and_callbacks():
    adapter = dspy.settings.adapter
    return adapter.use_native_function_calling, [type(c).__name__ for c in dspy.settings.callbacks]


class Recorder(dspy.utils.callback.BaseCallback):
    pass


class Counter(dspy.utils.callback.BaseCallback):
    pass


def judge_held_until(gate):
    held_until(gate)
    return the_judge()
'''


def _lm() -> dspy.LM:
    return dspy.LM("openai/m", api_key="k", cache=False, temperature=0.1, max_tokens=50)


def _count_misses(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each CodeCacheMiss (or load failure) the session's sender is told of."""
    misses: list[bool] = []
    missed = SendCache.missed
    monkeypatch.setattr(SendCache, "missed", lambda cache, ephemeral, failed=None:
                        misses.append(ephemeral) or missed(cache, ephemeral, failed))
    return misses


def _crashed_while_running(stack: Stack, pid: int, gate: str, call: Callable[[], Any]) -> None:
    """``call`` (a call that makes the file ``gate + ".running"``, then waits) fails with
    WorkerCrashed: its worker ``pid`` is killed once it runs."""

    def kill_once_running() -> None:
        wait_for(lambda: os.path.exists(gate + ".running"), 30, what="the call running")
        stack.kill(pid)

    killer = threading.Thread(target=kill_once_running)
    killer.start()
    try:
        with pytest.raises(dspex.WorkerCrashed):
            call()
    finally:
        killer.join(40)


def _move(stack: Stack, dx: dspex.Client, s: dspex.Session) -> int:
    pid = pid_of(s)
    stack.kill(pid)
    gone(dx, "p", pid)
    stack.start_worker("p")  # what a supervisor does: the pool keeps two workers
    stack.wait_workers("p", 2)
    return pid


def test_an_lm_changed_in_place_reaches_a_durable_session_across_kills(
        stack: Stack, usercode: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Changed before a kill (by a call that returned: in the checkpoint), between the kill and the
    next call, and after the move: each next call runs with the client's latest LM, and the
    session goes on by key: the restored worker holds what the client took as held (no cache miss),
    one LM object."""
    misses = _count_misses(monkeypatch)
    dx = stack.pool("p:strict_queue", 2)
    mod = usercode(SETTINGS)
    s = dx.session("p", durable=True)
    lm = _lm()
    with fresh_dspy_settings():
        dspy.configure(lm=lm)
        assert s.run(mod.lm_state) == ("openai/m", 0.1, 50)
        lm.kwargs["temperature"] = 0.7
        assert s.run(mod.lm_state) == ("openai/m", 0.7, 50)
        first = _move(stack, dx, s)
        assert s.run(mod.lm_state) == ("openai/m", 0.7, 50)
        lm.model = "openai/m2"
        assert s.run(mod.lm_state) == ("openai/m2", 0.7, 50)
        second = _move(stack, dx, s)
        lm.kwargs["max_tokens"] = 77  # changed while the session's worker is dead
        assert s.run(mod.lm_state) == ("openai/m2", 0.7, 77)
        assert pid_of(s) not in (first, second)
        lm.kwargs["temperature"] = 0.2
        assert s.run(mod.lm_state) == ("openai/m2", 0.2, 77)
        assert s.run(mod.lm_id) == s.run(mod.lm_id)
    assert misses == []


def test_an_lm_change_carried_by_the_call_a_kill_ended_is_not_lost(
        stack: Stack, usercode: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The call that carried ``temperature = 0.7`` was loaded (it ran) when its worker died: not
    in the checkpoint. The next call runs with 0.7 all the same, never the checkpoint's 0.1 (the
    restored worker lacks the key the change went under: one cache miss, then by key again)."""
    misses = _count_misses(monkeypatch)
    dx = stack.pool("p:strict_queue", 2)
    mod = usercode(SETTINGS)
    s = dx.session("p", durable=True)
    lm = _lm()
    gate = str(tmp_path / "gate")
    with fresh_dspy_settings():
        dspy.configure(lm=lm)
        assert s.run(mod.lm_state) == ("openai/m", 0.1, 50)
        pid = pid_of(s)
        lm.kwargs["temperature"] = 0.7
        _crashed_while_running(stack, pid, gate, lambda: s.run(mod.held_until, gate))
        gone(dx, "p", pid)
        assert s.run(mod.lm_state) == ("openai/m", 0.7, 50)
        assert len(misses) == 1
        lm.kwargs["temperature"] = 0.3
        assert s.run(mod.lm_state) == ("openai/m", 0.3, 50)
        assert s.run(mod.lm_id) == s.run(mod.lm_id)
    assert len(misses) == 1


def test_an_lm_that_is_also_a_global_stays_one_object_across_a_kill(stack: Stack, usercode: Any) -> None:
    dx = stack.pool("p:strict_queue", 2)
    mod = usercode(SETTINGS)
    s = dx.session("p", durable=True)
    with fresh_dspy_settings():
        dspy.configure(lm=mod.JUDGE)
        assert s.run(mod.the_judge) == (True, None)
        mod.JUDGE.kwargs["temperature"] = 0.5
        assert s.run(mod.the_judge) == (True, 0.5)
        _move(stack, dx, s)
        assert s.run(mod.the_judge) == (True, 0.5)
        mod.JUDGE.kwargs["temperature"] = 0.6
        assert s.run(mod.the_judge) == (True, 0.6)


def test_an_adapter_and_callbacks_changed_in_place_across_a_kill(stack: Stack, usercode: Any) -> None:
    dx = stack.pool("p:strict_queue", 2)
    mod = usercode(SETTINGS)
    s = dx.session("p", durable=True)
    with fresh_dspy_settings():
        adapter = dspy.ChatAdapter()
        dspy.configure(adapter=adapter, callbacks=[mod.Recorder()])
        assert s.run(mod.adapter_and_callbacks) == (False, ["Recorder"])
        adapter.use_native_function_calling = True
        dspy.settings.callbacks.append(mod.Counter())
        assert s.run(mod.adapter_and_callbacks) == (True, ["Recorder", "Counter"])
        _move(stack, dx, s)
        assert s.run(mod.adapter_and_callbacks) == (True, ["Recorder", "Counter"])
        dspy.settings.callbacks.pop(0)
        adapter.use_native_function_calling = False
        assert s.run(mod.adapter_and_callbacks) == (False, ["Counter"])


def test_an_lm_changed_in_place_across_a_broker_restart_then_a_worker_kill(stack: Stack, usercode: Any) -> None:
    dx = stack.pool("p:strict_queue", 2)
    mod = usercode(SETTINGS)
    s = dx.session("p", durable=True)
    lm = _lm()
    with fresh_dspy_settings():
        dspy.configure(lm=lm)
        assert s.run(mod.lm_state) == ("openai/m", 0.1, 50)
        lm.kwargs["temperature"] = 0.7
        assert s.run(mod.lm_state) == ("openai/m", 0.7, 50)
        assert stack.broker is not None
        stack.kill(stack.broker)
        stack.broker.wait(10)
        stack.start_broker()
        stack.wait_workers("p", 2)
        lm.kwargs["max_tokens"] = 60
        assert s.run(mod.lm_state) == ("openai/m", 0.7, 60)  # on its kept worker
        _move(stack, dx, s)
        assert s.run(mod.lm_state) == ("openai/m", 0.7, 60)
        lm.kwargs["temperature"] = 0.9
        assert s.run(mod.lm_state) == ("openai/m", 0.9, 60)


HISTORY = '''
import dspy

PROG = dspy.Predict("question -> answer")


def ask(question):
    return PROG(question=question).answer


def worker_history():
    return len(PROG.history), len(dspy.settings.lm.history)
'''


def test_history_mirrored_to_the_client_is_neither_lost_nor_doubled_by_a_move(stack: Stack, usercode: Any) -> None:
    """The client's module global Predict under the client's DummyLM: each call's entry comes back
    once, before and after the worker is SIGKILLed, as in-process; the worker's copies keep theirs."""
    from dspy.utils import DummyLM

    dx = stack.pool("p:strict_queue", 2)
    mod = usercode(HISTORY)
    s = dx.session("p", durable=True)
    lm = DummyLM([{"answer": f"a{i}"} for i in range(10)])
    with fresh_dspy_settings():
        dspy.configure(lm=lm)
        base = len(dspy.clients.base_lm.GLOBAL_HISTORY)
        assert [s.run(mod.ask, f"q{i}") for i in range(2)] == ["a0", "a1"]
        assert (len(mod.PROG.history), len(lm.history)) == (2, 2)
        _move(stack, dx, s)
        assert [s.run(mod.ask, f"q{i}") for i in range(2, 4)] == ["a2", "a3"]
        assert (len(mod.PROG.history), len(lm.history)) == (4, 4)
        assert len(dspy.clients.base_lm.GLOBAL_HISTORY) - base == 4
        assert s.run(mod.worker_history) == (4, 4)


def test_history_on_the_worker_stays_bounded_across_a_move(stack: Stack) -> None:
    """With ``--lm-history 3``: the session's LM, module and global histories hold 3 entries,
    restored as 3, and the next call keeps them at 3."""
    stack.start_broker("p:strict_queue")
    for _ in range(2):
        stack.start_worker("p", "--lm-history", "3")
    stack.wait_workers("p", 2)
    dx = stack.client()
    s = dx.session("p", durable=True)
    made = s.exec("import dspy\nfrom dspy.utils import DummyLM\nlm = DummyLM([{'answer': f'a{i}'} for i in range(20)])\n"
                  "dspy.configure(lm=lm)\np = dspy.Predict('question -> answer')\n")
    for i in range(5):
        assert s.method(made["p"], "__call__", kwargs={"question": f"q{i}"}).answer == f"a{i}"
    before = s.eval("(len(lm.history), len(p.history), len(dspy.clients.base_lm.GLOBAL_HISTORY))")
    assert before == (3, 3, 3)
    pid = pid_of(s)
    stack.kill(pid)
    gone(dx, "p", pid)
    assert s.eval("(len(lm.history), len(p.history), len(dspy.clients.base_lm.GLOBAL_HISTORY))") == before
    assert s.method(made["p"], "__call__", kwargs={"question": "q5"}).answer == "a5"
    after = s.eval("(len(lm.history), len(p.history), len(dspy.clients.base_lm.GLOBAL_HISTORY))")
    assert after == before, (before, after)


STREAM = '''
import os, time


def produce(gate):
    yield 0
    yield 1
    open(gate + ".running", "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    yield 2


def count(box):
    box["n"] += 1
    return box["n"]
'''


def test_a_kill_while_a_call_reads_a_held_stream_ahead(stack: Stack, usercode: Any, tmp_path: Any) -> None:
    """``stream = s.stream_apply(...)``, one ``next``, then a call of the session: the call reads
    the stream ahead, and the worker dies meanwhile. The stream gives what it got and then
    WorkerCrashed; the call runs after it, on the restored session (a move is what a durable
    session makes of a lost worker), with what every call that returned left."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    mod = usercode(STREAM)
    s = dx.session("p", durable=True)
    box = s.put({"n": 0})
    assert s.run(mod.count, box) == 1
    pid = pid_of(s)
    gate = str(tmp_path / "gate")
    stream = s.stream_apply(mod.produce, [gate])
    assert next(stream) == 0

    killer = threading.Thread(target=_kill_once_held, args=(stack, pid, gate, stream))
    killer.start()
    try:
        got = s.run(mod.count, box)
    finally:
        killer.join(40)
    assert got == 2
    assert pid_of(s) != pid
    rest: list[Any] = []
    with pytest.raises(dspex.WorkerCrashed):
        rest.extend(stream)
    assert rest == [1]
    assert s.run(mod.count, box) == 3


TYPES = '''
from typing import Literal, Optional
import pydantic


class Item(pydantic.BaseModel):
    name: str


def keep(box):
    box["ann"] = Optional[Item]
    box["many"] = list[Item]
    box["lit"] = Literal["a", "b"]
    box["item"] = Item(name="x")


def annotations(box):
    return box["ann"], box["many"], box["lit"]
'''


def test_type_annotations_come_back_as_values_after_a_move(stack: Stack, usercode: Any) -> None:
    from typing import Literal, Optional

    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    mod = usercode(TYPES)
    s = dx.session("p", durable=True)
    box = s.put({})
    s.run(mod.keep, box)
    expected = (Optional[mod.Item], list[mod.Item], Literal["a", "b"])  # noqa: UP045 - as the session's code made it
    assert s.run(mod.annotations, box) == expected
    _move(stack, dx, s)
    got = s.run(mod.annotations, box)
    assert got == expected
    assert got[0].__args__[0] is mod.Item
    assert s.eval("b['item']", {"b": box}) == mod.Item(name="x")


MAIN_SCRIPT = '''
import json, os, sys
from typing import Optional

import dspy
import pydantic

import dspex


class Tally:
    def __init__(self):
        self.seen = []

    def add(self, x):
        self.seen.append(x)
        return len(self.seen)


class Pair(pydantic.BaseModel):
    a: int
    b: int


class QA(dspy.Signature):
    """Answer tersely."""
    question: str = dspy.InputField()
    answer: Optional[Pair] = dspy.OutputField()


def total(tally, pair):
    return tally.add(pair.a + pair.b), Optional[Pair], Pair(a=len(tally.seen), b=0)


def fields():
    return QA.instructions, list(QA.fields), QA.output_fields["answer"].annotation


with dspex.connect(sys.argv[1], timeout=60) as dx:
    s = dx.session("p", durable=True)
    tally = s.put(Tally())
    keep = s.put([QA, Pair(a=1, b=2)])
    out = {"before": s.run(total, tally, Pair(a=1, b=2))[0]}
    print(json.dumps({"pid": s.eval("__import__('os').getpid()")}), flush=True)
    sys.stdin.readline()  # the parent killed that worker
    n, ann, pair = s.run(total, tally, Pair(a=3, b=4))
    held = s.eval("k", {"k": keep})
    out.update(after=n, seen=s.eval("t.seen", {"t": tally}), ann=ann == Optional[Pair] and ann.__args__[0] is Pair,
               pair=type(pair) is Pair and pair.a == 2, held=held[0] is QA and type(held[1]) is Pair,
               fields=fields() == s.run(fields), ref_type=s.eval("type(t).__name__", {"t": tally}),
               pid=s.eval("__import__('os').getpid()"))
print(json.dumps(out))
'''


def test_classes_of_the_clients_main_held_in_a_durable_session_survive_a_kill(stack: Stack, tmp_path: Any) -> None:
    dx = stack.pool("p:strict_queue", 2)
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), stack.frontend], env=stack.env, cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        pid = json.loads(line)["pid"]
        stack.kill(pid)
        gone(dx, "p", pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err[-3000:]
    got = json.loads(out.strip().splitlines()[-1])
    assert got["pid"] != pid
    assert {k: v for k, v in got.items() if k != "pid"} == {
        "before": 1, "after": 2, "seen": [3, 7], "ann": True, "pair": True, "held": True, "fields": True,
        "ref_type": "Tally"}


def test_a_change_of_an_lm_that_is_also_a_global_carried_by_the_call_a_kill_ended(
        stack: Stack, usercode: Any, tmp_path: Any) -> None:
    dx = stack.pool("p:strict_queue", 2)
    mod = usercode(SETTINGS)
    s = dx.session("p", durable=True)
    gate = str(tmp_path / "gate")
    with fresh_dspy_settings():
        dspy.configure(lm=mod.JUDGE)
        assert s.run(mod.the_judge) == (True, None)
        pid = pid_of(s)
        mod.JUDGE.kwargs["temperature"] = 0.5
        _crashed_while_running(stack, pid, gate, lambda: s.run(mod.judge_held_until, gate))
        gone(dx, "p", pid)
        assert s.run(mod.the_judge) == (True, 0.5)
        mod.JUDGE.kwargs["temperature"] = 0.6
        assert s.run(mod.the_judge) == (True, 0.6)


def test_an_asyncio_clients_call_reading_a_held_stream_ahead_through_a_kill(
        stack: Stack, usercode: Any, tmp_path: Any) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    mod = usercode(STREAM)
    gate = str(tmp_path / "gate")

    async def main() -> tuple[Any, ...]:
        async with dspex.aio.connect(dx.endpoint, timeout=30) as adx:
            s = adx.session("p", durable=True)
            box = await s.put({"n": 0})
            assert await s.run(mod.count, box) == 1
            pid = await s.eval("__import__('os').getpid()")
            stream = s.stream_apply(mod.produce, [gate])
            assert await stream.__anext__() == 0
            killer = threading.Thread(target=_kill_once_held, args=(stack, pid, gate, stream))
            killer.start()
            try:
                got = await s.run(mod.count, box)
            finally:
                killer.join(40)
            rest: list[Any] = []
            with pytest.raises(dspex.WorkerCrashed):
                async for item in stream:
                    rest.append(item)
            return pid, got, rest, await s.run(mod.count, box), await s.eval("__import__('os').getpid()")

    pid, got, rest, then, now = asyncio.run(main())
    assert (got, rest, then) == (2, [1], 3)
    assert now != pid


def test_a_broker_kill_while_a_call_reads_a_held_stream_ahead(stack: Stack, usercode: Any, tmp_path: Any) -> None:
    """The broker dies while the call reads the stream ahead (the worker lives on): the stream
    ends with a typed error (the connection to its request is lost) within the client's timeout,
    and the call runs once a broker is back, on the session's kept worker, with its state."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    mod = usercode(STREAM)
    s = dx.session("p", durable=True)
    box = s.put({"n": 0})
    assert s.run(mod.count, box) == 1
    gate = str(tmp_path / "gate")
    stream = s.stream_apply(mod.produce, [gate])
    assert next(stream) == 0

    restarter = threading.Thread(target=_restart_once_held, args=(stack, gate, stream))
    restarter.start()
    try:
        got = s.run(mod.count, box)
    finally:
        restarter.join(40)
    rest: list[Any] = []
    with pytest.raises(dspex.ConnectionLost):
        rest.extend(stream)
    assert rest == [1]
    assert got == 2
    assert s.run(mod.count, box) == 3


def _kill_once_held(stack: Stack, pid: int, gate: str, stream: Any) -> None:
    """SIGKILL worker ``pid`` once the producer holds at ``gate`` and the client read item 1 ahead."""
    wait_for(lambda: os.path.exists(gate + ".running") and len(stream._taken_in) == 1, 30,
             what="the producer held, item 1 read ahead")
    stack.kill(pid)


def _restart_once_held(stack: Stack, gate: str, stream: Any) -> None:
    """SIGKILL the broker once the producer holds at ``gate`` and the client read item 1 ahead,
    start another on the same run dir, then let the producer end (the session's worker runs it
    still: the session's next call waits for it, as after any broker restart)."""
    wait_for(lambda: os.path.exists(gate + ".running") and len(stream._taken_in) == 1, 30, what="the producer held")
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.broker.wait(10)
    stack.start_broker()
    open(gate, "w").close()


def test_a_broker_kill_while_an_asyncio_clients_call_reads_a_held_stream_ahead(
        stack: Stack, usercode: Any, tmp_path: Any) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    mod = usercode(STREAM)
    gate = str(tmp_path / "gate")

    async def main() -> tuple[Any, ...]:
        async with dspex.aio.connect(dx.endpoint, timeout=30) as adx:
            s = adx.session("p", durable=True)
            box = await s.put({"n": 0})
            assert await s.run(mod.count, box) == 1
            stream = s.stream_apply(mod.produce, [gate])
            assert await stream.__anext__() == 0
            restarter = threading.Thread(target=_restart_once_held, args=(stack, gate, stream))
            restarter.start()
            try:
                got = await s.run(mod.count, box)
            finally:
                restarter.join(40)
            rest: list[Any] = []
            with pytest.raises(dspex.ConnectionLost):
                async for item in stream:
                    rest.append(item)
            return got, rest, await s.run(mod.count, box)

    assert asyncio.run(main()) == (2, [1], 3)
