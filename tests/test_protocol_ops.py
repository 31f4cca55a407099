"""One op, one definition: ``dspex.wire.ops.Op`` says each op's wire name, side and arguments;
both sides answer exactly their ops with handlers that take exactly those arguments, bad bodies
get a clear ``protocol_error``, and docs/protocol.md lists the ops as the registry defines them.
"""

from __future__ import annotations

import inspect
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.ops import HANDLERS
from dspex.client.api import ClientAPI
from dspex.client.exchange import BODY_NAMES, encode_request
from dspex.client.sessionapi import Session, SessionAPI
from dspex.errors import BadArgument, ProtocolError
from dspex.wire import codec
from dspex.wire.headers import RequestHeader
from dspex.wire.ops import BROKER_OPS, OPS, STREAM_OPS, WORKER_OPS, Op, Side
from dspex.wire.ref import Ref
from worker.executor import Executor
from worker.ops import SessionOps
from worker.refs import RefTable

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def test_every_op_is_answered_by_its_side_with_a_handler_taking_its_arguments() -> None:
    assert set(HANDLERS) == BROKER_OPS == {op.value for op in Op if op.side is Side.BROKER}
    assert set(SessionOps._handlers) == WORKER_OPS == {op.value for op in Op if op.side is Side.WORKER}
    assert STREAM_OPS == {"credit", "cancel"}
    assert WORKER_OPS | BROKER_OPS | STREAM_OPS == set(OPS) and len(OPS) == len(Op)
    for name, handler in SessionOps._handlers.items():
        params = list(inspect.signature(handler).parameters.values())[2:]  # after self, state
        assert [p.name.rstrip("_") for p in params] == [a.name for a in OPS[name].args], name
        assert all(p.default is inspect.Parameter.empty for p in params), f"{name}: defaults live in the registry"
    assert BODY_NAMES["call"] == ("module", "fn", "args", "kwargs")


