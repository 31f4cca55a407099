"""The in-process sides of ``python -m bench.ab`` (``--what core|executor|codec|exchange|client|durable``).

Run as a script (``python bench/ab_drivers.py MODE [ARGS]``) with the tree under test first on
``sys.path``, so that tree's ``broker``, ``worker`` and ``dspex`` are what is measured; it imports
nothing from ``bench/`` (a baseline tree may not have this file). It prints ``{"ready": true}``,
then answers each JSON command line (``{"n": ...}`` or ``{"seconds": ...}``) with one JSON line of
figures for a block. Mode by mode:

* ``core``: the broker's routing core behind a null shell, the pipelined load of ``--what tree``
  driven by frames in memory (a ``strict_queue`` pool of 2 capacity-1 workers, 100 sessions with
  one call each in flight, 4 clients); per request + reply: ``core_us`` of thread CPU time (the
  machine's other load barely moves it; the zmq shell's cost is what ``--what tree`` adds). The
  core's public events (``on_client_frames``/``on_worker_frames``) with the shell's clock reading
  of each message, behind a null port.
* ``executor``: the worker's ``Executor`` (dspy on, capacity 1) executing a no-op ``call``, the
  ``method __call__`` of a ``dspy.Predict`` ref answered by a DummyLM and its ``acall`` (awaited on
  the session's event loop: ``apredict_us``), each as a session's client
  sends it (its output taken, log records from INFO, a stream opened only at the first event):
  CPU per execute; and the same Predict called in-process under ``dspy.context(lm=...)``
  (``inprocess_us``: the same code on both sides, the noise floor of the ratios); and the
  worker's encode of that call's result alone (``result_us``: a ``Prediction``, ~5 µs, which
  ``predict_us`` cannot resolve).
* ``codec``: the codec alone on plain data, every message's common case: a request body under the
  client policy, a small dict result and 200 rows of dicts under the worker policy (with a
  ``to_ref`` that must never run), 200 rows and 10,000 floats as a call's argument (the client
  policy, with the look for an object given twice): CPU per encode + decode of each.
* ``exchange``: the client's own Python per call, no sockets: ``Exchange`` of a session's request
  (encoded against a ``SendCache`` that holds what earlier requests sent), its frames, and
  ``feed`` of the worker's reply, for ``s.run`` of a held function of this script (by value),
  a no-op ``s.call`` (``builtins.len``), a ``dspy.Predict`` ref call answered by a
  ``Prediction``, ``s.run`` of that function with a ``dspy.LM`` the client configured
  (``run_lm``: its settings travel, by key after the first), and the ref call of a Predict the
  session holds by value (``ref_hist``: a global of this script, as ``client``'s), whose reply
  carries the call's DSPy history entry, recorded here in the Predict's history and DSPy's global
  history, both at DSPy's bounds: thread CPU per call of each (what ``client``'s process CPU
  cannot resolve), each block after a full garbage collection (the share of full collections,
  which depends on every object of the process, is ``client``'s to show).
* ``client ENDPOINT SESSIONS``: against a stack of the same tree: sequential no-op calls
  (``builtins.len``) in a session and outside one (p50 of each), sequential ``prog(question=...)``
  ref calls of a ``dspy.Predict``, ``s.run`` of a function of this script calling it (sent by
  value) and the same program in-process (p50 of each and their ratios; the client's process CPU
  per no-op and per ref call), then an ``AsyncClient`` with SESSIONS sessions calling a
  ``ChainOfThought`` ref back to back (the serving driver's path): its CPU per call.
* ``durable ENDPOINT BROKER_PID WORKER_PID``: against a stack of the same tree, the row of
  ``python -m bench --only durable``: a ``ChainOfThought`` with 4 demos and a DummyLM in a durable
  session and in a plain one (each past 200 calls: the LM history at its bound), ``n`` calls of
  each in turn: p50 of each, their ratio, and the broker's and the worker's CPU per call of each
  (``/proc`` schedstat, all threads).
* ``output ENDPOINT BROKER_PID WORKER_PID``: against a stack of the same tree (``--no-dspy``), what
  a call's printing costs, with the client forwarding it (to ``/dev/null``) and counting its
  events: ``n`` separate prints in-process and through ``s.apply`` (seconds, events, the worker's,
  the broker's and the client's CPU), 1,000 prints with a 1 ms sleep after each (seconds, events),
  and one print followed by a 2 s sleep (ms from the call's start until the line reached the
  client's stdout).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import pickle
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

QUESTION = "What is the capital of France?"
ANSWERS = {"predict": {"answer": "Paris"}, "cot": {"reasoning": "France's capital city is Paris.", "answer": "Paris"}}
CONFIGURE = """
import dspy
from dspy.utils import DummyLM
dspy.configure(lm=DummyLM({{{question!r}: {answers!r}}}))
"""
_SESSIONS = 100
_CLIENTS = 4
_PROGRAM: Any = None  # the Predict that ``_run_predict`` calls: a global of the client's script, sent by value
_HELD_PREDICT: Any = None  # exchange's ref_hist: the client's Predict a session holds


def _run_predict(question: str) -> Any:
    """What ``s.run`` runs: the user's own function (this script is ``__main__``: sent by value)."""
    return _PROGRAM(question=question)


