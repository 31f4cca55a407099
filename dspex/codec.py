"""Wire codec: msgpack bodies, numpy buffers in their own frames, other objects by value or as refs.

Frame 0 is a msgpack body; frames 1.. are raw array buffers that the body points at by index,
so large arrays never pass through msgpack (no copy, no glibc heap churn). The common case is
packed by msgpack's C packer in one pass; only cycles, very deep nesting or a missing ``to_ref``
fall back to a Python walk, which knows paths and ancestors. Ext codes are part of the wire
protocol (docs/protocol.md) and must never be renumbered.

What is not msgpack-native follows the encode :class:`Policy`: by value (``dspy.Example`` /
``Prediction`` as records, ext 14; anything else with cloudpickle, ext 13) or as a ref.
"""

from __future__ import annotations

import datetime as _dt
import enum
import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol, Union

import msgpack
import numpy as np
import zmq

from dspex import byvalue, codestore
from dspex.errors import DspexError, EncodeError, ProtocolError
from dspex.record import KINDS, build_record, record_parts
from dspex import ref as ref_module
from dspex.ref import Ref

# Containers are encoded as a msgpack array whose first item is an empty ext "tag", not as an
# ext holding nested bytes: one packer pass, and msgpack's own nesting limit still sees cycles.
EXT_TUPLE = 1  # tag: [tag, *items]
EXT_SET = 2  # tag: [tag, *members]
EXT_FROZENSET = 3  # tag: [tag, *members]
EXT_COMPLEX = 4  # struct "<dd" real, imag
EXT_BIGINT = 5  # signed big-endian two's complement (ints outside int64..uint64)
EXT_DATETIME = 6  # UTF-8 isoformat; tz kept as a fixed UTC offset
EXT_DATE = 7  # UTF-8 isoformat
EXT_TIME = 8  # UTF-8 isoformat
EXT_TIMEDELTA = 9  # struct "<iii" days, seconds, microseconds
EXT_NDARRAY = 10  # packb([dtype str or descr, shape, frame index])
EXT_NPSCALAR = 11  # packb([dtype str or descr, raw bytes])
EXT_REF = 12  # packb([id, session, pool, worker, type_name, repr])
EXT_PICKLE = 13  # packb({"pickle": cloudpickle bytes, "sources": {filename: source text}})
EXT_RECORD = 14  # tag: [tag, kind, {field: value}, input_keys | None, extra]
# ext codes 25-29: a session's code, sent once (dspex.sessionpickle / dspex.codestore)
EXT_SESSION_PICKLE = 25  # packb({"pickle": session pickle bytes, "sources": {filename: source text}})


class Policy(str, enum.Enum):
    """What ``encode`` does with a value msgpack cannot carry."""

    REFS = "refs"  # a ref via ``to_ref`` (EncodeError without one): the original behaviour
    DATA = "data"  # data-like objects (records, pydantic/dataclass instances, exceptions) by value, the rest refs
    ALL = "all"  # everything by value (client arguments); what cannot be pickled: a ref, else EncodeError

# msgpack packs ~1024 levels and unpacks 1024; the fallback walk recurses in Python, so it cuts
# deeper structures (only reached when msgpack gave up) at a depth safe for the recursion limit.
MAX_WALK_DEPTH = 400

Frame = Union[bytes, memoryview, zmq.Frame]
ToRef = Callable[[object], Ref]
ResolveRef = Callable[[Ref], object]
Buffers = list[Union[bytes, memoryview]]


class _Tag:
    """Decoded form of a container tag; the list hook turns ``[tag, *items]`` into the container."""

    __slots__ = ("build",)

    def __init__(self, build: Callable[[list[Any]], Any]) -> None:
        self.build = build


def _build_record(items: list[Any]) -> Any:
    if len(items) != 4 or items[0] not in KINDS or not isinstance(items[1], dict):
        raise ProtocolError("malformed record")
    keys, extra = items[2], items[3]
    if not (keys is None or isinstance(keys, list)) or not isinstance(extra, dict):
        raise ProtocolError("malformed record")
    return build_record(items[0], items[1], keys, extra)


