"""Frame fuzzing of a live broker: mutated and random frames at the frontend and the backend
while honest sessions keep working.

    python -m tests.harness.fuzz --cases 1000000 [--seed 1] [--batch 1000]

A seeded generator (``FrameFuzzer``) makes each case: random frames, wrong frame counts, wrong
op codes and field types, truncated msgpack, huge lengths in msgpack headers, depth bombs,
valid frames in the wrong order, worker commands on the frontend and broker commands on the
backend, mutated request payloads, stream control for unknown requests, W_REPLY/W_PARTIAL for
requests the broker never sent, W_READY for unknown pools or with malformed info, and, rarely,
frames over the size limit. Mutated payloads that still decode are only sent when they cannot
run anything but a harmless allow-listed call (or must fail on an unknown ref first), so the
fuzzer never makes a worker run arbitrary code.

Between batches the runner checks the honest side: sessions opened before fuzzing still answer
from the same pid with their worker-side state intact (a per-session counter), a sessionless
call and a brand-new session work, and every worker is still registered. It reads the broker's
and workers' VmRSS after a warm-up and at the end. Identity claims (a second DEALER with a live
worker's ROUTING_ID) and request ids reused while in flight (``--dup-ids``) are left out of
the default mix because they break honest sessions today (docs/reliability.md, fixes 1 and 9);
tests/test_fuzz.py pins them with xfail tests.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

import dspex
from dspex.wire import codec
from dspex.wire.headers import RequestHeader, pack_reply_envelope, pack_reply_header
from dspex.wire.ops import Op
from dspex.wire.protocol import (
    B_CANCEL,
    B_CREDIT,
    B_DISCONNECT,
    B_HEARTBEAT,
    B_RELEASE_SESSION,
    B_REQUEST,
    B_REREGISTER,
    FLAG_STREAM,
    W_DISCONNECT,
    W_HEARTBEAT,
    W_PARTIAL,
    W_READY,
    W_REPLY,
)
from dspex.wire.ref import Ref
from tests.harness.procs import rss_kb, short_tmpdir, wait_for
from tests.harness.stack import Stack

POOLS = ("fz_strict:strict_queue:session_ttl=5", "fz_hint:hint:session_ttl=5")
WORKER_OPS = [o.value for o in (Op.CALL, Op.METHOD, Op.GETATTR, Op.SETATTR, Op.EVAL, Op.EXEC, Op.RELEASE,
                                Op.TO_DATA)]
ALL_OPS = [o.value for o in Op]
SAFE_CALLS = {("os", "getpid"), ("builtins", "len"), ("builtins", "abs"), ("math", "sqrt")}
SAFE_BODIES = {  # exact bodies allowed for code-running ops; never mutated
    Op.EVAL.value: [["1 + 1", {}], ["len(x)", {"x": [1, 2, 3]}]],
    Op.EXEC.value: [["y = 2", {}]],
}
HUGE_PREFIXES = [
    b"\xdb\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff", b"\xda\xff\xff", b"\xc6\xff\xff\xff\xff",
    b"\xdd\xff\xff\xff\xff", b"\xdd\x40\x00\x00\x00", b"\xdf\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x0a",
    b"\xc7\xff\x0c", b"\xd9\xff", b"\xdc\xff\xff",
]


@dataclass
class Case:
    side: str  # "front" | "back"
    kind: str
    frames: list[bytes]
    sock: int = 0  # which fuzz socket of that side sends it


class FrameFuzzer:
    """Seeded generator of hostile frame sets."""

    FRONT_KINDS = ("random", "hdr_fields", "hdr_types", "bad_op", "truncated", "huge_len", "depth",
                   "payload", "order", "broker_op", "stream_op", "oversize")
    BACK_KINDS = ("random", "ready_bad", "reply_unsent", "heartbeat", "disconnect", "broker_cmds", "order",
                  "oversize")
    FRONT_WEIGHTS = (10, 10, 10, 8, 10, 8, 3, 25, 6, 5, 5, 0.05)
    BACK_WEIGHTS = (12, 10, 12, 6, 4, 6, 6, 0.05)

    def __init__(self, seed: int, pools: list[str], max_message: int, front_socks: int = 4,
                 back_socks: int = 4, dup_ids: bool = False) -> None:
        self.rng = random.Random(seed)
        # Reusing a request id while it is in flight wedges a worker today (docs/reliability.md,
        # fix 9); off by default so that the honest-session checks test everything else.
        self.dup_ids = dup_ids
        self.pools = pools
        self.max_message = max_message
        self.front_socks = front_socks
        self.back_socks = back_socks
        self.req_id = 1

    # -- pieces ------------------------------------------------------------------------------
    def _s(self, n: int = 12) -> str:
        return "".join(self.rng.choice("abcdefxyz0123456789_:") for _ in range(self.rng.randrange(n)))

    def _obj(self, depth: int = 0) -> Any:
        r = self.rng
        c = r.randrange(11 if depth < 3 else 7)
        if c == 0:
            return None
        if c == 1:
            return r.random() < 0.5
        if c == 2:
            return r.choice([0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, r.randrange(-1000, 1000)])
        if c == 3:
            return r.choice([0.0, float("nan"), float("inf"), r.random()])
        if c == 4:
            return self._s()
        if c == 5:
            return r.randbytes(r.randrange(8))
        if c == 6:
            return r.choice(self.pools + ALL_OPS + ["", "nope"])
        if c == 7:
            return [self._obj(depth + 1) for _ in range(r.randrange(4))]
        if c == 8:
            return {self._s(4): self._obj(depth + 1) for _ in range(r.randrange(3))}
        if c == 9:
            return msgpack.ExtType(r.randrange(0, 20), r.randbytes(r.randrange(6)))
        return r.choice(self.pools)

    def _packb(self, obj: Any) -> bytes:
        try:
            return msgpack.packb(obj)
        except Exception:  # noqa: BLE001 - e.g. an ExtType code msgpack refuses
            return b"\xc1"

    def _header(self, op: str | None = None, pool: str | None = None, session: str | None = None) -> RequestHeader:
        r = self.rng
        self.req_id += 1
        return RequestHeader(
            op if op is not None else r.choice(ALL_OPS),
            (r.choice([0, -5, 2**63 - 1, 2**64 - 1]) if self.dup_ids else
             r.choice([-self.req_id, 2**63 - self.req_id, 2**64 - self.req_id])) if r.random() < 0.1 else self.req_id,
            pool if pool is not None else r.choice(self.pools + ["nope", ""]),
            session if session is not None else r.choice(["", self._s(24), "fz" + self._s(8)]),
            r.choice(["", "", self._s(32)]),
            r.choice([0, 2000, -1, 2**62, 1]),
            r.choice([0, 0, FLAG_STREAM, -1, 7]),
        )

    def _mutate(self, data: bytes) -> bytes:
        r = self.rng
        b = bytearray(data)
        for _ in range(r.randrange(1, 4)):
            op = r.randrange(5)
            if op == 0 and b:
                b[r.randrange(len(b))] = r.randrange(256)
            elif op == 1:
                del b[r.randrange(len(b) + 1):]
            elif op == 2:
                i = r.randrange(len(b) + 1)
                b[i:i] = r.randbytes(r.randrange(1, 6))
            elif op == 3 and b:
                i = r.randrange(len(b))
                del b[i:i + r.randrange(1, 4)]
            elif op == 4:
                i = r.randrange(len(b) + 1)
                b[i:i] = r.choice(HUGE_PREFIXES)
        return bytes(b)

    def _random_ref(self) -> Ref:
        return Ref(os.urandom(16).hex(), self._s(16), self.rng.choice(self.pools), os.urandom(16).hex(), "object", "x")

    def _body(self, op: str) -> list[Any]:
        r = self.rng
        if op in SAFE_BODIES:
            return r.choice(SAFE_BODIES[op])
        if op == Op.CALL.value:
            m, f = r.choice(sorted(SAFE_CALLS))
            return [m, f, r.choice([[], [[1, 2]], [4], [-3]]), {}]
        if op == Op.RELEASE.value:
            return [[os.urandom(16).hex() for _ in range(r.randrange(3))]]
        target = self._random_ref()
        return {Op.METHOD.value: [target, "__len__", [], {}], Op.GETATTR.value: [target, "x"],
                Op.SETATTR.value: [target, "x", 1], Op.TO_DATA.value: [target]}.get(op, [target])

    @staticmethod
    def safe_payload(op: str, frames: list[bytes]) -> bool:
        """Whether a (possibly mutated) payload can only run an allow-listed harmless call."""
        try:
            body = codec.decode(frames)
        except Exception:  # noqa: BLE001 - undecodable: the worker answers protocol_error
            return True
        if not isinstance(body, (list, tuple)):
            return True
        if op in SAFE_BODIES:
            return list(body) in SAFE_BODIES[op]
        if op == Op.CALL.value:
            if len(body) < 2:
                return True
            if len(body) > 4 or not isinstance(body[0], str) or not isinstance(body[1], str):
                return True  # the worker refuses before calling anything
            if (body[0], body[1]) not in SAFE_CALLS:
                return False
            args = body[2] if len(body) > 2 else []
            return isinstance(args, (list, tuple)) and all(
                (isinstance(a, int) and abs(a) < 10**6) or (isinstance(a, (list, tuple)) and len(a) < 100)
                for a in args)
        if op in (Op.METHOD.value, Op.GETATTR.value, Op.SETATTR.value, Op.TO_DATA.value):
            return bool(body) and isinstance(body[0], Ref)  # an unknown ref fails before anything runs
        if op == Op.RELEASE.value:
            return True
        return op not in WORKER_OPS

    # -- cases -------------------------------------------------------------------------------
    def case(self) -> Case:
        r = self.rng
        if r.random() < 0.65:
            kind = r.choices(self.FRONT_KINDS, self.FRONT_WEIGHTS)[0]
            frames = getattr(self, "_front_" + kind)()
            return Case("front", kind, frames, r.randrange(self.front_socks))
        kind = r.choices(self.BACK_KINDS, self.BACK_WEIGHTS)[0]
        frames = getattr(self, "_back_" + kind)()
        return Case("back", kind, frames, r.randrange(self.back_socks))

    def cases(self, n: int) -> Iterator[Case]:
        for _ in range(n):
            yield self.case()

    def _random_frames(self) -> list[bytes]:
        r = self.rng
        return [r.randbytes(r.randrange(0, 64)) for _ in range(r.randrange(0, 6))]

    def _front_random(self) -> list[bytes]:
        return self._random_frames()

    def _front_hdr_fields(self) -> list[bytes]:
        r = self.rng
        hdr = self._packb([self._obj() for _ in range(r.randrange(0, 11))])
        return [hdr] + ([self._packb(self._obj())] if r.random() < 0.5 else [])

    def _front_hdr_types(self) -> list[bytes]:
        fields = list(msgpack.unpackb(self._header().pack()))
        fields[self.rng.randrange(len(fields))] = self._obj()
        return [self._packb(fields), codec.encode([])[0]]

    def _front_bad_op(self) -> list[bytes]:
        r = self.rng
        op = r.choice([self._s(10), "CALL", "call ", "", "status\x00", "w_reply", "\u00e9val"])
        h = self._header(op=op)
        return [h.pack()] + [self._packb(self._obj()) for _ in range(r.randrange(3))]

    def _front_truncated(self) -> list[bytes]:
        r = self.rng
        data = self._header(op=r.choice(WORKER_OPS)).pack()
        return [data[: r.randrange(len(data))], self._packb([1])]

    def _front_huge_len(self) -> list[bytes]:
        r = self.rng
        prefix = r.choice(HUGE_PREFIXES)
        where = r.randrange(3)
        if where == 0:  # the header itself
            return [prefix + r.randbytes(r.randrange(8))]
        if where == 1:  # a field inside an otherwise valid-looking header
            return [b"\x97\xa4call\x01" + prefix + r.randbytes(r.randrange(8))]
        h = self._header(op=r.choice(WORKER_OPS), pool=r.choice(self.pools))
        return [h.pack(), prefix + r.randbytes(r.randrange(8))]  # the payload (worker decodes it)

    def _front_depth(self) -> list[bytes]:
        r = self.rng
        n = r.choice([100, 1000, 5000, 100_000])
        bomb = b"\x91" * n + b"\xc0"
        if r.random() < 0.5:
            return [bomb]
        return [self._header(op=Op.CALL.value, pool=r.choice(self.pools)).pack(), bomb]

    def _front_payload(self) -> list[bytes]:
        r = self.rng
        op = r.choice(WORKER_OPS)
        h = self._header(op=op, pool=r.choice(self.pools + ["nope"]))
        frames = [bytes(f) for f in codec.encode(self._body(op))]
        if op not in SAFE_BODIES and r.random() < 0.8:
            for _ in range(10):
                mutated = [self._mutate(frames[0])] + frames[1:]
                if self.safe_payload(op, mutated):
                    frames = mutated
                    break
        if r.random() < 0.1:
            frames.append(r.randbytes(r.randrange(16)))  # an extra frame the body does not point at
        return [h.pack(), *frames]

    def _front_order(self) -> list[bytes]:
        r = self.rng
        h = self._header(op=r.choice(WORKER_OPS), pool=r.choice(self.pools)).pack()
        body = codec.encode(["os", "getpid", [], {}])[0]
        choice = r.randrange(5)
        if choice == 0:
            return [body, h]
        if choice == 1:
            return [h, h, body]
        if choice == 2:
            return [r.choice([W_READY, W_REPLY, W_HEARTBEAT, W_DISCONNECT, W_PARTIAL]), h, body]
        if choice == 3:
            return [pack_reply_header("ok", 1), body]
        return [h] * r.randrange(2, 12)

    def _front_broker_op(self) -> list[bytes]:
        r = self.rng
        op = r.choice([Op.STATUS.value, Op.SESSIONS.value, Op.PING.value, Op.CLOSE_SESSION.value, Op.RECYCLE.value])
        args: Any = r.choice([{}, self._obj(), {"pool": self._obj(), "session": self._obj(), "worker": self._obj()}])
        if op == Op.RECYCLE.value:  # never recycle the honest pools' workers
            args = {"pool": "nope_" + self._s(4), "worker": self._obj(), "all": r.random() < 0.5}
            return [self._header(op=op, pool="nope_" + self._s(4)).pack(), self._packb(args)]
        if op == Op.CLOSE_SESSION.value and isinstance(args, dict):
            args["session"] = "fz" + self._s(8)  # never an honest session
            return [self._header(op=op, session=str(args["session"])).pack(), self._packb(args)]
        return [self._header(op=op).pack()] + ([self._packb(args)] if r.random() < 0.8 else [])

    def _front_stream_op(self) -> list[bytes]:
        r = self.rng
        op = r.choice([Op.CANCEL.value, Op.CREDIT.value])
        h = RequestHeader(op, r.randrange(0, 2**20), r.choice(self.pools + ["nope"]), self._s(8))
        return [h.pack()] + ([self._packb(self._obj())] if r.random() < 0.8 else [])

    def _front_oversize(self) -> list[bytes]:
        return [self._header(op=Op.CALL.value).pack(), b"\x00" * (self.max_message + 1)]

    def _back_random(self) -> list[bytes]:
        return self._random_frames() or [b""]

    def _back_ready_bad(self) -> list[bytes]:
        r = self.rng
        choice = r.randrange(6)
        if choice == 0:
            info: Any = {"pool": "nope_" + self._s(6), "pid": r.randrange(1, 99999), "capacity": 1}
        elif choice == 1:
            info = {"pool": self._obj()}  # never a real pool name unless by luck: see below
        elif choice == 2:
            info = self._obj()
        elif choice == 3:
            info = {"pid": 1}
        elif choice == 4:  # a real pool but an unusable record: must be refused
            info = {"pool": r.choice(self.pools), "pid": r.choice(["x", [1], None, 1.5e300]),
                    "capacity": r.choice(["many", [2], float("inf")])}
        else:
            return [W_READY] + ([self._mutate(self._packb({"pool": "nope", "pid": 1}))] if r.random() < 0.8 else [])
        if isinstance(info, dict) and info.get("pool") in self.pools and choice != 4:
            info["pool"] = "nope"
        return [W_READY, self._packb(info)]

    def _back_reply_unsent(self) -> list[bytes]:
        r = self.rng
        client = r.choice([b"c" + r.randbytes(15), r.randbytes(r.randrange(0, 20)), b""])
        head = r.choice([pack_reply_header(r.choice(["ok", "err", "part", "prog", "zz"]), r.randrange(0, 2**20),
                                           self._s(32), r.choice(self.pools)),
                         self._packb(self._obj()), r.randbytes(r.randrange(6))])
        cmd = r.choice([W_REPLY, W_PARTIAL])
        first = r.choice([pack_reply_envelope(cmd, r.choice(["ok", "err"]), r.randrange(0, 2**20), client),
                          pack_reply_envelope(cmd, "ok", r.randrange(0, 2**64), client)[:r.randrange(0, 12)],
                          cmd, cmd + r.randbytes(r.randrange(0, 24))])
        frames = [first, head]
        frames += [self._packb(self._obj()) for _ in range(r.randrange(3))]
        return frames[: r.randrange(1, len(frames) + 1)] if r.random() < 0.2 else frames

    def _back_heartbeat(self) -> list[bytes]:
        r = self.rng
        return [W_HEARTBEAT] + ([r.choice([self._packb(self._obj()), r.randbytes(8), self._packb({"rss": "x"})])]
                                if r.random() < 0.7 else [])

    def _back_disconnect(self) -> list[bytes]:
        return [W_DISCONNECT] + ([self.rng.randbytes(4)] if self.rng.random() < 0.3 else [])

    def _back_broker_cmds(self) -> list[bytes]:
        r = self.rng
        cmd = r.choice([B_REQUEST, B_HEARTBEAT, B_DISCONNECT, B_RELEASE_SESSION, B_REREGISTER, B_CANCEL, B_CREDIT])
        return [cmd] + [self._packb(self._obj()) for _ in range(r.randrange(4))]

    def _back_order(self) -> list[bytes]:
        r = self.rng
        h = self._header(op=Op.CALL.value, pool=r.choice(self.pools)).pack()
        return r.choice([[W_REPLY], [W_REPLY, b"c" + r.randbytes(15)], [h, W_READY], [W_READY, W_READY],
                         [W_HEARTBEAT, W_REPLY, h], [self._packb({"pool": "nope"}), W_READY]])

    def _back_oversize(self) -> list[bytes]:
        return [W_HEARTBEAT, b"\x00" * (self.max_message + 1)]


# -- a live stack ------------------------------------------------------------------------------
class ProcStack(Stack):
    """The fuzzing target: a broker with ``pools`` and ``workers`` dspy-free workers per pool,
    started at once (the harness's :class:`Stack`, with a message size limit)."""

    def __init__(self, root: str, pools: tuple[str, ...] = POOLS, workers: int = 1, max_message: int = 1 << 20,
                 broker_args: tuple[str, ...] = (), heartbeat: float = 0.5) -> None:
        super().__init__(root, heartbeat=heartbeat, liveness=3)
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        self.pools = [p.split(":")[0] for p in pools]
        self.max_message = max_message
        self.n_workers = workers
        self.env["DSPEX_MAX_MESSAGE"] = str(max_message)
        try:
            self.start_broker(*pools, extra=list(broker_args))
            for p in self.pools:
                for _ in range(workers):
                    self.start_worker(p, "--no-dspy")
        except BaseException:
            self.close()
            raise

    def wait_ready(self, timeout: float = 20.0) -> None:
        wait_for(lambda: all(len(w) >= self.n_workers for w in (self.registered().get(p, []) for p in self.pools)),
                 timeout, 0.05, f"every fuzz pool's workers registered (logs in {self.root})")


# -- the run -----------------------------------------------------------------------------------
HONEST_INIT = "import os\nn = [0]\ndef _tick():\n    n[0] += 1\n    return (os.getpid(), n[0])\n"


@dataclass
class FuzzResult:
    cases: int = 0
    by_kind: collections.Counter[str] = field(default_factory=collections.Counter)
    replies: collections.Counter[str] = field(default_factory=collections.Counter)  # frontend reply codes
    malformed_replies: int = 0
    honest_checks: int = 0
    honest_failures: list[str] = field(default_factory=list)
    broker_rss_kb: list[int] = field(default_factory=list)  # [start, after warm-up, end]
    worker_rss_kb: list[int] = field(default_factory=list)  # max over workers: [after warm-up, end]
    broker_counters: dict[str, Any] = field(default_factory=dict)
    broker_sessions_end: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["by_kind"] = dict(sorted(self.by_kind.items()))
        d["replies"] = dict(sorted(self.replies.items()))
        d["honest_failures"] = self.honest_failures[:20]
        d["cases_per_s"] = round(self.cases / self.seconds) if self.seconds else 0
        return d


class Honest:
    """Sessions opened before the fuzzing; each check must find them untouched."""

    def __init__(self, dx: dspex.Client, pools: list[str], per_pool: int = 2) -> None:
        self.dx = dx
        self.sessions: list[tuple[dspex.Session, int, int]] = []  # session, pid, expected count
        for pool in pools:
            for _ in range(per_pool):
                s = dx.session(pool)
                s.exec(HONEST_INIT)
                pid, n = s.eval("_tick()")
                self.sessions.append((s, int(pid), int(n)))

    def check(self, pools: list[str]) -> list[str]:
        problems = []
        for i, (s, pid, n) in enumerate(self.sessions):
            try:
                got_pid, got_n = s.eval("_tick()", timeout=10)
            except dspex.DspexError as err:
                problems.append(f"honest session {s.id[:8]} on {s.pool}: {err.code}: {err}")
                continue
            if s.pool.startswith("fz_strict") and (got_pid != pid or got_n != n + 1):
                problems.append(f"honest session {s.id[:8]}: pid {pid}->{got_pid}, count {n}->{got_n}")
            self.sessions[i] = (s, pid, int(got_n) if got_pid == pid else n)
        for pool in pools:
            try:
                self.dx.call("os", "getpid", pool=pool, timeout=10)
                s = self.dx.session(pool)
                s.call("os", "getpid", timeout=10)
                s.close()
            except dspex.DspexError as err:
                problems.append(f"fresh call on {pool}: {err.code}: {err}")
        return problems


def run_fuzz(stack: ProcStack, cases: int, seed: int = 1, batch: int = 1000, warmup_batches: int = 2,
             dup_ids: bool = False, progress: Any = None) -> FuzzResult:
    res = FuzzResult()
    fz = FrameFuzzer(seed, stack.pools, stack.max_message, dup_ids=dup_ids)
    ctx = zmq.Context()
    front: list[zmq.Socket[Any]] = []
    back: list[zmq.Socket[Any]] = []
    try:
        for i in range(fz.front_socks):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            s.connect(stack.frontend)
            front.append(s)
        for i in range(fz.back_socks):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.ROUTING_ID, b"fz-%d-%s" % (i, os.urandom(4).hex().encode()))
            s.connect(stack.backend)
            back.append(s)
        res.broker_rss_kb.append(rss_kb(stack.broker.pid))
        with dspex.connect(stack.frontend, timeout=10) as dx:
            honest = Honest(dx, stack.pools)
            t0 = time.monotonic()
            sent = 0
            nbatch = 0
            while sent < cases:
                n = min(batch, cases - sent)
                for case in fz.cases(n):
                    socks = front if case.side == "front" else back
                    res.by_kind[f"{case.side}:{case.kind}"] += 1
                    if not case.frames:
                        res.by_kind["send_refused"] += 1  # zmq cannot send a message of no frames
                        continue
                    try:
                        socks[case.sock].send_multipart(case.frames, zmq.NOBLOCK)
                    except zmq.ZMQError:
                        res.by_kind["send_refused"] += 1  # e.g. an empty message zmq will not send
                sent += n
                res.cases = sent
                _drain(front, back, res)
                problems = honest.check(stack.pools)
                res.honest_checks += 1
                if problems:
                    res.honest_failures.extend(f"after {sent} cases: {p}" for p in problems)
                    if len(res.honest_failures) > 20:
                        break
                nbatch += 1
                if nbatch == warmup_batches:
                    res.broker_rss_kb.append(rss_kb(stack.broker.pid))
                    res.worker_rss_kb.append(max(rss_kb(w.pid) for w in stack.worker_procs))
                if progress is not None and nbatch % 50 == 0:
                    progress(f"{sent} cases, broker RSS {rss_kb(stack.broker.pid)} kB, "
                             f"honest failures {len(res.honest_failures)}")
            res.seconds = time.monotonic() - t0
            reg = stack.registered()
            for pool in stack.pools:
                if len(reg.get(pool, [])) != stack.n_workers:
                    res.honest_failures.append(f"pool {pool} has {len(reg.get(pool, []))} workers at the end")
            st = dx.status()
            res.broker_counters = {k: st["broker"].get(k) for k in ("garbage_frontend", "garbage_backend")}
            res.broker_sessions_end = int(st["broker"]["sessions"])
        if len(res.broker_rss_kb) < 2:
            res.broker_rss_kb.append(res.broker_rss_kb[0])
            res.worker_rss_kb.append(max(rss_kb(w.pid) for w in stack.worker_procs))
        res.broker_rss_kb.append(rss_kb(stack.broker.pid))
        res.worker_rss_kb.append(max(rss_kb(w.pid) for w in stack.worker_procs))
    finally:
        for s in front + back:
            s.close(0)
        ctx.term()
    return res


