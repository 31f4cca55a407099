"""Exceptions of user code as ``RemoteError`` payloads that always encode.

The payload (docs/remote-objects.md): ``{"code": "remote_error", "message", "type" (qualname),
"module", "traceback", "pickled"}``; ``pickled`` is the exception by value (cloudpickle), bounded,
without the attributes that cannot be pickled, absent when it still cannot be pickled or would not
load again, so the client can raise an instance of the original type with its attributes. An exception with a ``__cause__``/``__context__`` also
has ``chain`` (the other links, each such a payload without ``code``) and ``cause``/``context``
(indices: 0 is the exception itself, i is ``chain[i-1]``), ``suppress_context`` when true. Any exception encodes: a ``__str__`` that raises falls
back to ``repr``, lone surrogates are escaped (msgpack only packs valid UTF-8), sizes are bounded.
"""

from __future__ import annotations

import logging
import os
import traceback
import types
from collections.abc import Callable
from typing import Any, TypeVar

import cloudpickle
import msgpack

import dspex
from dspex.wire import byvalue
from dspex.wire.errors import DspexError, ProtocolError
from dspex.wire.remoteerror import MAX_CHAIN, RemoteError
from worker.limits import CallTimedOut

log = logging.getLogger("dspex.worker")

MAX_MESSAGE_CHARS = 16_000
MAX_TRACEBACK_CHARS = 16_000
MAX_PICKLED_BYTES = 1 << 20
MAX_LINK_CHARS = 4_000  # message and traceback of each link
MAX_LINK_PICKLED_BYTES = 64 << 10
INSTALL_HINT = "install it on the workers' environment"
T = TypeVar("T")


def clean_text(text: str, limit: int) -> str:
    """Valid UTF-8 of at most ``limit`` characters (lone surrogates as ``\\udcff`` escapes)."""
    if len(text) > limit:
        text = text[: limit // 2] + f"\n... [{len(text) - limit} characters cut] ...\n" + text[-limit // 2:]
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # noqa: BLE001 - user code's __str__ may raise anything
        try:
            return repr(exc)
        except BaseException:  # noqa: BLE001
            return f"<{type(exc).__name__} with an unprintable message>"


# where the frames of the worker's own machinery that ran a call are (dspex's pseudo-files: "<dspex...")
_OWN_FILES = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
              os.path.dirname(os.path.abspath(dspex.__file__)) + os.sep, "<dspex")


