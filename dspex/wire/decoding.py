"""Wire codec, the decoding half: a message's frames back into values (:func:`dspex.wire.codec.decode`).

The body is unpacked by msgpack's C unpacker in one pass; ext types become values through
``dspex.wire.wiretypes``'s decoders, container tags through the list hook, numpy arrays through
their frames (views of them when the frames are this message's own), by-value objects through
cloudpickle (ext 13) or the session's code store (ext 25), refs through ``resolve_ref``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np
import zmq

from dspex.wire import byvalue, codestore
from dspex.wire import ref as ref_module
from dspex.wire.arrays import wire_dtype
from dspex.wire.errors import DspexError, MissingModule, ProtocolError
from dspex.wire.record import KINDS, build_record
from dspex.wire.ref import Ref
from dspex.wire.wiretypes import (
    BUILDERS,
    DECODERS,
    EXT_NDARRAY,
    EXT_NPSCALAR,
    EXT_PICKLE,
    EXT_RECORD,
    EXT_REF,
    EXT_SESSION_PICKLE,
)

__all__ = ["decode", "unpackb"]

Frame = bytes | memoryview | zmq.Frame
ResolveRef = Callable[[Ref], object]


class _Tag:
    """Decoded form of a container tag; the list hook turns ``[tag, *items]`` into the container."""

    __slots__ = ("build",)

    def __init__(self, build: Callable[[list[Any]], Any]) -> None:
        self.build = build


def _build_record(items: list[Any]) -> Any:
    """``[kind, fields, keys, extra(, class, attrs)]``: build_record's arguments, in its order."""
    if len(items) not in (4, 6) or items[0] not in KINDS or not isinstance(items[1], dict) or not (
            items[2] is None or isinstance(items[2], list)) or not isinstance(items[3], dict) or (
            len(items) == 6 and not isinstance(items[5], dict)):
        raise ProtocolError("malformed record")
    return build_record(*items)


_TAGS: dict[int, _Tag] = {code: _Tag(build) for code, build in BUILDERS.items()}
_TAGS[EXT_RECORD] = _Tag(_build_record)


def _list_hook(items: list[Any]) -> Any:
    if items and type(items[0]) is _Tag:
        return items[0].build(items[1:])
    return items


def _decode_ext(code: int, data: bytes, frames: list[Any] | None, resolve_ref: ResolveRef | None,
                owned: set[int] | None = None) -> Any:
    tag = _TAGS.get(code)
    if tag is not None:
        return tag
    decoder = DECODERS.get(code)
    if decoder is not None:
        return decoder(data)
    if code == EXT_PICKLE:
        return _unpickle(data)
    if code == EXT_SESSION_PICKLE:
        return _unpickle(data, session=True)
    if code == EXT_REF:
        fields = msgpack.unpackb(data)
        if not (isinstance(fields, list) and len(fields) == 6 and all(type(f) is str for f in fields)):
            raise ProtocolError("malformed ref")
        ref = Ref(*fields)
        return ref if resolve_ref is None else resolve_ref(ref)
    if code in (EXT_NDARRAY, EXT_NPSCALAR):
        parts: list[Any] = unpackb(data)  # type: ignore[assignment]
        dt = wire_dtype(parts[0])
        if dt.hasobject:
            raise ProtocolError("object dtypes are never accepted from the wire")
        if code == EXT_NPSCALAR:
            return np.ndarray((), dtype=dt, buffer=parts[1])[()]
        shape, index, *order = parts[1:]
        if frames is None or not 1 <= index < len(frames):
            raise ProtocolError(f"array refers to missing frame {index}")
        flat = np.frombuffer(frames[index], dtype=dt) if dt.itemsize else np.empty(0, dt)
        arr = flat.reshape(shape, order="F" if order == ["F"] else "C")
        if owned is not None and index in owned and arr.flags.aligned:
            owned.discard(index)  # a second array on the same frame gets a copy: arrays never alias
            return arr  # a view of the received frame, which it keeps alive: no copy
        # one copy: frame memory may be read-only, or a writable view of an immutable bytes
        return arr.copy(order="K")
    return msgpack.ExtType(code, data)


