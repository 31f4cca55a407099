"""CURVE authentication for TCP endpoints: only peers whose public key is allowed get in.

eval/exec through the broker is remote code execution by design, so a TCP endpoint is never
bound without CURVE and an allow-list of public keys (``zmq.auth`` certificate files).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import zmq
from zmq.auth import load_certificates
from zmq.auth.thread import ThreadAuthenticator

from dspex.errors import ConfigError

log = logging.getLogger("dspex.broker.security")


class AllowedKeys:
    """A ZAP credentials provider that re-reads its directory, so keys can be added live."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConfigError(f"allowed-keys directory {self.directory} does not exist")

    def callback(self, domain: str, z85_key: bytes) -> bool:
        allowed = load_certificates(self.directory).get(z85_key, False)
        if not allowed:
            log.warning("refused a CURVE peer with unknown public key %s (not in %s)",
                        z85_key.decode(errors="replace"), self.directory)
        return bool(allowed)


def start_authenticator(ctx: zmq.Context[Any], allowed_dir: str | None) -> ThreadAuthenticator:
    if not allowed_dir:
        raise ConfigError("TCP endpoints need an allow-list of client/worker public keys (--curve-allowed DIR)")
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("dspex.broker.zap"))
    auth.start()
    auth.configure_curve_callback("*", AllowedKeys(allowed_dir))
    return auth


def secure_server(sock: zmq.Socket[Any], endpoint: str, secret: bytes | None, public: bytes | None) -> None:
    if not secret or not public:
        raise ConfigError(
            f"refusing to bind {endpoint} without CURVE keys: TCP endpoints need --curve-secret-key "
            "(eval/exec through the broker is remote code execution; only authenticated peers may reach it)"
        )
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
