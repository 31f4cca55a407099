"""``dspexctl flagship``: run the flagship flow (examples/flagship_multi_pool_gepa.py).

Starts the stack under supervisord when none answers and stops it again at the end, on every
error and on Ctrl-C, SIGTERM or SIGHUP (``--keep-running`` leaves it up unless interrupted);
against a running stack it just runs. An interruption first cancels the flow's calls in flight on
their workers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import click

import dspex
from dspex.client.config import ClientConfig
from dspex.stack.supervisor import Supervisor, SupervisorConf, supervisord_pid
from dspex.wire.errors import ConfigError, DspexError
from dspexctl import stack
from dspexctl.commands import Settings, exit_code_for

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_PATH = EXAMPLES / "flagship_multi_pool_gepa.py"
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SUPERVISORD_APPEARS_S = 3.0  # after an interrupted start: how long a daemonizing supervisord may take to show up
SHUTDOWN_TIMEOUT_S = 30.0


def load_example() -> ModuleType:
    """examples/flagship_multi_pool_gepa.py of this checkout, run by path as ``python
    examples/flagship_multi_pool_gepa.py`` runs it: its folder first on ``sys.path``, since it
    imports its sibling modules by name (examples/ is a folder of scripts, not an installed package)."""
    name = "flagship_multi_pool_gepa"
    if name in sys.modules:
        return sys.modules[name]
    if not EXAMPLE_PATH.is_file():
        raise ConfigError(f"the flagship example is not here: {EXAMPLE_PATH} does not exist (dspexctl flagship "
                          "runs examples/ of a source checkout: install dspex from one with `pip install -e .`)")
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLE_PATH)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {EXAMPLE_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP, raised in the main thread. A ``KeyboardInterrupt``, so that what
    handles Ctrl-C (the client cancelling its request in flight, the flow cancelling its calls)
    handles the three alike."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _ignore_interrupts() -> None:
    for sig in INTERRUPTS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """While the command runs, Ctrl-C, SIGTERM and SIGHUP raise :class:`Interrupted` once (their
    defaults would end the process at once, leaving the stack it started and the calls in flight
    running); further ones are ignored while that is undone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        _ignore_interrupts()
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in INTERRUPTS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _reachable(endpoint: str | None, timeout: float = 2.0) -> bool:
    try:
        with dspex.connect(endpoint, timeout=timeout) as c:
            c.ping(timeout=timeout)
        return True
    except DspexError:
        return False


def _start_stack(conf: Path, timeout: float, progress: Callable[[str], None]) -> stack.StackHandle:
    """``ensure_stack``; when it fails or is interrupted after starting supervisord, that supervisord
    is stopped again (this command leaves nothing behind that it started)."""
    sc = SupervisorConf.load(conf)
    with Supervisor(sc, timeout=5.0) as sup:
        was_running = sup.running()
    try:
        return stack.ensure_stack(sc.path, timeout=timeout, progress=progress)
    except BaseException as err:
        if not was_running:
            _ignore_interrupts()
            t0 = time.monotonic()
            progress("the start " + ("was interrupted" if isinstance(err, KeyboardInterrupt) else "failed")
                     + ": stopping the supervisord this command started")
            _stop_supervisord(sc, progress)
            progress(f"stopped in {time.monotonic() - t0:.1f}s")
        raise


def _stop_supervisord(sc: SupervisorConf, progress: Callable[[str], None]) -> None:
    """Stop the supervisord of ``sc`` that this command started, also one still daemonizing (it
    answers nobody yet; SIGTERM makes it stop its programs and exit)."""
    deadline = time.monotonic() + SUPERVISORD_APPEARS_S
    while True:
        with Supervisor(sc, timeout=2.0) as sup:
            if sup.running():
                stack.stop_stack(sc.path, wait=SHUTDOWN_TIMEOUT_S, progress=progress)
                return
        pid = supervisord_pid(sc)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            stack.wait_pid_exit(pid, SHUTDOWN_TIMEOUT_S)
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:400]


def _stack_progress(say: Callable[[str], None]) -> Callable[[str], None]:
    """Stack start and stop progress, indented under the flagship's own lines, without the
    alarming part: while supervisord starts the broker, "nothing is listening" is expected, so
    "waiting for the broker" is said once, plainly."""
    said: set[str] = set()

    def progress(msg: str) -> None:
        if msg.startswith("waiting for the broker"):
            msg = "waiting for the broker to start"
        if msg not in said:
            said.add(msg)
            say(f"  {msg}")
    return progress


