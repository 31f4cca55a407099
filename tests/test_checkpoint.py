"""The checkpoint format of durable sessions (worker/checkpoint.py), in-process: build a session's
checkpoint the way a worker does after a call, apply it the way the broker stores it, restore it
into a fresh session the way a new worker does, and compare with what the session held.

The DSPy programs are answered by ``dspy.utils.DummyLM`` with a list of answers: it hands them out
in order, so the answer a restored program gets proves which LM it talks to and where that LM was.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import pickle
import threading
from typing import Any

import pytest

dspy = pytest.importorskip("dspy")
from dspy.utils import DummyLM

from dspex.errors import CheckpointRefused
from dspex.wire.byvalue import register_sources
from worker import checkpoint, checkpoint_history, checkpoint_pickler, checkpoint_restore, namespace
from worker.checkpoint_pickler import load_seeded
from worker.refs import RefTable, SessionState

SID = "5e551011" * 4


class Held:
    """What the broker keeps of one session, applied as docs/protocol.md says (full: drop every
    slot first; then set, then clear)."""

    def __init__(self) -> None:
        self.skeleton = b""
        self.blobs: dict[int, bytes] = {}
        self.seq = 0

    def apply(self, ck: checkpoint.Checkpoint) -> None:
        if ck.full:
            self.blobs.clear()
        self.blobs.update(zip(ck.set_slots, ck.blobs))
        for i in ck.clear_slots:
            self.blobs.pop(i, None)
        self.skeleton, self.seq = ck.skeleton, ck.seq
        assert ck.size == len(ck.skeleton) + sum(map(len, self.blobs.values()))

    def restore(self, session: str = SID) -> tuple[SessionState, checkpoint_restore.Restored]:
        state = RefTable("p", "w2").session(session)
        slots = sorted(self.blobs)
        restored = checkpoint_restore.restore(state, self.skeleton, slots, [self.blobs[i] for i in slots],
                                              self.seq)
        return state, restored


def answers(n: int) -> list[dict[str, str]]:
    return [{"reasoning": f"step {i}", "answer": f"answer {i}"} for i in range(n)]


def typical_session() -> tuple[RefTable, SessionState, dict[str, Any]]:
    """A ChainOfThought with 4 demos and a DummyLM configured in the session, called 3 times."""
    table = RefTable("p", "w1")
    state = table.session(SID)
    lm = DummyLM(answers(10))
    cot = dspy.ChainOfThought("question -> answer")
    cot.predict.demos = [dspy.Example(question=f"q{i}", reasoning=f"r{i}", answer=f"a{i}").with_inputs("question")
                         for i in range(4)]
    refs = {"lm": table.put(state, lm), "cot": table.put(state, cot)}
    state.dspy_settings.update(lm=lm, adapter=dspy.ChatAdapter(), trace=[])
    for i in range(3):
        call(state, cot, f"question {i}")
    return table, state, refs


def call(state: SessionState, program: Any, question: str) -> Any:
    """A call as the worker runs it: in the session's settings, its LM history the session's."""
    lm = state.dspy_settings["lm"]
    before = len(lm.history)
    with dspy.context(**state.dspy_settings):
        out = program(question=question)
    state.lm_history.extend(lm.history[before:])
    return out


def test_a_typical_session_comes_back_whole() -> None:
    _, state, refs = typical_session()
    tracker = checkpoint.Tracker(SID)
    held = Held()
    ck, lost = tracker.build(state)
    assert ck is not None and ck.full and not lost
    held.apply(ck)

    new, restored = held.restore()
    assert restored.lost == []
    lm, cot = new.refs[refs["lm"].id], new.refs[refs["cot"].id]  # the same ref ids
    old_cot = state.refs[refs["cot"].id]
    # module state: demos, signature, instructions
    assert [d.toDict() for d in cot.predict.demos] == [d.toDict() for d in old_cot.predict.demos]
    assert list(cot.predict.demos[0].inputs().keys()) == ["question"]
    sig, old_sig = cot.predict.signature, old_cot.predict.signature
    assert sig.equals(old_sig) and sig.signature == old_sig.signature and sig.instructions == old_sig.instructions
    assert list(sig.input_fields) == ["question"] and list(sig.output_fields) == ["reasoning", "answer"]
    # one LM object everywhere the session held it, with its history and where it was in its answers
    assert new.dspy_settings["lm"] is lm and "trace" not in new.dspy_settings
    assert isinstance(new.dspy_settings["adapter"], dspy.ChatAdapter)
    assert len(lm.history) == 3 and lm.history[-1] is new.lm_history[-1]
    assert new.ref_of_object[id(cot)] == refs["cot"].id
    assert call(new, cot, "question 3").answer == "answer 3"  # the 4th answer: the same LM, moved on
    assert call(state, old_cot, "question 3").answer == "answer 3"


def test_an_unchanged_session_sends_nothing_and_a_call_sends_its_new_history_entry() -> None:
    _, state, refs = typical_session()
    tracker = checkpoint.Tracker(SID)
    first, _ = tracker.build(state)
    assert first is not None and len(first.set_slots) >= 3  # 3 history entries, a signature, code
    assert tracker.build(state) == (None, [])
    call(state, state.refs[refs["cot"].id], "again")
    ck, _ = tracker.build(state)
    assert ck is not None and not ck.full and ck.seq == first.seq + 1
    assert len(ck.set_slots) == 1 and ck.clear_slots == []  # the new history entry only
    assert len(ck.skeleton) < len(first.skeleton) + 200


@dataclasses.dataclass(frozen=True, slots=True)
class _Part:
    kind: str
    text: str


@dataclasses.dataclass(slots=True)
class _Reply:
    parts: list[_Part]
    tokens: int = 0
    note: dataclasses.InitVar[str] = ""

    def __post_init__(self, note: str) -> None:
        pass


@dataclasses.dataclass(slots=True)
class _OwnState:
    value: int

    def __getstate__(self) -> dict[str, int]:
        return {"value": self.value * 2}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.value = state["value"] // 2


@dataclasses.dataclass(slots=True)
class _OneField:
    only: complex  # copyreg's reducer for complex inside


def test_a_history_entry_is_pickled_as_pickle_itself_would() -> None:
    """History entries go through the checkpoint's data pickler (a faster path for slotted
    dataclasses, DSPy's LM responses): the bytes are pickle's own, for DSPy's entries and for
    dataclasses with InitVars, their own __getstate__, one field, copyreg reducers."""
    _, state, _ = typical_session()
    entries = [*state.lm_history, {"response": _Reply([_Part("text", "a"), _Part("image", "b")], 3),
                                   "own": _OwnState(21), "one": _OneField(1 + 2j), "cls": _Part, "n": None}]
    for entry in entries:
        blob = checkpoint_history.dumps_data_blob(entry)
        assert blob == pickle.dumps(entry, checkpoint_pickler.PROTOCOL)
        assert pickle.loads(blob) == entry


def test_deltas_applied_in_order_restore_the_latest_state_and_history_drops_its_old_entries() -> None:
    _, state, refs = typical_session()
    tracker, held = checkpoint.Tracker(SID), Held()
    cot = state.refs[refs["cot"].id]
    for i in range(6):
        call(state, cot, f"q{i}")
        del state.lm_history[:-4]  # the worker's --lm-history bound
        ck, _ = tracker.build(state)
        assert ck is not None
        held.apply(ck)
        if i:  # one entry in, one out: the new one takes the old one's slot
            assert len(ck.set_slots) == 1 and ck.clear_slots == []
    new, _ = held.restore()
    assert [e["uuid"] for e in new.lm_history] == [e["uuid"] for e in state.lm_history]
    assert call(new, new.refs[refs["cot"].id], "x").answer == "answer 9"


def test_the_next_build_after_a_restore_sends_only_what_changed() -> None:
    _, state, refs = typical_session()
    held = Held()
    ck, _ = checkpoint.Tracker(SID).build(state)
    assert ck is not None
    held.apply(ck)
    new, restored = held.restore()
    tracker = restored.tracker
    assert tracker.build(new)[0] is None or tracker.build(new)[0] is None  # at most a re-pickled skeleton
    call(new, new.refs[refs["cot"].id], "after the move")
    ck2, _ = tracker.build(new)
    assert ck2 is not None and not ck2.full and len(ck2.set_slots) == 1 and ck2.seq > held.seq
    held.apply(ck2)
    again, _ = held.restore()
    assert len(again.lm_history) == 4


def test_full_resend_after_a_broker_restart_holds_everything() -> None:
    _, state, refs = typical_session()
    tracker = checkpoint.Tracker(SID)
    ck, _ = tracker.build(state)
    assert ck is not None
    fresh = Held()  # the broker kept nothing of it
    ck2, _ = tracker.build(state, full=True)
    assert ck2 is not None and ck2.full and sorted(ck2.set_slots) == sorted(ck.set_slots)
    fresh.apply(ck2)
    new, _ = fresh.restore()
    assert call(new, new.refs[refs["cot"].id], "x").answer == "answer 3"


def test_full_resend_after_a_move_then_a_broker_restart_claims_the_size_it_carries() -> None:
    """The restored session's objects pickle again to other bytes than the checkpoint it came from
    (the broker refused such a checkpoint as "says it holds N bytes, less than it carries")."""
    _, state, refs = typical_session()
    moved = Held()
    ck, _ = checkpoint.Tracker(SID).build(state)
    assert ck is not None
    moved.apply(ck)
    new, restored = moved.restore()
    fresh = Held()  # then the broker restarted: it asks for the whole session
    ck2, _ = restored.tracker.build(new, full=True)
    assert ck2 is not None and ck2.full
    fresh.apply(ck2)  # asserts the size it claims is the bytes it carries
    again, _ = fresh.restore()
    assert call(again, again.refs[refs["cot"].id], "x").answer == "answer 3"


def test_session_namespace_functions_keep_the_module_as_globals_and_classes_their_source() -> None:
    table = RefTable("p", "w1")
    state = table.session(SID)
    source = (
        "counter = 0\n"
        "def bump(n=1):\n"
        "    global counter\n"
        "    counter += n\n"
        "    return counter\n"
        "class Box:\n"
        "    def __init__(self, v):\n"
        "        self.v = v\n"
        "    def twice(self):\n"
        "        return 2 * self.v\n"
        "box = Box(21)\n"
    )
    namespace.exec_in_session(state, source)
    namespace.namespace(state)["bump"]()
    ref = table.put(state, namespace.namespace(state)["box"])
    held = Held()
    ck, _ = checkpoint.Tracker(SID).build(state)
    assert ck is not None
    held.apply(ck)
    module_name = state.module.__name__ if state.module else ""
    namespace.drop_session_module(state)  # the old worker is gone

    new, _ = held.restore()
    ns = namespace.namespace(new)
    assert new.module is not None and new.module.__name__ == module_name
    assert ns["bump"].__globals__ is ns and ns["bump"](2) == 3 and ns["counter"] == 3
    box = new.refs[ref.id]
    assert box is ns["box"] and type(box) is ns["Box"] and box.twice() == 42
    assert "return 2 * self.v" in inspect.getsource(ns["Box"])
    namespace.drop_session_module(new)


def test_what_cannot_be_pickled_is_named_left_out_and_the_rest_restores() -> None:
    table = RefTable("p", "w1")
    state = table.session(SID)
    kept = table.put(state, {"plain": [1, 2, 3]})
    lock_ref = table.put(state, threading.Lock())
    gen_ref = table.put(state, (i for i in range(3)))
    namespace.namespace(state)["guard"] = threading.RLock()
    namespace.namespace(state)["fine"] = "still here"
    tracker = checkpoint.Tracker(SID)
    ck, lost = tracker.build(state)
    assert ck is not None
    by_what = {why.what: why for why in lost}
    assert by_what[f"ref {lock_ref.id[:8]}"].type_name == "_thread.lock"
    assert "cannot pickle" in by_what[f"ref {lock_ref.id[:8]}"].reason
    assert by_what[f"ref {gen_ref.id[:8]}"].type_name == "generator"
    assert "name 'guard'" in by_what and "RefNotFound" in by_what[f"ref {lock_ref.id[:8]}"].message()
    assert tracker.build(state) == (None, [])  # reported once; the next build does not retry them
    held = Held()
    held.apply(ck)
    namespace.drop_session_module(state)
    new, restored = held.restore()
    assert new.refs[kept.id] == {"plain": [1, 2, 3]}
    assert lock_ref.id not in new.refs and gen_ref.id not in new.refs
    assert {why.key for why in restored.lost} == {lock_ref.id, gen_ref.id, "guard"}
    assert namespace.namespace(new)["fine"] == "still here" and "guard" not in namespace.namespace(new)
    namespace.drop_session_module(new)


def test_an_object_holding_something_unpicklable_is_left_out_whole() -> None:
    table = RefTable("p", "w1")
    state = table.session(SID)
    program = dspy.Predict("question -> answer")
    program.log = open(__file__)  # noqa: SIM115 - the point: an open file inside a module
    try:
        ref = table.put(state, program)
        other = table.put(state, dspy.Predict("a -> b"))
        ck, lost = checkpoint.Tracker(SID).build(state)
        assert ck is not None and [w.key for w in lost] == [ref.id]
        assert lost[0].type_name == "dspy.predict.predict.Predict" and "cannot checkpoint an open file" in lost[0].reason
        held = Held()
        held.apply(ck)
        new, _ = held.restore()
        assert ref.id not in new.refs and list(new.refs) == [other.id]
    finally:
        program.log.close()


def test_a_signature_changed_in_place_is_sent_again() -> None:
    table = RefTable("p", "w1")
    state = table.session(SID)
    program = dspy.Predict("question -> answer")
    table.put(state, program)
    tracker, held = checkpoint.Tracker(SID), Held()
    ck, _ = tracker.build(state)
    assert ck is not None
    held.apply(ck)
    program.signature.instructions = "Answer in one word."  # DSPy allows it, though with_instructions is usual
    ck2, _ = tracker.build(state)
    assert ck2 is not None and len(ck2.set_slots) == 1  # a new blob in the signature's slot
    held.apply(ck2)
    new, _ = held.restore()
    assert next(iter(new.refs.values())).signature.instructions == "Answer in one word."


def test_two_sessions_with_the_same_class_restore_two_classes() -> None:
    """A by-value class keeps its cloudpickle tracker id (it goes back to the client as the
    client's class), but each restored session gets a class of its own."""
    import cloudpickle

    from dspex.wire import byvalue

    namespace_: dict[str, Any] = {}
    source = "class Counter:\n    total = 0\n    def add(self):\n        type(self).total += 1\n        return type(self).total\n"
    exec(source, namespace_)  # noqa: S102 - a class made at runtime, as one that arrived by value
    cls = cloudpickle.loads(cloudpickle.dumps(namespace_["Counter"]))  # as it arrives by value
    restored = []
    for sid in ("a" * 32, "b" * 32):
        table = RefTable("p", "w1")
        state = table.session(sid)
        table.put(state, cls())
        held = Held()
        ck, _ = checkpoint.Tracker(sid).build(state)
        assert ck is not None
        held.apply(ck)
        new, _ = held.restore(sid)
        restored.append(next(iter(new.refs.values())))
    one, two = restored
    assert type(one) is not type(two) and one.add() == 1 and one.add() == 2 and two.add() == 1
    assert byvalue.dumps(one)[0]  # still picklable back to a client


@pytest.mark.parametrize("damage", ["skeleton", "blob", "missing", "extra", "garbage", "truncated"])
def test_a_damaged_checkpoint_is_refused_with_a_clear_error(damage: str) -> None:
    _, state, _refs = typical_session()
    held = Held()
    ck, _ = checkpoint.Tracker(SID).build(state)
    assert ck is not None
    held.apply(ck)
    first = min(held.blobs)
    if damage == "skeleton":
        held.skeleton = held.skeleton[:-5] + bytes([held.skeleton[-5] ^ 1]) + held.skeleton[-4:]
    elif damage == "blob":
        held.blobs[first] = held.blobs[first][:-3] + b"\x00\x00\x00"
    elif damage == "missing":
        del held.blobs[first]
    elif damage == "extra":
        held.blobs[999] = b"\x80\x05N."
    elif damage == "garbage":
        held.skeleton = b"not a checkpoint at all"
    else:
        held.skeleton = held.skeleton[:6]
    with pytest.raises(CheckpointRefused) as info:
        held.restore()
    assert info.value.code == "checkpoint_refused" and info.value.details["session"] == SID
    assert "could not be restored" in str(info.value) and "the session is lost" in str(info.value)


def test_a_checkpoint_of_other_versions_or_another_session_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _, state, _refs = typical_session()
    held = Held()
    ck, _ = checkpoint.Tracker(SID).build(state)
    assert ck is not None
    held.apply(ck)
    with pytest.raises(CheckpointRefused, match="belongs to another session"):
        held.restore("0" * 32)
    real = checkpoint.versions()
    monkeypatch.setattr(checkpoint_restore, "versions", lambda: {**real, "dspy": "9.9.9"})
    with pytest.raises(CheckpointRefused, match=r"written with dspy .*; this worker runs 9\.9\.9"):
        held.restore()
    monkeypatch.setattr(checkpoint_restore, "FORMAT_VERSION", 2)
    with pytest.raises(CheckpointRefused, match="format version 1; this worker reads version 2"):
        held.restore()


def test_an_object_that_fails_to_load_refuses_the_checkpoint() -> None:
    table = RefTable("p", "w1")
    state = table.session(SID)
    namespace_: dict[str, Any] = {}
    source = ("class Fragile:\n    def __init__(self):\n        self.x = 1\n"
              "    def __setstate__(self, state):\n        raise RuntimeError('not here')\n")
    exec(source, namespace_)  # noqa: S102 - a class made at runtime, as one that arrived by value
    table.put(state, namespace_["Fragile"]())
    held = Held()
    ck, _ = checkpoint.Tracker(SID).build(state)
    assert ck is not None
    held.apply(ck)
    with pytest.raises(CheckpointRefused, match=r"could not be loaded \(RuntimeError: not here\)"):
        held.restore()


def test_seeded_memo_loads_shared_objects_as_the_given_ones() -> None:
    import pickle

    a, b = {"x": 1}, ["y"]
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, 5)
    pickler.memo = {id(a): (0, a), id(b): (1, b)}
    new = ["n"]
    pickler.dump([a, b, a, {"z": b}, new, new])
    a2, b2 = {"x": 2}, ["w"]
    out = load_seeded([a2, b2], buf.getvalue())
    assert out[0] is a2 and out[2] is a2 and out[1] is b2 and out[3]["z"] is b2 and out[4] is out[5]


