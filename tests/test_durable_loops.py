"""Durable sessions carrying what landed on 7 Dec: generator refs stepped with next() and loops
that took items ahead, a generator's return value, a session's event loop kept from call to call
(an asyncio.Queue, an httpx.AsyncClient), dspy.load of a program saved whole, the session's user
module state. Real broker and workers, the pinned worker SIGKILLed by pid, the broker SIGKILLed
and restarted on the same run dir."""

from __future__ import annotations

import asyncio
import re
import subprocess
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import dspex
from tests.harness import Stack, short_tmpdir
from tests.harness.supervisord import Supervised
from tests.test_durable import gone, pid_of
from tests.test_durable_moves import dspexctl

pytestmark = pytest.mark.timeout(180)

CODE = '''
import asyncio

SEEN = []


def count(n):
    for i in range(n):
        yield i
    return f"counted {n}"


def note(x):
    SEEN.append(x)
    return list(SEEN)


def a_queue():
    return asyncio.Queue()


async def wait_empty(q):
    try:
        await asyncio.wait_for(q.get(), 0.01)
    except (TimeoutError, asyncio.TimeoutError):
        return "timeout"


async def put_get(q, x):
    await q.put(x)
    return await q.get()


async def fill(q, x):
    await q.put(x)
    return q.qsize()


def size(q):
    return q.qsize()


def an_http_client():
    import httpx
    return httpx.AsyncClient()


async def closed(c):
    return c.is_closed
'''


def _move(stack: Stack, dx: dspex.Client, s: dspex.Session, *worker_args: str) -> int:
    """SIGKILL the session's worker and start another (as a supervisor would): the pool keeps two."""
    pid = pid_of(s)
    stack.kill(pid)
    gone(dx, "p", pid)
    stack.start_worker("p", *(worker_args or ("--no-dspy",)))
    stack.wait_workers("p", 2)
    return pid


def _restart_broker(stack: Stack) -> None:
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.broker.wait(10)
    stack.start_broker()
    stack.wait_workers("p", 2)


def _not_durable(call: Any) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, [str(w.message) for w in caught if issubclass(w.category, dspex.NotDurableWarning)]


def test_a_generator_ref_half_consumed_then_its_worker_killed(stack: Stack, usercode: Any) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    mod = usercode(CODE)
    s = dx.session("p", durable=True)
    gen, said = _not_durable(lambda: s.run(mod.count, 5))
    assert len(said) == 1 and f"ref {gen.id[:8]} (generator) is not durable" in said[0], said
    assert next(gen) == 0 and next(gen) == 1
    _move(stack, dx, s)
    with pytest.raises(dspex.RefNotFound, match="not durable"):
        next(gen)
    with pytest.raises(dspex.RefNotFound, match="not durable"):
        next(gen)


