"""A session that rebuilds itself once when its worker is gone (both client kinds).

Written once as steps (:mod:`dspex.client.api`): the client kind drives them, so ``run`` returns
the value with a blocking client and an awaitable with an asyncio one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from dspex.client.api import ClientAPI
from dspex.client.sessionapi import Steps
from dspex.wire.errors import SessionWorkerUnavailable

T = TypeVar("T")


class Rehydrator(Generic[T]):
    """A session that rebuilds itself once when its worker is gone.

    ``rebuild(session)`` recreates the session's objects and returns them; ``run(fn)`` calls
    ``fn(session, objects)`` and, on :class:`SessionWorkerUnavailable`, closes that session, opens
    a new one, calls ``on_rehydrate(error, new_session)`` when given, rebuilds, and retries once.
    Callers at once (threads of a blocking client, tasks of an asyncio one) share it: one of them
    replaces a lost session, and each retries on the replacement.
    With a blocking client the objects are built here; with an asyncio client ``rebuild``, ``fn``
    and ``on_rehydrate`` may be coroutine functions, ``run`` and ``close`` return awaitables, and
    the objects are built by ``await rh.start()`` (or the first run).
    """

    def __init__(self, client: ClientAPI[Any], pool: str, rebuild: Callable[[Any], Any],
                 on_rehydrate: Callable[[Any, Any], Any] | None = None) -> None:
        self.client = client
        self.pool = pool
        self._rebuild = rebuild
        self._on_rehydrate = on_rehydrate
        self.rehydrations = 0
        self.session: Any = client.session(pool)
        self.objects: T
        self._built_for: Any = None  # the session ``objects`` were built on
        # a blocking client builds now; the asyncio client's driver returns an awaitable that runs
        # nothing until awaited (and nobody awaits this one)
        client._drive(self._build())

    def start(self) -> Any:
        """Build the objects if not built yet; returns this Rehydrator (an awaitable of it)."""
        return self.client._drive(self._started())

    def _started(self) -> Steps[Rehydrator[T]]:
        yield from self._build()
        return self

    def _build(self) -> Steps[tuple[Any, T]]:
        """The current session and its objects, built on it first if they are not yet. Callers
        at once (threads, tasks) may each build: each uses its own build; the first is kept."""
        session = self.session
        if self._built_for is session:
            return session, self.objects
        objects = yield self._rebuild(session)
        if self.session is session and self._built_for is not session:
            self.objects, self._built_for = objects, session
        return session, objects

    def run(self, fn: Callable[[Any, T], Any]) -> Any:
        """``fn(session, objects)``, once more on a rebuilt session if the worker was gone."""
        return self.client._drive(self._run(fn))

    def _run(self, fn: Callable[[Any, T], Any]) -> Steps[Any]:
        session, objects = yield from self._build()
        try:
            return (yield fn(session, objects))
        except SessionWorkerUnavailable as err:
            # only the first caller to see this session gone replaces it, before it yields: the
            # others (threads, tasks running at once) retry on its replacement
            replacing = self.session is session
            if replacing:
                self.session = new = self.client.session(self.pool)
                yield session.close(timeout=5)  # drops the broker's record; its worker and refs are gone already
                if self._on_rehydrate is not None:
                    yield self._on_rehydrate(err, new)
            session, objects = yield from self._build()
            if replacing:
                self.rehydrations += 1
        return (yield fn(session, objects))

    def close(self) -> Any:
        return self.session.close()
