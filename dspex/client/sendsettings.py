"""The calling client's DSPy settings in a session's request: each value sent once per session.

What the calling thread or task configured (``sendcache.client_dspy_settings``) goes as one ext
of the request's context; its values by the client object's identity, as module globals' values
go (an LM travels once per session), and so do the items of a list (``callbacks``): a callback
the client's code also holds as a global is one object in the session, as in-process, and so is
the object of a method (``rm=RETRIEVER.search``). Functions and classes (``rm=search``) are the
session pickler's, sent once by key like any other.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from dspex.client import codeindex, senderrors
from dspex.client.bindings import _ATOMS, _Value
from dspex.client.sendcache import client_dspy_settings
from dspex.client.sessionpickle import Message, _transient_dumps
from dspex.wire.errors import EncodeError


def client_settings(msg: Message) -> tuple[dict[str, Any], list[str]]:
    """The client's DSPy settings request ``msg`` sends, and the names a ``dspy.context`` holds
    (``sendcache.client_dspy_settings``); none when the session does not send them."""
    return client_dspy_settings() if msg.cache.client_settings else ({}, [])


def settings_ext(msg: Message, make_ext: Callable[[Message, Any], Any],
                 settings: tuple[dict[str, Any], list[str]]) -> Any:
    """The client's DSPy ``settings`` (:func:`client_settings`) for request ``msg`` as one ext
    (``make_ext``); None when there are none. The same settings as the last request's, all held
    by the worker, reuse its ext."""
    cache = msg.cache
    values, msg.pinned = settings
    if not values:
        return None
    signature = tuple((k, id(v)) for k, v in values.items())
    last = cache.last_settings if msg.trusted else None
    if last is not None and last[0] == signature and all(k in cache.sent for k in last[2]):
        msg.used.update(last[2])
        return last[1]
    wrapped = {k: _by_identity(msg, v) for k, v in values.items()}
    try:
        ext = make_ext(msg, wrapped)
    except EncodeError as err:
        raise senderrors.settings_error(values, err, _transient_dumps) from None
    keys = tuple(_keys(msg, wrapped.values()))
    if msg.trusted and all(k in cache.sent for k in keys):  # by key only: reusable as it is
        msg.settings_sent = (signature, ext, keys, values)
    return ext


class _BoundMethod:
    """A method setting (``rm=RETRIEVER.search``) with its object by identity: in the session, the
    method of the session's object, the one the program's code reads as a global too."""

    __slots__ = ("func", "owner")

    def __init__(self, func: Any, owner: Any) -> None:
        self.func, self.owner = func, owner

    def __reduce__(self) -> tuple[Any, ...]:
        return types.MethodType, (self.func, self.owner)


def _by_identity(msg: Message, value: Any) -> Any:
    if type(value) in _ATOMS or type(value) is types.FunctionType or isinstance(value, type):
        return value  # functions and classes go once per session by key anyway (SessionPickler)
    if type(value) is types.MethodType and not isinstance(value.__self__, (type, types.ModuleType)):
        return _Value(msg.key(value), _BoundMethod(value.__func__, _by_identity(msg, value.__self__)))
    items = type(value)(_by_identity(msg, v) for v in value) if type(value) in (list, tuple) else value
    return _Value(msg.key(value), items)


def _keys(msg: Message, values: Iterable[Any]) -> Iterator[str]:
    """The keys the settings' ext refers to: reused as it is only while the worker holds them all."""
    for v in values:
        if type(v) is _Value:
            yield v.key
            inner = v.obj
            yield from _keys(msg, inner if type(inner) in (list, tuple) else
                             (inner.owner,) if type(inner) is _BoundMethod else ())
        elif (type(v) is types.FunctionType or isinstance(v, type)) and codeindex.by_value(v):
            yield msg.key(v)
