"""The errors of a session's request that cannot be sent, naming what cannot be and what to do:
the global of the user's code (``cannot send LOCK (_thread.lock) from module myapp.tools``) or
the client's DSPy setting. ``dumps`` is a session pickle of one object alone
(``dspex.client.sessionpickle``), tried on each candidate to find the one that fails."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

from dspex.wire.codec import type_name
from dspex.wire.errors import EncodeError

# what to do with an object that cannot be sent (not "s.put it": put copies it too)
_MAKE_IT_THERE = ("(it cannot be copied to the worker: make it there instead, inside the function, or once with "
                  "ref = s.run(make_it) and pass the ref)")


def _unpicklable(items: Iterable[tuple[Any, Any]], dumps: Callable[[Any], object]) -> tuple[Any, Any] | None:
    """The first ``(where, value)`` whose value ``dumps`` fails on."""
    for where, value in items:
        try:
            dumps(value)
        except Exception:  # noqa: BLE001 - whatever pickling raises: this is the one
            return where, value
    return None


def culprit(emitted: list[tuple[tuple[str, str], Any]], dumps: Callable[[Any], object]) -> tuple[tuple[str, str], Any] | None:
    """Which of the globals a failed pickle was sending cannot be pickled (plain values first:
    a function fails when a global it reads does; the last bound first: an object fails when a
    global its class's code reads does, and that global was bound after it)."""
    last_first = emitted[::-1]
    is_code = [isinstance(value, (types.FunctionType, type, types.ModuleType)) for _, value in last_first]
    ordered = [item for item, c in zip(last_first, is_code) if not c] + [item for item, c in zip(last_first, is_code) if c]
    return _unpicklable(ordered, dumps)


def settings_error(settings: dict[str, Any], err: EncodeError, dumps: Callable[[Any], object]) -> EncodeError:
    """The client's DSPy settings could not be sent: which one, and what to do."""
    found = _unpicklable(settings.items(), dumps)
    if found is None:
        return err
    t = type_name(found[1])
    return EncodeError(
        f"cannot send the client's DSPy setting {found[0]!r} ({t}): {err.message} (configure it in the "
        "session instead, e.g. s.run(lambda: dspy.configure(...)), or do not send the client's settings: "
        "dx.session(pool, client_settings=False))", type=t, setting=found[0])


def context_value_error(variables: list[tuple[Any, Any]], err: EncodeError,
                        dumps: Callable[[Any], object]) -> EncodeError:
    """The value a context variable of the user's code holds in the calling context could not be
    sent with the call: which variable, and what to do."""
    found = _unpicklable(variables, dumps)
    if found is None:
        return err
    name, t = found[0].name, type_name(found[1])
    return EncodeError(
        f"cannot send the value of the context variable {name!r} ({t}) with the call: "
        f"{err.message} (give the call what it needs from it as an argument, or set the variable inside "
        "the call)", type=t, context_var=name)


def argument_error(err: EncodeError) -> EncodeError:
    """An argument of a session's call (the object ``put``, ``fn``...) could not be sent: ``err``
    with what to do, unless it says already (a global, a setting, a context variable, a client's
    or session's handle)."""
    if not {"global", "setting", "context_var", "handle"}.isdisjoint(err.details):
        return err
    return EncodeError(f"{err.message} {_MAKE_IT_THERE}", **err.details)


def global_error(nsid: str, name: str, value: Any, exc: BaseException) -> EncodeError:
    t = type_name(value)
    module = nsid[2:] if nsid.startswith("m:") else "a function's globals"
    where = f"module {module}" if nsid.startswith("m:") else module
    return EncodeError(f"cannot send {name} ({t}) from {where}: {type(exc).__name__}: {str(exc)[:300]} {_MAKE_IT_THERE}",
                       type=t, module=module, **{"global": name})
