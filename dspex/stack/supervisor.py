"""supervisord from dspexctl: where its socket is, its XML-RPC API, and starting it.

The XML-RPC client uses supervisor's own transport (``supervisor.xmlrpc.SupervisorTransport``),
which speaks HTTP over the unix socket of ``[unix_http_server]``. Facts of supervisord 4.3 this
module works around: ``xmlrpc.client.MultiCall`` breaks against it (we never batch), and
``startProcess(name, False)`` is the non-blocking form.
"""

from __future__ import annotations

import configparser
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from xml.parsers.expat import ExpatError

from dspex.wire.errors import ConfigError, DidNotRun, MayHaveRun, UsageError
from dspex.wire.sockets import UNIX_PATH_MAX

# supervisor.xmlrpc.Faults values we branch on
FAULT_SHUTDOWN_STATE = 6
FAULT_BAD_NAME = 10
FAULT_ALREADY_STARTED = 60

STOPPED_STATES = ("STOPPED", "EXITED", "FATAL")
LOG_TAIL_BYTES = 65536  # of supervisord's log and the kills file: the exits of the lately exited processes

# beside supervisord's log: the processes an operator's command SIGKILLed (Supervisor.kill)
KILLS_FILE = "dspexctl-kills.log"
KILLED_BY_OPERATOR = "sent by dspexctl workers recycle --hard"


class SupervisorUnreachable(DidNotRun):
    """supervisord is not running, or its socket cannot be reached: nothing was asked of it."""

    code = "supervisor_unreachable"


class SupervisorError(MayHaveRun):
    """supervisord answered with a fault, or could not be started: part of what was asked (a
    group stop, a start) may have happened; ``pools status`` shows where things stand."""

    code = "supervisor_error"


class SupervisorNoSuchProcess(UsageError):
    """supervisord knows no process or group of that name (its BAD_NAME fault)."""

    code = "supervisor_bad_name"


DEFAULT_CONF = Path("supervisor.conf")  # dspexctl's --supervisor-conf (DSPEX_SUPERVISOR_CONF) when not given


@dataclass(frozen=True)
class SupervisorConf:
    """What dspexctl needs from a supervisor.conf: its socket, pidfile and log file."""

    path: Path
    serverurl: str
    pidfile: Path | None
    logfile: Path | None

    @property
    def here(self) -> Path:
        return self.path.parent

    @property
    def socket_path(self) -> Path | None:
        return Path(self.serverurl[len("unix://"):]) if self.serverurl.startswith("unix://") else None

    @classmethod
    def load(cls, path: str | Path) -> SupervisorConf:
        conf = Path(path).expanduser().absolute()
        if not conf.is_file():
            raise ConfigError(f"no supervisor config at {conf} (pass --supervisor-conf or set DSPEX_SUPERVISOR_CONF)")
        parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"), strict=False)
        try:
            parser.read(conf)
        except configparser.MissingSectionHeaderError as exc:
            raise ConfigError(f"{conf}: line {exc.lineno} comes before any [section] header ({exc.line.strip()!r}): "
                              "is it a supervisord conf?") from None
        except configparser.Error as exc:  # its message spans lines: one line for the operator
            raise ConfigError(f"cannot parse {conf}: {' '.join(str(exc).split())}") from None
        names = {"here": str(conf.parent), **{f"ENV_{k}": v for k, v in os.environ.items()}}

        def get(section: str, key: str) -> str | None:
            raw = parser.get(section, key, fallback=None)
            if raw is None:
                return None
            try:
                return raw.strip() % names
            except (KeyError, ValueError) as exc:
                raise ConfigError(f"{conf} [{section}] {key}: cannot expand {raw!r} ({exc})") from None

        serverurl = get("supervisorctl", "serverurl")
        if not serverurl:
            sock = get("unix_http_server", "file")
            if sock:
                serverurl = f"unix://{sock}"
            else:
                port = get("inet_http_server", "port")
                if not port:
                    raise ConfigError(f"{conf} has no [unix_http_server] (nor [inet_http_server]): "
                                      "dspexctl needs supervisord's XML-RPC interface")
                serverurl = f"http://{port if ':' in port else '127.0.0.1:' + port}"
        if serverurl.startswith("unix://"):
            sock_path = serverurl[len("unix://"):]
            if len(sock_path.encode()) > UNIX_PATH_MAX:
                raise ConfigError(f"supervisord's socket path is {len(sock_path.encode())} bytes, over the unix "
                                  f"socket limit of {UNIX_PATH_MAX}: {sock_path} (move the checkout to a shorter path)")
        elif not serverurl.startswith("http://"):
            raise ConfigError(f"{conf}: unsupported serverurl {serverurl!r}")
        pidfile = get("supervisord", "pidfile")
        logfile = get("supervisord", "logfile")
        return cls(conf, serverurl, Path(pidfile) if pidfile else None, Path(logfile) if logfile else None)


