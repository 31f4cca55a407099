"""One client shared by many threads and asyncio tasks, sessions shared by them: the same answers
as the same code run in-process with threads and tasks.

User code lives in modules written to a temp dir that only this process has on its path, and the
workers run in an empty working directory: they reach that code only by value. Pool ``p``
(``strict_queue``, one worker of capacity 4): calls of different sessions run at once, those of
one session in order. Pool ``h`` (``hint``, two workers): a session's call runs on the free worker
when its own is busy.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dspy
import pytest

import dspex
import dspex.aio
import dspex.client.bindings
from dspex.client.exchange import encode_request
from dspex.client.sendcache import SendCache
from dspex.wire.errors import QueueTimeout
from dspex.wire.ops import Op
from tests.harness import Stack, wait_for


@pytest.fixture(scope="module")
def tstack() -> Iterator[Stack]:
    root = tempfile.mkdtemp(prefix="dxt", dir="/tmp")
    empty = os.path.join(root, "empty")
    os.mkdir(empty)
    st = Stack(root)
    try:
        st.start_broker("p:strict_queue", "h:hint")
        st.start_worker("p", "--capacity", "4", cwd=empty)
        for _ in range(2):
            st.start_worker("h", cwd=empty)
        st.wait_workers("p", 1, timeout=90)
        st.wait_workers("h", 2, timeout=90)
        yield st
    finally:
        st.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def dx(tstack: Stack) -> dspex.Client:
    return tstack.client(timeout=60)


GATED = '''
import os
import time

X = 1


def get_x():
    return X


def hold(gate):
    """Keep the session busy until the file ``gate`` exists (its calls queue behind this one)."""
    open(gate + ".running", "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "held"
'''


class Gate:
    """A call that holds its session on the worker until :meth:`open` (files the call polls)."""

    def __init__(self, where: Path) -> None:
        self.path = str(where / f"gate-{secrets.token_hex(4)}")

    def running(self) -> bool:
        return os.path.exists(self.path + ".running")

    def open(self) -> None:
        Path(self.path).touch()


def test_a_rebound_global_reaches_the_worker_though_the_call_that_carried_it_timed_out_queued(
        dx: dspex.Client, usercode: Any, tmp_path: Path) -> None:
    """In-process, ``mod.X = 2`` is what every later call reads. The first call after the rebinding
    carries it; if that call times out while queued behind another call of the session (the
    broker drops it, it never runs), the next call must still carry it, not read the old value."""
    mod = usercode(GATED)
    s = dx.session("p")
    assert s.run(mod.get_x) == 1
    mod.X = 2
    gate = Gate(tmp_path)
    holder = threading.Thread(target=s.run, args=(mod.hold, gate.path))
    holder.start()
    try:
        wait_for(gate.running, 30, what="the holding call to run")
        with pytest.raises(QueueTimeout):
            s.apply(mod.get_x, timeout=0.3)  # queued behind hold: never runs, and the broker says so
    finally:
        gate.open()
        holder.join(30)
    assert s.run(mod.get_x) == 2
    s.close()


def test_a_rebound_global_reaches_the_worker_though_the_task_that_carried_it_was_cancelled(
        tstack: Stack, usercode: Any, tmp_path: Path) -> None:
    """The asyncio twin: the task whose call carried the rebinding is cancelled while the call is
    queued; a call made meanwhile (queued behind it) and one made after both read the new value."""
    mod = usercode(GATED)
    gate = Gate(tmp_path)

    async def main() -> tuple[Any, ...]:
        async with dspex.aio.connect(tstack.frontend, timeout=60) as adx:
            s = adx.session("p")
            assert await s.run(mod.get_x) == 1
            mod.X = 3
            holder = asyncio.ensure_future(s.run(mod.hold, gate.path))
            await asyncio.to_thread(wait_for, gate.running, 30, what="the holding call to run")
            carrier = asyncio.ensure_future(s.run(mod.get_x))
            await asyncio.sleep(0)  # sent
            meanwhile = asyncio.ensure_future(s.run(mod.get_x))
            await asyncio.sleep(0)
            carrier.cancel()
            gate.open()
            results = (await holder, await meanwhile, await s.run(mod.get_x))
            await s.close()
            return results

    assert asyncio.run(main()) == ("held", 3, 3)


VARS = '''
import contextvars

REQUEST = contextvars.ContextVar("REQUEST", default="none")


def who():
    return REQUEST.get()
'''


def test_a_request_encoded_while_another_thread_commits_new_lms_and_context_vars(usercode: Any) -> None:
    """A service that makes an LM per request (``dspy.context(lm=dspy.LM(..., api_key=user_key))``)
    and sets a ContextVar per request: while one thread's request reads which LMs and variables
    the session holds, another thread's request commits new ones. The read must not fail
    (``RuntimeError: dictionary changed size during iteration`` failed the request)."""
    first, second = usercode(VARS), usercode(VARS)
    cache = SendCache()

    def encode(fn: Any, lm: Any) -> dict[str, Any]:
        lms: dict[str, Any] = {}
        with dspy.context(lm=lm):
            encode_request(Op.APPLY.value, [fn, [], {}], 2**30, cache, lms=lms)
        return lms

    first.REQUEST.set("a")
    for i in range(3):
        encode(first.who, dspy.LM(f"openai/m{i}"))
    meddled: list[str] = []
    reading = threading.get_ident()

    snapshot = cache._snapshot

    def meddling(held: dict[str, Any]) -> list[tuple[str, Any]]:
        """The session's read of its LMs or variables: another thread commits new ones first."""
        reader = sys._getframe(1).f_code.co_name
        if reader in ("held_lms", "context_values") and reader not in meddled and threading.get_ident() == reading:
            meddled.append(reader)
            second.REQUEST.set("b")
            other = threading.Thread(target=encode, args=(second.who, dspy.LM(f"openai/{reader}")))
            other.start()
            other.join(30)
        return snapshot(held)

    cache._snapshot = meddling  # type: ignore[method-assign]
    lms = encode(first.who, dspy.LM("openai/last"))
    assert sorted(meddled) == ["context_values", "held_lms"]
    # the 4 of these requests and the two the other thread committed meanwhile
    assert [lm.model for lm in lms.values()] == ["openai/m0", "openai/m1", "openai/m2", "openai/context_values",
                                                 "openai/held_lms", "openai/last"]



