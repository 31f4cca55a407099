"""Ref handles: small immutable values naming an object that lives on one worker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ref:
    """A handle to a Python object held by a worker for one session.

    ``id`` is ≥128 bits of randomness (hex); ``session`` scopes it; ``worker`` is the incarnation
    id of the worker holding it. ``type_name`` and ``repr`` are informational.
    """

    id: str
    session: str
    pool: str
    worker: str
    type_name: str
    repr: str = ""

    def __repr__(self) -> str:
        short = self.repr if len(self.repr) <= 60 else self.repr[:57] + "..."
        return f"<dspex.Ref {self.type_name} {self.id[:8]} on {self.pool}/{self.worker[:8]}: {short}>"

    def as_tuple(self) -> tuple[str, str, str, str, str, str]:
        return (self.id, self.session, self.pool, self.worker, self.type_name, self.repr)
