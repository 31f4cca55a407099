"""Why the broker does not answer, when this conf's supervisord says it runs.

The usual cause on a shared machine is a mismatch: the broker listens in another run directory
than this shell's (``DSPEX_RUN_DIR`` set for one and not the other), or the command reads another
stack's supervisor.conf. The broker process's own command line and environment (``/proc``, same
uid) say where it listens, so the message can name the values on both sides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspex.client.config import ClientConfig
from dspex.stack.health import State, proc_uptime
from dspex.stack.supervisor import (
    Supervisor,
    SupervisorConf,
    SupervisorError,
    SupervisorUnreachable,
    full_name,
)

# supervisord states of a broker that exited by itself (its log says why)
DIED = ("FATAL", "BACKOFF", "EXITED")
# a broker binds its sockets within a few seconds of its start (it imports no dspy); past this,
# RUNNING and silent at our endpoint is a problem, not a start
BROKER_GRACE_S = 20.0


@dataclass(frozen=True)
class BrokerProcess:
    """Where a broker process listens, from its command line and environment."""

    pid: int
    frontend: str
    run_dir: str  # "" when its frontend is not ipc
    config: str  # its --config ("" when none)


def broker_process(pid: int) -> BrokerProcess | None:
    """Read ``/proc/PID`` of a broker (None when it cannot be read: another host, gone, no /proc)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.decode(errors="replace").partition("=")[::2] for item in f.read().split(b"\0") if item)
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None

    def flag(name: str) -> str:
        for i, arg in enumerate(argv):
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
        return ""

    # what default_frontend() computes in that process
    run_dir = env.get("DSPEX_RUN_DIR") or f"/tmp/dspex-{uid}"
    frontend = (flag("--frontend") or env.get("DSPEX_FRONTEND") or env.get("DSPEX_ENDPOINT")
                or f"ipc://{run_dir}/frontend.sock")
    where = os.path.dirname(frontend[len("ipc://"):]) if frontend.startswith("ipc://") else ""
    conf = flag("--config") or env.get("DSPEX_CONFIG") or ""
    return BrokerProcess(pid, frontend, where, os.path.abspath(conf) if conf else "")


# /proc/PID/stat's state letter, as an operator reads it
PROCESS_STATES = {"R": "running (busy: a long drain of messages, or a loop)", "S": "sleeping",
                  "D": "in uninterruptible I/O (a disk or a network file system)",
                  "T": "stopped (a SIGSTOP or a debugger; kill -CONT {pid} resumes it)",
                  "t": "stopped by a debugger", "Z": "a zombie (exited, not reaped)"}


def process_state(pid: int) -> str:
    """What ``/proc/PID/stat`` says the process is doing, in words ("" when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            letter = f.read().rpartition(b")")[2].split()[0].decode()
    except (OSError, IndexError):
        return ""
    return PROCESS_STATES.get(letter, f"in state {letter}").format(pid=pid)


def bound_paths(pid: int) -> set[str]:
    """The unix socket paths process ``pid`` holds bound sockets at (its fds' inodes in
    ``/proc/PID/net/unix``): the kernel keeps a bound socket's path after its file is deleted."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[len("socket:["):-1] for fd in os.listdir(f"/proc/{pid}/fd")
                  if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
        with open(f"/proc/{pid}/net/unix") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return set()
    return {row[7] for row in rows if len(row) >= 8 and row[6] in inodes}


def here(config: ClientConfig) -> str:
    """This shell's run directory, as a reader sees it: ``DSPEX_RUN_DIR=...`` or the default."""
    return f"DSPEX_RUN_DIR={config.run_dir}" if config.run_dir_given else f"DSPEX_RUN_DIR unset, so {config.run_dir}"