def test_the_session_code_store_comes_back_with_its_keys_module_state_and_sources() -> None:
    """By-value code (dspex.wire.codestore): objects under the client's keys, one module object per
    user module whose globals keep their state, the client's bindings, source files."""
    from dspex.wire import classes

    table = RefTable("p", "w1")
    state = table.session(SID)
    store = state.code
    helpers = store.module("m:helpers", {"__name__": "helpers", "__file__": "/client/helpers.py"})
    source = "calls = []\ndef record(x):\n    calls.append(x)\n    return len(calls)\n"
    store.sources.update(register_sources({"/client/helpers.py": source}))
    exec(compile(source, "/client/helpers.py", "exec"), helpers.__dict__)  # noqa: S102 - as codestore rebuilds it
    store.objects["f:1"] = helpers.__dict__["record"]
    store.bound[("m:helpers", "calls")] = "v:2"
    exec("class Ticket:\n    pass\n", helpers.__dict__)  # noqa: S102 - a user class of that module
    store.objects["k:3"] = helpers.__dict__["Ticket"]
    classes.register_class_file(store.objects["k:3"], "/client/helpers.py")
    assert store.objects["f:1"]("a") == 1
    held = Held()
    ck, lost = checkpoint.Tracker(SID).build(state)
    assert ck is not None and not lost
    held.apply(ck)

    new, _ = held.restore()
    code = new.code
    record = code.objects["f:1"]
    module = code.modules["m:helpers"]
    assert record.__globals__ is module.__dict__ and module.__name__ == "helpers"
    assert record("b") == 2 and module.__dict__["calls"] == ["a", "b"]
    assert code.bound[("m:helpers", "calls")] == "v:2"
    assert code.sources["/client/helpers.py"][2][1] == "def record(x):\n"
    assert classes.class_file(code.objects["k:3"]) == "/client/helpers.py"
    assert "calls.append(x)" in inspect.getsource(record)


