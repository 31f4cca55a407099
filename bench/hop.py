"""Groups ``noop`` and ``throughput``: the hop itself.

``noop``: sequential no-op calls on a pinned session against the C ``zmq.proxy``, a direct echo,
``multiprocessing.Pool.apply``, the broker decomposed (protocol-echo worker, raw DEALER), and a
Ray actor call (``noop.ray``, with a private Ray up). ``throughput``: the pipelined load of
``bench.servers loadgen`` (100 sessions, one call each in flight) against the C proxy, with the
CPU per call of the broker and the workers.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    BROKER_CPU_GOAL_US,
    NOOP_GOAL,
    PY,
    REPO,
    Config,
    Row,
    Stack,
    Workspace,
    alternate,
    base_env,
    iter_rotated,
    median,
    pooled,
    quantile,
    ratio_of,
    ratio_p50,
    spawn_server,
    us,
    venv_bin,
    verdict,
    wait_echo,
)
from bench.rayhead import local_ray, ray_missing


class Spy:
    """``py-spy record`` of one pid in raw (collapsed-stack) form, for the profile report."""

    def __init__(self, ws: Workspace, pid: int, out: str, duration: float, extra: tuple[str, ...] = ()) -> None:
        exe = venv_bin("py-spy")
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


def noop(cfg: Config) -> list[Row]:
    import zmq

    from dspex.wire import codec
    from dspex.wire.headers import RequestHeader

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
        spawn_server(ws, "echo.log", "echo-router", "--bind", echo_ep)
        spawn_server(ws, "proxy.log", "proxy", "--frontend", pf_ep, "--backend", pb_ep)
        spawn_server(ws, "proxy-echo.log", "echo-dealer", "--connect", pb_ep)
        st2 = Stack(ws, "u")  # the same broker with a worker reduced to the wire protocol
        st2.start_broker("p:strict_queue")
        spawn_server(ws, "fake-worker.log", "fake-worker", "--backend", st2.backend, "--pool", "p")
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
            wait_echo(sock, frames)
        # raw frames through the dspex broker to the protocol-echo worker: the broker without the Client
        braw.setsockopt(zmq.LINGER, 0)
        braw.connect(st2.frontend)
        braw_frames = [RequestHeader("call", 1, "p", s2.id, "", 60000).pack(), frames[1]]
        wait_echo(braw, braw_frames)

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
        lat = alternate(systems, rounds, per_round, cfg)
        p50 = {k: quantile(pooled(v), 0.5) for k, v in lat.items()}
        p99 = {k: quantile(pooled(v), 0.99) for k, v in lat.items()}
        r50 = ratio_p50(lat, "dspex", "cproxy")
        r99 = p99["dspex"] / p50["dspex"]
        data = {"rounds": rounds, "calls_per_round": per_round,
                "p50_us": {k: v * 1e6 for k, v in p50.items()}, "p99_us": {k: v * 1e6 for k, v in p99.items()},
                "ratio_p50_vs_cproxy": r50, "ratio_p99_vs_own_p50": r99,
                "ratios_p50": {k: ratio_p50(lat, k, "cproxy") for k in lat}}
        rows.append(Row("noop.p50", "no-op pinned call p50 (sequential)", us(p50["dspex"]),
                        f"C proxy {us(p50['cproxy'])}; direct echo {us(p50['direct'])}",
                        f"{r50:.2f}× C proxy", f"≤ {NOOP_GOAL}× C proxy", verdict(r50 <= NOOP_GOAL), data=data))
        rows.append(Row("noop.p99", "no-op pinned call p99 (sequential)", us(p99["dspex"]),
                        f"C proxy p99 {us(p99['cproxy'])}", f"{r99:.2f}× own p50", "≤ 2× own p50",
                        verdict(r99 <= 2.0)))
        rows.append(Row("noop.mp", "multiprocessing.Pool.apply, same payload", us(p50["dspex"]),
                        f"mp {us(p50['mp'])} p50, {us(p99['mp'])} p99", f"{ratio_p50(lat, 'dspex', 'mp'):.2f}× mp",
                        "(info)"))
        rows.append(Row("noop.client_broker", "  decomposition: Client → dspex broker → protocol-echo worker",
                        us(p50["client_broker"]), f"C proxy {us(p50['cproxy'])}",
                        f"{ratio_p50(lat, 'client_broker', 'cproxy'):.2f}× C proxy", "(info)"))
        rows.append(Row("noop.broker_raw", "  decomposition: raw DEALER → dspex broker → protocol-echo worker",
                        us(p50["broker_raw"]), f"C proxy {us(p50['cproxy'])}",
                        f"{ratio_p50(lat, 'broker_raw', 'cproxy'):.2f}× C proxy", "(info)"))
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


def _noop_ray(cfg: Config, ours: Callable[[], None], rounds: int, per_round: int) -> Row:
    """``ours`` (a strict_queue pool) against a Ray actor call, alternating, while Ray's daemons run."""
    name, label, target = "noop.ray", "no-op pinned call p50 vs a Ray actor call", "≤ 0.35× Ray"
    missing = ray_missing()
    if missing:
        return Row.skipped(name, label, target, missing)
    if cfg.smoke:
        return Row.skipped(name, label, target, "smoke mode (ray.init alone takes seconds); run the full bench")
    import ray

    try:
        with local_ray() as head:
            actor = _ray_actor_factory().remote()
            ray.get(actor.call.remote([]))

            def call_ray() -> None:
                ray.get(actor.call.remote([]))

            lat = alternate({"dspex": ours, "ray": call_ray}, rounds, per_round, cfg)
            n_ray = len(head.pids())
        p50 = {k: quantile(pooled(v), 0.5) for k, v in lat.items()}
        r = ratio_p50(lat, "dspex", "ray")
        data = {"p50_us": {k: v * 1e6 for k, v in p50.items()},
                "p99_us": {k: quantile(pooled(v), 0.99) * 1e6 for k, v in lat.items()},
                "ratio": r, "ratio_rounds": [ratio_p50({k: [v[i]] for k, v in lat.items()}, "dspex", "ray")
                                             for i in range(len(lat["dspex"]))],
                "ray": ray.__version__, "ray_processes": n_ray,
                "note": "measured while Ray's daemons run (both sides)"}
        return Row(name, label, f"{us(p50['dspex'])} (with Ray up)", f"Ray actor {us(p50['ray'])}", f"{r:.2f}× Ray",
                   target, verdict(r <= 0.35), data=data)
    except Exception as exc:  # noqa: BLE001 - a baseline failing must not sink the run
        return Row.error(name, label, target, f"ray baseline failed: {type(exc).__name__}: {exc}")


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