def _missing_module(exc: BaseException) -> ModuleNotFoundError | None:
    """The ModuleNotFoundError that made loading fail, when one did (pickle may wrap it)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ModuleNotFoundError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _unpickle(data: bytes, session: bool = False) -> Any:
    try:
        parts = msgpack.unpackb(data)
        blob, sources = parts["pickle"], parts.get("sources") or {}
        if not isinstance(blob, bytes) or not isinstance(sources, dict):
            raise TypeError("wrong field types")
    except Exception as exc:  # noqa: BLE001 - whatever malformed bytes raise is a protocol error
        raise ProtocolError(f"malformed by-value object: {exc}") from None
    try:
        return codestore.loads(blob, sources) if session else byvalue.loads(blob, sources)
    except DspexError:
        raise  # a code cache miss: the client sends the request again in full
    except Exception as exc:  # noqa: BLE001 - a by-value object that does not load, said why below
        error = _load_error(exc)
    # raised out of the except clause, where it would hold the original as its __context__: the
    # original and the frames of the code that raised it go now, within the call, and what dropping
    # them warns (a coroutine never awaited) is the call's (as worker/remote_errors.py, guarded)
    raise error from None


def _load_error(exc: Exception) -> BaseException:
    """What a by-value object that did not load raises, ``exc`` why it did not."""
    missing = _missing_module(exc)
    if missing is not None:
        return missing
    cause, type_name = (exc.error, _failed_class(exc.error) or exc.type_name) \
        if isinstance(exc, byvalue.LoadFailed) else (exc, "")
    if isinstance(cause, DspexError):
        return cause  # says what it is already (a ref a by-value object holds, unknown here)
    return ProtocolError(f"cannot unpickle a by-value {type_name or 'object'} here: {type(cause).__name__}: "
                         f"{str(cause)[:300]}", **({"type": type_name} if type_name else {}))


def _failed_class(exc: BaseException) -> str:
    """The class whose method a failed unpickling called (its ``__setstate__``, ``__init__``,
    ``__new__``...): the first frame of ``exc``'s traceback outside the unpickler's module."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == byvalue.__file__:
        tb = tb.tb_next
    local = tb.tb_frame.f_locals if tb is not None else {}
    cls = type(local["self"]) if "self" in local else local.get("cls")
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else ""


_ENVIRONMENT = {"client": "in the client's environment", "worker": "on the workers' environment"}


def _unpack(body: Any, frames: list[Any] | None, resolve_ref: ResolveRef | None,
            owned: set[int] | None = None, side: str = "client") -> object:
    try:
        return msgpack.unpackb(
            body,
            ext_hook=lambda code, data: _decode_ext(code, data, frames, resolve_ref, owned),
            list_hook=_list_hook,
            strict_map_key=False,
        )
    except DspexError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a message's bytes make the decoder raise is said as its error
        raise _undecodable(exc, side) from (None if isinstance(exc, ModuleNotFoundError) else exc)


def _undecodable(exc: Exception, side: str) -> DspexError:
    if isinstance(exc, ModuleNotFoundError):  # a by-value object, or a class named by reference, needs it
        return MissingModule(f"{exc} (needed to load a value sent to the {side}): install it "
                             f"{_ENVIRONMENT.get(side, 'here')}", module=exc.name or str(exc), side=side)
    return ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}")


def decode_ext(value: msgpack.ExtType, resolve_ref: ResolveRef | None = None, *, side: str = "client") -> object:
    """An ext value of a frame read as plain msgpack (``msgpack.unpackb`` leaves them ``ExtType``),
    decoded as :func:`decode` decodes it in place: a frame whose plain fields are read before
    anything is loaded (the worker's session context) is not unpacked a second time."""
    token = ref_module.resolver.set(resolve_ref)
    try:
        return _decode_ext(value.code, value.data, None, resolve_ref)
    except DspexError:
        raise
    except Exception as exc:  # noqa: BLE001 - as decode's
        raise _undecodable(exc, side) from (None if isinstance(exc, ModuleNotFoundError) else exc)
    finally:
        ref_module.resolver.reset(token)


def decode(frames: Sequence[Frame], resolve_ref: ResolveRef | None = None, *, own_frames: bool = False,
           side: str = "client") -> object:
    """Inverse of :func:`encode`; refs go through ``resolve_ref`` when given, else stay Refs.

    ``own_frames``: the ``zmq.Frame`` objects among ``frames`` came from an ipc/tcp socket, so their
    memory is this message's alone and arrays may be views of it (no copy); not for inproc, where
    a frame can share the sender's (even immutable) memory. ``side`` (``"client"``/``"worker"``)
    is where this runs: a module missing here is a :class:`MissingModule` saying where to install it.
    """
    if not frames:
        raise ProtocolError("empty message")
    bufs = [f.buffer if isinstance(f, zmq.Frame) else f for f in frames]
    owned = {i for i, f in enumerate(frames) if isinstance(f, zmq.Frame)} if own_frames else None
    token = ref_module.resolver.set(resolve_ref)  # refs inside by-value objects resolve too
    try:
        return _unpack(bufs[0], bufs, resolve_ref, owned, side)
    finally:
        ref_module.resolver.reset(token)


def unpackb(data: bytes | memoryview) -> object:
    """Inverse of :func:`packb`."""
    return _unpack(data, None, None)