_TAGS: dict[int, _Tag] = {EXT_TUPLE: _Tag(tuple), EXT_SET: _Tag(set), EXT_FROZENSET: _Tag(frozenset),
                          EXT_RECORD: _Tag(_build_record)}
_RECORD = msgpack.ExtType(EXT_RECORD, b"")
_TUPLE = msgpack.ExtType(EXT_TUPLE, b"")
_SET = msgpack.ExtType(EXT_SET, b"")
_FROZENSET = msgpack.ExtType(EXT_FROZENSET, b"")
_CDD = struct.Struct("<dd")
_TD = struct.Struct("<iii")
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def _int(o: int) -> Any:
    v = int.__int__(o)  # exact int even for IntEnum & co
    if _INT_MIN <= v <= _INT_MAX:
        return v
    return msgpack.ExtType(EXT_BIGINT, v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True))


def _dtype_wire(dt: np.dtype[Any]) -> Any:
    # dtype.str drops field names, so structured dtypes travel as their descr list
    return dt.str if dt.fields is None else dt.descr


def _ref_ext(ref: Ref) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_REF, msgpack.packb(list(ref.as_tuple())))


# Checked by exact type first, then by isinstance in this order (datetime before date), so
# subclasses (IntEnum, OrderedDict, namedtuple, str subclasses...) travel as their base value.
_CONVERTERS: dict[type, Callable[[Any], Any]] = {
    int: _int,
    float: float.__float__,
    str: str.__str__,
    bytes: bytes,
    bytearray: bytes,
    list: list,
    tuple: lambda o: [_TUPLE, *o],
    dict: dict,
    set: lambda o: [_SET, *o],
    frozenset: lambda o: [_FROZENSET, *o],
    complex: lambda o: msgpack.ExtType(EXT_COMPLEX, _CDD.pack(o.real, o.imag)),
    _dt.datetime: lambda o: msgpack.ExtType(EXT_DATETIME, _dt.datetime.isoformat(o).encode()),
    _dt.date: lambda o: msgpack.ExtType(EXT_DATE, _dt.date.isoformat(o).encode()),
    _dt.time: lambda o: msgpack.ExtType(EXT_TIME, _dt.time.isoformat(o).encode()),
    _dt.timedelta: lambda o: msgpack.ExtType(EXT_TIMEDELTA, _TD.pack(o.days, o.seconds, o.microseconds)),
    Ref: _ref_ext,
}
_NATIVE_BASES = tuple(_CONVERTERS)
_CONTAINERS = (list, tuple, dict, set, frozenset)


def _native_array(o: object) -> bool:
    # other ndarray subclasses (masked arrays, matrix) would silently lose meaning: refs
    return isinstance(o, np.ndarray) and type(o) in (np.ndarray, np.memmap) and not o.dtype.hasobject


class Sender(Protocol):
    """Pickles by-value objects for one request of a session (``dspex.sessionpickle.Message``)."""

    def dumps(self, obj: Any) -> tuple[bytes, dict[str, str]]: ...


class _ByValue:
    """The by-value side of one ``encode``: records and pickles, each object pickled once."""

    def __init__(self, policy: Policy, sender: Sender | None = None) -> None:
        self.policy = policy
        self.sender = sender
        self.pickled: dict[int, tuple[object, msgpack.ExtType]] = {}

    def wants(self, obj: object) -> bool:
        if self.policy is Policy.ALL:
            return True
        return self.policy is Policy.DATA and (record_parts(obj) is not None or byvalue.is_data_like(obj))

    def wants_pickled(self, obj: object) -> bool:
        """``wants`` for an object already known not to be a record (records always go by value)."""
        return self.policy is Policy.ALL or self.policy is Policy.DATA and byvalue.is_data_like(obj)

    def pickle(self, obj: object) -> msgpack.ExtType:
        """ext 13 of ``obj``; raises EncodeError (with pickle's reason) when it cannot be pickled."""
        hit = self.pickled.get(id(obj))
        if hit is not None:
            return hit[1]
        try:
            data, sources = byvalue.dumps(obj) if self.sender is None else self.sender.dumps(obj)
        except EncodeError:
            raise
        except Exception as exc:
            raise EncodeError(f"cannot pickle {_type_name(obj)}: {type(exc).__name__}: {str(exc)[:300]}",
                              type=_type_name(obj)) from None
        code = EXT_PICKLE if self.sender is None else EXT_SESSION_PICKLE
        ext = msgpack.ExtType(code, msgpack.packb({"pickle": data, "sources": sources}))
        self.pickled[id(obj)] = (obj, ext)  # keeps obj alive so its id stays unique for this encode
        return ext