def forget_the_session() -> None:
    """Empty this session's code and modules on the worker (what a worker it moves to holds)."""
    from dspex.wire.codestore import CodeStore
    from worker.dspy_settings import current_session

    state = current_session.get()
    assert state is not None
    state.code = CodeStore()


def test_new_code_of_a_hint_session_sent_to_another_worker_finds_the_globals_it_reads(
        dx: dspex.Client, usercode: Any, tmp_path: Path) -> None:
    """A ``hint`` session whose worker is busy (another thread's call of the session) has its next
    call run by a free worker, which holds nothing of it. A call of a function new to the session
    defines it in full there, but not the globals it reads (the session holds them, on the other
    worker): it must get them too, not fail with NameError."""
    mod = usercode(GATED + "\n\ndef via():\n    return get_x()\n")
    s = dx.session("h")
    assert s.run(mod.get_x) == 1
    first = s.worker
    gate = Gate(tmp_path)
    holder = threading.Thread(target=s.run, args=(mod.hold, gate.path))
    holder.start()
    try:
        wait_for(gate.running, 30, what="the holding call to run")
        assert s.run(mod.via) == 1
        assert s.worker != first  # it ran on the other worker
    finally:
        gate.open()
        holder.join(30)
    s.close()


def test_a_rebound_global_or_redefined_function_reaches_both_workers_of_a_hint_session(
        dx: dspex.Client, usercode: Any, tmp_path: Path) -> None:
    """A ``hint`` session's calls alternate between its two workers (a call holds its own worker
    busy, the next runs on the other). The client rebinds a global, and redefines a function that
    another calls, between calls: every call sees the client's latest, as in-process, on whichever
    worker it runs. (Each worker once held the old binding; the call that carried the new one ran
    on the other.)"""
    mod = usercode(GATED + "\n\ndef helper():\n    return 'old'\n\n\ndef via():\n    return helper()\n")
    s = dx.session("h")
    assert (s.run(mod.get_x), s.run(mod.via)) == (1, "old")
    ran: set[str] = set()
    for value in (2, 3, 4):
        gate = Gate(tmp_path)
        holder = threading.Thread(target=s.run, args=(mod.hold, gate.path))
        holder.start()
        try:
            wait_for(gate.running, 30, what="the holding call to run")
            busy = s.worker
            mod.X = value
            exec(f"def helper():\n    return 'v{value}'", mod.__dict__)  # noqa: S102 - the client redefines it
            assert (s.run(mod.get_x), s.run(mod.via)) == (value, f"v{value}")
            assert s.worker != busy  # it ran on the other worker
            ran.update((busy, s.worker))
        finally:
            gate.open()
            holder.join(30)
        for _ in range(2):  # back on the worker that ran the holding call, or on the other
            assert (s.run(mod.get_x), s.run(mod.via)) == (value, f"v{value}")
            ran.add(s.worker)
    assert len(ran) == 2
    s.close()


