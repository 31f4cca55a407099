"""The broker's bookkeeping: pools, worker incarnations, sessions and waiting requests.

Pure data and small pure functions (placement); no sockets here, so the routing rules can be
unit-tested in-process. What the broker measures of a pool is in ``broker.stats``.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.stats import LATENCY_BUCKETS, Histogram, RecentFailures
from dspex.stack.pools import PoolConfig
from dspex.wire.protocol import Affinity, WorkerState

PREFETCH_YOUNG = 0.010  # seconds: prefetch only behind a call that started this recently
_STRICT_QUEUE = Affinity.STRICT_QUEUE  # (read per call: a member read from its enum class costs ~0.2 µs)


class Clock:
    """The core's time: ``now``, the monotonic time of the event being handled (each of the
    core's public events sets it from the time the shell read for it), and ``wall``, wall-clock
    time, only for what is displayed. The core's rules never read a clock of their own."""

    __slots__ = ("now", "wall")

    def __init__(self, now: float, wall: Callable[[], float]) -> None:
        self.now = now
        self.wall = wall


@dataclass(slots=True)
class Pending:
    """A request from a client, waiting in a queue or running on a worker."""

    client: bytes
    req_id: int
    op: str
    session: str
    header: Any  # the raw header frame, forwarded untouched
    payload: list[Any]
    enqueued: float
    deadline: float
    started: float = 0.0
    owner: str = ""  # the client identity that sent it (its CURVE key; "" on ipc)
    cancelled: bool = False  # its client cancelled it while it ran (B_CANCEL sent to its worker)
    flags: int = 0  # the request header's flags (FLAG_DURABLE matters to the broker)
    sent: int = 0  # its place in what was sent to its worker (WorkerRecord.sent then)

    def outcome(self, ok: bool) -> str:
        """Its outcome label (``dspex_requests_total``) for its worker's reply."""
        return "ok" if ok else "cancelled" if self.cancelled else "error"


