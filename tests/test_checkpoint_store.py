"""The broker's checkpoint store (broker/checkpoints.py): SQLite in the run directory.

Real checkpoints (worker/checkpoint.py builds of a DSPy session) go in and are restored from what
comes out; the caps refuse and delete; a writer killed with SIGKILL in the middle of its writes
leaves every write it had committed, and nothing half-written.
"""

from __future__ import annotations

import os
import select
import sqlite3
import sys
import textwrap

import pytest

from broker.checkpoint_thread import StoreThread
from broker.checkpoints import CheckpointStore, Job, open_store
from broker.store_schema import OverCap, StaleCheckpoint, Write
from tests.harness import PY, Procs, wait_for

dspy = pytest.importorskip("dspy")

from tests.test_checkpoint import SID, call, typical_session
from worker import checkpoint, checkpoint_restore
from worker.refs import RefTable


def write_of(ck: checkpoint.Checkpoint) -> Write:
    return Write(ck.session, ck.seq, ck.skeleton, ck.set_slots, ck.blobs, ck.clear_slots, ck.full, ck.size)


def stored_bytes(path: str, session: str) -> int:
    """What the database holds for ``session``, counted by SQLite itself."""
    with sqlite3.connect(path) as db:
        (skeleton,) = db.execute("SELECT COALESCE(SUM(length(skeleton)), 0) FROM sessions WHERE id = ?",
                                 (session,)).fetchone()
        (blobs,) = db.execute("SELECT COALESCE(SUM(length(data)), 0) FROM blobs WHERE session = ?", (session,)).fetchone()
    return int(skeleton) + int(blobs)


def test_checkpoints_applied_in_order_load_as_the_latest_state(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "ck.sqlite")
    store = CheckpointStore(path)
    store.open(SID, "triage", "", "w1", 1.0)
    _, state, refs = typical_session()
    tracker = checkpoint.Tracker(SID)
    cot = state.refs[refs["cot"].id]
    for i in range(5):
        call(state, cot, f"q{i}")
        del state.lm_history[:-3]
        ck, _ = tracker.build(state)
        assert ck is not None
        assert store.apply([write_of(ck)]) == [None]
        assert store.total == ck.size == stored_bytes(path, SID)
    store.close()

    store = CheckpointStore(path)  # a restarted broker
    (row,) = store.sessions()
    assert (row.id, row.pool, row.worker, row.seq) == (SID, "triage", "w1", tracker.seq)
    held = store.load(SID)
    assert held is not None and held.seq == tracker.seq and len(held.skeleton) + sum(map(len, held.blobs)) == row.size == store.total
    new = RefTable("triage", "w2").session(SID)
    checkpoint_restore.restore(new, held.skeleton, held.slots, held.blobs, held.seq)
    assert [e["uuid"] for e in new.lm_history] == [e["uuid"] for e in state.lm_history]
    assert call(new, new.refs[refs["cot"].id], "next").answer == "answer 8"
    store.forget(SID)
    assert store.sessions() == [] and store.load(SID) is None and store.total == 0
    assert stored_bytes(path, SID) == 0


def test_a_session_over_its_cap_is_refused_and_dropped_and_others_keep_theirs(short_tmp: str) -> None:
    store = CheckpointStore(os.path.join(short_tmp, "ck.sqlite"), session_cap=50_000)
    _, state, _refs = typical_session()
    for sid in ("a" * 32, "b" * 32):
        store.open(sid, "p", "", "w1", 1.0)
    small = checkpoint.Tracker("a" * 32)
    state.id = "a" * 32
    ck, _ = small.build(state)
    assert ck is not None and store.apply([write_of(ck)]) == [None]
    state.id = "b" * 32
    state.refs["big"] = os.urandom(60_000)
    big, _ = checkpoint.Tracker("b" * 32).build(state)
    assert big is not None
    (refused,) = store.apply([write_of(big)])
    assert isinstance(refused, OverCap) and "over the per-session cap of 48.8 KB" in str(refused)
    # its checkpoint gone; its row left says it went plain, and why (a restarted broker keeps it plain)
    assert store.load("b" * 32) is None
    assert {r.id: (r.seq, r.plain) for r in store.sessions()} == {"a" * 32: (1, ""), "b" * 32: (-1, str(refused))}
    assert store.total == stored_bytes(store.path, "a" * 32) > 0


