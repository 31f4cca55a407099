"""``python -m worker --pool NAME [--backend EP]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch litellm's price list

from dspex import config  # noqa: E402
from dspex.protocol import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS  # noqa: E402
from worker.worker import WorkerOptions, main  # noqa: E402


def parse(argv: list[str] | None = None) -> WorkerOptions:
    p = argparse.ArgumentParser(prog="python -m worker", description="dspex worker process")
    p.add_argument("--pool", required=True, help="pool this worker serves")
    p.add_argument("--backend", default=None, help="broker backend endpoint (default: DSPEX_BACKEND or the run dir)")
    p.add_argument("--heartbeat", type=float, default=float(os.environ.get("DSPEX_HEARTBEAT", HEARTBEAT_INTERVAL)))
    p.add_argument("--liveness", type=int, default=int(os.environ.get("DSPEX_LIVENESS", HEARTBEAT_LIVENESS)))
    p.add_argument("--ref-cap", type=int, default=int(os.environ.get("DSPEX_REF_CAP", 100_000)))
    p.add_argument("--lm-history", type=int, default=int(os.environ.get("DSPEX_LM_HISTORY", 200)))
    p.add_argument("--capacity", type=int, default=int(os.environ.get("DSPEX_CAPACITY", 1)),
                   help="calls this worker runs at once, in threads (default 1)")
    p.add_argument("--curve-server-key", default=os.environ.get("DSPEX_CURVE_SERVER_KEY"),
                   help="broker's public key file (required for a tcp:// backend)")
    p.add_argument("--curve-key", default=os.environ.get("DSPEX_CURVE_WORKER_KEY"),
                   help="this worker's secret key file (its public key must be allowed by the broker)")
    p.add_argument("--no-dspy", action="store_true", help="do not import dspy at start")
    p.add_argument("--log-level", default=os.environ.get("DSPEX_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    logging.basicConfig(
        level=a.log_level.upper(), stream=sys.stderr,
        format=f"%(asctime)s worker[{a.pool}:{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    backend = config.check_endpoint(a.backend or config.default_backend())
    server_key, keypair = config.curve_client_keys(backend, a.curve_server_key, a.curve_key)
    return WorkerOptions(
        pool=a.pool,
        backend=backend,
        capacity=a.capacity,
        curve_server_key=server_key,
        curve_keypair=keypair,
        heartbeat_interval=a.heartbeat,
        heartbeat_liveness=a.liveness,
        ref_cap=a.ref_cap,
        preload_dspy=not a.no_dspy,
        lm_history=a.lm_history,
    )


if __name__ == "__main__":
    sys.exit(main(parse()))