def test_items_a_loop_took_ahead_across_a_move(stack: Stack, usercode: Any) -> None:
    """The loop's batches took 0, then 1 and 2: 2 was taken from the generator before the move,
    so it is the next item still (for ``next(gen)`` in the body); then RefNotFound, never an item
    the restored worker could not have. What a loop left by break took ahead is dropped (as
    without a move): the next ``next(gen)`` after the move raises too."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    mod = usercode(CODE)
    s = dx.session("p", durable=True)
    gen, said = _not_durable(lambda: s.run(mod.count, 500))
    assert len(said) == 1 and f"ref {gen.id[:8]} (generator) is not durable" in said[0], said
    got = []
    with pytest.raises(dspex.RefNotFound, match=r"\(generator\) is gone: it was not durable \(TypeError: cannot pickle"):
        for item in gen:
            got.append(item)
            if item == 1:
                _move(stack, dx, s)
                got.append(next(gen))
    assert got == [0, 1, 2]
    with pytest.raises(dspex.RefNotFound, match="not durable"):
        next(gen)
    other, _ = _not_durable(lambda: s.run(mod.count, 500))
    for item in other:
        if item == 1:
            break
    _move(stack, dx, s)
    with pytest.raises(dspex.RefNotFound, match="not durable"):
        next(other)


def test_a_generators_return_value_after_a_broker_restart(stack: Stack, usercode: Any) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    mod = usercode(CODE)
    s = dx.session("p", durable=True)
    gen, _ = _not_durable(lambda: s.run(mod.count, 3))
    assert next(gen) == 0
    _restart_broker(stack)
    assert next(gen) == 1 and next(gen) == 2  # the broker moved nothing: the worker holds it
    with pytest.raises(StopIteration) as end:
        next(gen)
    assert end.value.value == "counted 3"


def test_an_asyncio_queue_never_bound_to_a_loop_moves_one_bound_is_named_and_gone(
        stack: Stack, usercode: Any) -> None:
    """A call that waited on a Queue bound it to the session's event loop (kept from call to
    call): it is said not durable on that call, and gone after the move saying why. One never
    waited on (put and get that did not wait) pickles, and comes back with its items."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    mod = usercode(CODE)
    s = dx.session("p", durable=True)
    plain, bound = s.run(mod.a_queue), s.run(mod.a_queue)
    assert _not_durable(lambda: s.run(mod.put_get, plain, 1)) == (1, [])
    out, said = _not_durable(lambda: s.run(mod.wait_empty, bound))
    assert out == "timeout" and len(said) == 1 and f"ref {bound.id[:8]} (asyncio.queues.Queue) is not durable" in said[0]
    assert re.search(r"at \._loop \(asyncio\.\w+\.\w+EventLoop\)\.", said[0]), said  # what holds what fails
    assert s.run(mod.fill, plain, 2) == 1 and s.run(mod.fill, bound, 2) == 1
    assert s.run(mod.fill, bound, 3) == 2  # usable here still
    _move(stack, dx, s)
    assert s.run(mod.size, plain) == 1
    assert s.run(mod.put_get, plain, 3) == 2
    with pytest.raises(dspex.RefNotFound, match=r"\(asyncio.queues.Queue\) is gone: it was not durable"):
        s.run(mod.size, bound)


def test_an_httpx_async_client_is_named_not_durable_and_gone_after_a_move(stack: Stack, usercode: Any) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    mod = usercode(CODE)
    s = dx.session("p", durable=True)
    client, said = _not_durable(lambda: s.run(mod.an_http_client))
    assert len(said) == 1 and f"ref {client.id[:8]} (httpx.AsyncClient) is not durable" in said[0], said
    assert s.run(mod.closed, client) is False  # awaited on the session's kept event loop
    assert s.run(mod.closed, client) is False
    _move(stack, dx, s)
    with pytest.raises(dspex.RefNotFound, match=r"\(httpx.AsyncClient\) is gone: it was not durable \(TypeError"):
        s.run(mod.closed, client)


def test_a_user_modules_state_after_a_broker_restart_and_a_kill(stack: Stack, usercode: Any) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    mod = usercode(CODE)
    s = dx.session("p", durable=True)
    assert s.run(mod.note, 1) == [1]
    assert s.run(mod.note, 2) == [1, 2]
    _restart_broker(stack)
    assert s.run(mod.note, 3) == [1, 2, 3]
    _move(stack, dx, s)
    assert s.run(mod.note, 4) == [1, 2, 3, 4]
    _restart_broker(stack)
    _move(stack, dx, s)
    assert s.run(mod.note, 5) == [1, 2, 3, 4, 5]
    assert mod.SEEN == []