def test_the_restored_code_store_is_as_strict_about_bindings_as_the_one_checkpointed() -> None:
    """What each client of the session (a key prefix) has bound where, at which of its binding
    versions, comes back: a request of that client older than the one that bound a global (two
    threads' requests, the older queued at the broker when the worker died) never binds its
    value over the newer, and a request relying on a change the store never loaded is refused,
    in that client's count, not another's."""
    from dspex.wire import codestore
    from dspex.wire.errors import CodeCacheMiss

    state = RefTable("p", "w1").session(SID)

    def load(store: codestore.CodeStore, client: str, version: int, value: int) -> None:
        with codestore.loading(store, client=client, at=version):
            key = codestore._load_binding_key("m:a", "X", f"{client}.{value}")
            codestore._load_bindings([("m:a", "X", key, value)])
        store.reached(client, version - 1, version)

    for version in range(1, 7):
        load(state.code, "a", version, version)
    state.code.reached("b", 0, 2)
    held = Held()
    ck, lost = checkpoint.Tracker(SID).build(state)
    assert ck is not None and not lost
    held.apply(ck)

    code = held.restore()[0].code
    assert code.versions == {"a": 6, "b": 2}
    load(code, "a", 5, 5)  # committed before the request of 6, loaded after the move
    assert code.modules["m:a"].X == 6 and code.bound[("m:a", "X")] == "a.6"
    with codestore.loading(code, client="b"), pytest.raises(CodeCacheMiss):
        codestore.check_held(3)
    with codestore.loading(code, client="a"):
        codestore.check_held(6)


