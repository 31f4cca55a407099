"""Wire codec: msgpack bodies, numpy buffers in their own frames, other objects by value or as refs.

Frame 0 is a msgpack body; frames 1.. are raw array buffers that the body points at by index,
so large arrays never pass through msgpack (no copy, no glibc heap churn). The common case is
packed by msgpack's C packer in one pass; only cycles, very deep nesting, strings with lone
surrogates, a bytearray (the C packer takes it for bytes: a body with a bin marker is checked) or a
missing ``to_ref`` fall back to a Python walk, which knows paths and ancestors.
Ext codes are part of the wire protocol (``dspex.wire.wiretypes``, docs/protocol.md).

Values keep their exact types (``dspex.wire.wiretypes``: subclasses, enum members, OrderedDict,
Decimal, paths...). What is not a value follows the encode :class:`Policy`: by value
(``dspy.Example`` / ``Prediction`` and their subclasses as records, ext 14; anything else with
cloudpickle, ext 13) or as a ref. Decoding is :mod:`dspex.wire.decoding` (``decode`` and
``unpackb`` are this module's too).
"""

from __future__ import annotations

import enum
import types
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgpack
import numpy as np

from dspex.wire import byvalue
from dspex.wire.arrays import dtype_wire
from dspex.wire.decoding import decode, decode_ext, unpackb
from dspex.wire.errors import EncodeError
from dspex.wire.record import record_parts
from dspex.wire.ref import Ref
from dspex.wire.repeats import Repeats, list_or_dict_twice
from dspex.wire.wiretypes import (
    ENCODERS,
    EXT_BYTEARRAY,
    EXT_FROZENSET,
    EXT_NDARRAY,
    EXT_NPSCALAR,
    EXT_PICKLE,
    EXT_RECORD,
    EXT_REF,
    EXT_SESSION_PICKLE,
    EXT_SET,
    EXT_TUPLE,
    RECORD,
    TAGS,
    convert_subclass,
    is_data_like,
    surrogates,
    utf8_ok,
)

__all__ = ["EXT_PICKLE", "EncodeError", "Policy", "Repeats", "decode", "decode_ext", "encode",
           "encode_whole", "packb", "session_ext", "unpackb"]


class Policy(str, enum.Enum):
    """What ``encode`` does with a value msgpack cannot carry."""

    REFS = "refs"  # a ref via ``to_ref`` (EncodeError without one): the original behaviour
    DATA = "data"  # data-like objects (records, pydantic/dataclass instances, exceptions) by value, the rest refs
    ALL = "all"  # everything by value (client arguments); what cannot be pickled: a ref, else EncodeError

# msgpack packs ~1024 levels and unpacks 1024; the fallback walk recurses in Python, so it cuts
# deeper structures (only reached when msgpack gave up) at a depth safe for the recursion limit.
MAX_WALK_DEPTH = 400

ToRef = Callable[[object], Ref]
Buffers = list[bytes | memoryview]


def _ref_ext(ref: Ref) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_REF, msgpack.packb(list(ref.as_tuple())))


def _native_array(o: object) -> bool:
    # other ndarray subclasses (masked arrays, matrix) would silently lose meaning: refs
    return isinstance(o, np.ndarray) and type(o) in (np.ndarray, np.memmap) and not o.dtype.hasobject


def type_name(obj: object) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class Sender(Protocol):
    """Pickles by-value objects for one request of a session (``dspex.client.sessionpickle.Message``)."""

    def dumps(self, obj: Any) -> tuple[bytes, dict[str, str]]: ...


