"""Which broker a client talks to: the endpoint map (one broker for every pool, or a pool ->
broker map), and the check of an endpoint before a client connects to it."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dspex.client.config import ClientConfig
from dspex.wire.errors import BrokerUnreachable, ConfigError, PoolNotFound
from dspex.wire.sockets import check_endpoint, probe_tcp

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


def broker_map(config: ClientConfig, endpoint: str | None = None,
               endpoints: Mapping[str, str] | str | None = None) -> BrokerMap:
    """The brokers a client uses: ``endpoints`` (a pool -> endpoint map, or its ``DSPEX_ENDPOINTS``
    text: docs/operations.md, *More than one broker*), else ``endpoint`` (one broker for every
    pool), else ``DSPEX_ENDPOINTS``, else ``DSPEX_ENDPOINT``, else the default ipc path. An
    argument wins over the environment; two of the same rank (both arguments, or both variables)
    are a ``ConfigError``."""
    if endpoint and endpoints is not None:
        raise ConfigError("give endpoint (one broker) or endpoints (a pool -> endpoint map), not both")
    # (dspexctl passes its --endpoint(s), which click takes from these variables when not given)
    if endpoints is not None:
        return _parse_map(endpoints, "DSPEX_ENDPOINTS" if endpoints == config.endpoints else "endpoints")
    if endpoint:
        return BrokerMap({ANY_POOL: _parse_broker(endpoint, "DSPEX_ENDPOINT" if endpoint == config.endpoint
                                                  else "endpoint")})
    text = config.endpoints
    if text and config.endpoint:
        raise ConfigError("DSPEX_ENDPOINT (one broker) and DSPEX_ENDPOINTS (a pool -> endpoint map) are both set: "
                          "unset one")
    if text:
        return _parse_map(text, "DSPEX_ENDPOINTS")
    return BrokerMap({ANY_POOL: Broker(config.endpoint_or_default())})


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
    elif isinstance(endpoints, Mapping):
        entries = list(endpoints.items())
    else:
        raise ConfigError(f"{source} is a map of pool names to endpoints (or its POOL=ENDPOINT,... text), got "
                          f"{type(endpoints).__name__} {endpoints!r:.60}")
    routes: dict[str, Broker] = {}
    keys: dict[str, Broker] = {}
    for pool, value in entries:
        if not isinstance(pool, str) or not pool or any(c.isspace() or c in "=;," for c in pool):
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
    if not isinstance(value, str):
        raise ConfigError(f"{source}: an endpoint is a str (ipc://PATH or tcp://HOST:PORT), got "
                          f"{type(value).__name__} {value!r:.60}")
    endpoint, *options = (part.strip() for part in value.split(";"))
    check_endpoint(endpoint, source)
    files: dict[str, str] = {}
    for option in options:
        name, sep, path = (s.strip() for s in option.partition("="))
        if not sep or name not in _KEY_OPTIONS or not path:
            raise ConfigError(f"{source}: {option!r} is not server_key=FILE or client_key=FILE")
        files[name] = path
    if files and not endpoint.startswith("tcp://"):
        raise ConfigError(f"{source}: CURVE key files are for tcp:// brokers, not {endpoint}")
    return Broker(endpoint, files.get("server_key"), files.get("client_key"))


def probe_endpoint(endpoint: str) -> None:
    """Before a client connects: say what is wrong with *that* endpoint at once, instead of a
    ``Timeout`` after the request's deadline that cannot tell "never reached" from "still running"."""
    if endpoint.startswith("tcp://"):
        probe_tcp(endpoint)
    elif endpoint.startswith("ipc://"):
        _probe_ipc(endpoint)


def _probe_ipc(endpoint: str) -> None:
    """``BrokerUnreachable``: nothing listens at the socket; ``ConfigError``: a socket that may be
    anyone's, or that we may not use. A client creates nothing, so it never asks for a directory's
    mode to change: the broker and workers, which create the run directory, enforce its 0700 rule."""
    path = Path(endpoint[len("ipc://"):])
    parent = path.parent
    where = "run directory" if str(parent) == ClientConfig.from_env().run_dir else "directory"
    try:
        dst = parent.stat()
    except FileNotFoundError:
        raise BrokerUnreachable(f"nothing is listening at {endpoint}: its {where} {parent} does not exist") from None
    except PermissionError:
        raise ConfigError(f"cannot use {endpoint}: permission denied reading its {where} {parent}") from None
    except OSError as err:  # a file where a directory of the path should be
        raise ConfigError(f"cannot use {endpoint}: its {where} {parent}: {err.strerror or err}") from None
    uid = os.getuid()
    mode = stat.S_IMODE(dst.st_mode)
    # the way out: a directory of one's own; chmod only for the stack's own run directory, whose
    # rule it is (advice to chmod a directory one was merely pointed at, /tmp say, does harm)
    own_dir = ("set DSPEX_RUN_DIR to a directory of your own" if where == "run directory"
               else "use an ipc:// endpoint in a directory of your own")
    if not stat.S_ISDIR(dst.st_mode):
        raise ConfigError(f"cannot use {endpoint}: its {where} {parent} is not a directory ({own_dir})")
    if dst.st_uid not in (uid, 0):
        raise ConfigError(f"refusing {endpoint}: its {where} {parent} belongs to uid {dst.st_uid}, not to us "
                          f"(uid {uid}), so the socket there may be anyone's ({own_dir})")
    if mode & 0o022 and not mode & stat.S_ISVTX:
        fix = (f"chmod 700 {parent}, as the broker requires, or {own_dir}"
               if where == "run directory" and dst.st_uid == uid else own_dir)
        raise ConfigError(f"refusing {endpoint}: its {where} {parent} has mode {mode:04o}, writable by other "
                          f"users, so the socket there may be anyone's ({fix})")
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