def test_a_history_entry_holding_a_session_class_stays_one_object_with_it() -> None:
    """History entries are pickled on their own (once); one that refers to a class of the
    session's namespace is written inline, so it loads after that class, as the same class."""
    table = RefTable("p", "w1")
    state = table.session(SID)
    namespace.exec_in_session(state, "class Note:\n    pass\n")
    note = namespace.namespace(state)["Note"]()
    state.lm_history.append({"prompt": "p", "outputs": ["o"], "extra": note})
    state.lm_history.append({"prompt": "q", "outputs": ["plain"]})
    held = Held()
    ck, _ = checkpoint.Tracker(SID).build(state)
    assert ck is not None and len(ck.set_slots) == 1  # the plain entry is a blob; the other is inline
    held.apply(ck)
    namespace.drop_session_module(state)
    new, _ = held.restore()
    assert type(new.lm_history[0]["extra"]) is namespace.namespace(new)["Note"]
    assert new.lm_history[1]["outputs"] == ["plain"]
    namespace.drop_session_module(new)


def test_an_object_restoring_itself_with_its_modules_globals_finds_them() -> None:
    """A class of the session's own code whose __setstate__ reads its module's globals (the usual
    way to keep a lock out of a pickle) is loaded after those globals are back."""
    table = RefTable("p", "w1")
    state = table.session(SID)
    source = (
        "import threading\n"
        "class Ledger:\n"
        "    def __init__(self):\n"
        "        self.lock, self.count = threading.Lock(), 0\n"
        "    def __getstate__(self):\n"
        "        return {'count': self.count}\n"
        "    def __setstate__(self, state):\n"
        "        self.__dict__.update(state)\n"
        "        self.lock = threading.Lock()\n"
        "ledger = Ledger()\n"
        "ledger.count = 3\n"
    )
    namespace.exec_in_session(state, source)
    ref = table.put(state, namespace.namespace(state)["ledger"])
    held = Held()
    ck, lost = checkpoint.Tracker(SID).build(state)
    assert ck is not None and lost == []
    held.apply(ck)
    namespace.drop_session_module(state)
    new, _ = held.restore()
    ledger = new.refs[ref.id]
    assert ledger is namespace.namespace(new)["ledger"] and ledger.count == 3
    with ledger.lock:
        pass
    namespace.drop_session_module(new)


