"""What each worker op does in a session (``call``, ``method``, ``eval``, ``exec``, ``put``...).

A handler takes the arguments of its op's definition (``dspex.wire.ops.Op``), in order,
already decoded, its refs resolved; the executor (``worker.executor``) runs it inside the call's
session, limits and output capture.
"""

from __future__ import annotations

import importlib
import operator
import sys
from collections.abc import Callable
from typing import Any, ClassVar

from dspex.wire.errors import ProtocolError, UnknownOp
from dspex.wire.ops import OPS, Op
from dspex.wire.ref import Ref
from dspex.wire.remoteerror import RemoteError
from worker import checkpoint, namespace
from worker.refs import RefTable, SessionState, type_name
from worker.remote_errors import guarded
from worker.sink import CALLER_FILE
from worker.streaming import resolve_awaitable


class SessionOps:
    """The worker ops, each run against a session of ``refs``."""

    def __init__(self, refs: RefTable) -> None:
        self.refs = refs

    def run(self, op: str, state: SessionState, body: Any) -> Any:
        handler = self._handlers.get(op)
        if handler is None:
            raise UnknownOp(f"unknown op {op!r}")
        args = OPS[op].bind_list(body)  # its arguments as the op's definition says
        return guarded(checkpoint.naming_unbound, state, lambda: resolve_awaitable(handler(self, state, *args), state.loop))

    def _call(self, state: SessionState, module: str, fn: str, args: list[Any] | None,
              kwargs: dict[str, Any] | None) -> Any:
        return _invoke(_resolve_callable(module, fn), args, kwargs)

    def _method(self, state: SessionState, ref: Any, name: str, args: list[Any] | None,
                kwargs: dict[str, Any] | None) -> Any:
        protocol = _PROTOCOLS.get(name)
        if protocol is not None:
            return protocol(ref, *(args or ()), **(kwargs or {}))
        return _invoke(getattr(ref, name), args, kwargs)

    def _apply(self, state: SessionState, fn: Any, args: list[Any] | None, kwargs: dict[str, Any] | None) -> Any:
        """A callable sent by value (or a ref to one), called in the session."""
        return _invoke(fn, args, kwargs)

    def _bind(self, state: SessionState, name: str, value: Any) -> None:
        """Bind ``value`` as ``name`` in the session's namespace (for eval/exec code)."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ProtocolError(f"bind needs an identifier for the name, got {name!r:.80}")
        namespace.namespace(state)[name] = value

    def _put(self, state: SessionState, value: Any) -> Ref:
        """Keep ``value`` on the worker; its ref is the result."""
        return self.refs.put(state, value)

    def _getattr(self, state: SessionState, ref: Any, name: str) -> Any:
        return getattr(ref, name)

    def _setattr(self, state: SessionState, ref: Any, name: str, value: Any) -> None:
        setattr(ref, name, value)

    def _eval(self, state: SessionState, expr: str, namespace_: dict[str, Any] | None) -> Any:
        scope = namespace.namespace(state)
        if namespace_:
            scope = {**scope, **namespace_}
        # no inherited flags (the module doc of worker.namespace says why); not kept in linecache,
        # where an eval loop would grow it
        return eval(compile(expr, "<dspex eval>", "eval", dont_inherit=True), scope)

    def _exec(self, state: SessionState, source: str, namespace_: dict[str, Any] | None) -> dict[str, Any]:
        """Run ``source`` as the next lines of the session's module; return the names it bound."""
        scope = namespace.namespace(state)
        before = dict(scope)
        scope.update(namespace_ or {})
        namespace.exec_in_session(state, source, scope)
        return {k: v for k, v in scope.items()
                if not k.startswith("__") and before.get(k, _MISSING) is not v}

    def _release(self, state: SessionState, ref_ids: list[str]) -> int:
        return sum(self.refs.release(state, str(ref_id)) for ref_id in ref_ids)

    def _to_data(self, state: SessionState, ref: Any) -> Any:
        """Plain data of a dspy.Example/Prediction (or anything with toDict / a dict view)."""
        for attr in ("toDict", "to_dict"):
            fn = getattr(ref, attr, None)
            if callable(fn):
                return fn()
        if isinstance(ref, dict):
            return dict(ref)
        raise RemoteError(f"{type_name(ref)} has no plain-data form", type="TypeError", module="builtins",
                          traceback="")

    _handlers: ClassVar[dict[str, Callable[..., Any]]] = {
        Op.CALL.value: _call,
        Op.METHOD.value: _method,
        Op.GETATTR.value: _getattr,
        Op.SETATTR.value: _setattr,
        Op.EVAL.value: _eval,
        Op.EXEC.value: _exec,
        Op.RELEASE.value: _release,
        Op.TO_DATA.value: _to_data,
        Op.APPLY.value: _apply,
        Op.BIND.value: _bind,
        Op.PUT.value: _put,
    }



_MISSING = object()


def _resolve_callable(module: str, name: str) -> Any:
    obj: Any = sys.modules.get(module)
    # importlib.import_module takes the module's import lock even when it is loaded, on every
    # call; a module still initializing (imported by another thread right now) goes through it
    if obj is None or getattr(getattr(obj, "__spec__", None), "_initializing", False):
        obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


# a handle's ref(...), ref[k], ref[k] = v run as Python runs them: the class's method, and the
# TypeError of an object without it (getattr would raise AttributeError, asking its __getattr__ first)
_PROTOCOLS: dict[str, Callable[..., Any]] = {
    "__call__": operator.call, "__getitem__": operator.getitem, "__setitem__": operator.setitem}


def _invoke(fn: Any, args: list[Any] | None, kwargs: dict[str, Any] | None) -> Any:
    if not callable(fn):
        raise RemoteError(f"{type_name(fn)} object is not callable", type="TypeError", module="builtins",
                          traceback="")
    return _as_the_caller(fn, args or (), kwargs or {})


# calls what the client asked for from a frame of ``__main__``'s, as the script's line is in-process:
# a library's warning at its caller's place (DSPy's DeprecationWarnings) passes the filter that
# shows only __main__'s, and the client shows it at its ``s.run`` line under its own filters
_CALLER: dict[str, Any] = {"__name__": "__main__"}
exec(compile("def call(fn, args, kwargs):\n    return fn(*args, **kwargs)\n", CALLER_FILE, "exec"), _CALLER)  # noqa: S102
_as_the_caller: Callable[[Any, Any, dict[str, Any]], Any] = _CALLER["call"]
