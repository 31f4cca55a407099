"""The README's operator blocks, run as written, the options the docs name, and the repository
hygiene an operator sees.

"Start a broker and a pool by hand" is taken verbatim from README.md and run by bash in a fresh
environment (system PATH, no venv active, cwd a checkout-like dir whose .venv is this venv), in
its own process group, which the test kills whatever happens.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import click
import pytest

import bench.__main__
import broker.settings
import tests.harness.chaos
import tests.harness.fuzz
import worker.settings
from dspex.stack.supervisor import pid_alive
from dspexctl.cli import main as dspexctl_main
from tests.harness import REPO

# the options of llama.cpp's server in docs/flagship.md's recipe for a local model: not ours
LLAMA_SERVER_OPTIONS = {"--alias", "--chat_format", "--host", "--jinja", "--model_alias", "--n_ctx", "--n_threads",
                        "--port"}


def readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(f"## {heading}\n"):]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match, heading
    return match.group(1)


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_by_hand_block_runs_verbatim_in_a_fresh_shell() -> None:
    block = readme_block("Start a broker and a pool by hand")
    assert "python -m broker" in block and "python -m worker" in block
    here = Path(tempfile.mkdtemp(prefix="dxr", dir="/tmp"))
    (here / ".venv").symlink_to(sys.prefix)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
           "DSPEX_RUN_DIR": str(here / "r"), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    proc = subprocess.Popen(["bash", "-c", block], cwd=here, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
        lines = out.split()
        assert lines and lines[-1].isdigit(), out + err
        assert "nothing is listening" not in err and "Traceback" not in err, err
        assert "command not found" not in err and "No module named" not in err, err
        # the block's last line stopped everything it started
        assert group_pids(proc.pid) == [], err
        assert not pid_alive(int(lines[-1]))
    finally:
        for pid in group_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(here, ignore_errors=True)


def test_keys_are_ignored_by_git() -> None:
    """`dspexctl keys generate` writes keys/ in the checkout: git must never offer the secrets."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["keys/broker.key_secret", "keys/broker.key", "keys/clients/client.key_secret"]
    res = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == paths


def click_options(command: click.Command) -> set[str]:
    names = {name for param in command.params if isinstance(param, click.Option)
             for name in (*param.opts, *param.secondary_opts)}
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            names |= click_options(sub)
    return names


def argparse_options(main: Callable[[list[str]], object]) -> set[str]:
    """The options ``main(["--help"])`` prints (argparse prints its help and exits)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    return set(re.findall(r"--[a-z][a-z0-9-]*", out.getvalue()))


def test_every_option_the_docs_name_exists() -> None:
    """A user copies `--flag` from the docs: each one must be an option of one of our commands."""
    options = click_options(dspexctl_main) | LLAMA_SERVER_OPTIONS
    for main in (broker.settings.parse, worker.settings.parse, tests.harness.chaos.main, tests.harness.fuzz.main,
                 bench.__main__.main):
        options |= argparse_options(main)
    docs = [REPO / "README.md", *(p for p in (REPO / "docs").glob("*.md") if p.name != "benchmarks.md")]
    unknown = {f"{doc.name}: {flag}" for doc in docs
               for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", doc.read_text()) if flag not in options}
    assert not unknown, sorted(unknown)