def loadgen(ws: Workspace, mode: str, endpoint: str, duration: float, warmup: float, cpu_pids: list[int],
             extra: list[str] | None = None) -> dict[str, Any]:
    args = [PY, "-m", "bench.servers", mode, "--endpoint", endpoint, "--pool", "p", "--sessions", "100",
            "--duration", str(duration), "--warmup", str(warmup), *(extra or [])]
    for pid in cpu_pids:
        args += ["--cpu-pid", str(pid)]
    proc = subprocess.run(args, env=base_env(), cwd=REPO, capture_output=True, timeout=duration + warmup + 60,
                          start_new_session=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    return dict(json.loads(proc.stdout.decode().strip().splitlines()[-1]))


def throughput(cfg: Config) -> list[Row]:
    rounds = cfg.n_rounds(5, 1)
    duration, warmup = (0.5, 0.2) if cfg.smoke else (3.0, 0.5)
    ws = Workspace()
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
            fakes = [spawn_server(ws, "fake-worker.log", "fake-worker", "--backend", st.backend, "--pool", "p",
                                   "--capacity", cap) for _ in range(2)]
            stacks.append(st)
            systems[name] = (st.frontend, [broker.pid, *(f.pid for f in fakes)], "loadgen", [])
        pf_ep, pb_ep = ws.ipc("pf.sock"), ws.ipc("pb.sock")
        proxy = spawn_server(ws, "proxy.log", "proxy", "--frontend", pf_ep, "--backend", pb_ep)
        echoes = [spawn_server(ws, "proxy-echo.log", "echo-dealer", "--connect", pb_ep) for _ in range(2)]
        systems["cproxy"] = (pf_ep, [proxy.pid, *(e.pid for e in echoes)], "loadgen", [])
        systems["client"] = (systems["dspex"][0], systems["dspex"][1], "loadgen-client", ["--threads", "8"])
        for stack in stacks:
            stack.wait_workers("p", 2, 30)
        time.sleep(0.3)  # both echo workers connected to the proxy
        pids = {k: v[1] for k, v in systems.items()}
        broker_pid, workers, broker2 = pids["dspex"][0], pids["dspex"][1:], pids["broker_only_cap4"][0]
        st = stacks[0]
        order = list(systems)
        res: dict[str, list[dict[str, Any]]] = {k: [] for k in order}
        for r in range(rounds):
            for name in iter_rotated(order, r):
                ep, cpu_pids, mode, extra = systems[name]
                res[name].append(loadgen(ws, mode, ep, duration, warmup, cpu_pids, extra))
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
        ratio = median([ratio_of(a["rate"], b["rate"]) for a, b in zip(res["dspex"], res["cproxy"])])
        ratio_b = median([ratio_of(a["rate"], b["rate"]) for a, b in zip(res["broker_only"], res["cproxy"])])
        cpu: dict[str, dict[str, Any]] = {k: {"hub_us": cpu_us(k, "hub"), "workers_us": cpu_us(k, "workers"), "client_us": client_us(k),
                   "hub_split_us": hub_split(k)} for k in order}
        errors = sum(x["errors"] for v in res.values() for x in v)
        data = {"rounds": rounds, "duration_s": duration, "sessions": 100, "workers": 2, "inflight": 100,
                "sockets": 4, "rates": rate, "ratio": ratio, "ratio_broker_only": ratio_b, "errors": errors,
                "cpu_us_per_call": cpu, "raw": res}
        rows.append(Row("throughput", "pipelined calls/s, 100 sessions, 2 workers", f"{rate['dspex']:.0f}/s",
                        f"C proxy + 2 echo workers {rate['cproxy']:.0f}/s", f"{ratio:.2f}× C proxy", "≥ 0.35×",
                        verdict(ratio >= 0.35), data=data))
        pf = median([ratio_of(a["rate"], b["rate"]) for a, b in zip(res["dspex"], res["dspex_pf0"])])
        rows.append(Row("throughput.prefetch_off", "same, pool prefetch=0 (the broker waits for each reply)",
                        f"{rate['dspex_pf0']:.0f}/s",
                        f"prefetch=4 (default) {rate['dspex']:.0f}/s; C proxy {rate['cproxy']:.0f}/s",
                        f"prefetch on {pf:.2f}× off; off {median([ratio_of(a['rate'], b['rate']) for a, b in zip(res['dspex_pf0'], res['cproxy'])]):.2f}× C proxy",
                        "(info: A/B of prefetch)", data={"prefetch_on_vs_off": pf,
                                                         "broker_us_off": cpu["dspex_pf0"]["hub_us"]}))
        rows.append(Row("throughput.cap4", "same, workers --capacity 4 (threads)", f"{rate['dspex_cap4']:.0f}/s",
                        "C proxy + 2 echo workers",
                        f"{median([ratio_of(a['rate'], b['rate']) for a, b in zip(res['dspex_cap4'], res['cproxy'])]):.2f}× C proxy",
                        "(info)", data={}))
        rows.append(Row("throughput.broker_only", "same, dspex broker + 2 protocol-echo workers",
                        f"{rate['broker_only']:.0f}/s", "C proxy + 2 echo workers", f"{ratio_b:.2f}× C proxy",
                        "(info: broker alone)", data={}))
        rows.append(Row("throughput.broker_only_cap4", "same, protocol-echo workers announcing capacity 4",
                        f"{rate['broker_only_cap4']:.0f}/s", "C proxy + 2 echo workers",
                        f"{median([ratio_of(a['rate'], b['rate']) for a, b in zip(res['broker_only_cap4'], res['cproxy'])]):.2f}× C proxy",
                        "(info: broker alone, 4 credits/worker)", data={}))
        rows.append(Row("throughput.client", "same load via dspex.Client, 8 threads", f"{rate['client']:.0f}/s",
                        "raw DEALER load generator", f"{ratio_of(rate['client'], rate['dspex']):.2f}× raw load", "(info)",
                        data={}))
        b, bo, px = cpu["dspex"]["hub_us"], cpu["broker_only_cap4"]["hub_us"], cpu["cproxy"]["hub_us"]
        split = cpu["dspex"]["hub_split_us"]
        rows.append(Row("broker_cpu", "broker CPU per request+reply (throughput run)",
                        f"{b:.1f} µs (main {split['main_user']:.0f}u+{split['main_sys']:.0f}s, "
                        f"zmq threads {split['threads_user']:.0f}u+{split['threads_sys']:.0f}s)",
                        f"C proxy {px:.1f} µs; same broker, echo workers cap 4: {bo:.1f} µs",
                        f"{ratio_of(b, px):.1f}× C proxy", f"≤ {BROKER_CPU_GOAL_US} µs", verdict(b <= BROKER_CPU_GOAL_US),
                        data={"cpu_us_per_call": cpu}))
        rows.append(Row("worker_cpu", "CPU per call in the 2 workers (throughput run)",
                        f"{cpu['dspex']['workers_us']:.1f} µs",
                        f"protocol-echo worker {cpu['broker_only']['workers_us']:.1f} µs; "
                        f"C-proxy echo worker {cpu['cproxy']['workers_us']:.1f} µs", "", "(info)", data={}))
        if cfg.profile_dir:
            out = Path(cfg.profile_dir)
            out.mkdir(parents=True, exist_ok=True)
            spies = [Spy(ws, broker_pid, str(out / "throughput_broker.txt"), duration),
                     Spy(ws, workers[0], str(out / "throughput_worker.txt"), duration, ("--threads",))]
            x = loadgen(ws, "loadgen", st.frontend, duration + 0.5, 0.2, [broker_pid])
            for spy in spies:
                spy.wait()
            spies = [Spy(ws, broker2, str(out / "throughput_broker_only_cap4.txt"), duration)]
            y = loadgen(ws, "loadgen", systems["broker_only_cap4"][0], duration + 0.5, 0.2, [broker2])
            for spy in spies:
                spy.wait()
            cfg.log(f"  profiled rounds: {x['rate']:.0f}/s, broker only {y['rate']:.0f}/s (py-spy attached); "
                    f"profiles in {out}")
    finally:
        ws.close()
    return rows
