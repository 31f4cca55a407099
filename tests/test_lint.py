"""The housekeeping CI holds the tree to: ``ruff check .`` (settings in pyproject.toml) and
``mypy --strict`` over the runtime packages (settings in setup.cfg) both pass. The versions are
pinned in the ``test`` extra: a new release's new rules land by a deliberate bump."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import REPO

pytestmark = pytest.mark.timeout(330)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing() -> None:
    res = _run("ruff", "check", ".", "--output-format", "concise", "--no-cache")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]


def test_mypy_strict_finds_nothing_in_the_runtime_packages() -> None:
    res = _run("mypy", "--strict", "broker", "worker", "dspex", "dspexctl")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert "Success" in res.stdout
