"""``dspy.Example`` / ``dspy.Prediction`` on the wire (codec ext 14), and :class:`Record`, their
stand-in on a client that cannot import dspy.

A record travels as its kind, its fields (codec values, so refs and arrays may sit inside) and its
input keys; the receiver rebuilds the dspy object when dspy is importable, else a :class:`Record`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import weakref
from collections.abc import Iterator
from typing import Any

from dspex.wire.byvalue import resolve_code

KINDS = ("example", "prediction")


class Record:
    """Attribute- and item-access data with the fields of a ``dspy.Example``/``dspy.Prediction``.

    ``kind`` says which it was; ``input_keys`` are the example's inputs (``with_inputs``).
    """

    __slots__ = ("_fields", "extra", "input_keys", "kind")

    def __init__(self, kind: str, fields: dict[str, Any], input_keys: list[str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "_fields", dict(fields))
        object.__setattr__(self, "input_keys", list(input_keys) if input_keys is not None else None)
        object.__setattr__(self, "extra", dict(extra or {}))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self._fields[name]
        except KeyError:
            raise AttributeError(f"{self.kind} has no field {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._fields[name] = value

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._fields[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and (self.kind, self._fields) == (other.kind, other._fields)

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dspy objects it stands for

    def keys(self) -> list[str]:
        return list(self._fields)

    def values(self) -> list[Any]:
        return list(self._fields.values())

    def items(self) -> list[tuple[str, Any]]:
        return list(self._fields.items())

    def get(self, key: str, default: Any = None) -> Any:
        return self._fields.get(key, default)

    def toDict(self) -> dict[str, Any]:
        return dict(self._fields)

    def __repr__(self) -> str:
        body = ",\n    ".join(f"{k}={v!r}" for k, v in self._fields.items())
        return f"Record[{self.kind}](\n    {body}\n)"


_COMPLETIONS: list[Any] = []  # dspy's Completions class, once needed


@functools.cache
def _dspy() -> Any:
    """dspy when this process has it (imported on first need; None when it is not installed).

    import_module, not sys.modules: while another thread is still importing dspy, sys.modules
    holds a half-initialized module; import_module waits for that import to finish. Once it
    returned, the module is complete and kept (every returned record asks)."""
    if "dspy" not in sys.modules and importlib.util.find_spec("dspy") is None:
        return None
    return importlib.import_module("dspy")


# what the record's fields and extra carry; the rest of a subclass instance's __dict__ travels as attrs
_RECORD_STATE = frozenset({"_store", "_completions", "_lm_usage"})


def record_parts(obj: Any) -> tuple[str, dict[str, Any], list[str] | None, dict[str, Any], dict[str, Any] | None] | None:
    """(kind, fields, input_keys, extra, attrs) of a dspy.Example/Prediction or a Record; else None.

    ``attrs`` is None for the exact classes; for a subclass (dspy's ``EvaluationResult``, the
    user's own) it is the rest of the instance's ``__dict__``, and the class travels too."""
    if type(obj) is Record:
        return obj.kind, obj._fields, obj.input_keys, obj.extra, None
    dspy = sys.modules.get("dspy")
    if dspy is None:
        return None
    cls = type(obj)
    # getattr: dspy may be half-imported by another thread (then obj cannot be one of these yet)
    prediction, example = getattr(dspy, "Prediction", None), getattr(dspy, "Example", None)
    if cls is prediction:
        return "prediction", dict(obj._store), None, _prediction_extra(obj), None
    if cls is example:
        keys = getattr(obj, "_input_keys", None)
        return "example", dict(obj._store), sorted(keys) if keys is not None else None, {}, None
    if example is None or not isinstance(obj, example):
        return None
    state = getattr(obj, "__dict__", None)
    if not isinstance(state, dict) or not isinstance(state.get("_store"), dict):
        return None  # a subclass that keeps its fields elsewhere: pickled as a whole
    attrs = {k: v for k, v in state.items() if k not in _RECORD_STATE}
    if prediction is not None and isinstance(obj, prediction):
        return "prediction", dict(obj._store), None, _prediction_extra(obj), attrs
    keys = state.get("_input_keys")
    return "example", dict(obj._store), sorted(keys) if keys is not None else None, {}, attrs


def _prediction_extra(obj: Any) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    usage = getattr(obj, "_lm_usage", None)
    if usage:
        extra["lm_usage"] = usage
    completions = getattr(obj, "_completions", None)
    if completions is not None:
        # all of them (dspy.majority reads them); the signature as its text form, which names
        # the fields (a class would have to stay on the worker as a ref)
        extra["completions"] = dict(completions._completions)
        sig = getattr(completions, "signature", None)
        text = _signature_text(sig)
        if text is not None:
            extra["signature"] = text
            name = _pickled_name(sig)
            if name is not None:
                extra["signature_name"] = name
    return extra


def _named(module: str, qualname: str) -> Any:
    """What ``module.qualname`` is in this process's loaded modules (None when it is nothing)."""
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _pickled_name(cls: Any) -> str | None:
    """``"module:qualname"`` of a class pickle would name (it is that module's attribute), else None."""
    module, qualname = getattr(cls, "__module__", None), getattr(cls, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or _named(module, qualname) is not cls:
        return None
    return f"{module}:{qualname}"


# signature class -> (its __doc__, its fields dict, [spec, instructions]): computing the text form
# walks the pydantic fields and cleans the docstring, for every prediction returned
_SIGNATURE_TEXT: weakref.WeakKeyDictionary[Any, tuple[Any, Any, list[str]]] = weakref.WeakKeyDictionary()


def _signature_text(sig: Any) -> list[str] | None:
    """``[spec, instructions]`` of a dspy.Signature class (None when ``sig`` is not one).

    Cached per class and checked against the two things the text is made of: the docstring
    (``instructions`` is its cleaned form; its setter replaces it) and pydantic's fields dict
    (replaced, never mutated, when a class is rebuilt)."""
    if sig is None:
        return None
    fields = getattr(sig, "__pydantic_fields__", None)
    try:
        hit = _SIGNATURE_TEXT.get(sig)
    except TypeError:  # not weak-referenceable: not a class
        hit = None
    if hit is not None and hit[0] is sig.__doc__ and hit[1] is fields:
        return hit[2]
    spec = getattr(sig, "signature", None)
    if not isinstance(spec, str):
        return None
    text = [spec, str(getattr(sig, "instructions", "") or "")]
    if fields is not None:
        try:
            _SIGNATURE_TEXT[sig] = (sig.__doc__, fields, text)
        except TypeError:
            pass
    return text


@functools.lru_cache(maxsize=256)
def _signature(spec: str, instructions: str) -> Any:
    """Building a dspy.Signature class is slow: predictions of one program share theirs."""
    try:
        return _dspy().Signature(spec, instructions or None)
    except Exception:  # noqa: BLE001 - a signature DSPy cannot build stays a plain record
        return None


_PREDICTION_STATE: dict[type, bool] = {}  # Prediction class -> may its instances be built from their state


def _new_prediction(cls: Any, fields: dict[str, Any]) -> Any:
    """``cls()`` holding ``fields`` (not ``cls(**fields)``: a field may be named like a parameter).

    Example.__init__ and Prediction.__init__ go through Example.__setattr__ six times for
    every returned prediction; when a fresh instance is exactly a store and two empty slots, as in the
    dspy versions we know, the instance is made from that state instead."""
    fast = _PREDICTION_STATE.get(cls)
    if fast is None:
        probe = cls()
        new: Any = type(probe).__new__
        fast = _PREDICTION_STATE[cls] = (new is object.__new__
                                         and vars(probe) == {"_store": {}, "_completions": None, "_lm_usage": None})
    if fast:
        pred = cls.__new__(cls)
        vars(pred).update(_store=dict(fields), _completions=None, _lm_usage=None)
        return pred
    pred = cls()
    pred._store.update(fields)
    return pred


def build_record(kind: str, fields: dict[str, Any], input_keys: list[str] | None, extra: dict[str, Any],
                 cls: Any = None, attrs: dict[str, Any] | None = None) -> Any:
    """The dspy object of a record (of class ``cls`` with ``attrs`` for a subclass: its
    importable name or the class itself); a :class:`Record` when dspy is not importable here."""
    dspy = _dspy()
    if dspy is None:
        return Record(kind, fields, input_keys, extra)
    if cls is not None:
        return _subclass_record(dspy, kind, resolve_code(cls), fields, extra, attrs or {})
    if kind == "prediction":
        pred = _new_prediction(dspy.Prediction, fields)
        _set_prediction_extra(pred, extra)
        return pred
    example = dspy.Example()
    example._store.update(fields)
    if input_keys is not None:
        example = example.with_inputs(*input_keys)
    return example


def _set_prediction_extra(pred: Any, extra: dict[str, Any]) -> None:
    if extra.get("lm_usage"):
        pred.set_lm_usage(extra["lm_usage"])
    completions = extra.get("completions")
    if isinstance(completions, dict):
        spec = extra.get("signature")
        ok = isinstance(spec, list) and len(spec) == 2 and all(isinstance(x, str) for x in spec)
        signature = None
        if ok and isinstance(spec, list):
            signature = _client_signature(extra.get("signature_name"), spec) or _signature(spec[0], spec[1])
        if not _COMPLETIONS:
            from dspy.primitives.prediction import Completions

            _COMPLETIONS.append(Completions)
        pred._completions = _COMPLETIONS[0](completions, signature=signature)


def _client_signature(name: Any, spec: list[str]) -> Any:
    """The class of this process that a prediction's signature class was named by on the worker
    (the client's own Signature, as pickle would name it), if it has the same text; else None."""
    if not isinstance(name, str):
        return None
    module, _, qualname = name.partition(":")
    cls = _named(module, qualname)
    return cls if isinstance(cls, type) and _signature_text(cls) == spec else None


def _subclass_record(dspy: Any, kind: str, cls: Any, fields: dict[str, Any], extra: dict[str, Any],
                     attrs: dict[str, Any]) -> Any:
    """An instance of a subclass of Example/Prediction from its state, as pickle would make it
    (its ``__init__`` may take other arguments: ``EvaluationResult(score, results)``)."""
    from dspex.wire.errors import ProtocolError

    base = dspy.Prediction if kind == "prediction" else dspy.Example
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ProtocolError(f"malformed record: {cls!r} is not a {base.__name__} class")
    make: Any = cls
    obj = make.__new__(cls)
    state = vars(obj)
    state["_store"] = dict(fields)
    if kind == "prediction":
        state.update(_completions=None, _lm_usage=None)
    state.update(attrs)
    if kind == "prediction":
        _set_prediction_extra(obj, extra)
    return obj
