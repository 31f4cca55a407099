"""A session is the user's own Python: code sent once and remembered, module state kept per
session, globals by reference where the worker can import them, the client's DSPy settings.

User code lives in modules written to a temp dir that only this process has on its path, and the
workers run in an empty working directory: they reach that code only by value.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.utils import DummyLM

import dspex
from dspex.client.exchange import encode_request
from dspex.client.sessionpickle import Message
from dspex.wire.ops import Op
from tests.conformance.harness import fresh_dspy_settings
from tests.harness import Stack

POOLS = {"p": ("p:strict_queue", 1), "n": ("n:none", 2), "h": ("h:hint", 2)}


@pytest.fixture(scope="module")
def code_stack() -> Iterator[Stack]:
    root = tempfile.mkdtemp(prefix="dxs", dir="/tmp")
    empty = os.path.join(root, "empty")
    os.mkdir(empty)
    st = Stack(root)
    try:
        st.start_broker(*(spec for spec, _ in POOLS.values()))
        for name, (_, n) in POOLS.items():
            for _ in range(n):
                st.start_worker(name, cwd=empty)
        for name, (_, n) in POOLS.items():
            st.wait_workers(name, n, timeout=90)
        yield st
    finally:
        st.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def dx(code_stack: Stack) -> dspex.Client:
    return code_stack.client(timeout=60)


@pytest.fixture
def misses(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The cache misses the client answered (``ephemeral`` of each), in order."""
    seen: list[bool] = []
    real = dspex.client.sendcache.SendCache.missed

    def spy(self: Any, ephemeral: bool) -> None:
        seen.append(ephemeral)
        real(self, ephemeral)

    monkeypatch.setattr(dspex.client.sendcache.SendCache, "missed", spy)
    return seen


STATE = '''
STATE = []
TABLE = {}
COUNT = 0


def bump():
    STATE.append(len(STATE) + 1)
    return list(STATE)


def remember(key, value):
    if key is not None:
        TABLE[key] = value
    return dict(TABLE)


def count():
    global COUNT
    COUNT += 1
    return COUNT
'''


def store_size() -> int:
    """How many objects this session's code store holds on the worker."""
    from worker.dspy_settings import current_session

    state = current_session.get()
    assert state is not None
    return len(state.code.objects)


def forget_everything() -> None:
    """Empty this session's code store on the worker (what an evicting or fresh worker holds)."""
    from worker.dspy_settings import current_session

    state = current_session.get()
    assert state is not None
    state.code.objects.clear()


def test_module_state_lives_across_calls(dx: dspex.Client, usercode: Any) -> None:
    mod = usercode(STATE)
    s = dx.session("p")
    assert [s.run(mod.bump) for _ in range(3)] == [[1], [1, 2], [1, 2, 3]]
    assert s.run(mod.remember, "a", 1) == {"a": 1}
    assert s.run(mod.remember, None, None) == {"a": 1}  # the entry set by the first call is there
    assert [s.run(mod.count) for _ in range(3)] == [1, 2, 3]  # global x; x += 1
    assert mod.STATE == [] and mod.COUNT == 0  # the client's own module is untouched
    s.close()


DEFAULTS = '''
STATE = []
REGISTRY = {}


def seen():
    return list(STATE), dict(REGISTRY)


def add(x, acc=STATE):
    acc.append(x)
    return acc is STATE


def add_kw(x, *, acc=STATE):
    acc.append(x)
    return acc is STATE


class Plugins:
    registry = REGISTRY

    def register(self, name):
        self.registry[name] = len(self.registry)
        return self.registry is REGISTRY
'''


def test_defaults_and_class_attributes_bound_to_module_globals_are_those_globals(dx: dspex.Client,
                                                                              usercode: Any) -> None:
    """``def add(x, acc=STATE)`` and ``class Plugins: registry = REGISTRY`` hold the module's own
    objects in-process, whichever call sent the global first."""
    mod = usercode(DEFAULTS)
    s = dx.session("p")
    assert s.run(mod.seen) == ([], {})  # the session has STATE and REGISTRY before the others come
    assert s.run(mod.add, 1) is True
    assert s.run(mod.add_kw, 2) is True
    assert s.run(mod.Plugins().register, "a") is True
    assert s.run(mod.seen) == ([1, 2], {"a": 0})
    assert (mod.STATE, mod.REGISTRY) == ([], {})  # the client's module is not changed by calls
    first = dx.session("p")  # the function and the global it reads sent by one request
    assert first.run(mod.add, 1) is True
    assert first.run(mod.Plugins().register, "b") is True
    assert first.run(mod.seen) == ([1], {"b": 0})


ALIASES = '''
STORE = []


class Holder:
    def __init__(self, store):
        self.store = store


HOLDER = Holder(STORE)
LOOKUP = {"store": STORE}


def size():
    return len(STORE)


def through_holder(x):
    HOLDER.store.append(x)
    return HOLDER.store is STORE


def only_the_holder(x):
    HOLDER.store.append(x)
    return len(HOLDER.store)


def through_lookup(x):
    LOOKUP["store"].append(x)
    return LOOKUP["store"] is STORE


def seen():
    return list(STORE)
'''


def test_a_global_reached_through_another_global_is_the_sessions(dx: dspex.Client, usercode: Any) -> None:
    """Globals that hold each other (``HOLDER = Holder(STORE)``, ``LOOKUP = {"store": STORE}``)
    are one object each in the session, as in-process, whichever call sent which first."""
    mod = usercode(ALIASES)
    s = dx.session("p")
    assert s.run(mod.size) == 0  # the session binds STORE first
    assert s.run(mod.through_holder, 1) is True
    assert s.run(mod.through_lookup, 2) is True
    assert s.run(mod.seen) == [1, 2]
    other = dx.session("p")
    assert other.run(mod.only_the_holder, 1) == 1  # the holder first: STORE comes inside it
    assert other.run(mod.size) == 1
    assert other.run(mod.through_lookup, 2) is True
    assert other.run(mod.seen) == [1, 2]