def _exit_code(err: BaseException, example: ModuleType | None) -> int:
    """The flagship's exit codes: its own, defined by the ``example`` it runs (9 completed with
    failures, 10 LM too slow, 11 LM unusable), 128 + the signal when interrupted, else dspexctl's
    (2 usage/config, 4 unreachable, 1 failed)."""
    if isinstance(err, Interrupted):
        return err.exit_code
    lm_unusable = getattr(err, "code", None) == "lm_unusable"
    if example is not None and (lm_unusable or isinstance(err, dspex.Timeout) and err.details.get("lm_too_slow")):
        return int(example.exit_code_for(err))
    if not isinstance(err, DspexError):
        return 1
    return exit_code_for(err)


def _conf(settings: Settings) -> Path:
    """The group's supervisor.conf; when none was asked for and ./supervisor.conf is absent, the
    one of this source checkout (so `dspexctl flagship` works from any directory)."""
    if settings.conf_explicit or settings.supervisor_conf.exists():
        return settings.supervisor_conf
    repo_conf = Path(__file__).resolve().parents[1] / "supervisor.conf"
    return repo_conf if repo_conf.exists() else settings.supervisor_conf


def _echo(line: str, err: bool) -> None:
    """click.echo that survives a terminal gone with SIGHUP."""
    try:
        click.echo(line, err=err)
    except OSError:
        pass


class _AtLeast(click.ParamType):  # type: ignore[type-arg]  # generic in recent click only; setup.cfg allows 8.1
    """A finite number (``kind``: int or float) of at least ``min``, a bound ``--help`` does not
    spell out (the help text says it): click's ranges would say "not in the range x>=3"."""

    def __init__(self, kind: click.ParamType[Any], min: float) -> None:
        self.kind, self.min, self.name = kind, min, f"{kind.name} range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = self.kind.convert(value, param, ctx)
        if not math.isfinite(rv):  # nan passes every comparison
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        if rv < self.min:
            self.fail(f"{rv if self.kind is click.INT else format(rv, 'g')} is less than the minimum {self.min:g}",
                      param, ctx)
        return rv


@click.command("flagship")
@click.option("--model", envvar="DSPEX_MODEL", default=None,
              help="dspy/litellm model string, e.g. gemini/gemini-flash-lite-latest "
                   "(default: DSPEX_MODEL, else the offline stand-in LM)")
@click.option("--api-base", default=None, help="base URL of a local OpenAI-compatible server (dummy key if none set)")
@click.option("--lm-engine", type=click.Choice(["auto", "lm15", "litellm"]), envvar="DSPEX_LM_ENGINE", default=None,
              help="dspy.LM engine for a real model (default: dspy's auto)")
@click.option("--max-metric-calls", type=_AtLeast(click.INT, 3), default=None,
              help="GEPA budget in metric calls, at least 3 (default 30; the original flagship's 3 only scores the baseline)")
@click.option("--max-tokens", type=_AtLeast(click.INT, 1), default=None,
              help="token cap of triage/insights LM calls (DSPEX_MAX_TOKENS; default 512)")
@click.option("--reflection-max-tokens", type=_AtLeast(click.INT, 1), default=None,
              help="token cap of GEPA's reflection calls (DSPEX_REFLECTION_MAX_TOKENS; default 2048)")
@click.option("--lm-timeout", type=_AtLeast(click.FLOAT, 0.1), default=None,
              help="seconds per LM HTTP call, at least 0.1 (DSPEX_LM_TIMEOUT; default 60); dspex's call timeout follows it")
@click.option("--num-retries", type=_AtLeast(click.INT, 0), default=None,
              help="retries with backoff of rate-limited/5xx/dropped LM calls (DSPEX_LM_NUM_RETRIES; default 2)")
@click.option("--lm-kwarg", "lm_kwargs", multiple=True, metavar="K=V",
              help="extra dspy.LM keyword, value read as JSON when it is JSON (repeatable; DSPEX_LM_KWARGS)")
