"""The parts of the docs that drift as the code moves, held to the code: docs/architecture.md's
package table names every module (where a new engineer looks for what a file does); the error
codes and classes and the codec's ext types are listed where a reader looks them up; every path
the docs cite exists; every dspexctl command is documented; and the broker and the workers do
not load the client, as the architecture says. (The environment table is
tests/test_environment.py's, the op tables tests/test_protocol_ops.py's, the options the docs
name tests/test_ops_readme.py's.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import click

import dspex
from dspex.wire.errors import (
    ConnectionError,
    DidNotRun,
    DspexError,
    MayHaveRun,
    SessionNotHeld,
    UsageError,
)
from dspexctl.cli import main as dspexctl_main
from tests.harness import REPO

PACKAGES = ["dspex/wire", "dspex/client", "dspex/stack", "broker", "worker", "dspexctl"]


def _table_rows() -> dict[str, str]:
    """Each package's row of the *Packages* table, by its first cell (`dspex/wire/`, `broker/`, ...)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    table = text.split("## Packages", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = line.split("|")
        if len(cells) > 2 and (name := re.fullmatch(r"\s*`([\w/]+?)/?`.*", cells[1])):
            rows[name.group(1)] = line
    return rows


def test_the_package_table_names_every_module() -> None:
    """A module the table does not name is one nobody finds there."""
    rows = _table_rows()
    unnamed = []
    for package in PACKAGES:
        assert package in rows, f"docs/architecture.md has no row for {package}/"
        for module in sorted((REPO / package).glob("*.py")):
            if module.name not in ("__init__.py", "__main__.py") and f"`{module.name}`" not in rows[package]:
                unnamed.append(f"{package}/{module.name}")
    # the top-level public modules are named by their import names
    top = rows["dspex"]
    unnamed += [f"dspex/{m.name}" for m in sorted(REPO.joinpath("dspex").glob("*.py"))
                if m.name != "__init__.py" and f"`dspex.{m.stem}`" not in top]
    assert not unnamed, f"modules docs/architecture.md's package table does not name: {unnamed}"


def _error_classes() -> list[type[DspexError]]:
    return [obj for name in dspex.__all__ if isinstance(obj := getattr(dspex, name), type)
            and issubclass(obj, DspexError)]


# the groups a caller catches by what it may do: named as groups, never sent as a code
GROUPS = {DspexError, DidNotRun, MayHaveRun, UsageError, ConnectionError}


def test_protocol_md_lists_every_error_code() -> None:
    """An error reply's ``code`` is what a client in another language switches on: each one is named
    in docs/protocol.md, whether it travels or the client makes it."""
    text = (REPO / "docs" / "protocol.md").read_text()
    frontend = text.split("## Frontend", 1)[1].split("\n## ", 1)[0]
    missing = sorted(cls.code for cls in _error_classes() if cls not in GROUPS and f"`{cls.code}`" not in frontend)
    assert not missing, f"error codes docs/protocol.md's Frontend section does not name: {missing}"


def test_readme_lists_every_error_a_caller_can_get() -> None:
    text = (REPO / "README.md").read_text()
    errors = re.split(r"\n##+ ", text.split("### Errors\n", 1)[1], maxsplit=1)[0]
    # answered by the broker itself (it restores the session there): a caller never sees it
    internal = {SessionNotHeld}
    missing = sorted(cls.__name__ for cls in _error_classes()
                     if cls not in internal and not re.search(rf"`(dspex\.)?{cls.__name__}`", errors))
    assert not missing, f"errors README.md's Errors section does not name: {missing}"


DOCS = [REPO / "README.md", *(p for p in sorted((REPO / "docs").glob("*.md")) if p.name != "benchmarks.md")]


def test_every_file_of_the_repository_the_docs_cite_exists() -> None:
    """``broker/state.py``, ``tests/test_hosts.py``, ``examples/offline_lm.py``: a path a reader
    opens (benchmarks.md is a log of past runs: the files it names may be gone since)."""
    cited = re.compile(r"(?<![\w./-])((?:dspex|broker|worker|dspexctl|examples|tests|bench|bin|docs)/[\w/.*-]*\w)")
    paths = {(doc.name, path) for doc in DOCS for path in cited.findall(doc.read_text())}
    assert len(paths) > 100, "the scan finds the docs' paths"
    # a path or a pattern (`tests/test_checkpoint*.py`)
    missing = sorted(f"{doc}: {path}" for doc, path in paths if not any(REPO.glob(path)))
    assert not missing, missing


def _commands(group: click.Group, prefix: str = "") -> list[str]:
    names = []
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        names += _commands(command, f"{path} ") if isinstance(command, click.Group) else [path]
    return names


def test_every_dspexctl_command_is_documented() -> None:
    text = (REPO / "docs" / "operations.md").read_text() + (REPO / "docs" / "flagship.md").read_text()
    commands = _commands(dspexctl_main)
    assert len(commands) > 10, commands
    assert not [c for c in commands if not re.search(rf"(`|dspexctl ){re.escape(c)}[` ]", text)]


def test_protocol_md_lists_every_ext_type() -> None:
    """A peer in another language decodes by these codes: each one the codec defines has its row."""
    defined = {int(code) for path in sorted((REPO / "dspex" / "wire").glob("*.py"))
               for code in re.findall(r"^EXT_[A-Z_]+ = (\d+)", path.read_text(), re.MULTILINE)}
    assert len(defined) > 20, defined
    text = (REPO / "docs" / "protocol.md").read_text()
    table = text.split("## Payload codec", 1)[1].split("\n## ", 1)[0]
    rows = {int(code) for cell in re.findall(r"^\| ([\d /]+) \|", table, re.MULTILINE) for code in cell.split("/")}
    assert defined - rows == set(), f"ext codes without a row in docs/protocol.md's codec table: {defined - rows}"


def test_the_broker_and_the_workers_do_not_load_the_client() -> None:
    """docs/architecture.md: importing ``dspex`` leaves the client's names to their first use, so
    the broker's and a worker's modules, all imported, hold no ``dspex.client`` module."""
    modules = sorted(".".join(f.relative_to(REPO).with_suffix("").parts) for package in ("broker", "worker")
                     for f in (REPO / package).glob("*.py") if f.stem != "__main__")
    script = ("import importlib, sys\n"
              f"for m in {modules!r}:\n    importlib.import_module(m)\n"
              "print(sorted(m for m in sys.modules if m.startswith('dspex.client')))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]"], done.stdout
