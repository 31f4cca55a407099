"""Group ``stop``: ``dspexctl stop`` on an idle stack of a private copy of ``supervisor.conf`` (6
workers and the broker), against supervisord's own shutdown (``supervisorctl shutdown``, then
waiting for supervisord to exit: what ``dspexctl stop`` did before), alternating each round.

supervisord's shutdown stops one process group per turn of its main loop, and a turn waits up to
a second for I/O; ``dspexctl stop`` stops every worker group at once and polls supervisord (each
request wakes its loop) until they are reaped, then shuts it down (the broker last).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.common import (
    PY,
    REPO,
    Config,
    Row,
    Workspace,
    iter_rotated,
    median,
    ratio_of,
    secs,
    venv_bin,
    verdict,
)
from bench.shipped import private_conf, stop_daemon

TARGET_S = 1.5


def _one_stop(conf: Path, how: str) -> float:
    with Workspace("dxt") as ws:
        copy, env = private_conf(ws, conf)
        try:
            subprocess.run([PY, "-m", "dspexctl", "pools", "start", "--wait", "150"], env=env, cwd=ws.root,
                           check=True, capture_output=True, timeout=200)
            time.sleep(1.0)  # idle
            pid = int(Path(ws.path("run", "supervisord.pid")).read_text().strip())
            t0 = time.perf_counter()
            if how == "dspexctl":
                subprocess.run([PY, "-m", "dspexctl", "stop"], env=env, cwd=ws.root, check=True, capture_output=True,
                               timeout=120)
            else:
                subprocess.run([venv_bin("supervisorctl") or "supervisorctl", "-c", str(copy), "shutdown"], env=env, cwd=ws.root, check=True,
                               capture_output=True, timeout=120)
                while Path(f"/proc/{pid}").exists():
                    time.sleep(0.01)
            return time.perf_counter() - t0
        finally:
            stop_daemon(ws)


def stop(cfg: Config) -> list[Row]:
    name, label = "stop", "dspexctl stop, idle supervisor.conf stack (6 workers + broker)"
    target = f"≤ {TARGET_S:g} s"
    if cfg.smoke and not cfg.rounds:
        return [Row.skipped(name, label, target, "--smoke: each round starts the whole stack twice "
                            "(python -m bench --only stop)")]
    conf = REPO / "supervisor.conf"
    times: dict[str, list[float]] = {"dspexctl": [], "supervisord": []}
    for r in range(cfg.n_rounds(5, 1)):
        for how in iter_rotated(list(times), r):
            times[how].append(_one_stop(conf, how))
    ours, base = median(times["dspexctl"]), median(times["supervisord"])
    return [Row(name, label, secs(ours), f"supervisorctl shutdown + exit {secs(base)}",
                f"{ratio_of(ours, base):.2f}× supervisord's shutdown", target, verdict(ours <= TARGET_S),
                data={"times_s": times})]