@click.option("--no-cache", is_flag=True, help="do not use dspy's response cache for the flow's LM calls")
@click.option("--no-preflight", is_flag=True, help="skip the LM endpoint check made before the stack starts")
@click.option("--no-recycle", is_flag=True, help="skip the planned worker recycles (no rehydration)")
@click.option("--keep-running", is_flag=True, help="leave a stack this command started running (unless interrupted)")
@click.option("--json", "as_json", is_flag=True, help="print the results as one JSON document on stdout")
@click.pass_context
def flagship(ctx: click.Context, model: str | None, api_base: str | None, lm_engine: str | None,
             max_metric_calls: int | None, max_tokens: int | None, reflection_max_tokens: int | None,
             lm_timeout: float | None, num_retries: int | None, lm_kwargs: tuple[str, ...], no_cache: bool,
             no_preflight: bool, no_recycle: bool, keep_running: bool, as_json: bool) -> None:
    """Run the multi-pool GEPA flagship flow (offline unless --model is given).

    Starts the stack under supervisord when no broker answers and stops it at the end, on an error
    and on Ctrl-C, SIGTERM or SIGHUP (--keep-running leaves it up unless interrupted); against a
    running stack it just runs. An interruption cancels the calls in flight on their workers. With
    --json, progress goes to stderr and stdout holds one JSON document. A real model is checked
    first (preflight) and gets bounded calls; a call whose answer fails is scored 0 and the flow
    goes on.

    Exit codes: 0 completed, every LM call answered; 9 completed with failures (some LM calls
    failed, scored 0); 1 could not run; 2 bad option or missing key; 4 the dspex stack is
    unreachable; 10 the LM is slower than the bounds allow; 11 the LM endpoint is unusable
    (preflight); 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP.
    """
    settings: Settings = ctx.obj
    as_json = as_json or settings.json

    def say(line: str) -> None:
        _echo(line, err=as_json)

    endpoint = settings.endpoint
    # the group's --timeout (default 5 s) is meant for admin requests; LM calls need longer
    timeout = max(settings.timeout, 60.0)
    handle: stack.StackHandle | None = None
    results: dict[str, Any] | None = None
    error: BaseException | None = None
    example: ModuleType | None = None
    with _interruptible():
        try:
            example = load_example()
            bounds = example.resolve_bounds(max_tokens=max_tokens, reflection_max_tokens=reflection_max_tokens,
                                            lm_timeout=lm_timeout, num_retries=num_retries, lm_kwargs=lm_kwargs,
                                            no_cache=no_cache)
            # a missing key fails before anything starts, and so does an LM endpoint that cannot work
            spec = example.resolve_lm(model, api_base, engine=lm_engine, bounds=bounds)
            checked = example.preflight(spec, say) if not spec.offline and not no_preflight else None
            stack.check_run_dir(_conf(settings), endpoint)  # another stack's broker on this run dir: say so
            if _reachable(endpoint):
                say(f"using the running stack at {ClientConfig.from_env().endpoint_or_default(endpoint)}")
            else:
                t0 = time.monotonic()
                say("no stack answers: starting one under supervisord")
                handle = _start_stack(_conf(settings), timeout=max(timeout, 120.0), progress=_stack_progress(say))
                endpoint = handle.endpoint
                say(f"stack ready at {endpoint} in {time.monotonic() - t0:.1f}s")
            # its own view of the flow (stdout: one JSON document with --json): the programs' prints
            # and logs stay in the worker log
            with dspex.connect(endpoint, timeout=timeout, forward_output=False) as client:
                results = example.run_flagship(
                    client, model=model, api_base=api_base, recycle=not no_recycle, out=say, engine=lm_engine,
                    bounds=bounds, max_metric_calls=max_metric_calls or example.DEFAULT_MAX_METRIC_CALLS)
                results["preflight"] = checked
                results["stack"] = {"endpoint": client.endpoint, "started": bool(handle and handle.started),
                                    "kept_running": bool(handle and handle.started and keep_running)}
        except Interrupted as err:
            error = err
        except KeyboardInterrupt:  # raised by other means than our handler (a test's runner, a debugger)
            error = Interrupted(signal.SIGINT)
        except DspexError as err:
            error = err
        except Exception as err:
            if getattr(err, "code", None) != "lm_unusable":
                raise
            error = err
        finally:
            if handle is not None and handle.started:
                _ignore_interrupts()  # the shutdown runs to its end
                if keep_running and not isinstance(error, Interrupted):
                    say(f"--keep-running: the stack stays up at {handle.endpoint}")
                else:
                    t0 = time.monotonic()
                    say("stopping the stack this command started")
                    try:
                        stack.stop_stack(handle.conf, wait=SHUTDOWN_TIMEOUT_S, progress=_stack_progress(say))
                        say(f"  stopped in {time.monotonic() - t0:.1f}s")
                    except Exception as exc:  # noqa: BLE001 - report, do not mask the run's outcome
                        _echo(f"warning: stopping the stack failed: {_one_line(str(exc))}", err=True)
    if error is not None:
        code = _exit_code(error, example)
        if isinstance(error, Interrupted):
            err_code, message = "interrupted", f"interrupted by {signal.Signals(error.signum).name}"
        else:
            err_code, message = str(getattr(error, "code", "error")), str(getattr(error, "message", "") or error)
        _echo(f"Error: {err_code}: {_one_line(message)}", err=True)
        if as_json:
            _echo(json.dumps({"error": {"code": err_code, "message": message, "exit": code}}), err=False)
        ctx.exit(code)
    assert results is not None and example is not None
    if as_json:
        _echo(json.dumps(results, default=str), err=False)
    if results["summary"]["failed_calls"]:
        ctx.exit(example.EXIT_COMPLETED_WITH_FAILURES)
