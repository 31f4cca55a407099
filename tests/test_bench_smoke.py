"""The benchmark harness runs end to end (``python -m bench --smoke``) so it cannot rot, and so does
the A/B harness (``python -m bench.ab``) a maintainer reruns to compare two trees, and the
profile of both sides of a call (``python -m bench.profiles call``).

They check that every figure was produced, or marked pending/skipped with a reason; never how
fast anything was (this machine is shared and noisy; see docs/benchmarks.md for the figures).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(180)


# the groups in two runs of about the same length (each starts stacks of its own), so one slow
# machine moment cannot push a single run past its bound
HALVES = {
    "hops": ["noop", "throughput", "lmlike", "crash", "recycle", "stop", "numpy", "memory", "predict", "code", "durable"],
    "stacks": ["coldstart", "flagship", "serving", "scale", "idle", "localmodel"],
}


def test_the_halves_cover_every_group() -> None:
    from bench.figures import ROWS  # importable: pytest puts the repo root on sys.path (tests/ is a package)

    assert sorted(g for half in HALVES.values() for g in half) == sorted(ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("half", sorted(HALVES))
def test_bench_smoke_produces_every_figure(tmp_path: Path, half: str) -> None:
    from bench.figures import ROWS

    expected = [name for group in HALVES[half] for name in ROWS[group]]
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("DSPEX_ENDPOINT", "DSPEX_FRONTEND", "DSPEX_BACKEND", "DSPEX_RUN_DIR"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--smoke", "--quiet", "--only", ",".join(HALVES[half]),
                             "--json", str(out)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=165)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the bench cleans up its own processes on SIGTERM
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        pytest.fail("python -m bench --smoke took over 165 s")
    text = stdout.decode(errors="replace")
    assert proc.returncode == 0, f"bench exited {proc.returncode}\n{text}\n{stderr.decode(errors='replace')[-4000:]}"
    doc = json.loads(out.read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert sorted(rows) == sorted(expected), f"figures missing or unexpected: {sorted(set(expected) ^ set(rows))}"
    for name, row in rows.items():
        assert row["status"] in ("ok", "pending", "skipped"), f"{name}: {row['status']}: {row['reason']}"
        if row["status"] == "ok":
            assert row["ours"], f"{name} produced no figure"
        else:
            assert row["reason"], f"{name} is {row['status']} without a reason"
        assert row["figure"] in text or row["name"] in text, f"{name} missing from the printed table"
    machine = doc["machine"]
    for key in ("nproc", "cpu_model", "python", "pyzmq", "libzmq"):
        assert machine.get(key), f"machine info lacks {key}"
    assert doc["command"].startswith("python -m bench")


def test_bench_only_filter_rejects_unknown_names() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "no_such_figure"], cwd=REPO,
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert b"unknown figure" in proc.stderr


@pytest.mark.parametrize("args", [
    ["--what", "core", "--b", "HEAD", "--rounds", "2", "--calls", "500"],  # a git revision: archived, run apart
    ["--what", "tree", "--b", ".", "--rounds", "1", "--duration", "0.3"],  # stacks of both sides under load
    ["--what", "durable", "--b", ".", "--rounds", "1", "--calls", "20"],  # durable vs plain sessions, both sides
], ids=["core-vs-HEAD", "tree", "durable"])
def test_ab_harness_compares_two_trees(args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.ab", *args, "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, timeout=110, check=False, start_new_session=True)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    doc = json.loads(out.read_text())
    rounds = int(args[args.index("--rounds") + 1])
    assert len(doc["raw"]["a"]) == len(doc["raw"]["b"]) == rounds
    main_figure = {"core": "core_us", "tree": "calls_per_s", "durable": "durable_vs_plain"}[args[1]]
    fig = doc["figures"][main_figure]
    assert fig["a"] > 0 and fig["b"] > 0 and fig["a_vs_b"] > 0
    if args[1] == "tree":
        assert doc["figures"]["errors"]["a"] == doc["figures"]["errors"]["b"] == 0
    if args[1] == "durable":  # each side's broker and worker did work for each session
        assert all(doc["figures"][f"{kind}_{who}_cpu_us"]["a"] > 0 for kind in ("durable", "plain")
                   for who in ("broker", "worker"))


def test_profiles_call_holds_the_workers_measured_calls() -> None:
    """The worker's half of ``bench.profiles call`` has every measured call in it (the worker puts
    back a profile function that a call sets, so the profiler is switched between calls)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.profiles", "call", "--calls", "50", "--top", "60"], cwd=REPO,
                          env=env, capture_output=True, timeout=120, check=False, start_new_session=True)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    worker = proc.stdout.decode().split("worker main thread:")[1]
    execute = [line for line in worker.splitlines() if "worker/executor.py" in line and "(execute)" in line]
    assert execute, worker
    assert float(execute[0].split("/call")[0].split()[-1]) >= 1.0, execute[0]
