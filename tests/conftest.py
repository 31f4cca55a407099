"""Fixtures that run real brokers and workers as subprocesses in short temp directories.

The processes come from the one harness, :mod:`tests.harness`: every process in its own process
group, killed by pid at teardown. Tests import what they need from ``tests.harness``.
"""

from __future__ import annotations

import shutil
from typing import Any, Iterator

import pytest

from tests.harness import Stack, short_tmpdir


@pytest.fixture
def short_tmp() -> Iterator[str]:
    path = short_tmpdir("dx")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