@pytest.mark.parametrize("op, body, error", [
    (Op.CALL, {"module": "os"}, "must be a list"),
    (Op.CALL, ["os"], "needs its argument 'fn'"),
    (Op.CALL, ["os", "getpid", [], {}, "extra"], "takes at most 4 arguments"),
    (Op.CALL, ["os", 7], "fn must be str, got int"),
    (Op.EVAL, ["1", ["not", "a", "map"]], "namespace must be dict or None, got list"),
])
def test_a_worker_op_body_is_checked_against_its_definition(op: Op, body: object, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        op.bind_list(body)


def test_a_worker_op_body_gets_its_defaults() -> None:
    assert Op.CALL.bind_list(["os", "getpid"]) == ["os", "getpid", None, None]
    assert Op.EVAL.bind_list(("1 + 1",)) == ["1 + 1", None]


@pytest.mark.parametrize("op, body, error", [
    (Op.RECYCLE, ["p"], "must be a map"),
    (Op.RECYCLE, {"pool": "p", "everything": True}, "takes no argument 'everything'"),
    (Op.RECYCLE, {"pool": "p", "all": "yes"}, "all must be bool, got str"),
    (Op.STATUS, {"verbose": True}, r"takes no argument 'verbose' \(it takes: none\)"),
])
def test_a_broker_op_body_is_checked_against_its_definition(op: Op, body: object, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        op.bind_map(body)


def test_a_broker_op_body_gets_its_defaults() -> None:
    assert Op.RECYCLE.bind_map({"worker": 4242}) == {"pool": "", "worker": 4242, "all": False}


@pytest.fixture
def worker_signals() -> Iterator[None]:
    """An executor run in this process installs the worker's SIGINT and nudge handlers (its call
    limits): give the test process its own back, or a later test's Ctrl-C goes to them."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGURG)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_the_worker_answers_a_wrong_body_with_a_protocol_error_and_runs_nothing(worker_signals: None) -> None:
    ex = Executor(RefTable("p", "w" * 32), capacity=4)
    header = RequestHeader(Op.CALL.value, 1, "p", "s" * 32)
    with pytest.raises(ProtocolError, match="takes at most 4 arguments"):  # (a client would not send it)
        ex.execute(header, codec.encode(["os", "getpid", [], {}, "extra"], policy=codec.Policy.ALL))
    assert codec.decode(ex.execute(header, encode_request(Op.CALL.value, ["builtins", "len", [[1, 2]]], 2**20)[0])) == 2


@pytest.mark.parametrize("op, body, error", [
    (Op.EVAL, [42], "expr is a str, got int"),
    (Op.RECYCLE, {"pool": "p", "al": True}, "takes no argument 'al'"),
])
def test_the_client_checks_a_body_against_its_op_before_sending(op: Op, body: object, error: str) -> None:
    with pytest.raises(BadArgument, match=error):  # a client's body is its user's arguments
        encode_request(op.value, body, 2**20)[0]


# -- the client: the methods the registry names send their op, with a body the op accepts ------
class Recording(ClientAPI[Session]):
    """A client kind that records what its user methods ask to send (nothing is sent)."""

    session_kind = Session

    def _init_transport(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def _is_closed(self) -> bool:
        return False

    def request(self, op: str, pool: str = "", session: str = "", body: Any = None, **_: Any) -> Any:
        self.sent.append((op, body))

    def stream(self, op: str, pool: str, session: str, body: Any, **_: Any) -> Any:
        self.sent.append((op, body))

    def _drive(self, steps: Any) -> Any:
        try:
            value = next(steps)
            while True:
                value = steps.send(value)
        except StopIteration as stop:
            return stop.value


def _ref(s: Session) -> Ref:
    return Ref("r" * 32, s.id, "p", "w" * 32, "builtins.list", "[]")


# every user method of the API that may send a request, with arguments for it (``session`` and the
# transport hooks send nothing themselves)
CALLS: dict[str, Callable[[Recording, Session], Any]] = {
    "ClientAPI.call": lambda c, s: c.call("os", "getpid", pool="p"),
    "ClientAPI.status": lambda c, s: c.status(),
    "ClientAPI.ping": lambda c, s: c.ping(),
    "ClientAPI.sessions": lambda c, s: c.sessions("p"),
    "ClientAPI.close_session": lambda c, s: c.close_session("s" * 32),
    "ClientAPI.recycle": lambda c, s: c.recycle("p", all=True),
    "SessionAPI.run": lambda c, s: s.run(len, [1]),
    "SessionAPI.apply": lambda c, s: s.apply(len, [[1]]),
    "SessionAPI.put": lambda c, s: s.put([1]),
    "SessionAPI.define": lambda c, s: s.define(len),
    "SessionAPI.call": lambda c, s: s.call("os", "getpid"),
    "SessionAPI.method": lambda c, s: s.method(_ref(s), "copy"),
    "SessionAPI.attr": lambda c, s: s.attr(_ref(s), "x"),
    "SessionAPI.set_attr": lambda c, s: s.set_attr(_ref(s), "x", 1),
    "SessionAPI.eval": lambda c, s: s.eval("1 + 1"),
    "SessionAPI.exec": lambda c, s: s.exec("x = 1"),
    "SessionAPI.to_data": lambda c, s: s.to_data(_ref(s)),
    "SessionAPI.release": lambda c, s: s.release(_ref(s)),
    "SessionAPI.stream": lambda c, s: s.stream("builtins", "range", [3]),
    "SessionAPI.stream_method": lambda c, s: s.stream_method(_ref(s), "__iter__"),
    "SessionAPI.stream_eval": lambda c, s: s.stream_eval("range(3)"),
    "SessionAPI.stream_apply": lambda c, s: s.stream_apply(range, [3]),
    "SessionAPI.close": lambda c, s: s.close(),
}
_NOT_OPS = {"ClientAPI.session", "ClientAPI.request", "ClientAPI.stream", "ClientAPI.cancel_all", "ClientAPI.close"}


def test_the_user_api_sends_each_op_from_the_methods_the_registry_names_with_a_body_it_accepts() -> None:
    public = {f"{cls.__name__}.{name}" for cls in (ClientAPI, SessionAPI) for name in vars(cls)
              if not name.startswith("_") and callable(getattr(cls, name))}
    assert public - _NOT_OPS == set(CALLS), "a user method of dspex.client.api or .sessionapi without its row here"
    named = {method: op for op in Op for method in op.client}
    assert set(named) == set(CALLS), "every method that sends an op is named by it, and no other"
    for method, call in CALLS.items():
        client = Recording("ipc:///tmp/dspex-nowhere/frontend.sock")
        call(client, client.session("p"))
        (op, body), = client.sent
        assert op == named[method].value, method
        if named[method].side is Side.BROKER:
            named[method].bind_map(body)
        else:
            named[method].bind_list(body)


def _row(op: Op) -> str:
    if op.side is Side.WORKER:
        args = f"`[{', '.join(a.name for a in op.args)}]`"
    elif op.side is Side.BROKER:
        args = f"`{{{', '.join(a.name for a in op.args)}}}`" if op.args else "`{}`"
    else:
        args = "`n`"
    return f"| `{op.value}` | {args} | {op.doc} | {', '.join(op.client) or 'the client itself'} |"


def test_docs_list_every_op_as_the_registry_defines_it() -> None:
    """docs/protocol.md's op tables are the registry's rows (regenerate them from ``_row``)."""
    text = DOCS.read_text()
    missing = [_row(op) for op in Op if _row(op) not in text]
    assert not missing, "docs/protocol.md lacks (or words differently) these rows:\n" + "\n".join(missing)
    documented = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `") and line.count("|") == 5}
    assert documented >= set(OPS)
