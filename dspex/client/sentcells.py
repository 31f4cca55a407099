"""The closure cells of the functions a session's worker holds (the sender's side).

In-process, functions made together share their closure cells (``inc`` and ``get`` of one
``make_counter()``). A session sends a function once and its key after (:mod:`dspex.client.sendcache`);
the worker makes each function it is sent with cells of its own, except those this record names:
for a cell of a function the worker holds, a function sent later that closes over it refers to
that function's cell on the worker (``dspex.wire.codestore._load_function``), and gets what the
session's calls made of it. The record keeps, per cell, the functions that hold it and the value
last sent for it: a cell the client rebinds since goes again (``Bindings._cell_rebound``).

Bounded by the functions the session holds: the worker keeps no cell of its own (a cell lives in
its functions), and a cell is forgotten here with the last function of it the send cache forgets
(:meth:`SentCells.forget`, called as the cache tells the worker to drop that function).
"""

from __future__ import annotations

import types
from typing import Any

# a closure cell of a function a request defined: (the cell, the function's key, the cell's index
# in its closure, the value sent for it)
CellSent = tuple[types.CellType, str, int, Any]


class SentCells:
    """One session's record of the cells of the functions its worker holds. Not locked: its
    owner (:class:`dspex.client.sendcache.SendCache`) changes it under its lock; readers see
    whole entries (tuples, replaced, never changed in place)."""

    __slots__ = ("cells", "closures")

    def __init__(self) -> None:
        # id(cell) -> (the cell, ((key of a function that holds it, the cell's index), ...), the
        # value last sent for it)
        self.cells: dict[int, tuple[types.CellType, tuple[tuple[str, int], ...], Any]] = {}
        self.closures: dict[str, tuple[int, ...]] = {}  # key of a function sent -> ids of its cells

    def __len__(self) -> int:
        return len(self.cells)

    def hold(self, sent: dict[int, tuple[CellSent, ...]]) -> None:
        """A request defined functions with these cells (each cell's holders, in order)."""
        for holders in sent.values():
            cell, value = holders[0][0], holders[-1][3]
            entry = self.cells.get(id(cell))
            known = entry[1] if entry is not None and entry[0] is cell else ()
            self.cells[id(cell)] = (cell, (*known, *((key, at) for _, key, at, _ in holders)), value)
            for _, key, _, _ in holders:
                self.closures[key] = (*self.closures.get(key, ()), id(cell))

    def resent(self, cell: types.CellType, value: Any) -> None:
        """A request sent ``value`` for a held cell the client rebound."""
        entry = self.cells.get(id(cell))
        if entry is not None and entry[0] is cell:
            self.cells[id(cell)] = (cell, entry[1], value)

    def held(self, cell: types.CellType, sent: Any) -> tuple[str, int, Any] | None:
        """(key of a function the worker holds (its key in ``sent``) that has ``cell``, the cell's
        index in its closure, the value last sent for it), if any."""
        entry = self.cells.get(id(cell))
        if entry is None or entry[0] is not cell:
            return None
        for key, at in entry[1]:
            if key in sent:
                return key, at, entry[2]
        return None

    def forget(self, key: str) -> None:
        """The worker drops function ``key``: a cell no function it holds has is forgotten."""
        for cell_id in self.closures.pop(key, ()):
            entry = self.cells.get(cell_id)
            if entry is None:
                continue
            holders = tuple(h for h in entry[1] if h[0] != key)
            if holders:
                self.cells[cell_id] = (entry[0], holders, entry[2])
            else:
                del self.cells[cell_id]

    def clear(self) -> None:
        self.cells.clear()
        self.closures.clear()
