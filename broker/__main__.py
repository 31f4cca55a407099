"""``python -m broker [--frontend EP] [--backend EP] [--config supervisor.conf] [--pool NAME:MODE ...]``.

:func:`parse` is where the broker reads its command line and its environment (``DSPEX_*``, listed
in docs/operations.md), once, into :class:`broker.broker.BrokerOptions`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping

from broker.broker import CLIENT_HWM, Broker, BrokerOptions
from dspex.stack import logs
from dspex.stack.pools import PoolConfig, load_pools, parse_pool_spec
from dspex.wire.errors import ConfigError
from dspex.wire.protocol import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS
from dspex.wire.sockets import (
    check_endpoint,
    default_backend,
    default_frontend,
    max_message_bytes,
    run_dir,
)


def parse(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> BrokerOptions:
    env = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="python -m broker", description="dspex broker")
    p.add_argument("--frontend", default=None, help="client endpoint (default: DSPEX_FRONTEND or ipc in the run dir)")
    p.add_argument("--backend", default=None, help="worker endpoint (default: DSPEX_BACKEND or ipc in the run dir)")
    p.add_argument("--config", default=env.get("DSPEX_CONFIG"),
                   help="supervisor.conf whose [dspex:pool:NAME] sections declare the pools")
    p.add_argument("--pool", action="append", default=[], metavar="NAME:MODE[:k=v,...]",
                   help="declare a pool (repeatable); overrides a pool of the same name from --config")
    p.add_argument("--heartbeat", type=float, default=float(env.get("DSPEX_HEARTBEAT", HEARTBEAT_INTERVAL)))
    p.add_argument("--liveness", type=int, default=int(env.get("DSPEX_LIVENESS", HEARTBEAT_LIVENESS)))
    p.add_argument("--max-sessions", type=int, default=100_000)
    p.add_argument("--metrics-port", type=int, default=int(env.get("DSPEX_METRICS_PORT", "0")),
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
    logs.setup(_label(), a.log_level)
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
        import zmq.auth
        public, secret = zmq.auth.load_certificate(a.curve_secret_key)
    return BrokerOptions(
        frontend=check_endpoint(a.frontend or default_frontend(env)),
        backend=check_endpoint(a.backend or default_backend(env)),
        run_dir=str(run_dir(env)),
        max_message=max_message_bytes(env),
        client_hwm=int(env.get("DSPEX_CLIENT_HWM", CLIENT_HWM)),
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


def _label() -> str:
    return f"broker[{os.getpid()}]"


def main(argv: list[str] | None = None) -> int:
    broker: Broker | None = None
    try:
        options = parse(argv)
        broker = Broker(options)
        broker.bind()
    except ConfigError as err:
        if broker is not None:
            broker.close()  # only what it bound itself
        logs.early(_label(), f"broker: {err.message}")
        return 2
    stopped_by: list[int] = []

    def stop(signum: int, frame: object) -> None:
        stopped_by.append(signum)
        broker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if options.metrics_port:
        from broker.metrics import serve_metrics

        serve_metrics(broker, options.metrics_port)
    try:
        broker.run()
    finally:
        broker.close()
        why = signal.Signals(stopped_by[0]).name if stopped_by else "an error"
        logging.getLogger("dspex.broker").info(
            "broker stopped (%s): %d workers, %d sessions, %d queued requests dropped", why, len(broker.core.workers),
            len(broker.core.sessions), sum(p.queued for p in broker.core.pools.values()))
        logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
