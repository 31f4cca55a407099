"""``dspexctl flagship``: run the flagship flow (examples/flagship_multi_pool_gepa.py).

Starts the stack under supervisord when none answers (and stops it at the end unless
``--keep-running``); against a running stack it just runs. Register it with
``main.add_command(flagship)`` in dspexctl/cli.py.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import click

import dspex
from dspex import config
from dspex.errors import ConfigError, DspexError

EXAMPLE_NAME = "flagship_multi_pool_gepa"
EXAMPLE_PATH = Path(__file__).resolve().parents[1] / "examples" / f"{EXAMPLE_NAME}.py"


def load_example() -> ModuleType:
    """The flagship module, loaded by path from the repository (examples/ is not installed)."""
    name = f"dspex_examples_{EXAMPLE_NAME}"
    if name in sys.modules:
        return sys.modules[name]
    if EXAMPLE_PATH.is_file():
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
    try:  # an install that ships examples/ as a package
        return importlib.import_module(f"examples.{EXAMPLE_NAME}")
    except ImportError:
        raise ConfigError(f"the flagship example is not installed: {EXAMPLE_PATH} does not exist "
                          "(run dspexctl from a source checkout, or install with examples/)") from None


def _setting(ctx: click.Context, name: str, default: Any = None) -> Any:
    obj = ctx.find_root().obj if ctx.find_root().obj is not None else ctx.obj
    if isinstance(obj, dict):
        value = obj.get(name, default)
    else:
        value = getattr(obj, name, default)
    return default if value is None else value


def _stack_api() -> Any:
    """dspexctl.stack (ensure_stack / shutdown_stack), or None until it lands."""
    try:
        from dspexctl import stack
    except ImportError:
        return None
    return stack


def _ensure_stack(conf: Path | None, timeout: float, progress: Callable[[str], None]) -> Any:
    stack = _stack_api()
    if stack is None:
        raise dspex.ConnectionError("no dspex stack is running and this dspexctl cannot start one "
                                    "(dspexctl.stack is missing): start it with `supervisord -c supervisor.conf`")
    return stack.ensure_stack(conf, timeout=timeout, progress=progress)


def _shutdown_stack(handle: Any) -> None:
    stack = _stack_api()
    if stack is not None:
        stack.shutdown_stack(handle)


def _reachable(endpoint: str | None, timeout: float = 2.0) -> bool:
    try:
        with dspex.connect(endpoint, timeout=timeout) as c:
            c.ping(timeout=timeout)
        return True
    except DspexError:
        return False


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:400]


def _start_progress(say: Callable[[str], None]) -> Callable[[str], None]:
    """Stack start-up progress without the alarming part: while supervisord starts the broker,
    "nothing is listening" is expected, so "waiting for the broker" is said once, plainly."""
    said: set[str] = set()

    def progress(msg: str) -> None:
        if msg.startswith("waiting for the broker"):
            msg = "waiting for the broker to start"
        if msg not in said:
            said.add(msg)
            say(f"  {msg}")
    return progress


def _exit_code(err: Exception) -> int:
    """The flagship's exit codes: its own (3 completed with failures, 5 LM too slow, 6 LM unusable),
    else dspexctl's (2 usage/config, 4 unreachable, 1 failed) when commands.py has them."""
    if getattr(err, "code", None) == "lm_unusable":
        return 6
    if isinstance(err, dspex.Timeout) and err.details.get("lm_too_slow"):
        return 5
    if not isinstance(err, DspexError):
        return 1
    try:
        from dspexctl.commands import exit_code_for
    except ImportError:
        return 2 if isinstance(err, ConfigError) else 1
    code = int(exit_code_for(err))
    return 2 if isinstance(err, ConfigError) and code == 1 else code


def _conf(ctx: click.Context) -> Path | None:
    """The group's supervisor.conf; when none was asked for and ./supervisor.conf is absent, the
    one of this source checkout (so `dspexctl flagship` works from any directory)."""
    conf = _setting(ctx, "supervisor_conf")
    explicit = bool(_setting(ctx, "conf_explicit", False))
    if conf is not None and (explicit or Path(conf).exists()):
        return Path(conf)
    repo_conf = Path(__file__).resolve().parents[1] / "supervisor.conf"
    return repo_conf if repo_conf.exists() else (Path(conf) if conf is not None else None)


@click.command("flagship")
@click.option("--model", envvar="DSPEX_MODEL", default=None,
              help="dspy/litellm model string, e.g. gemini/gemini-flash-lite-latest "
                   "(default: DSPEX_MODEL, else the offline stand-in LM)")
@click.option("--api-base", default=None, help="base URL of a local OpenAI-compatible server (dummy key if none set)")
@click.option("--lm-engine", type=click.Choice(["auto", "lm15", "litellm"]), envvar="DSPEX_LM_ENGINE", default=None,
              help="dspy.LM engine for a real model (default: dspy's auto)")
@click.option("--max-metric-calls", type=click.IntRange(min=3), default=3, show_default=True,
              help="GEPA budget (metric calls); the first 3 score the baseline")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="max_tokens of triage/insights LM calls (DSPEX_MAX_TOKENS; default 512)")
@click.option("--reflection-max-tokens", type=click.IntRange(min=1), default=None,
              help="max_tokens of GEPA's reflection calls (DSPEX_REFLECTION_MAX_TOKENS; default 2048)")
@click.option("--lm-timeout", type=click.FloatRange(min=0.1), default=None,
              help="seconds per LM HTTP call (DSPEX_LM_TIMEOUT; default 60); dspex's call timeout follows it")
