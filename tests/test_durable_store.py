"""The broker's checkpoint store through real processes: what a broker does with a store file it
cannot use, and checkpoints that cannot travel in one message."""

from __future__ import annotations

import glob
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

import dspex
from tests.harness import Stack, wait_for
from tests.harness.procs import PY

pytestmark = pytest.mark.timeout(120)


def _rot(path: str, how: str) -> None:
    """The store as the disk gives it back after ``how`` (the WAL copied into it first, as the
    store's thread does when idle, so nothing of it is left in a WAL that would mask the damage)."""
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for extra in ("-wal", "-shm"):
        if os.path.exists(path + extra):
            os.unlink(path + extra)
    with open(path, "r+b") as f:
        if how == "header":
            f.write(b"\x00" * 100)  # the page-1 header: "file is not a database"
        else:
            f.truncate(os.path.getsize(path) // 3)  # "database disk image is malformed"


def pid_of(s: dspex.Session) -> int:
    return int(s.eval("__import__('os').getpid()"))


@pytest.mark.parametrize("how", ["header", "truncated"])
def test_a_damaged_store_at_start_is_set_aside_and_the_broker_serves(stack: Stack, how: str) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p", durable=True)
    for _ in range(40):
        s.put(os.urandom(4000))  # pages enough for the damage to reach the tables
    path = os.path.join(stack.run_dir, "checkpoints.sqlite")
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.broker.wait(10)
    _rot(path, how)
    damaged = os.path.getsize(path)

    broker = stack.start_broker()  # under supervisord a broker that exits here would restart, and exit, for ever
    stack.wait_workers("p", 1)
    fresh = dx.session("p", durable=True)
    assert fresh.eval("6 * 7") == 42
    assert broker.poll() is None
    (aside,) = [f for f in glob.glob(path + ".unusable-*") if not f.endswith(("-wal", "-shm"))]
    assert os.path.getsize(aside) == damaged  # kept for a post-mortem, never deleted
    assert dx.status()["checkpoints"]["enabled"] is True

    def stored() -> set[str]:
        with sqlite3.connect(path) as db:
            return {row[0] for row in db.execute("SELECT id FROM sessions")}

    wait_for(lambda: stored() == {fresh.id}, what="the new session in a fresh store")
    log = stack.logs()
    assert "is unusable" in log and aside in log and "its durable sessions are lost" in log


def test_a_checkpoint_too_big_for_one_message_is_refused_clearly_and_its_worker_stays(stack: Stack) -> None:
    stack.env["DSPEX_MAX_MESSAGE"] = str(4 * 2**20)  # broker and workers: a checkpoint travels in one message
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p", durable=True)
    other = dx.session("p", durable=True)
    s.exec("import os\ndef grow(name):\n    globals()[name] = os.urandom(1_500_000)")
    s.eval("grow('a')")
    s.eval("grow('b')")
    other.put([1, 2, 3])
    pid = pid_of(s)
    with pytest.raises(dspex.SessionNotDurable, match=r"more than one message may carry \(4.0 MB") as info:
        s.eval("grow('c')")  # the state is now over the bound
    assert info.value.details["ran"] is True
    assert s.eval("[len(a) + len(b) + len(c), os.getpid()]") == [4_500_000, pid]  # a plain session, same worker
    assert {w["pid"] for w in stack.workers("p", dx)} == {w.pid for w in stack.worker_procs}  # none left
    assert dx.status()["pools"]["p"]["crashes"] == 0
    (row,) = [r for r in dx.sessions("p") if r["id"] == s.id]
    assert row["durable"] is False


def test_a_session_the_broker_forgot_is_checkpointed_whole_by_its_live_worker(stack: Stack) -> None:
    """The store set aside (or deleted) while the broker was down: a durable session whose worker
    lives on is known again at its next call, and that call's checkpoint is all of it."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p", durable=True)
    box = s.put({"n": 1})
    s.exec("counter = 41")
    path = os.path.join(stack.run_dir, "checkpoints.sqlite")
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.broker.wait(10)
    _rot(path, "header")
    stack.start_broker()
    stack.wait_workers("p", 2)
    pid = pid_of(s)  # on its worker, which kept it: the broker learns of it again here
    stack.kill(pid)
    wait_for(lambda: pid not in {w["pid"] for w in stack.workers("p", dx)}, what=f"worker {pid} gone")
    assert s.eval("counter + b['n']", {"b": box}) == 42  # moved with all of it, not an empty session
    assert pid_of(s) != pid


def test_a_forgotten_session_whose_worker_is_gone_too_is_reported_lost_never_restored_empty(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p", durable=True)
    box = s.put({"n": 1})
    pid = pid_of(s)
    path = os.path.join(stack.run_dir, "checkpoints.sqlite")
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.broker.wait(10)
    stack.kill(pid)  # its worker dies with the broker down: the store was its only copy
    _rot(path, "header")
    stack.start_broker()
    stack.wait_workers("p", 1)
    with pytest.raises(dspex.CheckpointRefused, match="no checkpoint of it"):
        s.eval("b['n']", {"b": box})
    with pytest.raises(dspex.CheckpointRefused):
        s.eval("1")  # lost, from now on
    assert dx.session("p", durable=True).eval("1 + 1") == 2


def test_a_move_cut_short_by_a_broker_restart_restores_on_the_new_worker_not_an_empty_session(stack: Stack) -> None:
    """The broker pins a moving session to its new worker (and stores the pin) before that worker
    has received the checkpoint: here it is busy, and the broker is SIGKILLed meanwhile. The next
    broker finds the session pinned to a live worker that never held it."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p", durable=True)
    s.exec("counter = 41")
    pid = pid_of(s)
    busy = dx.session("p")
    while pid_of(busy) == pid:  # a session on the other worker
        busy = dx.session("p")
    stack.kill(pid)
    wait_for(lambda: pid not in {w["pid"] for w in stack.workers("p", dx)}, what=f"worker {pid} gone")
    with ThreadPoolExecutor(2) as pool:
        long_call = pool.submit(busy.eval, "__import__('time').sleep(2)")
        wait_for(lambda: any(w["state"] == "busy" for w in stack.workers("p", dx)), what="the other worker busy")
        moving = pool.submit(s.eval, "counter + 1")  # queued behind the long call, pinned there
        wait_for(lambda: dx.status()["checkpoints"]["moves"] == 1, what="the move pinned")
        assert stack.broker is not None
        stack.kill(stack.broker)
        with pytest.raises(dspex.ConnectionError):
            moving.result(10)
        with pytest.raises(dspex.ConnectionError):
            long_call.result(10)
    stack.start_broker()
    stack.wait_workers("p", 1)
    assert s.eval("counter + 1") == 42  # restored there from its checkpoint, not run on an empty session
    assert "where it is pinned: it moves with its checkpoint" in stack.logs()
    assert s.eval("counter + 2") == 43


