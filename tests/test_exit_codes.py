"""dspexctl's exit codes: one table (docs/operations.md, *Exit codes*) that every command uses, a
code meaning one thing whichever command returns it. Pure logic: the docs against the code."""

from __future__ import annotations

import re
from pathlib import Path

import flagship_lm

from dspex import ConfigError, Timeout
from dspex.wire.errors import BrokerUnreachable
from dspexctl import commands

DOCS = Path(__file__).resolve().parent.parent / "docs"


def table() -> dict[int, str]:
    """The rows of docs/operations.md's exit-code table, by code."""
    text = (DOCS / "operations.md").read_text()
    rows = text.split("Exit codes:", 1)[1].split("\n\n", 2)[1]
    codes: dict[int, str] = {}
    for row in rows.splitlines()[2:]:
        cell, meaning = row.split("|")[1:3]
        if cell.strip() != "128 + N":
            codes[int(cell)] = meaning.strip()
    return codes


def constants(module: object) -> dict[str, int]:
    return {name: value for name, value in vars(module).items() if name.startswith("EXIT_") and isinstance(value, int)}


def flagship_codes() -> tuple[set[int], str]:
    """The codes docs/flagship.md says the flagship returns, and that page's text."""
    text = (DOCS / "flagship.md").read_text()
    listed = re.search(r"`dspexctl flagship` exits with ([^.]*)\.", text)
    assert listed, "docs/flagship.md lists the flagship's codes in one sentence"
    return {int(c) for c in re.findall(r"\b(\d+)\b(?! \+)", listed.group(1)) if int(c) < 128}, text


def test_every_code_the_commands_return_is_a_row_of_the_one_table() -> None:
    rows = table()
    assert sorted(rows) == list(range(12)), rows
    ours = constants(commands)
    assert set(ours.values()) <= set(rows), ours
    assert set(commands.EXIT_FOR_STATE.values()) <= set(rows)
    # the flagship's own codes come after dspexctl's, and a shared code keeps its meaning
    flow = constants(flagship_lm)
    assert set(flow.values()) <= set(rows), flow
    for name, code in flow.items():
        assert ours.get(name, code) == code, f"{name} is {code} in the flagship, {ours[name]} in dspexctl"
    for code in (9, 10, 11):
        assert "`flagship`" in rows[code], rows[code]


def test_the_flagship_documents_the_codes_it_returns_and_only_those() -> None:
    listed, text = flagship_codes()
    assert listed <= set(table()), listed
    # what it returns: its own constants, and dspexctl's for the errors that stop it
    returned = set(constants(flagship_lm).values()) | {
        commands.exit_code_for(err) for err in (ConfigError("x"), BrokerUnreachable("x"), Timeout("x"))}
    assert returned == listed, (returned, listed)
    mentioned = {int(c) for c in re.findall(r"\b[Ee]xit(?: code)? (\d+)", text) if int(c) < 128}
    assert mentioned <= listed, f"docs/flagship.md names exit codes the flagship does not return: {mentioned - listed}"


def test_operations_mentions_only_codes_of_the_table() -> None:
    text = (DOCS / "operations.md").read_text()
    mentioned = {int(c) for c in re.findall(r"\b[Ee]xit(?: code)? (\d+)\b", text) if int(c) < 128}
    assert mentioned <= set(table()), mentioned - set(table())
