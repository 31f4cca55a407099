"""``dspexctl sessions list`` and ``sessions close``: the sessions of one broker, or of every
broker of a map (a ``BROKER`` column, and the brokers that could not be asked)."""

from __future__ import annotations

import time
from typing import Any

from dspex.wire.errors import ConnectionError, PoolNotFound, Timeout
from dspexctl.commands import (
    EXIT_OK,
    NotFound,
    Settings,
    exit_code_for,
    fmt_duration,
    table,
)


def listed_sessions(settings: Settings, pool: str | None) -> tuple[list[tuple[Settings, dict[str, Any]]],
                                                                    list[dict[str, Any]]]:
    """Every session (of ``pool``) with the settings of its broker, broker by broker with a map
    of brokers; and the brokers of the map that could not be asked (``endpoint``, ``code``,
    ``message``, ``exit``). Without a map the broker's failure raises."""
    brokers = settings.broker_map()
    if pool and brokers is not None:
        brokers.broker_for(pool)  # a pool the map sends nowhere: PoolNotFound
    found: list[tuple[Settings, dict[str, Any]]] = []
    unreachable: list[dict[str, Any]] = []
    for sub in settings.each_broker():
        endpoint = sub.resolved_endpoint()
        if pool and brokers is not None and not brokers.serves(endpoint, pool):
            continue
        try:
            with sub.client() as dx:
                if pool:
                    pools = dx.status()["pools"]
                    if pool not in pools:
                        raise PoolNotFound(f"no pool named {pool!r}; pools: {', '.join(pools)}")
                found += [(sub, s) for s in dx.sessions(pool)]
        except (ConnectionError, Timeout) as err:
            if brokers is None:
                raise
            unreachable.append({"endpoint": endpoint, "code": err.code, "message": err.message,
                                "exit": exit_code_for(err)})
    return found, unreachable


def _unreachable_lines(result: dict[str, Any]) -> list[str]:
    return [f"UNREACHABLE: broker {u['endpoint']}: {u['message']}" for u in result["unreachable"]]


class _SessionsCommand:
    def exit_code(self, result: dict[str, Any]) -> int:
        return int(result["unreachable"][0]["exit"]) if result["unreachable"] else EXIT_OK


class SessionsList(_SessionsCommand):
    def request(self, pool: str | None = None) -> dict[str, Any]:
        return {"pool": pool}

    def execute(self, settings: Settings, req: dict[str, Any]) -> dict[str, Any]:
        listed, unreachable = listed_sessions(settings, req["pool"])
        mapped = settings.broker_map() is not None
        sessions = [{**s, "endpoint": sub.resolved_endpoint()} if mapped else s for sub, s in listed]
        return {"pool": req["pool"], "sessions": sessions, "unreachable": unreachable}

    def present(self, result: dict[str, Any]) -> str:
        sessions = result["sessions"]
        owners = any(s.get("owner") for s in sessions)  # shown when the broker reports who opened them
        brokers = any("endpoint" in s for s in sessions)  # a map of brokers
        rows = [["SESSION", "POOL", *(["BROKER"] if brokers else []), *(["OWNER"] if owners else []), "WORKER",
                 "CALLS", "IDLE", "AGE", "DURABLE"]]
        now = time.time()
        for s in sessions:
            worker = (s["worker"][:8] or "-") + ("" if s["worker_alive"] or not s["worker"] else " (gone)")
            rows.append([s["id"], s["pool"], *([s["endpoint"]] if brokers else []),
                         *([str(s.get("owner") or "-")] if owners else []), worker,
                         str(s["calls"]), fmt_duration(s["idle_s"]), fmt_duration(now - s["created"]),
                         _durable_cell(s)])
        lines = table(rows) if len(rows) > 1 else ["no sessions" + (f" in {result['pool']}" if result["pool"] else "")]
        return "\n".join([*lines, *_unreachable_lines(result)])


def _durable_cell(s: dict[str, Any]) -> str:
    """"no" (and why, for a session that was durable), or the size and age of the session's
    last checkpoint."""
    if not s.get("durable"):
        why = str(s.get("no_longer_durable") or "")
        return f"no (no longer: {why if len(why) <= 80 else why[:77] + '...'})" if why else "no"
    if s.get("checkpoint_age_s") is None:
        return "yes (no checkpoint yet)"
    size = float(s.get("checkpoint_bytes") or 0)
    shown = f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 1024:.1f} KB"
    return f"yes ({shown}, {fmt_duration(s['checkpoint_age_s'])} ago)"


class SessionsClose(_SessionsCommand):
    """Close one session (id or unique prefix) or every session matching --pool/--idle/--all."""

    def request(self, session: str | None = None, pool: str | None = None, idle: float | None = None,
                all: bool = False) -> dict[str, Any]:
        session = (session or "").strip() or None
        bulk = pool is not None or idle is not None or all
        if session and bulk:
            raise NotFound("usage", "give a session id, or --pool/--idle/--all, not both")
        if not session and not bulk:
            raise NotFound("usage", "which sessions? give an id (or unique prefix), --pool P, --idle SECONDS or --all")
        return {"session": session, "pool": pool, "idle": idle, "all": all}

    def execute(self, settings: Settings, req: dict[str, Any]) -> dict[str, Any]:
        listed, unreachable = listed_sessions(settings, req["pool"])
        if req["session"]:
            key = req["session"]
            targets = [(sub, s) for sub, s in listed if s["id"].startswith(key)]
            if len(targets) != 1:
                unasked = f"; {len(unreachable)} broker(s) could not be asked" if unreachable else ""
                raise NotFound("session_not_found", f"{key!r} matches {len(targets)} sessions"
                               + (" (give more characters)" if targets else "") + unasked)
        else:
            targets = [(sub, s) for sub, s in listed if req["idle"] is None or s["idle_s"] >= req["idle"]]
        by_broker: dict[str, tuple[Settings, list[dict[str, Any]]]] = {}
        for sub, s in targets:
            by_broker.setdefault(sub.resolved_endpoint(), (sub, []))[1].append(s)
        closed = []
        for endpoint, (sub, group) in by_broker.items():
            with sub.client() as dx:
                for s in group:
                    result = dx.close_session(s["id"])
                    closed.append({"session": s["id"], "pool": s["pool"], "closed": bool(result.get("closed")),
                                   "released": bool(result.get("released")),
                                   **({"endpoint": endpoint} if settings.broker_map() is not None else {})})
        return {"criteria": {k: req[k] for k in ("session", "pool", "idle", "all")}, "sessions": closed,
                "unreachable": unreachable}

    def present(self, result: dict[str, Any]) -> str:
        lines = [f"closed {s['session']}" + ("" if s["released"] else " (its worker was gone)")
                 for s in result["sessions"] if s["closed"]]
        gone = len(result["sessions"]) - len(lines)
        if result["criteria"]["session"] is None:
            lines.append(f"{len(lines)} session(s) closed" + (f", {gone} already gone" if gone else ""))
        return "\n".join([*lines, *_unreachable_lines(result)])