def headers_module() -> Any:
    """The request/reply headers and envelopes of whichever tree is first on sys.path (a tree from
    before they had a module of their own, ``dspex.wire.headers``, has them in its protocol module)."""
    import importlib

    try:
        return importlib.import_module("dspex.wire.headers")
    except ImportError:
        return importlib.import_module("dspex.wire.protocol")


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


# -- core ----------------------------------------------------------------------------------------

class CoreLoad:
    """The core of whichever tree is first on sys.path, a null shell, and the pipelined load."""

    def __init__(self) -> None:
        import msgpack
        import zmq

        import dspex.wire.protocol as wire
        from broker.core import Core
        from broker.ops import HANDLERS
        from dspex.stack.pools import parse_pool_spec

        self.zmq, self.msgpack, self.wire, self.headers = zmq, msgpack, wire, headers_module()
        sent: deque[tuple[bytes, list[Any]]] = deque()

        class Null:
            def to_client(self, frames: list[Any]) -> None:
                pass

            def to_worker(self, wid: bytes, frames: list[Any]) -> None:
                sent.append((wid, frames))

            def client_identity(self, frame: Any) -> str:
                return ""

            def client_seen(self, client: bytes, frame: Any) -> None:
                pass

            def worker_connected(self, wid: bytes, frame: Any) -> bool:
                return True  # a shell that cannot tell

            def worker_gone(self, wid: bytes) -> None:
                pass

            def process_exited(self, pid: int, host: str) -> bool:
                return False

            def stop_process(self, pid: int, host: str) -> None:
                pass

            def log(self, level: int, message: str, *args: Any) -> None:
                pass

            def store(self, job: Any) -> None:
                pass

        self.sent = sent
        # the shell reads the clock for each message and hands it to the core
        core = Core([parse_pool_spec("p:strict_queue")], Null(), HANDLERS, now=time.monotonic(),
                    heartbeat_interval=1.0, heartbeat_liveness=3)
        self.from_client, self.from_worker = core.on_client_frames, core.on_worker_frames
        self.core = core
        info = {"pool": "p", "pid": 1, "host": "h", "capacity": 1, "running": 0, "version": wire.PROTOCOL_VERSION}
        for wid in (b"w" * 32, b"v" * 32):
            self._deliver(self.from_worker, [zmq.Frame(wid), zmq.Frame(wire.W_READY), zmq.Frame(msgpack.packb(info))])
        sent.clear()
        self.next_id = 0
        self.body = msgpack.packb(["os", "getpid", [], {}])
        self.result = msgpack.packb(0)
        self.session_of: dict[tuple[bytes, int], str] = {}

    def _deliver(self, handler: Callable[[list[Any], float], None], frames: list[Any]) -> None:
        handler(frames, time.monotonic())

    def _request(self, client: bytes, session: str) -> list[Any]:
        self.next_id += 1
        self.session_of[(client, self.next_id)] = session
        header = self.headers.RequestHeader("call", self.next_id, "p", session).pack()
        z = self.zmq.Frame
        return [z(client), z(header), z(self.body)]

    def _reply(self, wid: bytes, frames: list[Any]) -> tuple[list[Any], bytes, int]:
        """The worker's reply to a request the core sent (frames as the backend would deliver)."""
        z, w = self.zmq.Frame, self.wire
        client = bytes(frames[0])[self.headers.REQUEST_ENVELOPE_SIZE:]
        req_id = self.msgpack.unpackb(bytes(frames[1]))[1]
        return ([z(wid), z(self.headers.pack_reply_envelope(w.W_REPLY, "ok", req_id, client)),
                 z(self.headers.pack_reply_header("ok", req_id, wid.decode(), "p")), z(self.result)], client, req_id)

    def block(self, calls: int) -> float:
        """Seconds of core thread CPU per request + reply over ``calls`` of them."""
        core, sent, clock, deliver = self.core, self.sent, time.thread_time, self._deliver
        from_client, from_worker = self.from_client, self.from_worker
        spent = 0.0
        if not any(w.inflight for w in core.pools["p"].workers.values()):
            for i in range(_SESSIONS):  # every session's first call
                frames = self._request(b"c%d" % (i % _CLIENTS), f"s{i:031d}")
                t = clock()
                deliver(from_client, frames)
                spent += clock() - t
        for _ in range(calls):
            wid, req = sent.popleft()
            reply, client, req_id = self._reply(wid, req)
            t = clock()
            deliver(from_worker, reply)
            spent += clock() - t
            nxt = self._request(client, self.session_of.pop((client, req_id)))  # that session's next call
            t = clock()
            deliver(from_client, nxt)
            spent += clock() - t
        return spent / calls


