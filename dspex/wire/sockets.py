"""Where dspex's sockets are and the options each one gets: the default endpoints in the run
directory, the endpoint rules, the message size bound, CURVE keys of a connecting peer (a client
or a worker) and what a failed CURVE handshake means. Both ends of every connection use these.
Nothing here reads the environment itself: a process kind's settings pass theirs in."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import zmq

from dspex.wire.errors import BrokerUnreachable, ConfigError
from dspex.wire.protocol import MAX_MESSAGE_BYTES

Number = TypeVar("Number", int, float)

UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL


def run_dir(environ: Mapping[str, str]) -> Path:
    """``DSPEX_RUN_DIR`` of a process's environment, or ``/tmp/dspex-<uid>``: short enough for unix
    socket paths. Each process kind's settings call it once (the client's, the broker's, a
    worker's, dspexctl's)."""
    return Path(environ.get("DSPEX_RUN_DIR") or f"/tmp/dspex-{os.getuid()}")


def default_frontend(environ: Mapping[str, str]) -> str:
    """Where the broker takes clients unless told: ``DSPEX_FRONTEND``, ``DSPEX_ENDPOINT``, else the
    run directory's ``frontend.sock``."""
    return environ.get("DSPEX_FRONTEND") or environ.get("DSPEX_ENDPOINT") or f"ipc://{run_dir(environ)}/frontend.sock"


def default_backend(environ: Mapping[str, str]) -> str:
    """Where the broker takes workers unless told: ``DSPEX_BACKEND``, else the run directory's
    ``backend.sock``."""
    return environ.get("DSPEX_BACKEND") or f"ipc://{run_dir(environ)}/backend.sock"


def env_number(environ: Mapping[str, str], name: str, default: Number) -> Number:
    """A number of the environment, of the type of ``default`` (int or float), or ``default``
    when unset or empty; a variable that is not one is a ``ConfigError`` naming it (not a
    ValueError traceback in whichever process read it)."""
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        return type(default)(text)
    except ValueError:
        noun = "a whole number" if isinstance(default, int) else "a number"
        raise ConfigError(f"{name}={text!r} is not {noun}; unset it or give {noun} (default {default})") from None


def max_message_bytes(environ: Mapping[str, str]) -> int:
    """The largest message a socket takes: ``DSPEX_MAX_MESSAGE``, else the protocol's bound."""
    return env_number(environ, "DSPEX_MAX_MESSAGE", MAX_MESSAGE_BYTES)


def check_endpoint(endpoint: str, source: str = "") -> str:
    """Refuse endpoints we cannot use before zmq gives an obscure errno (or, for a tcp:// one
    without a port, CURVE's complaint); ``source`` names where it was given (``DSPEX_ENDPOINT``,
    ``--backend``) in the message. Every process kind's endpoints pass here."""
    where = f"{source}={endpoint!r}" if source else repr(endpoint)
    if endpoint.startswith("tcp://"):
        address = endpoint[len("tcp://"):]
        host, colon, port = address.rpartition(":")
        if not colon or address.endswith("]"):  # tcp://host, tcp://[::1]
            raise ConfigError(f"{where} has no port: a tcp:// endpoint is tcp://HOST:PORT, such as "
                              f"tcp://{address or 'HOST'}:5555")
        if not host or not (port == "*" or port.isdigit() and int(port) < 65536):
            raise ConfigError(f"{where} is not tcp://HOST:PORT (a port is 1 to 65535, or * or 0 for a bind to any)")
    elif endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if len(path.encode()) > UNIX_PATH_MAX:
            # a kernel limit (sun_path), so the only fix is a shorter directory: say how short
            fits = UNIX_PATH_MAX - len(os.path.basename(path).encode()) - 1
            raise ConfigError(
                f"ipc path is {len(path.encode())} bytes, over the unix socket limit of {UNIX_PATH_MAX} bytes: {path} "
                f"(use a DSPEX_RUN_DIR of at most {fits} bytes, such as the default /tmp/dspex-{os.getuid()}, "
                "or a shorter ipc:// endpoint)"
            )
    elif not endpoint.startswith("inproc://"):
        raise ConfigError(f"unsupported endpoint {where}: use ipc://PATH or tcp://HOST:PORT")
    return endpoint


def probe_tcp(endpoint: str) -> None:
    """``BrokerUnreachable`` when the host name does not resolve or nothing listens at the port.
    zmq resolves a host name to IPv4 only (a bracketed address is IPv6), so the probe does too. A
    probe that connects closes before zmq's greeting: the broker sees no handshake, failed or not.
    No answer within a second (a firewall that drops, a slow link) is left to the request."""
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    host = host.strip("[]")
    try:
        address = socket.getaddrinfo(host, int(port), family, socket.SOCK_STREAM)[0][4]
    except socket.gaierror as err:
        raise BrokerUnreachable(f"cannot reach {endpoint}: the host name {host} does not resolve"
                                f"{' to an IPv4 address' if family == socket.AF_INET else ''} ({err.strerror})") from None
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(address)
    except ConnectionRefusedError:
        raise BrokerUnreachable(f"nothing is listening at {endpoint} (connection refused by {address[0]})") from None
    except OSError as err:
        if err.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            raise BrokerUnreachable(f"cannot reach {endpoint}: {err.strerror}") from None
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
    server_public, _ = read_key_file(server_key_file, "the broker's public key file")
    if not own_key_file:
        raise ConfigError("a TCP peer needs its own secret key file (DSPEX_CURVE_CLIENT_KEY / "
                          "DSPEX_CURVE_WORKER_KEY) whose public key the broker allows")
    public, secret = read_key_file(own_key_file, "the secret key file")
    if secret is None:
        raise ConfigError(f"{own_key_file} holds no secret key")
    return server_public, (public, secret)