class _Box:
    def __init__(self) -> None:
        self.inner = {"deep": [1, 2, {"x": "y"}]}


_SESSION_CODE = (
    "class Bag:\n"
    "    limit = 3\n"
    "    def __init__(self):\n"
    "        self.items = []\n"
    "def scale(x, by=2):\n"
    "    return x * by\n"
    "def make_counter():\n"
    "    seen = [0]\n"
    "    def count():\n"
    "        return seen[0]\n"
    "    return count\n"
    "bag = Bag()\n"
    "count = make_counter()\n"
)


class _Note(dspy.utils.callback.BaseCallback):
    pass


_CHANGES = [
    "demo field", "demo added", "instructions", "field description", "lm kwargs", "lm history cleared",
    "module attribute", "module callback", "nested object", "adapter flag", "setting", "namespace global",
    "session class instance", "session class attribute", "session function default", "session function code",
    "closure cell", "by-value module global", "by-value module global rebound", "ref released"]


@pytest.mark.parametrize("change", _CHANGES)
def test_a_change_anywhere_in_what_the_session_holds_is_caught_by_the_next_build(change: str) -> None:
    """Whatever a call changes, however deep, makes a checkpoint, and the restore has it: inside
    demos and signatures, the LM, module attributes and callbacks, nested containers, objects
    and classes of the session's own code (by value), closures, the globals of by-value modules.
    (Not an LM history entry changed in place after it was recorded: each is pickled once, when
    it appears; docs/reliability.md says so.)"""
    table, state, refs = typical_session()
    box = _Box()
    refs["box"] = table.put(state, box)
    ns = namespace.namespace(state)
    ns["counter"] = [0]
    namespace.exec_in_session(state, _SESSION_CODE, ns)
    helpers = state.code.module("m:helpers", {"__name__": "helpers", "__file__": "/client/helpers.py"})
    exec(compile("calls = []\nlimit = 1\n", "/client/helpers.py", "exec"), helpers.__dict__)  # noqa: S102
    tracker, held = checkpoint.Tracker(SID), Held()
    for _ in range(2):  # the second build: nothing changed, nothing sent
        ck, _ = tracker.build(state)
        if ck is not None:
            held.apply(ck)
    assert ck is None
    lm, cot = state.dspy_settings["lm"], state.refs[refs["cot"].id]
    mutate: dict[str, Any] = {
        "demo field": lambda: cot.predict.demos[2]._store.__setitem__("answer", "changed"),
        "demo added": lambda: cot.predict.demos.append(dspy.Example(question="q9", answer="a9")),
        "instructions": lambda: setattr(cot.predict, "signature", cot.predict.signature.with_instructions("new")),
        "field description": lambda: cot.predict.signature.output_fields["answer"].json_schema_extra.__setitem__(
            "desc", "the city"),
        "lm kwargs": lambda: lm.kwargs.__setitem__("temperature", 0.5),
        "lm history cleared": lambda: lm.history.clear(),
        "module attribute": lambda: setattr(cot, "mine", 7),
        "module callback": lambda: cot.callbacks.append(_Note()),
        "nested object": lambda: box.inner["deep"][2].__setitem__("x", "z"),
        "adapter flag": lambda: setattr(state.dspy_settings["adapter"], "use_native_function_calling", True),
        "setting": lambda: state.dspy_settings.__setitem__("max_errors", 3),
        "namespace global": lambda: ns["counter"].append(1),
        "session class instance": lambda: ns["bag"].items.append("x"),
        "session class attribute": lambda: setattr(ns["Bag"], "limit", 5),
        "session function default": lambda: setattr(ns["scale"], "__defaults__", (10,)),
        "session function code": lambda: setattr(ns["scale"], "__code__", (lambda x, by=2: x + by).__code__),
        "closure cell": lambda: ns["count"].__closure__[0].cell_contents.__setitem__(0, 4),
        "by-value module global": lambda: helpers.__dict__["calls"].append(1),
        "by-value module global rebound": lambda: helpers.__dict__.__setitem__("limit", 9),
        "ref released": lambda: state.refs.pop(refs["box"].id),
    }
    mutate[change]()
    ck, _ = tracker.build(state)
    assert ck is not None, f"a changed {change} made no checkpoint"
    held.apply(ck)
    namespace.drop_session_module(state)
    new, _ = held.restore()
    ncot, nlm, nns = new.refs[refs["cot"].id], new.dspy_settings["lm"], namespace.namespace(new)
    nhelpers = new.code.modules["m:helpers"].__dict__
    seen = {
        "demo field": lambda: ncot.predict.demos[2].answer == "changed",
        "demo added": lambda: len(ncot.predict.demos) == 5 and ncot.predict.demos[4].answer == "a9",
        "instructions": lambda: ncot.predict.signature.instructions == "new",
        "field description": lambda: ncot.predict.signature.output_fields["answer"].json_schema_extra["desc"]
        == "the city",
        "lm kwargs": lambda: nlm.kwargs["temperature"] == 0.5,
        "lm history cleared": lambda: nlm.history == [] and len(new.lm_history) == 3,
        "module attribute": lambda: ncot.mine == 7,
        "module callback": lambda: [type(c) for c in ncot.callbacks] == [_Note],
        "nested object": lambda: new.refs[refs["box"].id].inner["deep"][2] == {"x": "z"},
        "adapter flag": lambda: new.dspy_settings["adapter"].use_native_function_calling is True,
        "setting": lambda: new.dspy_settings["max_errors"] == 3,
        "namespace global": lambda: nns["counter"] == [0, 1],
        "session class instance": lambda: nns["bag"].items == ["x"] and type(nns["bag"]) is nns["Bag"],
        "session class attribute": lambda: nns["Bag"].limit == 5 and nns["bag"].limit == 5,
        "session function default": lambda: nns["scale"](1) == 10,
        "session function code": lambda: nns["scale"](1) == 3,
        "closure cell": lambda: nns["count"]() == 4,
        "by-value module global": lambda: nhelpers["calls"] == [1],
        "by-value module global rebound": lambda: nhelpers["limit"] == 9,
        "ref released": lambda: refs["box"].id not in new.refs,
    }
    try:
        assert seen[change](), change
    finally:
        namespace.drop_session_module(new)