class _Encoder:
    """The state of one ``encode``: array frames, refs made, objects pickled (each once)."""

    __slots__ = ("buffers", "memo", "parts", "pickled", "policy", "repeats", "sender", "sources_sent", "to_ref")

    def __init__(self, policy: Policy, buffers: Buffers | None, to_ref: ToRef | None,
                 sender: Sender | None = None, repeats: Repeats | None = None) -> None:
        self.repeats = repeats
        self.policy = policy
        self.buffers = buffers
        self.to_ref = to_ref
        self.sender = sender  # a session's request: objects pickled by it, as ext 25
        self.memo: dict[int, Ref] = {}  # shared by both passes so to_ref runs once per object
        # shared too: one pickle per object
        self.pickled: dict[int, tuple[object, bytes, dict[str, str], msgpack.ExtType | None]] = {}
        self.sources_sent: set[str] | None = None  # source files already in an ext 13 of this message
        # the tagged lists ``convert`` gave the packer: with the body's exact lists and dicts, all
        # the packer walked (where a bytearray it packed as bin may sit)
        self.parts: list[list[Any]] = []

    def wants_pickled(self, obj: object) -> bool:
        """Is ``obj`` (not a value, not a record) sent by value under this policy?"""
        return self.policy is Policy.ALL or self.policy is Policy.DATA and is_data_like(obj)

    def pickle(self, obj: object) -> msgpack.ExtType:
        """ext 13 (ext 25 with a sender) of ``obj``; raises EncodeError (with pickle's reason) when
        it cannot be pickled."""
        hit = self.pickled.get(id(obj))
        if hit is not None and hit[3] is not None:
            if self.repeats is not None and not isinstance(obj, type) and type(obj) is not types.FunctionType:
                self.repeats.seen = True  # (functions and classes are one object per session anyway)
            return hit[3]
        if hit is None:
            try:
                data, sources = byvalue.dumps(obj) if self.sender is None else self.sender.dumps(obj)
            except EncodeError:
                raise  # names what it is already (a session's unpicklable global)
            except Exception as exc:  # noqa: BLE001 - whatever pickling raises is this value's EncodeError
                raise EncodeError(f"cannot pickle {type_name(obj)}: {type(exc).__name__}: {str(exc)[:300]}",
                                  type=type_name(obj)) from None
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
        self.parts.clear()
        if self.repeats is not None:
            self.repeats.met.clear()
        for key, (obj, data, sources, _) in self.pickled.items():
            self.pickled[key] = (obj, data, sources, None)

    def code(self, obj: object) -> Any:
        """A class or function a value needs: its importable name, else by value."""
        name = byvalue.importable_name(obj)
        return name if name is not None else self.pickle(obj)

    def ref(self, obj: object) -> msgpack.ExtType:
        assert self.to_ref is not None
        if self.repeats is not None:
            self.repeats.plain = False
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
        if self.repeats is not None:
            self.repeats.meet(obj)
            self.repeats.plain = False  # (a client without dspy reads a record, not a pickle of one)
        kind, fields, keys, extra, attrs = parts
        if attrs is None:
            return [RECORD, kind, fields, keys, extra]
        return [RECORD, kind, fields, keys, extra, self.code(type(obj)), attrs]

    def convert(self, obj: Any) -> Any:
        """One level of msgpack form of ``obj``, which is not an exact msgpack-native type: an
        ext, a tagged list of parts (the packer goes on into them), or a ref."""
        conv = _ENCODERS.get(type(obj))
        if conv is not None:
            out = conv(obj, self)
            if type(out) is list:
                self.parts.append(out)
                if self.repeats is not None and (obj or type(obj) not in _IMMUTABLE):
                    self.repeats.meet(obj)
            return out
        if type(obj) is types.FunctionType:  # (``s.run(fn)``'s) none of the forms below
            return self._pickled_or_ref(obj)
        if _native_array(obj):
            if self.repeats is not None:
                self.repeats.meet(obj)
            if self.buffers is None:
                raise EncodeError("numpy arrays travel as frames: use encode(), not packb()")
            # a Fortran-ordered array goes in its own order (as pickle keeps it); any other layout
            # (a strided view) as a C-contiguous copy
            fortran = obj.flags.f_contiguous and not obj.flags.c_contiguous
            flat = obj.T if fortran else np.ascontiguousarray(obj)  # copies only when not contiguous
            self.buffers.append(flat.reshape(-1).view(np.uint8).data if flat.dtype.itemsize else b"")
            header = [dtype_wire(obj.dtype), list(obj.shape), len(self.buffers)]
            payload = packb([*header, "F"] if fortran else header)
            return msgpack.ExtType(EXT_NDARRAY, payload)
        if isinstance(obj, np.generic):  # before the subclasses: np.float64 is a float subclass
            return msgpack.ExtType(EXT_NPSCALAR, packb([dtype_wire(obj.dtype), obj.tobytes()]))
        rec = self.record(obj)
        if rec is not None:
            self.parts.append(rec)
            return rec
        if not isinstance(obj, np.ndarray):
            try:
                value = convert_subclass(obj, self)
            except EncodeError:
                if self.to_ref is None:
                    raise
                return self.ref(obj)
            if value is not NotImplemented:
                if type(value) is list:
                    self.parts.append(value)
                    if self.repeats is not None and not isinstance(obj, enum.Enum):  # (members are singletons)
                        self.repeats.meet(obj)
                return value
        return self._pickled_or_ref(obj)

    def _pickled_or_ref(self, obj: Any) -> Any:
        if self.wants_pickled(obj):
            try:
                return self.pickle(obj)
            except EncodeError:
                if self.to_ref is None:
                    raise  # the path-aware walk names where it is
        if self.to_ref is None:
            raise EncodeError(f"cannot encode {type_name(obj)}")
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