def read_key_file(path: str, what: str) -> tuple[bytes, bytes | None]:
    """A CURVE key file (``dspexctl keys generate`` writes them): its public key and its secret key
    (None in a public key file). One that is missing or not a key file is a ``ConfigError``."""
    from zmq.auth import load_certificate

    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path} does not exist (see `dspexctl keys generate`)")
    try:
        return load_certificate(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{what} {path} is not a CURVE key file ({err})") from None


def _tasks() -> set[int]:
    return {int(tid) for tid in os.listdir("/proc/self/task")}


class ZmqThreads:
    """The zmq threads (I/O and reaper) of a context that has no socket yet, run under
    ``SCHED_BATCH`` while their process is quiet and under the ordinary policy while it serves.
    An idle stack's zmq threads wake for its heartbeats only, and as ordinary threads they preempt
    the thread running on their core (their own process's, or another program's, such as a local
    model's). A batch thread waits for the running one to yield, which under load costs each hop
    up to a slice: so batch only between heartbeats that saw no traffic (:meth:`quiet`), ordinary
    again at the first message (:meth:`serving`). Nothing switches where the process does not run
    the ordinary policy (the operator's choice), on a context whose threads run already, or where a
    switch fails."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.batch = False
        self._tids: list[int] = []
        self._named = False  # the tids kept are the zmq threads' (named as they start)
        self._seen = True  # traffic since the last quiet()
        if not hasattr(os, "SCHED_BATCH") or os.sched_getscheduler(0) != os.SCHED_OTHER:
            return
        before = _tasks()
        ctx.socket(zmq.PAIR).close(0)  # the context starts its threads with its first socket
        self._tids = sorted(_tasks() - before)

    def serving(self) -> None:
        """A message of the process's work (not a heartbeat): the ordinary policy from now on."""
        self._seen = True
        if self.batch:
            self._switch(False)

    def quiet(self) -> None:
        """A heartbeat: batch if no work came since the last one."""
        if not self._seen and not self.batch and self._tids:
            self._switch(True)
        self._seen = False

    def _switch(self, batch: bool) -> None:
        if not self._named:  # (a thread another thread started meanwhile is not one of them)
            self._named = True
            self._tids = [tid for tid in self._tids if _comm(tid).startswith("ZMQbg/")]
        policy = os.SCHED_BATCH if batch else os.SCHED_OTHER
        kept = []
        for tid in self._tids:
            try:
                os.sched_setscheduler(tid, policy, os.sched_param(0))
                kept.append(tid)
            except OSError:  # the thread ended (its context did), or the switch is refused
                pass
        self._tids = kept
        self.batch = batch


def _comm(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def tune_socket(sock: zmq.Socket[bytes], *, max_message: int, endpoint: str) -> None:
    """Options every dspex socket gets: no linger on close, bounded inbound message size; IPv6 for
    an endpoint whose host is an IPv6 address (``tcp://[fd00::1]:5556``, ``tcp://[::]:5556``)."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    # libzmq is IPv4-only by default: a bind to [::] fails ("No such device") and a connect to
    # [fd00::1] is accepted but never made, so a worker would wait for its broker forever. Only
    # for a bracketed address: with IPv6 on, a host name may resolve to an IPv6 address first
    # (localhost as ::1) where the broker listens on IPv4 only.
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)


# socket monitor events that say why a CURVE connection to the broker never carried a message
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def handshake_failure(event: int, peer: str, curve: bool, public_key: bytes | None = None) -> str:
    """Why the handshake with the broker failed, in the peer's words, or "" (not a handshake event).

    The broker's ZAP handler refusing our public key answers with an ERROR (HANDSHAKE_FAILED_AUTH).
    A server key that is not the broker's makes our HELLO undecryptable: the broker drops the
    connection mid-handshake and we see FAILED_NO_DETAIL or FAILED_PROTOCOL. ``public_key``: ours,
    named in a refusal, as the broker's log and ``dspexctl pools status`` name it.
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        key = f" {public_key.decode()}" if public_key else ""
        return (f"the broker refused this {peer}'s key (its public key{key} is not in the broker's allow-list, "
                f"{peer}s/ of its --curve-allowed directory: give this {peer} a key `dspexctl keys generate` wrote "
                "for that broker)")
    if curve and event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
        return ("the server key does not match: the broker closed the connection during the CURVE handshake "
                "(DSPEX_CURVE_SERVER_KEY must hold that broker's public key)")
    return ""
