"""The environment a dspex process reads: every ``DSPEX_*`` variable the code names is in the
table of docs/operations.md (*Environment*), and each process kind reads its variables in one
place (the broker in ``broker/settings.py``, a worker in ``worker/settings.py``, a client in
``dspex/client/config.py``)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.harness import REPO

NAME = re.compile(r"\bDSPEX_[A-Z][A-Z_]*[A-Z]\b")
# the runtime: the four packages and what supervisord runs
PRODUCT = [*(REPO / p for p in ("broker", "worker", "dspex", "dspexctl")), REPO / "bin", REPO / "supervisor.conf"]
# where a process kind reads os.environ for DSPEX_* names
READERS = {"broker/settings.py", "worker/settings.py", "dspex/client/config.py"}


def _product_files() -> list[Path]:
    files: list[Path] = []
    for place in PRODUCT:
        files += [place] if place.is_file() else [f for f in sorted(place.rglob("*")) if f.is_file()
                                                   and f.suffix in (".py", "") and "__pycache__" not in f.parts]
    return files


def _documented() -> set[str]:
    text = (REPO / "docs" / "operations.md").read_text()
    table = text.split("### Environment", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `DSPEX_")]
    return {name for row in rows for name in NAME.findall(row.split("|")[1])}


def test_every_variable_the_code_reads_is_in_the_environment_table() -> None:
    used: dict[str, str] = {}
    for f in _product_files():
        for name in NAME.findall(f.read_text(errors="replace")):
            used.setdefault(name, str(f.relative_to(REPO)))
    assert len(used) > 20, "the scan found the code's variables"
    missing = {name: where for name, where in used.items() if name not in _documented()}
    assert not missing, f"DSPEX_* variables missing from docs/operations.md's Environment table: {missing}"


def test_the_table_lists_no_variable_nothing_reads() -> None:
    named = set()
    for f in [*_product_files(), *sorted((REPO / "examples").glob("*.py"))]:
        named |= set(NAME.findall(f.read_text(errors="replace")))
    assert _documented() - named == set()


def test_each_process_kind_reads_the_environment_in_one_place() -> None:
    reads = re.compile(r"(os\.environ|os\.getenv|environ\.get)\W*\(?\[?\s*[\"']DSPEX_")
    found = {str(f.relative_to(REPO)) for f in _product_files() if f.suffix == ".py" and reads.search(f.read_text())}
    # dspex/wire/sockets.py parses a mapping each kind's reader passes in (the run directory rules)
    assert found - READERS - {"dspex/wire/sockets.py"} == set()
