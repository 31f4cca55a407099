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
    panels = (("rate", "calls/s", 1.0), ("p99_ms", "p99 latency (ms)", 1.0),
              ("broker_us_per_call", "broker CPU per call (µs, all threads)", 1.0),
              ("broker_rss_mb", "broker RSS at the end of the block (MB)", 1.0),
              ("broker_main_busy", "broker main thread busy (% of a core)", 100.0))
    fig, grid = plt.subplots(2, 3, figsize=(15, 8))
    axes = list(grid.flat)
    for w in sorted({p["workers"] for p in points}):
        line = sorted((p for p in points if p["workers"] == w), key=lambda p: p["sessions"])
        for ax, (key, _, scale) in zip(axes, panels):
            ax.plot([p["sessions"] for p in line], [p[key] * scale for p in line], marker="o", label=f"{w} workers")
    axes[4].axhline(row["data"]["saturated_at"] * 100, color="grey", linestyle="--", linewidth=1)
    for ax, (_, title, _) in zip(axes, panels):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent sessions (one call each in flight)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    axes[5].axis("off")
    load = doc.get("group_loadavg", {}).get("scale") or doc.get("machine", {}).get("loadavg_start") or ["?"]
    axes[5].text(0, 0.5, f"one broker carries ≈ {row['data']['carries_calls_per_s']:.0f} calls/s\n"
                 "(1 s ÷ its CPU per call, median of the points)\n\n"
                 f"{doc['machine'].get('nproc')} vCPUs, load average {' '.join(load[:3])}\n"
                 f"commit {doc.get('commit', '?')}\n{doc['command']}", fontsize=10, wrap=True)
    fig.suptitle("one dspex broker, protocol-echo workers, pipelined load (medians over rounds)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m bench.plot RESULT.json OUT.png", file=sys.stderr)
        sys.exit(2)
    sys.exit(plot(sys.argv[1], sys.argv[2]))