_IMMUTABLE = (tuple, frozenset)  # empty ones: one object or many, nothing tells them apart

_ENCODERS: dict[type, Callable[[Any, _Encoder], Any]] = {
    **ENCODERS, Ref: lambda o, enc: _ref_ext(o), _KeyList: lambda o, enc: list(o), _KeyMap: lambda o, enc: dict(o)}

# what the packer takes as it is
_LEAVES = (bool, int, float, bytes, memoryview, msgpack.ExtType)


class _Cycle(Exception):
    """Raised where a walk meets a container it is inside of, caught by that container's walk."""

    def __init__(self, container: int) -> None:
        self.container = container


def _sanitize(obj: object, enc: _Encoder, root: str, names: Sequence[str] | None = None) -> object:
    """Copy ``obj`` in msgpack form with cycle-closing containers, too-deep containers and what
    cannot be encoded as refs (or by value, as the policy says), strings with lone surrogates as
    ext 23; errors name the path (``args[1]['reward_fn']``).

    Under a by-value policy a container that holds itself goes whole by value (pickle keeps the
    cycle: ``x[1] is x`` on the other side too); a copy of it inside a msgpack copy of it would
    not be the same object."""
    stack: set[int] = set()
    trail: list[str] = []

    def path() -> str:
        if names is not None and trail and isinstance(obj, list):
            return "".join(trail)
        return root + "".join(trail)

    def ref_for(o: object, why: str) -> object:
        if enc.wants_pickled(o) or why == "cycle" and enc.policy is not Policy.REFS:
            try:
                return enc.pickle(o)
            except EncodeError as err:
                if "global" in err.details or "handle" in err.details:  # says what it is and what to do already
                    raise EncodeError(err.message, **{**err.details, "path": path()}) from None
                why = err.message
        if enc.to_ref is None:
            where = path()
            name = type_name(o)
            shown = where if len(where) <= 120 else f"{where[:60]}...{where[-40:]}"  # (a deep structure's is long)
            raise EncodeError(f"cannot encode {name} at {shown} ({why})", type=name, path=where)
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
        if t is bytearray:
            return msgpack.ExtType(EXT_BYTEARRAY, bytes(o))
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
            if enc.policy is not Policy.REFS:
                raise _Cycle(id(o))
            return ref_for(o, "cycle")
        if depth >= MAX_WALK_DEPTH:
            return ref_for(o, "nested too deeply")
        stack.add(id(o))
        mark = len(trail)
        try:
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
            return out
        except _Cycle as cycle:
            if cycle.container != id(o):
                raise
            del trail[mark:]
            return ref_for(o, "cycle")
        finally:
            stack.discard(id(o))

    return walk(obj, 0)


