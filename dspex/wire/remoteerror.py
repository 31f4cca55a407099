"""Errors rebuilt from their wire form, and :class:`RemoteError`: a worker's exception on the client.

:func:`error_from_wire` turns a payload ``{"code", "message", **details}`` back into its error:
one of the tree's (:mod:`dspex.wire.errors`) by its code, or, for ``remote_error`` (the payload
``worker.remote_errors`` makes of an exception user code raised), a RemoteError that is also an
instance of the original type where this process can have one, with its attributes, its
``__cause__``/``__context__`` chain and the worker's traceback as a note.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

from dspex.wire import byvalue
from dspex.wire.errors import DspexError, MayHaveRun, typed_error


class RemoteError(DspexError):
    """A Python exception raised inside the worker; the worker keeps running.

    When the original exception type is importable here, the error raised is also an instance of
    it (a cached subclass of both, as Ray does for task errors) with the original's picklable
    attributes: ``except ZeroDivisionError`` catches a remote ZeroDivisionError, and
    ``err.lm_response`` of a remote ``AdapterParseError`` is there. ``remote_traceback`` holds the
    worker's traceback text.
    """

    code = "remote_error"

    @property
    def type_name(self) -> str:
        return str(self._wire()[1].get("type", "Exception"))

    @property
    def remote_traceback(self) -> str:
        return str(self._wire()[1].get("traceback", ""))

    @property
    def wire_details(self) -> dict[str, Any]:
        return self._wire()[1]

    def _wire(self) -> tuple[str, dict[str, Any]]:
        # the original's attributes may shadow ``code``/``message``/``details``: the wire form is kept apart
        wire = self.__dict__.get("_dspex_wire")
        return wire if wire is not None else (self.message, self.details)

    def to_wire(self) -> dict[str, Any]:
        message, details = self._wire()
        return {"code": RemoteError.code, "message": message, **details}

    def __reduce__(self) -> tuple[Any, ...]:
        message, details = self._wire()
        return (_remote_error, (message, details))

    def __str__(self) -> str:
        return f"{self.type_name}: {self._wire()[0]}"


_REMOTE_CLASSES: dict[type[BaseException], type[RemoteError] | None] = {}
_SHADOWED = ("code", "message", "details")  # RemoteError's attributes a user's exception may have too


def _defines(original: type[BaseException], name: str) -> bool:
    """The user's exception class (or a base of it of its own) has class attribute ``name``."""
    return any(name in vars(base) for base in original.__mro__ if base not in (BaseException, Exception, object))


def _remote_class(original: type[BaseException]) -> type[RemoteError] | None:
    """The cached subclass of (RemoteError, original), or None where no such class can exist."""
    if original in _REMOTE_CLASSES:
        return _REMOTE_CLASSES[original]
    cls: type[RemoteError] | None = None
    if issubclass(original, Exception) and not issubclass(original, DspexError):

        def __str__(self: RemoteError) -> str:
            try:
                return str(original.__str__(self))
            except Exception:  # noqa: BLE001 - the original class's __str__ may fail on our instance
                return self._wire()[0]

        # the original's own class attributes of RemoteError's names (an HTTP error's ``code``) win
        own = {name: getattr(original, name) for name in _SHADOWED if _defines(original, name)}
        try:
            # __name__ without the qualname's dots: repr() shows the name after the last one
            cls = type(f"RemoteError[{original.__name__}]", (RemoteError, original),
                       {"__str__": __str__, "__module__": __name__,
                        "__qualname__": f"RemoteError[{original.__qualname__}]", **own})
        except TypeError:  # a layout conflict (some C exception types): a plain RemoteError then
            cls = None
    _REMOTE_CLASSES[original] = cls
    return cls


def _original_type(details: dict[str, Any]) -> type[BaseException] | None:
    """The remote exception's type when a module this process already imported defines it."""
    module = sys.modules.get(str(details.get("module", "")))
    obj: Any = module
    for part in str(details.get("type", "")).split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


def _remote_error(message: str, details: dict[str, Any], stream: bool = False) -> RemoteError:
    """A RemoteError, also an instance of the original type (with its attributes) where possible;
    the worker's traceback is attached as a note, so a traceback printed here shows both sides.
    ``stream``: raised by a stream's ``next()``/``anext()``, where a StopIteration or
    StopAsyncIteration would end the consumer's loop as if the stream had ended: those are plain."""
    err = _remote_instance(message, details, stream)
    tb = details.get("traceback")
    if isinstance(tb, str) and tb.strip():
        notes = getattr(err, "__notes__", None)  # the original's own notes come first
        err.__notes__ = [*(notes if isinstance(notes, list) else []), f"Remote traceback (on the worker):\n{tb.rstrip()}"]
    chain = details.get("chain")
    if isinstance(chain, list) and chain:
        _link_chain(err, details, chain)
    else:  # ``raise ... from None`` (an asyncio.TaskGroup's ExceptionGroup) has no chain, only this
        err.__suppress_context__ = bool(details.get("suppress_context"))
    return err


