"""Helpers of the flagship flow that talk to the broker (pool readiness, recycles), watch a local
model server, or format what came back (``lm.history`` rows, labels, wrapped text). Public dspex
client API only; no dspy."""

from __future__ import annotations

import re
import socket
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import dspex
from dspex.errors import Timeout

Out = Callable[[str], None]
POOLS = ("triage_pool", "optimizer_pool", "analytics_pool")

def short(worker: str) -> str:
    return worker[:8] if worker else "-"


def score(pred: dict[str, Any], category: str, urgency: str) -> float:
    def same(a: Any, b: str) -> bool:
        return str(a or "").strip().lower() == b.strip().lower()

    return 0.5 * same(pred.get("category"), category) + 0.5 * same(pred.get("urgency"), urgency)


def one_line(text: Any, width: int = 90) -> str:
    flat = re.sub(r"\s+", " ", str(text)).strip()
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def workers_by_incarnation(client: dspex.Client) -> dict[str, dict[str, Any]]:
    """incarnation -> worker row (with its pool) from the broker status."""
    rows: dict[str, dict[str, Any]] = {}
    for pool_name, pool in client.status(timeout=10)["pools"].items():
        for w in pool["workers"]:
            rows[w["incarnation"]] = {**w, "pool": pool_name}
    return rows


def wait_pools_ready(client: dspex.Client, pools: tuple[str, ...] = POOLS, *, timeout: float = 60.0,
                     out: Out = print, need: dict[str, int] | None = None,
                     what: str = "waiting for workers") -> dict[str, int]:
    """Wait until each pool has its declared number of ready workers (at least ``need[pool]``).

    Returns ready counts. A pool still short after ``timeout`` but with one worker is a warning; a
    pool with none is an error; an undeclared pool is :class:`dspex.PoolNotFound`.
    """
    need = dict(need or {})
    deadline = time.monotonic() + timeout
    said = ""
    while True:
        status = client.status(timeout=10)["pools"]
        missing = [p for p in pools if p not in status]
        if missing:
            raise dspex.PoolNotFound(f"the broker has no pool {', '.join(missing)} (it serves: "
                                     f"{', '.join(sorted(status)) or 'none'}); declare it in supervisor.conf")
        ready = {p: sum(1 for w in status[p]["workers"] if w["state"] != "draining") for p in pools}
        wanted = {p: max(int(status[p].get("size") or 0), need.get(p, 1)) for p in pools}
        short = {p: (ready[p], wanted[p]) for p in pools if ready[p] < wanted[p]}
        if not short:
            return ready
        line = ", ".join(f"{p} {have}/{want}" for p, (have, want) in short.items())
        if line != said:
            out(f"  {what}: {line}")
            said = line
        if time.monotonic() > deadline:
            empty = [p for p, (have, _) in short.items() if have == 0]
            if empty:
                raise Timeout(f"no ready worker in {', '.join(empty)} after {timeout:g}s", op="wait_pools")
            out(f"WARNING: pools still short after {timeout:g}s ({line}); going on")
            return ready
        time.sleep(0.1)


def recycle_and_wait(client: dspex.Client, pool: str, worker: str, *, out: Out, timeout: float = 60.0,
                     replacement_timeout: float = 30.0) -> float:
    """Recycle one worker incarnation (like ``dspexctl workers recycle``) and wait until it has
    left the broker, then until the pool is back to its declared size (supervisord restarts the
    worker as a new incarnation; without supervisord, going on with >= 1 worker after
    ``replacement_timeout``). Returns the seconds it took."""
    started = time.monotonic()
    client.recycle(pool, worker=worker, timeout=10)
    out(f"  recycling {pool} worker {short(worker)} (dspexctl workers recycle {pool} {short(worker)})")
    deadline = started + timeout
    while worker in workers_by_incarnation(client):
        if time.monotonic() > deadline:
            raise Timeout(f"worker {short(worker)} of {pool} did not leave within {timeout:g}s", op="recycle")
        time.sleep(0.05)
    out(f"  worker {short(worker)} has left the broker after {time.monotonic() - started:.2f}s")
    ready = wait_pools_ready(client, (pool,), timeout=replacement_timeout, out=out,
                             need={pool: 1}, what="waiting for its replacement (supervisord autorestart)")
    elapsed = time.monotonic() - started
    out(f"  {pool} has {ready[pool]} ready worker(s) again after {elapsed:.2f}s")
    return elapsed