@pytest.fixture
def small_disk(short_tmp: str) -> Iterator[str]:
    """A 4 MB tmpfs of the test's own (root only): a disk that fills up."""
    path = os.path.join(short_tmp, "disk")
    os.mkdir(path)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", path],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True, check=False)


def _fill(disk: str) -> str:
    filler = os.path.join(disk, "filler")
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_says_so_on_each_call_it_fails_and_leaves_no_stale_checkpoint(stack: Stack, small_disk: str) -> None:
    path = os.path.join(small_disk, "checkpoints.sqlite")
    stack.start_broker("p:strict_queue", extra=["--checkpoints", path])
    for _ in range(2):
        stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 2)
    dx = stack.client()
    s = dx.session("p", durable=True)
    s.exec("import os")
    box = s.put([1])
    s.eval("b.append(2)", {"b": box})
    filler = _fill(small_disk)

    # (bigger than the WAL so far: a write that fits in WAL pages copied out already needs no disk)
    with pytest.raises(dspex.SessionNotDurable, match="database or disk is full"):
        s.eval("b.append(os.urandom(300_000))", {"b": box})  # the disk's error, not what a rollback said after it
    late = dx.session("p", durable=True)
    with pytest.raises(dspex.SessionNotDurable, match="database or disk is full"):
        late.put(os.urandom(300_000))  # opened while the disk is full: never durable, and told so
    assert not [r for r in dx.sessions("p") if r["durable"]]

    os.unlink(filler)
    fresh = dx.session("p", durable=True)
    fresh.put([1])  # durable sessions work again

    def stored() -> dict[str, int]:
        with sqlite3.connect(path) as db:
            return dict(db.execute("SELECT id, seq FROM sessions"))

    # the checkpoints of the sessions turned plain deleted (their rows marked plain: seq -1)
    wait_for(lambda: {k: v for k, v in stored().items() if k != late.id} == {fresh.id: 1, s.id: -1}
             and stored().get(late.id, -1) == -1, what="the checkpoints of the sessions turned plain deleted")
    # so a restarted broker never brings back a session its client was told is plain, as it was
    # before the disk filled: its worker gone, it is a plain session whose worker is gone
    pid = pid_of(s)
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.broker.wait(10)
    stack.kill(pid)
    stack.start_broker()
    stack.wait_workers("p", 1)
    with pytest.raises(dspex.SessionWorkerUnavailable):
        s.eval("b", {"b": box})


