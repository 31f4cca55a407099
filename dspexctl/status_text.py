"""The text of ``dspexctl pools status``: the pools table (with ``--verbose`` each pool's workers),
the health window's failed answers, the broker's and supervisord's lines and the issues, made
from the result ``dspexctl.status.PoolsStatus`` gathered (the same dict ``--json`` prints).
"""

from __future__ import annotations

from typing import Any

from dspex.stack.health import RECYCLE, SERVICE, USER, fmt_window, last_failure
from dspexctl.commands import fmt_bytes, fmt_duration, fmt_ms, metrics_text, table


def status_text(result: dict[str, Any]) -> str:
    """The whole text: one section per broker for a map of brokers."""
    if "brokers" not in result:
        return stack_text(result)
    sections = [f"broker {part['endpoint']} ({', '.join(part['routes'])})\n"
                + stack_text({**part, "verbose": result["verbose"]}) for part in result["brokers"]]
    count = len(result["brokers"])
    return "\n\n".join([*sections, f"{count} broker{'s' if count != 1 else ''}: {result['health'].upper()}"])


def stack_text(result: dict[str, Any]) -> str:
    """One stack's part: its pools, failures, broker, supervisord and issues."""
    rows = [["POOL", "AFFINITY", "WORKERS", "READY", "BUSY", "SESSIONS", "QUEUED", "OK", "ERR", "P50", "P99",
             "STATE"]]
    for p in result["pools"]:
        counts = [str(p[k]) if p["in_broker"] else "-"
                  for k in ("ready", "busy", "sessions", "queued", "requests_ok", "requests_error")]
        rows.append([p["name"], p["affinity"] or "-", f"{p['total']}/{p['expected']}", *counts,
                     fmt_ms(p["latency_p50_ms"]), fmt_ms(p["latency_p99_ms"]), p["health"].upper()])
    lines = table(rows) if result["pools"] else []  # no header over nothing (no pool known)
    if result["verbose"]:
        out = [lines[0]]
        for line, p in zip(lines[1:], result["pools"]):
            out.append(line)
            wrows = [["PROCESS", "HOST", "ID", "PID", "STATE", "SLOTS", "SESSIONS", "SERVED", "RSS", "UPTIME",
                      "HEARTBEAT"]]
            for w in p["workers"]:
                hb = w["last_heartbeat_s"]
                reg = w["id"] is not None
                wrows.append([w["process"] or "-", w["host"] or "-", w["id"] or "-", str(w["pid"] or "-"),
                              ("preparing" if w.get("preparing") else w["state"]) if reg
                              else (w["process_state"] or "?").lower(),
                              f"{w['inflight']}/{w['capacity']}" if reg else "-",
                              str(w["sessions"]) if reg else "-", str(w["served"]) if reg else "-",
                              fmt_bytes(w["rss"] or 0), fmt_duration(w["uptime_s"]) if reg else "-",
                              f"{hb:.1f}s ago" if hb is not None else "-"])
            if len(wrows) > 1:  # no header over nothing (supervisord down: no processes known)
                out.extend(table(wrows, indent="    "))
        lines = out
    lines += failures_text(result["pools"])
    b = result["broker"]
    if b is not None:
        lines.append(f"broker: pid {b['pid']}, up {fmt_duration(b['uptime_s'])}, {b['sessions']} sessions, "
                     f"{b['frontend']}")
        lines.append(metrics_text(b.get("metrics") or {})[0])
    s = result["supervisor"]
    if s is not None and s.get("unused"):
        lines.append(f"supervisord: not used: {s['unused']}")
    if s is not None and s["state"] is not None:
        lines.append(f"supervisord: {s['state']}, pid {s['pid']}, {s['conf']}")
        pool_names = {q["name"] for q in result["pools"]}
        others = [p for p in s["processes"] if p["group"] not in pool_names]
        if result["verbose"] or result["broker"] is None:  # without a broker, supervisord's view is all there is
            shown = s["processes"] if result["broker"] is None else others
            lines.extend(table([[p["name"], p["state"], p["description"]] for p in shown], indent="    "))
    for issue in result["issues"]:
        lines.append(f"{issue['state'].upper()}: {issue['text']}")
    return "\n".join(lines)


def failures_text(pools: list[dict[str, Any]]) -> list[str]:
    """The health window's failed answers per pool, when any: the service's (what WARN
    counts), the callers' own (user code raising, cancels, usage errors) and those to sessions
    whose worker an operator recycled or stopped."""
    def total(p: dict[str, Any], kind: str) -> int:
        return sum(p["failures"][kind].values())

    shown = [p for p in pools if p["in_broker"] and any(total(p, k) for k in (SERVICE, USER, RECYCLE))]
    if not shown:
        return []
    rows = [["POOL", "LAST", "SERVICE", "USER", "RECYCLE"]]
    rows += [[p["name"], fmt_window(p["health_window"] or 0), str(total(p, SERVICE)), str(total(p, USER)),
              str(total(p, RECYCLE))] for p in shown]
    causes = [f"    {line}" for p in shown if (line := last_failure(p["name"], p["last_failures"]))]
    return ["failed answers in the health window (only SERVICE counts toward WARN):", *table(rows, indent="    "),
            *causes]