def test_the_total_cap_refuses_the_write_that_crosses_it(short_tmp: str) -> None:
    store = CheckpointStore(os.path.join(short_tmp, "ck.sqlite"), total_cap=30_000)
    results = []
    for n in range(3):
        sid = f"{n}" * 32
        store.open(sid, "p", "", "w1", 1.0)
        state = RefTable("p", "w1").session(sid)
        state.refs["data"] = os.urandom(12_000)
        ck, _ = checkpoint.Tracker(sid).build(state)
        assert ck is not None
        results.extend(store.apply([write_of(ck)]))
    assert results[:2] == [None, None] and isinstance(results[2], OverCap) and "total cap" in str(results[2])
    assert [r.seq for r in store.sessions()] == [1, 1, -1] and store.total <= 30_000


def test_a_stale_checkpoint_is_ignored_and_the_stored_one_stays(short_tmp: str) -> None:
    store = CheckpointStore(os.path.join(short_tmp, "ck.sqlite"))
    store.open(SID, "p", "", "w1", 1.0)
    state = RefTable("p", "w1").session(SID)
    state.refs["x"] = [1]
    tracker = checkpoint.Tracker(SID)
    first, _ = tracker.build(state)
    state.refs["x"] = [2]
    second, _ = tracker.build(state)
    assert first is not None and second is not None
    assert store.apply([write_of(second)]) == [None]
    (stale,) = store.apply([write_of(first)])
    assert isinstance(stale, StaleCheckpoint)
    held = store.load(SID)
    assert held is not None and held.seq == second.seq


def test_store_thread_keeps_order_groups_writes_and_wakes_the_poller(short_tmp: str) -> None:
    thread = StoreThread(CheckpointStore(os.path.join(short_tmp, "ck.sqlite")))
    try:
        state = RefTable("p", "w1").session(SID)
        tracker = checkpoint.Tracker(SID)
        jobs = [Job("open", (SID, "p", "", "w1", 1.0))]
        for i in range(20):
            state.refs["n"] = i
            ck, _ = tracker.build(state)
            assert ck is not None
            jobs.append(Job("write", (write_of(ck),), tag=i))
        jobs.append(Job("load", (SID,)))
        for job in jobs:
            thread.submit(job)
        done: list[Job] = []

        def finished() -> bool:
            if select.select([thread.fileno()], [], [], 0.05)[0]:
                done.extend(thread.completed())
            return len(done) == len(jobs)

        wait_for(finished, what="the store thread's jobs")
        assert done == jobs and all(job.error is None for job in done)
        loaded = done[-1].result
        assert loaded is not None and loaded.seq == tracker.seq  # the load saw every write before it
        restored = RefTable("p", "w2").session(SID)
        checkpoint_restore.restore(restored, loaded.skeleton, loaded.slots, loaded.blobs, loaded.seq)
        assert restored.refs["n"] == 19
    finally:
        thread.close()


def counted_wal_copies(store: CheckpointStore) -> list[int]:
    """A list that gets one item per copy of the store's WAL into its database."""
    copies: list[int] = []
    real_copy = store.file.wal_checkpoint

    def counted_copy() -> None:
        real_copy()
        copies.append(1)

    store.file.wal_checkpoint = counted_copy  # type: ignore[method-assign]
    return copies


def counted_looks(store: CheckpointStore) -> list[int]:
    """A list that gets one item per look of the store's thread at its file."""
    looks: list[int] = []
    real_gone = store.file.gone

    def counted_gone() -> str:
        looks.append(1)
        return real_gone()

    store.file.gone = counted_gone  # type: ignore[method-assign]
    return looks


