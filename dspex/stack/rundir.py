"""The run directory's rules for the processes that create it (broker, workers): private to
this user (0700), one live broker per directory."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from pathlib import Path

from dspex.wire.errors import ConfigError
from dspex.wire.sockets import check_endpoint


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700, or check an existing one is ours and private (never
    chmod it: a directory someone else made wider may already hold their sockets)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's own word for it ("File exists") does not say what is wrong
        raise ConfigError(f"cannot use the run directory {path}: it is a file, not a directory "
                          "(set DSPEX_RUN_DIR to a directory this user may create)") from None
    except OSError as err:  # a read-only file system, a file in the path, no permission
        raise ConfigError(f"cannot create the run directory {path}: {err.strerror or err} "
                          "(set DSPEX_RUN_DIR to a directory this user may create)") from None
    return check_private_dir(path)


def check_private_dir(path: Path) -> Path:
    """Refuse a run directory that is not ours or not 0700: another local user who made it
    first would receive our workers' connections (and every request they run)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"run directory {path} does not exist (is the broker running?)") from None
    if st.st_uid != os.getuid():
        raise ConfigError(f"run directory {path} belongs to uid {st.st_uid}, not to us (uid {os.getuid()}): refusing it "
                          "(set DSPEX_RUN_DIR to a directory of your own)")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(f"run directory {path} has mode {mode:04o}; it must be 0700 (chmod 700 {path})")
    return path


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


def claim(path: str, what: str) -> int:
    """Hold an exclusive lock on ``path`` (made if missing) for as long as this process lives, or
    until the returned descriptor is closed; refuse it if another live process holds it. The
    kernel releases it when its holder dies, however it dies: no stale lock after a SIGKILL."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"another broker (pid {holder}) holds {what}: one broker per run directory and store "
                          "(stop it, or give this one its own DSPEX_RUN_DIR)") from None
    except OSError as err:
        os.close(fd)
        raise ConfigError(f"cannot lock {path}: {err.strerror or err}") from None
    try:  # the holder's pid, for the message above; the lock holds without it (a full disk)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError:
        pass
    return fd