# the keys of a remote error's payload that link it to the other links of its chain (indices: 0 is
# the error itself, i the chain's item i-1)
_LINK_KEYS = ("cause", "context", "suppress_context")
MAX_CHAIN = 16  # links of a chain after the error itself (the worker sends no more)


def _link_chain(top: RemoteError, details: dict[str, Any], chain: list[Any]) -> None:
    """``__cause__``/``__context__``/``__suppress_context__`` of the worker's exception chain, each
    link a remote error of its own type (``except ValueError as e: e.__cause__`` is a remote
    KeyError). Its own traceback text is its ``remote_traceback``; the top's has the whole chain."""
    links: list[RemoteError | None] = [top]
    specs: list[Any] = [details, *chain[:MAX_CHAIN]]
    for node in specs[1:]:
        link: RemoteError | None = None
        if isinstance(node, dict):
            rest = {k: v for k, v in node.items() if k not in _LINK_KEYS and k != "message"}
            try:
                link = _remote_instance(str(node.get("message", "")), rest)
            except Exception:  # noqa: BLE001 - a link that cannot be rebuilt here is left out; the error stands
                link = None
        links.append(link)
    for err, spec in zip(links, specs):
        if err is None or not isinstance(spec, dict):
            continue
        for attr, key in (("__cause__", "cause"), ("__context__", "context")):
            index = spec.get(key)
            if type(index) is int and 0 <= index < len(links) and links[index] is not None:
                setattr(err, attr, links[index])
        err.__suppress_context__ = bool(spec.get("suppress_context"))


def _uninitialized(cls: type[RemoteError], args: tuple[Any, ...]) -> RemoteError | None:
    """A new ``cls`` not initialized yet; None when its original's ``__new__`` makes none of it (an
    ExceptionGroup's without its exceptions)."""
    makers: tuple[Callable[[], RemoteError], ...] = (
        lambda: cls.__new__(cls, *args),
        lambda: cls.__new__(cls),  # a class whose __new__ wants other arguments
        # MemoryError's __new__ (a free list of its own instances) refuses RemoteError's layout as "not safe"
        lambda: Exception.__new__(cls, *args))
    for make in makers:
        with contextlib.suppress(Exception):
            return make()
    return None


def _remote_instance(message: str, details: dict[str, Any], stream: bool = False) -> RemoteError:
    original: BaseException | None = None
    pickled = details.get("pickled")
    if isinstance(pickled, bytes):
        try:  # like every ext 13 value: a client's class comes back untouched
            loaded = byvalue.loads(pickled, {})
            if isinstance(loaded, BaseException):
                original = loaded
        except Exception:  # noqa: BLE001 - a pickled exception this side cannot load falls back to its recorded type
            original = None
    original_type = type(original) if original is not None else _original_type(details)
    ends_a_loop = stream and original_type is not None and issubclass(original_type, (StopIteration, StopAsyncIteration))
    cls = _remote_class(original_type) if original_type is not None and not ends_a_loop else None
    if cls is None or original_type is None:
        return RemoteError(message, **details)
    args = original.args if original is not None else (message,)
    err = _uninitialized(cls, args)
    if err is None:
        return RemoteError(message, **details)
    if original_type.__module__ == "builtins":
        # their C fields come from init (OSError.errno, .filename) or reduce's state (ImportError.name)
        try:
            reduced = original.__reduce__() if original is not None else (original_type, args)
            original_type.__init__(err, *reduced[1])
            args = err.args
            state = reduced[2] if len(reduced) > 2 else None
            if isinstance(state, dict):
                for key, value in state.items():
                    setattr(err, key, value)
        except Exception:  # noqa: BLE001 - best effort: the message and the wire details are set below anyway
            pass
    if not _defines(original_type, "message"):
        with contextlib.suppress(AttributeError):  # an ExceptionGroup's own read-only message: the same text
            err.message = message
    if not _defines(original_type, "details"):
        err.details = details
    if original is not None:
        with contextlib.suppress(TypeError):
            err.__dict__.update(vars(original))
        for name, value in byvalue.slot_values(original).items():
            with contextlib.suppress(AttributeError, TypeError):
                setattr(err, name, value)
        if isinstance(original, (AttributeError, NameError)):
            err.name = original.name  # type: ignore[attr-defined] # a C field, not in vars()
    err.__dict__["_dspex_wire"] = (message, details)
    err.args = tuple(args)
    return err


def error_from_wire(payload: dict[str, Any], stream: bool = False) -> DspexError:
    """Rebuild a typed error from its wire form; an unknown code (or none) is a MayHaveRun that keeps
    it. ``stream``: the error of a stream (:func:`_remote_error`)."""
    details = dict(payload)
    code, message = str(details.pop("code", MayHaveRun.code)), str(details.pop("message", ""))
    return _remote_error(message, details, stream) if code == RemoteError.code else typed_error(code, message, details)
