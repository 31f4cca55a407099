"""Wire codec: msgpack bodies, numpy buffers in their own frames, other objects by value or as refs.

Frame 0 is a msgpack body; frames 1.. are raw array buffers that the body points at by index,
so large arrays never pass through msgpack (no copy, no glibc heap churn). The common case is
packed by msgpack's C packer in one pass; only cycles, very deep nesting, strings with lone
surrogates or a missing ``to_ref`` fall back to a Python walk, which knows paths and ancestors.
Ext codes are part of the wire protocol (``dspex.wire.wiretypes``, docs/protocol.md).

Values keep their exact types (``dspex.wire.wiretypes``: subclasses, enum members, OrderedDict,
Decimal, paths...). What is not a value follows the encode :class:`Policy`: by value
(``dspy.Example`` / ``Prediction`` and their subclasses as records, ext 14; anything else with
cloudpickle, ext 13) or as a ref.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgpack
import numpy as np
import zmq

from dspex.wire import byvalue, codestore
from dspex.wire import ref as ref_module
from dspex.wire.errors import DspexError, EncodeError, MissingModule, ProtocolError
from dspex.wire.record import KINDS, build_record, record_parts
from dspex.wire.ref import Ref
from dspex.wire.wiretypes import (
    BUILDERS,
    DECODERS,
    ENCODERS,
    EXT_FROZENSET,
    EXT_NDARRAY,
    EXT_NPSCALAR,
    EXT_PICKLE,
    EXT_RECORD,
    EXT_REF,
    EXT_SET,
    EXT_TUPLE,
    RECORD,
    TAGS,
    convert_subclass,
    is_data_like,
    surrogates,
    utf8_ok,
)

__all__ = ["EXT_PICKLE", "EXT_SESSION_PICKLE", "EncodeError", "Policy", "decode", "encode", "packb", "session_ext",
           "unpackb"]

# ext codes 25-29 are a session's code, sent once (dspex.client.sessionpickle writes, dspex.wire.codestore reads)
EXT_SESSION_PICKLE = 25  # packb({"pickle": session pickle bytes, "sources": {filename: source text}})


class Policy(str, enum.Enum):
    """What ``encode`` does with a value msgpack cannot carry."""

    REFS = "refs"  # a ref via ``to_ref`` (EncodeError without one): the original behaviour
    DATA = "data"  # data-like objects (records, pydantic/dataclass instances, exceptions) by value, the rest refs
    ALL = "all"  # everything by value (client arguments); what cannot be pickled: a ref, else EncodeError

# msgpack packs ~1024 levels and unpacks 1024; the fallback walk recurses in Python, so it cuts
# deeper structures (only reached when msgpack gave up) at a depth safe for the recursion limit.
MAX_WALK_DEPTH = 400

Frame = bytes | memoryview | zmq.Frame
ToRef = Callable[[object], Ref]
ResolveRef = Callable[[Ref], object]
Buffers = list[bytes | memoryview]


class _Tag:
    """Decoded form of a container tag; the list hook turns ``[tag, *items]`` into the container."""

    __slots__ = ("build",)

    def __init__(self, build: Callable[[list[Any]], Any]) -> None:
        self.build = build


def _build_record(items: list[Any]) -> Any:
    if len(items) not in (4, 6) or items[0] not in KINDS or not isinstance(items[1], dict):
        raise ProtocolError("malformed record")
    keys, extra = items[2], items[3]
    if not (keys is None or isinstance(keys, list)) or not isinstance(extra, dict):
        raise ProtocolError("malformed record")
    if len(items) == 4:
        return build_record(items[0], items[1], keys, extra)
    attrs = items[5]
    if not isinstance(attrs, dict):
        raise ProtocolError("malformed record")
    return build_record(items[0], items[1], keys, extra, items[4], attrs)


_TAGS: dict[int, _Tag] = {code: _Tag(build) for code, build in BUILDERS.items()}
_TAGS[EXT_RECORD] = _Tag(_build_record)


def _dtype_wire(dt: np.dtype[Any]) -> Any:
    # dtype.str drops field names, so structured dtypes travel as their descr list
    return dt.str if dt.fields is None else dt.descr


def _ref_ext(ref: Ref) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_REF, msgpack.packb(list(ref.as_tuple())))


def _native_array(o: object) -> bool:
    # other ndarray subclasses (masked arrays, matrix) would silently lose meaning: refs
    return isinstance(o, np.ndarray) and type(o) in (np.ndarray, np.memmap) and not o.dtype.hasobject


def _type_name(obj: object) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class Sender(Protocol):
    """Pickles by-value objects for one request of a session (``dspex.client.sessionpickle.Message``)."""

    def dumps(self, obj: Any) -> tuple[bytes, dict[str, str]]: ...


class _Encoder:
    """The state of one ``encode``: array frames, refs made, objects pickled (each once)."""

    __slots__ = ("buffers", "memo", "pickled", "policy", "sender", "sources_sent", "to_ref")

    def __init__(self, policy: Policy, buffers: Buffers | None, to_ref: ToRef | None,
                 sender: Sender | None = None) -> None:
        self.policy = policy
        self.buffers = buffers
        self.to_ref = to_ref
        self.sender = sender  # a session's request: objects pickled by it, as ext 25
        self.memo: dict[int, Ref] = {}  # shared by both passes so to_ref runs once per object
        # shared too: one pickle per object
        self.pickled: dict[int, tuple[object, bytes, dict[str, str], msgpack.ExtType | None]] = {}
        self.sources_sent: set[str] | None = None  # source files already in an ext 13 of this message

    def wants_pickled(self, obj: object) -> bool:
        """Is ``obj`` (not a value, not a record) sent by value under this policy?"""
        return self.policy is Policy.ALL or self.policy is Policy.DATA and is_data_like(obj)

    def pickle(self, obj: object) -> msgpack.ExtType:
        """ext 13 (ext 25 with a sender) of ``obj``; raises EncodeError (with pickle's reason) when
        it cannot be pickled."""
        hit = self.pickled.get(id(obj))
        if hit is not None and hit[3] is not None:
            return hit[3]
        if hit is None:
            try:
                data, sources = byvalue.dumps(obj) if self.sender is None else self.sender.dumps(obj)
            except EncodeError:
                raise  # names what it is already (a session's unpicklable global)
            except Exception as exc:  # noqa: BLE001 - whatever pickling raises is this value's EncodeError
                raise EncodeError(f"cannot pickle {_type_name(obj)}: {type(exc).__name__}: {str(exc)[:300]}",
                                  type=_type_name(obj)) from None
        else:
            data, sources = hit[1], hit[2]
        # the receiver registers the sources of every ext 13 of a message before any code runs:
        # a file's text is sent once per message
        if self.sources_sent is None:
            self.sources_sent = set(sources)
            sent = sources
        else:
            sent = {name: text for name, text in sources.items() if name not in self.sources_sent}
            self.sources_sent.update(sent)
        code = EXT_PICKLE if self.sender is None else EXT_SESSION_PICKLE
        ext = msgpack.ExtType(code, msgpack.packb({"pickle": data, "sources": sent}))
        self.pickled[id(obj)] = (obj, data, sources, ext)  # keeps obj alive so its id stays unique for this encode
        return ext

    def restart(self) -> None:
        """Before a second pass: pickles are kept, their source texts are sent again."""
        self.sources_sent = None
        for key, (obj, data, sources, _) in self.pickled.items():
            self.pickled[key] = (obj, data, sources, None)

    def code(self, obj: object) -> Any:
        """A class or function a value needs: its importable name, else by value."""
        name = byvalue.importable_name(obj)
        return name if name is not None else self.pickle(obj)

    def ref(self, obj: object) -> msgpack.ExtType:
        assert self.to_ref is not None
        ref = self.memo.get(id(obj))
        if ref is None:
            ref = self.memo[id(obj)] = self.to_ref(obj)
        return _ref_ext(ref)

    def record(self, obj: object) -> list[Any] | None:
        """``[tag, kind, fields, keys, extra(, class, attrs)]`` of a dspy Example/Prediction (or a
        subclass: its class and instance attributes too), under a by-value policy; else None."""
        if self.policy is Policy.REFS:
            return None
        parts = record_parts(obj)
        if parts is None:
            return None
        kind, fields, keys, extra, attrs = parts
        if attrs is None:
            return [RECORD, kind, fields, keys, extra]
        return [RECORD, kind, fields, keys, extra, self.code(type(obj)), attrs]

    def convert(self, obj: Any) -> Any:
        """One level of msgpack form of ``obj``, which is not an exact msgpack-native type: an
        ext, a tagged list of parts (the packer goes on into them), or a ref."""
        conv = _ENCODERS.get(type(obj))
        if conv is not None:
            return conv(obj, self)
        if _native_array(obj):
            if self.buffers is None:
                raise EncodeError("numpy arrays travel as frames: use encode(), not packb()")
            flat = np.ascontiguousarray(obj)  # copies only when not already C-contiguous
            self.buffers.append(flat.reshape(-1).view(np.uint8).data if flat.dtype.itemsize else b"")
            payload = packb([_dtype_wire(obj.dtype), list(obj.shape), len(self.buffers)])
            return msgpack.ExtType(EXT_NDARRAY, payload)
        if isinstance(obj, np.generic):  # before the subclasses: np.float64 is a float subclass
            return msgpack.ExtType(EXT_NPSCALAR, packb([_dtype_wire(obj.dtype), obj.tobytes()]))
        rec = self.record(obj)
        if rec is not None:
            return rec
        if not isinstance(obj, np.ndarray):
            try:
                value = convert_subclass(obj, self)
            except EncodeError:
                if self.to_ref is None:
                    raise
                return self.ref(obj)
            if value is not NotImplemented:
                return value
        if self.wants_pickled(obj):
            try:
                return self.pickle(obj)
            except EncodeError:
                if self.to_ref is None:
                    raise  # the path-aware walk names where it is
        if self.to_ref is None:
            raise EncodeError(f"cannot encode {_type_name(obj)}")
        return self.ref(obj)


class _KeyList(tuple):  # type: ignore[type-arg]
    """A list inside a dict key the walk made (a tagged list: not hashable), packed as the list."""


class _KeyMap(tuple):  # type: ignore[type-arg]
    """A dict inside such a key (a subclass instance's attributes), packed as the dict."""


def _hashable(part: Any) -> Any:
    if type(part) is list:
        return _KeyList(_hashable(x) for x in part)
    if type(part) is dict:
        return _KeyMap((_hashable(k), _hashable(v)) for k, v in part.items())
    return part


_ENCODERS: dict[type, Callable[[Any, _Encoder], Any]] = {
    **ENCODERS, Ref: lambda o, enc: _ref_ext(o), _KeyList: lambda o, enc: list(o), _KeyMap: lambda o, enc: dict(o)}

# what the packer takes as it is (a bytearray as bin, like the first pass: see dspex.wire.wiretypes)
_LEAVES = (bool, int, float, bytes, bytearray, memoryview, msgpack.ExtType)


def _sanitize(obj: object, enc: _Encoder, root: str, names: Sequence[str] | None = None) -> object:
    """Copy ``obj`` in msgpack form with cycle-closing containers, too-deep containers and what
    cannot be encoded as refs (or by value, as the policy says), strings with lone surrogates as
    ext 23; errors name the path (``args[1]['reward_fn']``)."""
    stack: set[int] = set()
    trail: list[str] = []

    def path() -> str:
        if names is not None and trail and isinstance(obj, list):
            return "".join(trail)
        return root + "".join(trail)

    def ref_for(o: object, why: str) -> object:
        if enc.wants_pickled(o):
            try:
                return enc.pickle(o)
            except EncodeError as err:
                if "global" in err.details:  # names the global and its module already
                    raise EncodeError(err.message, **{**err.details, "path": path()}) from None
                why = err.message
        if enc.to_ref is None:
            where = path()
            name = _type_name(o)
            raise EncodeError(f"cannot encode {name} at {where} ({why})", type=name, path=where)
        return enc.ref(o)

    def items(seq: list[Any], depth: int, label: Callable[[int], str], start: int = 0) -> list[Any]:
        out = seq[:start]
        for n in range(start, len(seq)):
            trail.append(label(n - start))
            out.append(walk(seq[n], depth + 1))
            trail.pop()
        return out

    def walk(o: Any, depth: int) -> Any:
        t = type(o)
        if t is str:
            return o if utf8_ok(o) else surrogates(o)
        if o is None or t in _LEAVES or _native_array(o):
            return enc.convert(o) if t is int else o
        if t is not list and t is not dict:
            try:
                o_rep = enc.convert(o)
            except EncodeError as err:
                return ref_for(o, err.message)
            if not (type(o_rep) is list and o_rep and o_rep[0] in TAGS):
                return o_rep  # an ext, a ref: a leaf
        else:
            o_rep = o
        if id(o) in stack:
            return ref_for(o, "cycle")
        if depth >= MAX_WALK_DEPTH:
            return ref_for(o, "nested too deeply")
        stack.add(id(o))
        out: Any
        if t is dict:
            out = {}
            for n, (k, v) in enumerate(o.items()):
                trail.append(f"<key #{n}>")
                key = _hashable(walk(k, depth + 1))
                trail[-1] = f"[{k!r:.40}]"
                out[key] = walk(v, depth + 1)
                trail.pop()
        elif t is list:
            if depth == 0 and names is not None:
                out = items(o, depth, lambda n: names[n] if n < len(names) else f"[{n}]")
            else:
                out = items(o, depth, lambda n: f"[{n}]")
        elif o_rep[0].code in (EXT_TUPLE, EXT_SET, EXT_FROZENSET):
            out = items(o_rep, depth, (lambda n: f"[{n}]") if o_rep[0].code == EXT_TUPLE else (lambda n: f"{{#{n}}}"),
                        start=1)
        elif o_rep[0].code == EXT_RECORD:
            fields = {}
            for k, v in o_rep[2].items():
                trail.append(f".{k}")
                fields[k] = walk(v, depth + 1)
                trail.pop()
            out = [*o_rep[:2], fields, *(walk(part, depth + 1) for part in o_rep[3:])]
        else:  # the parts of a subclass instance, an enum member, an OrderedDict: the value's own path
            out = [o_rep[0], *(walk(part, depth + 1) for part in o_rep[1:])]
        stack.discard(id(o))
        return out

    return walk(obj, 0)


def _pack(obj: object, to_ref: ToRef | None, buffers: Buffers | None, root: str,
          policy: Policy = Policy.REFS, names: Sequence[str] | None = None, sender: Sender | None = None) -> bytes:
    enc = _Encoder(policy, buffers, to_ref, sender)
    body: bytes
    try:
        body = msgpack.Packer(strict_types=True, default=enc.convert).pack(obj)
        return body
    except (ValueError, EncodeError):  # ValueError: msgpack's nesting limit (a cycle, or >1024 deep), surrogates
        pass
    if buffers is not None:
        buffers.clear()
    enc.restart()
    clean = _sanitize(obj, enc, root, names)
    body = msgpack.Packer(strict_types=True, default=enc.convert).pack(clean)
    return body


def encode(
    obj: object, to_ref: ToRef | None = None, *, root: str = "result", policy: Policy = Policy.REFS,
    names: Sequence[str] | None = None, sender: Sender | None = None,
) -> list[bytes | memoryview]:
    """frame 0 = msgpack body; frames 1.. = raw numpy buffers referenced from the body.

    Values keep their exact types; other objects follow ``policy``: by value (records,
    cloudpickle) where it says so, else a ref via ``to_ref`` (once per object per call); without
    ``to_ref`` what cannot go by value raises :class:`EncodeError` naming the type and the path.
    ``root`` starts the path; with ``names`` (for a list ``obj``) the top-level items are named
    instead: ``args[1]['reward_fn']``. With a ``sender`` (a session's request), objects are
    pickled by it, as ext 25.
    """
    buffers: Buffers = []
    body = _pack(obj, to_ref, buffers, root, policy, names, sender)
    return [body, *buffers]


def session_ext(sender: Sender, obj: object) -> msgpack.ExtType:
    """``obj`` as one ext 25 of ``sender`` (a request's context: the client's DSPy settings)."""
    return _Encoder(Policy.ALL, None, None, sender).pickle(obj)


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
        missing = _missing_module(exc)
        if missing is not None:
            raise missing from None
        raise ProtocolError(f"cannot unpickle a by-value object here: {type(exc).__name__}: {str(exc)[:300]}"
                            ) from None


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
    except ModuleNotFoundError as exc:  # a by-value object, or a class named by reference, needs it
        name = exc.name or str(exc)
        raise MissingModule(f"{exc} (needed to load a value sent to the {side}): install it "
                            f"{_ENVIRONMENT.get(side, 'here')}", module=name, side=side) from None
    except Exception as exc:
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from exc


def decode(frames: Sequence[Frame], resolve_ref: ResolveRef | None = None, *, own_frames: bool = False,
           side: str = "client") -> object:
    """Inverse of :func:`encode`; refs go through ``resolve_ref`` when given, else stay Refs.

    ``own_frames``: the ``zmq.Frame`` objects among ``frames`` were received from an ipc/tcp socket,
    so their memory belongs to this message alone and arrays may be views of it (no copy of a
    large array). Not for inproc, where a frame can share the sender's (even immutable) memory.
    ``side`` (``"client"`` or ``"worker"``) is where this runs: a module missing here is a
    :class:`MissingModule` that says where to install it.
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