def _drain(front: list[zmq.Socket[Any]], back: list[zmq.Socket[Any]], res: FuzzResult, quiet: float = 0.05,
           limit: float = 10.0) -> None:
    """Read replies until every fuzz socket has been quiet for ``quiet`` seconds."""
    poller = zmq.Poller()
    for s in front + back:
        poller.register(s, zmq.POLLIN)
    end = time.monotonic() + limit
    while time.monotonic() < end:
        events = dict(poller.poll(int(quiet * 1000)))
        if not events:
            return
        for s in front:
            if s in events:
                while True:
                    try:
                        reply = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        status, _, _, _ = msgpack.unpackb(reply[0])
                        code = status if status != "err" else msgpack.unpackb(reply[1], strict_map_key=False)["code"]
                        res.replies[str(code)] += 1
                    except Exception:  # noqa: BLE001
                        res.malformed_replies += 1
        for s in back:
            if s in events:
                while True:
                    try:
                        s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.harness.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--json", default="")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--dup-ids", action="store_true", help="also reuse request ids while in flight (fix 9)")
    a = p.parse_args(argv)
    root = short_tmpdir("dxf")
    stack = ProcStack(root, broker_args=("--max-sessions", "20000"))
    try:
        stack.wait_ready()
        res = run_fuzz(stack, a.cases, a.seed, a.batch, dup_ids=a.dup_ids,
                       progress=lambda m: print(m, file=sys.stderr))
        out = res.as_dict()
        print(json.dumps(out, indent=2))
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=2))
        return 1 if res.honest_failures else 0
    finally:
        stack.close()
        if a.keep:
            print(f"logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