def _record(obj: object) -> list[Any] | None:
    parts = record_parts(obj)
    if parts is None:
        return None
    kind, fields, keys, extra = parts
    return [_RECORD, kind, fields, keys, extra]


def _make_hook(
    buffers: Buffers | None, to_ref: ToRef | None, memo: dict[int, Ref], by_value: _ByValue | None = None
) -> Callable[[Any], Any]:
    """Build msgpack's ``default``: called for everything not an exact msgpack-native type."""

    def hook(obj: Any) -> Any:
        conv = _CONVERTERS.get(type(obj))
        if conv is not None:
            return conv(obj)
        if _native_array(obj):
            if buffers is None:
                raise EncodeError("numpy arrays travel as frames: use encode(), not packb()")
            flat = np.ascontiguousarray(obj)  # copies only when not already C-contiguous
            buffers.append(flat.reshape(-1).view(np.uint8).data if flat.dtype.itemsize else b"")
            payload = packb([_dtype_wire(obj.dtype), list(obj.shape), len(buffers)])
            return msgpack.ExtType(EXT_NDARRAY, payload)
        if isinstance(obj, np.generic):  # before the bases: np.float64 is a float subclass
            return msgpack.ExtType(EXT_NPSCALAR, packb([_dtype_wire(obj.dtype), obj.tobytes()]))
        if not isinstance(obj, np.ndarray):
            for base in _NATIVE_BASES:
                if isinstance(obj, base):
                    return _CONVERTERS[base](obj)
        if by_value is not None:
            # a record goes by value under every by-value policy: one record_parts per object
            rec = _record(obj)
            if rec is not None:
                return rec
        if by_value is not None and by_value.wants_pickled(obj):
            try:
                return by_value.pickle(obj)
            except EncodeError:
                if to_ref is None:
                    raise  # the path-aware walk names where it is
        if to_ref is None:
            raise EncodeError(f"cannot encode {_type_name(obj)}")
        ref = memo.get(id(obj))
        if ref is None:
            ref = memo[id(obj)] = to_ref(obj)
        return _ref_ext(ref)

    return hook


