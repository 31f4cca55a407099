"""Fixtures for the chaos suite: a private supervisord per test (tests.harness.chaos), torn down by pid."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.harness import short_tmpdir


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: chaos under load (workers/broker SIGKILLed); runs by default")


@pytest.fixture
def chaos_root(request: pytest.FixtureRequest) -> Iterator[str]:
    path = short_tmpdir("dxc")  # short: ipc paths stay far below 108 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