class Supervisor:
    """A thin XML-RPC client of one supervisord. Every failure becomes a dspex error."""

    def __init__(self, conf: SupervisorConf, timeout: float = 10.0) -> None:
        from supervisor.xmlrpc import SupervisorTransport

        self.conf = conf
        self.timeout = timeout
        self._transport = SupervisorTransport(None, None, serverurl=conf.serverurl)
        make_connection = self._transport._get_connection

        def connection_with_timeout() -> Any:  # the transport's connections have no timeout of their own
            conn = make_connection()
            connect = conn.connect

            def connect_then_time_out() -> None:
                connect()
                conn.sock.settimeout(self.timeout)

            conn.connect = connect_then_time_out
            return conn

        self._transport._get_connection = connection_with_timeout
        # the host part is ignored for unix sockets; the transport carries the real address
        self._proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=self._transport)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, *args: Any) -> Any:
        for attempt in (1, 2):
            try:
                return getattr(self._proxy, method)(*args)
            except xmlrpc.client.Fault as fault:
                if fault.faultCode == FAULT_BAD_NAME:
                    name = args[0] if args else ""
                    raise SupervisorNoSuchProcess(f"supervisord: {method}: no process or group {name!r}",
                                                  fault=fault.faultCode) from None
                raise SupervisorError(f"supervisord: {method}: {fault.faultString}", fault=fault.faultCode) from None
            except ExpatError as exc:  # supervisord counts characters, not bytes: a non-ASCII name cuts it short
                self._transport.close()
                raise SupervisorError(f"supervisord: {method}: its answer could not be read ({exc}); a process or "
                                      "group name that is not ASCII garbles supervisord's XML-RPC answers: "
                                      "rename it") from None
            except (OSError, xmlrpc.client.ProtocolError) as exc:
                self._transport.close()
                where = self.conf.serverurl
                if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
                    raise SupervisorUnreachable(
                        f"supervisord is not running (no answer at {where}; start it with "
                        f"`dspexctl pools start` or `supervisord -c {self.conf.path}`)") from None
                if attempt == 2 or isinstance(exc, TimeoutError):
                    raise SupervisorUnreachable(f"cannot reach supervisord at {where}: {exc}") from None
                # a kept-alive connection the server closed: retry once on a fresh one
        raise AssertionError("unreachable")

    # -- the calls dspexctl uses -------------------------------------------------------------
    def state(self) -> str:
        return str(self.call("supervisor.getState")["statename"])

    def pid(self) -> int:
        return int(self.call("supervisor.getPID"))

    def processes(self) -> list[dict[str, Any]]:
        return list(self.call("supervisor.getAllProcessInfo"))

    def stop_group(self, group: str, wait: bool = True) -> None:
        self.call("supervisor.stopProcessGroup", group, wait)

    def start_process(self, name: str) -> None:
        try:
            self.call("supervisor.startProcess", name, False)
        except SupervisorError as err:
            if err.details.get("fault") != FAULT_ALREADY_STARTED:
                raise

    def tail(self, name: str = "") -> str:
        """The end of process ``name``'s stdout log (which has its stderr too), or with no name of
        supervisord's own log; "" when it cannot be read (``logfile = syslog``, say)."""
        try:
            if name:
                return str(self.call("supervisor.tailProcessStdoutLog", name, 0, 4000)[0])
            return str(self.call("supervisor.readLog", -LOG_TAIL_BYTES, 0))
        except (SupervisorError, SupervisorNoSuchProcess):
            return ""

    def last_log_line(self, name: str) -> str:
        """The last line process ``name`` wrote: for a FATAL or BACKOFF program, usually why it
        died. "" when there is none."""
        lines = [ln.strip() for ln in self.tail(name).replace("\r", "\n").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else ""

    def exit_causes(self) -> dict[int, str]:
        """How each process that exited lately ended, by pid, as supervisord saw it when it reaped
        it (``terminated by SIGSEGV``, ``exit status 1``): only its parent knows, and supervisord
        writes it to its own log; a SIGKILL that :meth:`kill` sent says so."""
        return exit_causes(self.tail(), self.killed())

    def unexpected_exits(self, name: str, since: float) -> list[tuple[int, float, str]]:
        """:func:`unexpected_exits` of program ``name`` in supervisord's log."""
        return unexpected_exits(self.tail(), name, since)

    def restart_loops(self, procs: list[dict[str, Any]], since: float) -> dict[str, tuple[int, str]]:
        """:func:`restart_loops` of ``procs`` in supervisord's log (one read; {} when it cannot be
        read, or nothing to look for)."""
        if not procs:
            return {}
        try:
            text = str(self.call("supervisor.readLog", -65536, 0))
        except (SupervisorError, SupervisorNoSuchProcess):
            return {}
        return restart_loops(text, procs, since, self.killed())

    def signal(self, name: str, sig: str) -> None:
        self.call("supervisor.signalProcess", name, sig)

    def kills_file(self) -> Path | None:
        """Where :meth:`kill` notes its kills: beside supervisord's log (None: it logs to syslog)."""
        logfile = self.conf.logfile
        return logfile.parent / KILLS_FILE if logfile is not None and str(logfile) != "syslog" else None

    def kill(self, name: str, pid: int) -> None:
        """SIGKILL process ``name`` (pid ``pid``) as an operator's command: supervisord logs how a
        process ended, not who sent the signal, so the kill is noted first beside its log, and
        :meth:`exit_causes` names it instead of leaving a SIGKILL to look like the OOM killer's. A
        note that cannot be written leaves the kill unnamed, not undone."""
        path = self.kills_file()
        if path is not None:
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(f"{time.time():.3f} {pid} {name}\n")
            except OSError:
                pass
        self.signal(name, "KILL")

    def killed(self) -> dict[int, str]:
        """The pids :meth:`kill` killed lately, with their process names (the file's last lines)."""
        path = self.kills_file()
        if path is None:
            return {}
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_TAIL_BYTES))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return {}
        out: dict[int, str] = {}
        for line in lines:
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit():
                out[int(parts[1])] = parts[2]
        return out

    def shutdown(self) -> None:
        self.call("supervisor.shutdown")

    def running(self) -> bool:
        try:
            self.state()
        except SupervisorUnreachable:
            return False
        return True


