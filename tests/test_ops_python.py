"""Which python supervisor.conf's programs run, from any environment where dspex is installed.

The shipped command= lines are run as supervisord runs them (``/bin/sh HERE/bin/dspex-python
ARGS``, parsed with shlex after supervisord's ``%(here)s`` expansion, in a copy of the shipped
layout: the conf's directory with ``bin/dspex-python``), first from an intermediate /bin/sh with
``-m worker`` swapped for code that prints the interpreter it got, then under a real supervisord.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import dspex
from tests.harness import wait_for
from tests.harness.supervisord import BIN, SHIPPED_CONF, Supervisord, link_launcher, small_conf_text

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
PRINT_PYTHON = ["-c", "import sys;print(sys.executable)"]


def program_body(program: str, here: Path) -> list[str]:
    """The argv of ``[program:NAME]`` in the shipped conf, as supervisord would exec it."""
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"))
    parser.read(SHIPPED_CONF)
    command = parser.get(f"program:{program}", "command") % {"here": str(here)}
    argv = shlex.split(command)
    assert argv[:2] == ["/bin/sh", f"{here}/bin/dspex-python"], argv
    return argv


def clean_env(**extra: str) -> dict[str, str]:
    """An environment as a fresh login shell has it: no venv active, no dspex variables."""
    env = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    env.update(extra)
    return env


@pytest.fixture
def here() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="dxp", dir="/tmp"))
    link_launcher(root)  # the shipped layout: bin/dspex-python next to the conf
    yield root
    shutil.rmtree(root, ignore_errors=True)


def run_body(argv: list[str], here: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ARGV from an intermediate /bin/sh, so "the parent's interpreter" is not this python."""
    if argv[2:4] == ["-m", "worker"]:  # keep --pool NAME: the launcher names the program by it
        argv = [*argv[:2], *PRINT_PYTHON, *argv[4:]]
    return subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", *argv], cwd=here, env=env,
                          capture_output=True, text=True, timeout=60)


def test_system_python_has_no_dspex(here: Path) -> None:
    """The premise of the fallbacks below: the interpreter on a clean PATH cannot import dspex."""
    res = subprocess.run(["python3", "-c", "import dspex"], cwd=here, env=clean_env(), capture_output=True)
    assert res.returncode != 0


def test_dspex_python_is_used_as_is(here: Path) -> None:
    (here / ".venv").symlink_to(sys.prefix)
    res = run_body(program_body("triage_pool", here), here, clean_env(DSPEX_PYTHON=sys.executable))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == sys.executable


