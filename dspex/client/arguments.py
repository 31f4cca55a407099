"""What a user passes to the client API, checked before anything is sent: a wrong argument is a
:class:`dspex.BadArgument` that says what was meant, never an error from inside dspex, a call cut
short at its first event, or a request the broker drops (its caller would wait out the timeout)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from dspex.wire.errors import BadArgument, ProtocolError
from dspex.wire.headers import name_error
from dspex.wire.ops import Op, Side

MAX_TIMEOUT = 1e9  # seconds (~31 years): the deadline goes in milliseconds in the request header's 64-bit int


def bound_name(obj: Any, name: object) -> str:
    """The session-namespace name ``define(obj, name)`` binds: ``name``, else ``obj.__name__``."""
    if name is None:
        name = getattr(obj, "__name__", None)
        if not isinstance(name, str):
            raise BadArgument(f"define: a {type(obj).__name__} has no __name__; pass name=")
    if not isinstance(name, str) or not name.isidentifier():
        raise BadArgument(f"define: name is a Python identifier (a str), got {name!r:.60}")
    return name


def checked_body(op: Op, body: Any) -> Any:
    """A request's body checked against its op's definition (:class:`dspex.wire.ops.Op`), defaults
    filled in; one that does not fit is a BadArgument. A function where a name or source text
    belongs (``s.stream(fn)``) says what takes a function."""
    try:
        if op.side is Side.BROKER:
            return op.bind_map(body if body is not None else {})
        return op.bind_list(body if body is not None else [])
    except ProtocolError as err:
        message = err.message.replace(" must be ", " is a ", 1)
        wrong = body[err.details["argument"]] if "argument" in err.details else None
        if callable(wrong):
            message += (f" {wrong!r:.60}: a function (or a ref to one) runs with s.run(fn, *args) or "
                        "s.apply(fn, args), and s.stream_apply(fn, args) streams what it returns")
        raise BadArgument(message) from None


def check_session_args(pool: object, session_id: object) -> None:
    """``session()``'s arguments, checked before a session is made."""
    if not pool:
        raise BadArgument(f"session(pool): the name of a pool, got {pool!r}")
    check_name("pool", pool)
    if session_id is not None:
        check_name("session id", session_id)


def check_name(kind: str, name: object) -> None:
    """A pool name or session id as the broker reads it in a request header: a str within the
    broker's rule (``dspex.wire.headers.name_error``)."""
    if not isinstance(name, str):
        raise BadArgument(f"a {kind} is a str, got {type(name).__name__} {name!r:.60}")
    why = name_error(name)
    if why:
        raise BadArgument(f"a {kind} {why} ({name!r:.40}...)")


def checked_timeout(timeout: object) -> float:
    """``timeout`` as a deadline in seconds: a number more than 0 and at most ``MAX_TIMEOUT``; anything
    else (0 or less, NaN, infinity: no deadline the worker could keep) is a BadArgument before anything is sent."""
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise BadArgument(f"timeout is a number of seconds (None: the client's), got {type(timeout).__name__} "
                          f"{timeout!r:.60}")
    seconds = float(timeout)
    if not 0 < seconds <= MAX_TIMEOUT:  # (NaN is neither)
        raise BadArgument(f"timeout must be more than 0 and at most {MAX_TIMEOUT:g} seconds, got {timeout!r}")
    return seconds


def positional(args: Iterable[Any]) -> list[Any]:
    """A call's positional arguments as sent; a str, bytes or mapping is a BadArgument (each
    character, or key, would become an argument: ``args=(x,)`` was meant)."""
    if isinstance(args, (str, bytes, Mapping)) or not isinstance(args, Iterable):
        raise BadArgument(f"args is a list or tuple of the positional arguments, got {type(args).__name__} "
                          f"{args!r:.60} (one argument x: args=(x,); keyword arguments: kwargs=)")
    return list(args)


def keywords(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A call's keyword arguments as sent: any mapping of names, as ``**`` takes it; anything
    else is a BadArgument (a TypeError, as ``fn(**[1])`` is in-process) before anything is sent."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise BadArgument(f"kwargs is a dict of the keyword arguments, got {type(kwargs).__name__} {kwargs!r:.60}")
    names = dict(kwargs)
    for name in names:
        if not isinstance(name, str):
            raise BadArgument(f"kwargs: keyword names are str, got {type(name).__name__} {name!r:.60}")
    return names


def check_options(options: Mapping[str, Any]) -> None:
    """A request's ``on_progress`` and ``on_output``: callables or None (else the call's first
    event would raise inside it); its ``timeout``, if given (:func:`checked_timeout`)."""
    if options.get("timeout") is not None:
        checked_timeout(options["timeout"])
    for option in ("on_progress", "on_output"):
        callback = options.get(option)
        if callback is not None and not callable(callback):
            raise BadArgument(f"{option}= is a function of one event (or None), got {type(callback).__name__} "
                              f"{callback!r:.60}")
