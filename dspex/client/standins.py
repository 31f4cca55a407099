"""What a session's pickle writes in place of an object the worker holds or loads by itself: a
code object by content hash, a held object by key, bindings to apply before the code
(:mod:`dspex.client.sessionpickle` writes them; their reducers name functions of
:mod:`dspex.wire.codestore`, which runs them on the worker)."""

from __future__ import annotations

import functools
import pickle
import types
from typing import Any

from dspex.client.bindings import Binding
from dspex.wire import codestore


class CodeRef:
    """A function's code object, sent once per session by content hash."""

    __slots__ = ("code",)

    def __init__(self, code: types.CodeType) -> None:
        self.code = code


class Held:
    """An object the worker holds, by key (the reduction ``SessionPickler._held`` gives it)."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        return codestore._load_held, (self.key,)


@functools.lru_cache(maxsize=4096)
def held_pickle(key: str) -> bytes:
    """The pickle of ``Held(key)``: the same bytes for every request of a held function, made
    once (pickling the reduction looks its loader up by name each time)."""
    return pickle.dumps(Held(key), pickle.HIGHEST_PROTOCOL)


class Rebind:
    """Bindings a request carries beside its code (a store catching up on the session's bindings:
    ``exchange.catch_up``): the worker binds them when it loads this."""

    __slots__ = ("bindings",)

    def __init__(self, bindings: list[Binding]) -> None:
        self.bindings = bindings

    def __reduce__(self) -> tuple[Any, ...]:
        return codestore._load_bindings, (self.bindings,)


class EndOfValue:
    """Pickled after a global's value (``SessionPickler._value``): the pickle left it."""


END_OF_VALUE = EndOfValue()
