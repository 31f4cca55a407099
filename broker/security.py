"""CURVE authentication for TCP endpoints: separate allow-lists for the two planes.

eval/exec through the broker is remote code execution by design, so a TCP endpoint is never
bound without CURVE. The frontend (clients) and the backend (workers) are two ZAP domains with
their own allow-lists: a peer holding a *client* key must never register as a worker, where it
would receive other clients' requests (API keys in kwargs included). Layout of the directory
given with ``--curve-allowed`` (``dspexctl keys generate`` writes it)::

    clients/   public keys of clients (the frontend)
    workers/   public keys of remote workers (the backend)
    admins/    optional: client keys allowed admin ops (recycle, others' sessions)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from zmq.auth import load_certificates
from zmq.auth.thread import ThreadAuthenticator

from dspex.wire.errors import ConfigError

log = logging.getLogger("dspex.broker.security")

CLIENTS = "clients"
WORKERS = "workers"
ADMINS = "admins"


MAX_REFUSALS = 32  # (address, key) pairs a plane remembers: a stranger cycling keys cannot grow it


class AllowedKeys:
    """A ZAP credentials provider that re-reads its directory, so keys can be added live. It
    remembers whom it refused, for the broker's status (``pools status`` names them)."""

    def __init__(self, directory: str | Path, plane: str, auth: PlaneAuthenticator | None = None) -> None:
        self.directory = Path(directory)
        self.plane = plane
        self.auth = auth
        if not self.directory.is_dir():
            raise ConfigError(f"allowed-keys directory {self.directory} does not exist")
        # (address, key) -> [count, monotonic time of the last]; written on the ZAP thread, read on
        # the broker's
        self._refused: dict[tuple[str, str], list[float]] = {}
        self._lock = threading.Lock()

    def keys(self) -> set[str]:
        return {k.decode() for k, ok in load_certificates(self.directory).items() if ok}

    def callback(self, domain: str, z85_key: bytes) -> bool:
        allowed = bool(load_certificates(self.directory).get(z85_key, False))
        if not allowed:
            peer = self.auth.last_address if self.auth is not None else "?"
            key = z85_key.decode(errors="replace")
            log.warning("refused a CURVE peer from %s on the %s plane: public key %s is not in %s",
                        peer, self.plane, key, self.directory)
            with self._lock:
                seen = self._refused.pop((peer, key), [0, 0.0])
                seen[0] += 1
                seen[1] = time.monotonic()
                self._refused[(peer, key)] = seen  # newest last
                while len(self._refused) > MAX_REFUSALS:
                    del self._refused[next(iter(self._refused))]
        return allowed

    def refusals(self) -> list[dict[str, Any]]:
        """Whom this plane refused: address, public key, how often and how long ago, newest first."""
        now = time.monotonic()
        with self._lock:
            seen = list(self._refused.items())
        return [{"plane": self.plane, "address": address, "key": key, "allowed": str(self.directory),
                 "count": int(count), "ago_s": round(now - last, 3)}
                for (address, key), (count, last) in reversed(seen)]


class PlaneAuthenticator(ThreadAuthenticator):
    """Remembers the address of the ZAP request being decided, so refusals name the peer."""

    last_address = "?"

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 4:
            self.last_address = msg[3].decode(errors="replace") or "?"
        await super().handle_zap_message(msg)


def plane_dirs(allowed_dir: str | None) -> dict[str, Path]:
    if not allowed_dir:
        raise ConfigError("TCP endpoints need allow-lists of client and worker public keys (--curve-allowed DIR "
                          "with clients/ and workers/; see `dspexctl keys generate`)")
    root = Path(allowed_dir)
    dirs = {plane: root / plane for plane in (CLIENTS, WORKERS)}
    missing = [str(d) for d in dirs.values() if not d.is_dir()]
    if missing:
        raise ConfigError(f"{root} must hold separate allow-lists clients/ and workers/ (missing: "
                          f"{', '.join(missing)}); a single list would let a client key join the worker plane. "
                          "Run `dspexctl keys generate` again or move the public keys into the two directories")
    if (root / ADMINS).is_dir():
        dirs[ADMINS] = root / ADMINS
    return dirs


def start_authenticator(ctx: zmq.Context[Any], allowed_dir: str | None
                        ) -> tuple[PlaneAuthenticator, AllowedKeys | None, Callable[[], list[dict[str, Any]]]]:
    """The ZAP handler for both planes; also the admin allow-list, if the directory has one, and
    whom the two planes refused (:meth:`AllowedKeys.refusals`, both)."""
    dirs = plane_dirs(allowed_dir)
    auth = PlaneAuthenticator(ctx, log=logging.getLogger("dspex.broker.zap"))
    auth.start()
    planes = [AllowedKeys(dirs[plane], plane, auth) for plane in (WORKERS, CLIENTS)]
    for plane in planes:
        auth.configure_curve_callback(plane.plane, plane)
    admins = AllowedKeys(dirs[ADMINS], ADMINS) if ADMINS in dirs else None
    return auth, admins, lambda: [r for plane in planes for r in plane.refusals()]