def test_an_idle_store_thread_copies_the_wal_once_after_each_write_and_sleeps_while_it_holds_nothing(
        short_tmp: str) -> None:
    store = CheckpointStore(os.path.join(short_tmp, "ck.sqlite"))
    copies = counted_wal_copies(store)
    looks = counted_looks(store)
    thread = StoreThread(store)
    try:
        # nothing held and nothing written: nothing to copy or to lose, the thread waits for a
        # job without a timeout (an idle broker's thread never wakes)
        wait_for(lambda: thread._asleep, what="the idle store thread asleep")
        assert not copies
        tracker = checkpoint.Tracker(SID)
        state = RefTable("p", "w1").session(SID)
        jobs = [Job("open", (SID, "p", "", "w1", 1.0))]
        for n in (1, 2):
            state.refs["n"] = n
            ck, _ = tracker.build(state)
            assert ck is not None
            jobs.append(Job("write", (write_of(ck),)))
        for job in jobs:
            before = len(copies)
            thread.run_here([job])  # on the routing thread, as the broker does
            wait_for(lambda before=before: len(copies) > before, what=f"the WAL copied after {job.op}")
            seen = len(looks)
            wait_for(lambda seen=seen: len(looks) >= seen + 2, what="two more looks")
            assert len(copies) == before + 1  # nothing written since: not copied again
        assert not thread._asleep  # it holds a session: it looks at its file every second
        thread.run_here([Job("forget", (SID,))])
        wait_for(lambda: thread._asleep, what="the thread asleep again once the store holds nothing")
    finally:
        thread.close()
    assert CheckpointStore(os.path.join(short_tmp, "ck.sqlite")).load(SID) is None


def test_a_store_thread_busy_with_writes_still_copies_the_wal(short_tmp: str) -> None:
    """Writes reaching the thread back to back (big checkpoints, one after the other) never
    leave it idle; its WAL must still be copied into the database, or it grows for ever."""
    store = CheckpointStore(os.path.join(short_tmp, "ck.sqlite"))
    copies = counted_wal_copies(store)
    thread = StoreThread(store)
    try:
        thread.run_here([Job("open", (SID, "p", "", "w1", 1.0))])
        seq = 0

        def one_more_write_then_copied() -> bool:
            nonlocal seq
            seq += 1
            blob = os.urandom(100_000)
            thread.submit(Job("write", (Write(SID, seq, b"skeleton", [0], [blob], [], False, 100_008),)))
            wait_for(lambda: select.select([thread.fileno()], [], [], 0.05)[0] and thread.completed(),
                     what=f"write {seq} done")
            return bool(copies)

        wait_for(one_more_write_then_copied, timeout=8, interval=0, what="a WAL copy while writes keep coming")
    finally:
        thread.close()


WRITER = textwrap.dedent("""
    import sys
    from broker.checkpoints import CheckpointStore
    from broker.store_schema import Write
    store = CheckpointStore(sys.argv[1])
    store.open("s" * 32, "p", "", "w1", 1.0)
    n = 0
    while True:
        n += 1
        blob = bytes([n % 256]) * 20000
        held = min(n, 7) * 20000 + len(b"skeleton %d" % n)
        store.apply([Write("s" * 32, n, b"skeleton %d" % n, [n % 7], [blob], [], False, held)])
        print(n, flush=True)  # committed: this is what the broker would acknowledge
""")


def test_every_committed_write_survives_a_sigkill_of_the_writer(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "ck.sqlite")
    procs = Procs(short_tmp)
    try:
        proc = procs.spawn([PY, "-c", WRITER, path], "writer.log")
        log = os.path.join(short_tmp, "writer.log")

        def acknowledged() -> int:
            with open(log) as f:
                lines = [line for line in f.read().split("\n") if line.strip().isdigit()]
            return int(lines[-1]) if lines else 0

        wait_for(lambda: acknowledged() > 200, timeout=60, what="200 committed writes")
        procs.kill(proc)
        last = acknowledged()
    finally:
        procs.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    store = CheckpointStore(path)
    held = store.load("s" * 32)
    assert held is not None and held.seq >= last  # nothing acknowledged is lost
    assert held.skeleton == b"skeleton %d" % held.seq  # the latest write, whole
    assert sorted(held.slots) == sorted({n % 7 for n in range(1, held.seq + 1)})
    newest = {n % 7: n for n in range(1, held.seq + 1)}
    assert all(blob == bytes([newest[s] % 256]) * 20000 for s, blob in zip(held.slots, held.blobs))
    assert store.total == stored_bytes(path, "s" * 32)
    print(f"writer killed after {last} acknowledged writes; the store holds {held.seq}", file=sys.stderr)


