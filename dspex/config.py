"""Endpoints, the run directory, and socket options shared by every process."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq

from dspex.errors import BrokerUnreachable, ConfigError, PoolNotFound
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


ANY_POOL = "*"  # the entry of an endpoint map for every pool it does not name
_KEY_OPTIONS = ("server_key", "client_key")


@dataclass(frozen=True)
class Broker:
    """One broker of an endpoint map: its frontend, and for a ``tcp://`` one the CURVE key files
    to reach it with (None: ``DSPEX_CURVE_SERVER_KEY`` / ``DSPEX_CURVE_CLIENT_KEY``)."""

    endpoint: str
    server_key: str | None = None
    client_key: str | None = None


@dataclass(frozen=True)
class BrokerMap:
    """Which broker serves each pool: ``routes`` maps a pool name, or ``"*"`` for every other
    pool, to its broker. Made by :func:`broker_map`; one broker is the common case."""

    routes: Mapping[str, Broker]

    @property
    def brokers(self) -> list[Broker]:
        """Each broker once, in the order the map names them."""
        return list({b.endpoint: b for b in self.routes.values()}.values())

    @property
    def several(self) -> bool:
        return len({b.endpoint for b in self.routes.values()}) > 1

    def broker_for(self, pool: str) -> Broker:
        """The broker of ``pool``; ``PoolNotFound`` (nothing is sent) when the map names neither
        it nor ``"*"``."""
        broker = self.routes.get(pool) or self.routes.get(ANY_POOL)
        if broker is None:
            raise PoolNotFound(f"no broker for pool {pool!r} in the endpoint map (it names "
                               f"{', '.join(sorted(self.routes))}; a '*' entry takes every other pool): "
                               "nothing was sent", pool=pool)
        return broker

    def serves(self, endpoint: str, pool: str) -> bool:
        """Whether this map sends ``pool``'s requests to the broker at ``endpoint``."""
        broker = self.routes.get(pool) or self.routes.get(ANY_POOL)
        return broker is not None and broker.endpoint == endpoint

    def pools_of(self, endpoint: str) -> list[str]:
        """The names the map routes to ``endpoint`` (``"*"`` included)."""
        return [pool for pool, b in self.routes.items() if b.endpoint == endpoint]


def broker_map(endpoint: str | None = None, endpoints: Mapping[str, str] | str | None = None) -> BrokerMap:
    """The brokers a client uses: ``endpoints`` (a pool -> endpoint map, or its ``DSPEX_ENDPOINTS``
    text), else ``endpoint`` (one broker for every pool), else ``DSPEX_ENDPOINTS``, else
    ``DSPEX_ENDPOINT``, else the default ipc path. An argument wins over the environment; two
    of the same rank (both arguments, or both variables) are a ``ConfigError``.

    The text form is ``POOL=ENDPOINT`` entries separated by commas (or newlines), ``*`` for every
    pool not named, each optionally followed by ``;server_key=FILE`` and ``;client_key=FILE``
    (a ``tcp://`` broker's public key and this client's secret key file for it), e.g.
    ``triage_pool=ipc:///tmp/dx-a/frontend.sock,*=ipc:///tmp/dx-b/frontend.sock``. A map's values
    take the same ``ENDPOINT;server_key=FILE`` form.
    """
    if endpoint and endpoints is not None:
        raise ConfigError("give endpoint (one broker) or endpoints (a pool -> endpoint map), not both")
    if endpoints is not None:
        return _parse_map(endpoints, "endpoints")
    if endpoint:
        return BrokerMap({ANY_POOL: _parse_broker(endpoint, "endpoint")})
    text = os.environ.get("DSPEX_ENDPOINTS", "").strip()
    if text and os.environ.get("DSPEX_ENDPOINT"):
        raise ConfigError("DSPEX_ENDPOINT (one broker) and DSPEX_ENDPOINTS (a pool -> endpoint map) are both set: "
                          "unset one")
    if text:
        return _parse_map(text, "DSPEX_ENDPOINTS")
    return BrokerMap({ANY_POOL: Broker(check_endpoint(client_endpoint()))})


def _parse_map(endpoints: Mapping[str, str] | str, source: str) -> BrokerMap:
    if isinstance(endpoints, str):
        entries: list[tuple[str, str]] = []
        for entry in endpoints.replace("\n", ",").split(","):
            if not entry.strip():
                continue
            pool, sep, value = entry.partition("=")
            if not sep:
                raise ConfigError(f"{source}: {entry.strip()!r} is not POOL=ENDPOINT (e.g. "
                                  "triage_pool=ipc:///tmp/dx-a/frontend.sock,*=ipc:///tmp/dx-b/frontend.sock)")
            entries.append((pool.strip(), value))
    else:
        entries = list(endpoints.items())
    routes: dict[str, Broker] = {}
    keys: dict[str, Broker] = {}
    for pool, value in entries:
        if not pool or any(c.isspace() or c in "=;," for c in pool):
            raise ConfigError(f"{source}: {pool!r} is not a pool name (or '*')")
        if pool in routes:
            raise ConfigError(f"{source}: pool {pool} is named twice")
        broker = _parse_broker(value, f"{source}[{pool}]")
        same = keys.setdefault(broker.endpoint, broker)
        if same != broker:
            raise ConfigError(f"{source}: {broker.endpoint} is given different CURVE key files in two entries")
        routes[pool] = broker
    if not routes:
        raise ConfigError(f"{source} names no broker")
    return BrokerMap(routes)


def _parse_broker(value: str, source: str) -> Broker:
    """``ENDPOINT[;server_key=FILE][;client_key=FILE]``."""
    endpoint, *options = (part.strip() for part in value.split(";"))
    check_endpoint(endpoint)
    files: dict[str, str] = {}
    for option in options:
        name, sep, path = (s.strip() for s in option.partition("="))
        if not sep or name not in _KEY_OPTIONS or not path:
            raise ConfigError(f"{source}: {option!r} is not server_key=FILE or client_key=FILE")
        files[name] = path
    if files and not endpoint.startswith("tcp://"):
        raise ConfigError(f"{source}: CURVE key files are for tcp:// brokers, not {endpoint}")
    return Broker(endpoint, files.get("server_key"), files.get("client_key"))


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
