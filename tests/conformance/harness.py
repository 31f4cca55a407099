"""How a conformance case runs its program: in-process or through a session, with one API.

A case receives a ``run`` fixture (parametrized ``inprocess`` / ``session``) and writes DSPy code
the way DSPy's docs do. ``run(fn, *args, **kwargs)`` calls ``fn`` here or ``s.run(fn, ...)`` on the
session's worker; ``run.put(obj)`` is ``obj`` itself here and ``s.put(obj)`` (a handle that reads
like the object) there. ``run.check(program)`` runs the program and, in session mode, also runs it
in-process with fresh DSPy settings and asserts both give the same result (by ``as_data``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
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
