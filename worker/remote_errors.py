"""Exceptions of user code as ``RemoteError`` payloads that always encode.

The payload (docs/remote-objects.md): ``{"code": "remote_error", "message", "type" (qualname),
"module", "traceback", "pickled"}``; ``pickled`` is the exception by value (cloudpickle), bounded,
absent when it cannot be pickled or would not load again, so the client can raise an instance
of the original type with its attributes. Any exception encodes: a ``__str__`` that raises falls
back to ``repr``, lone surrogates are escaped (msgpack only packs valid UTF-8), sizes are bounded.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import cloudpickle
import msgpack

from dspex import byvalue
from dspex.errors import DspexError, ProtocolError, RemoteError

log = logging.getLogger("dspex.worker")

MAX_MESSAGE_CHARS = 16_000
MAX_TRACEBACK_CHARS = 16_000
MAX_PICKLED_BYTES = 1 << 20


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


def _traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:  # noqa: BLE001 - a raising __str__ also breaks the formatter
        try:
            frames = "".join(traceback.format_tb(exc.__traceback__))
        except BaseException:  # noqa: BLE001
            frames = ""
        return f"Traceback (most recent call last):\n{frames}{type(exc).__qualname__}: {_message(exc)}\n"


def _pickled(exc: BaseException) -> bytes | None:
    try:
        data = byvalue.dumps_exception(exc)
        if len(data) > MAX_PICKLED_BYTES:
            return None
        cloudpickle.loads(data)  # an exception whose __init__ needs other args would not load
        return data
    except BaseException:  # noqa: BLE001 - pickling runs user code (__reduce__, __getstate__)
        return None


def remote_error(exc: BaseException) -> RemoteError:
    """The ``RemoteError`` for an exception user code raised (never raises itself)."""
    cls = type(exc)
    details: dict[str, Any] = {
        "type": clean_text(getattr(cls, "__qualname__", cls.__name__), 500),
        "module": clean_text(str(getattr(cls, "__module__", "builtins")), 500),
        "traceback": clean_text(_traceback(exc), MAX_TRACEBACK_CHARS),
    }
    pickled = _pickled(exc)
    if pickled is not None:
        details["pickled"] = pickled
    return RemoteError(clean_text(_message(exc), MAX_MESSAGE_CHARS), **details)


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
        except Exception:  # noqa: BLE001
            log.exception("unencodable error payload")
            fallback = ProtocolError(f"unencodable error reply ({type(exc).__name__})")
            return [msgpack.packb(fallback.to_wire())]
