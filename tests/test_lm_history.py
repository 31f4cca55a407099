"""The worker's log of history entries of the client's LMs: what a reply carries (pure logic)."""

from __future__ import annotations

import pickle
import threading

from dspex.client.lmhistory import record_history
from dspex.wire import codec
from worker import lm_history


class _LM:
    def __init__(self) -> None:
        self.history: list[object] = []

    def update_history(self, entry: object) -> None:
        self.history.append(entry)


def _log(*entries: object) -> lm_history.CallLog:
    log = lm_history.CallLog({}, 100)
    log.entries.extend(("k.1", e) for e in entries)
    return log


def test_plain_entries_go_as_one_pickle_in_order() -> None:
    extras = lm_history.extras(_log({"outputs": ["a"]}, {"outputs": ["b"]}))
    assert set(extras) == {"history"}
    assert pickle.loads(extras["history"]) == [["k.1", {"outputs": ["a"]}], ["k.1", {"outputs": ["b"]}]]


def test_over_the_cap_the_newest_entries_that_fit_go() -> None:
    entries = [{"outputs": [str(i) * 100]} for i in range(10)]
    extras = lm_history.extras(_log(*entries), cap=450)
    assert extras["history_left"] == 7  # ~120 bytes an entry: the 3 newest fit
    got = codec.decode([extras["history_codec"]])
    assert [e for _, e in got] == entries[-3:]
    lm = _LM()
    record_history({"k.1": lm}, extras)
    assert lm.history == entries[-3:]


def test_a_field_that_cannot_travel_goes_as_its_repr() -> None:
    lock = threading.Lock()
    extras = lm_history.extras(_log({"outputs": ["a"], "lock": lock}))
    [[key, entry]] = codec.decode([extras["history_codec"]])
    assert key == "k.1" and entry == {"outputs": ["a"], "lock": repr(lock)}


def test_entries_of_lms_the_client_does_not_have_are_left_out() -> None:
    lm = _LM()
    log = lm_history.CallLog({}, 100)
    log.entries.extend([("k.1", {"n": 1}), ("k.9", {"n": 2}), ("k.1", {"n": 3})])
    record_history({"k.1": lm}, lm_history.extras(log))
    assert lm.history == [{"n": 1}, {"n": 3}]


def test_entries_of_the_sessions_own_lms_go_only_with_a_call_of_the_clients_program() -> None:
    """Entries of LMs the client does not have (key None: its global history) go back only when
    the call recorded in one of the client's LMs or modules (or ran with a client's LM): a call of
    the session's own objects alone has nothing to send."""
    client_lm, session_lm = _LM(), _LM()
    log = lm_history.CallLog({id(client_lm): (client_lm, "k.1")}, 100)
    assert not log.record(session_lm, {"n": 1})
    log.entries.append((None, {"n": 1}))
    assert lm_history.extras(log) == {}
    assert log.record(client_lm, {"n": 2})
    assert pickle.loads(lm_history.extras(log)["history"]) == [[None, {"n": 1}], ["k.1", {"n": 2}]]
    ran_with_it = lm_history.CallLog({}, 100, reached=True)
    ran_with_it.entries.append((None, {"n": 3}))
    assert pickle.loads(lm_history.extras(ran_with_it)["history"]) == [[None, {"n": 3}]]


def test_what_a_calls_thread_records_after_its_reply_goes_with_the_next_reply() -> None:
    """A reply takes what was logged until then (again on an error reply made after it); what the
    call's threads log after it, and after the call ended, goes to the session's late entries,
    which the next call's reply carries first, and only once."""
    from collections import deque

    client_lm = _LM()
    late: deque[tuple[object, object]] = deque()
    lms = {id(client_lm): (client_lm, "k.1")}
    first = lm_history.CallLog(lms, 100, late=late)
    first.record(client_lm, {"n": 1})
    assert pickle.loads(lm_history.extras(first)["history"]) == [["k.1", {"n": 1}]]
    first.record(client_lm, {"n": 2})  # logged after the reply was made, before the call ended
    assert pickle.loads(lm_history.extras(first)["history"]) == [["k.1", {"n": 1}], ["k.1", {"n": 2}]]
    lm_history.stop((first, lm_history._current.set(first)))
    first.record(client_lm, {"n": 3})  # a thread the call left running
    first.add(None, {"n": 4})  # an LM the session made: sent as the first call's would have been
    assert list(late) == [("k.1", {"n": 3}), (None, {"n": 4})]
    second = lm_history.CallLog(lms, 100, late=late)
    second.record(client_lm, {"n": 5})
    assert pickle.loads(lm_history.extras(second)["history"]) == [
        ["k.1", {"n": 3}], [None, {"n": 4}], ["k.1", {"n": 5}]]
    assert not late and lm_history.extras(lm_history.CallLog(lms, 100, late=late)) == {}
