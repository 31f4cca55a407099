"""Fixtures for the chaos suite: a private supervisord per test, torn down by pid."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ lives at the repo root
    sys.path.insert(0, str(REPO))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: chaos under load (workers/broker SIGKILLed); runs by default")


@pytest.fixture
def chaos_root(request: pytest.FixtureRequest) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="dxc", dir="/tmp")  # short: ipc paths stay far below 108 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def report(name: str, figures: dict[str, Any]) -> None:
    """Print the figures (visible with -s or on failure) and append them to $DSPEX_CHAOS_JSON if set."""
    print(f"\n[{name}] " + json.dumps(figures, sort_keys=True))
    out = os.environ.get("DSPEX_CHAOS_JSON")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")