def test_histories_of_the_lm_and_modules_restore_as_lists_of_their_own_with_the_sessions_entries() -> None:
    """An LM's or a module's history holding the session's entries is written as one reference to
    the session's list; it loads as a separate list of the same (restored) entry objects."""
    _, state, refs = typical_session()
    cot = state.refs[refs["cot"].id]
    cot.history.insert(0, {"not": "a session entry"})  # this one is not the session's: written in full
    held = Held()
    ck, _ = checkpoint.Tracker(SID).build(state)
    assert ck is not None
    held.apply(ck)
    new, _ = held.restore()
    nlm, ncot = new.dspy_settings["lm"], new.refs[refs["cot"].id]
    assert len(nlm.history) == 3 and all(a is b for a, b in zip(nlm.history, new.lm_history))
    assert nlm.history is not new.lm_history and ncot.predict.history is not nlm.history
    assert ncot.history[0] == {"not": "a session entry"} and ncot.history[1:] == new.lm_history
    assert all(a is b for a, b in zip(ncot.history[1:], new.lm_history))
    nlm.history.append("x")
    assert len(new.lm_history) == 3 and len(ncot.predict.history) == 3


def test_a_session_dir_comes_back_with_its_files_as_of_the_last_build() -> None:
    """A ``dspex.SessionDir`` the session holds (GEPA's log_dir): a change to its files makes a
    checkpoint, none sends nothing, and a restore makes the directory again elsewhere with them."""
    import os

    from dspex import SessionDir

    table = RefTable("p", "w1")
    state = table.session(SID)
    logs = SessionDir("gepa")
    ref = table.put(state, logs)
    with open(os.path.join(logs.path, "gepa_state.bin"), "wb") as f:
        f.write(b"\x00state 1")
    os.makedirs(os.path.join(logs.path, "generated_best_outputs_valset", "task_0"))
    tracker, held = checkpoint.Tracker(SID), Held()
    ck, lost = tracker.build(state)
    assert ck is not None and not lost
    held.apply(ck)
    assert tracker.build(state) == (None, [])
    with open(os.path.join(logs.path, "candidates.json"), "wb") as f:
        f.write(b"[" + b"0," * 50_000 + b"0]")  # 100 KB
    ck, _ = tracker.build(state)
    assert ck is not None and len(ck.set_slots) == 1 and len(ck.blobs[0]) > 100_000
    held.apply(ck)
    with open(os.path.join(logs.path, "gepa_state.bin"), "wb") as f:
        f.write(b"\x00state 2")  # the same size: still a change
    ck, _ = tracker.build(state)
    # each file is a blob of its own: the unchanged 100 KB file is not carried again
    assert ck is not None and len(ck.set_slots) == 1 and len(ck.blobs[0]) < 200 and ck.clear_slots
    assert len(ck.skeleton) < 2000 and ck.size > 100_000
    held.apply(ck)
    with open(os.path.join(logs.path, "gepa_state.bin"), "wb") as f:
        f.write(b"\x00state 3")  # after the last build: not in what the broker holds

    new, restored = held.restore()
    moved = new.refs[ref.id]
    assert isinstance(moved, SessionDir) and moved.path != logs.path and not restored.lost
    with open(os.path.join(moved.path, "gepa_state.bin"), "rb") as f:
        assert f.read() == b"\x00state 2"
    assert os.path.isdir(os.path.join(moved.path, "generated_best_outputs_valset", "task_0"))
    assert os.path.getsize(os.path.join(moved.path, "candidates.json")) == 100_003
    # after the restore the broker's blobs are the directory's: no file sent again (at most the
    # skeleton, pickled anew once), then only a change
    again, _ = restored.tracker.build(new)
    assert (again is None or not again.set_slots) and restored.tracker.build(new) == (None, [])
    with open(os.path.join(moved.path, "run_log.json"), "wb") as f:
        f.write(b"[]")
    ck, _ = restored.tracker.build(new)
    assert ck is not None and len(ck.set_slots) == 1 and not ck.clear_slots
    path = moved.path
    new.refs.clear()
    del moved, new, restored
    import gc

    gc.collect()
    assert not os.path.exists(path), "a session directory goes with the object that holds it"


