"""``python -m bench.plot RESULT.json OUT.png``: the ``scale.grid`` curve of a ``python -m bench
--only scale --json RESULT.json`` run, as a PNG.

matplotlib is the ``bench`` extra (``pip install -e '.[bench]'``); the benchmark rows never import
it, and this module imports nothing of dspex: any Python with matplotlib draws the curve.
"""

from __future__ import annotations

import json
import sys


def plot(result: str, out: str) -> int:
    """``scale.grid``'s points from a ``python -m bench --json`` file, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    with open(result) as f:
        doc = json.load(f)
    row = next((r for r in doc["rows"] if r["name"] == "scale.grid" and r["status"] == "ok"), None)
    if row is None:
        print(f"{result} has no scale.grid figures: run python -m bench --only scale --json {result}", file=sys.stderr)
        return 2
    points = row["data"]["points"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for w in sorted({p["workers"] for p in points}):
        line = sorted((p for p in points if p["workers"] == w), key=lambda p: p["sessions"])
        xs = [p["sessions"] for p in line]
        axes[0].plot(xs, [p["rate"] for p in line], marker="o", label=f"{w} workers")
        axes[1].plot(xs, [p["p99_ms"] for p in line], marker="o", label=f"{w} workers")
        axes[2].plot(xs, [p["broker_main_busy"] * 100 for p in line], marker="o", label=f"{w} workers")
    axes[2].axhline(row["data"]["saturated_at"] * 100, color="grey", linestyle="--", linewidth=1)
    for ax, title in zip(axes, ("calls/s", "p99 latency (ms)", "broker main thread busy (% of a core)")):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent sessions (one call each in flight)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    load = doc.get("machine", {}).get("loadavg_start", "?")
    fig.suptitle(f"one dspex broker, protocol-echo workers ({doc['machine'].get('nproc')} vCPUs, load average "
                 f"{' '.join(load) if isinstance(load, list) else load} at start)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m bench.plot RESULT.json OUT.png", file=sys.stderr)
        sys.exit(2)
    sys.exit(plot(sys.argv[1], sys.argv[2]))