def _type_name(obj: object) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _sanitize(obj: object, to_ref: ToRef | None, memo: dict[int, Ref], root: str,
              by_value: _ByValue | None = None, names: Sequence[str] | None = None) -> object:
    """Copy ``obj`` with cycle-closing containers, too-deep containers and non-natives as refs
    (or by value, as the policy says); errors name the path (``args[1]['reward_fn']``)."""
    stack: set[int] = set()
    trail: list[str] = []

    def path() -> str:
        if names is not None and trail and isinstance(obj, list):
            return "".join(trail)
        return root + "".join(trail)

    def ref_for(o: object, why: str) -> object:
        if by_value is not None and by_value.wants(o):
            try:
                return by_value.pickle(o)
            except EncodeError as err:
                if "global" in err.details:  # names the global and its module already
                    raise EncodeError(err.message, **{**err.details, "path": path()}) from None
                why = err.message
        if to_ref is None:
            where = path()
            name = _type_name(o)
            raise EncodeError(f"cannot encode {name} at {where} ({why})", type=name, path=where)
        ref = memo.get(id(o))
        if ref is None:
            ref = memo[id(o)] = to_ref(o)
        return ref

    def walk(o: Any, depth: int) -> Any:
        if isinstance(o, _CONTAINERS) and type(o) is not msgpack.ExtType:
            if id(o) in stack:
                return ref_for(o, "cycle")
            if depth >= MAX_WALK_DEPTH:
                return ref_for(o, "nested too deeply")
            stack.add(id(o))
            out: Any
            if isinstance(o, dict):
                out = {}
                for n, (k, v) in enumerate(o.items()):
                    trail.append(f"<key #{n}>")
                    key = walk(k, depth + 1)
                    trail[-1] = f"[{k!r:.40}]"
                    out[key] = walk(v, depth + 1)
                    trail.pop()
            else:
                items = []
                for n, v in enumerate(o):
                    if depth == 0 and names is not None and o is obj and n < len(names):
                        trail.append(names[n])
                    else:
                        trail.append(f"[{n}]" if isinstance(o, (list, tuple)) else f"{{#{n}}}")
                    items.append(walk(v, depth + 1))
                    trail.pop()
                base = next(b for b in _CONTAINERS if isinstance(o, b))
                out = items if base is list else base(items)
            stack.discard(id(o))
            return out
        if o is None or type(o) in (bool, memoryview, msgpack.ExtType) or _native_array(o):
            return o
        if isinstance(o, np.generic) or (isinstance(o, _NATIVE_BASES) and not isinstance(o, np.ndarray)):
            return o
        if by_value is not None and by_value.wants(o):
            parts = record_parts(o)
            if parts is not None:
                kind, fields, keys, extra = parts
                trail.append(".")
                walked = {}
                for k, v in fields.items():
                    trail[-1] = f".{k}"
                    walked[k] = walk(v, depth + 1)
                trail.pop()
                return [_RECORD, kind, walked, keys, extra]
        return ref_for(o, "not a native type")

    return walk(obj, 0)


def _pack(obj: object, to_ref: ToRef | None, buffers: Buffers | None, root: str,
          policy: Policy = Policy.REFS, names: Sequence[str] | None = None, sender: Sender | None = None) -> bytes:
    memo: dict[int, Ref] = {}  # shared by both passes so to_ref runs once per object
    by_value = None if policy is Policy.REFS else _ByValue(policy, sender)  # shared too: one pickle per object
    body: bytes
    try:
        body = msgpack.Packer(strict_types=True, default=_make_hook(buffers, to_ref, memo, by_value)).pack(obj)
        return body
    except (ValueError, EncodeError):  # ValueError: msgpack's nesting limit (a cycle, or >1024 deep)
        pass
    if buffers is not None:
        buffers.clear()
    clean = _sanitize(obj, to_ref, memo, root, by_value, names)
    body = msgpack.Packer(strict_types=True, default=_make_hook(buffers, to_ref, memo, by_value)).pack(clean)
    return body


def encode(
    obj: object, to_ref: ToRef | None = None, *, root: str = "result", policy: Policy = Policy.REFS,
    names: Sequence[str] | None = None, sender: Sender | None = None,
) -> list[bytes | memoryview]:
    """frame 0 = msgpack body; frames 1.. = raw numpy buffers referenced from the body.

    Non-native values follow ``policy``: by value (records, cloudpickle) where it says so, else a
    ref via ``to_ref`` (once per object per call); without ``to_ref`` what cannot go by value raises
    :class:`EncodeError` naming the type and the path. ``root`` starts the path; with ``names``
    (for a list ``obj``) the top-level items are named instead: ``args[1]['reward_fn']``. With a
    ``sender`` (a session's request), objects are pickled by it, as ext 25.
    """
    buffers: Buffers = []
    body = _pack(obj, to_ref, buffers, root, policy, names, sender)
    return [body, *buffers]


def session_ext(sender: Sender, obj: object) -> msgpack.ExtType:
    """``obj`` as one ext 25 of ``sender`` (a request's context: the client's DSPy settings)."""
    return _ByValue(Policy.ALL, sender).pickle(obj)


def packb(obj: object) -> bytes:
    """Plain msgpack for small headers: same ext types, no array frames, no ``to_ref``."""
    return _pack(obj, None, None, "header")


