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

import os
import shutil
from pathlib import Path

import click
import zmq.auth


def generate(directory: Path, peers: tuple[str, ...] = ("client", "worker"),
             admins: tuple[str, ...] = ()) -> dict[str, Path]:
    """Key pairs for the broker and each peer. A peer named ``worker*`` is allowed on the
    worker plane, any other on the client plane; ``admins`` (client peers) also get admin ops."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)  # a directory we just made (or our own key store): never a run dir
    allowed = directory / "allowed"
    allowed.mkdir(mode=0o700, exist_ok=True)
    planes = {"clients": allowed / "clients", "workers": allowed / "workers"}
    for d in planes.values():
        d.mkdir(mode=0o700, exist_ok=True)
    if admins:
        planes["admins"] = allowed / "admins"
        planes["admins"].mkdir(mode=0o700, exist_ok=True)
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
            if plane == "workers":
                raise click.UsageError(f"{name} is a worker key: admin keys are client keys")
            shutil.copy(public, planes["admins"] / Path(public).name)
    written["allowed"] = allowed
    return written


@click.group()
def keys() -> None:
    """CURVE keys for TCP endpoints."""


@keys.command("generate")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=Path("keys"), show_default=True,
              metavar="DIR", help="where to write the key files")
@click.option("--peer", "peers", multiple=True, default=("client", "worker"), show_default=True, metavar="NAME",
              help="a key pair to create and allow (repeatable): names starting with 'worker' join the "
                   "worker plane, others the client plane")
@click.option("--admin", "admins", multiple=True, metavar="NAME",
              help="a client key pair allowed admin ops (repeatable); with one, only admin keys may "
                   "recycle or close other clients' sessions")
def generate_command(directory: Path, peers: tuple[str, ...], admins: tuple[str, ...]) -> None:
    """Create the broker's key pair and allowed peer key pairs."""
    written = generate(directory, peers, admins)
    for name, path in written.items():
        click.echo(f"{name:8} {path}")
    click.echo(
        f"broker:  python -m broker --frontend tcp://HOST:PORT --curve-secret-key {written['broker']} "
        f"--curve-allowed {written['allowed']}\n"
        f"workers: DSPEX_CURVE_SERVER_KEY={directory / 'broker.key'} DSPEX_CURVE_WORKER_KEY={written.get('worker', '…')}\n"
        f"clients: DSPEX_CURVE_SERVER_KEY={directory / 'broker.key'} DSPEX_CURVE_CLIENT_KEY={written.get('client', '…')}"
    )
