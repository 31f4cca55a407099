"""dspexctl: the operator's CLI (``dspexctl --help``, docs/operations.md).

Each command is a request/execute/present triple (dspexctl/commands.py); ``--json`` prints the
execute step's data as one JSON document and skips the presentation. Every dspex error becomes a
single ``Error: ...`` line on stderr and an exit code (1 failed, 2 user mistake, 4 unreachable,
8 timed out).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from dspex.stack.supervisor import DEFAULT_CONF
from dspex.wire.errors import DspexError
from dspexctl import commands, lifecycle
from dspexctl.commands import Settings, exit_code_for
from dspexctl.flagship import flagship
from dspexctl.hosts import hosts
from dspexctl.keys import keys
from dspexctl.sessions import SessionsClose, SessionsList
from dspexctl.status import PoolsStatus


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


_JSON, _INTERRUPTED = "dspexctl.json", "dspexctl.interrupted"  # (ctx.meta keys: shared by every context)


def run(ctx: click.Context, cmd: Any, json_out: bool, **options: Any) -> None:
    """request -> execute -> present (skipped under --json) -> exit code; an error or Ctrl-C ends
    in :meth:`Dspexctl.invoke`, which reads how to say it from ``ctx.meta``."""
    settings: Settings = ctx.obj
    as_json = ctx.meta[_JSON] = json_out or settings.json
    ctx.meta[_INTERRUPTED] = getattr(cmd, "interrupted", "")  # what goes on without us, when something does
    result = cmd.execute(settings, cmd.request(**options))
    show(cmd, result, as_json)
    ctx.exit(cmd.exit_code(result))


def _data(result: Any) -> Any:
    """What --json prints of a result: all but the presentation's own switch."""
    return {k: v for k, v in result.items() if k != "verbose"} if isinstance(result, dict) else result


def show(cmd: Any, result: Any, as_json: bool) -> None:
    if as_json:
        _emit_json(_data(result))
    else:
        text = cmd.present(result)
        if text:
            click.echo(text)


def watch(ctx: click.Context, cmd: Any, json_out: bool, every: float = 1.0, **options: Any) -> None:
    """``run`` every ``every`` seconds until Ctrl-C (exit 130), like ``watch``: on a terminal the
    screen is redrawn; otherwise (or with --json) each refresh follows the last. An error is shown
    in place and the next refresh tries again."""
    settings: Settings = ctx.obj
    as_json = json_out or settings.json
    redraw = sys.stdout.isatty() and not as_json
    req = cmd.request(**options)
    while True:
        started = time.monotonic()
        try:
            result: Any = cmd.execute(settings, req)
            error = None
        except DspexError as err:
            result, error = None, err
        if redraw:
            click.echo("\x1b[H\x1b[2J", nl=False)
        if as_json:
            _emit_json(_data(result) if error is None else error_doc(error))
        else:
            click.echo(f"Every {every:g}s: dspexctl pools status    {time.strftime('%H:%M:%S')}\n")
            if error is None:
                show(cmd, result, False)
            else:
                click.echo(f"Error: {error.message or error.code}")
            if not redraw:
                click.echo()
        time.sleep(max(0.0, every - (time.monotonic() - started)))


def error_doc(err: DspexError) -> dict[str, Any]:
    return {"error": {"code": err.code, "message": err.message, "exit": exit_code_for(err)}}


def fail(err: DspexError, as_json: bool) -> None:
    if as_json:
        _emit_json(error_doc(err))
    click.echo(f"Error: {err.message or err.code}", err=True)
    sys.exit(exit_code_for(err))


class Seconds(click.FloatRange):
    """A finite number of seconds above 0 (a socket timeout of 0, -1, inf or nan is no timeout)."""

    name = "number"

    def __init__(self) -> None:
        super().__init__(min=0, min_open=True, max=10 * 365 * 86400)

    def _describe_range(self) -> str:
        return ""  # "a number of seconds" says it; "0<x<=315360000" in --help is noise

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = click.FLOAT.convert(value, param, ctx)
        # nan passes every comparison; the range's own message would read "not in the range ."
        if math.isnan(rv) or not 0 < rv <= self.max:  # type: ignore[operator]
            self.fail(f"{value!r} is not a number of seconds above 0 (and at most ten years)", param, ctx)
        return rv


POSITIVE = Seconds()
json_option = click.option("--json", "json_out", is_flag=True, help="print one JSON document (data only)")