class WorkerRecord:
    """One worker incarnation as the broker sees it."""

    __slots__ = (
        "adopted",
        "away",
        "capacity",
        "draining",
        "draining_since",
        "errors",
        "expiry",
        "host",
        "id",
        "incarnation",
        "inflight",
        "last_call",
        "only",
        "pid",
        "pinned",
        "pool",
        "queue",
        "registered",
        "retire_age",
        "sent",
        "served",
        "started",
        "stats",
        "sync",
        "syncing",
    )

    def __init__(self, wid: bytes, pool: Pool, info: dict[str, Any], registered: float, expiry: float) -> None:
        """``registered``: the monotonic time of its READY."""
        self.id = wid
        self.incarnation = wid.decode(errors="replace")
        self.pool = pool
        self.pid = int(info.get("pid", 0))
        self.host = str(info.get("host", ""))
        self.capacity = max(1, int(info.get("capacity", 1)))
        self.inflight: dict[tuple[bytes, int], Pending] = {}
        self.queue: deque[Pending] = deque()  # strict_queue requests pinned here, in order
        # sessions pinned here: a count (their ids in a set cost each idle session ~50 bytes); which
        # they are is a scan of the book, made only when it leaves or sessions spread
        self.pinned = 0
        # the ``touched`` of every session only it ran: one tuple for them all, not one each
        self.only = (wid,)
        self.served = self.errors = 0
        self.registered = registered
        # its process's start on our monotonic clock (max_age counts from it, across our restarts):
        # READY's ``age`` by its own clock (no skew of a host's clock), or an old worker's ``started``
        age, started = info.get("age"), info.get("started")
        age = age if isinstance(age, float | int) else time.time() - started if isinstance(started, float | int) else 0
        self.started = registered - max(0.0, float(age))
        self.expiry = expiry
        self.draining = False
        self.draining_since = 0.0
        # why it is gone if it does not come back by its expiry ("": here): its connection closed
        # just after the broker itself did not run, so it may be renewing its socket
        self.away = ""
        # calls it was running for an earlier broker when it registered (READY's "running"): they
        # hold slots until their replies pass (or its heartbeats say they ended)
        self.adopted = max(0, int(info.get("running", 0)))
        # its last heartbeat's stats; until the first, what READY said of its dspy import
        self.stats: dict[str, Any] = {"preparing": True} if info.get("preparing") else {}
        self.last_call = float("inf")  # seconds from dispatch to reply of its last call (prefetch)
        # back on a new connection, it was asked (B_SYNC number ``sync``) which requests it holds;
        # ``syncing``: those in flight then, until its answer (W_HELD) says which its old connection lost
        self.sync = 0
        self.sent = 0  # requests sent to it
        self.syncing: set[tuple[bytes, int]] = set()
        policy = pool.config.recycle
        jitter = random.uniform(0, policy.age_jitter * policy.max_age) if policy.max_age else 0.0
        self.retire_age = policy.max_age - jitter if policy.max_age else 0.0

    @property
    def free(self) -> int:
        return 0 if self.draining or self.away else self.capacity - len(self.inflight) - self.adopted

    @property
    def ahead(self) -> int:
        """Requests sent to it ahead of a free slot (prefetched): they wait there, not running."""
        return max(0, len(self.inflight) + self.adopted - self.capacity)

    @property
    def state(self) -> WorkerState:
        if self.away:
            return WorkerState.AWAY
        if self.draining:
            return WorkerState.DRAINING
        return WorkerState.BUSY if self.inflight or self.adopted else WorkerState.READY

    def may_prefetch(self, now: float) -> bool:
        """May it be sent a pinned request before its running call ends (``prefetch`` per pool)?

        strict_queue, capacity-1 workers only (strict_fail_fast keeps "busy means busy"; capacity
        > 1 already has slots), and only while its calls are short: its last call took, and its
        running call has so far taken, under ``PREFETCH_YOUNG``. Short calls are where the idle
        broker round trip costs; behind a long call (or on a worker that has not answered yet) the
        request waits in the broker as before (cancellable, a crash says it did not run)."""
        pool = self.pool
        inflight = self.inflight
        # (asked after each reply until it says no, usually for the depth: that first)
        if (not inflight or len(inflight) > pool.config.prefetch or self.last_call >= PREFETCH_YOUNG
                or self.capacity != 1 or pool.mode is not _STRICT_QUEUE or self.draining or self.away
                or self.adopted):
            return False
        for p in inflight.values():  # (a loop: no generator per question)
            if now - p.started >= PREFETCH_YOUNG:
                return False
        return True

    def runs_session(self, session: str) -> bool:
        return any(p.session == session for p in self.inflight.values())

    def can_start(self, session: str) -> bool:
        """A free slot, and nothing of this session running or waiting here (a strict or durable
        session's calls run one at a time, in order; different sessions share the slots)."""
        if self.free <= 0:
            return False
        if self.capacity == 1:
            return not self.queue
        return not self.runs_session(session) and not any(q.session == session for q in self.queue)

    def next_queued(self) -> Pending | None:
        """The first queued request whose session is not running here (FIFO otherwise)."""
        if self.capacity == 1:
            return self.queue.popleft()
        running = {p.session for p in self.inflight.values()}
        for i, p in enumerate(self.queue):
            if p.session not in running:
                del self.queue[i]
                return p
            running.add(p.session)  # a later call of the same session must wait behind this one
        return None


