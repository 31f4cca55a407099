"""One op, one definition: ``dspex.protocol.Op`` says each op's wire name, side and arguments;
both sides answer exactly their ops with handlers that take exactly those arguments, bad bodies
get a clear ``protocol_error``, and docs/protocol.md lists the ops as the registry defines them.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from broker.ops import HANDLERS
from dspex import codec
from dspex.core import BODY_NAMES, encode_body
from dspex.errors import ProtocolError
from dspex.protocol import (
    BROKER_OPS,
    OPS,
    STREAM_OPS,
    WORKER_OPS,
    Op,
    RequestHeader,
    Side,
)
from worker.executor import Executor, RefTable

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def test_every_op_is_answered_by_its_side_with_a_handler_taking_its_arguments() -> None:
    assert set(HANDLERS) == BROKER_OPS == {op.value for op in Op if op.side is Side.BROKER}
    assert set(Executor._handlers) == WORKER_OPS == {op.value for op in Op if op.side is Side.WORKER}
    assert STREAM_OPS == {"credit", "cancel"}
    assert WORKER_OPS | BROKER_OPS | STREAM_OPS == set(OPS) and len(OPS) == len(Op)
    for name, handler in Executor._handlers.items():
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


def test_the_worker_answers_a_wrong_body_with_a_protocol_error_and_runs_nothing() -> None:
    ex = Executor(RefTable("p", "w" * 32), capacity=4)
    header = RequestHeader(Op.CALL.value, 1, "p", "s" * 32)
    with pytest.raises(ProtocolError, match="takes at most 4 arguments"):  # (a client would not send it)
        ex.execute(header, codec.encode(["os", "getpid", [], {}, "extra"], policy=codec.Policy.ALL))
    assert codec.decode(ex.execute(header, encode_body(Op.CALL.value, ["builtins", "len", [[1, 2]]], 2**20))) == 2


@pytest.mark.parametrize("op, body, error", [
    (Op.EVAL, [42], "expr must be str, got int"),
    (Op.RECYCLE, {"pool": "p", "al": True}, "takes no argument 'al'"),
])
def test_the_client_checks_a_body_against_its_op_before_sending(op: Op, body: object, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        encode_body(op.value, body, 2**20)


def _row(op: Op) -> str:
    if op.side is Side.WORKER:
        args = f"`[{', '.join(a.name for a in op.args)}]`"
    elif op.side is Side.BROKER:
        args = f"`{{{', '.join(a.name for a in op.args)}}}`" if op.args else "`{}`"
    else:
        args = "`n`"
    return f"| `{op.value}` | {args} | {op.doc} | {op.client} |"


def test_docs_list_every_op_as_the_registry_defines_it() -> None:
    """docs/protocol.md's op tables are the registry's rows (regenerate them from ``_row``)."""
    text = DOCS.read_text()
    missing = [_row(op) for op in Op if _row(op) not in text]
    assert not missing, "docs/protocol.md lacks (or words differently) these rows:\n" + "\n".join(missing)
    documented = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `") and line.count("|") == 5}
    assert documented >= set(OPS)