def test_a_binding_changed_before_a_miss_reaches_the_worker_that_missed_it(
        dx: dspex.Client, usercode: Any, tmp_path: Path) -> None:
    """After a miss the client counts nothing as held: a global changed before it (``Z``, sent to
    the other worker only) must still reach the session's own worker before a call there relies
    on it, though that worker has loaded a later change (``X``) since."""
    mod = usercode(GATED + "\nZ = 1\n\n\ndef get_z():\n    return Z\n")
    s = dx.session("h")
    assert (s.run(mod.get_x), s.run(mod.get_z)) == (1, 1)
    own = s.worker

    def on_the_other_worker(call: Callable[[], Any]) -> Any:
        gate = Gate(tmp_path)
        holder = threading.Thread(target=s.run, args=(mod.hold, gate.path))
        holder.start()
        try:
            wait_for(gate.running, 30, what="the holding call to run")
            result = call()
            assert s.worker != own
            return result
        finally:
            gate.open()
            holder.join(30)

    mod.Z = 2
    assert on_the_other_worker(lambda: s.run(mod.get_z)) == 2
    mod.X = 2
    assert on_the_other_worker(lambda: s.run(mod.get_x)) == 2
    assert s.run(mod.get_x) == 2
    assert s.worker == own
    assert on_the_other_worker(lambda: s.run(mod.get_z)) == 2
    assert s.run(mod.get_z) == 2
    assert s.worker == own
    s.close()


def test_two_clients_of_one_session_count_binding_versions_apart(
        dx: dspex.Client, usercode: Any, tmp_path: Path) -> None:
    """Two session objects on one session id (as a forked child and its parent) number their
    binding changes each from their own start. The session's worker brought far along by one
    (``X`` rebound many times) must still refuse the other's call that relies on a change it
    lacks (``Z``, rebound by a call that ran on the other worker): with one count for both it ran
    with the old ``Z``."""
    mod = usercode(GATED + "\nZ = 1\n\n\ndef get_z():\n    return Z\n")
    first = dx.session("h")
    for value in range(2, 12):
        mod.X = value
        assert first.run(mod.get_x) == value
    own = first.worker
    second = dx.session("h", first.id)
    assert second.run(mod.get_z) == 1
    assert second.worker == own
    gate = Gate(tmp_path)
    holder = threading.Thread(target=second.run, args=(mod.hold, gate.path))
    holder.start()
    try:
        wait_for(gate.running, 30, what="the holding call to run")
        mod.Z = 2
        assert second.run(mod.get_z) == 2
        assert second.worker != own
    finally:
        gate.open()
        holder.join(30)
    assert second.run(mod.get_z) == 2
    assert second.worker == own
    first.close()