def test_a_session_that_went_plain_stays_plain_after_a_broker_restart(stack: Stack) -> None:
    """Told once that it is no longer durable, a session is not made durable again by a restarted
    broker (whose first full checkpoint of it would be refused again, with that call's result)."""
    stack.start_broker("p:strict_queue", extra=["--checkpoint-cap", "0.1"])
    for _ in range(2):
        stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 2)
    dx = stack.client()
    s = dx.session("p", durable=True)
    box = s.put([1])
    with pytest.raises(dspex.SessionNotDurable):
        s.put(os.urandom(200_000))
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.broker.wait(10)
    stack.start_broker()
    stack.wait_workers("p", 2)
    assert s.eval("b + [2]", {"b": box}) == [1, 2]  # a plain session on its worker, as before
    (row,) = dx.sessions("p")
    assert row["durable"] is False and "over the per-session cap" in row["no_longer_durable"]
    path = os.path.join(stack.run_dir, "checkpoints.sqlite")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM blobs").fetchone() == (0,)  # no checkpoint kept of it
    s.close()

    def rows() -> int:
        with sqlite3.connect(path) as db:
            return int(db.execute("SELECT count(*) FROM sessions").fetchone()[0])

    wait_for(lambda: rows() == 0, what="its row gone with the session")


def test_a_lock_held_on_the_store_stalls_only_durable_replies_and_turns_nothing_plain(stack: Stack) -> None:
    """An operator's write on the store file (a ``sqlite3`` shell, a ``VACUUM``) holds its lock
    for a while: the broker's loop must not wait for it (every pool would stall and the workers
    would be taken for dead); durable replies wait for their checkpoints, then go on."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p", durable=True)
    box = s.put([])
    plain = dx.session("p")
    plain.eval("1")
    pids = {w["pid"] for w in stack.workers("p", dx)}
    path = os.path.join(stack.run_dir, "checkpoints.sqlite")
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with sqlite3.connect(path, isolation_level=None) as db:
            db.execute("BEGIN IMMEDIATE")
            locked.set()
            release.wait(20)
            db.execute("COMMIT")

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(10)
        with ThreadPoolExecutor(1) as pool:
            durable = pool.submit(s.eval, "(b.append(1), len(b))[1]", {"b": box})
            for _ in range(5):  # the broker answers as ever (waiting for the lock, it stalled 5 s)
                started = time.monotonic()
                plain.eval("1")
                dx.ping()
                assert time.monotonic() - started < 2.5
            assert not durable.done()  # its reply waits for its checkpoint
            release.set()
            assert durable.result(30) == 1  # then it is acknowledged: no SessionNotDurable
    finally:
        release.set()
        holder.join(30)
    assert s.eval("len(b)", {"b": box}) == 1
    (row,) = [r for r in dx.sessions("p") if r["id"] == s.id]
    assert row["durable"] is True
    assert {w["pid"] for w in stack.workers("p", dx)} == pids and dx.status()["pools"]["p"]["crashes"] == 0


def test_a_second_broker_on_the_same_store_refuses_to_start_and_the_first_keeps_its_sessions(stack: Stack) -> None:
    """Two brokers on one run directory by mistake (other socket names, another conf): the second
    would read, expire and drop the first one's checkpoints (a pool it lacks: all of them)."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p", durable=True)
    s.exec("kept = 42")
    second = stack.procs_reg.spawn(
        [PY, "-m", "broker", "--frontend", f"ipc://{stack.run_dir}/f2.sock", "--backend",
         f"ipc://{stack.run_dir}/b2.sock", "--pool", "q:strict_queue"], "broker2.log", stack.env)
    wait_for(lambda: second.poll() is not None, timeout=20, what="the second broker's exit")
    assert second.returncode == 2  # a config error: under supervisord, FATAL after its retries
    said = stack.procs_reg.log_tail("broker2.log")
    assert "checkpoints.sqlite" in said and "another broker" in said and "Traceback" not in said
    pid = pid_of(s)
    stack.kill(pid)
    wait_for(lambda: pid not in {w["pid"] for w in stack.workers("p", dx)}, what="the kill seen")
    assert s.eval("kept") == 42  # moved with its checkpoint, which the second broker left alone
    assert "dropped from the checkpoint store" not in stack.logs()