def _list_hook(items: list[Any]) -> Any:
    if items and type(items[0]) is _Tag:
        return items[0].build(items[1:])
    return items


def _decode_ext(code: int, data: bytes, frames: list[Any] | None, resolve_ref: ResolveRef | None,
                owned: set[int] | None = None) -> Any:
    tag = _TAGS.get(code)
    if tag is not None:
        return tag
    if code == EXT_COMPLEX:
        return complex(*_CDD.unpack(data))
    if code == EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    if code == EXT_DATETIME:
        return _dt.datetime.fromisoformat(data.decode())
    if code == EXT_DATE:
        return _dt.date.fromisoformat(data.decode())
    if code == EXT_TIME:
        return _dt.time.fromisoformat(data.decode())
    if code == EXT_TIMEDELTA:
        return _dt.timedelta(*_TD.unpack(data))
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
        dt = np.dtype(parts[0])
        if dt.hasobject:
            raise ProtocolError("object dtypes are never accepted from the wire")
        if code == EXT_NPSCALAR:
            return np.ndarray((), dtype=dt, buffer=parts[1])[()]
        shape, index = parts[1:]
        if frames is None or not 1 <= index < len(frames):
            raise ProtocolError(f"array refers to missing frame {index}")
        flat = np.frombuffer(frames[index], dtype=dt) if dt.itemsize else np.empty(0, dt)
        arr = flat.reshape(shape)
        if owned is not None and index in owned and arr.flags.aligned:
            owned.discard(index)  # a second array on the same frame gets a copy: arrays never alias
            return arr  # a view of the received frame, which it keeps alive: no copy
        # one copy: frame memory may be read-only, or a writable view of an immutable bytes
        return arr.copy()
    return msgpack.ExtType(code, data)


def _unpickle(data: bytes, session: bool = False) -> Any:
    try:
        parts = msgpack.unpackb(data)
        blob, sources = parts["pickle"], parts.get("sources") or {}
        if not isinstance(blob, bytes) or not isinstance(sources, dict):
            raise TypeError("wrong field types")
    except Exception as exc:
        raise ProtocolError(f"malformed by-value object: {exc}") from None
    try:
        return codestore.loads(blob, sources) if session else byvalue.loads(blob, sources)
    except DspexError:
        raise  # a code cache miss: the client sends the request again in full
    except Exception as exc:
        raise ProtocolError(f"cannot unpickle a by-value object here: {type(exc).__name__}: {str(exc)[:300]}"
                            ) from None


def _unpack(body: Any, frames: list[Any] | None, resolve_ref: ResolveRef | None,
            owned: set[int] | None = None) -> object:
    try:
        return msgpack.unpackb(
            body,
            ext_hook=lambda code, data: _decode_ext(code, data, frames, resolve_ref, owned),
            list_hook=_list_hook,
            strict_map_key=False,
        )
    except DspexError:
        raise
    except Exception as exc:
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from exc


def decode(frames: Sequence[Frame], resolve_ref: ResolveRef | None = None, *, own_frames: bool = False) -> object:
    """Inverse of :func:`encode`; refs go through ``resolve_ref`` when given, else stay Refs.

    ``own_frames``: the ``zmq.Frame`` objects among ``frames`` were received from an ipc/tcp socket,
    so their memory belongs to this message alone and arrays may be views of it (no copy of a
    large array). Not for inproc, where a frame can share the sender's (even immutable) memory.
    """
    if not frames:
        raise ProtocolError("empty message")
    bufs = [f.buffer if isinstance(f, zmq.Frame) else f for f in frames]
    owned = {i for i, f in enumerate(frames) if isinstance(f, zmq.Frame)} if own_frames else None
    token = ref_module.resolver.set(resolve_ref)  # refs inside by-value objects resolve too
    try:
        return _unpack(bufs[0], bufs, resolve_ref, owned)
    finally:
        ref_module.resolver.reset(token)


def unpackb(data: bytes | memoryview) -> object:
    """Inverse of :func:`packb`."""
    return _unpack(data, None, None)