def test_a_miss_answered_to_another_thread_while_a_request_is_encoded(dx: dspex.Client, usercode: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread B's request gets CodeCacheMiss (the session's worker holds nothing of it) and resets
    what the session counts as held while thread C's request is being encoded: C left out the
    globals its new function reads (held, when it walked them), then finds the session holding
    nothing. C must still be refused by that worker and sent in full, not run without them."""
    mod = usercode(GATED + "\n\ndef via():\n    return get_x()\n")
    s = dx.session("p")
    assert s.run(mod.get_x) == 1
    s.run(forget_the_session)
    real = dspex.client.bindings.Bindings.walk
    missed: list[int] = []

    def walk(self: Any, root: Any) -> Any:
        found = real(self, root)
        if root is mod.via and self.trusted and not missed:
            missed.append(1)
            s.sender.missed(False)  # what B's thread does on its miss, between C's walk and its end
        return found

    monkeypatch.setattr(dspex.client.bindings.Bindings, "walk", walk)
    assert s.run(mod.via) == 1
    assert missed == [1]
    s.close()


MODULE = '''
import contextvars

STATE = []
COUNT = 0
TABLE = {}
REQUEST = contextvars.ContextVar("REQUEST", default="none")


def bump():
    STATE.append(len(STATE) + 1)
    return len(STATE)


def add(n):
    global COUNT
    COUNT += n
    return COUNT


def remember(key):
    TABLE[key] = REQUEST.get()
    return TABLE[key]


def lm_model():
    import dspy
    return dspy.settings.lm.model


def totals():
    return len(STATE), COUNT, len(TABLE)
'''


def test_threads_sharing_a_session_keep_one_module_state_as_in_process(
        tstack: Stack, usercode: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """16 threads of one client, one session, first calls of three functions of one module at once
    (a barrier), a code cache of 4 entries so that lambdas evict and drop while other calls are in
    flight, each thread with its own ContextVar value and its own ``dspy.context(lm=...)``: the
    same totals and per-thread answers as the threads in-process."""
    monkeypatch.setenv("DSPEX_CODE_CACHE", "4")
    mod = usercode(MODULE)
    lms = [dspy.LM(f"openai/m{i}") for i in range(4)]
    start = threading.Barrier(16)

    def work(i: int) -> tuple[Any, ...]:
        mod.REQUEST.set(f"r{i}")
        start.wait(30)
        with dspy.context(lm=lms[i % 4]):
            return (s.run(mod.bump) > 0, s.run(mod.add, 1) > 0, s.run(mod.remember, i),
                    s.run(lambda: i * 2), s.run(mod.lm_model))

    def answers(i: int) -> tuple[Any, ...]:
        return True, True, f"r{i}", i * 2, f"openai/m{i % 4}"

    with dspex.connect(tstack.frontend, timeout=60) as small:
        s = small.session("p")
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(work, range(48)))
        assert got == [answers(i) for i in range(48)]
        assert s.run(mod.totals) == (48, 48, 48)
        s.close()


def test_a_gather_of_many_calls_of_one_async_session_counts_exactly(tstack: Stack, usercode: Any) -> None:
    """``asyncio.gather`` of 150 calls of one AsyncSession that mutate module state, each task
    with its own ContextVar value: every increment counted once, each task its own value."""
    mod = usercode(MODULE)

    async def main() -> tuple[list[Any], Any]:
        async with dspex.aio.connect(tstack.frontend, timeout=120) as adx:
            s = adx.session("p")

            async def one(i: int) -> Any:
                mod.REQUEST.set(f"t{i}")
                return await (s.run(mod.remember, i) if i % 3 == 0 else s.run(mod.add, 1))

            got = await asyncio.gather(*(one(i) for i in range(150)))
            return got, await s.run(mod.totals)

    got, totals = asyncio.run(main())
    assert [g for i, g in enumerate(got) if i % 3 == 0] == [f"t{i}" for i in range(0, 150, 3)]
    assert sorted(g for i, g in enumerate(got) if i % 3) == list(range(1, 101))
    assert totals == (0, 100, 50)
