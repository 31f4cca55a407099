"""Functions made together share their closure cells in a session, as in-process
(docs/remote-objects.md, *A session is your own Python, remembered*: closures).

The code lives in a script's ``__main__`` run as a subprocess, the workers in an empty working
directory: they reach it only by value. Each script prints what its steps give in-process and
through a session; the two must be the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Stack


@pytest.fixture(scope="module")
def cell_stack() -> Iterator[Stack]:
    root = tempfile.mkdtemp(prefix="dxc", dir="/tmp")
    empty = os.path.join(root, "empty")
    os.mkdir(empty)
    st = Stack(root)
    try:
        st.start_broker("p:strict_queue")
        st.start_worker("p", cwd=empty)
        st.wait_workers("p", 1, timeout=90)
        yield st
    finally:
        st.close()
        shutil.rmtree(root, ignore_errors=True)


def run_script(stack: Stack, tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Any:
    script = tmp_path / "app.py"
    script.write_text(text)
    out = subprocess.run([sys.executable, str(script), stack.frontend], check=False, env={**stack.env, **(env or {})},
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


STEPS = '''
import json
import sys

import dspex


def make_counter():
    n = 0

    def inc():
        nonlocal n
        n += 1
        return n

    def get():
        return n

    return inc, get


def make_box():
    items = []
    total = 0

    def add(x):
        nonlocal total
        items.append(x)
        total += x
        return total

    class Report:
        def summary(self):
            return (list(items), total)

    return add, Report


def make_setting():
    level = "low"

    def read():
        return level

    def set_here(value):  # called on the client only: it rebinds the cell there
        nonlocal level
        level = value

    return read, set_here


def steps(run):
    out = {}
    inc, get = make_counter()
    out["get before inc"] = run(get)
    inc2, get2 = make_counter()
    out["inc inc get"] = [run(inc2), run(inc2), run(get2)]
    inc3, get3 = make_counter()
    out["one call"] = run(lambda: (inc3(), inc3(), get3()))
    out["after one call"] = [run(inc3), run(get3)]
    add, Report = make_box()
    out["class method"] = [run(add, 2), run(add, 3), run(lambda: Report().summary())]
    read, set_here = make_setting()
    out["rebound between new functions"] = [run(read)]
    set_here("high")
    out["rebound between new functions"].append(run(lambda: read()))
    set_here("top")
    out["rebound between calls"] = run(read)
    out["a new closure over a loop variable"] = [run(lambda: limit * 2) for limit in (1, 2, 3)]  # noqa: B023
    return out


if __name__ == "__main__":
    local = steps(lambda fn, *args: fn(*args))
    with dspex.connect(sys.argv[1], timeout=60) as dx, dx.session("p") as s:
        remote = steps(s.run)
    print(json.dumps([local, remote]))
'''


def test_functions_made_together_share_their_cells(cell_stack: Stack, tmp_path: Path) -> None:
    local, remote = run_script(cell_stack, tmp_path, STEPS)
    assert local == {"get before inc": 0, "inc inc get": [1, 2, 2], "one call": [1, 2, 2], "after one call": [3, 3],
                     "class method": [2, 5, [[2, 3], 5]], "rebound between new functions": ["low", "high"],
                     "rebound between calls": "top", "a new closure over a loop variable": [2, 4, 6]}
    assert remote == local


ASYNC_STEPS = STEPS.replace('''if __name__ == "__main__":''', '''
async def remote_steps(endpoint):
    import asyncio

    async with dspex.aio.connect(endpoint, timeout=60) as dx:
        s = dx.session("p")
        try:
            loop = asyncio.get_running_loop()
            # the steps call run synchronously: each call is awaited on the loop from a thread
            return await asyncio.to_thread(
                steps, lambda fn, *args: asyncio.run_coroutine_threadsafe(s.run(fn, *args), loop).result())
        finally:
            await s.close()


if __name__ == "__main__":
    import asyncio
    import dspex.aio
    local = steps(lambda fn, *args: fn(*args))
    remote = asyncio.run(remote_steps(sys.argv[1]))
    print(json.dumps([local, remote]))


if False:''')


def test_the_asyncio_client_shares_them_too(cell_stack: Stack, tmp_path: Path) -> None:
    local, remote = run_script(cell_stack, tmp_path, ASYNC_STEPS)
    assert remote == local


BOUND = '''
import gc
import json
import sys
import time

import dspex


class Probe:
    """The content of the counters' cells: the worker counts its live instances."""


def make_counter():
    n = Probe()
    n.count = 0

    def inc():
        n.count += 1
        return n.count

    def get():
        return n.count

    return inc, get


def live_probes():
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o).__name__ == "Probe" and type(o).__module__ == "__main__")


if __name__ == "__main__":
    with dspex.connect(sys.argv[1], timeout=60) as dx:
        s = dx.session("p")
        seen = []
        for _ in range(30):  # 30 counters, 60 functions sharing 30 cells: far over the code cache of 8
            inc, get = make_counter()
            s.run(inc)
            seen.append(s.run(get))
        cache = s.sender
        held = [s.run(live_probes), len(cache.held.cells), len(cache.held.cells.closures)]
        s.close()
        other = dx.session("p")  # the same worker (the pool has one): the closed session's cells are gone
        deadline = time.monotonic() + 20
        while other.run(live_probes) and time.monotonic() < deadline:
            time.sleep(0.05)
        print(json.dumps([seen, *held, other.run(live_probes), len(cache.held.cells)]))
'''


def test_shared_cells_live_only_while_the_session_holds_a_function_of_theirs(cell_stack: Stack, tmp_path: Path) -> None:
    seen, live, client_cells, client_closures, after_close, client_after_close = run_script(
        cell_stack, tmp_path, BOUND, {"DSPEX_CODE_CACHE": "8"})
    assert seen == [1] * 30  # each get shares its inc's cell
    # the worker holds a counter's cell only in the functions it still holds: at most the 8 of the
    # code cache's bound (counted on the worker: the instances the cells hold)
    assert 1 <= live <= 8
    assert client_cells <= 8 and client_closures <= 8  # the client forgot the rest with their functions
    assert after_close == 0 and client_after_close == 0  # a closed session's are freed on both sides