def test_a_move_inside_a_loop_over_a_list_and_an_iterator_stepped_across_one(stack: Stack, usercode: Any) -> None:
    """A list's iterator is durable: the loop and next() go on from where the worker was."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p", durable=True)
    xs = s.put(list(range(40)))
    seen: list[int] = []
    for x in xs:
        seen.append(x)
        if x == 1:
            _move(stack, dx, s)
    assert seen == list(range(40))
    it = s.eval("iter(xs)", {"xs": xs})
    assert next(it) == 0 and next(it) == 1
    _move(stack, dx, s)
    assert (next(it), next(it)) == (2, 3)


PROGRAM = '''
import dspy
from dspy.teleprompt import LabeledFewShot
from dspy.utils import DummyLM

LOADED = []


class QAModule(dspy.Module):
    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question):
        return self.predict(question=question)


def trainset():
    return [dspy.Example(question=f"What is {i}+{i}?", answer=str(2 * i)).with_inputs("question") for i in range(4)]


def save_whole(path):
    dspy.configure(lm=DummyLM([{"answer": "10"}]))
    compiled = LabeledFewShot(k=2).compile(QAModule(), trainset=trainset())
    compiled.save(path, save_program=True)


def load_whole(path):
    dspy.configure(lm=DummyLM([{"answer": str(i)} for i in range(20)]))
    program = dspy.load(path, allow_pickle=True)
    LOADED.append(program)
    return program


def ask(program, question):
    return type(program).__name__, len(program.predict.demos), program(question=question).answer, len(LOADED)

'''


def test_a_program_loaded_whole_with_dspy_load_across_a_kill_and_a_broker_restart(
        stack: Stack, usercode: Any, tmp_path: Any) -> None:
    dx = stack.pool("p:strict_queue", 2)
    mod = usercode(PROGRAM)
    s = dx.session("p", durable=True)
    path = str(tmp_path / "program")
    s.run(mod.save_whole, path)
    program = s.run(mod.load_whole, path)
    assert s.run(mod.ask, program, "a") == ("QAModule", 2, "0", 1)
    _move(stack, dx, s, "--lm-history", "200")
    assert s.run(mod.ask, program, "b") == ("QAModule", 2, "1", 1)
    _restart_broker(stack)
    _move(stack, dx, s, "--lm-history", "200")
    assert s.run(mod.ask, program, "c") == ("QAModule", 2, "2", 1)
    assert s.eval("p is L[0]", {"p": program, "L": s.run(lambda: mod.LOADED)}) is True


THREADS = '''
import datetime
import dspy


def configure():
    dspy.configure(lm=dspy.LM("openai/kept", api_key="k", cache=False))


def in_threads():
    def read():
        return dspy.settings.lm.model, dspy.settings.get("note")

    with dspy.context(note="n"):
        return dspy.Parallel(num_threads=2, disable_progress_bar=True)([(read, {}) for _ in range(3)])


def tz():
    return datetime.timezone(datetime.timedelta(hours=2), "X")


def same(a, b):
    return a is b
'''


def test_settings_in_parallel_threads_time_zones_and_ref_equality_across_moves(stack: Stack, usercode: Any) -> None:
    dx = stack.pool("p:strict_queue", 2)
    mod = usercode(THREADS)
    s = dx.session("p", durable=True)
    s.run(mod.configure)
    assert s.run(mod.in_threads) == [("openai/kept", "n")] * 3
    zone = s.run(mod.tz)
    kept = s.put({"a": 1})
    _move(stack, dx, s, "--lm-history", "200")
    assert s.run(mod.in_threads) == [("openai/kept", "n")] * 3
    _restart_broker(stack)
    _move(stack, dx, s, "--lm-history", "200")
    assert s.run(mod.in_threads) == [("openai/kept", "n")] * 3
    assert s.run(mod.tz) == zone
    assert s.eval("k", {"k": kept}) == {"a": 1}
    assert s.run(mod.same, kept, kept) is True


ASYNC = '''
import asyncio

SEEN = []


async def acount(n):
    for i in range(n):
        yield i


def note(x):
    SEEN.append(x)
    return list(SEEN)
'''


def test_an_async_generator_ref_stepped_with_anext_across_a_move(stack: Stack, usercode: Any) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    mod = usercode(ASYNC)

    async def main() -> None:
        async with dspex.aio.connect(stack.frontend) as adx:
            s = adx.session("p", durable=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                agen = await s.run(mod.acount, 50)
            said = [str(w.message) for w in caught if issubclass(w.category, dspex.NotDurableWarning)]
            assert len(said) == 1 and "not durable" in said[0], said
            assert await anext(agen) == 0
            got = []
            async for x in agen:
                got.append(x)
                if x == 2:
                    break
            assert got == [1, 2]
            assert await s.run(mod.note, 1) == [1]
            pid = int(await s.eval("__import__('os').getpid()"))
            stack.kill(pid)
            await asyncio.to_thread(gone, dx, "p", pid)
            with pytest.raises(dspex.RefNotFound, match="not durable"):
                await anext(agen)
            assert await s.run(mod.note, 2) == [1, 2]
            await s.close()

    asyncio.run(main())


@pytest.fixture
def sup() -> Iterator[Supervised]:
    root = short_tmpdir("dxd")
    stack = Supervised(root, pools=(("p", "strict_queue"),), workers_per_pool=2, heartbeat=0.5, liveness=3,
                       pool_opts="queue_timeout=60", worker_args=("--no-dspy",))
    try:
        stack.start(timeout=120)
        yield stack
    finally:
        stack.close()
        subprocess.run(["rm", "-rf", root], check=False)


def test_dspexctl_workers_recycle_with_a_generator_a_loop_bound_queue_and_module_state(
        sup: Supervised, usercode: Any) -> None:
    mod = usercode(CODE)
    with dspex.connect(sup.frontend, timeout=60) as dx:
        s = dx.session("p", durable=True)
        gen, _ = _not_durable(lambda: s.run(mod.count, 9))
        assert next(gen) == 0
        q = s.run(mod.a_queue)
        out, said = _not_durable(lambda: s.run(mod.wait_empty, q))  # waited on: tied to the worker's loop
        assert out == "timeout" and any("(asyncio.queues.Queue) is not durable" in m for m in said), said
        plain = s.run(mod.a_queue)
        assert s.run(mod.fill, plain, 7) == 1
        assert s.run(mod.note, 1) == [1]
        pid = pid_of(s)
        pinned = next(w for w in dx.status()["pools"]["p"]["workers"] if w["pid"] == pid)
        res = dspexctl(sup, "workers", "recycle", "p", "--worker", pinned["id"])
        assert res.returncode == 0, res.stdout + res.stderr
        assert s.run(mod.note, 2) == [1, 2]
        assert pid_of(s) != pid
        with pytest.raises(dspex.RefNotFound, match=r"generator\) is gone: it was not durable"):
            next(gen)
        with pytest.raises(dspex.RefNotFound, match=r"Queue\) is gone: it was not durable"):
            s.run(mod.size, q)
        assert s.run(mod.put_get, plain, 8) == 7


GLOBALS = '''
SEEN = []
COUNTER = None


def start():
    global COUNTER
    COUNTER = (i for i in range(100))


def step():
    SEEN.append(next(COUNTER))
    return list(SEEN)


def steps(n):
    for _ in range(n):
        yield step()
'''


def test_a_global_left_out_of_the_checkpoint_is_unbound_after_a_move_and_the_name_error_says_why(
        stack: Stack, usercode: Any) -> None:
    """In-process, ``step()`` goes on; after a move the generator is gone. The call that bound it
    said so, and the NameError a later call meets names the global and why it did not come."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    mod = usercode(GLOBALS)
    s = dx.session("p", durable=True)
    _, said = _not_durable(lambda: s.run(mod.start))
    assert len(said) == 1 and f"global COUNTER of {mod.__name__} (generator) is not durable" in said[0], said
    assert s.run(mod.step) == [0] and s.run(mod.step) == [0, 1]
    _move(stack, dx, s)
    with pytest.raises(NameError, match="name 'COUNTER' is not defined") as info:
        s.run(mod.step)
    notes = getattr(info.value, "__notes__", [])
    assert any(f"global COUNTER of {mod.__name__} (generator) was not durable" in n and "TypeError: cannot pickle"
               in n for n in notes), notes
    with pytest.raises(NameError) as info:
        list(s.stream_apply(mod.steps, [2]))  # the same, met by a stream's producer
    notes = getattr(info.value, "__notes__", [])
    assert any(f"global COUNTER of {mod.__name__} (generator) was not durable" in n for n in notes), notes
    _, said = _not_durable(lambda: s.run(mod.start))  # bound again (and said again): SEEN came back whole
    assert len(said) == 1, said
    assert s.run(mod.step) == [0, 1, 0]
    _, said = _not_durable(lambda: s.exec("ticks = (i for i in range(9))\ndef tick():\n    return next(ticks)"))
    assert any("name 'ticks' (generator) is not durable" in m for m in said), said  # and the ref exec returned
    assert s.eval("tick()") == 0
    _move(stack, dx, s)
    for call in (lambda: s.eval("tick()"), lambda: s.eval("next(ticks)")):
        with pytest.raises(NameError) as info:
            call()
        notes = getattr(info.value, "__notes__", [])
        assert any("name 'ticks' (generator) was not durable" in n for n in notes), notes
