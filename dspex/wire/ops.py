"""The ops of the protocol, each defined once (:class:`Op`): its wire name, who answers it, its
arguments and the client methods that send it; a body checked against its op's arguments."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Self

from dspex.wire.errors import ProtocolError


class Side(str, enum.Enum):
    """Who answers an op."""

    WORKER = "worker"  # forwarded to a worker of the request's pool, which runs it in the session
    BROKER = "broker"  # answered by the broker
    CONTROL = "control"  # request control: to the worker running the header's req_id; no reply


_REQUIRED: Any = object()


@dataclass(frozen=True)
class Arg:
    """One argument of an op: its name, the types it may have once decoded (none: any value,
    e.g. an object a ref stands for) and its default (none: required)."""

    name: str
    types: tuple[type, ...] = ()
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def _arg(name: str, *types: type, default: Any = _REQUIRED) -> Arg:
    return Arg(name, types, default)


_NAMESPACE = _arg("namespace", dict, type(None), default=None)
_CALL_ARGS = (_arg("args", list, tuple, type(None), default=None), _arg("kwargs", dict, type(None), default=None))


class Op(str, enum.Enum):
    """Every op of the protocol, defined once: its wire name (the member's value), who answers it
    (``side``), its arguments in order (``args``; a worker op's body is their list, a broker op's
    a map of them by name, a control op's one integer), the user methods of ``dspex.client.api`` and
    ``dspex.client.sessionapi`` that send it (``client``: none for request control, which the client
    kinds send themselves) and what it does (``doc``, the table in docs/protocol.md). The broker
    routes by ``side``; each side registers its handlers against the members (``broker.ops``, ``worker.executor``); the client
    checks a body against ``args`` before sending it (``dspex.client.exchange``); tests/test_protocol_ops.py
    checks that every op has its handlers and that the client methods named here send it."""

    side: Side
    args: tuple[Arg, ...]
    client: tuple[str, ...]
    doc: str
    _required: int  # how many arguments have no default (they come first)
    _defaults: tuple[Any, ...]
    _typed: tuple[tuple[int, tuple[type, ...], str], ...]  # (index, types, name) of the typed ones

    def __new__(cls, name: str, side: Side, args: tuple[Arg, ...], client: tuple[str, ...], doc: str) -> Self:
        op = str.__new__(cls, name)
        op._value_ = name
        op.side, op.args, op.client, op.doc = side, args, client, doc
        op._required = sum(a.required for a in args)
        op._defaults = tuple(a.default for a in args)
        op._typed = tuple((i, a.types, a.name) for i, a in enumerate(args) if a.types)
        return op

    CALL = ("call", Side.WORKER, (_arg("module", str), _arg("fn", str), *_CALL_ARGS),
            ("ClientAPI.call", "SessionAPI.call", "SessionAPI.stream"),
            "`module.fn(*args, **kwargs)` (`fn` may be a dotted qualname)")
    METHOD = ("method", Side.WORKER, (_arg("ref"), _arg("name", str), *_CALL_ARGS),
              ("SessionAPI.method", "SessionAPI.stream_method"), "`getattr(obj, name)(*args, **kwargs)`")
    GETATTR = ("getattr", Side.WORKER, (_arg("ref"), _arg("name", str)), ("SessionAPI.attr",),
               "`getattr(obj, name)`")
    SETATTR = ("setattr", Side.WORKER, (_arg("ref"), _arg("name", str), _arg("value")), ("SessionAPI.set_attr",),
               "`setattr(obj, name, value)`; `None`")
    EVAL = ("eval", Side.WORKER, (_arg("expr", str), _NAMESPACE), ("SessionAPI.eval", "SessionAPI.stream_eval"),
            "the value of `expr` in the session namespace + `namespace`")
    EXEC = ("exec", Side.WORKER, (_arg("source", str), _NAMESPACE), ("SessionAPI.exec",),
            "runs `source` as the next lines of the session's module; `{name: value}` of the names it bound")
    RELEASE = ("release", Side.WORKER, (_arg("ref_ids", list, tuple),), ("SessionAPI.release",),
               "drops the session's refs of these ids; the number released")
    TO_DATA = ("to_data", Side.WORKER, (_arg("ref"),), ("SessionAPI.to_data",),
               "plain dict of a `dspy.Example`/`Prediction` (`toDict()`)")
    APPLY = ("apply", Side.WORKER, (_arg("fn"), *_CALL_ARGS),
             ("SessionAPI.run", "SessionAPI.apply", "SessionAPI.stream_apply"),
             "`fn(*args, **kwargs)`; `fn` arrives by value (ext 25) or as a ref")
    BIND = ("bind", Side.WORKER, (_arg("name", str), _arg("value")), ("SessionAPI.define",),
            "binds `value` as `name` in the session namespace; `None`")
    PUT = ("put", Side.WORKER, (_arg("value"),), ("SessionAPI.put",), "a ref to `value`, always (Ray's `put`)")
    PING = ("ping", Side.BROKER, (), ("ClientAPI.ping",),
            ("`{\"pong\": true, \"pid\", \"config\", \"frontend\", \"backend\", \"run_dir\", \"metrics\", "
             "\"checkpoints\"}` (`config`: the broker's supervisor.conf, so `dspexctl` can tell which stack answers; "
             "`checkpoints`: the durable sessions' store file, absent without one)"))
    STATUS = ("status", Side.BROKER, (), ("ClientAPI.status",),
              ("pools, workers, counters (what `dspexctl pools status --json` prints), and `refused`: the peers a "
               "TCP broker's CURVE allow-lists refused (`plane`, `address`, `key`, `allowed`, `count`, `ago_s`; "
               "newest first)"))
    SESSIONS = ("sessions", Side.BROKER, (_arg("pool", str, default=""),), ("ClientAPI.sessions",),
                ("`[{\"id\", \"pool\", \"worker\", \"worker_alive\", \"calls\", \"idle_s\", \"created\", "
                 "\"durable\", \"checkpoint_bytes\", \"checkpoint_age_s\", \"no_longer_durable\"}]` (and `\"owner\"`, the CURVE key that opened "
                 "it, on a TCP frontend): the sessions of the caller's key (on ipc every peer shares one identity, so all "
                 "of them; an admin key sees every session); `pool`: of that pool only"))
    CLOSE_SESSION = ("close_session", Side.BROKER, (_arg("session", str, default=""),),
                     ("ClientAPI.close_session", "SessionAPI.close"),
                     ("`{\"closed\": bool, \"released\": bool}` (`session`: else the header's); the broker sends "
                      "`B_RELEASE_SESSION` to its workers; another client's session is `session_not_yours`"))
    RECYCLE = ("recycle", Side.BROKER, (_arg("pool", str, default=""), _arg("worker", str, int, default=""),
                                        _arg("all", bool, default=False)), ("ClientAPI.recycle",),
               ("`{\"pool\", \"recycling\": [incarnation, ...]}`: starts a graceful, rolling recycle (`pool`: else "
                "the header's; `worker`: an incarnation prefix or a pid; neither `worker` nor `all`: the oldest "
                "worker); needs an admin key when the broker has an admin allow-list (else `refused`)"))
    CREDIT = ("credit", Side.CONTROL, (_arg("n", int),), (),
              ("the consumer of a stream took `n` more items: the worker may send `n` more `part`/`prog`/`out` "
               "replies (the stream window is 64 items)"))
    CANCEL = ("cancel", Side.CONTROL, (_arg("n", int),), (),
              ("stop the request, streamed or not (`n`: 0; sent when its caller stops waiting: a cancelled "
               "task, Ctrl-C, an exception, a stream left early): a request still queued in the broker is removed and "
               "answered `cancelled`; a running one is forwarded to its worker as `B_CANCEL`, which stops it and "
               "answers `cancelled` (the broker counts outcome `cancelled`); a cancel for a request that has "
               "finished, or that the broker never saw, is dropped silently"))

    def bind_list(self, body: Any) -> list[Any] | tuple[Any, ...]:
        """A worker op's body (the list of its arguments in order) checked against ``args``,
        defaults filled in; a ``ProtocolError`` says what is wrong. (Once per call on the
        worker: the common case, every argument sent, checks their types and copies nothing.)"""
        if not isinstance(body, (list, tuple)):
            raise ProtocolError(f"the body of {self.value!r} must be a list, got {type(body).__name__}")
        values: list[Any] | tuple[Any, ...] = body
        n = len(values)
        if n != len(self.args):
            if n > len(self.args):
                raise ProtocolError(f"{self.value!r} takes at most {len(self.args)} arguments "
                                    f"({', '.join(a.name for a in self.args)}), got {n}")
            if n < self._required:
                raise ProtocolError(f"{self.value!r} needs its argument {self.args[n].name!r}")
            values = [*values, *self._defaults[n:]]
        for i, types, name in self._typed:
            if not isinstance(values[i], types):
                raise ProtocolError(f"{self.value!r}: {name} must be {_names(types)}, got {type(values[i]).__name__}",
                                    argument=i)
        return values

    def bind_map(self, body: Any) -> dict[str, Any]:
        """A broker op's body (a map of its arguments by name) checked against ``args``, defaults
        filled in; a ``ProtocolError`` says what is wrong."""
        if not isinstance(body, dict):
            raise ProtocolError(f"the body of {self.value!r} must be a map, got {type(body).__name__}")
        known = {a.name for a in self.args}
        if unknown := [k for k in body if k not in known]:
            raise ProtocolError(f"{self.value!r} takes no argument {unknown[0]!r} (it takes: "
                                f"{', '.join(sorted(known)) or 'none'})")
        out = {}
        for arg in self.args:
            value = body.get(arg.name, arg.default)
            if value is _REQUIRED:
                raise ProtocolError(f"{self.value!r} needs its argument {arg.name!r}")
            if arg.types and not isinstance(value, arg.types):
                raise ProtocolError(f"{self.value!r}: {arg.name} must be {_names(arg.types)}, got {type(value).__name__}")
            out[arg.name] = value
        return out


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in types)


OPS: dict[str, Op] = {op.value: op for op in Op}  # by wire name


def ops_of(side: Side) -> frozenset[str]:
    """The wire names of the ops ``side`` answers."""
    return frozenset(op.value for op in Op if op.side is side)


WORKER_OPS = ops_of(Side.WORKER)
BROKER_OPS = ops_of(Side.BROKER)
STREAM_OPS = ops_of(Side.CONTROL)
