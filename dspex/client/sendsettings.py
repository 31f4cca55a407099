"""The calling client's DSPy settings in a session's request: each value sent once per session.

What the calling thread or task configured (:func:`client_dspy_settings`) goes as one ext
of the request's context; its values by the client object's identity, as module globals' values
go (an LM travels once per session), and so do the items of a list (``callbacks``): a callback
the client's code also holds as a global is one object in the session, as in-process, and so is
the object of a method (``rm=RETRIEVER.search``). Functions and classes (``rm=search``) are the
session pickler's, sent once by key like any other.

A setting changed *in place* reaches the next call, as in-process: each request compares an LM
or an adapter (``model``, ``kwargs``, ``cache``, ``num_retries``, ``callbacks``,
``use_native_function_calling``, ...: its attributes but its history and private ones; numbers
and strings by value, lists, tuples and dicts item by item :data:`_PLAIN_DEPTH` deep, anything
else by its ``==``, identity for most) and the items of a list setting
(``dspy.settings.callbacks.append(cb)``) with what they were when the worker got them under the
value's key (``HeldKeys.states``). A changed LM or adapter goes as its new state (its history
aside), which replaces the state of the session's object, the one other objects of the session
hold too; a changed list goes as a new list. Either is named by a new key from then on: a worker
that did not get the change (another worker of a ``hint`` session, a request that never reached
it) lacks that key and gets the value in full (a cache miss). Other objects (a callback, a
retriever) keep the session's state, as module globals do.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from dspex.client import codeindex, senderrors
from dspex.client.bindings import _ATOMS, _Value
from dspex.client.dspycontext import CALL_LOCAL, SETTINGS, names
from dspex.client.sessionpickle import Message, _transient_dumps
from dspex.wire import codestore
from dspex.wire.errors import EncodeError

_PLAIN_DEPTH = 4  # containers in a setting's state nested deeper are compared by their identity


def client_settings(msg: Message) -> tuple[dict[str, Any], list[str]]:
    """The client's DSPy settings request ``msg`` sends, and the names a ``dspy.context`` holds
    (:func:`client_dspy_settings`); none when the session does not send them."""
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
    signature = tuple((k, id(v), _state(v)) for k, v in values.items())
    last = cache.last_settings if msg.trusted else None
    if last is not None and _same(signature, last[0]) and all(k in cache.held.sent for k in last[2]):
        msg.used.update(last[2])
        return last[1]
    wrapped = {k: _by_identity(msg, v, state) for (k, _, state), v in zip(signature, values.values(), strict=True)}
    try:
        ext = make_ext(msg, wrapped)
    except EncodeError as err:
        raise senderrors.settings_error(values, err, _transient_dumps) from None
    keys = tuple(_keys(msg, wrapped.values()))
    if msg.trusted and all(k in cache.held.sent for k in keys):  # by key only: reusable as it is
        msg.settings_sent = (tuple((k, i, _kept(state)) for k, i, state in signature), ext, keys, values)
    return ext


def client_dspy_settings() -> tuple[dict[str, Any], list[str]]:
    """What this process configured of DSPy (``dspy.configure`` / ``dspy.context``) that differs
    from DSPy's defaults, and the names among them that the ``dspy.context`` blocks of the calling
    thread or task hold: those a block named (:data:`dspex.client.dspycontext.named`), and those
    it holds at another value than the configuration's (a block entered where names are not known:
    a thread of DSPy's ``ParallelExecutor``). In-process such a block wins over any
    ``dspy.configure``, the session's own included. Nothing when DSPy was never imported here."""
    module = sys.modules.get(SETTINGS)
    if module is None:
        return {}, []
    try:
        config = module.main_thread_config
        overrides = module.thread_local_overrides.get()
        defaults = module.DEFAULT_CONFIG
    except AttributeError:  # another DSPy layout: send nothing rather than guess
        return {}, []
    pinned: list[str] = []
    if overrides:
        pinned = [k for k, v in overrides.items() if k not in CALL_LOCAL and config.get(k, _MISSING) is not v]
        named = names()
        if named:
            pinned += [k for k in named if k in overrides and k not in pinned]
        config = {**config, **overrides}
    out = {}
    for k, v in config.items():
        default = defaults.get(k, _MISSING)
        if k in pinned or (v is not default and k not in CALL_LOCAL and _differs(v, default)):
            out[k] = v
    return out, pinned


_MISSING = object()
_DEFAULT_ATOMS = (type(None), bool, int, float, str)  # compared by value with DSPy's defaults