_SPAWNED = re.compile(r"spawned: '(?P<name>[^']+)' with pid (?P<pid>\d+)")
_EXITED = re.compile(r"exited: (?P<name>\S+) \((?P<how>.+?); (?:not )?expected\)")


def exit_causes(log_text: str, killed: dict[int, str] | None = None) -> dict[int, str]:
    """pid -> how it ended, from supervisord's log: its ``spawned: 'NAME' with pid N`` lines say
    which pid a process name had when its ``exited: NAME (HOW; ...)`` line came. ``killed``: the
    pids (with their ``group:name``) an operator's command SIGKILLed (:meth:`Supervisor.kill`)."""
    pid_of: dict[str, int] = {}
    causes: dict[int, str] = {}
    for line in log_text.splitlines():
        if m := _SPAWNED.search(line):
            pid_of[m["name"]] = int(m["pid"])
        elif (m := _EXITED.search(line)) and m["name"] in pid_of:
            pid = pid_of.pop(m["name"])
            operator = (killed or {}).get(pid, "").rpartition(":")[2] == m["name"]
            causes[pid] = f"{m['how']}, {KILLED_BY_OPERATOR}" if operator and m["how"] == "terminated by SIGKILL" \
                else m["how"]
    return causes


def unexpected_exits(log_text: str, name: str, since: float) -> list[tuple[int, float, str]]:
    """(pid, when, how) of each exit of program ``name`` that supervisord logged as not expected
    (a crash, a kill from outside; not a stop it was asked for) after it had started (entered
    RUNNING: one that fails at its start served nothing), at or after ``since`` (epoch seconds;
    its log's times are local)."""
    pid = 0
    running = False
    found = []
    for line in log_text.splitlines():
        if (m := _SPAWNED.search(line)) and m["name"] == name:
            pid, running = int(m["pid"]), False
        elif f"success: {name} entered RUNNING state" in line:
            running = True
        elif running and (m := _EXITED.search(line)) and m["name"] == name and line.endswith("; not expected)"):
            try:
                when = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            if when >= since:
                found.append((pid, when, m["how"]))
    return found


