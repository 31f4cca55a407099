"""What the routing core needs done in the world: one port, implemented by the shell.

The core (``broker.core.Core``) decides; everything it needs done outside its own state goes
through the :class:`Port` it was given: frames to a client or a worker, who sent a client's
message, a worker's connection to remember or forget, whether a worker process exited, a hung
worker process to stop, a checkpoint store job, a line for the broker's log.
``broker.broker.Broker`` implements it over zmq sockets and signals; tests/test_core.py records it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from broker.checkpoints import Job


class WorkerUnreachable(Exception):
    """A send to a worker whose connection is already gone (the shell's ROUTER_MANDATORY)."""


class Port(Protocol):
    def to_client(self, frames: list[Any]) -> None:
        """Send ``[client id, reply header, *payload]`` to a client (best effort: a client that
        is gone or not reading loses it, counted by the shell)."""

    def to_worker(self, wid: bytes, frames: list[Any]) -> None:
        """Send ``frames`` to worker ``wid``; raise :class:`WorkerUnreachable` when its
        connection is gone."""

    def client_identity(self, frame: Any) -> str:
        """The identity of the client that sent ``frame`` (its CURVE key; "" when all clients
        share one, as on ipc)."""

    def client_seen(self, client: bytes, frame: Any) -> None:
        """A call from ``client`` (a client socket's routing id) came over ``frame``'s connection
        (a frame of its message)
        (the shell reports it with ``Core.client_gone`` when that connection closes)."""

    def worker_connected(self, wid: bytes, frame: Any) -> bool:
        """Worker ``wid`` registered (or re-registered) with the message ``frame`` (one of its
        frames) came in; whether that is another connection than the one it had (True when the
        shell cannot tell)."""

    def worker_gone(self, wid: bytes) -> None:
        """Worker ``wid`` left the core's books (goodbye, crash, recycle): forget its
        connection, let its supervisor start the next incarnation."""

    def process_exited(self, pid: int, host: str) -> bool:
        """True if worker process ``pid`` of ``host`` is known to have exited: only a process of
        the broker's own host can be known (False for any other)."""

    def stop_process(self, pid: int, host: str) -> None:
        """Stop a hung worker process hard (it missed its drain deadline)."""

    def log(self, level: int, message: str, *args: Any) -> None:
        """A record of the broker's log (``logging`` level; ``message % args``, formatted only if
        it is emitted)."""

    def store(self, job: Job) -> None:
        """Run a checkpoint store job (``broker.checkpoints``), after every job handed over before
        it; report it done, in that order, through ``Core.store_done``."""