def _differs(value: Any, default: Any) -> bool:
    if value is default:
        return False
    if type(value) is type(default) and isinstance(value, _DEFAULT_ATOMS):
        return bool(value != default)
    return not (type(value) is list and type(default) is list and not value and not default)


_stateful: tuple[type, ...] = ()  # DSPy's BaseLM and Adapter, once DSPy is imported


def _state(value: Any) -> Any:
    """What an in-place change of setting ``value`` changes, as it is now (module docstring;
    :func:`_kept` makes what it was when sent); None for a value whose changes in place do not
    travel. Made and compared on every request: two tuples, compared in C."""
    t = type(value)
    if t in _ATOMS:
        return None
    if t is list:
        return value
    global _stateful
    if not _stateful:
        lm = getattr(sys.modules.get("dspy.clients.base_lm"), "BaseLM", None)
        adapter = getattr(sys.modules.get("dspy.adapters.base"), "Adapter", None)
        if not (isinstance(lm, type) and isinstance(adapter, type)):
            return None
        _stateful = (lm, adapter)
    if not isinstance(value, _stateful):
        return None
    attributes = vars(value)
    return tuple(attributes), tuple(attributes.values())


def _kept(state: Any) -> Any:
    """A :func:`_state` as it is now, whatever is changed in place after: a list's items, an
    object's attributes with their containers copied, but its history and private attributes
    (engines, locks: not what a user changes), which stay the same objects, so that the history
    the calls fill does not count as a change (a private attribute rebound does: DSPy's
    warned-once flag costs one needless update)."""
    if state is None:
        return None
    if type(state) is list:
        return list(state)
    names, values = state
    return names, tuple(v if k[0] == "_" or k == "history" else _copied(v) for k, v in zip(names, values, strict=True))


def _copied(value: Any, depth: int = 0) -> Any:
    t = type(value)
    if depth >= _PLAIN_DEPTH:
        return value
    if t is dict:
        return {k: _copied(v, depth + 1) for k, v in value.items()}
    if t is list or t is tuple:
        return t(_copied(v, depth + 1) for v in value)
    return value


def _same(state: Any, sent: Any) -> bool:
    """``state`` (:func:`_state`) is the one ``sent``: equal numbers and strings, equal
    containers, other objects the same by their ``==`` (identity, for most)."""
    try:
        return bool(state == sent)
    except Exception:  # noqa: BLE001 - an object whose == raises (an array): taken as changed
        return False


class _Restated:
    """The session's object under ``key`` with the state of the client's ``obj`` (its history aside)."""

    __slots__ = ("key", "obj")

    def __init__(self, key: str, obj: Any) -> None:
        self.key, self.obj = key, obj

    def __reduce__(self) -> tuple[Any, ...]:
        state = self.obj.__getstate__()
        return codestore._load_held, (self.key,), {k: v for k, v in state.items() if k != "history"}


class _BoundMethod:
    """A method setting (``rm=RETRIEVER.search``) with its object by identity: in the session, the
    method of the session's object, the one the program's code reads as a global too."""

    __slots__ = ("func", "owner")

    def __init__(self, func: Any, owner: Any) -> None:
        self.func, self.owner = func, owner

    def __reduce__(self) -> tuple[Any, ...]:
        return types.MethodType, (self.func, self.owner)


def _by_identity(msg: Message, value: Any, state: Any = None) -> Any:
    if type(value) in _ATOMS or type(value) is types.FunctionType or isinstance(value, type):
        return value  # functions and classes go once per session by key anyway (SessionPickler)
    if type(value) is types.MethodType and not isinstance(value.__self__, (type, types.ModuleType)):
        return _Value(msg.key(value), _BoundMethod(value.__func__, _by_identity(msg, value.__self__)))
    items = type(value)(_by_identity(msg, v) for v in value) if type(value) in (list, tuple) else value
    key = msg.key(value)
    if state is None:
        return _Value(key, items)
    cache = msg.cache
    held = msg.trusted and key in cache.held.sent
    if not held or _same(state, cache.held.states.get(key)):
        if not held:  # the worker gets it in full
            msg.restated.append((value, key, None, _kept(state)))
        return _Value(key, items)
    # changed in place since the worker got it (module docstring)
    new = cache.new_key()
    msg.restated.append((value, new, key, _kept(state)))
    if type(value) is list:
        return _Value(new, items)
    msg.refers(key)  # held (above): marks it used
    return _Value(new, _Restated(key, value))


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
