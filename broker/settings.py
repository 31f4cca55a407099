"""The broker's settings: :func:`parse` reads its command line and its environment (``DSPEX_*``,
listed in docs/operations.md), once, into :class:`BrokerOptions`, the only place the broker
reads either."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from broker import checkpoints as checkpoints_store
from dspex.stack import logs
from dspex.stack.pools import PoolConfig, load_pools, parse_pool_spec
from dspex.wire.errors import ConfigError
from dspex.wire.protocol import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, MAX_MESSAGE_BYTES
from dspex.wire.sockets import (
    check_endpoint,
    default_backend,
    default_frontend,
    env_number,
    max_message_bytes,
    read_key_file,
    run_dir,
)

CLIENT_HWM = 100_000  # replies queued for one client that is not reading


@dataclass
class BrokerOptions:
    """What a broker runs with (made by :func:`parse`, or by a test in-process)."""

    frontend: str
    backend: str
    pools: list[PoolConfig]
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    max_sessions: int = 100_000
    max_message: int = MAX_MESSAGE_BYTES
    client_hwm: int = CLIENT_HWM
    metrics_port: int = 0
    curve_secret: bytes | None = None
    curve_public: bytes | None = None
    curve_allowed_dir: str | None = None
    supervisor_conf: str | None = None  # a supervisor.conf: nudge its supervisord when workers leave
    checkpoints: str | None = None  # the durable sessions' SQLite file (None: in run_dir; "": none)
    run_dir: str = ""  # where the sockets and the checkpoint store live by default ("": no default store)
    checkpoint_cap: int = checkpoints_store.SESSION_CAP  # bytes per durable session
    checkpoint_total_cap: int = checkpoints_store.TOTAL_CAP  # bytes of all of them


def parse(argv: list[str] | None = None) -> BrokerOptions:
    env = os.environ
    p = argparse.ArgumentParser(prog="python -m broker", description="dspex broker")
    p.add_argument("--frontend", default=None, help="client endpoint (default: DSPEX_FRONTEND or ipc in the run dir)")
    p.add_argument("--backend", default=None, help="worker endpoint (default: DSPEX_BACKEND or ipc in the run dir)")
    p.add_argument("--config", default=env.get("DSPEX_CONFIG"),
                   help="supervisor.conf whose [dspex:pool:NAME] sections declare the pools")
    p.add_argument("--pool", action="append", default=[], metavar="NAME:MODE[:k=v,...]",
                   help="declare a pool (repeatable); overrides a pool of the same name from --config")
    p.add_argument("--heartbeat", type=float, default=env_number(env, "DSPEX_HEARTBEAT", HEARTBEAT_INTERVAL))
    p.add_argument("--liveness", type=int, default=env_number(env, "DSPEX_LIVENESS", HEARTBEAT_LIVENESS))
    p.add_argument("--max-sessions", type=int, default=100_000)
    p.add_argument("--metrics-port", type=int, default=env_number(env, "DSPEX_METRICS_PORT", 0),
                   help="serve Prometheus metrics on 127.0.0.1:PORT (0: off)")
    p.add_argument("--curve-secret-key", default=env.get("DSPEX_CURVE_SECRET"),
                   help="broker's CURVE secret key file (required for tcp:// endpoints)")
    p.add_argument("--curve-allowed", default=env.get("DSPEX_CURVE_ALLOWED"),
                   help="directory of allowed client/worker public key files")
    p.add_argument("--checkpoints", default=env.get("DSPEX_CHECKPOINTS"), metavar="PATH",
                   help="durable sessions' checkpoint store (SQLite; default: checkpoints.sqlite in the run dir; "
                        "'none': no durable sessions)")
    p.add_argument("--checkpoint-cap", type=float, default=64.0, metavar="MB",
                   help="bytes a durable session's checkpoint may hold (default 64 MB)")
    p.add_argument("--checkpoint-total-cap", type=float, default=4096.0, metavar="MB",
                   help="bytes all checkpoints together may hold (default 4096 MB)")
    p.add_argument("--log-level", default=env.get("DSPEX_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    logs.setup(label(), a.log_level)
    pools: dict[str, PoolConfig] = {}
    if a.config:
        pools.update((c.name, c) for c in load_pools(a.config))
    for spec in a.pool:
        c = parse_pool_spec(spec)
        pools[c.name] = c
    if not pools:
        raise ConfigError("no pools declared: pass --pool NAME:MODE or --config supervisor.conf")
    secret = public = None
    if a.curve_secret_key:
        public, secret = read_key_file(a.curve_secret_key, "the broker's secret key file")
        if secret is None:
            raise ConfigError(f"{a.curve_secret_key} holds no secret key (--curve-secret-key takes broker.key_secret)")
    return BrokerOptions(
        frontend=check_endpoint(a.frontend or default_frontend(env), "--frontend" if a.frontend
                                else "DSPEX_FRONTEND" if env.get("DSPEX_FRONTEND") else "DSPEX_ENDPOINT"),
        backend=check_endpoint(a.backend or default_backend(env), "--backend" if a.backend else "DSPEX_BACKEND"),
        run_dir=str(run_dir(env)),
        max_message=max_message_bytes(env),
        client_hwm=env_number(env, "DSPEX_CLIENT_HWM", CLIENT_HWM),
        pools=list(pools.values()),
        heartbeat_interval=a.heartbeat,
        heartbeat_liveness=a.liveness,
        max_sessions=a.max_sessions,
        metrics_port=a.metrics_port,
        curve_secret=secret,
        curve_public=public,
        curve_allowed_dir=a.curve_allowed,
        supervisor_conf=a.config,
        checkpoints="" if a.checkpoints == "none" else a.checkpoints,
        checkpoint_cap=int(a.checkpoint_cap * 2**20),
        checkpoint_total_cap=int(a.checkpoint_total_cap * 2**20),
    )


def label() -> str:
    return f"broker[{os.getpid()}]"