def silent_broker(proc: dict[str, Any], endpoint: str, conf: SupervisorConf, error: str,
                  config: ClientConfig, timeout: float | None = None) -> tuple[State, str]:
    """The state and words for this supervisord's broker process ``proc`` (RUNNING or STARTING)
    when nothing answers at ``endpoint``: STARTING only while it is young and listens where we
    look; otherwise UNREACHABLE, naming where it listens and the likely cause. ``timeout``: the
    request was accepted and not answered within that many seconds (not "nothing listens")."""
    found = broker_process(int(proc["pid"])) if proc["pid"] else None
    up = proc_uptime(proc)
    name = full_name(proc)
    if found is not None and found.frontend != endpoint:
        if found.run_dir and endpoint.startswith("ipc://"):
            cause = (f"another DSPEX_RUN_DIR: the broker's is {found.run_dir}, this command's {here(config)}; "
                     f"run it with DSPEX_RUN_DIR={found.run_dir} (or --endpoint {found.frontend})")
        else:
            cause = f"another endpoint: run it with --endpoint {found.frontend}"
        return State.UNREACHABLE, (
            f"supervisord of {conf.path} reports its broker {name} RUNNING (pid {found.pid}), but it listens at "
            f"{found.frontend}, not at {endpoint}: {cause}")
    path = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else ""
    if found is not None and path and not os.path.exists(path) and path in bound_paths(found.pid):
        return State.UNREACHABLE, (
            f"supervisord of {conf.path} reports its broker {name} RUNNING (pid {found.pid}), and it listens at "
            f"{endpoint}, but its socket file {path} was deleted (or moved) while it ran (a cleanup of "
            f"{os.path.dirname(path)}?), so nothing can connect to it, new workers neither: restart it to bind it "
            f"again, supervisorctl -c {conf.path} restart broker (its sessions go; its workers register again)")
    if proc["statename"] == "STARTING" or up < BROKER_GRACE_S:
        return State.STARTING, f"the broker is starting (pid {proc['pid']}, up {up:.0f}s)"
    if timeout is not None and found is not None:  # ours, where we look: hung or overloaded, not elsewhere
        doing = process_state(found.pid)
        hint = "" if doing.startswith(("stopped", "a zombie")) else \
            f" (busy: raise --timeout; hung: see {conf.here / 'log' / 'broker.log'})"
        return State.UNREACHABLE, (
            f"the broker {name} of {conf.path} (pid {found.pid}, RUNNING for {up:.0f}s) accepts connections at "
            f"{endpoint} but did not answer within {timeout:g}s: its process is "
            f"{doing or 'hung or overloaded'}{hint}")
    other = f"; it was started with --config {found.config}" if found and found.config and \
        found.config != str(conf.path) else ""
    return State.UNREACHABLE, (
        f"supervisord of {conf.path} reports its broker {name} RUNNING for {up:.0f}s (pid {proc['pid']}), but "
        f"nothing answers at {endpoint} ({error}){other}. Likely causes: another stack's conf or run directory "
        f"({here(config)}; --supervisor-conf {conf.path}); else see {conf.here / 'log' / 'broker.log'}")


def explain(endpoint: str, conf: SupervisorConf | None, error: str, config: ClientConfig, timeout: float = 5.0) -> str:
    """What to add to "nothing is listening at ENDPOINT" for a command that needs the broker."""
    if conf is None:
        return ""
    try:
        with Supervisor(conf, timeout=timeout) as sup:
            procs = sup.processes()
            broker = next((p for p in procs if p["group"] == "broker" and p["name"] == "broker"), None)
            # a broker that died says why in its log's last line (a bad config, a held run directory)
            tail = sup.last_log_line(full_name(broker)) if broker and broker["statename"] in DIED else ""
    except (SupervisorUnreachable, SupervisorError):
        return f"; supervisord of {conf.path} is not running either (start the stack: dspexctl pools start)"
    if broker is None:
        return ""
    state = broker["statename"]
    if state in DIED:
        return (f"; supervisord of {conf.path} reports its broker {state}, its last log line: "
                f"{tail or '(none)'}")
    if state not in ("RUNNING", "STARTING"):  # STOPPED: someone stopped it
        conf_opt = "" if conf.path == Path("supervisor.conf").absolute() else f" --supervisor-conf {conf.path}"
        return (f"; supervisord of {conf.path} reports its broker {state}: start it with "
                f"dspexctl{conf_opt} pools start")
    _, text = silent_broker(broker, endpoint, conf, error, config)
    return "; " + text