def test_the_wal_stays_bounded_under_back_to_back_writes_and_shrinks_when_idle(stack: Stack) -> None:
    """Many small durable sessions opened back to back (a steady load of short calls): the WAL
    is copied into the database while busy, but it only restarts from its beginning if no write
    runs during the copy; it grew by every write of the load, and its file never shrank."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    path = os.path.join(stack.run_dir, "checkpoints.sqlite")

    def wal() -> int:
        return os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0

    largest = i = 0
    ends = time.monotonic() + 8.0  # several of the store thread's copies while busy
    while time.monotonic() < ends:
        s = dx.session("p", durable=True)
        s.exec(f"blob = b'x' * 4000 + ({i}).to_bytes(4, 'big')")
        if i % 20 == 0:
            largest = max(largest, wal())
        i += 1
    largest = max(largest, wal())
    wait_for(lambda: wal() < 1024 * 1024, timeout=10, what="the WAL file given back once the broker is idle")
    database = os.path.getsize(path)  # every checkpoint copied into it by now
    # (every write of the load in the WAL: about 8 times the database it makes; a copy a second
    # keeps about a second of them, once the load lasts long enough)
    assert largest < 3 * database, f"the WAL reached {largest} bytes for a database of {database}"
    assert s.eval("len(blob)") == 4004


@pytest.mark.parametrize("edit", ["size = 'big'", "seq = 'garbage'", "created = 'yesterday', updated = x'00'"])
def test_a_row_edited_by_hand_is_refused_at_start_and_only_its_session_is_lost(stack: Stack, edit: str) -> None:
    """A store row of the wrong types (an operator's ``UPDATE``, a tool's bug): the broker crashed
    at every start on it (a restart loop, every pool down), or took it and later turned the
    session plain with an error that named a Python comparison."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    edited, intact = dx.session("p", durable=True), dx.session("p", durable=True)
    edited.exec("x = 1")
    intact.exec("y = 2")
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.broker.wait(10)
    with sqlite3.connect(os.path.join(stack.run_dir, "checkpoints.sqlite")) as db:
        db.execute(f"UPDATE sessions SET {edit} WHERE id = ?", (edited.id,))
    broker = stack.start_broker()
    stack.wait_workers("p", 2)
    for w in stack.workers("p", dx):  # neither session's worker holds it now: only the store can
        stack.kill(w["pid"])
    wait_for(lambda: not stack.workers("p", dx), what="the kills seen")
    stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 1)
    assert intact.eval("y") == 2  # restored from its row
    with pytest.raises(dspex.CheckpointRefused):
        edited.eval("x")  # lost, and said so: never an empty session
    assert broker.poll() is None
    log = stack.logs()
    assert "damaged" in log and edited.id[:8] in log and "Traceback" not in log


