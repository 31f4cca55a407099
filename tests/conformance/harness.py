"""How a conformance case runs its program: in-process or through a session, with one API.

A case receives a ``run`` fixture (parametrized ``inprocess`` / ``session``) and writes DSPy code
the way DSPy's docs do. ``run(fn, *args, **kwargs)`` calls ``fn`` here or ``s.run(fn, ...)`` on the
session's worker; ``run.put(obj)`` is ``obj`` itself here and ``s.put(obj)`` (a handle that reads
like the object) there. ``run.check(program)`` runs the program and, in session mode, also runs it
in-process with fresh DSPy settings and asserts both give the same result (by ``as_data``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib
import inspect
import pathlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import dspy
import pydantic
import pytest
from dspy.dsp.utils.utils import dotdict

import dspex

# the module, not the ``dspy.settings`` object the package re-exports under the same name
dspy_settings = importlib.import_module("dspy.dsp.utils.settings")

INPROCESS = "inprocess"
SESSION = "session"


@contextlib.contextmanager
def fresh_dspy_settings() -> Iterator[None]:
    """Run a block with DSPy's settings as in a new process, then put the old ones back.

    DSPy keeps its configuration in module globals (the main-thread config and the thread or task
    that may call ``dspy.configure``): resetting them makes in-process cases hermetic.
    """
    saved_config = dict(dspy_settings.main_thread_config)
    saved_owner = (dspy_settings.config_owner_thread_id, dspy_settings.config_owner_async_task)
    dspy_settings.main_thread_config.clear()
    dspy_settings.main_thread_config.update(copy.deepcopy(dspy_settings.DEFAULT_CONFIG))
    dspy_settings.config_owner_thread_id = None
    dspy_settings.config_owner_async_task = None
    token = dspy_settings.thread_local_overrides.set(dotdict())
    try:
        yield
    finally:
        dspy_settings.thread_local_overrides.reset(token)
        dspy_settings.main_thread_config.clear()
        dspy_settings.main_thread_config.update(saved_config)
        dspy_settings.config_owner_thread_id, dspy_settings.config_owner_async_task = saved_owner


def as_data(value: Any) -> Any:
    """A comparable rendering of a program's result: records by class and fields, models dumped."""
    if isinstance(value, dspy.Example):  # Prediction too
        return (type(value).__name__, {k: as_data(v) for k, v in value.items()})
    if isinstance(value, pydantic.BaseModel):
        return (type(value).__qualname__, as_data(value.model_dump()))
    if isinstance(value, dict):
        return {as_data(k): as_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_data(v) for v in value]
    if isinstance(value, BaseException):
        return (type(value).__name__, str(value))
    if isinstance(value, dspex.Ref):
        return ("Ref", value.type_name)
    return value


