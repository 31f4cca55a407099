"""Endpoints, the run directory, and socket options shared by every process."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import zmq

from dspex.errors import BrokerUnreachable, ConfigError
from dspex.protocol import MAX_MESSAGE_BYTES

UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL


def run_dir() -> Path:
    """``DSPEX_RUN_DIR`` or ``/tmp/dspex-<uid>``: short enough for unix socket paths."""
    return Path(os.environ.get("DSPEX_RUN_DIR") or f"/tmp/dspex-{os.getuid()}")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700, or check an existing one is ours and private (never
    chmod it: a directory someone else made wider may already hold their sockets)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return check_private_dir(path)


def check_private_dir(path: Path) -> Path:
    """Refuse a run directory that is not ours or not 0700: another local user who made it
    first would receive our workers' connections (and every request they run)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"run directory {path} does not exist (is the broker running?)") from None
    if st.st_uid != os.getuid():
        raise ConfigError(f"run directory {path} belongs to uid {st.st_uid}, not to us (uid {os.getuid()}): refusing it")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(f"run directory {path} has mode {mode:04o}; it must be 0700 (chmod 700 {path})")
    return path


def default_frontend() -> str:
    return os.environ.get("DSPEX_FRONTEND") or os.environ.get("DSPEX_ENDPOINT") or f"ipc://{run_dir()}/frontend.sock"


def default_backend() -> str:
    return os.environ.get("DSPEX_BACKEND") or f"ipc://{run_dir()}/backend.sock"


def client_endpoint(endpoint: str | None = None) -> str:
    return endpoint or os.environ.get("DSPEX_ENDPOINT") or default_frontend()


def check_endpoint(endpoint: str) -> str:
    """Refuse endpoints we cannot use before zmq gives an obscure errno."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if len(path.encode()) > UNIX_PATH_MAX:
            raise ConfigError(
                f"ipc path is {len(path.encode())} bytes, over the unix socket limit of {UNIX_PATH_MAX}: {path}"
            )
    elif not endpoint.startswith(("tcp://", "inproc://")):
        raise ConfigError(f"unsupported endpoint {endpoint!r}: use ipc://PATH or tcp://HOST:PORT")
    return endpoint


def prepare_bind(endpoint: str) -> None:
    """Make the private directory of an ipc endpoint; refuse a socket another process answers on
    (one live broker per run directory). A stale file (nobody listening) is bound over."""
    check_endpoint(endpoint)
    if endpoint.startswith("ipc://"):
        path = Path(endpoint[len("ipc://") :])
        ensure_private_dir(path.parent)
        if path.exists() and ipc_answers(str(path)):
            raise ConfigError(f"another broker is live on {endpoint}: one stack per run directory "
                              f"(stop it, or give this one its own DSPEX_RUN_DIR)")


def ipc_answers(path: str) -> bool:
    """True if a process accepts connections on the unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def curve_client_keys(endpoint: str, server_key_file: str | None, own_key_file: str | None
                      ) -> tuple[bytes | None, tuple[bytes, bytes] | None]:
    """CURVE keys of a connecting peer (client or worker). TCP requires them."""
    if not endpoint.startswith("tcp://"):
        return None, None
    if not server_key_file:
        raise ConfigError(f"{endpoint} is TCP: CURVE is required (give the broker's public key file, "
                          "DSPEX_CURVE_SERVER_KEY; see `dspexctl keys generate`)")
    from zmq.auth import load_certificate

    server_public, _ = load_certificate(server_key_file)
    if not own_key_file:
        raise ConfigError("a TCP peer needs its own secret key file (DSPEX_CURVE_CLIENT_KEY / "
                          "DSPEX_CURVE_WORKER_KEY) whose public key the broker allows")
    public, secret = load_certificate(own_key_file)
    if secret is None:
        raise ConfigError(f"{own_key_file} holds no secret key")
    return server_public, (public, secret)


def probe_ipc(endpoint: str) -> None:
    """Before a client connects to an ipc endpoint: say what is wrong with *that* socket.

    Fails at once (instead of waiting out the request's timeout) when nothing listens there: no
    directory, no socket file, or a stale file a broker that exited left behind
    (``BrokerUnreachable``). Refuses (``ConfigError``) a path that is not a socket, a socket that
    is not ours, one in a directory other users may write to (they could have put it there), and
    one we may not connect to. A client creates nothing, so it never asks for a directory's mode
    to change: the broker and workers, which create the run directory, enforce its 0700 rule.
    """
    if not endpoint.startswith("ipc://"):
        return
    path = Path(endpoint[len("ipc://"):])
    parent = path.parent
    where = "run directory" if parent == run_dir() else "directory"
    try:
        dst = parent.stat()
    except FileNotFoundError:
        raise BrokerUnreachable(f"nothing is listening at {endpoint}: its {where} {parent} does not exist") from None
    except PermissionError:
        raise ConfigError(f"cannot use {endpoint}: permission denied reading its {where} {parent}") from None
    uid = os.getuid()
    mode = stat.S_IMODE(dst.st_mode)
    if dst.st_uid not in (uid, 0):
        raise ConfigError(f"refusing {endpoint}: its {where} {parent} belongs to uid {dst.st_uid}, not to us "
                          f"(uid {uid}), so the socket there may be anyone's")
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise ConfigError(f"refusing {endpoint}: its {where} {parent} has mode {mode:04o}, writable by other "
                          "users, so the socket there may be anyone's")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BrokerUnreachable(f"nothing is listening at {endpoint}: no socket file {path}") from None
    except PermissionError:
        raise ConfigError(f"cannot use {endpoint}: permission denied on {path}") from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a regular file" if stat.S_ISREG(st.st_mode) \
            else "not a socket"
        raise ConfigError(f"cannot use {endpoint}: {path} is {kind}, not a unix socket")
    if st.st_uid != uid:
        raise ConfigError(f"refusing {endpoint}: the socket {path} belongs to uid {st.st_uid}, not to us (uid {uid})")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except ConnectionRefusedError:
        raise BrokerUnreachable(f"nothing is listening at {endpoint}: {path} is a stale socket file "
                                "(the process that made it has exited)") from None
    except PermissionError:
        raise ConfigError(f"cannot use {endpoint}: permission denied connecting to {path}") from None
    except OSError:
        pass  # let the request report anything else
    finally:
        probe.close()


def max_message_bytes() -> int:
    return int(os.environ.get("DSPEX_MAX_MESSAGE", MAX_MESSAGE_BYTES))


def tune_socket(sock: zmq.Socket[bytes], *, max_message: int | None = None) -> None:
    """Options every dspex socket gets: no linger on close, bounded inbound message size."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message if max_message is not None else max_message_bytes())


# socket monitor events that say why a CURVE connection to the broker never carried a message
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def handshake_failure(event: int, peer: str, curve: bool) -> str:
    """Why the handshake with the broker failed, in the peer's words, or "" (not a handshake event).

    The broker's ZAP handler refusing our public key answers with an ERROR (HANDSHAKE_FAILED_AUTH).
    A server key that is not the broker's makes our HELLO undecryptable: the broker drops the
    connection mid-handshake and we see FAILED_NO_DETAIL or FAILED_PROTOCOL.
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"the broker refused this {peer}'s key (its public key is not in the broker's allow-list)"
    if curve and event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
        return ("the server key does not match: the broker closed the connection during the CURVE handshake "
                "(DSPEX_CURVE_SERVER_KEY must hold that broker's public key)")
    return ""
