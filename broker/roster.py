"""The workers the routing core knows: registration, heartbeats, removal, and their events.

A worker registers with READY (its pool, pid, host, capacity, wire version); a re-READY after a
reconnect keeps its incarnation and sessions; on a new connection it is asked which requests it
holds (B_SYNC), and those its old connection lost are failed (:meth:`Roster.held`). Heartbeats go out every interval and a worker
silent for interval x liveness is removed. A lost connection is a crash at once, except just after
the broker itself did not run: then the worker is away, waited for on a new connection. A removed worker's requests are handed back when it
said goodbye (they never ran), else answered ``WorkerCrashed``; its sessions re-pin (``hint``),
move with their checkpoint (durable) or end as tombstones.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack

from broker.answers import Answers
from broker.durable import DurableSessions
from broker.moves import movable
from broker.port import Port
from broker.sessions import SessionBook, worker_gone
from broker.state import Clock, GoneWorkers, Pending, Pool, SessionRecord, WorkerRecord
from dspex.stack.health import SERVICE, SILENT
from dspex.wire.errors import WorkerCrashed
from dspex.wire.protocol import (
    B_DISCONNECT,
    B_HEARTBEAT,
    B_SYNC,
    PROTOCOL_VERSION,
    RECEIVED_WINDOW,
    RENEW_BACKOFF_MAX,
    Affinity,
)

if TYPE_CHECKING:
    import zmq

LOST = "crashed (connection lost)"  # its connection closed without a goodbye
# why a worker left at a call's hard time limit (the call ignored its interruption)
HARD_LIMIT = "was recycled at a call's hard time limit"
RECYCLED = "was recycled"


def recycled(w: WorkerRecord) -> str:
    """The why of ``w``'s goodbye as its pool's recycle: the policy rule that retired it, if one did."""
    policy = w.pool.recycle_policy
    return f"{RECYCLED}: {policy}" if policy else RECYCLED
DRAIN_DEADLINE = "was recycled (stopped hard at its drain deadline)"
# how a worker left, as the metrics' ``why`` label: a small fixed set (the broker's words and the
# exit cause supervisord saw stay in the events, where free text does not multiply series)
CRASH_WHYS = ("connection_lost", "silent")
RECYCLE_WHYS = ("recycled", "hard_limit", "drain_deadline")
# the share of a heartbeat interval after a round during which the workers' answers wait unread
# while no request is in flight (:meth:`Roster.answers_wait_until`)
ANSWERS_WAIT = 0.1


def why_label(why: str, crashed: bool) -> str:
    """The label of a crash (``crashed``) or a recycle, from the broker's ``why``. A crash is a
    connection that closed without a goodbye unless the worker went silent (its process wedged,
    its host or the network gone)."""
    if crashed:
        return "silent" if why == SILENT else "connection_lost"
    return {HARD_LIMIT: "hard_limit", DRAIN_DEADLINE: "drain_deadline"}.get(why, "recycled")


class Roster:
    def __init__(self, pools: dict[str, Pool], workers: dict[bytes, WorkerRecord], sessions: dict[str, SessionRecord],
                 running: dict[tuple[bytes, int], WorkerRecord], gone: GoneWorkers, *, clock: Clock, port: Port,
                 answers: Answers, book: SessionBook, counters: dict[str, int], heartbeat_interval: float,
                 heartbeat_liveness: int, to_worker: Callable[[WorkerRecord, list[Any]], bool],
                 to_peer: Callable[[bytes, list[bytes]], None],
                 hand_back: Callable[[Pending, Pool, WorkerRecord, str], None],
                 pin: Callable[[SessionRecord, bytes | None], None], durable: DurableSessions) -> None:
        self.pools, self.workers, self.sessions, self.running, self.gone = pools, workers, sessions, running, gone
        self.clock, self.port, self.answers, self.book, self.counters = clock, port, answers, book, counters
        self.interval = heartbeat_interval
        self.silence = heartbeat_interval * heartbeat_liveness  # a worker silent this long is dead
        self.last_round = clock.now  # the last heartbeat round
        self.events: deque[dict[str, Any]] = deque(maxlen=200)  # recent starts, recycles, crashes, exits
        self._to_worker, self._to_peer, self._hand_back, self._pin = to_worker, to_peer, hand_back, pin
        self.durable = durable
        # until then a lost connection may be a worker renewing its socket: it gave the broker up
        # while the broker did not run, and its new connection's READY is on its way
        self.renewals_until = -math.inf
        self.renewal_wait = 0.0  # how long a worker lost then is waited for

    def register(self, wid: bytes, frames: list[zmq.Frame]) -> WorkerRecord | None:
        """A READY: the new worker (None for a re-READY, or one told to leave)."""
        try:
            info = msgpack.unpackb(frames[2].buffer)
            pool_name = info["pool"]
            if not isinstance(pool_name, str):
                raise TypeError("pool must be a string")
            if not all(isinstance(info.get(k, 0), int) for k in ("pid", "capacity", "running")):
                raise TypeError("pid, capacity and running must be integers")
            version = info.get("version", 1)
        except Exception as exc:  # noqa: BLE001 - anything a peer sends must not stop the broker
            self.counters["garbage_backend"] += 1
            self.port.log(logging.WARNING, "malformed READY from %s: %s", wid[:8], exc)
            return None
        known = self.workers.get(wid)
        if known is not None:  # a re-READY after a reconnect: same incarnation, same sessions
            if self.port.worker_connected(wid, frames[1]) and known.inflight:
                # until the ROUTER let go of its old connection, a request sent to it went there
                # and was lost without an error (and a reply it wrote there may be lost too): ask
                # what it holds; a B_SYNC goes on the new connection, after whatever arrived
                known.sync += 1
                known.syncing = set(known.inflight)
                self._to_worker(known, [B_SYNC, b"%d" % known.sync])
            if known.away:
                known.away = ""
                self.port.log(logging.INFO, "worker %s (pid %d) is back on a new connection", known.incarnation[:8], known.pid)
            return None
        if version != PROTOCOL_VERSION:  # its frames would not parse here, nor ours there
            self.port.log(logging.ERROR, "worker %s (pid %s, host %s) speaks wire protocol version %r, this broker speaks %d: "
                      "telling it to leave (run one dspex version on a stack)", wid[:8].decode(errors="replace"), info.get("pid"),
                      info.get("host", "?"), version, PROTOCOL_VERSION)
            self._to_peer(wid, [B_DISCONNECT])
            return None
        pool = self.pools.get(pool_name)
        if pool is None:
            self.port.log(logging.ERROR, "worker %s (pid %s, host %s) wants unknown pool %r; telling it to leave",
                          wid[:8].decode(errors="replace"), info.get("pid"), info.get("host", "?"), pool_name)
            # said to the worker too: its log is where an operator looks when supervisord restarts it
            self._to_peer(wid, [B_DISCONNECT, f"it does not serve pool {pool_name!r} (its pools: "
                                f"{', '.join(self.pools)}; it reads them when it starts: restart it after "
                                "adding a pool)".encode()])
            return None
        now = self.clock.now
        w = WorkerRecord(wid, pool, info, now, now + self.silence)
        self.workers[wid] = w
        pool.workers[wid] = w
        self.port.worker_connected(wid, frames[1])
        # re-adopt sessions a restarted broker learned about from clients before this READY
        w.pinned = sum(1 for r in self.sessions.values() if r.worker == wid)
        w.queue.extend(pool.awaiting.pop(wid, ()))
        pool.starts += 1
        self.event(pool.name, w, "start", "registered")
        self.port.log(logging.INFO, "worker %s ready: pool=%s pid=%s host=%s", w.incarnation[:8], pool.name, w.pid, w.host)
        return w

    def held(self, w: WorkerRecord, frames: list[zmq.Frame]) -> bool:
        """``w``'s answer to its last B_SYNC (W_HELD): a request in flight when it was asked that
        it neither holds nor answered since (its replies come in order, before the answer) was
        lost with its old connection, or its reply was. One it received may have run: failed
        ``WorkerCrashed``. One it did not receive (sent fewer than its window of received
        requests ago) never ran: sent again, first in line. Its sessions stay on ``w``, state
        intact. True when slots were freed."""
        if not w.syncing or len(frames) < 5 or frames[2].bytes != b"%d" % w.sync:
            return False  # an answer to an earlier ask (that one's requests are asked again)
        try:
            holds, received = ({(bytes(client), int(req_id)) for client, req_id in msgpack.unpackb(f.buffer)}
                               for f in frames[3:5])
        except Exception:  # noqa: BLE001 - anything a peer sends must not stop the broker
            self.counters["garbage_backend"] += 1
            return False
        lost = [p for key, p in w.inflight.items() if key in w.syncing and key not in holds]
        w.syncing = set()
        again: list[Pending] = []
        for p in lost:
            key = (p.client, p.req_id)
            del w.inflight[key]
            self.running.pop(key, None)
            if key not in received and w.sent - p.sent < RECEIVED_WINDOW:
                again.append(p)
                continue
            self.answers.fail(p, w.pool, WorkerCrashed(
                f"worker {w.incarnation[:8]} (pid {w.pid}) lost this request's reply with its connection to the "
                "broker (renewed while the broker did not run); it may have run", worker=w.incarnation,
                session=p.session))
            rec = self.sessions.get(p.session) if p.session else None
            if rec is not None and rec.closing and not self.book.running(rec):
                self.book.release(rec)
            elif rec is not None and rec.durable is not None:
                self.durable.moves.call_ended(rec)
        for p in reversed(again):  # first in line for this worker, in their order
            rec = self.sessions.get(p.session) if p.session else None
            if rec is not None and rec.worker == w.id:
                w.queue.appendleft(p)
            else:
                self._hand_back(p, w.pool, w, "lost it with its old connection")
        if lost:
            self.port.log(logging.WARNING, "worker %s (pid %d) lost %d request(s) with its old connection: %d sent "
                          "again (it never had them), %d failed as crashed (they may have run)", w.incarnation[:8],
                          w.pid, len(lost), len(again), len(lost) - len(again))
        return bool(lost)

    def heard(self, w: WorkerRecord, stats: Any) -> bool:
        """A heartbeat's stats (rss, served, running...); True when calls it ran for an earlier
        broker ended unseen (slots freed)."""
        w.stats = stats
        if not w.adopted:
            return False
        running = int(stats.get("running", 0))
        adopted, w.adopted = w.adopted, min(w.adopted, max(0, running - len(w.inflight)))
        return w.adopted < adopted

    def did_not_run(self, now: float) -> float:
        """How long this process did not run before ``now`` (stopped, swapped out, a VM pause), as
        its heartbeat rounds tell: the next one more than an interval late (0.0: it ran)."""
        late = now - self.last_round - self.interval
        return late if late > self.interval else 0.0

    def _excuse(self, seconds: float) -> None:
        """The broker itself did not run for ``seconds``: the heartbeats it has not read yet are in
        its sockets, not missing, so every worker's silence deadline moves on; and for a renewal
        wait from now a lost connection is taken for a renewal (:meth:`lost`)."""
        for w in self.workers.values():
            if not w.away:  # (one lost since it ran again is waited for from then)
                w.expiry += seconds
        self.renewal_wait = self._renewal_wait(seconds)
        self.renewals_until = self.clock.now + self.renewal_wait

    def _renewal_wait(self, paused: float) -> float:
        """How long a worker that lost its connection after a pause of ``paused`` seconds is waited
        for. Its READY on the new connection usually comes at once; but while the broker still
        reads the old connection's last messages, the ROUTER ignores a new one under the same
        identity (no handover), and that READY is lost: the worker's next renewal then comes at
        most its backoff later, which doubled with each renewal during the pause."""
        return self.silence + self.interval + min(paused + self.interval, RENEW_BACKOFF_MAX)

    def lost(self, w: WorkerRecord, why: str = LOST) -> None:
        """``w``'s connection closed without a goodbye (or a send found it gone). Just after the
        broker itself did not run (before its first heartbeat round since, and for a renewal wait
        after it), that is most likely the worker renewing its socket (it heard nothing for its
        liveness): it stays, its sessions pinned, taking no calls, until its READY on the new
        connection, or until :meth:`_renewal_wait` passes without it (then ``why``, a crash). A
        worker of the broker's host whose process has exited is a crash at once all the same."""
        if self.workers.get(w.id) is not w:
            return
        now = self.clock.now
        paused = self.did_not_run(now)  # (not ticked since it ran again)
        if (now >= self.renewals_until and not paused) or self.port.process_exited(w.pid, w.host):
            self.remove(w, why)
        elif not w.away:
            w.away = why
            wait = self._renewal_wait(paused) if paused else self.renewal_wait
            w.expiry = now + wait
            self.port.log(logging.INFO, "worker %s (pid %d) lost its connection while this broker did not run: "
                          "waiting up to %.1fs for it on a new one", w.incarnation[:8], w.pid, wait)

    def answers_wait_until(self) -> float:
        """Until when the backend may go unread (-inf: not now). The workers answer a heartbeat
        round within milliseconds of each other but not together: read as they come, each answer
        would wake the routing thread; read once, a tenth of an interval after the round, they wake
        it once. Only with no request in flight, so no reply waits: what else a worker may say then
        (READY, a goodbye, a drain) waits that long at most, a worker's silence is judged at the
        rounds and its answer still counts from when it is read."""
        if self.running or not self.workers:
            return -math.inf
        return self.last_round + self.interval * ANSWERS_WAIT

    def heartbeat(self, now: float) -> None:
        """Heartbeat every worker; remove those silent too long."""
        late = self.did_not_run(now)
        if late:
            self._excuse(late)
        self.last_round = now
        for w in list(self.workers.values()):
            if now > w.expiry:
                self.remove(w, w.away or SILENT)
            elif not w.away:
                self._to_worker(w, [B_HEARTBEAT])

    def remove(self, w: WorkerRecord, why: str, clean: bool = False) -> None:
        """``clean``: the worker said goodbye, so it answered every request it started; what is
        still in flight never ran there (handed back, not ``WorkerCrashed``)."""
        if self.workers.pop(w.id, None) is None:
            return
        pool = w.pool
        pool.workers.pop(w.id, None)
        if "recycled" in why:
            pool.recycles += 1
            label = why_label(why, crashed=False)
            pool.recycles_by[label] = pool.recycles_by.get(label, 0) + 1
            event = "recycle"
        elif clean:  # a clean SIGTERM exit (supervisorctl stop/restart, a deploy) is not a crash
            event = "exit"
        else:
            pool.crashes += 1
            label = why_label(why, crashed=True)
            pool.crashes_by[label] = pool.crashes_by.get(label, 0) + 1
            event = "crash"
            pool.recent.add(SERVICE, "crash", self.clock.now)
        self.gone.add(w.id, why, crashed=event == "crash")
        self.event(pool.name, w, event, why)
        # an intended recycle or a clean exit is routine (INFO); anything else needs a look
        self.port.log(logging.INFO if clean or why == RECYCLED or why.startswith(f"{RECYCLED}:") else logging.WARNING,
                "worker %s (pid %d, pool %s) %s; %d in flight, %d queued, %d sessions",
                w.incarnation[:8], w.pid, pool.name, why, len(w.inflight), len(w.queue), w.pinned)
        inflight = list(w.inflight.items())
        queued = list(w.queue)
        w.inflight.clear()
        w.queue.clear()
        moving = []  # durable sessions pinned here: they move on their next call (or now, queued ones)
        # silent, not gone: a partitioned host's worker comes back under the same incarnation with
        # its sessions' state, so they wait for it (uncounted) until their next call or their TTL
        silent = why == SILENT
        for rec in [r for r in self.sessions.values() if r.worker == w.id]:
            if movable(rec) and not rec.closing:
                moving.append(rec)
            elif pool.mode is Affinity.HINT and not rec.closing:
                self._pin(rec, None)  # re-pins on its next call
            elif silent and not rec.closing:
                continue
            else:  # its state is gone with the worker: the id stays as a tombstone only
                self.book.retire(rec, w.id)
        for key, p in inflight:
            self.running.pop(key, None)
            if clean:
                self._hand_back(p, pool, w, why)
            else:
                self.answers.fail(p, pool, WorkerCrashed(
                    f"worker {w.incarnation[:8]} (pid {w.pid}) {why} while running this request",
                    worker=w.incarnation, session=p.session))
        for rec in moving:
            self.durable.moves.call_ended(rec)  # a move that waited for its call here goes on
        for p in queued:
            if self.durable.reroute(p, pool):
                continue  # it did not run: it moves with its session
            self.answers.fail(p, pool, worker_gone(p.session, w.id, why))
        self.port.worker_gone(w.id)
        if pool.recycling == w.id:
            pool.recycle_started = self.clock.now  # now wait for the replacement

    def event(self, pool: str, w: WorkerRecord, event: str, why: str) -> None:
        self.events.append({"time": self.clock.wall(), "pool": pool, "worker": w.incarnation, "pid": w.pid,
                            "host": w.host, "event": event, "why": why})
