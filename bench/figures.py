"""The figures of the benchmark table. Each group starts what it needs and cleans it up.

Every comparison is measured in the same run with A and B alternating round by round (the
order rotates each round), and every figure is a median over rounds.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench.common import (
    PY,
    REPO,
    Row,
    Stack,
    Workspace,
    base_env,
    iter_rotated,
    median,
    ms,
    quantile,
    rss_bytes,
    secs,
    us,
    verdict,
    wait_for,
)
from bench.predict import ROWS as PREDICT_ROWS, predict
from bench.serving import serving
from tests.harness.supervisord import link_launcher


@dataclass
class Config:
    smoke: bool = False
    rounds: int = 0  # 0: the mode's default
    profile_dir: str | None = None
    log: Callable[[str], None] = print

    def n_rounds(self, full: int, smoke: int = 2) -> int:
        if self.rounds:
            return self.rounds
        return smoke if self.smoke else full


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _spawn_server(ws: Workspace, log: str, *args: str) -> subprocess.Popen[bytes]:
    return ws.procs.spawn([PY, "-m", "bench.servers", *args], log, base_env())


def _wait_echo(sock: Any, frames: list[Any], timeout: float = 20.0) -> None:
    """Until a message sent on ``sock`` comes back (the peer may still be starting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.send_multipart(frames)
        if sock.poll(200):
            sock.recv_multipart()
            while sock.poll(50):  # late echoes of earlier tries
                sock.recv_multipart()
            return
    raise TimeoutError("echo server did not answer")


def _timed(fn: Callable[[], Any], n: int) -> list[float]:
    pc = time.perf_counter
    out = [0.0] * n
    for i in range(n):
        t = pc()
        fn()
        out[i] = pc() - t
    return out


def _py_spy() -> str | None:
    cand = Path(PY).parent / "py-spy"
    if cand.exists():
        return str(cand)
    from shutil import which

    return which("py-spy")


class Spy:
    """``py-spy record`` of one pid in raw (collapsed-stack) form, for the profile report."""

    def __init__(self, ws: Workspace, pid: int, out: str, duration: float, extra: tuple[str, ...] = ()) -> None:
        exe = _py_spy()
        self.proc: subprocess.Popen[bytes] | None = None
        self.out = out
        if exe is None:
            return
        self.proc = ws.procs.spawn(
            [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "500", "--nonblocking",
             "--duration", str(max(1, int(duration + 0.999))), "--output", out, *extra],
            "py-spy.log", base_env())
        time.sleep(0.3)  # py-spy attaches

    def wait(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass


# ==========================================================================================
# no-op round trip, sequential
# ==========================================================================================

def _ray_actor_factory() -> Any:
    import ray

    class Echo:
        def call(self, x: Any) -> int:
            return len(x)

    return ray.remote(Echo)


def _pooled(rounds: list[list[float]]) -> list[float]:
    return [x for r in rounds for x in r]


def _ratio_p50(lat: dict[str, list[list[float]]], a: str, b: str) -> float:
    """Median over rounds of (p50 of a) / (p50 of b): each round's two blocks ran back to back."""
    return median([_ratio(quantile(x, 0.5), quantile(y, 0.5)) for x, y in zip(lat[a], lat[b])])


def noop(cfg: Config) -> list[Row]:
    import zmq

    from dspex import codec
    from dspex.protocol import RequestHeader

    # many short blocks, the systems interleaved block by block: noise bursts on this shared
    # 2-vCPU machine last seconds, so a ratio of neighbouring blocks is what stays stable
    rounds = cfg.n_rounds(40, 6)
    per_round = 40 if cfg.smoke else 250
    rows: list[Row] = []
    ws = Workspace()
    mp_pool = None
    ctx = zmq.Context()
    socks: list[Any] = []
    clients: list[Any] = []
    try:
        # fork the Pool before this process has any zmq I/O thread
        mp_pool = multiprocessing.get_context("fork").Pool(1)
        st = Stack(ws, "n")
        st.start_broker("p:strict_queue")
        st.start_worker("p", "--no-dspy")
        echo_ep, pf_ep, pb_ep = ws.ipc("echo.sock"), ws.ipc("pf.sock"), ws.ipc("pb.sock")
        _spawn_server(ws, "echo.log", "echo-router", "--bind", echo_ep)
        _spawn_server(ws, "proxy.log", "proxy", "--frontend", pf_ep, "--backend", pb_ep)
        _spawn_server(ws, "proxy-echo.log", "echo-dealer", "--connect", pb_ep)
        st2 = Stack(ws, "u")  # the same broker with a worker reduced to the wire protocol
        st2.start_broker("p:strict_queue")
        _spawn_server(ws, "fake-worker.log", "fake-worker", "--backend", st2.backend, "--pool", "p")
        client, client2 = st.client(), st2.client()
        clients += [client, client2]
        st.wait_workers("p", 1, 30, client=client)
        st2.wait_workers("p", 1, 30, client=client2)
        s = client.session("p")
        s2 = client2.session("p")
        s2.call("builtins", "len", [[]])
        worker_pid = int(s.call("os", "getpid"))
        # the same frames as Session.call("builtins", "len", [[]]) puts on the wire
        frames: list[Any] = [RequestHeader("call", 1, "p", s.id, "", 60000).pack(),
                             codec.encode(["builtins", "len", [[]], {}])[0]]
        direct, prox, braw = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        socks += [direct, prox, braw]
        for sock, ep in ((direct, echo_ep), (prox, pf_ep)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(ep)
            _wait_echo(sock, frames)
        # raw frames through the dspex broker to the protocol-echo worker: the broker without the Client
        braw.setsockopt(zmq.LINGER, 0)
        braw.connect(st2.frontend)
        braw_frames = [RequestHeader("call", 1, "p", s2.id, "", 60000).pack(), frames[1]]
        _wait_echo(braw, braw_frames)

        def call(sess: Any) -> Callable[[], None]:
            def f() -> None:
                sess.call("builtins", "len", [[]])
            return f

        def raw(sock: Any, fr: list[Any]) -> Callable[[], None]:
            send, recv = sock.send_multipart, sock.recv_multipart

            def f() -> None:
                send(fr)
                recv()
            return f

        def mp() -> None:
            mp_pool.apply(len, ([],))

        systems: dict[str, Callable[[], None]] = {
            "dspex": call(s), "cproxy": raw(prox, frames), "direct": raw(direct, frames), "mp": mp,
            "client_broker": call(s2), "broker_raw": raw(braw, braw_frames)}
        lat = _alternate(systems, rounds, per_round, cfg)
        p50 = {k: quantile(_pooled(v), 0.5) for k, v in lat.items()}
        p99 = {k: quantile(_pooled(v), 0.99) for k, v in lat.items()}
        r50 = _ratio_p50(lat, "dspex", "cproxy")
        r99 = p99["dspex"] / p50["dspex"]
        data = {"rounds": rounds, "calls_per_round": per_round,
                "p50_us": {k: v * 1e6 for k, v in p50.items()}, "p99_us": {k: v * 1e6 for k, v in p99.items()},
                "ratio_p50_vs_cproxy": r50, "ratio_p99_vs_own_p50": r99,
                "ratios_p50": {k: _ratio_p50(lat, k, "cproxy") for k in lat}}
        rows.append(Row("noop.p50", "no-op pinned call p50 (sequential)", us(p50["dspex"]),
                        f"C proxy {us(p50['cproxy'])}; direct echo {us(p50['direct'])}",
                        f"{r50:.2f}× C proxy", "≤ 1.15× C proxy", verdict(r50 <= 1.15), data=data))
        rows.append(Row("noop.p99", "no-op pinned call p99 (sequential)", us(p99["dspex"]),
                        f"C proxy p99 {us(p99['cproxy'])}", f"{r99:.2f}× own p50", "≤ 2× own p50",
                        verdict(r99 <= 2.0)))
        rows.append(Row("noop.mp", "multiprocessing.Pool.apply, same payload", us(p50["dspex"]),
                        f"mp {us(p50['mp'])} p50, {us(p99['mp'])} p99", f"{_ratio_p50(lat, 'dspex', 'mp'):.2f}× mp",
                        "(info)"))
        rows.append(Row("noop.client_broker", "  decomposition: Client → dspex broker → protocol-echo worker",
                        us(p50["client_broker"]), f"C proxy {us(p50['cproxy'])}",
                        f"{_ratio_p50(lat, 'client_broker', 'cproxy'):.2f}× C proxy", "(info)"))
        rows.append(Row("noop.broker_raw", "  decomposition: raw DEALER → dspex broker → protocol-echo worker",
                        us(p50["broker_raw"]), f"C proxy {us(p50['cproxy'])}",
                        f"{_ratio_p50(lat, 'broker_raw', 'cproxy'):.2f}× C proxy", "(info)"))
        if cfg.profile_dir:
            _profile_noop(cfg, ws, systems["dspex"], worker_pid, st)
        rows.append(_noop_ray(cfg, systems["dspex"], max(6, rounds // 2), per_round))
    finally:
        for sock in socks:
            sock.close(0)
        for c in clients:
            c.close()
        if mp_pool is not None:
            mp_pool.terminate()
            mp_pool.join()
        ctx.term()
        ws.close()
    return rows


def _alternate(systems: dict[str, Callable[[], None]], rounds: int, per_round: int, cfg: Config) -> dict[str, list[list[float]]]:
    names = list(systems)
    for name in names:  # warm up every path (imports, connections, caches)
        _timed(systems[name], 200)
    lat: dict[str, list[list[float]]] = {k: [] for k in names}
    every = max(1, rounds // 5)
    for r in range(rounds):
        for name in iter_rotated(names, r):
            lat[name].append(_timed(systems[name], per_round))
        if (r + 1) % every == 0 or r + 1 == rounds:
            cfg.log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {quantile(v[-1], 0.5) * 1e6:.0f}µs" for k, v in lat.items()))
    return lat


def _noop_ray(cfg: Config, ours: Callable[[], None], rounds: int, per_round: int) -> Row:
    name, label, target = "noop.ray", "no-op pinned call p50 vs a Ray actor call", "≤ 0.35× Ray"
    try:
        import ray
    except ImportError as exc:
        return Row.skipped(name, label, target, f"ray is not importable ({exc}); pip install 'dspex[bench]'")
    if cfg.smoke:
        return Row.skipped(name, label, target, "smoke mode (ray.init alone takes seconds); run the full bench")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    before = {pid for pid, _ in _children_of_self()}
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        actor = _ray_actor_factory().remote()
        ray.get(actor.call.remote([]))

        def call_ray() -> None:
            ray.get(actor.call.remote([]))

        lat = _alternate({"dspex": ours, "ray": call_ray}, rounds, per_round, cfg)
        p50 = {k: quantile(_pooled(v), 0.5) for k, v in lat.items()}
        r = _ratio_p50(lat, "dspex", "ray")
        data = {"p50_us": {k: v * 1e6 for k, v in p50.items()},
                "p99_us": {k: quantile(_pooled(v), 0.99) * 1e6 for k, v in lat.items()},
                "ratio": r, "ray": ray.__version__, "note": "measured while Ray's daemons run (both sides)"}
        return Row(name, label, f"{us(p50['dspex'])} (with Ray up)", f"Ray actor {us(p50['ray'])}",
                   f"{r:.2f}× Ray", target, verdict(r <= 0.35), data=data)
    except Exception as exc:  # noqa: BLE001 - a baseline failing must not sink the run
        return Row.error(name, label, target, f"ray baseline failed: {type(exc).__name__}: {exc}")
    finally:
        try:
            ray.shutdown()
        finally:
            _kill_new_children(before)


def _children_of_self() -> list[tuple[int, int]]:
    from bench.common import descendants

    return descendants(os.getpid())


def _kill_new_children(before: set[int]) -> None:
    """Ray's daemons, if ray.shutdown left any: only processes that descend from us and are new."""
    from bench.common import starttime

    time.sleep(0.2)
    for pid, started in _children_of_self():
        if pid not in before and starttime(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _profile_noop(cfg: Config, ws: Workspace, ours: Callable[[], None], worker_pid: int, st: Stack) -> None:
    """py-spy on the worker and the broker, cProfile on the client, during sequential no-op calls."""
    import cProfile
    import pstats

    out = Path(cfg.profile_dir)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    duration = 4.0
    spies = [Spy(ws, worker_pid, str(out / "noop_worker.txt"), duration, ("--threads",)),
             Spy(ws, st.broker.pid, str(out / "noop_broker.txt"), duration)]  # type: ignore[union-attr]
    n = 0
    t_end = time.monotonic() + duration
    prof = cProfile.Profile()
    prof.enable()
    while time.monotonic() < t_end:
        ours()
        n += 1
    prof.disable()
    for spy in spies:
        spy.wait()
    with open(out / "noop_client.txt", "w") as f:
        f.write(f"{n} calls in {duration}s (with cProfile + py-spy overhead)\n")
        pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(30)
    cfg.log(f"  profiles written to {out}")


# ==========================================================================================
# pipelined throughput, broker CPU per request
# ==========================================================================================

def _loadgen(ws: Workspace, mode: str, endpoint: str, duration: float, warmup: float, cpu_pids: list[int],
             extra: list[str] | None = None) -> dict[str, Any]:
    args = [PY, "-m", "bench.servers", mode, "--endpoint", endpoint, "--pool", "p", "--sessions", "100",
            "--duration", str(duration), "--warmup", str(warmup), *(extra or [])]
    for pid in cpu_pids:
        args += ["--cpu-pid", str(pid)]
    proc = subprocess.run(args, env=base_env(), cwd=REPO, capture_output=True, timeout=duration + warmup + 60,
                          start_new_session=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    return dict(json.loads(proc.stdout.decode().strip().splitlines()[-1]))


def throughput(cfg: Config) -> list[Row]:
    rounds = cfg.n_rounds(5, 1)
    duration, warmup = (0.5, 0.2) if cfg.smoke else (3.0, 0.5)
    ws = Workspace()
    client = None
    rows: list[Row] = []
    try:
        # systems: name -> (frontend endpoint, [hub pid, worker pids...], loadgen mode, extra args)
        systems: dict[str, tuple[str, list[int], str, list[str]]] = {}
        stacks = []
        for name, worker_args, spec in (("dspex", ["--no-dspy"], "p:strict_queue"),
                                        ("dspex_cap4", ["--no-dspy", "--capacity", "4"], "p:strict_queue"),
                                        ("dspex_pf0", ["--no-dspy"], "p:strict_queue:prefetch=0")):
            st = Stack(ws, {"dspex": "t", "dspex_cap4": "v", "dspex_pf0": "x"}[name])
            broker = st.start_broker(spec)
            for _ in range(2):
                st.start_worker("p", *worker_args)
            stacks.append(st)
            systems[name] = (st.frontend, [broker.pid, *(w.pid for w in st.worker_procs)], "loadgen", [])
        # the same broker with workers reduced to the wire protocol: what the broker alone costs
        for name, cap in (("broker_only", "1"), ("broker_only_cap4", "4")):
            st = Stack(ws, "u" if cap == "1" else "w")
            broker = st.start_broker("p:strict_queue")
            fakes = [_spawn_server(ws, "fake-worker.log", "fake-worker", "--backend", st.backend, "--pool", "p",
                                   "--capacity", cap) for _ in range(2)]
            stacks.append(st)
            systems[name] = (st.frontend, [broker.pid, *(f.pid for f in fakes)], "loadgen", [])
        pf_ep, pb_ep = ws.ipc("pf.sock"), ws.ipc("pb.sock")
        proxy = _spawn_server(ws, "proxy.log", "proxy", "--frontend", pf_ep, "--backend", pb_ep)
        echoes = [_spawn_server(ws, "proxy-echo.log", "echo-dealer", "--connect", pb_ep) for _ in range(2)]
        systems["cproxy"] = (pf_ep, [proxy.pid, *(e.pid for e in echoes)], "loadgen", [])
        systems["client"] = (systems["dspex"][0], systems["dspex"][1], "loadgen-client", ["--threads", "8"])
        for stack in stacks:
            client = stack.client()
            stack.wait_workers("p", 2, 30, client=client)
            client.close()
            client = None
        time.sleep(0.3)  # both echo workers connected to the proxy
        pids = {k: v[1] for k, v in systems.items()}
        broker_pid, workers, broker2 = pids["dspex"][0], pids["dspex"][1:], pids["broker_only_cap4"][0]
        st = stacks[0]
        order = list(systems)
        res: dict[str, list[dict[str, Any]]] = {k: [] for k in order}
        for r in range(rounds):
            for name in iter_rotated(order, r):
                ep, cpu_pids, mode, extra = systems[name]
                res[name].append(_loadgen(ws, mode, ep, duration, warmup, cpu_pids, extra))
            cfg.log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]['rate']:.0f}/s" for k, v in res.items()))

        def cpu_us(name: str, which: str) -> float:
            """Median over rounds of CPU µs per call of the hub (broker/proxy) or the two workers."""
            vals = []
            for x in res[name]:
                if not x["calls"]:
                    continue
                c = x["cpu"]
                keys = [str(pids[name][0])] if which == "hub" else [str(p) for p in pids[name][1:]]
                vals.append(sum(c[k] for k in keys) / x["calls"] * 1e6)
            return median(vals)

        def hub_split(name: str) -> dict[str, float]:
            keys = ("hub_main_user", "hub_main_sys", "hub_threads_user", "hub_threads_sys")
            return {k[4:]: median([x["cpu"][k] / x["calls"] * 1e6 for x in res[name] if x["calls"]]) for k in keys}

        def client_us(name: str) -> float:
            return median([x["loadgen_cpu"] / x["calls"] * 1e6 for x in res[name] if x["calls"]])

        rate = {k: median([x["rate"] for x in v]) for k, v in res.items()}
        ratio = median([_ratio(a["rate"], b["rate"]) for a, b in zip(res["dspex"], res["cproxy"])])
        ratio_b = median([_ratio(a["rate"], b["rate"]) for a, b in zip(res["broker_only"], res["cproxy"])])
        cpu: dict[str, dict[str, Any]] = {k: {"hub_us": cpu_us(k, "hub"), "workers_us": cpu_us(k, "workers"), "client_us": client_us(k),
                   "hub_split_us": hub_split(k)} for k in order}
        errors = sum(x["errors"] for v in res.values() for x in v)
        data = {"rounds": rounds, "duration_s": duration, "sessions": 100, "workers": 2, "inflight": 100,
                "sockets": 4, "rates": rate, "ratio": ratio, "ratio_broker_only": ratio_b, "errors": errors,
                "cpu_us_per_call": cpu, "raw": res}
        rows.append(Row("throughput", "pipelined calls/s, 100 sessions, 2 workers", f"{rate['dspex']:.0f}/s",
                        f"C proxy + 2 echo workers {rate['cproxy']:.0f}/s", f"{ratio:.2f}× C proxy", "≥ 0.35×",
                        verdict(ratio >= 0.35), data=data))
        pf = median([_ratio(a["rate"], b["rate"]) for a, b in zip(res["dspex"], res["dspex_pf0"])])
        rows.append(Row("throughput.prefetch_off", "same, pool prefetch=0 (the broker waits for each reply)",
                        f"{rate['dspex_pf0']:.0f}/s",
                        f"prefetch=1 (default) {rate['dspex']:.0f}/s; C proxy {rate['cproxy']:.0f}/s",
                        f"prefetch on {pf:.2f}× off; off {median([_ratio(a['rate'], b['rate']) for a, b in zip(res['dspex_pf0'], res['cproxy'])]):.2f}× C proxy",
                        "(info: A/B of prefetch)", data={"prefetch_on_vs_off": pf,
                                                         "broker_us_off": cpu["dspex_pf0"]["hub_us"]}))
        rows.append(Row("throughput.cap4", "same, workers --capacity 4 (threads)", f"{rate['dspex_cap4']:.0f}/s",
                        "C proxy + 2 echo workers",
                        f"{median([_ratio(a['rate'], b['rate']) for a, b in zip(res['dspex_cap4'], res['cproxy'])]):.2f}× C proxy",
                        "(info)", data={}))
        rows.append(Row("throughput.broker_only", "same, dspex broker + 2 protocol-echo workers",
                        f"{rate['broker_only']:.0f}/s", "C proxy + 2 echo workers", f"{ratio_b:.2f}× C proxy",
                        "(info: broker alone)", data={}))
        rows.append(Row("throughput.broker_only_cap4", "same, protocol-echo workers announcing capacity 4",
                        f"{rate['broker_only_cap4']:.0f}/s", "C proxy + 2 echo workers",
                        f"{median([_ratio(a['rate'], b['rate']) for a, b in zip(res['broker_only_cap4'], res['cproxy'])]):.2f}× C proxy",
                        "(info: broker alone, 4 credits/worker)", data={}))
        rows.append(Row("throughput.client", "same load via dspex.Client, 8 threads", f"{rate['client']:.0f}/s",
                        "raw DEALER load generator", f"{_ratio(rate['client'], rate['dspex']):.2f}× raw load", "(info)",
                        data={}))
        b, bo, px = cpu["dspex"]["hub_us"], cpu["broker_only_cap4"]["hub_us"], cpu["cproxy"]["hub_us"]
        split = cpu["dspex"]["hub_split_us"]
        rows.append(Row("broker_cpu", "broker CPU per request+reply (throughput run)",
                        f"{b:.1f} µs (main {split['main_user']:.0f}u+{split['main_sys']:.0f}s, "
                        f"zmq threads {split['threads_user']:.0f}u+{split['threads_sys']:.0f}s)",
                        f"C proxy {px:.1f} µs; same broker, echo workers cap 4: {bo:.1f} µs",
                        f"{_ratio(b, px):.1f}× C proxy", "≤ 15 µs", verdict(b <= 15), data={"cpu_us_per_call": cpu}))
        rows.append(Row("worker_cpu", "CPU per call in the 2 workers (throughput run)",
                        f"{cpu['dspex']['workers_us']:.1f} µs",
                        f"protocol-echo worker {cpu['broker_only']['workers_us']:.1f} µs; "
                        f"C-proxy echo worker {cpu['cproxy']['workers_us']:.1f} µs", "", "(info)", data={}))
        if cfg.profile_dir:
            out = Path(cfg.profile_dir)
            out.mkdir(parents=True, exist_ok=True)
            spies = [Spy(ws, broker_pid, str(out / "throughput_broker.txt"), duration),
                     Spy(ws, workers[0], str(out / "throughput_worker.txt"), duration, ("--threads",))]
            x = _loadgen(ws, "loadgen", st.frontend, duration + 0.5, 0.2, [broker_pid])
            for spy in spies:
                spy.wait()
            spies = [Spy(ws, broker2, str(out / "throughput_broker_only_cap4.txt"), duration)]
            y = _loadgen(ws, "loadgen", systems["broker_only_cap4"][0], duration + 0.5, 0.2, [broker2])
            for spy in spies:
                spy.wait()
            cfg.log(f"  profiled rounds: {x['rate']:.0f}/s, broker only {y['rate']:.0f}/s (py-spy attached); "
                    f"profiles in {out}")
    finally:
        if client is not None:
            client.close()
        ws.close()
    return rows


# ==========================================================================================
# LM-like I/O-bound calls: worker capacity (issue 6)
# ==========================================================================================

LM_SLEEP = 0.2  # one "LM call": the worker's thread sleeps, the GIL is free


def _lm_round(client: Any, pool: str, sessions: int, duration: float, warmup: float) -> dict[str, Any]:
    """``sessions`` threads, one session each, calling ``time.sleep(0.2)`` back to back."""
    import threading

    import dspex

    counts = [0] * sessions
    errors: list[str] = []
    state = {"counting": False, "stop": False}
    mine = [client.session(pool) for _ in range(sessions)]
    start = threading.Barrier(sessions + 1)

    def run(i: int) -> None:
        s = mine[i]
        start.wait()
        while not state["stop"]:
            try:
                s.call("time", "sleep", [LM_SLEEP], timeout=30)
                if state["counting"]:
                    counts[i] += 1
            except dspex.DspexError as err:
                errors.append(err.code)

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"lm-{i}") for i in range(sessions)]
    for th in threads:
        th.start()
    start.wait()
    time.sleep(warmup)
    state["counting"] = True
    t0 = time.monotonic()
    time.sleep(duration)
    calls = sum(counts)  # calls completed inside the window
    t1 = time.monotonic()
    state["stop"] = True
    for th in threads:
        th.join(timeout=35)
    for s in mine:
        try:
            s.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
    return {"calls": calls, "elapsed": t1 - t0, "rate": calls / (t1 - t0), "errors": len(errors),
            "error_codes": sorted(set(errors))}


def lmlike(cfg: Config) -> list[Row]:
    rounds = cfg.n_rounds(3, 1)
    duration, warmup = (1.2, 0.4) if cfg.smoke else (6.0, 1.0)
    sessions, n_workers = 32, 2
    ws = Workspace()
    clients: list[Any] = []
    try:
        stacks: dict[int, tuple[Stack, Any]] = {}
        for cap in (1, 8):
            st = Stack(ws, f"l{cap}")
            st.start_broker("p:strict_queue")
            for _ in range(n_workers):
                st.start_worker("p", "--no-dspy", "--capacity", str(cap))
            client = st.client(timeout=30)
            clients.append(client)
            stacks[cap] = (st, client)
        for st, client in stacks.values():
            st.wait_workers("p", n_workers, 30, client=client)
        res: dict[int, list[dict[str, Any]]] = {1: [], 8: []}
        order = [1, 8]
        for r in range(rounds):
            for cap in iter_rotated(order, r):
                res[cap].append(_lm_round(stacks[cap][1], "p", sessions, duration, warmup))
            cfg.log(f"  round {r + 1}/{rounds}: " + ", ".join(f"capacity {k} {v[-1]['rate']:.1f}/s" for k, v in res.items()))
        rate = {k: median([x["rate"] for x in v]) for k, v in res.items()}
        ratio = median([_ratio(b["rate"], a["rate"]) for a, b in zip(res[1], res[8])])
        ideal = {k: n_workers * min(k, sessions // n_workers) / LM_SLEEP for k in (1, 8)}
        errors = sum(x["errors"] for v in res.values() for x in v)
        data = {"rounds": rounds, "duration_s": duration, "sessions": sessions, "workers": n_workers,
                "call": f"time.sleep({LM_SLEEP})", "rates": rate, "ideal": ideal, "ratio": ratio, "errors": errors,
                "raw": res}
        return [
            Row("lmlike.cap1", f"LM-like call (sleep {LM_SLEEP * 1e3:.0f} ms), {sessions} sessions, {n_workers} workers --capacity 1",
                f"{rate[1]:.1f} calls/s", f"ideal {ideal[1]:.0f}/s (workers × capacity ÷ 0.2 s)",
                f"{_ratio(rate[1], ideal[1]):.2f}× ideal", "(info)", data=data),
            Row("lmlike.cap8", f"same, {n_workers} workers --capacity 8 (same process count)",
                f"{rate[8]:.1f} calls/s", f"capacity 1 {rate[1]:.1f}/s; ideal {ideal[8]:.0f}/s",
                f"{ratio:.2f}× capacity 1", "≈ 8× capacity 1 (≥ 7×)",
                "" if cfg.smoke else verdict(ratio >= 7.0 and errors == 0), data={}),
        ]
    finally:
        for c in clients:
            c.close()
        ws.close()


# ==========================================================================================
# crash to typed error
# ==========================================================================================

def crash(cfg: Config) -> list[Row]:
    import dspex

    rounds = cfg.n_rounds(7, 2)
    ws = Workspace()
    client = None
    rows: list[Row] = []
    name, label, target = "crash", "SIGKILL pinned worker → SessionWorkerUnavailable", "≤ 20 ms"
    try:
        st = Stack(ws, "c", heartbeat=1.0, liveness=3)
        st.start_broker("p:strict_queue")
        client = st.client(timeout=10)
        times: list[float] = []
        polls: list[int] = []
        first_errors: list[str] = []
        for r in range(rounds):
            proc = st.start_worker("p", "--no-dspy")
            wait_for(lambda: any(w["pid"] == proc.pid for w in st.workers("p", client)), 30, 0.02,
                     "the new worker")
            s = client.session("p")
            assert int(s.call("os", "getpid")) == proc.pid
            s.call("builtins", "len", [[]])
            n = 0
            first = ""
            t0 = time.perf_counter()
            os.kill(proc.pid, signal.SIGKILL)
            while True:
                n += 1
                try:
                    s.call("builtins", "len", [[]], timeout=5)
                except dspex.SessionWorkerUnavailable:
                    break
                except dspex.DspexError as err:  # e.g. worker_crashed if a call raced the kill
                    first = first or err.code
                    if time.perf_counter() - t0 > 10:
                        raise
            times.append(time.perf_counter() - t0)
            polls.append(n)
            first_errors.append(first)
            proc.wait(timeout=10)
        t = median(times)
        data: dict[str, Any] = {"rounds": rounds, "times_ms": [x * 1e3 for x in times], "polls": polls,
                                "other_errors_first": first_errors, "heartbeat_interval": 1.0, "liveness": 3}
        if cfg.smoke:
            base = "heartbeat expiry 3000 ms (1.0 s × 3, configured; measured in the full run)"
        else:
            frozen = _frozen_worker(st, client)
            data["frozen_worker_ms"] = frozen * 1e3
            base = f"heartbeat expiry (SIGSTOPped worker, measured) {ms(frozen)}; configured 1.0 s × 3"
        rows.append(Row(name, label, ms(t), base, f"{median(polls):.0f} calls polled", target,
                        verdict(t <= 0.020), data=data))
    finally:
        if client is not None:
            client.close()
        ws.close()
    return rows


def _frozen_worker(st: Stack, client: Any) -> float:
    """A worker that stops without closing its connection is caught only by heartbeat expiry."""
    import dspex

    proc = st.start_worker("p", "--no-dspy")
    wait_for(lambda: any(w["pid"] == proc.pid for w in st.workers("p", client)), 30, 0.02, "the new worker")
    s = client.session("p")
    s.call("os", "getpid")
    time.sleep(0.2)
    t0 = time.perf_counter()
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        while True:
            try:
                s.call("builtins", "len", [[]], timeout=15)
            except (dspex.WorkerCrashed, dspex.SessionWorkerUnavailable):
                return time.perf_counter() - t0
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=10)


# ==========================================================================================
# cold start, recycle, flagship (need supervisord; the first and last need colleagues' files)
# ==========================================================================================

def _supervisord() -> str:
    cand = Path(PY).parent / "supervisord"
    if cand.exists():
        return str(cand)
    from shutil import which

    found = which("supervisord")
    if found is None:
        raise FileNotFoundError("supervisord is not installed")
    return found


def coldstart(cfg: Config) -> list[Row]:
    name, label, target = "coldstart", "supervisord -c supervisor.conf → all 6 workers ready", "≤ 3 s"
    rounds = cfg.n_rounds(5, 1)
    dspy_times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", "import dspy"], env=base_env(), check=True, capture_output=True, timeout=120)
        dspy_times.append(time.perf_counter() - t0)
    dspy_t = median(dspy_times)
    conf = REPO / "supervisor.conf"
    if not conf.exists():
        row = Row.pending(name, label, target, "no supervisor.conf at the repo root yet")
        row.baseline = f"python -c 'import dspy' {secs(dspy_t)}"
        row.data = {"import_dspy_s": dspy_times}
        return [row]
    times: list[float] = []
    try:
        for _ in range(rounds):
            times.append(_one_cold_start(conf))
    except Exception as exc:  # noqa: BLE001 - colleagues' conf may be mid-change
        row = Row.error(name, label, target, f"{type(exc).__name__}: {exc}")
        row.baseline = f"python -c 'import dspy' {secs(dspy_t)}"
        return [row]
    t = median(times)
    return [Row(name, label, secs(t), f"python -c 'import dspy' {secs(dspy_t)}", f"{_ratio(t, dspy_t):.1f}× import dspy",
                target, verdict(t <= 3.0), data={"times_s": times, "import_dspy_s": dspy_times})]


def _private_conf(ws: Workspace, conf: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the project's supervisor.conf in ``ws`` (its %(here)s: sockets, pidfile, logs) and
    the environment that points the stack at ``ws``: no clash with a stack a colleague runs."""
    copy = Path(ws.path("supervisor.conf"))
    copy.write_text(conf.read_text())
    link_launcher(ws.root)  # its command= lines run %(here)s/bin/dspex-python
    for d in ("run", "log"):
        os.makedirs(ws.path(d), exist_ok=True)
    env = base_env(ws.path("r"), DSPEX_PYTHON=PY, DSPEX_METRICS_PORT="0", DSPEX_SUPERVISOR_CONF=str(copy))
    return copy, env


def _stop_daemon(ws: Workspace) -> None:
    """A supervisord that daemonized itself from our private conf (its pidfile is in ``ws``)."""
    from bench.common import starttime, descendants

    pidfile = Path(ws.path("run", "supervisord.pid"))
    if not pidfile.exists():
        return
    try:
        pid = int(pidfile.read_text().strip())
    except ValueError:
        return
    started = starttime(pid)
    if started is None:
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if ws.root.encode() not in f.read():
                return  # not the supervisord of our private conf
    except OSError:
        return
    tree = descendants(pid)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while starttime(pid) == started and time.monotonic() < deadline:
        time.sleep(0.05)
    for p, st in [(pid, started), *tree]:
        if starttime(p) == st:
            os.kill(p, signal.SIGKILL)


def _one_cold_start(conf: Path) -> float:
    import dspex

    with Workspace("dxc") as ws:
        copy, env = _private_conf(ws, conf)
        endpoint = f"ipc://{env['DSPEX_RUN_DIR']}/frontend.sock"
        t0 = time.perf_counter()
        sup = ws.procs.spawn([_supervisord(), "-n", "-c", str(copy)], "supervisord.out", env, cwd=ws.root)

        def ready() -> bool:
            ws.procs.remember_tree(sup)
            if sup.poll() is not None:
                raise RuntimeError("supervisord exited: " + ws.procs.log_tail("supervisord.out"))
            if not os.path.exists(endpoint[6:]):
                return False
            with dspex.connect(endpoint, timeout=1) as c:
                pools = c.status(timeout=1)["pools"]
            n = sum(len(p["workers"]) for p in pools.values())
            want = sum(p.get("size") or 0 for p in pools.values()) or 6
            return n >= max(want, 6)

        try:
            wait_for(ready, 60, 0.01, "all workers of supervisor.conf ready")
            return time.perf_counter() - t0
        finally:
            ws.procs.remember_tree(sup)
            ws.procs.stop(sup, signal.SIGTERM, wait=30)


_RECYCLE_CONF = """\
[unix_http_server]
file={root}/supervisor.sock

[supervisorctl]
serverurl=unix://{root}/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisord]
nodaemon=true
logfile={root}/supervisord.log
pidfile={root}/supervisord.pid
childlogdir={root}
loglevel=warn

[program:broker]
command={py} -m broker --config {root}/supervisord.conf --frontend {fe} --backend {be} --pool pd:strict_queue --pool pn:strict_queue --pool pr:strict_queue --log-level WARNING
directory={repo}
environment={env}
autorestart=true
startsecs=0
priority=10
stdout_logfile={root}/broker.log
redirect_stderr=true

[program:wd]
command={py} -m worker --pool pd --backend {be} --log-level WARNING
process_name=%(program_name)s_%(process_num)d
numprocs=2
directory={repo}
environment={env}
autorestart=true
startsecs=0
priority=20
stdout_logfile={root}/%(program_name)s_%(process_num)d.log
redirect_stderr=true

[program:wn]
command={py} -m worker --pool pn --backend {be} --no-dspy --log-level WARNING
process_name=%(program_name)s_%(process_num)d
numprocs=2
directory={repo}
environment={env}
autorestart=true
startsecs=0
priority=20
stdout_logfile={root}/%(program_name)s_%(process_num)d.log
redirect_stderr=true
"""



def recycle(cfg: Config) -> list[Row]:
    name, label, target = "recycle", "graceful recycle → new incarnation ready", "≤ 1 s"
    rounds = cfg.n_rounds(5, 1)
    try:
        supervisord = _supervisord()
    except FileNotFoundError as exc:
        return [Row.skipped(name, label, target, str(exc))]
    ws = Workspace("dxr")
    client = None
    try:
        fe, be = ws.ipc("f.sock"), ws.ipc("b.sock")
        env = base_env(ws.path("run"))
        env_s = ",".join(f'{k}="{env[k]}"' for k in ("DSPEX_RUN_DIR", "LITELLM_LOCAL_MODEL_COST_MAP", "PYTHONPATH",
                                                       "PYTHONUNBUFFERED"))
        conf = Path(ws.path("supervisord.conf"))
        conf.write_text(_RECYCLE_CONF.format(root=ws.root, py=PY, fe=fe, be=be, repo=REPO, env=env_s))
        sup = ws.procs.spawn([supervisord, "-n", "-c", str(conf)], "supervisord.out", env, cwd=REPO)
        import dspex

        wait_for(lambda: os.path.exists(fe[6:]), 30, 0.02, "broker of the recycle stack")
        client = dspex.connect(fe, timeout=10)
        st = Stack(ws, "unused")
        pools = ["pd", "pn"]
        for pool in pools:
            st.wait_workers(pool, 2, 60, client=client)
        ws.procs.remember_tree(sup)
        res: dict[str, list[dict[str, float]]] = {k: [] for k in pools}
        for r in range(rounds):
            for pool in iter_rotated(pools, r):
                res[pool].append(_one_recycle(client, st, pool))
                ws.procs.remember_tree(sup)
            cfg.log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{k} ready {v[-1]['ready']:.3f}s serving {v[-1]['serving']:.3f}s" for k, v in res.items()))
        t = {k: median([x["ready"] for x in v]) for k, v in res.items()}
        serving = {k: median([x["serving"] for x in v]) for k, v in res.items()}
        gone = {k: median([x["gone"] for x in v]) for k, v in res.items()}
        exited = {k: median([x["exited"] for x in v]) for k, v in res.items()}
        # when supervisord started the new process: ready time minus the new process's age at ready
        spawned = {k: median([x["ready"] - x["new_pid_age"] for x in v]) for k, v in res.items()}
        spawn = {k: median([x["ready"] - x["gone"] for x in v]) for k, v in res.items()}
        data = {"rounds": rounds, "raw": res, "ready_s": t, "old_gone_s": gone, "old_exited_s": exited,
                "new_spawned_s": spawned, "gone_to_ready_s": spawn, "serving_s": serving}
        client.close()
        client = None
        ws.procs.stop(sup, signal.SIGTERM, wait=20)

        def detail(k: str) -> str:
            return (f"old unregistered {ms(gone[k])}, exited {ms(exited[k])}, new process spawned {ms(spawned[k])}, "
                    f"first call served {secs(serving[k])}")

        return [
            Row(name, label + " (worker imports dspy)", secs(t["pd"]), detail("pd"), "", target,
                verdict(t["pd"] <= 1.0), data=data),
            Row(name + ".nodspy", label + " (--no-dspy worker)", secs(t["pn"]), detail("pn"), "", "(info)", data={}),
        ]
    finally:
        if client is not None:
            client.close()
        ws.close()


def _one_recycle(client: Any, st: Stack, pool: str) -> dict[str, float]:
    before = st.workers(pool, client)
    old_ids = {w["incarnation"] for w in before}
    from bench.common import starttime

    oldest = sorted(before, key=lambda w: w["uptime_s"])[-1]
    victim, vpid = oldest["incarnation"], int(oldest["pid"])
    vstart = starttime(vpid)
    t0 = time.perf_counter()
    client.recycle(pool, worker=victim)
    gone = exited = 0.0
    while True:
        ws_now = st.workers(pool, client)
        ids = {w["incarnation"] for w in ws_now}
        if not gone and victim not in ids:
            gone = time.perf_counter() - t0
        if not exited and starttime(vpid) != vstart:
            exited = time.perf_counter() - t0
        if ids - old_ids and len(ids) == len(old_ids) and victim not in ids:
            t = time.perf_counter() - t0
            new_pid = next(int(w["pid"]) for w in ws_now if w["incarnation"] not in old_ids)
            age = _age(new_pid)
            return {"ready": t, "gone": gone or t, "exited": exited or t, "new_pid_age": age, "same_pid": new_pid == vpid,
                    "serving": _first_call_on(client, pool, new_pid, t0)}
        if time.perf_counter() - t0 > 60:
            raise TimeoutError(f"no new incarnation in pool {pool} within 60 s")
        time.sleep(0.005)


def _first_call_on(client: Any, pool: str, pid: int, t0: float) -> float:
    """Seconds from ``t0`` until a call has run on worker ``pid`` (new sessions pin least-loaded first)."""
    sessions = []
    try:
        for _ in range(6):
            s = client.session(pool)
            sessions.append(s)
            if int(s.call("os", "getpid", timeout=30)) == pid:
                return time.perf_counter() - t0
        return float("nan")
    finally:
        for s in sessions:
            s.close()


def _age(pid: int) -> float:
    """Seconds since ``pid`` started (from /proc, clock ticks since boot)."""
    from bench.common import CLK_TCK, starttime

    st = starttime(pid)
    if st is None:
        return float("nan")
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    return up - st / CLK_TCK


def flagship(cfg: Config) -> list[Row]:
    name, label, target = "flagship", "dspexctl flagship wall (offline, stack start included)", "≤ 15 s"
    cmd = _dspexctl()
    try:
        probe = subprocess.run([*cmd, "flagship", "--help"], env=base_env(), capture_output=True, timeout=60, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [Row.pending(name, label, target, f"dspexctl flagship --help did not run ({exc})")]
    if probe.returncode != 0:
        why = (probe.stderr or probe.stdout).decode(errors="replace").strip().splitlines()
        return [Row.pending(name, label, target, f"`dspexctl flagship --help` exits {probe.returncode}: "
                            + (why[-1] if why else "no output"))]
    conf = REPO / "supervisor.conf"
    if not conf.exists():
        return [Row.pending(name, label, target, "no supervisor.conf at the repo root yet")]
    rounds = cfg.n_rounds(3, 1)
    times = []
    for _ in range(rounds):
        with Workspace("dxf") as ws:
            copy, env = _private_conf(ws, conf)
            t0 = time.perf_counter()
            proc = ws.procs.spawn([*cmd, "--supervisor-conf", str(copy), "flagship"], "flagship.out", env,
                                  cwd=ws.root)
            try:
                rc = proc.wait(timeout=240)
            except subprocess.TimeoutExpired:
                return [Row.error(name, label, target, "dspexctl flagship ran over 240 s")]
            finally:
                elapsed = time.perf_counter() - t0
                _stop_daemon(ws)
            times.append(elapsed)
            if rc != 0:
                return [Row.error(name, label, target, f"dspexctl flagship exited {rc}: "
                                  + ws.procs.log_tail("flagship.out", 400).replace("\n", " | "))]
    t = median(times)
    return [Row(name, label, secs(t), "", "", target, verdict(t <= 15.0), data={"times_s": times})]


def _dspexctl() -> list[str]:
    cand = Path(PY).parent / "dspexctl"
    if cand.exists():
        return [str(cand)]
    return [PY, "-c", "import sys; from dspexctl.cli import main; sys.exit(main())"]


# ==========================================================================================
# numpy round trip
# ==========================================================================================

def numpy_rt(cfg: Config) -> list[Row]:
    import numpy as np
    import zmq

    rounds = cfg.n_rounds(20, 3)
    per_round = 3 if cfg.smoke else 10
    ws = Workspace()
    client = None
    ctx = zmq.Context()
    sock = None
    try:
        st = Stack(ws, "a")
        st.start_broker("p:strict_queue")
        st.start_worker("p", "--no-dspy")
        echo_ep = ws.ipc("echo.sock")
        _spawn_server(ws, "echo.log", "echo-router", "--bind", echo_ep)
        client = st.client()
        st.wait_workers("p", 1, 30, client=client)
        s = client.session("p")
        arr = np.random.default_rng(1).random(1_000_000)
        back = s.eval("x", {"x": arr})
        assert isinstance(back, np.ndarray) and np.array_equal(back, arr)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(echo_ep)
        _wait_echo(sock, [b"x"])
        payload = arr.data

        def ours() -> None:
            s.eval("x", {"x": arr})

        def raw() -> None:
            sock.send(payload, copy=False)
            sock.recv(copy=False)

        lat = _alternate({"dspex": ours, "raw": raw}, rounds, per_round, cfg)
        p50 = {k: quantile(_pooled(v), 0.5) for k, v in lat.items()}
        r = _ratio_p50(lat, "dspex", "raw")
        return [Row("numpy", "numpy float64[1M] (8 MB) round trip via s.eval", ms(p50["dspex"]),
                    f"raw zmq echo of the same bytes {ms(p50['raw'])}", f"{r:.2f}× raw", "≤ 3×", verdict(r <= 3.0),
                    data={"rounds": rounds, "calls_per_round": per_round, "p50_ms": {k: v * 1e3 for k, v in p50.items()},
                          "ratio": r})]
    finally:
        if sock is not None:
            sock.close(0)
        if client is not None:
            client.close()
        ctx.term()
        ws.close()


# ==========================================================================================
# memory
# ==========================================================================================

def memory(cfg: Config) -> list[Row]:
    n_sessions = 1000 if cfg.smoke else 10_000
    n_cycles = 1000 if cfg.smoke else 10_000
    warm = 200 if cfg.smoke else 1000
    ws = Workspace()
    client = None
    try:
        st = Stack(ws, "m")
        broker = st.start_broker("p:strict_queue")
        wproc = st.start_worker("p")  # production worker: dspy preloaded
        client = st.client()
        st.wait_workers("p", 1, 60, client=client)
        broker_idle = rss_bytes(broker.pid)

        def cycle() -> None:
            s = client.session("p")
            s.call("builtins", "object")  # a Ref: the session holds one object on the worker
            s.close()

        for _ in range(warm):
            cycle()
        time.sleep(1.5)  # let a heartbeat pass; RSS is read from /proc, not from heartbeats
        w0 = rss_bytes(wproc.pid)
        t0 = time.perf_counter()
        for _ in range(n_cycles):
            cycle()
        cycle_s = time.perf_counter() - t0
        w1 = rss_bytes(wproc.pid)
        growth = (w1 - w0) / w0
        sessions = [client.session("p") for _ in range(n_sessions)]
        for s in sessions:
            s.call("builtins", "len", [[]])
        n_open = client.status()["broker"]["sessions"]
        b1 = rss_bytes(broker.pid)
        w2 = rss_bytes(wproc.pid)
        mb = 2**20
        data = {"sessions_open": n_open, "broker_rss_idle_mb": broker_idle / mb, "broker_rss_mb": b1 / mb,
                "worker_rss_before_mb": w0 / mb, "worker_rss_after_mb": w1 / mb, "worker_growth": growth,
                "cycles": n_cycles, "cycles_per_s": n_cycles / cycle_s, "worker_rss_with_open_sessions_mb": w2 / mb}
        rows = [
            Row("memory.broker", f"broker RSS with {n_open} open sessions", f"{b1 / mb:.1f} MB",
                f"idle broker {broker_idle / mb:.1f} MB", f"+{(b1 - broker_idle) / n_open / 1024:.2f} KB/session",
                "≤ 60 MB", verdict(b1 <= 60 * mb), data=data),
            Row("memory.worker", f"worker RSS growth over {n_cycles} session open/call/close",
                f"{growth * 100:+.2f}%", f"{w0 / mb:.1f} → {w1 / mb:.1f} MB", "", "< 5%", verdict(growth < 0.05),
                data={}),
        ]
        if cfg.smoke:
            rows[0].verdict = rows[1].verdict = ""
            rows[0].target += " at 10k (smoke: 1k)"
            rows[1].target += " at 10k (smoke: 1k)"
        return rows
    finally:
        if client is not None:
            client.close()
        ws.close()


GROUPS: dict[str, Callable[[Config], list[Row]]] = {
    "noop": noop,
    "throughput": throughput,
    "lmlike": lmlike,
    "crash": crash,
    "coldstart": coldstart,
    "recycle": recycle,
    "numpy": numpy_rt,
    "flagship": flagship,
    "memory": memory,
    "serving": serving,
    "predict": predict,
}

# the rows each group produces (for --only and for the smoke test's completeness check)
ROWS: dict[str, list[str]] = {
    "noop": ["noop.p50", "noop.p99", "noop.mp", "noop.client_broker", "noop.broker_raw", "noop.ray"],
    "throughput": ["throughput", "throughput.prefetch_off", "throughput.cap4", "throughput.broker_only", "throughput.broker_only_cap4",
                   "throughput.client", "broker_cpu", "worker_cpu"],
    "lmlike": ["lmlike.cap1", "lmlike.cap8"],
    "crash": ["crash"],
    "coldstart": ["coldstart"],
    "recycle": ["recycle", "recycle.nodspy"],
    "numpy": ["numpy"],
    "flagship": ["flagship"],
    "memory": ["memory.broker", "memory.worker"],
    "serving": ["serving.dspex", "serving.asyncify", "serving.ray"],
    "predict": PREDICT_ROWS,
}