Side = tuple[Callable[[dict[str, Any]], dict[str, float]], Callable[[], None]]  # (one block, close)


def _core() -> Side:
    load = CoreLoad()
    load.block(2000)  # warm-up
    return (lambda cmd: {"core_us": load.block(int(cmd["n"])) * 1e6}), lambda: None


# -- executor ------------------------------------------------------------------------------------

def _executor() -> Side:
    import logging

    import dspy
    from dspy.utils import DummyLM

    from dspex.wire import codec
    from dspex.wire.protocol import output_flags
    from worker.executor import Executor, _encoded
    from worker.refs import RefTable
    from worker.streaming import LazyStream

    RequestHeader = headers_module().RequestHeader
    ex = Executor(RefTable("p", "w" * 32), capacity=1)
    ex.install()
    ex.enable_dspy(200)
    sid = "s" * 32
    every = codec.Policy.ALL
    ex.execute(RequestHeader("exec", 1, "p", sid, "", 60000, 0),
               codec.encode([CONFIGURE.format(question=QUESTION, answers=ANSWERS["predict"]), None], policy=every))
    ref = ex.execute(RequestHeader("put", 2, "p", sid, "", 60000, 0),
                     codec.encode([dspy.Predict("question -> answer")], policy=every))
    prog = codec.decode(ref)
    flags = output_flags(logging.INFO)  # what a session's call carries (dspex.client.output)
    bodies = {"noop": (RequestHeader("call", 3, "p", sid, "", 60000, flags),
                       codec.encode(["builtins", "len", [[]], {}], policy=every)),
              "predict": (RequestHeader("method", 4, "p", sid, "", 60000, flags),
                          codec.encode([prog, "__call__", [], {"question": QUESTION}], policy=every)),
              "apredict": (RequestHeader("method", 5, "p", sid, "", 60000, flags),
                           codec.encode([prog, "acall", [], {"question": QUESTION}], policy=every))}

    def no_output() -> Any:
        raise AssertionError("the benchmark's call printed or logged")

    def cpu_per_execute(op: str, n: int) -> float:
        header, body = bodies[op]
        c0 = time.process_time()
        for _ in range(n):
            ex.execute(header, body, LazyStream(no_output), deadline=time.monotonic() + 60, client=b"c" * 16)
        return (time.process_time() - c0) / n

    local, lm = dspy.Predict("question -> answer"), DummyLM({QUESTION: ANSWERS["predict"]})

    def cpu_in_process(n: int) -> float:
        c0 = time.process_time()
        for _ in range(n):
            with dspy.context(lm=lm):
                local(question=QUESTION)
        return (time.process_time() - c0) / n

    with dspy.context(lm=lm):
        prediction = local(question=QUESTION)

    def cpu_per_result(n: int) -> float:
        c0 = time.process_time()
        for _ in range(n):
            _encoded(prediction, no_output)
        return (time.process_time() - c0) / n

    cpu_per_execute("noop", 500)
    cpu_per_execute("predict", 50)
    cpu_per_execute("apredict", 50)
    cpu_in_process(50)
    cpu_per_result(500)
    return (lambda cmd: {"noop_us": cpu_per_execute("noop", int(cmd["n"])) * 1e6,
                         "predict_us": cpu_per_execute("predict", max(1, int(cmd["n"]) // 10)) * 1e6,
                         "apredict_us": cpu_per_execute("apredict", max(1, int(cmd["n"]) // 10)) * 1e6,
                         "inprocess_us": cpu_in_process(max(1, int(cmd["n"]) // 10)) * 1e6,
                         "result_us": cpu_per_result(int(cmd["n"])) * 1e6}), lambda: None


# -- codec -------------------------------------------------------------------------------------

_ROW = {"id": 7, "text": "The capital of France is Paris.", "tokens": [101, 2003, 3007, 102], "score": 0.875,
        "ok": True, "meta": {"source": None, "blob": b"\x00\x01\x02"}}


def _codec() -> Side:
    from dspex.wire import codec

    def to_ref(obj: object) -> Any:
        raise AssertionError(f"plain data made a ref: {obj!r}")

    payloads = {
        "body": (["builtins", "len", [[1, 2, 3], "question", 2.5, None], {"flag": True, "n": 3}],
                 codec.Policy.ALL, None),
        "small": ({"answer": "Paris", "reasoning": "It is the capital.", "score": 0.9, "ok": True, "n": None},
                  codec.Policy.DATA, to_ref),
        "rows": ([dict(_ROW, id=i) for i in range(200)], codec.Policy.DATA, to_ref),
        # 10 000 floats: most bodies of them hold a bin marker byte (dspex.wire.codec's bytearray check)
        "floats": ([i / 7 for i in range(10_000)], codec.Policy.DATA, to_ref),
        # the same as a call's arguments: the client policy, looking for an object given twice
        "arg_rows": ([[dict(_ROW, id=i) for i in range(200)]], codec.Policy.ALL, None),
        "arg_floats": ([[i / 7 for i in range(10_000)]], codec.Policy.ALL, None),
    }
    for value, policy, ref in payloads.values():
        assert codec.decode(codec.encode(value, ref, policy=policy)) == value

    def cpu_per(name: str, n: int) -> float:
        value, policy, ref = payloads[name]
        encode, decode, repeats = codec.encode, codec.decode, codec.Repeats
        c0 = time.process_time()
        if policy is codec.Policy.ALL:  # as the client encodes a request (dspex.client.exchange)
            for _ in range(n):
                decode(encode(value, ref, policy=policy, repeats=repeats()))
        else:
            for _ in range(n):
                decode(encode(value, ref, policy=policy))
        return (time.process_time() - c0) / n

    def block(cmd: dict[str, Any]) -> dict[str, float]:
        n = int(cmd["n"])
        return {"body_us": cpu_per("body", n) * 1e6, "small_us": cpu_per("small", n) * 1e6,
                "rows_us": cpu_per("rows", max(1, n // 100)) * 1e6,
                "floats_us": cpu_per("floats", max(1, n // 200)) * 1e6,
                "arg_rows_us": cpu_per("arg_rows", max(1, n // 100)) * 1e6,
                "arg_floats_us": cpu_per("arg_floats", max(1, n // 200)) * 1e6}

    block({"n": 2000})
    return block, lambda: None


# -- exchange ------------------------------------------------------------------------------------

def _noop() -> None:
    """``s.run``'s function: by value (this script is the client's ``__main__``)."""


def _exchange() -> Side:
    import dspy
    from dspy.utils import DummyLM

    from dspex.client.exchange import Exchange
    from dspex.client.sendcache import SendCache
    from dspex.wire import codec
    from dspex.wire.protocol import Status
    from dspex.wire.ref import Ref

    cache, sid = SendCache(), "s" * 32
    ref = Ref("r" * 32, sid, "p", "w" * 32, "dspy.predict.predict.Predict")
    done = Status.OK.value
    none_reply = [bytes(f) for f in codec.encode(None, policy=codec.Policy.DATA)]
    prediction_reply = [bytes(f) for f in codec.encode(dspy.Prediction(answer="Paris"), policy=codec.Policy.DATA)]
    # (op, the body as the session builds it for each call, the reply's frames)
    calls: dict[str, tuple[str, Callable[[], list[Any]], list[bytes]]] = {
        "run": ("apply", lambda: [_noop, [], {}], none_reply),
        "call": ("call", lambda: ["builtins", "len", [[]], {}], none_reply),
        "ref": ("method", lambda: [ref, "__call__", [], {"question": QUESTION}], prediction_reply),
        # (the client's LM is the session's: the reply carries [result, its history entries])
        "run_lm": ("apply", lambda: [_noop, [], {}], [bytes(f) for f in codec.encode([None, {}], policy=codec.Policy.DATA)])}
    # run_lm: s.run of a held function with an LM the client configured (its settings travel)
    lm = dspy.LM("openai/m", api_base="http://127.0.0.1:9/v1", api_key="k", temperature=0.1, max_tokens=50)
    # each row's dspy.context block (None: none, as the client driver's ref calls)
    settings: dict[str, dict[str, Any] | None] = {"run_lm": {"lm": lm}, "ref_hist": None}
    senders = {"run_lm": SendCache()}  # a session of its own: every call of one that holds an LM asks for history

    def on_reply(status: str, worker: str) -> None:
        pass

    # ref_hist: the ref call in a session that holds the client's Predict (a global of this script,
    # put by value: the session's copy of it), whose reply carries the call's DSPy history entry as
    # the worker sends it (one pickle: the global history's and the module's), recorded here in both
    global _HELD_PREDICT
    prog = _HELD_PREDICT = dspy.Predict("question -> answer")
    senders["ref_hist"] = SendCache()
    put = Exchange("put", "p", sid, [prog], 60.0, max_message=1 << 26, sender=senders["ref_hist"], on_reply=on_reply)
    put.frames(0, "")
    put.feed(done, "w" * 32, [bytes(f) for f in codec.encode([ref, {}], policy=codec.Policy.DATA)])
    held = senders["ref_hist"]
    (key,) = getattr(held, "held", held).lms  # (a SendCache holds its LMs in its HeldKeys since 09c625a)
    with dspy.context(lm=DummyLM({QUESTION: ANSWERS["predict"]})):
        prog(question=QUESTION)
    entry = prog.history[-1]
    history = pickle.dumps([[None, entry], [key, entry]], protocol=pickle.HIGHEST_PROTOCOL)
    calls["ref_hist"] = (*calls["ref"][:2], [bytes(f) for f in codec.encode(
        [dspy.Prediction(answer="Paris"), {"history": history}], policy=codec.Policy.DATA)])

    def cpu_per_call(name: str, n: int) -> float:
        op, body, reply = calls[name]
        block = settings.get(name, {})
        # a block starts after a full collection, so none falls in it: ref_hist keeps what it
        # records, and one full collection (~100 ms over the histories and DSPy) in some blocks but
        # not others made its figure bimodal (72-81 vs 100-118 µs)
        gc.collect()
        with dspy.context(**block) if block is not None else contextlib.nullcontext():
            c0 = time.thread_time()
            for i in range(n):
                ex = Exchange(op, "p", sid, body(), 60.0, max_message=1 << 26, sender=senders.get(name, cache), forward=True,
                              on_reply=on_reply)
                ex.frames(i, "")
                ex.feed(done, "w" * 32, reply)
            return (time.thread_time() - c0) / n

    for name in calls:  # the first sends the function (and the settings) in full, as a session's first call
        # (ref_hist: until both histories are at DSPy's bounds, where each call's entry drops the oldest)
        cpu_per_call(name, 10_200 if name == "ref_hist" else 200)
    return (lambda cmd: {f"{name}_us": cpu_per_call(name, int(cmd["n"])) * 1e6 for name in calls}), lambda: None


# -- client --------------------------------------------------------------------------------------

def _client(endpoint: str, sessions: int) -> Side:
    import dspy
    from dspy.utils import DummyLM

    import dspex
    import dspex.aio

    global _PROGRAM
    progs = {"predict": dspy.Predict("question -> answer"), "cot": dspy.ChainOfThought("question -> answer")}
    _PROGRAM = progs["predict"]
    client = dspex.connect(endpoint, timeout=60)
    s = client.session("p")
    s.exec(CONFIGURE.format(question=QUESTION, answers=ANSWERS["predict"]))
    ref = s.put(progs["predict"])
    lm = DummyLM({QUESTION: ANSWERS["predict"]})
    loop = asyncio.new_event_loop()

    ac = dspex.aio.connect(endpoint, timeout=60)

    async def aio_setup() -> list[Any]:
        ss = [ac.session("p") for _ in range(sessions)]
        for x in ss:
            await x.exec(CONFIGURE.format(question=QUESTION, answers=ANSWERS["cot"]))
        return [await x.put(progs["cot"]) for x in ss]

    refs = loop.run_until_complete(aio_setup())

    async def aio(duration: float) -> tuple[int, float]:
        stop = time.monotonic() + duration
        calls = 0

        async def one(i: int) -> None:
            nonlocal calls
            while time.monotonic() < stop:
                pred = await refs[i](question=QUESTION)
                assert pred.answer == "Paris"
                calls += 1

        c0 = time.process_time()
        await asyncio.gather(*(one(i) for i in range(len(refs))))
        return calls, time.process_time() - c0

    def block(cmd: dict[str, Any]) -> dict[str, float]:
        n = int(cmd["n"])
        lat_n: list[float] = []
        lat_c: list[float] = []
        c0 = time.process_time()
        for _ in range(n):
            t = time.perf_counter()
            s.call("builtins", "len", [[]])
            lat_n.append(time.perf_counter() - t)
        noop_cpu = (time.process_time() - c0) / n
        for _ in range(n):
            t = time.perf_counter()
            client.call("builtins", "len", [[]], pool="p")
            lat_c.append(time.perf_counter() - t)
        lat_s, lat_l, lat_r = [], [], []
        c0 = time.process_time()
        for _ in range(n):
            t = time.perf_counter()
            ref(question=QUESTION)
            lat_s.append(time.perf_counter() - t)
        ref_cpu = (time.process_time() - c0) / n
        for _ in range(n):
            t = time.perf_counter()
            s.run(_run_predict, QUESTION)
            lat_r.append(time.perf_counter() - t)
        with dspy.context(lm=lm):
            for _ in range(n):
                t = time.perf_counter()
                progs["predict"](question=QUESTION)
                lat_l.append(time.perf_counter() - t)
        calls, cpu = loop.run_until_complete(aio(float(cmd["seconds"])))
        p50_s, p50_l, p50_r = _median(lat_s), _median(lat_l), _median(lat_r)
        return {"noop_session_p50_us": _median(lat_n) * 1e6, "noop_sessionless_p50_us": _median(lat_c) * 1e6,
                "seq_session_p50_us": p50_s * 1e6, "seq_inprocess_p50_us": p50_l * 1e6,
                "seq_session_vs_inprocess": p50_s / p50_l, "run_p50_us": p50_r * 1e6, "run_vs_inprocess": p50_r / p50_l,
                "noop_client_cpu_us": noop_cpu * 1e6, "ref_client_cpu_us": ref_cpu * 1e6,
                "aio_calls_per_s": calls / float(cmd["seconds"]),
                "aio_driver_us_per_call": cpu / calls * 1e6, "calls": float(4 * n + calls)}

    def close() -> None:
        loop.run_until_complete(ac.close())
        loop.close()
        client.close()

    block({"n": 50, "seconds": 0.3})
    return block, close


# -- durable -------------------------------------------------------------------------------------

DURABLE_CONFIGURE = CONFIGURE + """cot = dspy.ChainOfThought("question -> answer")
cot.predict.demos = [dspy.Example(question=f"Question {{i}}?", reasoning=f"Because {{i}}.", answer=f"A{{i}}")
                     .with_inputs("question") for i in range(4)]
"""


def cpu_ns(pid: int) -> int:
    """CPU time a process has run, all its threads (``/proc/PID/task/*/schedstat``: ns)."""
    import os

    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def _durable(endpoint: str, broker: int, worker: int) -> Side:
    import dspex

    client = dspex.connect(timeout=60, endpoint=endpoint)
    progs = {}
    for kind in ("durable", "plain"):
        s = client.session("p", durable=kind == "durable")
        progs[kind] = s.exec(DURABLE_CONFIGURE.format(question=QUESTION, answers=ANSWERS["cot"]))["cot"]
        for _ in range(200):
            progs[kind](question=QUESTION)

    def block(cmd: dict[str, Any]) -> dict[str, float]:
        n = int(cmd["n"])
        out: dict[str, float] = {}
        for kind, prog in progs.items():
            lat = []
            b0, w0 = cpu_ns(broker), cpu_ns(worker)
            for _ in range(n):
                t = time.perf_counter()
                if prog(question=QUESTION).answer != "Paris":
                    raise AssertionError("unexpected answer")
                lat.append(time.perf_counter() - t)
            out[f"{kind}_broker_cpu_us"] = (cpu_ns(broker) - b0) / n / 1e3
            out[f"{kind}_worker_cpu_us"] = (cpu_ns(worker) - w0) / n / 1e3
            out[f"{kind}_p50_us"] = _median(lat) * 1e6
        out["durable_vs_plain"] = out["durable_p50_us"] / out["plain_p50_us"]
        return {k: out[k] for k in ("durable_vs_plain", "durable_p50_us", "plain_p50_us", "durable_broker_cpu_us",
                                    "plain_broker_cpu_us", "durable_worker_cpu_us", "plain_worker_cpu_us")}

    return block, client.close


# -- output --------------------------------------------------------------------------------------

def print_burst(n: int) -> int:
    """A user's ``print(i)`` loop: n separate prints."""
    for i in range(n):
        print(i)
    return n


def print_paced(n: int, pause: float) -> int:
    """Progress lines of a slow loop (one per item of an Evaluate, a tqdm-less bar)."""
    for i in range(n):
        print(f"item {i} done")
        time.sleep(pause)
    return n


def print_then_wait(seconds: float) -> None:
    """One line, then a long wait (an LM call): the line must show while it waits."""
    print("waiting for the LM")
    time.sleep(seconds)


class _Stamp:
    """A stdout that notes when the first text reached it."""

    def __init__(self) -> None:
        self.first = 0.0

    def write(self, text: str) -> int:
        if not self.first:
            self.first = time.perf_counter()
        return len(text)

    def flush(self) -> None:
        pass


def _output(endpoint: str, broker: int, worker: int) -> Side:
    import contextlib
    import os

    import dspex

    client = dspex.connect(timeout=300, endpoint=endpoint)
    s = client.session("p")
    devnull = open(os.devnull, "w")  # noqa: SIM115 - the forwarded text's destination for the driver's life
    with contextlib.redirect_stdout(devnull):  # this driver's stdout is its answers
        s.run(print_burst, 10)

    def block(cmd: dict[str, Any]) -> dict[str, float]:
        n, paced, wait = int(cmd["n"]), int(cmd.get("paced", 1000)), float(cmd.get("wait", 2.0))
        out: dict[str, float] = {}
        events = [0]

        def count(event: Any) -> None:
            events[0] += 1

        with contextlib.redirect_stdout(devnull):
            t = time.perf_counter()
            print_burst(n)
            out["burst_inprocess_s"] = time.perf_counter() - t
            b0, w0, c0 = cpu_ns(broker), cpu_ns(worker), time.process_time()
            t = time.perf_counter()
            s.apply(print_burst, [n], on_output=count)
            out["burst_s"] = time.perf_counter() - t
            out["burst_events"] = events[0]
            out["burst_worker_cpu_s"] = (cpu_ns(worker) - w0) / 1e9
            out["burst_broker_cpu_s"] = (cpu_ns(broker) - b0) / 1e9
            out["burst_client_cpu_s"] = time.process_time() - c0
            t = time.perf_counter()
            print_paced(paced, 0.001)
            out["paced_inprocess_s"] = time.perf_counter() - t
            events[0] = 0
            t = time.perf_counter()
            s.apply(print_paced, [paced, 0.001], on_output=count)
            out["paced_s"] = time.perf_counter() - t
            out["paced_events"] = events[0]
        stamp = _Stamp()
        with contextlib.redirect_stdout(stamp):
            t = time.perf_counter()
            s.run(print_then_wait, wait)
            out["wait_latency_ms"] = (stamp.first - t) * 1e3
        return out

    def close() -> None:
        client.close()
        devnull.close()

    return block, close


def main(argv: list[str]) -> int:
    mode = argv[0]
    sides: dict[str, Callable[[], Side]] = {"core": _core, "executor": _executor, "codec": _codec,
                                           "exchange": _exchange}
    if mode in sides:
        block, close = sides[mode]()
    elif mode == "durable":
        block, close = _durable(argv[1], int(argv[2]), int(argv[3]))
    elif mode == "output":
        block, close = _output(argv[1], int(argv[2]), int(argv[3]))
    else:
        block, close = _client(argv[1], int(argv[2]))
    return serve(block, close)


def serve(block: Callable[[dict[str, Any]], dict[str, float]], close: Callable[[], None]) -> int:
    """Say ready, then answer each command line with one block's figures until stdin ends."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        print(json.dumps(block(json.loads(line))), flush=True)
    close()
    return 0


if __name__ == "__main__":
    sys.path.pop(0)  # this script's directory (bench/) must not shadow anything
    sys.exit(main(sys.argv[1:]))