class Dspexctl(click.Group):
    """Ctrl-C anywhere in a command: its ``with`` blocks close what it opened as the interrupt
    unwinds, then one line and exit 130 (the shell's code for SIGINT), never click's "Aborted!" 1.
    A dspex error before a command runs (a malformed ``DSPEX_*`` number) is one line too. Under
    ``--json`` click's own usage errors (an unknown option, a missing argument, a bad value) also
    answer on stdout as ``{"error": {"code": "usage", ...}}``, as dspexctl's do: a script parses
    stdout whatever went wrong."""

    wants_json = False  # --json among the arguments, known before they are parsed

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        self.wants_json = "--json" in args
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as err:
            self._usage_json(err)
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            hint = ctx.meta.get(_INTERRUPTED)
            click.echo("\nError: interrupted" + (f": {hint}" if hint else ""), err=True)
            ctx.exit(130)
        except DspexError as err:
            fail(err, bool(ctx.meta.get(_JSON, ctx.params.get("json_out"))))
        except click.ClickException as err:
            self._usage_json(err)
            raise

    def _usage_json(self, err: click.ClickException) -> None:
        """click prints its own message on stderr and exits with ``err.exit_code`` after this."""
        if self.wants_json:
            code = "usage" if isinstance(err, click.UsageError) else "error"
            _emit_json({"error": {"code": code, "message": err.format_message(), "exit": err.exit_code}})