@click.option("--num-retries", type=click.IntRange(min=0), default=None,
              help="retries with backoff of rate-limited/5xx/dropped LM calls (DSPEX_LM_NUM_RETRIES; default 2)")
@click.option("--lm-kwarg", "lm_kwargs", multiple=True, metavar="K=V",
              help="extra dspy.LM keyword, value read as JSON when it is JSON (repeatable; DSPEX_LM_KWARGS)")
@click.option("--no-cache", is_flag=True, help="do not use dspy's response cache for the flow's LM calls")
@click.option("--no-preflight", is_flag=True, help="skip the LM endpoint check made before the stack starts")
@click.option("--no-recycle", is_flag=True, help="skip the forced worker recycles (no rehydration)")
@click.option("--keep-running", is_flag=True, help="leave a stack this command started running")
@click.option("--json", "as_json", is_flag=True, help="print the results as one JSON document on stdout")
@click.pass_context
def flagship(ctx: click.Context, model: str | None, api_base: str | None, lm_engine: str | None,
             max_metric_calls: int, max_tokens: int | None, reflection_max_tokens: int | None,
             lm_timeout: float | None, num_retries: int | None, lm_kwargs: tuple[str, ...], no_cache: bool,
             no_preflight: bool, no_recycle: bool, keep_running: bool, as_json: bool) -> None:
    """Run the multi-pool GEPA flagship flow (offline unless --model is given).

    Starts the stack under supervisord when no broker answers and stops it at the end
    (--keep-running leaves it up); against a running stack it just runs. With --json, progress
    goes to stderr and stdout holds one JSON document. A real model is checked first (preflight)
    and gets bounded calls; a call whose answer fails is scored 0 and the flow goes on.

    Exit codes: 0 completed; 3 completed with failures (some LM calls failed, scored 0);
    1 could not run; 2 bad option or missing key; 4 the dspex stack is unreachable;
    5 the LM is slower than the bounds allow; 6 the LM endpoint is unusable (preflight).
    """
    as_json = as_json or bool(_setting(ctx, "json", False))

    def say(line: str) -> None:
        click.echo(line, err=as_json)

    def fail(err: Exception) -> None:
        code = _exit_code(err)
        message = str(getattr(err, "message", "") or err)
        click.echo(f"Error: {getattr(err, 'code', 'error')}: {_one_line(message)}", err=True)
        if as_json:
            click.echo(json.dumps({"error": {"code": getattr(err, "code", "error"), "message": message,
                                             "exit": code}}))
        ctx.exit(code)

    checked: dict[str, Any] | None = None
    try:
        example = load_example()
        bounds = example.resolve_bounds(max_tokens=max_tokens, reflection_max_tokens=reflection_max_tokens,
                                        lm_timeout=lm_timeout, num_retries=num_retries, lm_kwargs=lm_kwargs,
                                        no_cache=no_cache)
        # a missing key fails before anything starts, and so does an LM endpoint that cannot work
        spec = example.resolve_lm(model, api_base, engine=lm_engine, bounds=bounds)
        if not spec.offline and not no_preflight:
            from examples.flagship_preflight import preflight

            checked = preflight(spec, say)
    except ConfigError as err:
        fail(err)
        return
    except Exception as err:  # noqa: BLE001 - only the preflight's LMUnusable is expected here
        if getattr(err, "code", None) != "lm_unusable":
            raise
        fail(err)
        return

    endpoint: str | None = _setting(ctx, "endpoint")
    conf = _conf(ctx)
    # the group's --timeout (default 5 s) is meant for admin requests; LM calls need longer
    timeout = max(float(_setting(ctx, "timeout", 60.0)), 60.0)
    handle = None
    results: dict[str, Any] | None = None
    try:
        if _reachable(endpoint):
            say(f"using the running stack at {endpoint or config.client_endpoint()}")
        else:
            t0 = time.monotonic()
            say("no stack answers: starting one under supervisord")
            handle = _ensure_stack(conf, timeout=max(timeout, 120.0), progress=_start_progress(say))
            endpoint = handle.endpoint
            say(f"stack ready at {endpoint} in {time.monotonic() - t0:.1f}s")
        # its own view of the flow (stdout: one JSON document with --json): the programs' prints
        # and logs stay in the worker log
        with dspex.connect(endpoint, timeout=timeout, forward_output=False) as client:
            results = example.run_flagship(client, model=model, api_base=api_base, max_metric_calls=max_metric_calls,
                                           recycle=not no_recycle, out=say, engine=lm_engine, bounds=bounds)
            results["preflight"] = checked
            results["stack"] = {"endpoint": client.endpoint, "started": bool(handle and handle.started),
                                "kept_running": bool(handle and handle.started and keep_running)}
    except DspexError as err:
        fail(err)
    finally:
        if handle is not None and handle.started:
            if keep_running:
                say(f"--keep-running: the stack stays up at {handle.endpoint}")
            else:
                say("stopping the stack this command started")
                try:
                    _shutdown_stack(handle)
                except Exception as exc:  # noqa: BLE001 - report, do not mask the run's outcome
                    click.echo(f"warning: stopping the stack failed: {_one_line(str(exc))}", err=True)
    if as_json and results is not None:
        click.echo(json.dumps(results, default=str))
    if results is not None and results["summary"]["failed_calls"]:
        ctx.exit(example.EXIT_COMPLETED_WITH_FAILURES)


if __name__ == "__main__":  # python -m dspexctl.flagship (until it is registered in the CLI group)
    flagship()
