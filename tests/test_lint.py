"""The housekeeping CI holds the tree to: ``ruff check .`` (settings in pyproject.toml) and
``mypy --strict`` over the runtime packages (settings in setup.cfg) both pass, and no runtime
module grows past 500 lines. The versions are
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


def test_no_runtime_module_is_over_500_lines() -> None:
    """A module over 500 lines has usually taken a second job: split it by what it does."""
    long = {str(f.relative_to(REPO)): n for package in ("broker", "worker", "dspex", "dspexctl")
            for f in sorted((REPO / package).rglob("*.py")) if (n := len(f.read_text().splitlines())) > 500}
    assert not long, long
