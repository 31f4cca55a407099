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
import threading
from collections.abc import Callable, Iterator
from typing import Any

import dspy
import pydantic
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
