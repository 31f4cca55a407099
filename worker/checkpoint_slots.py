"""The numbered slots of a session's checkpoint (worker/checkpoint.py): which object is in which
slot, the skeleton pickler's memo seed, the blobs' digests and sizes."""

from __future__ import annotations

import heapq
from typing import Any

from worker import checkpoint_pickler as cp

ENTRY, MODULE, CODE, SIGNATURE, GLOBAL, FILE = "entry", "module", "code", "signature", "global", "file"
SEEDED = (ENTRY, MODULE, GLOBAL)

DYNAMIC_BASE = 1 << 24  # slot numbers of code, signature and file blobs: never in the pickler's memo


class Slots:
    """Numbered objects of one session, in two ranges.

    Seeded slots (``0 ..``): module dicts and history entries, in the skeleton pickler's memo
    (``seed``). It holds one entry per seeded slot, a placeholder nothing refers to for a free
    one, so the pickler's own memo indices start after them. Dynamic slots (``DYNAMIC_BASE ..``):
    code objects, signature classes and session directories' files, referred to as ``_slot(i)``
    calls; adding one never
    changes the memo, so an unchanged session pickles to the same bytes. Freed numbers are
    reused, lowest first."""

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}
        self.kinds: dict[int, str] = {}
        self.of: dict[int, int] = {}  # id(obj) -> slot
        self.seed: dict[int, tuple[int, Any]] = {}
        self.placeholders: list[object] = []  # per seeded slot
        self.free: list[int] = []  # free seeded slots
        self.free_dynamic: list[int] = []
        self.next_dynamic = DYNAMIC_BASE
        self.dynamic: set[int] = set()
        self.blobs: dict[int, tuple[bytes, int]] = {}  # slot -> (digest, size) of its blob
        self.versions: dict[int, Any] = {}  # signature slots: signature_version at pickling
        self._acc = 0  # XOR of the blobs' slot digests
        self.blob_bytes = 0

    @property
    def seed_size(self) -> int:
        return len(self.placeholders)

    def alloc(self, obj: Any, kind: str) -> int:
        if kind in SEEDED:
            i = heapq.heappop(self.free) if self.free else self.grow()
        elif self.free_dynamic:
            i = heapq.heappop(self.free_dynamic)
        else:
            i, self.next_dynamic = self.next_dynamic, self.next_dynamic + 1
        self.put(i, obj, kind)
        return i

    def put(self, i: int, obj: Any, kind: str) -> None:
        """``obj`` in slot ``i`` (free, or a restore rebuilding the table)."""
        self.objects[i], self.kinds[i] = obj, kind
        self.of[id(obj)] = i
        if kind in SEEDED:
            del self.seed[id(self.placeholders[i])]
            self.seed[id(obj)] = (i, obj)
        else:
            self.dynamic.add(i)

    def grow(self) -> int:
        """A new seeded slot number, its placeholder in the seed."""
        i = len(self.placeholders)
        placeholder = object()
        self.placeholders.append(placeholder)
        self.seed[id(placeholder)] = (i, placeholder)
        return i

    def clear(self, i: int) -> None:
        obj, kind = self.objects.pop(i), self.kinds.pop(i)
        self.of.pop(id(obj), None)
        if kind in SEEDED:
            del self.seed[id(obj)]
            self.seed[id(self.placeholders[i])] = (i, self.placeholders[i])
            heapq.heappush(self.free, i)
        else:
            self.dynamic.discard(i)
            heapq.heappush(self.free_dynamic, i)
        self.drop_blob(i)
        self.versions.pop(i, None)

    def set_blob(self, i: int, blob: bytes | memoryview) -> None:
        self.drop_blob(i)
        dig = cp.digest(blob)
        self.blobs[i] = (dig, len(blob))
        self._acc ^= slot_digest(i, dig)
        self.blob_bytes += len(blob)

    def drop_blob(self, i: int) -> None:
        held = self.blobs.pop(i, None)
        if held is not None:
            self._acc ^= slot_digest(i, held[0])
            self.blob_bytes -= held[1]

    def set_digest(self) -> bytes:
        return self._acc.to_bytes(8, "little")


def slot_digest(i: int, dig: bytes) -> int:
    return int.from_bytes(cp.digest(i.to_bytes(8, "little") + dig), "little")