def test_code_and_globals_travel_once(dx: dspex.Client, usercode: Any) -> None:
    mod = usercode('''
        BIG = b"x" * 20_000_000


        def size():
            return len(BIG)
    ''')
    s = dx.session("p")
    first, _ = encode_request(Op.APPLY.value, [mod.size, [], {}], 2**30, s.sender)
    assert sum(len(f) for f in first) > 20_000_000
    s.sender.missed(False)  # that encoding was not sent: start from an empty worker again
    assert s.run(mod.size) == 20_000_000
    later, _ = encode_request(Op.APPLY.value, [mod.size, [], {}], 2**30, s.sender)
    assert sum(len(f) for f in later) < 500  # the function and BIG by key
    assert [s.run(mod.size) for _ in range(3)] == [20_000_000] * 3
    mod.BIG = b"y" * 10  # rebound on the client: the session gets the new object
    assert s.run(mod.size) == 10
    s.close()


def test_a_held_function_is_sent_by_its_key_as_the_pickler_writes_it(dx: dspex.Client, usercode: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A call of a function the session holds, its globals unchanged, is encoded without building
    a pickler: the same bytes the pickler writes. A rebound global goes with the call again."""
    mod = usercode('''
        LIMIT = 3


        def limit():
            return LIMIT
    ''', name="usr_held")
    s = dx.session("p")
    assert s.run(mod.limit) == 3
    body = [mod.limit, [], {}]
    held, _ = encode_request(Op.APPLY.value, body, 2**30, s.sender)
    monkeypatch.setattr(Message, "_held_function", lambda self, func: None)
    pickled, _ = encode_request(Op.APPLY.value, body, 2**30, s.sender)
    assert held == pickled
    monkeypatch.undo()
    mod.LIMIT = 10
    rebound, _ = encode_request(Op.APPLY.value, body, 2**30, s.sender)
    assert b"LIMIT" in rebound[0]  # the new binding, not the key alone
    s.sender.missed(False)  # that encoding was not sent: the session starts again from an empty worker
    assert [s.run(mod.limit) for _ in range(2)] == [10, 10]
    mod.LIMIT = 4
    assert s.run(mod.limit) == 4
    s.close()


def test_a_big_closure_value_travels_once(dx: dspex.Client, usercode: Any) -> None:
    mod = usercode('''
        def reader(data):
            return lambda: len(data)  # a new function object each time, over the same data
    ''')
    data = b"z" * 3_000_000
    s = dx.session("p")
    assert s.run(mod.reader(data)) == 3_000_000
    again, _ = encode_request(Op.APPLY.value, [mod.reader(data), [], {}], 2**30, s.sender)
    assert sum(len(f) for f in again) < 2000  # the code by hash, the 3 MB value by key
    assert s.run(mod.reader(data)) == 3_000_000
    s.close()


def test_a_new_closure_over_a_rebound_variable_sees_its_value(dx: dspex.Client) -> None:
    # (a guard for sharing closure cells in the session: a cell the client rebinds between calls
    # must not come back as the session's older value)
    s = dx.session("p")
    assert [s.run(lambda: q) for q in ["a", "b", "c"]] == ["a", "b", "c"]  # noqa: B023 - each runs at once
    seen = []
    for limit in (1, 2):
        seen.append(s.run(lambda: [limit] * limit))  # noqa: B023 - runs at once
    assert seen == [[1], [2, 2]]
    s.close()


def test_a_user_module_used_as_a_module_is_the_sessions_module(dx: dspex.Client, usercode: Any) -> None:
    helpers = usercode('''
        SEEN = []
        LIMIT = 2


        def note(x):
            SEEN.append(x)
            return SEEN[-LIMIT:]
    ''')
    mod = usercode(f'''
        import {helpers.__name__} as helpers


        def run(x):
            return helpers.note(x), getattr(helpers, "extra", lambda: None)()
    ''')
    s = dx.session("p")
    assert [s.run(mod.run, i) for i in range(3)] == [([0], None), ([0, 1], None), ([1, 2], None)]
    helpers.LIMIT = 3  # rebound in the module
    helpers.extra = lambda: "added"  # a name the module did not have
    assert s.run(mod.run, 3) == ([1, 2, 3], "added")
    assert helpers.SEEN == []
    s.close()


def test_two_sessions_keep_their_own_functions_and_classes(dx: dspex.Client, usercode: Any) -> None:
    mod = usercode('''
        import dataclasses

        SEEN = []


        class Counter:
            count = 0

            @classmethod
            def bump(cls):
                cls.count += 1
                SEEN.append(cls.count)
                return cls.count, list(SEEN)


        @dataclasses.dataclass
        class Point:
            x: int
            y: int


        def bump():
            return Counter.bump()
    ''')
    a, b = dx.session("p"), dx.session("p")  # one worker: both sessions on it
    assert a.run(mod.bump) == (1, [1])
    assert a.run(mod.Counter.bump) == (2, [1, 2])
    assert b.run(mod.bump) == (1, [1])  # b's class and module are b's own
    assert a.run(mod.bump) == (3, [1, 2, 3])
    assert a.worker == b.worker
    init = mod.Point.__init__
    point = a.run(mod.Point, 1, 2)
    assert type(point) is mod.Point and point == mod.Point(1, 2)  # the client's own class comes back
    assert mod.Point.__init__ is init  # ... untouched by the copy that came back
    a.close()
    b.close()


def test_a_changed_function_or_global_replaces_the_old_one(dx: dspex.Client, usercode: Any, tmp_path: Path) -> None:
    mod = usercode('''
        LIMIT = 3
        STATE = []


        def version():
            return 1


        def limit():
            return LIMIT


        def outer():
            return limit() * 2


        def bump():
            STATE.append(1)
            return len(STATE)
    ''', name="usr_edited")
    s = dx.session("p")
    assert (s.run(mod.version), s.run(mod.limit), s.run(mod.bump), s.run(mod.bump)) == (1, 3, 1, 2)
    assert s.run(mod.outer) == 6
    mod.LIMIT = 10  # a rebound global, read through another function, then directly
    assert s.run(mod.outer) == 20
    assert s.run(mod.limit) == 10
    (tmp_path / "usr_edited.py").write_text(textwrap.dedent('''
        LIMIT = 3
        STATE = []


        def version():
            return 2  # the source was edited and the module re-run


        def limit():
            return LIMIT


        def bump():
            STATE.append(1)
            return len(STATE)
    '''))
    importlib.reload(mod)
    assert s.run(mod.version) == 2
    assert s.run(mod.bump) == 1  # the re-run made a new STATE: the session's is replaced, as in-process
    assert s.run(inspect.getsource, mod.version).strip().endswith("return 2  # the source was edited and the module re-run")
    s.close()


def test_cache_bound_forgets_on_both_sides(dx: dspex.Client, usercode: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_CODE_CACHE", "6")  # read when a client is made
    with dspex.connect(dx.endpoint, timeout=dx.timeout) as small:
        mod = usercode(STATE)
        s = small.session("p")
        assert s.run(mod.bump) == [1]
        fns = [(lambda i=i: i * 2) for i in range(20)]  # 20 functions: 20 keys, over the bound
        assert [s.run(f) for f in fns] == [i * 2 for i in range(20)]
        assert s.run(store_size) <= 6 + 2  # the bound, plus what the module state pins (STATE)
        assert s.run(fns[0]) == 0  # forgotten, then sent again in full
        assert [s.run(mod.bump) for _ in range(2)] == [[1, 2], [1, 2, 3]]  # module state is never evicted
        s.close()


SEARCH = '''
import dspy
from dspy.dsp.utils import dotdict

QUERIES = []


def make_search(prefix):
    def search(query, k=3, **kwargs):  # a closure: no module global names it
        QUERIES.append(query)
        return [dotdict(long_text=prefix + query.upper())]
    return search


def retrieve(question):
    return dspy.Retrieve(k=1)(question).passages, len(QUERIES)
'''


def rm_id() -> int:
    return id(dspy.settings.rm)


def test_a_function_setting_forgotten_by_the_bound_is_sent_again_before_it_is_missed(
        dx: dspex.Client, code_stack: Stack, usercode: Any, monkeypatch: pytest.MonkeyPatch, fresh_settings: None) -> None:
    """``dspy.configure(rm=make_search(...))``: a function setting is sent once (one object on the
    worker across calls, not a new one per call), the settings a request reuses refer to it by
    key, and once the bound forgot that key they are encoded anew (the function in full), never
    sent referring to what the worker no longer holds."""
    monkeypatch.setenv("DSPEX_CODE_CACHE", "6")
    with dspex.connect(dx.endpoint, timeout=dx.timeout) as small:
        mod = usercode(SEARCH)
        dspy.configure(rm=mod.make_search(">"))
        s = small.session("p")
        assert [s.run(mod.retrieve, q) for q in ("a", "b")] == [([">A"], 1), ([">B"], 2)]
        ids = {s.run(rm_id) for _ in range(3)}
        misses = code_stack.logs().count(f"session={s.id[:8]}")
        fns = [(lambda i=i: i * 2) for i in range(20)]  # over the bound: the settings' key is forgotten
        assert [s.run(f) for f in fns] == [i * 2 for i in range(20)]
        assert s.run(mod.retrieve, "c") == ([">C"], 3)  # the module state stays
        assert code_stack.logs().count(f"session={s.id[:8]}") == misses, "a request referred to a forgotten key"
        assert len(ids) == 1, "the function was sent again with each call"
        s.close()


def test_a_cache_miss_resends_in_full_once_and_keeps_module_state(dx: dspex.Client, usercode: Any,
                                                                   misses: list[bool]) -> None:
    mod = usercode(STATE)
    s = dx.session("p")
    assert [s.run(mod.bump) for _ in range(2)] == [[1], [1, 2]]
    s.run(forget_everything)  # the worker's store is empty now: the next call refers to what it lacks
    assert s.run(mod.bump) == [1, 2, 3]  # sent again in full; the module's state was kept
    assert misses == [False]
    assert s.run(mod.bump) == [1, 2, 3, 4]
    assert misses == [False]
    s.run(forget_everything)
    assert list(s.stream_apply(mod.bump)) == [1, 2, 3, 4, 5]  # a stream is sent again the same way
    assert misses == [False, False]
    s.close()


def test_a_resend_after_a_miss_is_whole_whatever_another_request_claimed_meanwhile(
        dx: dspex.Client, usercode: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads sharing a session (a service's requests of one user): between one request's miss
    and its resend, another request of the session encodes and counts the code as held, though
    its own request has not reached the worker yet. The resend must not trust that: it goes in
    full, or it misses again and the caller gets CodeCacheMiss."""
    mod = usercode(STATE)
    s = dx.session("p")
    assert s.run(mod.bump) == [1]
    real = dspex.client.sendcache.SendCache.missed
    claimed: list[int] = []

    def another_request_meanwhile(self: Any, ephemeral: bool) -> None:
        real(self, ephemeral)
        encode_request(Op.APPLY.value, [mod.bump, [], {}], 2**30, self)  # encoded, not yet sent
        claimed.append(1)

    monkeypatch.setattr(dspex.client.sendcache.SendCache, "missed", another_request_meanwhile)
    s.run(forget_everything)
    assert s.run(mod.bump) == [1, 2]  # sent again in full; the module's state was kept
    assert claimed == [1]
    s.close()


def test_requests_of_a_session_encoded_at_once_keep_one_module_state(dx: dspex.Client, usercode: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads sharing a session (a service's requests of one user) that both send code the
    worker does not hold yet: the second encodes it in full while the first has not committed.
    Both must name the module's globals alike, or the later binding on the worker replaces the
    list the earlier call appended to, as a fresh copy of the client's."""
    mod = usercode(STATE)
    s = dx.session("p")
    real = dspex.client.sendcache.SendCache.commit
    first_encoded, second_committed = threading.Event(), threading.Event()
    commits: list[int] = []

    def commit(self: Any, msg: Any, drops: list[str]) -> None:
        commits.append(1)
        if len(commits) == 1:  # the first request waits, encoded, until the second was sent
            first_encoded.set()
            assert second_committed.wait(30)
        real(self, msg, drops)
        if len(commits) == 2:
            second_committed.set()

    monkeypatch.setattr(dspex.client.sendcache.SendCache, "commit", commit)
    got: list[Any] = []
    first = threading.Thread(target=lambda: got.append(s.run(mod.bump)))
    first.start()
    assert first_encoded.wait(30)
    got.append(s.run(mod.bump))
    first.join(30)
    assert sorted(got) == [[1], [1, 2]]
    assert s.run(mod.bump) == [1, 2, 3]
    s.close()


def test_a_none_pool_keeps_nothing_and_still_runs(dx: dspex.Client, usercode: Any, misses: list[bool]) -> None:
    mod = usercode(STATE)
    s = dx.session("n")
    assert [s.run(mod.bump) for _ in range(4)] == [[1]] * 4  # a none pool keeps no session state
    assert misses == [True]  # one miss taught the session to send everything every time
    assert not s.sender.keep
    s.close()


def test_a_hint_session_repinned_to_another_worker_gets_its_code_again(
        code_stack: Stack, dx: dspex.Client, usercode: Any, misses: list[bool]) -> None:
    mod = usercode(STATE)
    s = dx.session("h")
    assert [s.run(mod.bump) for _ in range(2)] == [[1], [1, 2]]
    pinned = next(w for w in code_stack.workers("h", dx) if w["incarnation"] == s.worker)
    os.kill(int(pinned["pid"]), signal.SIGKILL)
    code_stack.wait_workers("h", 1, client=dx)
    assert s.run(mod.bump) == [1]  # re-pinned: the other worker starts from the module as sent
    assert s.run(mod.bump) == [1, 2]
    assert misses == [False]
    code_stack.start_worker("h", cwd=os.path.join(code_stack.root, "empty"))  # the pool's size again
    code_stack.wait_workers("h", 2, client=dx)
    s.close()


COUNTED = '''
class Counter:
    def __init__(self):
        self.n = 0

    def bump(self):
        self.n += 1
        return self.n


COUNTER = Counter()
'''


def test_a_module_global_given_to_a_call_keeps_its_state_through_a_cache_miss(dx: dspex.Client, usercode: Any,
                                                                               misses: list[bool]) -> None:
    """``s.run(COUNTER.bump)``: the session's COUNTER, also after the worker forgot the code it
    was sent (the module state stays); in a ``none`` pool, the client's COUNTER as it is each time."""
    mod = usercode(COUNTED)
    s = dx.session("p")
    assert [s.run(mod.COUNTER.bump) for _ in range(2)] == [1, 2]
    s.run(forget_everything)
    assert s.run(mod.COUNTER.bump) == 3
    assert s.run(lambda: mod.COUNTER.n) == 3  # read by code: the same object
    s.close()
    n = dx.session("n")
    assert [n.run(mod.COUNTER.bump) for _ in range(3)] == [1, 1, 1]
    assert mod.COUNTER.n == 0  # the client's own was never changed
    n.close()


def test_globals_from_importable_modules_go_by_reference(dx: dspex.Client, usercode: Any) -> None:
    mod = usercode('''
        import dspy.utils.callback_context as callback_context
        from dspy.utils.callback import ACTIVE_CALL_ID

        ALIAS = callback_context.ACTIVE_CALL_ID  # not imported by name: found in the module


        def ids():
            token = ACTIVE_CALL_ID.set("call-1")
            try:
                return ACTIVE_CALL_ID.get(), ALIAS.get(), ALIAS is ACTIVE_CALL_ID
            finally:
                ACTIVE_CALL_ID.reset(token)
    ''')
    s = dx.session("p")
    assert s.run(mod.ids) == ("call-1", "call-1", True)
    s.close()


def test_an_unpicklable_global_names_itself_and_its_module(dx: dspex.Client, usercode: Any) -> None:
    mod = usercode('''
        import threading

        LOCK = threading.Lock()


        def guarded():
            with LOCK:
                return 1


        def fine():
            return 2


        def guarded_by(lock):
            with lock:
                return 3
    ''')
    s = dx.session("p")
    with pytest.raises(dspex.EncodeError) as info:
        s.run(mod.guarded)
    message = str(info.value)
    assert f"cannot send LOCK (_thread.lock) from module {mod.__name__}: " in message
    assert message.endswith("(it cannot be copied to the worker: make it there instead, inside the function, or "
                            "once with ref = s.run(make_it) and pass the ref)")
    assert info.value.details["global"] == "LOCK" and info.value.details["module"] == mod.__name__
    assert s.run(mod.fine) == 2  # nothing was sent; the session goes on
    # what the message says to do works (s.put would not: it copies, and a lock cannot be copied)
    with pytest.raises(dspex.EncodeError):
        s.put(mod.LOCK)
    lock = s.run(threading.Lock)
    assert isinstance(lock, dspex.Ref) and s.run(mod.guarded_by, lock) == 3
    s.close()


def test_getsource_of_by_value_signatures_and_plain_classes(dx: dspex.Client, usercode: Any) -> None:
    mod = usercode('''
        import dspy


        class Triage(dspy.Signature):
            """Triage a ticket."""

            ticket: str = dspy.InputField()
            label: str = dspy.OutputField()


        class Limits:
            retries = 3
    ''')
    s = dx.session("p")
    assert s.run(inspect.getsource, mod.Triage) == inspect.getsource(mod.Triage)
    assert s.run(inspect.getsource, mod.Limits) == inspect.getsource(mod.Limits)
    s.close()


# -- the client's DSPy settings ---------------------------------------------------------------

PROGRAM = '''
import dspy


def answer(question):
    return dspy.Predict("question -> answer")(question=question).answer


def current():
    return id(dspy.settings.lm), type(dspy.settings.adapter).__name__, dspy.settings.track_usage


def configure_own(text):
    from dspy.utils import DummyLM

    dspy.configure(lm=DummyLM([{"answer": text}] * 5))
'''


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    with fresh_dspy_settings():
        yield


def test_client_settings_apply_on_the_worker(dx: dspex.Client, usercode: Any, fresh_settings: None) -> None:
    mod = usercode(PROGRAM)
    dspy.configure(lm=DummyLM([{"answer": "from the client"}] * 10), track_usage=True)
    s = dx.session("p")
    assert s.run(mod.answer, "q") == "from the client"
    first, second = s.run(mod.current), s.run(mod.current)
    assert first == second and first[1:] == ("NoneType", True)  # one LM object on the worker: sent once
    with dspy.context(adapter=dspy.JSONAdapter()):
        assert s.run(mod.current)[1] == "JSONAdapter"
    assert s.run(mod.current)[1] == "NoneType"  # the context ended on the client
    s.run(mod.configure_own, "from the session")
    assert s.run(mod.answer, "q") == "from the session"  # the session's own wins
    s.close()


TWO_LMS = '''
import dspy
from dspy.utils import DummyLM

LM_A = DummyLM([{"answer": f"A{i}"} for i in range(10)])
LM_B = DummyLM([{"answer": f"B{i}"} for i in range(10)])


def answer(question):
    return dspy.Predict("question -> answer")(question=question).answer


def configured():
    return "A" if dspy.settings.lm is LM_A else "B" if dspy.settings.lm is LM_B else None
'''


def test_module_global_lms_configured_on_the_client_keep_their_state(dx: dspex.Client, usercode: Any,
                                                                      fresh_settings: None,
                                                                      misses: list[bool]) -> None:
    """DSPy's docs: ``lm = dspy.LM(...)`` at the top of the script, ``dspy.configure(lm=lm)``, a
    ``dspy.context(lm=other)`` around some calls. Each LM is one object in the session, sent with
    the first call that uses it (no cache miss), and keeps its state when the settings switch
    back and forth, as in-process (a DummyLM answers in sequence)."""

    def calls(run: Callable[..., Any], mod: types.ModuleType) -> list[str]:
        dspy.configure(lm=mod.LM_A)
        out = [run(mod.answer, "q")]
        with dspy.context(lm=mod.LM_B):
            out += [run(mod.answer, "q"), run(mod.answer, "q")]
        out.append(run(mod.answer, "q"))
        with dspy.context(lm=mod.LM_B):
            out += [run(mod.answer, "q"), run(mod.configured)]
        return [*out, run(mod.configured)]  # the setting is the global the program reads

    expected = calls(lambda fn, *args: fn(*args), usercode(TWO_LMS))
    assert expected == ["A0", "B0", "B1", "A1", "B2", "B", "A"]
    with dx.session("p") as s:
        assert calls(s.run, usercode(TWO_LMS)) == expected
    assert misses == []


CONTEXT_VARS = '''
import contextvars
import threading

REQUEST_ID = contextvars.ContextVar("request_id", default="none")


def current():
    seen = []
    thread = threading.Thread(target=lambda: seen.append(REQUEST_ID.get()))  # a thread the call starts
    thread.start()
    thread.join()
    return REQUEST_ID.get(), seen[0]


def set_inside(value):
    REQUEST_ID.set(value)
    return REQUEST_ID.get()
'''


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
def test_a_context_variable_of_the_users_code_travels_with_each_call(dx: dspex.Client, usercode: Any,
                                                                     durable: bool) -> None:
    """A ``ContextVar`` at the top of the user's module is one variable of the session; each call
    sees the value the calling thread's context holds (the default where it is unset), and what
    a call sets stays in that call. In a durable session the variable itself is not durable (a
    ``NotDurableWarning``; made again from the client's after a move), and works the same."""
    mod = usercode(CONTEXT_VARS)
    warned = pytest.warns(dspex.NotDurableWarning, match="_contextvars.ContextVar") if durable else contextlib.nullcontext()
    token = mod.REQUEST_ID.set("r-1")
    try:
        in_process = mod.current()  # (a thread starts with an empty context: the default)
    finally:
        mod.REQUEST_ID.reset(token)
    assert in_process == ("r-1", "none")
    with warned, dx.session("p", durable=durable) as s:
        assert s.run(mod.current) == ("none", "none")
        assert s.run(mod.set_inside, "unset-here") == "unset-here"
        assert s.run(mod.current) == ("none", "none")  # it stays in that call where the caller has none too
        token = mod.REQUEST_ID.set("r-1")
        try:
            assert s.run(mod.current) == in_process
            assert dx.submit(s.run, mod.current).result(30) == ("none", "none")  # another thread's context
            assert s.run(mod.set_inside, "inside") == "inside"
            assert mod.REQUEST_ID.get() == "r-1" and s.run(mod.current) == in_process
        finally:
            mod.REQUEST_ID.reset(token)
        assert s.run(mod.current) == ("none", "none")
        token = mod.REQUEST_ID.set(threading.Lock())  # a value that cannot travel: named, nothing sent
        try:
            with pytest.raises(dspex.EncodeError, match="value of the context variable 'request_id' "
                                                        r"\(_thread.lock\)") as info:
                s.run(mod.current)
            assert info.value.details["context_var"] == "request_id"
        finally:
            mod.REQUEST_ID.reset(token)
        assert s.run(mod.current) == ("none", "none")


def test_a_ref_in_the_client_settings_is_the_worker_object(dx: dspex.Client, usercode: Any,
                                                          fresh_settings: None) -> None:
    """An LM kept on the worker (``s.put``, or read back as a ref) and configured on the client is
    that LM on the worker, as a ref passed as an argument is."""
    mod = usercode(PROGRAM)
    s = dx.session("p")
    lm = s.put(DummyLM([{"answer": "the session's LM"}] * 5))
    with dspy.context(lm=lm):
        assert s.run(mod.answer, "q") == "the session's LM"
    dspy.configure(lm=lm)
    assert s.run(mod.answer, "q") == "the session's LM"
    assert len(lm.history) == 2  # the very object the ref names
    other = dx.session("p")
    with pytest.raises(dspex.RefNotFound, match="the client's DSPy settings hold a ref this session cannot use"):
        other.run(mod.answer, "q")
    other.close()
    s.close()


def test_client_settings_can_be_turned_off(dx: dspex.Client, code_stack: Stack, usercode: Any,
                                           fresh_settings: None) -> None:
    mod = usercode(PROGRAM)
    dspy.configure(lm=DummyLM([{"answer": "from the client"}] * 10))
    s = dx.session("p", client_settings=False)
    with pytest.raises(dspex.RemoteError, match="No LM is loaded"):
        s.run(mod.answer, "q")
    s.close()
    with dspex.connect(code_stack.frontend, timeout=30, client_settings=False) as quiet:
        s = quiet.session("p")
        with pytest.raises(dspex.RemoteError, match="No LM is loaded"):
            s.run(mod.answer, "q")
        s.close()


def test_settings_are_cheap_without_dspy_in_the_client(code_stack: Stack, tmp_path: Path) -> None:
    """A client that never imported dspy sends no settings (and does not import dspy)."""
    import subprocess

    script = tmp_path / "nodspy.py"
    script.write_text(textwrap.dedent('''
        import sys
        import msgpack
        import dspex
        from dspex.client.exchange import encode_request
        from dspex.wire.protocol import FLAG_CONTEXT

        def f():
            return 1

        with dspex.connect(sys.argv[1], timeout=30) as dx:
            s = dx.session("p")
            assert s.run(f) == 1
            frames, flags = encode_request("apply", [f, [], {}], 2**20, s.sender)
            context = msgpack.unpackb(frames[-1]) if flags & FLAG_CONTEXT else {}
            print(sorted(context), "dspy" in sys.modules)  # no settings (the binding version "v" and whose, "c", only)
    '''))
    out = subprocess.run([sys.executable, str(script), code_stack.frontend], check=False, env=code_stack.env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() in (["[]", "False"], ["['c',", "'v']", "False"])


def test_an_unpicklable_client_setting_names_itself(dx: dspex.Client, usercode: Any, fresh_settings: None) -> None:
    import threading

    mod = usercode(PROGRAM)

    class Locked(dspy.utils.callback.BaseCallback):
        def __init__(self) -> None:
            self.lock = threading.Lock()

    dspy.configure(lm=DummyLM([{"answer": "a"}] * 5), callbacks=[Locked()])
    s = dx.session("p")
    with pytest.raises(dspex.EncodeError, match="cannot send the client's DSPy setting 'callbacks' .*client_settings=False"):
        s.run(mod.answer, "q")
    quiet = s.client.session("p", client_settings=False)
    assert quiet.run(len, [1, 2]) == 2
    quiet.close()
    s.close()


def test_the_asyncio_client_remembers_code_and_sends_settings(code_stack: Stack, usercode: Any,
                                                             fresh_settings: None) -> None:
    import asyncio

    state, program = usercode(STATE), usercode(PROGRAM)
    dspy.configure(lm=DummyLM([{"answer": "from the client"}] * 5))

    async def main() -> tuple[Any, ...]:
        async with dspex.aio.connect(code_stack.frontend, timeout=30) as adx:
            s = adx.session("p")
            bumps = [await s.run(state.bump) for _ in range(3)]
            streamed = [item async for item in s.stream_apply(state.bump)]
            answer = await s.run(program.answer, "q")
            await s.close()
            return bumps, streamed, answer

    assert asyncio.run(main()) == ([[1], [1, 2], [1, 2, 3]], [1, 2, 3, 4], "from the client")


POOL_OF_PROCESSES = '''
import multiprocessing


class Item:
    def __init__(self, x):
        self.x = x


def square(x):
    return x * x


def make(x):
    return Item(x * 10)


def grow(item):
    return Item(item.x + 1)


def fan_out():
    with multiprocessing.Pool(2) as pool:
        squares = pool.map(square, [1, 2, 3])
        made = pool.map(make, [1, 2])
        grown = pool.map(grow, [Item(5)])
    return squares, [type(i) is Item for i in made + grown], [i.x for i in made + grown]


def a_lambda_in_a_pool():
    with multiprocessing.Pool(1) as pool:
        return pool.map(lambda x: x, [1])
'''


def test_a_process_pool_runs_the_sessions_own_functions_and_classes(dx: dspex.Client, usercode: Any) -> None:
    """``multiprocessing`` names a task's function and its values' classes by module and name; a
    session's by-value code is found in its session module, so a ``Pool`` runs the script's own
    function on a worker as in-process, and a result's class is the session's class."""
    mod = usercode(POOL_OF_PROCESSES)
    expected = ([1, 4, 9], [True, True, True], [10, 20, 6])
    assert mod.fan_out() == expected  # in-process
    with dx.session("p") as s:
        for _ in range(2):  # the second call: the session's code held from the first
            assert s.apply(mod.fan_out, timeout=30) == expected
        with pytest.raises(AttributeError) as in_process:
            mod.a_lambda_in_a_pool()
        with pytest.raises(AttributeError) as remote:  # what pickle cannot name fails as in-process
            s.apply(mod.a_lambda_in_a_pool, timeout=30)
        assert str(remote.value) == str(in_process.value)


DATACLASSES = '''
import dataclasses
from dataclasses import dataclass, field

import dspy
import pydantic
from dspy.utils.dummies import DummyLM


@dataclass
class Order:
    sku: str
    tags: list = field(default_factory=list)
    qty: int = 1


class Extract(dspy.Signature):
    text: str = dspy.InputField()
    order: Order = dspy.OutputField()


def defaults():
    return [(f.name, f.default is dataclasses.MISSING, f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(Order)]


def validated():
    return pydantic.TypeAdapter(Order).validate_python({"sku": "a"})


def extracted():
    dspy.configure(lm=DummyLM([{"order": '{"sku": "b", "qty": 2}'}]))
    return dspy.Predict(Extract)(text="two of b").order
'''


def test_a_dataclass_keeps_the_sentinels_of_its_fields(dx: dspex.Client, usercode: Any, fresh_settings: None) -> None:
    """A field without a default holds ``dataclasses.MISSING`` itself, not a copy: Pydantic (and
    so a DSPy output field typed as the dataclass) tells fields with defaults by ``is MISSING``."""
    mod = usercode(DATACLASSES)
    expected = [mod.defaults(), mod.validated(), mod.extracted()]
    assert expected[1:] == [mod.Order("a"), mod.Order("b", qty=2)]
    with dx.session("p") as s:
        assert [s.run(mod.defaults), s.run(mod.validated), s.run(mod.extracted)] == expected


SIGNATURES = '''
import dspy
from dspy.utils.dummies import DummyLM


class Extract(dspy.Signature):
    """Pull the quantity out."""

    text: str = dspy.InputField()
    qty: int = dspy.OutputField()


def predicted():
    dspy.configure(lm=DummyLM([{"qty": "2"}]))
    return dspy.Predict(Extract)(text="two of b")


def thought():
    dspy.configure(lm=DummyLM([{"reasoning": "r", "qty": "2"}]))
    return dspy.ChainOfThought(Extract)(text="two of b")
'''


def test_a_prediction_of_a_named_signature_holds_that_signature(dx: dspex.Client, usercode: Any,
                                                                fresh_settings: None) -> None:
    """A returned prediction's completions hold the program's Signature class when pickle could
    name it (then ``pickle.dumps(pred)`` works, as in-process: a cache of results, a task queue);
    a signature DSPy built (ChainOfThought's) is built again from its text, as pickle cannot name
    it in-process either."""
    mod = usercode(SIGNATURES)
    local = mod.predicted()
    assert local.completions.signature is mod.Extract
    with dx.session("p") as s:
        remote = s.run(mod.predicted)
        assert remote.completions.signature is mod.Extract
        assert pickle.loads(pickle.dumps(remote)) == local
        built = s.run(mod.thought)
    assert built.completions.signature.__name__ == mod.thought().completions.signature.__name__ == "StringSignature"
    assert built.completions.signature.output_fields.keys() == {"reasoning", "qty"}


CACHED_PROPERTY = '''
import functools

BUILT = []


class Index:
    def __init__(self, docs):
        self.docs = docs

    @functools.cached_property
    def vocabulary(self):
        """Every word of the docs."""
        BUILT.append(len(self.docs))
        return sorted({w for d in self.docs for w in d.split()})


def build(docs):
    index = Index(docs)
    return index.vocabulary, index.vocabulary is index.vocabulary, list(BUILT), Index.vocabulary.__doc__


def cached(index):
    return index.__dict__.get("vocabulary"), index.vocabulary
'''


def test_a_class_with_a_cached_property_travels(dx: dspex.Client, usercode: Any) -> None:
    """``functools.cached_property`` (whose Python 3.11 form holds a lock) on a class of the user's
    is one cached property on the worker too: computed once per instance, with its name and doc."""
    mod = usercode(CACHED_PROPERTY)
    with dx.session("p") as s:
        assert s.run(mod.build, ["b a", "c"]) == (["a", "b", "c"], True, [2], "Every word of the docs.")
        index = mod.Index(["z"])
        assert index.vocabulary == ["z"]
        assert s.run(mod.cached, index) == (["z"], ["z"])  # the value cached on the client goes with the instance
        assert s.run(mod.cached, mod.Index(["y"])) == (None, ["y"])
    assert mod.BUILT == [1]  # the client's module saw only its own computation


GENERIC_MODELS = '''
from typing import Generic, TypeVar

import pydantic

T = TypeVar("T")


class Page(pydantic.BaseModel, Generic[T]):
    items: list[T]


class Item(pydantic.BaseModel):
    name: str


def page():
    return Page[Item](items=[Item(name="z")])


def is_a_page_of_items(p):
    return type(p) is Page[Item], isinstance(p, Page[Item]), type(p.items[0]) is Item
'''


def test_a_parametrized_generic_model_is_that_parametrization_on_both_sides(dx: dspex.Client,
                                                                            usercode: Any) -> None:
    """``Page[Item]`` is one class per process (Pydantic caches it): an instance sent or returned
    is of the receiver's ``Page[Item]``, as in-process."""
    mod = usercode(GENERIC_MODELS)
    local = mod.page()
    with dx.session("p") as s:
        assert s.run(mod.is_a_page_of_items, local) == (True, True, True)
        returned = s.run(mod.page)
        assert s.run(lambda: mod.is_a_page_of_items(mod.page())) == (True, True, True)
    assert mod.is_a_page_of_items(returned) == (True, True, True)
    assert returned == local


SCRIPT_LOOKUPS = '''
import json
import sys

import dspex


def run():
    return "the script's run"


def lookup(name):
    return getattr(sys.modules[__name__], name, None) is globals().get(name), hasattr(sys.modules[__name__], name)


def dispatch(name):
    return getattr(sys.modules[__name__], name)()


if __name__ == "__main__":
    local = [dispatch("run"), lookup("run"), lookup("exit_now"), lookup("parse")]
    with dspex.connect(sys.argv[1], timeout=30) as dx, dx.session("p") as s:
        s.run(run)  # the script's run is the session's now
        remote = [s.apply(dispatch, ["run"], timeout=10), s.run(lookup, "run"), s.run(lookup, "exit_now"),
                  s.run(lookup, "parse")]
    print(json.dumps([local, remote]))
'''


def test_the_scripts_main_module_is_the_scripts_in_a_call(code_stack: Stack, tmp_path: Path) -> None:
    """``sys.modules[__name__]`` of a script's function is the script's module, as in-process: a
    name looked up there is the script's, never one of the worker's own ``__main__``
    (worker/__main__.py's ``run`` would start a worker inside the call)."""
    import subprocess

    script = tmp_path / "app.py"
    script.write_text(SCRIPT_LOOKUPS)
    out = subprocess.run([sys.executable, str(script), code_stack.frontend], check=False, env=code_stack.env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    local, remote = json.loads(out.stdout.strip().splitlines()[-1])
    assert remote == local == ["the script's run", [True, True], [True, False], [True, False]]


def test_a_generator_of_your_own_draws_the_in_process_sequence(dx: dspex.Client, usercode: Any) -> None:
    """docs/remote-objects.md: ``random.seed`` at the top of a script seeds the client's generator;
    ``RNG = random.Random(0)`` goes to the session once and draws on across its calls."""
    mod = usercode('''
        import random

        RNG = random.Random(0)


        def draw():
            return RNG.random()
    ''')
    with dx.session("p") as s:
        remote = [s.run(mod.draw) for _ in range(3)]
    seeded = random.Random(0)
    assert remote == [mod.draw() for _ in range(3)] == [seeded.random() for _ in range(3)]


SCRIPT_DUNDERS = '''
"""The script's own docstring."""
import json
import math
import multiprocessing
import sys

import dspex


def dunders():
    main = sys.modules["__main__"]
    return main.__file__, main.__doc__, __file__, __doc__


def spawned_child():
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(math.sqrt, (16.0,))


if __name__ == "__main__":
    with dspex.connect(sys.argv[1], timeout=60) as dx, dx.session("p") as s:
        print(json.dumps([dunders(), s.run(dunders), s.run(spawned_child)]))
'''


def test_the_scripts_main_module_has_the_scripts_file_and_docstring_in_a_call(code_stack: Stack,
                                                                              tmp_path: Path) -> None:
    """``sys.modules["__main__"].__file__`` and ``.__doc__`` (and the bare ``__doc__`` global) in a
    call of a script's function are the script's, as in-process; ``multiprocessing`` still starts
    its children from the worker's ``__main__`` (it reads ``__spec__``, which stays the worker's)."""
    import subprocess

    script = tmp_path / "app.py"
    script.write_text(SCRIPT_DUNDERS)
    out = subprocess.run([sys.executable, str(script), code_stack.frontend], check=False, env=code_stack.env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    local, remote, child = json.loads(out.stdout.strip().splitlines()[-1])
    assert local == [str(script), "The script's own docstring.", str(script), "The script's own docstring."]
    assert remote == local
    assert child == 4.0


@pytest.mark.parametrize("error, raised", [("ValueError", dspex.errors.ProtocolError), ("SystemExit", dspex.RemoteError)])
def test_what_dropping_an_argument_that_failed_to_load_warns_reaches_the_caller(dx: dspex.Client, usercode: Any,
                                                                                error: str,
                                                                                raised: type[BaseException]) -> None:
    """An argument of the user's class whose unpickling on the worker fails (its ``__setstate__``
    raises, an Exception or not) with a coroutine left in its frame: the error is the call's, so
    what dropping it warns ("never awaited") is the call's warning and reaches the caller, not the
    worker's log after the reply."""
    import warnings

    mod = usercode(f'''
        ERROR = {error}

        async def lookup(key):
            return key


        class Fragile:
            def __getstate__(self):
                return {{}}

            def __setstate__(self, state):
                pending = lookup("y")  # noqa: F841 - a coroutine nobody awaits, dropped with the error
                raise ERROR("cannot load here")


        def identity(value):
            return value
    ''')
    with dx.session("p") as s:
        with warnings.catch_warnings(record=True) as warned, pytest.raises(raised, match="cannot load here"):
            warnings.simplefilter("always")
            s.run(mod.identity, mod.Fragile())
        assert [str(w.message) for w in warned] == ["coroutine 'lookup' was never awaited"]



def test_dspy_configure_ownership_is_per_call_not_the_client_processs(dx: dspex.Client, usercode: Any) -> None:
    """docs/remote-objects.md (*Its own DSPy settings*), a documented difference: in-process the
    first thread that configures owns DSPy's configuration for the process, and another thread's
    ``dspy.configure`` raises; through a session each call's thread owns it for that call, so a
    call made from another client thread configures without error."""
    import concurrent.futures
    import subprocess

    import dspy

    mod = usercode('''
        import dspy


        def configure(value):
            dspy.configure(max_errors=value)
            return dspy.settings.max_errors
    ''')
    script = '''
import concurrent.futures, dspy
dspy.configure(max_errors=3)
with concurrent.futures.ThreadPoolExecutor(1) as pool:
    try:
        pool.submit(dspy.configure, max_errors=4).result()
    except RuntimeError as err:
        print(err)
'''
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "dspy.settings can only be changed by the thread that initially configured it."
    with dx.session("p") as s:
        assert s.run(mod.configure, 3) == 3
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert pool.submit(s.run, mod.configure, 4).result() == 4
    assert dspy.settings.max_errors != 4


def test_a_program_configuring_only_in_its_own_thread_raises_through_a_session(dx: dspex.Client, usercode: Any) -> None:
    """docs/remote-objects.md (*Its own DSPy settings*), the documented difference the other way:
    in-process, with nothing configured before, the thread that configures first owns DSPy's
    configuration; through a session the call's own thread owns it from the start."""
    import subprocess

    mod = usercode('''
        import threading

        import dspy


        def configure_in_a_thread():
            said = []

            def setup():
                try:
                    dspy.configure(max_errors=4)
                    said.append(f"configured {dspy.settings.max_errors}")
                except RuntimeError as err:
                    said.append(str(err))

            thread = threading.Thread(target=setup)
            thread.start()
            thread.join()
            return said[0]
    ''')
    out = subprocess.run([sys.executable, "-c", f"import {mod.__name__}; print({mod.__name__}.configure_in_a_thread())"],
                         check=True, capture_output=True, text=True, timeout=60, cwd=os.path.dirname(mod.__file__))
    assert out.stdout.strip() == "configured 4"
    with dx.session("p") as s:
        assert s.run(mod.configure_in_a_thread) == (
            "dspy.settings can only be changed by the thread that initially configured it.")


def test_reloading_a_module_of_your_code_inside_a_call_is_an_import_error(dx: dspex.Client, usercode: Any) -> None:
    """The worker never runs a module's top-level code, so ``importlib.reload`` in a call cannot
    run it again: the session's copy is not the worker's ``sys.modules`` entry (docs/remote-objects.md)."""
    mod = usercode(STATE)
    s = dx.session("p")
    assert [s.run(mod.count) for _ in range(2)] == [1, 2]
    with pytest.raises(ImportError, match=f"module {mod.__name__} not in sys.modules"):
        s.run(lambda: importlib.reload(mod))
    assert s.run(mod.count) == 3  # the session's module state is as the calls left it
    s.close()
