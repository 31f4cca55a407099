"""A session's module globals on its worker when the client rebinds them: a value the worker cannot
rebuild, and rebinds from many threads at once on a worker that runs them at once.

User code lives in modules written to a temp dir that only this process has on its path, and the
worker runs in an empty working directory: it reaches that code only by value. Pool ``p``
(``strict_queue``, one worker), pool ``n`` (``strict_queue``, one worker of capacity 4).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import dspex
import dspex.client.exchange
from tests.harness import Stack

UNREBUILDABLE = """
X = 1


def get_x():
    return X


def other():
    return 7


def _rebuild():
    raise ERROR("this value cannot be rebuilt here")


class Unrebuildable:
    def __reduce__(self):
        return (_rebuild, ())
"""


@pytest.fixture(scope="module")
def dx() -> Iterator[dspex.Client]:
    root = tempfile.mkdtemp(prefix="dxb", dir="/tmp")
    empty = os.path.join(root, "empty")
    os.mkdir(empty)
    st = Stack(root)
    try:
        st.start_broker("p:strict_queue", "n:strict_queue")
        st.start_worker("p", "--no-dspy", cwd=empty)
        st.start_worker("n", "--no-dspy", "--capacity", "4", cwd=empty)
        st.wait_workers("p", 1, timeout=90)
        st.wait_workers("n", 1, timeout=90)
        yield st.client(timeout=60)
    finally:
        st.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("error", ["ValueError", "SystemExit"])
@pytest.mark.parametrize("pool", ["p", "n"])
def test_a_rebound_global_the_worker_cannot_rebuild_fails_only_the_calls_that_read_it(
        dx: dspex.Client, usercode: Any, pool: str, error: str) -> None:
    """The client binds a module global to a value whose unpickling raises on the worker: the call
    that reads it fails, naming the global and the error; calls that do not read it work, again
    and again (the session does not send it to catch up); rebound to a good value, it works."""
    mod = usercode(UNREBUILDABLE.replace("ERROR", error))
    s = dx.session(pool)
    assert (s.run(mod.get_x), s.run(mod.other)) == (1, 7)
    mod.X = mod.Unrebuildable()
    for _ in range(2):  # each call that reads it fails alike
        with pytest.raises(dspex.ProtocolError) as info:  # the request did not load: nothing ran
            s.run(mod.get_x)
        assert info.value.message.startswith(f"cannot unpickle the value of module global 'X' of {mod.__name__} here: "
                                             f"{error}: this value cannot be rebuilt here")
        assert info.value.details["name"] == "X"
        for _ in range(3):
            assert s.run(mod.other) == 7
    mod.X = 5
    assert (s.run(mod.get_x), s.run(mod.other)) == (5, 7)
    s.close()


REBINDING = """
X = 0


def read(relied):
    value = X
    assert value >= relied, (value, relied)
    return value
"""


def test_rebinds_from_many_threads_never_go_back_in_time(dx: dspex.Client, usercode: Any) -> None:
    """Threads of one session rebind a module global (each to a larger number, under a lock: the
    order of commits is the order of values) and read it, on a worker that runs the session's calls
    at once. As in-process: the last rebind wins, and each call sees a value at least as new as the
    one its thread bound before it (a binding that arrives late never overwrites a newer one)."""
    mod = usercode(REBINDING)
    s = dx.session("n")
    assert s.run(mod.read, 0) == 0
    lock = threading.Lock()
    counter = iter(range(1, 10_000))

    def thread_body(name: str) -> list[int]:
        got = []
        for _ in range(15):
            with lock:
                value = next(counter)
                mod.X = value
            got.append(s.run(mod.read, value))
        return got

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(thread_body, [f"t{i}" for i in range(8)]))
    assert all(a <= b for got in results for a, b in itertools.pairwise(got))  # no thread sees time go back
    last = mod.X
    assert s.run(mod.read, last) == last
    s.close()


def test_a_rebind_that_reaches_the_worker_late_never_overwrites_a_newer_one(
        dx: dspex.Client, usercode: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread A rebinds X to 1 and its request is encoded (the rebind committed), but it reaches the
    worker after thread B's, which rebound X to 2 since: the worker keeps 2, as in-process the later
    rebind wins, and every later call sees it."""
    mod = usercode(REBINDING)
    s = dx.session("n")
    assert s.run(mod.read, 0) == 0
    real = dspex.client.exchange.encode_request
    encoded, release = threading.Event(), threading.Event()

    def encode_request(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        if threading.current_thread().name == "late":
            encoded.set()
            release.wait(30)  # encoded and committed, not sent yet
        return out

    monkeypatch.setattr(dspex.client.exchange, "encode_request", encode_request)
    got: list[int] = []
    mod.X = 1
    late = threading.Thread(target=lambda: got.append(s.run(mod.read, 1)), name="late")
    late.start()
    try:
        assert encoded.wait(30)
        mod.X = 2
        assert s.run(mod.read, 2) == 2
    finally:
        release.set()
        late.join(30)
    assert got == [2]  # by the time it ran, X was 2
    assert [s.run(mod.read, 2) for _ in range(3)] == [2, 2, 2]
    s.close()