def restart_loops(log_text: str, procs: list[dict[str, Any]], since: float, killed: dict[int, str],
                  at_least: int = 2) -> dict[str, tuple[int, str]]:
    """Of ``procs``, those supervisord restarted after ``at_least`` exits it did not expect since
    ``since`` (each after startsecs, so it never goes BACKOFF or FATAL; an operator's kill,
    ``killed`` by pid, is no loop's): full name -> (exits, how the last one ended)."""
    loops = {}
    for p in procs:
        exits = [e for e in unexpected_exits(log_text, p["name"], since) if e[0] not in killed]
        if len(exits) >= at_least:
            loops[full_name(p)] = (len(exits), exits[-1][2])
    return loops


def by_group(procs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """supervisord's processes by group (a pool's workers are its group's processes)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for p in procs:
        out.setdefault(p["group"], []).append(p)
    return out


def full_name(proc: dict[str, Any]) -> str:
    """``group:name`` as supervisord's process calls want it (a lone program is ``name:name``)."""
    return f"{proc['group']}:{proc['name']}"


def supervisord_command() -> list[str]:
    """The supervisord of this interpreter's environment (not whichever one is on PATH)."""
    sibling = Path(sys.executable).parent / "supervisord"
    if sibling.exists():
        return [str(sibling)]
    return [sys.executable, "-m", "supervisor.supervisord"]


def start_supervisord(conf: SupervisorConf, timeout: float = 30.0) -> int:
    """Start supervisord (daemonized) with ``conf``; return its pid once its XML-RPC answers.

    The programs run ``$DSPEX_PYTHON`` (see supervisor.conf): we pass our own interpreter, the one
    dspex is installed in, unless the caller's environment names another.
    """
    for path in (conf.socket_path, conf.pidfile, conf.logfile):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("DSPEX_PYTHON", sys.executable)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([*supervisord_command(), "-c", str(conf.path)], cwd=conf.here, env=env,
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        try:
            rc = proc.wait(timeout=timeout)  # the foreground half exits once the daemon has forked
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise SupervisorError(f"supervisord -c {conf.path} did not daemonize within {timeout:g}s") from None
        err.seek(0)
        text = err.read().decode(errors="replace").strip()
    if rc != 0:
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("For help")]
        said = " ".join(lines) or "no output"
        if rc == 2:  # supervisord's usage exit: it refused its conf (or options), nothing started
            raise ConfigError(f"supervisord refused {conf.path}: {said.removeprefix('Error: ')}")
        raise SupervisorError(f"supervisord -c {conf.path} failed (exit {rc}): {said}")
    deadline = time.monotonic() + timeout
    with Supervisor(conf, timeout=2.0) as sup:
        while True:
            try:
                return sup.pid()
            except SupervisorUnreachable:
                if time.monotonic() > deadline:
                    raise SupervisorError(f"supervisord started but does not answer at {conf.serverurl}; "
                                          f"see {conf.logfile}") from None
                time.sleep(0.05)


def supervisord_pid(conf: SupervisorConf) -> int | None:
    """The live supervisord named by ``conf``'s pidfile (None when there is none, or another
    process took the pid): also one that answers nobody (daemonizing, or shutting down)."""
    try:
        pid = int((conf.pidfile or Path("/nonexistent")).read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            is_supervisord = b"supervisord" in f.read()
    except (OSError, ValueError):
        return None
    return pid if is_supervisord and pid_alive(pid) else None


def left_running(conf: SupervisorConf) -> dict[int, str]:
    """Processes a supervisord of ``conf`` started that outlive it (it was killed): pid ->
    ``group:name``. supervisord names its server URL in each program's environment, so these are
    its programs (and what they spawned), never a broker or worker an operator started by hand."""
    url = f"SUPERVISOR_SERVER_URL={conf.serverurl}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if url in environ and pid_alive(int(entry.name)):
            names = dict(item.decode(errors="replace").split("=", 1) for item in environ if b"=" in item)
            found[int(entry.name)] = f"{names.get('SUPERVISOR_GROUP_NAME')}:{names.get('SUPERVISOR_PROCESS_NAME')}"
    return found


def left_running_text(conf: SupervisorConf, left: dict[int, str]) -> str:
    """The problem ``left_running`` found, and its fix."""
    named = ", ".join(f"{name} (pid {pid})" for pid, name in sorted(left.items(), key=lambda kv: kv[1]))
    return (f"supervisord of {conf.path} is not running, but {len(left)} process(es) it started still run: {named}; "
            "it was killed: stop them with `dspexctl stop`, then `dspexctl pools start`")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours still answers kill(0); it is gone for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