def test_a_broker_restarted_on_a_full_disk_serves_and_its_durable_sessions_wait_for_room(stack: Stack, small_disk: str) -> None:
    """The store's disk fills while the broker is down (or it restarts because of it): the broker
    exited at every start ("cannot open the checkpoint store: database or disk is full"), so under
    supervisord every pool was down, plain sessions too, until someone made room."""
    path = os.path.join(small_disk, "checkpoints.sqlite")
    stack.start_broker("p:strict_queue", extra=["--checkpoints", path])
    for _ in range(2):
        stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 2)
    dx = stack.client()
    kept, called = dx.session("p", durable=True), dx.session("p", durable=True)
    kept.exec("x = 1")
    called.exec("y = 2")
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.broker.wait(10)
    filler = _fill(small_disk)
    broker = stack.start_broker()
    stack.wait_workers("p", 2)
    assert dx.session("p").eval("6 * 7") == 42  # plain sessions are served
    with pytest.raises(dspex.SessionNotDurable, match="database or disk is full"):
        called.eval("y")  # its first call needs a write: told, as any call while the disk is full
    os.unlink(filler)
    pid = pid_of(kept)
    stack.kill(pid)
    wait_for(lambda: pid not in {w["pid"] for w in stack.workers("p", dx)}, what="the kill seen")
    assert kept.eval("x") == 1  # its checkpoint, written before the disk filled, was kept
    assert broker.poll() is None


def test_the_store_file_gives_back_the_room_of_closed_sessions(stack: Stack) -> None:
    """A peak of durable sessions, all closed: their pages were free inside the file for good (a
    store that once held 10,000 sessions of 4 KB kept 46 MB with nothing in it)."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    path = os.path.join(stack.run_dir, "checkpoints.sqlite")
    sessions = [dx.session("p", durable=True) for _ in range(300)]
    for i, s in enumerate(sessions):
        s.exec(f"blob = b'x' * 40_000 + ({i}).to_bytes(4, 'big')")
    wait_for(lambda: os.path.getsize(path) > 300 * 40_000, what="their checkpoints copied into the database")
    for s in sessions:
        s.close()
    wait_for(lambda: os.path.getsize(path) < 1024 * 1024, timeout=15,
             what="the database file shrunk")


def _take_away(path: str, how: str) -> None:
    """What an operator or a cleanup job does to the store of a running broker."""
    if how == "wal":
        os.unlink(path + "-wal")
        return
    for extra in ("", "-wal", "-shm") if how == "all" else ("",):
        os.unlink(path + extra)
    if how == "empty":
        open(path, "wb").close()
    elif how == "other":
        other = path + ".other"
        with sqlite3.connect(other) as db:
            db.execute("CREATE TABLE sessions (id TEXT)")  # a store's name, not its rows
            db.execute("INSERT INTO sessions VALUES ('not ours')")
        db.close()
        os.replace(other, path)


@pytest.mark.parametrize("how", ["main", "all", "wal", "empty", "other"])
def test_a_store_deleted_under_the_running_broker_is_written_again_and_a_restart_keeps_every_session(
        stack: Stack, how: str) -> None:
    """The store file deleted (alone, with its -wal and -shm, or only its -wal) or replaced while
    the broker runs: the broker wrote on into the unlinked file, and its next start found no
    session; those whose workers died too were lost. Now every acknowledged call is in the store
    at the path once more, and a file found in its place is set aside, never read as the store."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    sessions = [dx.session("p", durable=True) for _ in range(3)]
    boxes = [s.put({"n": i}) for i, s in enumerate(sessions)]
    for s in sessions:
        s.exec("counter = 0")
    path = os.path.join(stack.run_dir, "checkpoints.sqlite")
    _take_away(path, how)
    for s in sessions:  # into the file that went, before the broker looks again
        s.exec("counter += 1")
    wait_for(lambda: "while the broker ran: written again from memory, 3 sessions" in stack.logs(),
             what="the store written again")
    for s in sessions:
        s.exec("counter += 1")
    worker = pid_of(sessions[0])
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.kill(worker)  # the store is the sessions' only copy now
    stack.broker.wait(10)

    stack.start_broker()
    stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 1)
    for i, (s, box) in enumerate(zip(sessions, boxes)):
        assert s.eval("(counter, b['n'])", {"b": box}) == (2, i)  # the last acknowledged call's state
    assert pid_of(sessions[0]) != worker
    asides = [f for f in glob.glob(path + ".replaced-*") if not f.endswith(("-wal", "-shm"))]
    if how == "empty":
        (aside,) = asides
        assert os.path.getsize(aside) == 0  # kept as it was
    elif how == "other":
        (aside,) = asides
        with sqlite3.connect(aside) as db:
            assert db.execute("SELECT id FROM sessions").fetchall() == [("not ours",)]
        db.close()
    else:
        assert not asides
    log = stack.logs()
    assert "written again failed" not in log and "is unusable" not in log