class Runner:
    """Runs the DSPy code of a case in one place (see the module docstring)."""

    mode = ""

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def put(self, obj: Any) -> Any:
        raise NotImplementedError

    def check(self, program: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self(program, *args, **kwargs)

    @contextlib.contextmanager
    def other_worker(self) -> Iterator[Runner]:
        """A runner for a second process: another worker of the pool (in-process: fresh settings)."""
        raise NotImplementedError
        yield self


class InProcess(Runner):
    mode = INPROCESS

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("timeout", None)
        return fn(*args, **kwargs)

    def put(self, obj: Any) -> Any:
        return obj

    @contextlib.contextmanager
    def other_worker(self) -> Iterator[Runner]:
        with fresh_dspy_settings():
            yield InProcess()


class ThroughSession(Runner):
    mode = SESSION

    def __init__(self, session: dspex.Session) -> None:
        self.s = session

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.s.run(fn, *args, **kwargs)

    def put(self, obj: Any) -> Any:
        return self.s.put(obj)

    @contextlib.contextmanager
    def other_worker(self) -> Iterator[Runner]:
        """A new session pinned to another worker than this one's (the broker pins new sessions to
        the worker with the fewest; a few tries cover sessions other cases left open)."""
        if not self.s.worker:
            self.s.run(int)  # pin this session first
        tried: list[dspex.Session] = []
        try:
            for _ in range(6):
                other = self.s.client.session(self.s.pool)
                tried.append(other)
                other.run(int)
                if other.worker != self.s.worker:
                    yield ThroughSession(other)
                    return
            raise AssertionError(f"no second worker in pool {self.s.pool}")
        finally:
            for other in tried:
                other.close(timeout=10)

    def check(self, program: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        assert threading.current_thread() is threading.main_thread()
        with fresh_dspy_settings():
            expected = program(*args, **kwargs)
        got = self.s.run(program, *args, **kwargs)
        assert as_data(got) == as_data(expected), "through a session the program gave another result than in-process"
        return got


class AsyncRunner:
    """The asyncio twin of :class:`Runner`: ``await arun(fn, *args, **kwargs)`` is ``fn(...)``
    (awaited when it returns an awaitable, as the worker awaits it) here, ``await s.run(fn, ...)``
    through a ``dspex.aio`` session there. ``arun.go(main)`` runs ``main(arun)`` in a new event
    loop (``asyncio.run``), with the session open in session mode; ``arun.session()`` opens
    another session of the same client there."""

    mode = ""

    async def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def go(self, main: Callable[[AsyncRunner], Any]) -> Any:
        raise NotImplementedError

    def session(self) -> AsyncRunner:
        raise NotImplementedError

    def check(self, main: Callable[[AsyncRunner], Any]) -> Any:
        return self.go(main)


class AsyncInProcess(AsyncRunner):
    mode = INPROCESS

    async def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    def go(self, main: Callable[[AsyncRunner], Any]) -> Any:
        return asyncio.run(main(self))

    def session(self) -> AsyncRunner:
        return self


class AsyncThroughSession(AsyncRunner):
    mode = SESSION

    def __init__(self, frontend: str, pool: str) -> None:
        self.frontend, self.pool = frontend, pool
        self.client: Any = None
        self.s: Any = None

    async def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self.s.run(fn, *args, **kwargs)

    def go(self, main: Callable[[AsyncRunner], Any]) -> Any:
        async def in_a_session() -> Any:
            async with dspex.aio.connect(self.frontend, timeout=60) as client:
                self.client, self.s = client, client.session(self.pool)
                try:
                    return await main(self)
                finally:
                    await self.s.close(timeout=10)

        return asyncio.run(in_a_session())

    def session(self) -> AsyncRunner:
        other = AsyncThroughSession(self.frontend, self.pool)
        other.client, other.s = self.client, self.client.session(self.pool)
        return other

    def check(self, main: Callable[[AsyncRunner], Any]) -> Any:
        """Run ``main`` in-process (fresh DSPy settings) and through the session: the same result."""
        with fresh_dspy_settings():
            expected = AsyncInProcess().go(main)
        got = self.go(main)
        assert as_data(got) == as_data(expected), \
            f"through a session the program gave another result than in-process: {got!r} != {expected!r}"
        return got


def dspy_test_id(test: Callable[..., Any]) -> str:
    """The pytest id of a DSPy test function copied here as ``dspy_test_*``: DSPy's own name."""
    return test.__name__.removeprefix("dspy_")


def dspy_test_params(test: Callable[..., Any]) -> list[tuple[Any, ...]]:
    """The argument tuples of a DSPy test function's one ``pytest.mark.parametrize``, as DSPy wrote it."""
    (mark,) = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
    names, values = mark.args[0], mark.args[1]
    several = len(names.split(",") if isinstance(names, str) else names) > 1
    rows = [getattr(v, "values", v) for v in values]  # a ``pytest.param(...)`` row keeps its values there
    return [tuple(row) if several else (row,) for row in rows]


PARAMETER_SET = type(pytest.param())  # a ``pytest.param(...)`` row of a parametrize mark

# What DSPy 3.4.1 itself warns while its own tests run (DSPy runs them with warnings shown, not
# raised): its deprecations of the APIs those tests exercise, and pydantic's schema warning about
# litellm's types. The marks of every DSPy test module copied here whole (``pytestmark``).
DSPY_TEST_WARNINGS = [
    pytest.mark.filterwarnings("ignore:Item '.*' on TypedDict class:UserWarning"),
    pytest.mark.filterwarnings("ignore:ProgramOfThought is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Implementing custom LMs through BaseLM:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Passing OpenAI-style message dictionaries:DeprecationWarning"),
]


def dspy_test_cases(tests: list[Callable[..., Any]]) -> list[Any]:
    """``(test, kwargs)`` pytest params for DSPy test functions: one per row of their
    ``pytest.mark.parametrize`` marks (stacked marks multiply, as in pytest), named as DSPy's."""
    cases: list[Any] = []
    for test in tests:
        rows: list[tuple[dict[str, Any], list[str]]] = [({}, [])]
        for mark in [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]:
            names = mark.args[0]
            names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
            ids = mark.kwargs.get("ids")
            values = [v.values if isinstance(v, PARAMETER_SET) else v for v in mark.args[1]]
            marked_ids = [v.id if isinstance(v, PARAMETER_SET) else None for v in mark.args[1]]
            expanded = []
            for i, value in enumerate(values):
                row = dict(zip(names, value if len(names) > 1 else (value,), strict=True))
                label = marked_ids[i] or (ids[i] if isinstance(ids, list) else str(i))
                expanded += [({**kwargs, **row}, [*labels, label]) for kwargs, labels in rows]
            rows = expanded
        name = dspy_test_id(test)
        cases += [pytest.param(test, kwargs, id=f"{name}[{'-'.join(labels)}]" if labels else name)
                  for kwargs, labels in rows]
    return cases


def _pytest_fixtures(test: Callable[..., Any], tmp_path: pathlib.Path,
                     monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    taken = inspect.signature(test).parameters
    return {name: value for name, value in (("tmp_path", tmp_path), ("monkeypatch", monkeypatch)) if name in taken}


def run_dspy_test(test: Callable[..., Any], tmp_path: pathlib.Path, /, **kwargs: Any) -> Any:
    """Call a DSPy test function as pytest would: its parameters, ``tmp_path`` if it takes it, and a
    ``monkeypatch`` of this process (undone when it returns) if it takes one. The program of a case:
    it runs where the case runs it."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return test(**kwargs, **_pytest_fixtures(test, tmp_path, monkeypatch))


def run_dspy_test_from(root: pathlib.Path, test: Callable[..., Any], tmp_path: pathlib.Path, /,
                       **kwargs: Any) -> Any:
    """:func:`run_dspy_test` in ``root`` as the working directory: DSPy's tests that open files by
    paths relative to DSPy's repository (``open("tests/teleprompt/...json")``) run from its root."""
    with contextlib.chdir(root):
        return run_dspy_test(test, tmp_path, **kwargs)


async def arun_dspy_test(test: Callable[..., Any], tmp_path: pathlib.Path, /, **kwargs: Any) -> Any:
    """:func:`run_dspy_test` of an ``async def`` test, awaited."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return await test(**kwargs, **_pytest_fixtures(test, tmp_path, monkeypatch))
