"""The README's client examples run as written, as scripts, against one real stack: "From Python",
the asyncio block, and the "More than one broker" client line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.harness import REPO, Stack, base_env

pytestmark = pytest.mark.timeout(180)

README = (REPO / "README.md").read_text()


def python_block(after: str) -> str:
    """The first ```python block after the line ``after``, dedented (it may sit in a list item)."""
    match = re.search(r"```python\n(.*?)```\n", README[README.index(after):], re.DOTALL)
    assert match, f"no python block after {after!r}"
    return textwrap.dedent(match.group(1))


def run_script(source: str, where: Path, stack: Stack, **env: str) -> list[str]:
    script = where / "example.py"
    script.write_text(source)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150,
                          env=base_env(str(Path(stack.frontend[len("ipc://"):]).parent),
                                       PYTHONPATH=f"{REPO / 'examples'}{os.pathsep}{REPO}", **env))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def test_readme_client_examples_run(stack: Stack, short_tmp: str) -> None:
    stack.pool("triage_pool:strict_queue", 1)
    where = Path(short_tmp)
    lines = run_script(python_block("## From Python\n"), where, stack, DSPEX_ENDPOINT=stack.frontend)
    assert len(lines) == 3 and "offline/triage" in lines[2], lines

    # the block is the body of a coroutine: the README's surrounding text says where it runs
    body = textwrap.indent(python_block("- **asyncio**"), "    ")
    lines = run_script(f"import asyncio\nimport dspex\n\n\nasync def main():\n{body}    print(results)\n\n\n"
                       "asyncio.run(main())\n", where, stack, DSPEX_ENDPOINT=stack.frontend)
    pids = [int(pid) for pid in re.findall(r"\d+", lines[-1])]
    assert len(pids) == 10 and set(pids) <= {w["pid"] for w in stack.workers("triage_pool")}, lines

    brokers = README[README.index("## More than one broker\n"):]
    endpoints = re.search(r'export DSPEX_ENDPOINTS="(.*?)"', brokers)
    line = re.search(r"python -c '(.*?)'", brokers)
    assert endpoints and line, "the More than one broker block changed"
    # both of the map's brokers are this stack's one: the line must reach it through the map
    mapped = re.sub(r"ipc://[^,]*", stack.frontend, endpoints.group(1))
    lines = run_script(line.group(1), where, stack, DSPEX_ENDPOINTS=mapped)
    assert "triage_pool" in lines[-1], lines