def format_history(entries: list[Any], *, offline: bool) -> list[dict[str, Any]]:
    """``lm.history`` entries (plain data with the response as a ref) -> rows for output and JSON."""
    rows = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            rows.append({"index": i, "unexpected": repr(entry)[:200]})
            continue
        usage = entry.get("usage") or {}
        tokens = usage.get("total_tokens")
        if tokens is None:
            tokens = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
        cached = not usage  # dspy records no usage for an answer from its cache
        cost = entry.get("cost")
        if cost is None:
            cost_text = "$0 (offline)" if offline else "$? (not priced)"
        else:
            cost_text = f"${float(cost):.6f}"
        messages = entry.get("messages") or []
        user = next((m.get("content") for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
                    entry.get("prompt") or "")
        if isinstance(user, list):
            user = " ".join(str(p.get("text", "")) for p in user if isinstance(p, dict))
        preview = re.sub(r"\[\[ ## (\w+) ## \]\]", r"\1:", str(user))
        preview = preview.split("Respond with the corresponding output fields")[0]
        response = entry.get("response")
        ref = response if isinstance(response, dspex.Ref) else None
        is_ref = ref is not None
        outputs = entry.get("outputs") or []
        rows.append({
            "index": i, "model": entry.get("model"), "cost": cost, "cost_text": cost_text, "tokens": int(tokens),
            "cached": cached,
            "prompt_preview": one_line(preview, 80),
            "output_preview": one_line(outputs[0] if outputs else "", 80),
            "response_is_ref": is_ref,
            # the class name only: where a provider keeps its response type is no business of the reader
            "response": (ref.type_name if ref is not None else type(response).__name__).rpartition(".")[2],
            "response_ref": ref.id[:8] if ref is not None else None,
            "data_keys": sorted(k for k in entry if k != "response"),
        })
    return rows


def shown(value: Any) -> str:
    """A field value for the console: ``<empty>`` instead of a blank."""
    text = str(value or "").strip()
    return text if text else "<empty>"


def wrapped(text: str, indent: str, width: int = 100) -> list[str]:
    """``text`` whole, wrapped at ``width`` (proposals and rules are never cut mid-sentence)."""
    lines: list[str] = []
    for para in str(text).splitlines() or [""]:
        lines.extend(textwrap.wrap(para, width=width, initial_indent=indent, subsequent_indent=indent + "  ")
                     or [indent.rstrip()])
    return lines


class ServerWatch:
    """Whether a model server accepts connections, checked every ``every`` seconds on a thread.

    dspy retries a refused or dropped LM call with backoff and says nothing, so a server that went
    down and came back mid-run would leave no trace: this prints a line when the server stops
    accepting connections and one when it accepts them again. A busy server still accepts them."""

    def __init__(self, api_base: str, out: Out, every: float = 0.5) -> None:
        url = urllib.parse.urlsplit(api_base)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.where = f"{self.host}:{self.port}"
        self.out, self.every = out, every
        self._outages: list[dict[str, Any]] = []
        self._down_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="flagship-server-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)
        if not self._thread.is_alive():
            # a last look: a run may end (its calls answered) before the thread's next look saw
            # the server back, which left the outage open, its length unknown
            self._look()

    def outages(self) -> list[dict[str, Any]]:
        """``{"down_at", "up_at", "seconds"}`` per outage (``up_at``/``seconds`` None while still down)."""
        return [dict(o) for o in self._outages]

    def _accepts(self) -> tuple[bool, str]:
        try:
            with socket.create_connection((self.host, self.port), timeout=2.0):
                return True, ""
        except TimeoutError:
            return True, ""  # a full backlog: busy, not down
        except OSError as exc:
            return False, exc.strerror or str(exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._look()

    def _look(self) -> None:
        up, why = self._accepts()
        now = time.monotonic()
        if not up and self._down_since is None:
            self._down_since = now
            self._outages.append({"down_at": time.strftime("%H:%M:%S"), "up_at": None, "seconds": None,
                                  "error": why})
            self.out(f"  ! LM server {self.where} is down ({why}) since {time.strftime('%H:%M:%S')}: "
                     "dspy retries the calls it refuses")
        elif up and self._down_since is not None:
            down = now - self._down_since
            self._outages[-1].update(up_at=time.strftime("%H:%M:%S"), seconds=round(down, 3))
            self._down_since = None
            self.out(f"  LM server {self.where} accepts connections again after {down:.1f}s down")
