"""``python -m broker [--frontend EP] [--backend EP] [--config supervisor.conf] [--pool NAME:MODE ...]``
(the options: :mod:`broker.settings`)."""

from __future__ import annotations

import logging
import signal
import sys
from typing import TYPE_CHECKING

from broker.settings import label, parse
from dspex.stack import logs
from dspex.wire.errors import ConfigError

if TYPE_CHECKING:
    from broker.broker import Broker


def main(argv: list[str] | None = None) -> int:
    broker: Broker | None = None
    try:
        options = parse(argv)
        # only now: serving imports ~0.5 s of modules (~1 s on a loaded host), and a config error
        # must end the process within supervisord's startsecs, or it restarts it forever instead
        # of marking it FATAL with the cause
        from broker.broker import Broker

        broker = Broker(options)
        broker.bind()
    except ConfigError as err:
        if broker is not None:
            broker.close()  # only what it bound itself
        logs.early(label(), f"broker: {err.message}")
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