@click.group(cls=Dspexctl, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dspex", prog_name="dspexctl", message="%(prog)s %(version)s")
@click.option("--endpoint", envvar="DSPEX_ENDPOINT", default=None, metavar="EP",
              help="broker client endpoint [env DSPEX_ENDPOINT; default ipc://$DSPEX_RUN_DIR/frontend.sock]")
@click.option("--endpoints", envvar="DSPEX_ENDPOINTS", default=None, metavar="MAP",
              help="a map of brokers, POOL=EP,...,*=EP: pools status, sessions and workers recycle ask each "
                   "[env DSPEX_ENDPOINTS]")
@click.option("--supervisor-conf", envvar="DSPEX_SUPERVISOR_CONF", default=None, metavar="PATH",
              type=click.Path(dir_okay=False, path_type=Path),
              help="supervisor.conf of the stack [env DSPEX_SUPERVISOR_CONF; default ./supervisor.conf]")
@click.option("--timeout", type=POSITIVE, default=5.0, show_default=True, metavar="SECONDS",
              help="per request to the broker or supervisord")
@click.option("--json", "json_out", is_flag=True, help="JSON output for every command that prints data")
@click.pass_context
def main(ctx: click.Context, endpoint: str | None, endpoints: str | None, supervisor_conf: Path | None,
         timeout: float, json_out: bool) -> None:
    """Operate a dspex stack: pools, workers, sessions."""
    settings = Settings(endpoint=endpoint, supervisor_conf=supervisor_conf or DEFAULT_CONF, timeout=timeout,
                        json=json_out, conf_explicit=supervisor_conf is not None)
    if endpoints and endpoint:  # the command line wins over the environment; both from one of them is a mistake
        sources = (ctx.get_parameter_source("endpoint"), ctx.get_parameter_source("endpoints"))
        if sources == (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            endpoints = None
        elif sources != (ParameterSource.ENVIRONMENT, ParameterSource.COMMANDLINE):
            raise click.UsageError("give --endpoint (DSPEX_ENDPOINT) or --endpoints (DSPEX_ENDPOINTS), not both")
    settings.endpoints = endpoints or None
    ctx.obj = settings


@main.group()
def pools() -> None:
    """Pool status; start and stop pools through supervisord."""


@pools.command("status")
@click.argument("pool", nargs=-1)
@click.option("-v", "--verbose", is_flag=True, help="one row per worker too")
@click.option("-w", "--watch", "watch_", is_flag=True, help="refresh every second until Ctrl-C (like watch/top)")
@json_option
@click.pass_context
def pools_status(ctx: click.Context, pool: tuple[str, ...], verbose: bool, watch_: bool, json_out: bool) -> None:
    """One row per pool (-v: per worker).

    Exit 0 ok, 3 degraded, 4 unreachable, 5 a pool down, 6 warn, 7 starting; with --watch, 130 at
    Ctrl-C. WARN: a queue over 80% full, or a failure of the service itself (a crash, a queue
    timeout, a refusal...) in the pool's health window; user exceptions never.
    """
    if watch_:
        watch(ctx, PoolsStatus(), json_out, pools=pool, verbose=verbose)
    run(ctx, PoolsStatus(), json_out, pools=pool, verbose=verbose)


def pools_command(name: str, wait: float, wait_help: str) -> Callable[[Callable[..., None]], click.Command]:
    """``pools start|stop|restart``: the pools named (all by default), ``--wait`` and ``--json``."""
    def decorate(fn: Callable[..., None]) -> click.Command:
        fn = json_option(click.pass_context(fn))
        fn = click.option("--wait", type=POSITIVE, default=wait, show_default=True, metavar="SECONDS", help=wait_help)(fn)
        return pools.command(name)(click.argument("pool", nargs=-1)(fn))
    return decorate


@pools_command("start", 120.0, "how long to wait for the workers to be ready")
def pools_start(ctx: click.Context, pool: tuple[str, ...], wait: float, json_out: bool) -> None:
    """Start pools (all by default); start supervisord first when it is not running.

    Waits until their workers are ready (their dspy import over). Exit 3 (DEGRADED, as pools
    status) when a worker it started reports a problem, such as a failed dspy import.
    """
    run(ctx, lifecycle.PoolsStart(), json_out, pools=pool, wait=wait)


@pools_command("stop", 60.0, "how long to wait for the workers to stop")
def pools_stop(ctx: click.Context, pool: tuple[str, ...], wait: float, json_out: bool) -> None:
    """Stop pools' workers (all pools by default); the broker keeps running."""
    run(ctx, lifecycle.PoolsStop(), json_out, pools=pool, wait=wait)


@pools_command("restart", 120.0, "how long to wait for the stop, then for the workers to be ready")
def pools_restart(ctx: click.Context, pool: tuple[str, ...], wait: float, json_out: bool) -> None:
    """Stop pools' workers (all pools by default), start them again, wait until they are ready.

    Every worker is replaced at once: sessions pinned to them get session_worker_unavailable. For a
    rolling replacement that keeps the pool serving, use `workers recycle POOL --all`.
    """
    run(ctx, lifecycle.PoolsRestart(), json_out, pools=pool, wait=wait)


@main.command("stop")
@click.option("--wait", type=POSITIVE, default=60.0, show_default=True, metavar="SECONDS",
              help="how long to wait for supervisord to exit")
@json_option
@click.pass_context
def stop(ctx: click.Context, wait: float, json_out: bool) -> None:
    """Stop the stack of this supervisor.conf: workers first, then the broker, then supervisord."""
    run(ctx, lifecycle.StackStop(), json_out, wait=wait)


@main.group()
def workers() -> None:
    """Worker incarnations."""


@workers.command("recycle")
@click.argument("pool")
@click.option("--worker", "worker", default=None, metavar="ID", help="incarnation id (prefix) or pid")
@click.option("--all", "all_", is_flag=True, help="every worker of the pool, one at a time")
@click.option("--hard", is_flag=True, help="SIGKILL through supervisord instead (a recycle the broker is told of; its running calls fail)")
@click.option("--wait", type=POSITIVE, default=120.0, show_default=True, metavar="SECONDS",
              help="how long to wait for the replacements to be ready")
@json_option
@click.pass_context
def workers_recycle(ctx: click.Context, pool: str, worker: str | None, all_: bool, hard: bool, wait: float,
                    json_out: bool) -> None:
    """Replace workers by new incarnations (the oldest one by default).

    Graceful: the worker finishes its request, says goodbye and exits 0; supervisord starts a new
    incarnation. Sessions pinned to it get session_worker_unavailable on their next call.
    """
    run(ctx, commands.WorkersRecycle(), json_out, pool=pool, worker=worker, all=all_, hard=hard, wait=wait)


@main.group()
def sessions() -> None:
    """Sessions the broker holds."""


@sessions.command("list")
@click.option("--pool", default=None, metavar="POOL", help="only this pool's sessions")
@json_option
@click.pass_context
def sessions_list(ctx: click.Context, pool: str | None, json_out: bool) -> None:
    """Sessions, their pinned worker, calls and idle time."""
    run(ctx, SessionsList(), json_out, pool=pool)


@sessions.command("close")
@click.argument("session", required=False)
@click.option("--pool", default=None, metavar="POOL", help="every session of this pool")
@click.option("--idle", type=POSITIVE, default=None, metavar="SECONDS", help="sessions idle at least this long")
@click.option("--all", "all_", is_flag=True, help="every session")
@json_option
@click.pass_context
def sessions_close(ctx: click.Context, session: str | None, pool: str | None, idle: float | None, all_: bool,
                   json_out: bool) -> None:
    """Close a session (an id or a unique prefix), or every session matching --pool/--idle/--all
    (--pool and --idle combine), and release their refs on their workers."""
    run(ctx, SessionsClose(), json_out, session=session, pool=pool, idle=idle, all=all_)


main.add_command(flagship)
main.add_command(keys)
main.add_command(hosts)


if __name__ == "__main__":
    main()