def test_the_directory_of_a_process_killed_with_9_is_removed_by_the_next_one(short_tmp: str) -> None:
    import os
    import subprocess
    import sys

    from dspex.wire import sessiondir

    made = subprocess.run([sys.executable, "-c", "import dspex, os; d = dspex.SessionDir('x'); print(d.path, flush=True); os._exit(0)"],
                          capture_output=True, text=True, check=True, env={**os.environ, "TMPDIR": short_tmp})
    path = made.stdout.strip()
    assert path.startswith(short_tmp) and os.path.isdir(path)  # its process left without cleaning up
    os.makedirs(os.path.join(short_tmp, f"dspex-sd{os.getpid()}-alive-x"))  # a live process's: kept
    import tempfile

    old_tmp = tempfile.tempdir
    tempfile.tempdir = short_tmp
    sessiondir._sweep.cache_clear()  # this process swept already: again, in short_tmp
    try:
        kept = sessiondir.SessionDir("y")
        assert not os.path.exists(path) and os.path.isdir(os.path.join(short_tmp, f"dspex-sd{os.getpid()}-alive-x"))
        del kept
    finally:
        tempfile.tempdir = old_tmp


def test_a_session_dir_holding_a_link_is_named_not_durable() -> None:
    import os

    from dspex import SessionDir

    table = RefTable("p", "w1")
    state = table.session(SID)
    logs = SessionDir()
    ref = table.put(state, logs)
    os.symlink("/etc/hostname", os.path.join(logs.path, "elsewhere"))
    ck, lost = checkpoint.Tracker(SID).build(state)
    assert ck is not None and [(why.section, why.key) for why in lost] == [("ref", ref.id)]
    assert "symbolic link" in lost[0].reason


