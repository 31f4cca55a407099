"""The housekeeping CI holds the tree to: ``ruff check .`` (settings in pyproject.toml) and
``mypy --strict`` over the runtime packages (settings in setup.cfg) both pass, no runtime
module grows past 500 lines, and the runtime's imports keep their floors with no circle. The
versions are pinned in the ``test`` extra: a new release's new rules land by a deliberate bump."""

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


def _imports() -> dict[str, set[str]]:
    """Each runtime module -> the runtime modules it imports anywhere in its text (type-checking
    and function-local imports too: they are ties of the design all the same)."""
    import ast

    names = {".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): f
             for package in ("broker", "worker", "dspex", "dspexctl") for f in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, f in names.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        graph[mod] = {m for m in found if m in names and m != mod}
    return graph


def test_no_import_circle_and_each_floor_imports_only_below_it() -> None:
    """broker and worker never import each other; the library (dspex) imports neither nor the CLI;
    in dspex, the client and the stack tooling stand on the wire contract, never on each other; and
    no set of runtime modules imports each other in a loop."""
    graph = _imports()
    floors = {"broker": {"worker", "dspexctl"}, "worker": {"broker", "dspexctl"},
              "dspex": {"broker", "worker", "dspexctl"}, "dspex.wire": {"dspex.client", "dspex.stack"},
              "dspex.stack": {"dspex.client"}, "dspex.client": {"dspex.stack"}}
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                   for floor, banned in floors.items()
                   if (m == floor or m.startswith(floor + ".")) and any(t == b or t.startswith(b + ".") for b in banned))
    assert not wrong, wrong
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles
