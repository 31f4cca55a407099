"""Fixtures that run real brokers and workers as subprocesses in short temp directories.

The processes come from the one harness, :mod:`tests.harness`: every process in its own process
group, killed by pid at teardown. Tests import what they need from ``tests.harness``.
"""

from __future__ import annotations

import importlib
import secrets
import shutil
import signal
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Stack, short_tmpdir

# A runner a non-interactive shell started in the background (``pytest &`` in a CI script) has
# SIGINT ignored, and Python then raises no KeyboardInterrupt, in this process or in the clients it
# starts (they inherit the ignore): the Ctrl-C tests need Ctrl-C to arrive as it does at a terminal
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def short_tmp() -> Iterator[str]:
    path = short_tmpdir("dx")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def usercode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., types.ModuleType]]:
    """``usercode(source)``: a user module of this process (the workers cannot import it)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(source: str, name: str | None = None) -> types.ModuleType:
        name = name or f"usr_{secrets.token_hex(4)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        made.append(name)
        return importlib.import_module(name)

    yield make
    for name in made:
        sys.modules.pop(name, None)


@pytest.fixture
def stack(short_tmp: str, request: pytest.FixtureRequest) -> Iterator[Stack]:
    s = Stack(short_tmp)
    try:
        yield s
    finally:
        s.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(s.logs())


# fixtures that start brokers, workers, supervisord, a browser or an LM server (module.name): a
# test that uses one (directly or through another fixture) is ``slow``, so `pytest -m "not slow"`
# is the fast subset: pure logic and quick one-process checks
PROCESS_FIXTURES = {
    "tests.conftest.stack", "tests.test_session_code.code_stack", "tests.test_session_threads.tstack",
    "tests.test_brokers.brokers", "tests.conformance.conftest.cstack", "tests.chaos.conftest.chaos_root",
    "tests.test_cli.started", "tests.test_dashboard.small", "tests.test_dashboard.browser",
    "tests.test_flagship.fstack", "tests.test_flagship.chat_server", "tests.test_flagship_failures.fstack",
    "tests.test_flagship_failures.server", "tests.test_flagship_real_model.stack", "tests.test_fuzz.inproc_broker",
    "tests.test_fuzz.fuzz_stack", "tests.test_lmserver.server", "tests.test_ops_cli.small",
    "tests.test_ops_health.stack", "tests.test_ops_stack.stacks", "tests.test_ops_status.small",
    "tests.test_security.netns", "tests.test_supervisor.sup", "tests.conformance.test_http_lm.api_base",
    "tests.test_settings_travel.dx", "tests.test_session_cells.cell_stack",
}  # and the conformance tests' "session" side (the ``run``/``arun`` fixtures' other parameter is in-process)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.items() if info is not None else ()
        params = getattr(getattr(item, "callspec", None), "params", {})
        through_a_session = "session" in (params.get("run"), params.get("arun"))
        if through_a_session or any(f"{d.func.__module__}.{name}" in PROCESS_FIXTURES for name, ds in defs for d in ds):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
