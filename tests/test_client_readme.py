"""The README's "From Python" example runs as written, as a script, against a real stack."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO, Stack, base_env

pytestmark = pytest.mark.timeout(180)


def from_python_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## From Python\n"):]
    match = re.search(r"```python\n(.*?)```\n", section, re.DOTALL)
    assert match, "no python block in the From Python section"
    return match.group(1)


def test_readme_from_python_example_runs(stack: Stack, short_tmp: str) -> None:
    stack.pool("triage_pool:strict_queue", 1)
    script = Path(short_tmp) / "example.py"
    script.write_text(from_python_example())
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150,
                          env=base_env(str(Path(stack.frontend[len("ipc://"):]).parent),
                                       DSPEX_ENDPOINT=stack.frontend,
                                       PYTHONPATH=f"{REPO / 'examples'}{os.pathsep}{REPO}"))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and "offline/triage" in lines[2], done.stdout