def test_functions_sharing_a_closure_cell_share_it_after_a_restore() -> None:
    """Functions made together (a session's ``inc`` and ``get`` of one ``make_counter()``) share
    their cell after a durable session moves, as in-process; a function whose cell holds itself
    comes back too."""
    table = RefTable("p", "w1")
    state = table.session(SID)
    ns = namespace.namespace(state)
    namespace.exec_in_session(state, (
        "def make_counter():\n"
        "    n = 0\n"
        "    def inc():\n"
        "        nonlocal n\n"
        "        n += 1\n"
        "        return n\n"
        "    def get():\n"
        "        return n\n"
        "    def down(k):\n"
        "        return 0 if k == 0 else down(k - 1)\n"
        "    return inc, get, down\n"
        "inc, get, down = make_counter()\n"
    ), ns)
    assert ns["inc"]() == 1
    held = Held()
    ck, _ = checkpoint.Tracker(SID).build(state)
    assert ck is not None
    held.apply(ck)
    namespace.drop_session_module(state)
    new, _ = held.restore()
    nns = namespace.namespace(new)
    try:
        assert nns["inc"]() == 2 and nns["get"]() == 2 and nns["down"](3) == 0
        assert nns["inc"].__closure__[0] is nns["get"].__closure__[0]
    finally:
        namespace.drop_session_module(new)


def test_a_closure_cell_holding_none_comes_back_filled() -> None:
    """A cell whose value is None (``functools.lru_cache(maxsize=None)``'s ``maxsize``, a
    ``nonlocal`` reset to None) is a filled cell after a restore, not an empty one (NameError:
    cannot access free variable): a state of None is no state to pickle."""
    table = RefTable("p", "w1")
    state = table.session(SID)
    ns = namespace.namespace(state)
    namespace.exec_in_session(state, (
        "import functools\n"
        "def make():\n"
        "    last = None\n"
        "    def read():\n"
        "        return last\n"
        "    return read\n"
        "read = make()\n"
        "@functools.lru_cache(maxsize=None)\n"
        "def square(n):\n"
        "    return n * n\n"
    ), ns)
    held = Held()
    ck, lost = checkpoint.Tracker(SID).build(state)
    assert ck is not None and lost == []
    held.apply(ck)
    namespace.drop_session_module(state)
    new, _ = held.restore()
    nns = namespace.namespace(new)
    try:
        assert nns["read"]() is None
        assert nns["square"](3) == 9 and nns["square"].cache_parameters() == {"maxsize": None, "typed": False}
    finally:
        namespace.drop_session_module(new)
