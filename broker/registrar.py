"""What a worker says about itself, and the broker's answer: READY, heartbeats, its answer to a
sync, its goodbye and its drain (every command but a reply and its partials).

A READY registers it (its pool, pid, host, capacity, wire version); a re-READY after a reconnect
keeps its incarnation and sessions, and on a new connection it is asked which requests it holds
(B_SYNC), and those its old connection lost are failed or sent again (:meth:`Registrar.held`). A
worker on another wire version or of a pool this broker does not serve is told to leave. Its
heartbeat stats free the slots of calls it ran for an earlier broker; its goodbye removes it
(cleanly, or with its calls failed when one ignored its hard time limit); a drain starts its
recycle. The workers themselves, their liveness and their removal are the roster's
(``broker.roster``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgpack

from broker.answers import BackendGarbage
from broker.dispatch import Dispatcher
from broker.durable import DurableSessions
from broker.recycling import Recycler
from broker.roster import HARD_LIMIT, Roster, recycled
from broker.state import Pending, Pool, WorkerRecord
from broker.turned_away import UNKNOWN_POOL, WIRE_VERSION, TurnedAway
from dspex.wire.errors import WorkerCrashed
from dspex.wire.protocol import (
    B_BYE,
    B_DISCONNECT,
    B_REREGISTER,
    B_SYNC,
    GOODBYE_ABANDONED,
    GOODBYE_HARD_LIMIT,
    PROTOCOL_VERSION,
    RECEIVED_WINDOW,
    W_DISCONNECT,
    W_DRAIN,
    W_HEARTBEAT,
    W_HELD,
    W_READY,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    import zmq


class Registrar:
    """Handles what a worker says about itself (see the module docstring)."""

    def __init__(self, roster: Roster, dispatcher: Dispatcher, recycler: Recycler, durable: DurableSessions, *,
                 pools: dict[str, Pool], counters: dict[str, int],
                 to_worker: Callable[[WorkerRecord, list[Any]], bool], to_peer: Callable[[bytes, list[bytes]], None],
                 garbage: BackendGarbage, turned_away: TurnedAway) -> None:
        self.roster, self.dispatcher, self.recycler, self.durable = roster, dispatcher, recycler, durable
        self.turned_away = turned_away
        self.pools, self.counters, self.port = pools, counters, roster.port
        self._to_worker, self._to_peer, self._garbage = to_worker, to_peer, garbage

    def on_command(self, wid: bytes, w: WorkerRecord | None, first: bytes, frames: list[zmq.Frame], now: float) -> None:
        """A worker's command other than a reply: ``first`` its command frame, ``w`` its record
        (None: not registered here)."""
        if first == W_HEARTBEAT:
            if w is None:
                self._to_peer(wid, [B_REREGISTER])
            elif len(frames) > 2:
                try:
                    stats = msgpack.unpackb(frames[2].buffer)
                    prepared = w.stats.get("preparing") and isinstance(stats, dict) and not stats.get("preparing")
                    if isinstance(stats, dict) and self.heard(w, stats):
                        self.dispatcher.feed(w)
                    if prepared and w.pool.recycling is not None:
                        # a rolling recycle waits for a replacement able to run calls: its dspy import is over
                        self.recycler.step(w.pool, now)
                except Exception:  # noqa: BLE001 - a worker's garbage is counted, never fatal
                    self.counters["garbage_backend"] += 1
        elif first == W_READY:
            new = self.register(wid, frames)
            if new is not None:
                self.dispatcher.feed(new)
                if new.pool.parked:
                    self.durable.moves.worker_ready(new.pool)
                self.durable.moves.spread(new)
                if new.pool.recycling is not None:
                    # a rolling recycle waits for this replacement: go on now, not at the next tick
                    # (an operator who saw the replacement ready must not find the pool "recycling")
                    self.recycler.step(new.pool, now)
            elif w is not None:
                self.dispatcher.feed(w)  # back on a new connection: what waited for it goes now
        elif first == W_DISCONNECT:
            self._to_peer(wid, [B_BYE])  # it waits for this before exiting (its goodbye arrived)
            # abandoned: a call of it ignored its hard time limit, so what it was running may have run
            goodbye = frames[2].bytes if len(frames) > 2 else b""
            if w is not None and goodbye == GOODBYE_ABANDONED:
                self.roster.remove(w, HARD_LIMIT)
            elif w is not None and goodbye == GOODBYE_HARD_LIMIT:  # its calls all answered: nothing failed
                self.roster.remove(w, HARD_LIMIT, clean=True)
            elif w is not None:
                self.roster.remove(w, recycled(w) if w.pool.recycling == w.id else "exited", clean=True)
        elif first == W_HELD:
            if w is not None and self.held(w, frames):
                if w.draining and not w.inflight:
                    self._to_worker(w, [B_DISCONNECT])
                else:
                    self.dispatcher.feed(w)
        elif first == W_DRAIN:
            if w is not None and not w.draining:
                self.port.log(logging.INFO, "worker %s (pid %d) is stopping: draining", w.incarnation[:8], w.pid)
                self.recycler.start_draining(w, "is stopping", now)
        else:
            self._garbage(wid, w, f"unknown command {first[:8]!r}")

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
        known = self.roster.workers.get(wid)
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
            self.turned_away.add(str(info.get("host", "?")), info.get("pid"), WIRE_VERSION, str(version),
                                 self.roster.clock.now)
            self._to_peer(wid, [B_DISCONNECT])
            return None
        pool = self.pools.get(pool_name)
        if pool is None:
            self.port.log(logging.ERROR, "worker %s (pid %s, host %s) wants unknown pool %r; telling it to leave",
                          wid[:8].decode(errors="replace"), info.get("pid"), info.get("host", "?"), pool_name)
            self.turned_away.add(str(info.get("host", "?")), info.get("pid"), UNKNOWN_POOL, pool_name,
                                 self.roster.clock.now)
            # said to the worker too: its log is where an operator looks when supervisord restarts it
            self._to_peer(wid, [B_DISCONNECT, f"it does not serve pool {pool_name!r} (its pools: "
                                f"{', '.join(self.pools)}; it reads them when it starts: restart it after "
                                "adding a pool)".encode()])
            return None
        now = self.roster.clock.now
        w = WorkerRecord(wid, pool, info, now, now + self.roster.silence)
        self.roster.workers[wid] = w
        pool.workers[wid] = w
        self.port.worker_connected(wid, frames[1])
        # re-adopt sessions a restarted broker learned about from clients before this READY
        w.pinned = sum(1 for r in self.roster.sessions.values() if r.worker == wid)
        w.queue.extend(pool.awaiting.pop(wid, ()))
        pool.starts += 1
        self.roster.event(pool.name, w, "start", "registered")
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
            self.roster.running.pop(key, None)
            if key not in received and w.sent - p.sent < RECEIVED_WINDOW:
                again.append(p)
                continue
            self.roster.answers.fail(p, w.pool, WorkerCrashed(
                f"worker {w.incarnation[:8]} (pid {w.pid}) lost this request's reply with its connection to the "
                "broker (renewed while the broker did not run); it may have run", worker=w.incarnation,
                session=p.session))
            rec = self.roster.sessions.get(p.session) if p.session else None
            if rec is not None and rec.closing and not self.roster.book.running(rec):
                self.roster.book.release(rec)
            elif rec is not None and rec.durable is not None:
                self.durable.moves.call_ended(rec)
        for p in reversed(again):  # first in line for this worker, in their order
            rec = self.roster.sessions.get(p.session) if p.session else None
            if rec is not None and rec.worker == w.id:
                w.queue.appendleft(p)
            else:
                self.dispatcher.hand_back(p, w.pool, w, "lost it with its old connection")
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