class Pool:
    """A named pool: its settings, live workers, its queues and their rules (bound, saturation,
    queue timeout), and counters."""

    def __init__(self, config: PoolConfig, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.config = config
        self.name = config.name
        self.mode = config.affinity
        self.strict = config.affinity in (Affinity.STRICT_QUEUE, Affinity.STRICT_FAIL_FAST)  # a pin is kept
        self.workers: dict[bytes, WorkerRecord] = {}
        self.queue: deque[Pending] = deque()  # requests any worker (or the first free one) may take
        # strict calls pinned to an incarnation not (yet) registered with a young broker
        self.awaiting: dict[bytes, deque[Pending]] = {}
        # calls of durable sessions being moved to another worker, waiting for their restore
        self.parked: dict[str, deque[Pending]] = {}
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (op, outcome) -> count
        self.latencies: deque[float] = deque(maxlen=4096)
        self.latency = Histogram(bounds)  # dispatch to reply
        self.queue_wait = Histogram(bounds)  # arrival to dispatch
        self.recycles = 0
        self.crashes = 0
        # the same by how the worker left (``broker.roster.why_label``)
        self.recycles_by: dict[str, int] = {}
        self.crashes_by: dict[str, int] = {}
        self.starts = 0  # incarnations that registered with this broker
        self.saturated = 0  # requests refused with pool_saturated
        self.queue_timeouts = 0  # requests that waited past queue_timeout
        self.sessions_expired = 0  # sessions closed by their idle TTL
        self.recent = RecentFailures(config.health_window)  # what the pool's health is judged on
        self.checkpoint_error = ""  # why the checkpoint store last refused a session of the pool (its WARN says)
        self.rolling: deque[bytes] = deque()  # workers waiting for a rolling recycle
        self.recycling: bytes | None = None  # the worker being recycled now
        self.recycle_policy = ""  # the policy rule that retires it ("": an operator's recycle)
        self.recycle_started = 0.0
        self.size_before_recycle = 0

    @property
    def queued(self) -> int:
        """Requests waiting anywhere in the pool (bounded by ``queue_max``), prefetched ones
        waiting at their worker included. Counted from the queues themselves, so no code path
        can let it drift."""
        n = len(self.queue)
        for w in self.workers.values():  # (asked per enqueue: one pass, no generators or calls)
            ahead = len(w.inflight) + w.adopted - w.capacity  # (w.ahead)
            n += len(w.queue) + ahead if ahead > 0 else len(w.queue)
        for q in self.awaiting.values():
            n += len(q)
        for q in self.parked.values():
            n += len(q)
        return n

    def queues(self) -> list[deque[Pending]]:
        """Every queue of the pool: its own, its workers', those awaiting a re-registration and
        those of durable sessions being moved."""
        return [self.queue, *(w.queue for w in self.workers.values()), *self.awaiting.values(), *self.parked.values()]

    def admit(self, queue: deque[Pending], p: Pending) -> bool:
        """Queue ``p`` in one of the pool's queues, unless they hold ``queue_max`` requests in all
        (False: the pool is saturated, counted)."""
        if self.queued >= self.config.queue_max:
            self.saturated += 1
            return False
        queue.append(p)
        return True

    def expire(self, now: float) -> list[tuple[Pending, bool]]:
        """Take what waited past the pool's queue timeout (counted) or past its own call deadline
        (True: its caller gave up already) from the heads of the pool's, its workers' and its moving
        sessions' queues."""
        limit = self.config.queue_timeout
        out = []
        for queue in self._expiring():
            # (as next_expiry says: at the deadline itself, the same sum)
            while queue and (now >= queue[0].enqueued + limit or now >= queue[0].deadline):
                p = queue.popleft()
                gave_up = now >= p.deadline
                if not gave_up:
                    self.queue_timeouts += 1
                out.append((p, gave_up))
        return out

    def take(self, client: bytes, req_id: int) -> Pending | None:
        """Take request ``req_id`` of ``client`` out of whichever queue holds it."""
        for queue in self.queues():
            for p in queue:
                if p.client == client and p.req_id == req_id:
                    queue.remove(p)
                    return p
        return None

    def take_session(self, session: str) -> list[Pending]:
        """Take every queued call of ``session`` (it closed, or lost its worker)."""
        return self._take_all(lambda p: p.session == session)

    def take_client(self, client: bytes) -> list[Pending]:
        """Take every queued request of ``client`` (its connection closed)."""
        return self._take_all(lambda p: p.client == client)

    def _take_all(self, matches: Callable[[Pending], bool]) -> list[Pending]:
        taken = []
        for queue in self.queues():
            mine = [p for p in queue if matches(p)]
            for p in mine:
                queue.remove(p)
            taken += mine
        return taken

    def take_awaiting(self) -> list[tuple[bytes, Pending]]:
        """Take the calls that waited for a worker to re-register: ``(worker id, request)``."""
        awaiting, self.awaiting = self.awaiting, {}
        return [(wid, p) for wid, queue in awaiting.items() for p in queue]

    def next_expiry(self) -> float:
        """When the first request waiting in the pool's or its workers' queues times out (or its
        caller's deadline passes): what ``expire`` takes next."""
        limit = self.config.queue_timeout
        soonest = math.inf
        for queue in self._expiring():
            if queue:
                soonest = min(soonest, queue[0].enqueued + limit, queue[0].deadline)
        return soonest

    def _expiring(self) -> list[deque[Pending]]:
        """The queues whose requests time out there (awaiting ones wait out the restart grace)."""
        if self.parked:
            return [self.queue, *(w.queue for w in self.workers.values()), *self.parked.values()]
        return [self.queue, *(w.queue for w in self.workers.values())]

    def next_drain_deadline(self) -> float:
        """When the first of the pool's draining workers is past its drain deadline."""
        limit = self.config.drain_timeout
        return min((w.draining_since + limit for w in self.workers.values() if w.draining), default=math.inf) \
            if limit else math.inf

    def observe(self, op: str, outcome: str | None, seconds: float) -> None:
        """``outcome`` None: counted when its caller gets the answer (a durable call's reply waits
        for its checkpoint, which may be refused: then its outcome is ``session_not_durable``)."""
        if outcome is not None:
            self.outcomes[(op, outcome)] += 1
        self.latencies.append(seconds)
        self.latency.observe(seconds)

    def least_loaded(self) -> WorkerRecord | None:
        """Fewest pinned sessions, then idle first: spreads new sessions over the pool. Never a
        worker that is draining or waits for its turn in a rolling recycle (its sessions would
        lose it moments later): with none left, the session waits for a replacement."""
        best: WorkerRecord | None = None
        best_key: tuple[int, int, int] | None = None
        for w in self.workers.values():
            if w.draining or w.id in self.rolling:
                continue
            key = (w.pinned, 0 if w.free > 0 else 1, len(w.inflight))
            if best_key is None or key < best_key:
                best, best_key = w, key
        return best

    def idle_worker(self) -> WorkerRecord | None:
        best: WorkerRecord | None = None
        for w in self.workers.values():
            if w.free > 0 and (best is None or len(w.inflight) < len(best.inflight)):
                best = w
        return best

    def ready_count(self) -> int:
        """Workers that run calls now or soon: not draining, their dspy import over."""
        return sum(1 for w in self.workers.values() if not w.draining and not w.stats.get("preparing"))


@dataclass(slots=True)
class Durability:
    """What the broker knows of a durable session's checkpoints (kept by ``broker.durable``)."""

    needs_full: bool = False  # the store may lack its worker's last checkpoint (a broker restart)
    forgotten: bool = False  # opened for a pin a client claims: a session of an earlier broker not in the store
    # a move to another worker: "" (none), "waiting" (for its call on the old worker to answer),
    # "loading" (the store reads its checkpoint), "ready" (loaded; no worker to take it yet),
    # "spread" (pinned to a worker holding fewer sessions: its checkpoint loads at its next call).
    # Its calls wait in the pool's ``parked`` meanwhile.
    move: str = ""
    off: str = ""  # why it is no longer durable (over a cap, the store failed): a plain session now
    restore: list[Any] | None = None  # [restore meta, skeleton?, *blobs] for its next dispatch
    restore_to: bytes | None = None  # ...to this worker
    submitted: int = 0  # checkpoint writes handed to the store
    done: int = 0  # ...and finished (in order)
    # (writes before it, key, reply, (pool, op, outcome): counted when it goes)
    held: deque[tuple[int, tuple[bytes, int], list[Any], tuple[Any, str, str]]] = field(default_factory=deque)
    refused: dict[tuple[bytes, int], Any] = field(default_factory=dict)  # request -> error replacing its reply
    # its last checkpoint leaves out objects its worker holds, or the store could not give it back to a
    # spread: not moved but by need, until its next stored checkpoint says otherwise
    partial: bool = False
    spread_from: bytes | None = None  # a spread (move "spread"): pinned to its new worker; the old one holds it until the restore
    bytes: int = 0  # of its last stored checkpoint
    stored: float = 0.0  # wall time of its last stored checkpoint (0: none yet)
    used: float = 0.0  # wall time of its last use the store keeps (for a restarted broker's TTL)
    seq: int = 0  # of its last stored checkpoint


@dataclass(slots=True)
class SessionRecord:
    id: str
    pool: str  # one of the core's pools: a session is opened by a call routed there, or loaded for one
    created: float  # wall-clock time (displayed)
    # idle time counts from the end of the last call: set when a call is routed and again when
    # its reply passes, so a call longer than the TTL never expires its own session (monotonic)
    last_used: float
    worker: bytes | None = None
    calls: int = 0
    owner: str = ""  # the client identity that opened it (CURVE key; "" on ipc: one uid)
    # every worker that may hold its state (a tuple, most often its worker's shared ``only``: a set
    # would cost each idle session 216 bytes)
    touched: tuple[bytes, ...] = ()
    closing: str = ""  # closed while a call ran: why; released when its last call ends
    durable: Durability | None = None  # a durable session's checkpoint bookkeeping (broker/durable.py)

    def touch(self, w: WorkerRecord) -> None:
        """``w`` may hold its state from now on (it gets its release)."""
        if w.id not in self.touched:
            self.touched = (*self.touched, w.id) if self.touched else w.only


class Tombstones:
    """Ids of closed and expired sessions (bounded), so a late call answers ``SessionClosed``
    instead of silently opening a fresh namespace under the same id; and of sessions whose pinned
    worker left (``worker`` set), which answer ``SessionWorkerUnavailable`` instead."""

    def __init__(self, limit: int = 100_000) -> None:
        self._why: OrderedDict[str, tuple[str, bytes, str]] = OrderedDict()
        self._limit = limit

    def add(self, session: str, why: str, worker: bytes = b"", lost: str = "") -> None:
        self._why[session] = (why, worker, lost)
        self._why.move_to_end(session)
        if len(self._why) > self._limit:
            self._why.popitem(last=False)

    def get(self, session: str) -> tuple[str, bytes, str] | None:
        """(why it ended, the worker it lost: b"" for a session closed or expired, why a durable
        session's checkpoint could not be restored: "" for any other), or None: no tombstone."""
        return self._why.get(session)

    def __len__(self) -> int:
        return len(self._why)


class GoneWorkers:
    """Why recent incarnations left, so errors can say "crashed" or "recycled", and whether they
    crashed (a session's lost worker is then the service's failure, not an operator's recycle)."""

    def __init__(self, limit: int = 10_000) -> None:
        self._why: OrderedDict[bytes, tuple[str, bool]] = OrderedDict()
        self._limit = limit

    def add(self, wid: bytes, why: str, crashed: bool = False) -> None:
        self._why[wid] = (why, crashed)
        if len(self._why) > self._limit:
            self._why.popitem(last=False)

    def why(self, wid: bytes) -> str:
        return self._why.get(wid, ("is not registered with this broker", True))[0]

    def crashed(self, wid: bytes) -> bool:
        """True also for an incarnation this broker never knew (it did not come back)."""
        return self._why.get(wid, ("", True))[1]

    def __contains__(self, wid: object) -> bool:
        return wid in self._why


class Notices:
    """Counts of repeated events (a pool refusing or timing out requests) turned into at most
    one log line per key every ``every`` seconds: the first event of a quiet spell is reported
    at once, the rest of the window as one count when it ends (``due``)."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._count: dict[tuple[str, str], int] = {}
        self._since: dict[tuple[str, str], float] = {}  # when the key last logged

    def note(self, key: tuple[str, str], now: float) -> int:
        """Count one event; the number to log now (0: folded into a later line)."""
        last = self._since.get(key)
        if last is None or now - last >= self.every:
            self._since[key] = now
            return self._count.pop(key, 0) + 1
        self._count[key] = self._count.get(key, 0) + 1
        return 0

    def next_due(self) -> float:
        """When the first window with events left unlogged ends (inf: none)."""
        if not self._count:  # (asked on every turn of the broker's loop: the usual case first)
            return math.inf
        return min(self._since[key] + self.every for key in self._count)

    def due(self, now: float) -> list[tuple[tuple[str, str], int, float]]:
        """(key, count, seconds covered) for every window that ended with events left unlogged."""
        out: list[tuple[tuple[str, str], int, float]] = []
        if not self._count:  # (asked on every turn of the broker's loop: the usual case first)
            return out
        for key, n in list(self._count.items()):
            since = self._since[key]
            if now - since >= self.every:
                out.append((key, n, now - since))
                del self._count[key]
                self._since[key] = now
        return out
