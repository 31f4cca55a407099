"""``dspexctl hosts conf``: the supervisord conf of a host that runs only workers.

Run it on the worker host, after copying the two key files there (docs/operations.md, "Many
hosts")::

    dspexctl hosts conf --broker tcp://broker.example:5556 --pool triage_pool=4 > /srv/dspex/workers.conf
    supervisord -c /srv/dspex/workers.conf

The conf starts ``python -m worker`` for each named pool against the broker's TCP backend with
CURVE, under the interpreter that runs this command (``--python`` for another). It checks here
what it writes: the key files (the worker's secret key, the broker's public one), the
interpreter (it must import dspex) and the endpoint. Everything supervisord writes (its log,
pidfile, socket and the workers' logs) goes next to the conf, so the conf needs a directory of its
own and nothing else must exist.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import zmq.auth

# not starting with "-": the workers' `--pool NAME` would read it as an option and never start
_POOL_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")
# supervisord's conf: "%" interpolates, and " ;" or " #" start a comment even inside a command=
_UNSAFE_IN_CONF = re.compile(r"[;#\n\r]")
_SOCKET_NAME = "supervisor.sock"


@dataclass(frozen=True)
class HostConf:
    broker: str
    pools: tuple[tuple[str, int], ...]
    worker_key: Path
    server_key: Path
    python: str


def parse_broker(value: str) -> str:
    """``tcp://HOST:PORT`` that a worker can connect to; anything else is refused."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme != "tcp":
        raise click.BadParameter(
            f"{value!r} is not a TCP endpoint: a worker host reaches the broker at tcp://HOST:PORT "
            "(its --backend; ipc:// only reaches a broker on the same host)")
    host, colon, port = rest.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r}: expected tcp://HOST:PORT with a port from 1 to 65535")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise click.BadParameter(f"{value!r}: an IPv6 address goes in brackets, e.g. tcp://[fd00::1]:5556")
    if host in ("*", "0.0.0.0", "[::]", "[*]"):
        raise click.BadParameter(f"{value!r} is a bind address: give the broker host's name or address "
                                 "as the worker host reaches it")
    if _UNSAFE_IN_CONF.search(value) or "%" in value or any(c.isspace() for c in value):
        raise click.BadParameter(f"{value!r}: a host name has no spaces, ';', '#' or '%'")
    return value


def parse_pool(value: str) -> tuple[str, int]:
    """``NAME=N``: N worker processes of pool NAME."""
    name, sep, count = value.partition("=")
    if not sep or not _POOL_NAME.fullmatch(name) or not count.isdigit() or int(count) < 1:
        raise click.BadParameter(f"{value!r}: expected NAME=N, a pool name (letters, digits, '_', '.', '-', not starting with '-') "
                                 "and a number of worker processes of at least 1, e.g. triage_pool=4")
    return name, int(count)


def check_key(path: Path, secret: bool) -> Path:
    """The worker's secret key file (``secret``) or the broker's public key file, absolute."""
    if not path.is_file():
        source = "worker.key_secret" if secret else "broker.key"
        raise click.BadParameter(f"{path} does not exist: copy {source} from the directory `dspexctl keys "
                                 "generate` wrote on the broker host")
    try:
        _, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path} is not a CURVE key file: {exc}") from None
    if secret and secret_key is None:
        raise click.BadParameter(f"{path} holds a public key only: give the worker's secret key file "
                                 "(worker.key_secret)")
    if not secret and secret_key is not None:
        raise click.BadParameter(f"{path} holds a secret key: give the broker's public key file (broker.key); "
                                 "the broker's secret key never leaves the broker host")
    absolute = path.absolute()  # not resolved: a symlink (a rotated key) stays the path to read
    if _UNSAFE_IN_CONF.search(str(absolute)):
        raise click.BadParameter(f"{absolute}: supervisord cannot carry ';', '#' or line breaks in a path")
    return absolute