def test_dot_venv_next_to_the_conf_wins(here: Path) -> None:
    (here / ".venv").symlink_to(sys.prefix)
    res = run_body(program_body("triage_pool", here), here, clean_env(VIRTUAL_ENV="/nonexistent"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(here / ".venv" / "bin" / "python")


def test_active_virtual_env_when_there_is_no_dot_venv(here: Path) -> None:
    res = run_body(program_body("triage_pool", here), here, clean_env(VIRTUAL_ENV=sys.prefix))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(Path(sys.prefix) / "bin" / "python")


def test_a_dot_venv_without_dspex_is_skipped(here: Path) -> None:
    (here / ".venv" / "bin").mkdir(parents=True)
    (here / ".venv" / "bin" / "python").symlink_to(shutil.which("python3", path=SYSTEM_PATH) or "/usr/bin/python3")
    res = run_body(program_body("triage_pool", here), here, clean_env(VIRTUAL_ENV=sys.prefix))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(Path(sys.prefix) / "bin" / "python")


def test_activated_venv_python_on_path(here: Path) -> None:
    res = run_body(program_body("triage_pool", here), here, clean_env(PATH=f"{BIN}:{SYSTEM_PATH}"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(BIN / "python3")


@pytest.mark.parametrize("program, what", [("triage_pool", "worker of triage_pool"), ("broker", "the broker")])
def test_no_python_with_dspex_is_one_clear_line(here: Path, program: str, what: str) -> None:
    (here / "dspex").mkdir()  # a checkout's source in the working directory is not an installed dspex
    (here / "dspex" / "__init__.py").write_text("")
    res = run_body(program_body(program, here), here, clean_env(DSPEX_PYTHON="/nonexistent/python"))
    assert res.returncode == 127
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert f"dspex: cannot start {what}: no python with dspex installed among:" in line
    assert "/nonexistent/python" in line and str(here / ".venv" / "bin" / "python") in line and "python3" in line
    assert "set DSPEX_PYTHON" in line
    assert line[:4].isdigit() and "T" in line.split()[0], "the line starts with a UTC timestamp"
    # the format of every dspex log line (dspex/stack/logs.py): time, process, level, logger
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "
    assert re.match(stamp + r"(broker|worker\[triage_pool:)\S* ERROR dspex: ", line), line


# -- under a real supervisord ----------------------------------------------------------------------
def small_conf(here: Path) -> Path:
    conf = here / "supervisor.conf"
    conf.write_text(small_conf_text())
    (here / "run").mkdir(exist_ok=True)
    (here / "log").mkdir(exist_ok=True)
    return conf


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_supervisord_from_a_venv_runs_that_venvs_python(here: Path) -> None:
    """No .venv, no DSPEX_PYTHON, no active venv: the venv whose supervisord runs is the one used."""
    conf = small_conf(here)
    run_dir = str(here / "r")
    sd = Supervisord(here, conf, clean_env(DSPEX_RUN_DIR=run_dir, DSPEX_METRICS_PORT="0"))
    sd.start_foreground()
    try:
        def worker() -> dict[str, object] | None:
            assert sd.proc.poll() is None, (here / "supervisord.out").read_text()
            sd.processes()
            with dspex.connect(f"ipc://{run_dir}/frontend.sock", timeout=2) as dx:
                workers = dx.status(timeout=2)["pools"]["triage_pool"]["workers"]
            return workers[0] if workers else None

        w = wait_for(worker, 90, 0.2, "the worker registered with the broker")
        shebang = (BIN / "supervisord").read_text().splitlines()[0][2:].strip()
        assert Path(f"/proc/{w['pid']}/cmdline").read_bytes().split(b"\0")[0].decode() == shebang
    finally:
        sd.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_supervisord_without_dspex_logs_why_each_program_fails(here: Path) -> None:
    """supervisord from an interpreter that has supervisor but not dspex: each program's log says so."""
    conf = small_conf(here)
    only_supervisor = here / "pp"
    only_supervisor.mkdir()
    (only_supervisor / "supervisor").symlink_to(Path(sysconfig.get_paths()["purelib"]) / "supervisor")
    env = clean_env(DSPEX_RUN_DIR=str(here / "r"), DSPEX_METRICS_PORT="0", PYTHONPATH=str(only_supervisor))
    system_python = shutil.which("python3", path=SYSTEM_PATH)
    assert system_python
    sd = Supervisord(here, conf, env, argv=[system_python, "-m", "supervisor.supervisord"])
    sd.start_foreground()
    try:
        def fatal() -> bool:
            assert sd.proc.poll() is None, (here / "supervisord.out").read_text()
            return all(p["statename"] == "FATAL" for p in sd.processes())

        wait_for(fatal, 60, 0.2, "every program FATAL")
        for log, what in (("broker.log", "the broker"), ("triage_pool_00.log", "worker of triage_pool")):
            text = (here / "log" / log).read_text()
            assert f"dspex: cannot start {what}: no python with dspex installed among:" in text, text
            assert "Traceback" not in text and "not found" not in text, text
            assert system_python in text
        # and pools status says why, from the programs' logs
        res = subprocess.run([sys.executable, "-m", "dspexctl", "pools", "status"], cwd=here, capture_output=True,
                             text=True, timeout=60, env={**env, "PYTHONPATH": ""})
        assert res.returncode == 4, res.stdout + res.stderr
        for name in ("broker:broker", "triage_pool:triage_pool_00"):
            line = next(ln for ln in res.stdout.splitlines() if ln.startswith(f"DEGRADED: {name} is FATAL"))
            assert "no python with dspex installed" in line, res.stdout
    finally:
        sd.stop()
