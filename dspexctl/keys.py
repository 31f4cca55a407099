"""``dspexctl keys generate``: CURVE key pairs for a broker reachable over TCP.

Layout written into DIR (mode 0700)::

    broker.key / broker.key_secret     the broker's pair (--curve-secret-key broker.key_secret)
    client.key / client.key_secret     for clients (DSPEX_CURVE_CLIENT_KEY)
    worker.key / worker.key_secret     for remote workers (--curve-key / DSPEX_CURVE_WORKER_KEY)
    allowed/clients/                   client public keys the frontend accepts
    allowed/workers/                   worker public keys the backend accepts (a client key is
                                       refused there: it would receive other clients' requests)
    allowed/admins/                    with --admin: client keys allowed admin ops
                                       (--curve-allowed DIR/allowed)

Clients and workers also need ``broker.key`` (public only: DSPEX_CURVE_SERVER_KEY).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click
import zmq.auth

from dspex.wire.errors import ConfigError


def generate(directory: Path, peers: tuple[str, ...] = ("client", "worker"),
             admins: tuple[str, ...] = ()) -> dict[str, Path]:
    """Key pairs for the broker and each peer. A peer named ``worker*`` is allowed on the
    worker plane, any other on the client plane; ``admins`` (client peers) also get admin ops."""
    workers = [a for a in admins if a.startswith("worker")]
    if workers:  # before anything is written
        raise click.UsageError(f"{workers[0]} is a worker key: admin keys are client keys")
    try:
        return _write(directory, peers, admins)
    except OSError as exc:  # a --dir that cannot be made or written (a typo, no permission, a file)
        raise ConfigError(f"cannot write keys into {directory}: {exc.strerror or exc}"
                          + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(directory) else "")
                          ) from None


def _write(directory: Path, peers: tuple[str, ...], admins: tuple[str, ...]) -> dict[str, Path]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)  # a directory we just made (or our own key store): never a run dir
    allowed = directory / "allowed"
    allowed.mkdir(mode=0o700, exist_ok=True)
    planes = {plane: allowed / plane for plane in ("clients", "workers", *(["admins"] if admins else []))}
    for d in planes.values():
        d.mkdir(mode=0o700, exist_ok=True)
    written: dict[str, Path] = {}
    for name in ("broker", *peers, *(a for a in admins if a not in peers)):
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        written[name] = Path(secret)
        if name == "broker":
            continue
        plane = "workers" if name.startswith("worker") else "clients"
        shutil.copy(public, planes[plane] / Path(public).name)
        if name in admins:
            shutil.copy(public, planes["admins"] / Path(public).name)
    written["allowed"] = allowed
    return written


# the ports of docs/operations.md's "Many hosts": the broker's worker plane and its client plane
BACKEND_PORT, FRONTEND_PORT = 5556, 5555


def uses(directory: Path, written: dict[str, Path]) -> dict[str, str]:
    """How each side uses what :func:`generate` wrote, one command line each: the broker binds its
    backend on TCP for workers of other hosts (a worker key was written) and its frontend for clients
    of other hosts (a client key was written); a worker host's conf comes from ``hosts conf``."""
    worker = next((path for name, path in written.items() if name.startswith("worker")), None)
    client = next((path for name, path in written.items() if name not in ("broker", "allowed")
                   and not name.startswith("worker")), None)
    server_key = directory / "broker.key"
    binds = ((f" --backend tcp://0.0.0.0:{BACKEND_PORT}" if worker else "")
             + (f" --frontend tcp://0.0.0.0:{FRONTEND_PORT}" if client else ""))
    out = {"broker": f"python -m broker{binds} --curve-secret-key {written['broker']} "
                     f"--curve-allowed {written['allowed']}"}
    if worker:
        out["workers"] = (f"dspexctl hosts conf --broker tcp://BROKER_HOST:{BACKEND_PORT} --pool POOL=N "
                          f"--worker-key {worker} --server-key {server_key} > workers.conf")
    if client:
        out["clients"] = (f"DSPEX_ENDPOINT=tcp://BROKER_HOST:{FRONTEND_PORT} DSPEX_CURVE_SERVER_KEY={server_key} "
                          f"DSPEX_CURVE_CLIENT_KEY={client}")
    return out


@click.group()
def keys() -> None:
    """CURVE keys for TCP endpoints."""


@keys.command("generate")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=Path("keys"), show_default=True,
              metavar="DIR", help="where to write the key files (a directory without a broker key pair)")
@click.option("--peer", "peers", multiple=True, default=("client", "worker"), show_default=True, metavar="NAME",
              help="a key pair to create and allow (repeatable): names starting with 'worker' join the "
                   "worker plane, others the client plane")
@click.option("--admin", "admins", multiple=True, metavar="NAME",
              help="a client key pair allowed admin ops (repeatable); with one, only admin keys may "
                   "recycle or close other clients' sessions")
@click.option("--json", "json_out", is_flag=True, help="print one JSON document (data only)")
@click.pass_context
def generate_command(ctx: click.Context, directory: Path, peers: tuple[str, ...], admins: tuple[str, ...],
                     json_out: bool) -> None:
    """Create the broker's key pair and allowed peer key pairs."""
    if (directory / "broker.key_secret").exists():
        # a run makes a new broker pair: every peer holding the old broker.key would be refused
        raise ConfigError(f"{directory} already holds a broker key pair ({directory / 'broker.key_secret'}); a new "
                          "run would replace it and lock out every peer given the old broker.key: use another "
                          "--dir (or move this one away first)")
    written = generate(directory, peers, admins)
    commands = uses(directory, written)
    if json_out or getattr(ctx.obj, "json", False):
        click.echo(json.dumps({"written": {name: str(path) for name, path in written.items()},
                               "server_key": str(directory / "broker.key"), "use": commands}, indent=2))
        return
    for name, path in written.items():
        click.echo(f"{name:8} {path}")
    click.echo("\n".join(f"{(who + ':'):8} {line}" for who, line in commands.items()))