def _from_user_code(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` from its first frame that is not the worker's own: a traceback then reads as
    in-process below the call (the user's function, what it called). All of it when every frame
    is the worker's (an error of the call itself: arguments that do not bind)."""
    start = tb
    while start is not None and start.tb_frame.f_code.co_filename.startswith(_OWN_FILES):
        start = start.tb_next
    return start or tb


def _traceback(exc: BaseException, chain: bool = True) -> str:
    try:
        return "".join(traceback.format_exception(type(exc), exc, _from_user_code(exc.__traceback__), chain=chain))
    except BaseException:  # noqa: BLE001 - a raising __str__ also breaks the formatter
        try:
            frames = "".join(traceback.format_tb(exc.__traceback__))
        except BaseException:  # noqa: BLE001
            frames = ""
        return f"Traceback (most recent call last):\n{frames}{type(exc).__qualname__}: {_message(exc)}\n"


def _pickled(exc: BaseException, limit: int) -> bytes | None:
    data = _loadable_pickle(exc, limit)
    if data is None:
        traveling = _without_what_cannot_travel(exc)
        if traveling is not None:
            data = _loadable_pickle(traveling, limit)
    return data


def _loadable_pickle(exc: BaseException, limit: int) -> bytes | None:
    try:
        data = byvalue.dumps_exception(exc)
        if len(data) > limit:
            return None
        cloudpickle.loads(data)  # an exception whose __init__ needs other args would not load
        return data
    except BaseException:  # noqa: BLE001 - pickling runs user code (__reduce__, __getstate__)
        return None


def _picklable(value: Any) -> bool:
    try:
        byvalue.dumps(value, chain_links=0)
        return True
    except BaseException:  # noqa: BLE001 - pickling runs user code
        return False


def _without_what_cannot_travel(exc: BaseException) -> BaseException | None:
    """A copy of ``exc`` without the attributes that cannot be pickled (a lock, a connection), so
    that its type and its other attributes still travel: without it the client's error would
    fall back to RemoteError's own attributes (``code``) where the user's were. None when every
    attribute pickles, or no copy can be made."""
    try:
        attrs = dict(vars(exc))
        kept = {name: value for name, value in attrs.items() if _picklable(value)}
        if len(kept) == len(attrs):
            return None
        return byvalue.exception_from_state(type(exc), exc.args, kept)
    except BaseException:  # noqa: BLE001 - a class whose __new__ wants other arguments
        return None


def _describe(exc: BaseException, message_chars: int, traceback_text: str, pickled_bytes: int) -> dict[str, Any]:
    cls = type(exc)
    details: dict[str, Any] = {
        "message": clean_text(_message(exc), message_chars),
        "type": clean_text(getattr(cls, "__qualname__", cls.__name__), 500),
        "module": clean_text(str(getattr(cls, "__module__", "builtins")), 500),
        "traceback": traceback_text,
    }
    pickled = _pickled(exc, pickled_bytes)
    if pickled is not None:
        details["pickled"] = pickled
    return details


def _chain(exc: BaseException, details: dict[str, Any]) -> None:
    """Put the ``__cause__``/``__context__`` chain of ``exc`` in its payload (``chain``: the other
    links, each with its own message, type, traceback and pickled form; ``cause``/``context``:
    indices, 0 being ``exc`` itself). Bounded: ``MAX_CHAIN`` links, a cycle is an index back."""
    index = {id(exc): 0}
    order: list[BaseException] = [exc]
    specs: list[dict[str, Any]] = [details]
    n = 0
    while n < len(order):
        link, spec = order[n], specs[n]
        for key, other in (("cause", link.__cause__), ("context", link.__context__)):
            if other is None:
                continue
            if id(other) not in index:
                if len(order) > MAX_CHAIN:
                    continue
                index[id(other)] = len(order)
                order.append(other)
                specs.append(_describe(other, MAX_LINK_CHARS, clean_text(_traceback(other, chain=False), MAX_LINK_CHARS),
                                       MAX_LINK_PICKLED_BYTES))
            spec[key] = index[id(other)]
        if link.__suppress_context__:
            spec["suppress_context"] = True
        n += 1
    if len(specs) > 1:
        details["chain"] = specs[1:]


def with_install_hint(exc: BaseException) -> BaseException:
    """A ModuleNotFoundError of user code on a worker, saying where the module is missing."""
    if type(exc) is not ModuleNotFoundError or not exc.name or INSTALL_HINT in str(exc.msg):
        return exc
    hinted = ModuleNotFoundError(f"{exc.msg} ({INSTALL_HINT})", name=exc.name, path=exc.path)
    hinted.__traceback__, hinted.__cause__, hinted.__context__ = exc.__traceback__, exc.__cause__, exc.__context__
    hinted.__suppress_context__ = exc.__suppress_context__
    if hasattr(exc, "__notes__"):
        hinted.__notes__ = list(exc.__notes__)
    return hinted


def remote_error(exc: BaseException) -> RemoteError:
    """The ``RemoteError`` for an exception user code raised (never raises itself)."""
    exc = with_install_hint(exc)
    details = _describe(exc, MAX_MESSAGE_CHARS, clean_text(_traceback(exc), MAX_TRACEBACK_CHARS), MAX_PICKLED_BYTES)
    try:
        _chain(exc, details)
    except BaseException:  # a chain we cannot describe (user code in __str__...): the error without it
        log.exception("cannot describe the exception chain of %s", type(exc).__qualname__)
        for key in ("chain", "cause", "context", "suppress_context"):
            details.pop(key, None)
    message = details.pop("message")
    return RemoteError(message, **details)


def guarded(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, where user code runs (an op, iterating or encoding user objects): whatever
    it raises is a ``RemoteError``, SystemExit and KeyboardInterrupt too (they never end the
    worker), but dspex's own errors and the call's interruption pass as they are."""
    try:
        return fn(*args)
    except (DspexError, CallTimedOut):
        raise
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything
        error = remote_error(exc)
    # raised out of the except clause, where it would hold the original as its __context__: the
    # original and its traceback's frames go now, within the call, as in-process the caller's
    # except drops them, and what dropping them warns (a coroutine never awaited) is the call's
    raise error from None


def error_frames(err: DspexError) -> list[bytes]:
    """The wire form of a typed error; a payload that will not pack becomes a clean one."""
    try:
        return [msgpack.packb(err.to_wire(), default=str)]
    except Exception as exc:  # noqa: BLE001 - bad text in details (lone surrogates), odd types
        wire = err.to_wire()
        safe: dict[str, Any] = {}
        for key, value in wire.items():
            if isinstance(value, (bytes, int, float, bool)) or value is None:
                safe[str(key)] = value
            else:
                safe[clean_text(str(key), 200)] = clean_text(str(value), MAX_TRACEBACK_CHARS)
        try:
            return [msgpack.packb(safe)]
        except Exception:
            log.exception("unencodable error payload")
            fallback = ProtocolError(f"unencodable error reply ({type(exc).__name__})")
            return [msgpack.packb(fallback.to_wire())]