def test_a_store_of_another_schema_is_set_aside_and_one_that_cannot_be_opened_is_an_error(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "checkpoints.sqlite")
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")
        db.execute("PRAGMA user_version = 99")  # a newer broker's store
    store = open_store(path)
    assert store.sessions() == []
    store.close()
    (aside,) = [f for f in os.listdir(short_tmp) if f.startswith("checkpoints.sqlite.unusable-") and "-wal" not in f
                and "-shm" not in f]
    with sqlite3.connect(os.path.join(short_tmp, aside)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 99  # kept as it was
    os.mkdir(os.path.join(short_tmp, "dir.sqlite"))
    with pytest.raises(sqlite3.OperationalError):  # not damaged: nothing set aside, the broker says why
        open_store(os.path.join(short_tmp, "dir.sqlite"))


def test_a_store_of_schema_1_is_upgraded_in_place_with_its_sessions_last_use_unknown(short_tmp: str) -> None:
    """An earlier broker's store (no last-use column) keeps every checkpoint; its rows' last use
    is unknown (their idle time counts from the broker's start), new rows have theirs."""
    path = os.path.join(short_tmp, "checkpoints.sqlite")
    store = CheckpointStore(path)
    store.open("a" * 32, "p", "", "w1", 1000.0)
    store.apply([Write("a" * 32, 1, b"skeleton", [0], [b"blob"], [], True, 12)])
    store.close()
    with sqlite3.connect(path) as db:  # what schema 1 was
        db.execute("ALTER TABLE sessions DROP COLUMN used")
        db.execute("PRAGMA user_version = 1")
    db.close()
    store = CheckpointStore(path)
    assert [(r.id, r.seq, r.used) for r in store.sessions()] == [("a" * 32, 1, None)]
    assert store.load("a" * 32) is not None and store.load("a" * 32).blobs == [b"blob"]  # type: ignore[union-attr]
    store.open("b" * 32, "p", "", "w1", 2000.0)
    store.used("a" * 32, 3000.0)
    assert {r.id[0]: r.used for r in store.sessions()} == {"a": 3000.0, "b": 2000.0}
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


def test_writes_on_the_routing_thread_while_the_store_file_is_deleted_again_and_again_are_all_kept(
        short_tmp: str) -> None:
    """The store's thread writes the file again (its connections swapped) while the routing thread
    commits small writes (run_here): each write it acknowledged is in the file at the path."""
    path = os.path.join(short_tmp, "ck.sqlite")
    thread = StoreThread(CheckpointStore(path))
    acknowledged = 0
    try:
        thread.run_here([Job("open", (SID, "p", "", "w1", 1.0))])
        rewrites = 0
        seq = 0
        while rewrites < 3:
            seq += 1
            skeleton = b"skeleton %d" % seq
            job = Job("write", (Write(SID, seq, skeleton, [0], [b"x" * 100], [], False, 100 + len(skeleton)),))
            if thread.writing:  # as the broker does: behind the thread's writes, never beside them
                thread.submit(job)
                wait_for(lambda: select.select([thread.fileno()], [], [], 0.05)[0] and thread.completed(),
                         what=f"write {seq} done by the store's thread")
            elif thread.run_here([job]) != [job]:
                wait_for(lambda: select.select([thread.fileno()], [], [], 0.05)[0] and thread.completed(),
                         what=f"write {seq} handed to the store's thread")
            assert job.error is None
            acknowledged = seq
            if seq % 50 == 0 and os.path.exists(path) and os.path.exists(path + "-wal"):  # (written again since)
                os.unlink(path if rewrites % 2 == 0 else path + "-wal")
                rewrites += 1
    finally:
        thread.close()  # (it looks a last time: the last deletion is written again too)
    assert CheckpointStore(path).load(SID).seq == acknowledged  # type: ignore[union-attr]


def test_a_wake_queued_behind_a_job_is_no_write(short_tmp: str) -> None:
    """A write on the routing thread wakes the sleeping store thread with a wake-up queued behind
    whatever the thread was handed first: taken in the same round, it is no job and no write
    (counted as one, the thread would seem to have writes for ever and the routing thread's next
    inline write would fail)."""
    store = CheckpointStore(os.path.join(short_tmp, "ck.sqlite"))
    thread = StoreThread(store)
    try:
        for n in range(20):
            wait_for(lambda: thread._asleep, what="the idle store thread asleep")
            thread.submit(Job("load", (SID,)))  # wakes it; the wake-up below queues behind it
            sid = f"{n:032d}"
            thread.run_here([Job("open", (sid, "p", "", "w1", 1.0))])
            wait_for(lambda: not thread.writing and select.select([thread.fileno()], [], [], 0.01)[0] != [],
                     what="the load done and no write left")
            thread.completed()
            thread.run_here([Job("forget", (sid,))])
    finally:
        thread.close()