def check_python(python: str) -> str:
    """An interpreter that imports dspex (``-P``: the working directory's checkout does not count)."""
    if _UNSAFE_IN_CONF.search(python):
        raise click.BadParameter(f"{python}: supervisord cannot carry ';', '#' or line breaks in a path")
    if "/" in python:  # supervisord runs the programs in the conf's directory, not in ours
        python = str(Path(python).absolute())
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('dspex') is None)"
    try:
        found = subprocess.run([python, "-P", "-c", probe], capture_output=True, timeout=60,
                               check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise click.BadParameter(f"cannot run {python}: {exc}") from None
    if not found:
        raise click.BadParameter(f"{python} cannot import dspex: install dspex into it, or give another "
                                 "interpreter")
    return python


def _arg(value: str | Path) -> str:
    return shlex.quote(str(value)).replace("%", "%%")


def render(conf: HostConf) -> str:
    """The conf's text: supervisord's own sections, then one group of workers per pool."""
    listing = ", ".join(f"{name} ({n})" for name, n in conf.pools)
    lines = [
        f"; dspex workers of {listing} for the broker at {conf.broker}: no broker on this host.",
        "; Written by `dspexctl hosts conf`; see docs/operations.md, \"Many hosts\".",
        ";",
        ";   supervisord -c workers.conf              (-n to stay in the foreground)",
        ";   supervisorctl -c workers.conf status",
        ";   supervisorctl -c workers.conf shutdown",
        ";",
        "; Every file supervisord writes goes next to this conf (%(here)s): keep it in a directory of",
        "; its own. The workers connect to the broker's TCP backend with CURVE: the broker's public key",
        "; and this host's worker secret key are read from the paths below. A worker that loses the",
        "; broker keeps running and reconnects by itself; supervisord restarts one that exits.",
        "",
        "[unix_http_server]",
        f"file = %(here)s/{_SOCKET_NAME}",
        "chmod = 0700",
        "",
        "[supervisorctl]",
        f"serverurl = unix://%(here)s/{_SOCKET_NAME}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisord]",
        "logfile = %(here)s/supervisord.log",
        "pidfile = %(here)s/supervisord.pid",
        "childlogdir = %(here)s",
        "logfile_maxbytes = 10MB",
        "logfile_backups = 3",
        "loglevel = info",
        'environment = LITELLM_LOCAL_MODEL_COST_MAP="True",PYTHONUNBUFFERED="1"',
    ]
    for name, n in conf.pools:
        command = " ".join([_arg(conf.python), "-P", "-m", "worker", "--pool", _arg(name), "--backend", _arg(conf.broker),
                            "--curve-server-key", _arg(conf.server_key), "--curve-key", _arg(conf.worker_key)])
        lines += [
            "",
            f"[group:{name}]",
            f"programs = {name}",
            "",
            f"[program:{name}]",
            f"command = {command}",
            "process_name = %(program_name)s_%(process_num)02d",
            f"numprocs = {n}",
            "directory = %(here)s",
            "autostart = true",
            "; a worker told to leave (recycled) exits 0 and must come back as a new incarnation",
            "autorestart = true",
            "startsecs = 1",
            "startretries = 5",
            "stopsignal = TERM",
            "stopwaitsecs = 30",
            "stopasgroup = true",
            "killasgroup = true",
            "redirect_stderr = true",
            "stdout_logfile = %(here)s/%(program_name)s_%(process_num)02d.log",
            "stdout_logfile_maxbytes = 10MB",
            "stdout_logfile_backups = 3",
        ]
    return "\n".join(lines) + "\n"


@click.group()
def hosts() -> None:
    """Hosts that run only workers, for a broker on another host."""


@hosts.command("conf")
@click.option("--broker", required=True, metavar="tcp://HOST:PORT", callback=lambda _c, _p, v: parse_broker(v),
              help="the broker's worker endpoint (its --backend) as this host reaches it")
@click.option("--pool", "pools", multiple=True, required=True, metavar="NAME=N",
              callback=lambda _c, _p, v: _unique_pools([parse_pool(spec) for spec in v]),
              help="run N worker processes of pool NAME here (repeatable; the broker must declare NAME)")
@click.option("--worker-key", type=click.Path(path_type=Path), default=Path("keys/worker.key_secret"),
              show_default=True, metavar="PATH", callback=lambda _c, _p, v: check_key(v, secret=True),
              help="this host's worker secret key file; its public key must be in the broker's allowed/workers/")
@click.option("--server-key", type=click.Path(path_type=Path), default=Path("keys/broker.key"),
              show_default=True, metavar="PATH", callback=lambda _c, _p, v: check_key(v, secret=False),
              help="the broker's public key file")
@click.option("--python", default=sys.executable, show_default="the interpreter running dspexctl", metavar="PATH",
              callback=lambda _c, _p, v: check_python(v),
              help="the interpreter that runs the workers on this host; it must import dspex")
@click.option("--json", "json_out", is_flag=True, help="print one JSON document: the conf's text and what it "
              "was written from")
@click.pass_context
def conf_command(ctx: click.Context, broker: str, pools: tuple[tuple[str, int], ...], worker_key: Path,
                 server_key: Path, python: str, json_out: bool) -> None:
    """Print a supervisord conf that runs workers of the named pools on this host.

    Run it on the worker host and save the output in a directory of its own (supervisord writes
    its log, pidfile, socket and the workers' logs next to it), then start it with
    `supervisord -c workers.conf`. The key files and the interpreter are checked here and written
    as absolute paths.
    """
    text = render(HostConf(broker, pools, worker_key, server_key, python))
    if json_out or getattr(ctx.obj, "json", False):
        click.echo(json.dumps({"conf": text, "broker": broker, "pools": dict(pools), "worker_key": str(worker_key),
                               "server_key": str(server_key), "python": python}, indent=2))
        return
    click.echo(text, nl=False)


def _unique_pools(pools: list[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    names = [name for name, _ in pools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise click.BadParameter(f"pool {', '.join(twice)} given twice: one --pool NAME=N per pool")
    return tuple(pools)
