"""A worker's settings: :func:`parse` reads its command line and its environment (``DSPEX_*``,
listed in docs/operations.md), once, into :class:`WorkerOptions`, the only place a worker reads
either."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dspex.stack import logs
from dspex.stack.pools import load_pools
from dspex.stack.rundir import ensure_private_dir
from dspex.wire.errors import ConfigError
from dspex.wire.protocol import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, MAX_MESSAGE_BYTES
from dspex.wire.sockets import (
    check_endpoint,
    curve_client_keys,
    default_backend,
    env_number,
    max_message_bytes,
)


@dataclass(frozen=True)
class WorkerOptions:
    """What a worker runs with (made by :func:`parse`, or by a test in-process)."""

    pool: str
    backend: str
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    ref_cap: int = 100_000
    preload_dspy: bool = True
    lm_history: int = 200
    max_message: int = MAX_MESSAGE_BYTES
    capacity: int = 1  # calls run at once, in threads
    curve_server_key: bytes | None = None
    curve_keypair: tuple[bytes, bytes] | None = None
    curve_server_key_file: str = ""  # where curve_server_key was read (named when a handshake fails)
    # a call still running this long after its deadline costs the worker (hard time limit)
    hard_grace: float = 5.0


def parse(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> WorkerOptions:
    env = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="python -m worker", description="dspex worker process")
    p.add_argument("--pool", required=True, help="pool this worker serves")
    p.add_argument("--backend", default=None, help="broker backend endpoint (default: DSPEX_BACKEND or the run dir)")
    p.add_argument("--heartbeat", type=float, default=env_number(env, "DSPEX_HEARTBEAT", HEARTBEAT_INTERVAL))
    p.add_argument("--liveness", type=int, default=env_number(env, "DSPEX_LIVENESS", HEARTBEAT_LIVENESS))
    p.add_argument("--ref-cap", type=int, default=env_number(env, "DSPEX_REF_CAP", WorkerOptions.ref_cap))
    p.add_argument("--lm-history", type=int, default=env_number(env, "DSPEX_LM_HISTORY", WorkerOptions.lm_history))
    p.add_argument("--config", default=env.get("DSPEX_CONFIG"),
                   help="supervisor.conf: the pool's [dspex:pool:NAME] section gives capacity")
    p.add_argument("--capacity", type=int, default=None,
                   help="calls this worker runs at once, in threads (default: the pool's capacity "
                        "in --config, else DSPEX_CAPACITY, else 1)")
    p.add_argument("--curve-server-key", default=env.get("DSPEX_CURVE_SERVER_KEY"),
                   help="broker's public key file (required for a tcp:// backend)")
    p.add_argument("--curve-key", default=env.get("DSPEX_CURVE_WORKER_KEY"),
                   help="this worker's secret key file (its public key must be allowed by the broker)")
    p.add_argument("--no-dspy", action="store_true", help="do not import dspy at start")
    p.add_argument("--log-level", default=env.get("DSPEX_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    logs.setup(f"worker[{a.pool}:{os.getpid()}]", a.log_level)
    capacity = a.capacity
    if capacity is None and a.config:
        pools = {c.name: c for c in load_pools(a.config)}
        if a.pool not in pools:
            raise ConfigError(f"{a.config} declares no [dspex:pool:{a.pool}] section")
        capacity = pools[a.pool].capacity or None  # 0: the section does not set it
    if capacity is None:
        capacity = env_number(env, "DSPEX_CAPACITY", 1)
    if capacity < 1:
        raise ConfigError(f"capacity must be at least 1, not {capacity}")
    backend = check_endpoint(a.backend or default_backend(env), "--backend" if a.backend else "DSPEX_BACKEND")
    if backend.startswith("ipc://"):
        # made here if the broker has not made it yet (supervisord starts both at once); an
        # existing one must be ours and 0700, or another local user receives our connection
        ensure_private_dir(Path(backend[len("ipc://"):]).parent)
    server_key, keypair = curve_client_keys(backend, a.curve_server_key, a.curve_key)
    return WorkerOptions(
        pool=a.pool,
        backend=backend,
        capacity=capacity,
        curve_server_key=server_key,
        curve_keypair=keypair,
        curve_server_key_file=(a.curve_server_key or "") if server_key is not None else "",
        heartbeat_interval=a.heartbeat,
        heartbeat_liveness=a.liveness,
        ref_cap=a.ref_cap,
        preload_dspy=not a.no_dspy,
        lm_history=a.lm_history,
        max_message=max_message_bytes(env),
        hard_grace=env_number(env, "DSPEX_HARD_GRACE", WorkerOptions.hard_grace),
    )