def test_a_store_removed_with_a_glob_still_keeps_a_second_broker_off_it(stack: Stack) -> None:
    """`rm checkpoints.sqlite*` under a running broker took the store's lock file with it: a
    second broker started by mistake then locked a new one and opened the store the first one
    writes again (fix 41), reading, expiring and dropping its sessions."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p", durable=True)
    s.exec("kept = 42")
    path = os.path.join(stack.run_dir, "checkpoints.sqlite")
    for found in glob.glob(path + "*"):
        os.unlink(found)
    wait_for(lambda: "written again from memory, 1 sessions" in stack.logs(), what="the store written again")
    second = stack.procs_reg.spawn(
        [PY, "-m", "broker", "--frontend", f"ipc://{stack.run_dir}/f2.sock", "--backend",
         f"ipc://{stack.run_dir}/b2.sock", "--pool", "q:strict_queue"], "broker2.log", stack.env)
    wait_for(lambda: second.poll() is not None, timeout=20, what="the second broker's exit")
    assert second.returncode == 2
    said = stack.procs_reg.log_tail("broker2.log")
    assert "checkpoints.sqlite" in said and "another broker" in said and "Traceback" not in said
    pid = pid_of(s)
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.kill(pid)
    stack.broker.wait(10)
    stack.start_broker()
    stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 1)
    assert s.eval("kept") == 42  # the second broker never touched the store
    assert "dropped from the checkpoint store" not in stack.logs()


@pytest.mark.parametrize("cut", ["to nothing", "to a third"])
def test_a_store_truncated_under_the_running_broker_begins_afresh_and_its_sessions_stay_durable(
        stack: Stack, cut: str) -> None:
    """The store file truncated in place (same inode: fix 41's look saw nothing): every durable
    session's next call got SessionNotDurable (its result withheld, the session plain for good),
    new durable sessions too, until a restart. Now the damaged file is set aside and a fresh store
    begins: each session is checkpointed whole by its worker at its next call and comes back after
    a kill of the broker and its workers; one not called since is lost, never restored empty."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    sessions = [dx.session("p", durable=True) for _ in range(4)]
    for i, s in enumerate(sessions):
        s.exec(f"blob = b'x' * 20_000; counter = {i}")
    path = os.path.join(stack.run_dir, "checkpoints.sqlite")
    wait_for(lambda: os.path.getsize(path + "-wal") == 0, what="the WAL copied into the file")
    os.truncate(path, 0 if cut == "to nothing" else os.path.getsize(path) // 3)
    called, idle = sessions[:3], sessions[3]
    for s in called:
        s.exec("counter += 10")  # no SessionNotDurable, before or after the broker looks
    wait_for(lambda: "was truncated while the broker ran: set aside as" in stack.logs()
             or "is damaged" in stack.logs(), what="the store begun afresh")
    for s in called:
        s.exec("counter += 100")
    fresh = dx.session("p", durable=True)
    fresh.exec("counter = 7")
    workers = [w["pid"] for w in stack.workers("p", dx)]
    assert stack.broker is not None
    stack.kill(stack.broker)
    for pid in workers:
        stack.kill(pid)
    stack.broker.wait(10)

    stack.start_broker()
    stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 1)
    for i, s in enumerate(called):
        assert s.eval("(counter, len(blob))") == (i + 110, 20_000)
    assert fresh.eval("counter") == 7
    with pytest.raises(dspex.CheckpointRefused):
        idle.eval("counter")
    log = stack.logs()
    assert "no longer durable" not in log and "Traceback" not in log
    assert glob.glob(path + ".unusable-*")  # the damaged file, kept for a post-mortem


def test_a_vacuum_of_the_store_while_the_broker_runs_keeps_every_checkpoint(stack: Stack) -> None:
    """An operator's VACUUM and WAL copy (docs/operations.md: safe while the broker runs, it only
    holds writes off) shrinks the file as a truncation does: it must not be taken for one (the store begun
    afresh, every checkpoint lost until its session's next call)."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    kept, closed = dx.session("p", durable=True), dx.session("p", durable=True)
    kept.exec("counter = 1")
    closed.exec("import os; blob = os.urandom(6_000_000)")
    path = os.path.join(stack.run_dir, "checkpoints.sqlite")
    wait_for(lambda: os.path.getsize(path) > 6_000_000, what="the WAL copied into the file")
    closed.close()

    def vacuumed() -> bool:
        with sqlite3.connect(path, timeout=30) as db:
            db.execute("VACUUM")
            # (else the WAL goes into the file at the broker's next copy; a read of the broker's
            # may keep this one from finishing: then once more)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        return os.path.getsize(path) < 1_000_000

    wait_for(vacuumed, what="the store vacuumed")
    kept.exec("counter += 1")
    time.sleep(2)  # two looks of the store's thread at its file (nothing to poll for: it must not act)
    assert "was truncated" not in stack.logs() and not glob.glob(path + ".unusable-*")
    worker = pid_of(kept)
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.kill(worker)
    stack.broker.wait(10)
    stack.start_broker()
    stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 1)
    assert kept.eval("counter") == 2


def test_a_session_closed_while_the_store_is_locked_is_deleted_once_the_lock_goes(stack: Stack) -> None:
    """A close whose delete met a lock on the store (another process's write, or the store's own
    copy of the WAL, which holds writes off once a second) was put off "to the next write": with
    none, the closed session's checkpoint stayed, and a restarted broker brought it back."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p", durable=True)
    s.exec("x = 1")
    path = os.path.join(stack.run_dir, "checkpoints.sqlite")
    holder = sqlite3.connect(path, timeout=30, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        s.close()
    finally:
        holder.execute("COMMIT")
        holder.close()

    def rows() -> list[str]:
        with sqlite3.connect(path, timeout=30) as db:
            found = [r[0] for r in db.execute("SELECT id FROM sessions")]
        db.close()
        return found

    wait_for(lambda: rows() == [], what="the closed session's rows deleted")
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.broker.wait(10)
    stack.start_broker()
    stack.wait_workers("p", 1)
    assert s.id not in {r["id"] for r in dx.sessions("p")}
    assert "could not be deleted yet" not in stack.logs()
