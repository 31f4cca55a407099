"""dspexctl: the operator's CLI (commands arrive with the supervisor issue)."""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """Operate a dspex stack: pools, workers, sessions."""