def _packed_bytearray(body: bytes, obj: object, enc: _Encoder) -> bool:
    """Whether the C packer packed a bytearray of ``obj`` as bin (it does so before any hook)."""
    if 0xC4 not in body and 0xC5 not in body and 0xC6 not in body:  # no bin marker (an int: memchr)
        return False
    if type(obj) is bytearray:
        return True
    todo: list[Any] = [*enc.parts, obj] if type(obj) is list or type(obj) is dict else [*enc.parts]
    while todo:
        o = todo.pop()
        values = o.values() if type(o) is dict else o  # a key is hashable: never a bytearray
        if len(values) > 24:  # a long one: its types gathered at C speed (a list of floats)
            kinds = set(map(type, values))
            if bytearray in kinds:
                return True
            if list in kinds or dict in kinds:
                todo += [v for v in values if type(v) is list or type(v) is dict]
            continue
        for v in values:
            t = type(v)
            if t is list or t is dict:
                todo.append(v)
            elif t is bytearray:
                return True
    return False


def _pack(obj: object, to_ref: ToRef | None, buffers: Buffers | None, root: str,
          policy: Policy = Policy.REFS, names: Sequence[str] | None = None, sender: Sender | None = None,
          repeats: Repeats | None = None) -> bytes:
    enc = _Encoder(policy, buffers, to_ref, sender, repeats)
    try:
        body: bytes = msgpack.Packer(strict_types=True, default=enc.convert).pack(obj)
        if not _packed_bytearray(body, obj, enc):
            _note_shared_containers(obj, enc)
            return body
    except (ValueError, EncodeError):  # ValueError: msgpack's nesting limit (a cycle, or >1024 deep), surrogates
        pass
    if buffers is not None:
        buffers.clear()
    enc.restart()
    body = msgpack.Packer(strict_types=True, default=enc.convert).pack(_sanitize(obj, enc, root, names))
    _note_shared_containers(obj, enc)
    return body


def _note_shared_containers(obj: object, enc: _Encoder) -> None:
    repeats = enc.repeats
    if repeats is None or repeats.seen or repeats.plain_only and not repeats.plain or \
            not enc.parts and type(obj) is not list and type(obj) is not dict:
        return  # (a scalar result: nothing to look through)
    if list_or_dict_twice(obj, enc.parts):
        repeats.seen = True


def encode(
    obj: object, to_ref: ToRef | None = None, *, root: str = "result", policy: Policy = Policy.REFS,
    names: Sequence[str] | None = None, sender: Sender | None = None, repeats: Repeats | None = None,
) -> list[bytes | memoryview]:
    """frame 0 = msgpack body; frames 1.. = raw numpy buffers referenced from the body.

    Values keep their exact types; other objects follow ``policy``: by value (records,
    cloudpickle) where it says so, else a ref via ``to_ref`` (once per object per call); without
    ``to_ref`` what cannot go by value raises :class:`EncodeError` naming the type and the path.
    ``root`` starts the path; with ``names`` (for a list ``obj``) the top-level items are named
    instead: ``args[1]['reward_fn']``. With a ``sender`` (a session's request), objects are
    pickled by it, as ext 25. ``repeats`` is told whether an object went by value twice.
    """
    buffers: Buffers = []
    body = _pack(obj, to_ref, buffers, root, policy, names, sender, repeats)
    return [body, *buffers]


def encode_whole(obj: object) -> list[bytes | memoryview]:
    """``obj`` as one pickle (ext 13), which keeps an object it holds twice one object; raises
    EncodeError when it cannot be pickled."""
    return [msgpack.packb(_Encoder(Policy.ALL, None, None).pickle(obj))]


def session_ext(sender: Sender, obj: object) -> msgpack.ExtType:
    """``obj`` as one ext 25 of ``sender`` (a request's context: the client's DSPy settings)."""
    return _Encoder(Policy.ALL, None, None, sender).pickle(obj)


def packb(obj: object) -> bytes:
    """Plain msgpack for small headers: same ext types, no array frames, no ``to_ref``."""
    return _pack(obj, None, None, "header")
