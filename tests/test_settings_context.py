"""A client's ``dspy.context`` block names the settings it sets, and those win in the session's call.

In-process ``with dspy.context(lm=lm):`` wins over any ``dspy.configure``, even when ``lm`` is the
LM configured already: the user named it. DSPy's ``dspy.context`` copies the whole configuration
into the block, so only the names passed to it tell which settings a block sets. Each case runs the
same steps in-process and through ``s.run`` (sync and asyncio clients) of a session that
configured its own LM, adapter and ``track_usage``, and compares what DSPy's real ``dspy.LM`` sent
to the loopback server (tests/lmserver.py) and what the program saw.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
from typing import Any

import dspy
import pytest

import dspex
from tests.conformance.harness import fresh_dspy_settings
from tests.harness import shared_pool
from tests.lmserver import LMServer

pytestmark = pytest.mark.timeout(120)

_nonce = itertools.count()


@pytest.fixture(scope="module")
def dx() -> Iterator[dspex.Client]:
    yield from shared_pool("p:strict_queue", 1)


@pytest.fixture(scope="module")
def server() -> Iterator[LMServer]:
    with LMServer() as lms:
        yield lms


def configure_own(base: str) -> None:
    """The session's own settings (in-process: the program's own ``dspy.configure``)."""
    dspy.configure(lm=dspy.LM("openai/own", api_base=base, api_key="k", cache=False),
                   adapter=dspy.JSONAdapter(), track_usage=False)


def seen(question: str) -> tuple[str, str, bool]:
    """The model the LM call went to, the adapter and ``track_usage`` the program saw."""
    dspy.Predict("question -> answer")(question=question)
    return str(dspy.settings.lm.model), type(dspy.settings.adapter).__name__, bool(dspy.settings.track_usage)


def configure_own_then_seen(base: str, question: str) -> tuple[str, str, bool]:
    configure_own(base)
    return seen(question)


def _lm(server: LMServer) -> dspy.LM:
    return dspy.LM("openai/m", api_base=server.base, api_key="k", cache=False)


def _steps(server: LMServer) -> Generator[tuple[Callable[..., Any], tuple[Any, ...]], Any, list[Any]]:
    """The client configures ``lm``, an adapter and ``track_usage``; the program configures its own;
    then blocks around calls name some of the client's same objects again, or others. Yields each
    call (function, arguments) from inside its blocks, and gets its result back."""
    lm, adapter = _lm(server), dspy.ChatAdapter()
    out: list[Any] = []
    with fresh_dspy_settings():
        dspy.configure(lm=lm, adapter=adapter, track_usage=True)
        yield configure_own, (server.base,)
        out.append((yield seen, (f"q{next(_nonce)}",)))  # the session's own
        with dspy.context(lm=lm):  # named: the client's, though configured already
            out.append((yield seen, (f"q{next(_nonce)}",)))
            with dspy.context(trace=[]), dspy.context(adapter=adapter):  # nested: lm and adapter named
                out.append((yield seen, (f"q{next(_nonce)}",)))
            out.append((yield configure_own_then_seen, (server.base, f"q{next(_nonce)}")))  # the block still wins
        with dspy.context(track_usage=True):
            out.append((yield seen, (f"q{next(_nonce)}",)))
        with dspy.context(adapter=dspy.ChatAdapter()):  # an unrelated block: lm stays the session's
            out.append((yield seen, (f"q{next(_nonce)}",)))
        with dspy.context():
            out.append((yield seen, (f"q{next(_nonce)}",)))
    return out


def _drive(server: LMServer, run: Callable[..., Any]) -> tuple[list[Any], list[str]]:
    """:func:`_steps` with each call made by ``run`` (in the blocks' context); what the LM server got."""
    since = len(server.completions())
    steps = _steps(server)
    try:
        call = next(steps)
        while True:
            call = steps.send(run(call[0], *call[1]))
    except StopIteration as stop:
        return stop.value, _models(server, since)


_EXPECTED = [("openai/own", "JSONAdapter", False),
             ("openai/m", "JSONAdapter", False),
             ("openai/m", "ChatAdapter", False),
             ("openai/m", "JSONAdapter", False),
             ("openai/own", "JSONAdapter", True),
             ("openai/own", "ChatAdapter", False),
             ("openai/own", "JSONAdapter", False)]


def _models(server: LMServer, since: int) -> list[str]:
    return [str(c.body.get("model")) for c in server.completions()[since:]]


def _in_process(server: LMServer) -> tuple[list[Any], list[str]]:
    return _drive(server, lambda f, *args: f(*args))


def test_a_context_naming_the_configured_lm_wins_over_the_sessions_own(dx: dspex.Client, server: LMServer) -> None:
    expected = _in_process(server)
    assert expected[0] == _EXPECTED
    s = dx.session("p")
    try:
        got = _drive(server, s.run)
    finally:
        s.close(timeout=10)
    assert got == expected


def test_an_asyncio_clients_context_naming_the_configured_lm_wins(dx: dspex.Client, server: LMServer) -> None:
    expected = _in_process(server)

    async def main() -> tuple[list[Any], list[str]]:
        async with dspex.aio.connect(dx.endpoint, timeout=20) as adx:
            s = adx.session("p")
            since = len(server.completions())
            steps = _steps(server)
            try:
                call = next(steps)
                while True:  # awaited in the blocks: the generator runs in this task's context
                    call = steps.send(await s.run(call[0], *call[1]))
            except StopIteration as stop:
                out: list[Any] = stop.value
            await s.close()
            return out, _models(server, since)

    assert asyncio.run(main()) == expected


def test_the_names_of_a_context_are_known_when_dspy_is_imported_after_dspex() -> None:
    """DSPy imported after dspex's client: ``dspy.context``, bound at DSPy's import, records them
    too, and DSPy's ``ParallelExecutor`` carries them into its threads."""
    script = (
        "import dspex\nfrom dspex.client.sendsettings import client_dspy_settings\n"
        "import dspy\nfrom dspy.utils import DummyLM\nfrom dspy.utils.parallelizer import ParallelExecutor\n"
        "lm = DummyLM([])\ndspy.configure(lm=lm)\n"
        "with dspy.context(lm=lm):\n    print(client_dspy_settings()[1])\n"
        "    print(ParallelExecutor(num_threads=2, disable_progress_bar=True)"
        ".execute(lambda _: client_dspy_settings()[1], [0])[0])\n"
        "with dspy.context(adapter=dspy.JSONAdapter()):\n    print(client_dspy_settings()[1])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split("\n")[:3] == ["['lm']", "['lm']", "['adapter']"]


def _in_parallel_executor(run: Callable[..., Any]) -> Callable[..., Any]:
    """``run`` made in a thread of DSPy's ``ParallelExecutor`` (as ``dspy.Parallel``,
    ``module.batch`` and ``Evaluate(num_threads=...)`` make their calls), entered inside the blocks:
    the executor copies DSPy's settings into its threads, not the calling thread's context."""
    from dspy.utils.parallelizer import ParallelExecutor

    def in_thread(f: Callable[..., Any], *args: Any) -> Any:
        executor = ParallelExecutor(num_threads=2, max_errors=1, disable_progress_bar=True)
        got = executor.execute(lambda _: run(f, *args), [0])
        assert not executor.failed_indices, executor.exceptions_map
        return got[0]

    return in_thread


def _in_evaluate(run: Callable[..., Any]) -> Callable[..., Any]:
    """``run`` made by ``dspy.Evaluate(num_threads=2)``'s threads, as a program's call."""

    def in_thread(f: Callable[..., Any], *args: Any) -> Any:
        got: list[Any] = []

        def metric(example: Any, prediction: Any, trace: Any = None) -> bool:
            got.append(prediction.value)
            return True

        dev = [dspy.Example(x=0).with_inputs("x")]
        dspy.Evaluate(devset=dev, metric=metric, num_threads=2, display_progress=False,
                      provide_traceback=True)(lambda x: dspy.Prediction(value=run(f, *args)))
        assert len(got) == 1, "the call failed (logged above)"
        return got[0]

    return in_thread


@pytest.mark.parametrize("threads", [_in_parallel_executor, _in_evaluate])
def test_a_context_around_dspys_parallel_threads_wins_as_on_the_calling_thread(
        dx: dspex.Client, server: LMServer, threads: Callable[..., Any]) -> None:
    """In-process a ``ParallelExecutor`` thread holds the blocks of the thread that started it;
    through a session the blocks' names win there too, as on the calling thread."""
    s = dx.session("p")
    try:
        got = _drive(server, threads(s.run))
    finally:
        s.close(timeout=10)
    assert got[0] == _EXPECTED


def test_an_asyncify_thread_has_the_names_of_the_blocks_around_it(dx: dspex.Client, server: LMServer) -> None:
    """``dspy.asyncify`` runs its program in a thread of anyio's, which copies the context."""
    s = dx.session("p")

    def in_thread(f: Callable[..., Any], *args: Any) -> Any:
        return asyncio.run(dspy.asyncify(lambda: s.run(f, *args))())  # type: ignore[arg-type]

    try:
        got = _drive(server, in_thread)
    finally:
        s.close(timeout=10)
    assert got[0] == _EXPECTED


def _in_a_pool_thread(drive: Callable[[], Any]) -> Any:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(drive).result(timeout=100)


def _in_a_parallel_executor_thread(drive: Callable[[], Any]) -> Any:
    from dspy.utils.parallelizer import ParallelExecutor

    executor = ParallelExecutor(num_threads=2, max_errors=1, disable_progress_bar=True)
    got = executor.execute(lambda _: drive(), [0])
    assert not executor.failed_indices, executor.exceptions_map
    return got[0]


@pytest.mark.parametrize("thread", [_in_a_pool_thread, _in_a_parallel_executor_thread])
def test_blocks_entered_in_another_thread_win_in_its_calls(dx: dspex.Client, server: LMServer,
                                                           thread: Callable[..., Any]) -> None:
    """The blocks entered in a thread of the client's own (a ``concurrent.futures`` pool's), or
    of DSPy's ``ParallelExecutor``, around the calls made there."""
    s = dx.session("p")
    try:
        got = thread(lambda: _drive(server, s.run))
    finally:
        s.close(timeout=10)
    assert got[0] == _EXPECTED


_EARLY_CLIENT = '''
import sys
import dspy
from dspy.utils.parallelizer import ParallelExecutor

base, endpoint = sys.argv[1], sys.argv[2]


def configure_own(base):
    dspy.configure(lm=dspy.LM("openai/own", api_base=base, api_key="k", cache=False), adapter=dspy.JSONAdapter())


def seen(question):
    dspy.Predict("question -> answer")(question=question)
    return [str(dspy.settings.lm.model), type(dspy.settings.adapter).__name__]


lm, adapter = dspy.LM("openai/m", api_base=base, api_key="k", cache=False), dspy.ChatAdapter()
dspy.configure(lm=lm, adapter=adapter)
with dspy.context(adapter=adapter):  # entered before dspex's client is loaded: named all the same
    with dspy.context(lm=lm):
        import dspex
        dx = dspex.connect(endpoint, timeout=20)
        s = dx.session("p")
        s.run(configure_own, base)
        print(s.run(seen, "q1"))
        with dspy.context(track_usage=False):  # a block of the loaded client's adds its names
            print(s.run(seen, "q2"))
        print(ParallelExecutor(num_threads=2, disable_progress_bar=True).execute(lambda q: s.run(seen, q), ["q3"])[0])
    print(s.run(seen, "q4"))  # the inner block left: its lm no longer named
with dspy.context(track_usage=False):  # both left: a later block names only its own
    print(s.run(seen, "q5"))
s.close(timeout=10)
dx.close()
'''


def test_blocks_entered_before_dspexs_client_loaded_are_named_as_later_ones(
        dx: dspex.Client, server: LMServer, tmp_path: Any) -> None:
    """``with dspy.context(...): import dspex ...``: the blocks already open when dspex's client
    loads name their settings as a block entered after (the rule of the first test)."""
    script = tmp_path / "early_client.py"
    script.write_text(_EARLY_CLIENT)
    out = subprocess.run([sys.executable, str(script), server.base, dx.endpoint], capture_output=True,
                         text=True, timeout=100, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:5] == ["['openai/m', 'ChatAdapter']"] * 3 + [
        "['openai/own', 'ChatAdapter']", "['openai/own', 'JSONAdapter']"]
