"""The flagship as the tests drive it: ``dspexctl flagship`` as a subprocess (its stderr read as it
comes, its ``--json`` document parsed), and the script imported as a module for its pure parts."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.harness import PY, REPO, base_env

EXAMPLE = REPO / "examples" / "flagship_multi_pool_gepa.py"


def load_flagship(module_name: str) -> ModuleType:
    """Execute examples/flagship_multi_pool_gepa.py as ``module_name`` (registered in sys.modules, so
    its functions pickle and its dataclasses resolve as in a script run; its sibling modules come
    from examples/ on sys.path, which setup.cfg's pytest ``pythonpath`` provides)."""
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def cli_env(run_dir: str | None = None, **extra: str) -> dict[str, str]:
    """The flagship command's environment: no DSPEX_* or provider key of the caller, no proxy."""
    env = base_env(run_dir, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
                "OPENAI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY", "ANTHROPIC_API_KEY"):
        if var not in extra:
            env.pop(var, None)
    return env


class FlagshipRun:
    """``python -m dspexctl [GROUP_ARGS] flagship --json ARGS`` in a session of its own (so a signal
    to its group is what a terminal sends, and nothing it spawns outlives :meth:`close`)."""

    def __init__(self, args: Sequence[str], *, group_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, command: Sequence[str] | None = None) -> None:
        self.cmd = list(command) if command is not None else [PY, "-m", "dspexctl", *group_args, "flagship", "--json",
                                                              *args]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env=env or cli_env(), cwd=cwd or REPO, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.lines: list[str] = []
        self._stdout: list[bytes] = []
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for t in self._readers:
            t.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        self._stdout.append(self.proc.stdout.read())

    @property
    def err(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_line(self, needle: str, timeout: float = 120.0) -> str:
        """The first stderr line containing ``needle``, waiting for it (AssertionError if it never comes)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((ln for ln in self.lines if needle in ln), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._readers[0].is_alive():
                    raise AssertionError(f"no line with {needle!r} (exit {self.proc.poll()}):\n" + "\n".join(self.lines))
                self._changed.wait(min(left, 0.2))

    def signal(self, sig: int, group: bool = False) -> float:
        """Send ``sig`` to the process (or its whole group, as a terminal's Ctrl-C does); when."""
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            os.kill(self.proc.pid, sig)
        return time.monotonic()

    def wait(self, timeout: float = 240.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"the flagship ran over {timeout:g}s:\n{self.err}") from None
        for t in self._readers:
            t.join(10)
        self.seconds = time.monotonic() - self.started
        return code

    @property
    def json(self) -> dict[str, Any]:
        """The one JSON document on stdout (results, or ``{"error": ...}``)."""
        data = b"".join(self._stdout)
        doc: dict[str, Any] = json.loads(data)
        return doc

    def close(self) -> None:
        """Kill it if it still runs; close its pipes."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        for t in self._readers:
            t.join(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def run_flagship(args: Sequence[str], *, timeout: float = 240.0, **kwargs: Any) -> tuple[int, FlagshipRun]:
    """Run the command to its end: (exit code, the run); its stderr is printed for the test's report."""
    run = FlagshipRun(args, **kwargs)
    try:
        code = run.wait(timeout)
    finally:
        run.close()
        print(run.err)
    return code, run
