"""The wire form of numpy dtypes (codec ext 10 and 11, docs/protocol.md): a dtype's ``str``; a
structured dtype's ``descr`` list, or, when a descr would turn the padding between fields into
fields of their own (``align=True``, explicit offsets), a map of names, formats, offsets and
itemsize."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = ["dtype_wire", "wire_dtype"]


def dtype_wire(dt: np.dtype[Any]) -> Any:
    # dtype.str drops field names, so structured dtypes travel as their descr list; a descr turns
    # padding between fields into fields of its own, so those travel as names and offsets
    return dt.str if dt.fields is None else _structured_wire(dt)


@functools.lru_cache(maxsize=256)
def _structured_wire(dt: np.dtype[Any]) -> Any:
    descr = dt.descr
    if np.dtype(descr) == dt and np.dtype(descr).names == dt.names:
        return descr
    return _fields_wire(dt)


def _fields_wire(dt: np.dtype[Any]) -> Any:
    """``{"names", "formats", "offsets", "itemsize", "aligned"}`` (a format: a dtype str, such a
    map, or ``{"base", "shape"}`` of a subarray), read back by :func:`wire_dtype`."""
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return {"base": _fields_wire(base), "shape": list(shape)}
    if dt.fields is None:
        return dt.str
    names = list(dt.names or ())
    fields = [dt.fields[name] for name in names]
    out = {"names": names, "formats": [_fields_wire(f[0]) for f in fields], "offsets": [f[1] for f in fields],
           "itemsize": dt.itemsize, "aligned": dt.isalignedstruct}
    if any(len(f) > 2 for f in fields):
        out["titles"] = [f[2] if len(f) > 2 else None for f in fields]
    return out


def wire_dtype(wire: Any) -> np.dtype[Any]:
    """The dtype :func:`dtype_wire` sent: a dtype str, a descr list, or a map of fields."""
    dt: np.dtype[Any]
    if type(wire) is not dict:
        dt = np.dtype(wire)
    elif "base" in wire:
        dt = np.dtype((wire_dtype(wire["base"]), tuple(wire["shape"])))
    else:
        spec: Any = {"names": wire["names"], "formats": [wire_dtype(f) for f in wire["formats"]],
                     "offsets": wire["offsets"], "itemsize": wire["itemsize"]}
        if wire.get("titles") is not None:
            spec["titles"] = wire["titles"]
        dt = np.dtype(spec, align=bool(wire.get("aligned")))
    return dt
