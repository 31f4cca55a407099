"""``dspexctl keys generate``: CURVE key pairs for a broker reachable over TCP.

Layout written into DIR (mode 0700)::

    broker.key / broker.key_secret     the broker's pair (--curve-secret-key broker.key_secret)
    client.key / client.key_secret     for clients (DSPEX_CURVE_CLIENT_KEY)
    worker.key / worker.key_secret     for remote workers (--curve-key / DSPEX_CURVE_WORKER_KEY)
    allowed/                           public keys the broker accepts (--curve-allowed)

Clients and workers also need ``broker.key`` (public only: DSPEX_CURVE_SERVER_KEY).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click
import zmq.auth


def generate(directory: Path, peers: tuple[str, ...] = ("client", "worker")) -> dict[str, Path]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    allowed = directory / "allowed"
    allowed.mkdir(mode=0o700, exist_ok=True)
    written: dict[str, Path] = {}
    for name in ("broker", *peers):
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        written[name] = Path(secret)
        if name != "broker":
            shutil.copy(public, allowed / Path(public).name)
    written["allowed"] = allowed
    return written


@click.group()
def keys() -> None:
    """CURVE keys for TCP endpoints."""


@keys.command("generate")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=Path("keys"), show_default=True,
              help="where to write the key files")
@click.option("--peer", "peers", multiple=True, default=("client", "worker"), show_default=True,
              help="a client or worker key pair to create and allow (repeatable)")
def generate_command(directory: Path, peers: tuple[str, ...]) -> None:
    """Create the broker's key pair and allowed peer key pairs."""
    written = generate(directory, peers)
    for name, path in written.items():
        click.echo(f"{name:8} {path}")
    click.echo(
        f"broker:  python -m broker --frontend tcp://HOST:PORT --curve-secret-key {written['broker']} "
        f"--curve-allowed {written['allowed']}\n"
        f"workers: DSPEX_CURVE_SERVER_KEY={directory / 'broker.key'} DSPEX_CURVE_WORKER_KEY={written.get('worker', '…')}\n"
        f"clients: DSPEX_CURVE_SERVER_KEY={directory / 'broker.key'} DSPEX_CURVE_CLIENT_KEY={written.get('client', '…')}"
    )
