"""Deterministic profile of the broker's hot path: ``python -m bench.profile_broker [--capacity N]``.

Runs ``broker.broker.Broker`` in-process in a thread under cProfile, with two protocol-echo
workers (``bench.servers fake-worker``, so the workers cost nothing) and the pipelined load
generator (100 sessions, 4 DEALER sockets), and prints the broker thread's functions by own
time, per request. py-spy (``python -m bench --only throughput --profile DIR``) gives the
sampled view of the real process; this one gives exact call counts.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import threading
import time
from typing import Any

from bench.common import PY, REPO, Workspace, base_env, wait_for


def _run_once(capacity: int, duration: float, profile: bool) -> tuple[dict[str, Any], Any, int, float]:
    """One in-process broker run under load; returns (loadgen result, profile, calls, broker thread CPU s)."""
    import json
    import subprocess

    from broker.broker import Broker, BrokerOptions
    from dspex.pools import parse_pool_spec

    with Workspace("dxp") as ws:
        fe, be = ws.ipc("f.sock"), ws.ipc("b.sock")
        broker = Broker(BrokerOptions(frontend=fe, backend=be, pools=[parse_pool_spec("p:strict_queue")]))
        broker.bind()
        prof = cProfile.Profile() if profile else None
        cpu = [0.0]

        def run() -> None:
            t0 = time.thread_time()
            if prof is not None:
                prof.enable()
            try:
                broker.run()
            finally:
                if prof is not None:
                    prof.disable()
                cpu[0] = time.thread_time() - t0

        t = threading.Thread(target=run, name="broker", daemon=True)
        t.start()
        try:
            for _ in range(2):
                ws.procs.spawn([PY, "-m", "bench.servers", "fake-worker", "--backend", be, "--pool", "p",
                                "--capacity", str(capacity)], "fake.log", base_env())
            wait_for(lambda: len(broker.pools["p"].workers) == 2, 20, 0.02, "2 echo workers")
            out = subprocess.run([PY, "-m", "bench.servers", "loadgen", "--endpoint", fe, "--duration",
                                  str(duration), "--warmup", "0.3"], env=base_env(), cwd=REPO,
                                 capture_output=True, timeout=duration + 60, start_new_session=True)
            res = json.loads(out.stdout.decode().strip().splitlines()[-1])
        finally:
            broker.stop()
            t.join(timeout=5)
            broker.close()
        calls = sum(w.served for w in broker.pools["p"].workers.values()) or res["calls"]
        return res, prof, calls, cpu[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_broker")
    p.add_argument("--capacity", type=int, default=4, help="capacity the echo workers announce (credits)")
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--no-profile", action="store_true", help="run without cProfile (its overhead is ~2x)")
    a = p.parse_args(argv)
    res, prof, total_calls, cpu = _run_once(a.capacity, a.duration, not a.no_profile)
    print(f"{res['rate']:.0f} calls/s in the measured window; {total_calls} calls served in total; "
          f"broker thread {cpu / total_calls * 1e6:.1f} µs CPU/call "
          f"({'no profiler' if a.no_profile else 'under cProfile'})")
    if prof is None:
        return 0
    stats = pstats.Stats(prof, stream=io.StringIO())
    print(f"per-call cost = tottime / {total_calls} calls:")
    table: dict[Any, Any] = getattr(stats, "stats")
    for func, (cc, nc, tt, ct, callers) in sorted(table.items(), key=lambda kv: -kv[1][2])[:a.top]:
        fn = f"{func[0].split('/site-packages/')[-1].split('/work/main/')[-1]}:{func[1]}({func[2]})"
        print(f"  {tt / total_calls * 1e6:7.2f} µs own  {ct / total_calls * 1e6:7.2f} µs cum  "
              f"{nc / total_calls:5.2f} calls/req  {fn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
