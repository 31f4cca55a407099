"""Values beyond msgpack on the wire: the codec's ext codes and the types they carry exactly.

Every value here round-trips with its exact type (an OrderedDict stays an OrderedDict, a
namedtuple of the user's script stays that namedtuple, an IntEnum member stays the member). The
cheap ones are a few bytes each (Decimal, UUID, paths, datetimes with a zone); a
container is a msgpack array whose first item is an empty ext "tag" (one packer pass, and
msgpack's own nesting limit still sees cycles); a class or function a value needs (a
namedtuple's class, a defaultdict's factory, an enum) travels as its importable name
(``"module:qualname"``) or, for the user's own code, by value (ext 13). Ext codes are wire
protocol (docs/protocol.md): never renumber them.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import datetime as _dt
import decimal
import enum
import fractions
import pathlib
import re
import struct
import sys
import types
import typing
import uuid
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import msgpack
import numpy as np

from dspex.wire import byvalue
from dspex.wire.errors import ProtocolError
from dspex.wire.record import Record

EXT_TUPLE = 1  # tag: [tag, *items]
EXT_SET = 2  # tag: [tag, *members]
EXT_FROZENSET = 3  # tag: [tag, *members]
EXT_COMPLEX = 4  # struct "<dd" real, imag
EXT_BIGINT = 5  # signed big-endian two's complement (ints outside int64..uint64)
EXT_DATETIME = 6  # UTF-8 isoformat: naive, or a datetime.timezone offset; fold 0
EXT_DATE = 7  # UTF-8 isoformat
EXT_TIME = 8  # UTF-8 isoformat: naive, or a datetime.timezone offset; fold 0
EXT_TIMEDELTA = 9  # struct "<iii" days, seconds, microseconds
EXT_NDARRAY = 10  # packb([dtype, shape, frame index(, "F")]); dtype: a str, a descr list or a map of fields
EXT_NPSCALAR = 11  # packb([dtype as in ext 10, raw bytes])
EXT_REF = 12  # packb([id, session, pool, worker, type_name, repr])
EXT_PICKLE = 13  # packb({"pickle": cloudpickle bytes, "sources": {filename: source text}})
EXT_RECORD = 14  # tag: [tag, kind, {field: value}, input_keys | None, extra(, class, attrs)]
EXT_DECIMAL = 15  # UTF-8 str(d)
EXT_UUID = 16  # the 16 bytes
EXT_PATH = 17  # one byte (index in PATH_TYPES) + UTF-8 (surrogatepass) str(path)
EXT_ZONED = 18  # packb([isoformat, fold, zoneinfo key | None]): what EXT_DATETIME cannot say
EXT_ORDEREDDICT = 19  # tag: [tag, {k: v}]
EXT_DEFAULTDICT = 20  # tag: [tag, factory code | None, {k: v}]
EXT_ENUM = 21  # tag: [tag, enum class code, value]
EXT_SUBCLASS = 22  # tag: [tag, class code, base value, {attr: value} | None]
EXT_SURROGATES = 23  # UTF-8 with lone surrogates kept (surrogatepass)
EXT_BYTEARRAY = 24  # the bytes; msgpack's C packer packs a bytearray as bin before any hook, so the
# codec re-encodes a message that holds one (dspex.wire.codec)
# 25-29 are a session's code, sent once (dspex.client.sessionpickle writes, dspex.wire.codestore reads)
EXT_SESSION_PICKLE = 25  # packb({"pickle": session pickle bytes, "sources": {filename: source text}})

# PosixPath / WindowsPath can only be made on their own platform: as in pickle, the other one
# is an error there
PATH_TYPES: tuple[type[pathlib.PurePath], ...] = (
    pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath, pathlib.WindowsPath)
_PATH_INDEX = {t: i for i, t in enumerate(PATH_TYPES)}

# instances of subclasses of these travel as [class, base value, __dict__] (EXT_SUBCLASS) when the
# class keeps no state elsewhere; the value is read and rebuilt through the base's own methods,
# so no method the subclass overrides runs on either side
SUBCLASS_BASES: tuple[type, ...] = (str, bytes, int, float, tuple, list, dict, set, frozenset)
_COPY: dict[type, Callable[[Any], Any]] = {
    str: str.__str__, bytes: bytes.__bytes__, int: int.__int__, float: float.__float__,
    tuple: lambda o: tuple.__getitem__(o, slice(None)), list: list.copy, dict: dict.copy, set: set.copy,
    frozenset: frozenset.copy,
}
_PICKLING = ("__reduce_ex__", "__reduce__", "__getstate__", "__setstate__")

_CDD = struct.Struct("<dd")
_TD = struct.Struct("<iii")
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


class Encoder(Protocol):
    """What a converter needs from the encoder of one message."""

    def code(self, obj: object) -> Any:
        """A class or function as its importable name, or by value (ext 13)."""

    def pickle(self, obj: object) -> msgpack.ExtType:
        """``obj`` by value (ext 13); EncodeError when it cannot be pickled."""


def tag(code: int) -> msgpack.ExtType:
    return msgpack.ExtType(code, b"")


TUPLE, SET, FROZENSET, RECORD = tag(EXT_TUPLE), tag(EXT_SET), tag(EXT_FROZENSET), tag(EXT_RECORD)
ORDEREDDICT, DEFAULTDICT, ENUM, SUBCLASS = tag(EXT_ORDEREDDICT), tag(EXT_DEFAULTDICT), tag(EXT_ENUM), tag(EXT_SUBCLASS)
TAGS = frozenset({TUPLE, SET, FROZENSET, RECORD, ORDEREDDICT, DEFAULTDICT, ENUM, SUBCLASS})


def _int(o: int, enc: Encoder) -> Any:
    if _INT_MIN <= o <= _INT_MAX:
        return o
    return msgpack.ExtType(EXT_BIGINT, o.to_bytes((o.bit_length() + 8) // 8, "big", signed=True))


def _plain_offset(tz: _dt.tzinfo | None) -> bool:
    """None, or an unnamed datetime.timezone: what an isoformat string says exactly (an offset
    with microseconds is not: Python 3.11 reads "+00:00:00.000001" back as UTC)."""
    return tz is None or tz is _dt.UTC or (
        type(tz) is _dt.timezone and not tz.utcoffset(None).microseconds and tz == _dt.timezone(tz.utcoffset(None)) and
        tz.tzname(None) == _dt.timezone(tz.utcoffset(None)).tzname(None))


def _datetime(o: _dt.datetime, enc: Encoder) -> Any:
    tz = o.tzinfo
    if not o.fold and _plain_offset(tz):
        return msgpack.ExtType(EXT_DATETIME, _dt.datetime.isoformat(o).encode())
    zoneinfo = sys.modules.get("zoneinfo")  # a ZoneInfo exists only once zoneinfo was imported
    key = getattr(tz, "key", None) if zoneinfo is not None and type(tz) is zoneinfo.ZoneInfo else None
    if key is not None:
        naive = _dt.datetime.isoformat(o.replace(tzinfo=None, fold=0))
        return msgpack.ExtType(EXT_ZONED, msgpack.packb([naive, o.fold, key]))
    if _plain_offset(tz):
        return msgpack.ExtType(EXT_ZONED, msgpack.packb([_dt.datetime.isoformat(o), o.fold, None]))
    return enc.pickle(o)  # another tzinfo (pytz, dateutil, a named offset): as pickle keeps it


def _time(o: _dt.time, enc: Encoder) -> Any:
    if not o.fold and _plain_offset(o.tzinfo):
        return msgpack.ExtType(EXT_TIME, _dt.time.isoformat(o).encode())
    return enc.pickle(o)


def _path(o: pathlib.PurePath, enc: Encoder) -> Any:
    return msgpack.ExtType(EXT_PATH, bytes((_PATH_INDEX[type(o)],)) + str(o).encode("utf-8", "surrogatepass"))


def _defaultdict(o: collections.defaultdict[Any, Any], enc: Encoder) -> Any:
    factory = o.default_factory
    return [DEFAULTDICT, None if factory is None else enc.code(factory), dict(o)]


# exact types; subclasses go through ``convert_subclass``
ENCODERS: dict[type, Callable[[Any, Encoder], Any]] = {
    int: _int,
    tuple: lambda o, enc: [TUPLE, *o],
    set: lambda o, enc: [SET, *o],
    frozenset: lambda o, enc: [FROZENSET, *o],
    complex: lambda o, enc: msgpack.ExtType(EXT_COMPLEX, _CDD.pack(o.real, o.imag)),
    _dt.datetime: _datetime,
    _dt.date: lambda o, enc: msgpack.ExtType(EXT_DATE, _dt.date.isoformat(o).encode()),
    _dt.time: _time,
    _dt.timedelta: lambda o, enc: msgpack.ExtType(EXT_TIMEDELTA, _TD.pack(o.days, o.seconds, o.microseconds)),
    decimal.Decimal: lambda o, enc: msgpack.ExtType(EXT_DECIMAL, str(o).encode()),
    uuid.UUID: lambda o, enc: msgpack.ExtType(EXT_UUID, o.bytes),
    collections.OrderedDict: lambda o, enc: [ORDEREDDICT, dict(o)],
    collections.defaultdict: _defaultdict,
    **{t: _path for t in PATH_TYPES},
}

_VALUE_TYPES = (enum.Enum, bytearray, *SUBCLASS_BASES, *ENCODERS)
_PLAIN: weakref.WeakKeyDictionary[type, type | None] = weakref.WeakKeyDictionary()


def plain_base(cls: type) -> type | None:
    """The base in SUBCLASS_BASES of ``cls`` when its instances are exactly their base value and
    ``__dict__`` (no slots with values, no pickling of its own: a Counter, an OrderedDict subclass,
    a pandas Timestamp are not); else None."""
    try:
        return _PLAIN[cls]
    except KeyError:
        pass
    base = next((b for b in cls.__mro__ if b in SUBCLASS_BASES), None)
    if base is not None:
        if any(getattr(cls, name, None) is not getattr(base, name, None) for name in _PICKLING):
            base = None
        for c in cls.__mro__:
            if c is base or base is None:
                break
            slots = c.__dict__.get("__slots__", ())
            if any(s not in ("__dict__", "__weakref__") for s in ([slots] if isinstance(slots, str) else slots)):
                base = None
    try:
        _PLAIN[cls] = base
    except TypeError:
        pass
    return base


def convert_subclass(o: Any, enc: Encoder) -> Any:
    """An enum member, or an instance of a subclass of a type carried natively or by an ext here
    (never its base value); ``NotImplemented`` when ``o`` is neither."""
    if not isinstance(o, _VALUE_TYPES):
        return NotImplemented
    if isinstance(o, enum.Enum):
        return [ENUM, enc.code(type(o)), o._value_]
    base = plain_base(type(o))
    if base is not None:
        attrs = getattr(o, "__dict__", None)
        return [SUBCLASS, enc.code(type(o)), _COPY[base](o), dict(attrs) if attrs else None]
    return enc.pickle(o)  # a subclass that keeps state of its own: as pickle has it


def surrogates(o: str) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_SURROGATES, o.encode("utf-8", "surrogatepass"))


def utf8_ok(o: str) -> bool:
    if o.isascii():
        return True
    try:
        o.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# --- decoding -------------------------------------------------------------------------------

def _zoned(data: bytes) -> _dt.datetime:
    text, fold, key = msgpack.unpackb(data)
    value = _dt.datetime.fromisoformat(text)
    if key is not None:
        import zoneinfo

        value = value.replace(tzinfo=zoneinfo.ZoneInfo(key))
    return value.replace(fold=fold)


def _path_from(data: bytes) -> pathlib.PurePath:
    if not data or data[0] >= len(PATH_TYPES):
        raise ProtocolError("malformed path")
    cls = PATH_TYPES[data[0]]
    try:
        return cls(data[1:].decode("utf-8", "surrogatepass"))
    except NotImplementedError as exc:  # a PosixPath on Windows, a WindowsPath elsewhere
        raise ProtocolError(f"a {cls.__name__} cannot be made here ({exc}); send a Pure path") from None


DECODERS: dict[int, Callable[[bytes], Any]] = {
    EXT_COMPLEX: lambda data: complex(*_CDD.unpack(data)),
    EXT_BIGINT: lambda data: int.from_bytes(data, "big", signed=True),
    EXT_DATETIME: lambda data: _dt.datetime.fromisoformat(data.decode()),
    EXT_DATE: lambda data: _dt.date.fromisoformat(data.decode()),
    EXT_TIME: lambda data: _dt.time.fromisoformat(data.decode()),
    EXT_TIMEDELTA: lambda data: _dt.timedelta(*_TD.unpack(data)),
    EXT_DECIMAL: lambda data: decimal.Decimal(data.decode()),
    EXT_UUID: lambda data: uuid.UUID(bytes=bytes(data)),
    EXT_PATH: _path_from,
    EXT_ZONED: _zoned,
    EXT_SURROGATES: lambda data: bytes(data).decode("utf-8", "surrogatepass"),
    EXT_BYTEARRAY: bytearray,
}


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise ProtocolError(f"malformed {what}")


def _ordereddict(items: list[Any]) -> Any:
    _expect(len(items) == 1 and type(items[0]) is dict, "OrderedDict")
    return collections.OrderedDict(items[0])


def _defaultdict_from(items: list[Any]) -> Any:
    _expect(len(items) == 2 and type(items[1]) is dict, "defaultdict")
    factory = None if items[0] is None else byvalue.resolve_code(items[0])
    _expect(factory is None or callable(factory), "defaultdict factory")
    return collections.defaultdict(factory, items[1])


def _enum(items: list[Any]) -> Any:
    _expect(len(items) == 2, "enum member")
    cls = byvalue.resolve_code(items[0])
    _expect(isinstance(cls, enum.EnumMeta), "enum class")
    return cls(items[1])


def _subclass(items: list[Any]) -> Any:
    _expect(len(items) == 3 and (items[2] is None or type(items[2]) is dict), "subclass instance")
    cls, value, attrs = byvalue.resolve_code(items[0]), items[1], items[2]
    base = plain_base(cls) if isinstance(cls, type) else None
    _expect(base is not None and type(value) is base, f"instance of {getattr(cls, '__qualname__', cls)!r}")
    make: Any = base
    if base in (list, dict, set):
        obj = make.__new__(cls)
        make.__init__(obj, value)
    else:
        obj = make.__new__(cls, value)
    if attrs:
        obj.__dict__.update(attrs)
    return obj


BUILDERS: dict[int, Callable[[list[Any]], Any]] = {
    EXT_TUPLE: tuple, EXT_SET: set, EXT_FROZENSET: frozenset, EXT_ORDEREDDICT: _ordereddict,
    EXT_DEFAULTDICT: _defaultdict_from, EXT_ENUM: _enum, EXT_SUBCLASS: _subclass,
}


# LM provider responses (litellm's pydantic ModelResponse, dspy's vendored lm15 dataclasses) are
# data-like in form but large and provider-specific: the brief keeps them on the worker as refs
# (``lm.history`` entries come back as data whose ``response`` is a ref), readable on demand.
_PROVIDER_MODULES = ("litellm.", "openai.", "anthropic.", "dspy._vendor.")
# the standard library's value types that the codec has no form of its own for: by value
_STDLIB_VALUES = frozenset({fractions.Fraction, collections.deque, collections.ChainMap, types.SimpleNamespace, range,
                            slice, array.array, re.Pattern, type(Ellipsis), type(NotImplemented), _dt.timezone})
# type annotations (``list[Item]``, ``Optional[Model]``, ``Literal[...]``, ``int | None``, a type
# variable, a ``NewType``) are values like the classes in them; ``typing._BaseGenericAlias`` is what
# every ``typing`` alias derives from
_ANNOTATIONS: tuple[type, ...] = (types.GenericAlias, types.UnionType, vars(typing)["_BaseGenericAlias"],
                                  typing.TypeVar, typing.ParamSpec, typing.NewType)


def is_data_like(obj: Any) -> bool:
    """Objects a worker returns by value: data that does not belong on the worker.

    Classes (a class from the client is the client's own class again; an importable one goes by
    name) and type annotations made of them (``list[Item]``), Pydantic model instances, dataclass
    instances, exceptions, enum members, dspy.streaming's messages, records, values of the standard library's value types (``Fraction``, ``deque``,
    ``SimpleNamespace``, ``range``, ``slice``, ``array``, a compiled ``re`` pattern, ``...``, a time zone), numpy
    dtypes and the arrays that are no frames (of objects, masked, matrices);
    anything else a worker returns (LMs, modules, predictors, functions, open files...) stays there
    as a ref.
    """
    if isinstance(obj, (type, *_ANNOTATIONS)):
        return True
    if type(obj) in _STDLIB_VALUES:
        return True
    if isinstance(obj, (np.dtype, np.ndarray)):  # what is not a frame: an array of objects, a masked array, a matrix
        return True
    zoneinfo = sys.modules.get("zoneinfo")  # a ZoneInfo exists only once zoneinfo was imported
    if zoneinfo is not None and type(obj) is zoneinfo.ZoneInfo:
        return True
    if type(obj).__module__.startswith(_PROVIDER_MODULES):
        return False
    if isinstance(obj, (BaseException, enum.Enum, Record)) or dataclasses.is_dataclass(obj):
        return True
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(obj, pydantic.BaseModel)
