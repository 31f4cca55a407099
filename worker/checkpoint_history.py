"""The LM history entries of a durable session's checkpoint (worker/checkpoint.py): each entry a
blob of its own in a seeded slot, pickled once, when it appears; one that cannot be a blob is
pickled inline in the skeleton."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worker.checkpoint_data import dumps_data_blob
from worker.checkpoint_slots import ENTRY, Slots


class HistoryEntries:
    """Which history entries of one session have a slot (``Tracker.history``); acts through the
    tracker's ``add_blob`` (a slot's new blob) and ``drop`` (a slot gone)."""

    def __init__(self, slots: Slots, *, add_blob: Callable[[int, bytes], None], drop: Callable[[int], None]) -> None:
        self._slots, self._add_blob, self._drop = slots, add_blob, drop
        self.entries: dict[int, int] = {}  # id(history entry) -> slot
        self.inline: dict[int, Any] = {}  # history entries that cannot be blobs
        self.first: Any = None  # the first history entry at the last build

    def sync(self, entries: list[Any]) -> None:
        """Slots for the entries the session's history gained, none for those it dropped."""
        known, inline = self.entries, self.inline
        n = len(entries)
        if n == len(known) + len(inline) and (
                not entries or all(id(e) in known or id(e) in inline for e in (entries[0], entries[-1]))):
            return  # entries are appended at the end and dropped at the front: no change
        first = self.first
        if (n >= 2 and not inline and id(entries[-1]) not in known and id(entries[-2]) in known
                and id(entries[0]) in known):
            # the usual call: one entry in at the end and, at the bound, the first one out (a
            # wrong guess only costs speed: an entry still listed but not held is pickled inline,
            # then held again by the next full pass)
            if n == len(known) + 1 and first is entries[0]:
                self._add(entries[-1])
                return
            if n == len(known) and first is not None and first is not entries[0] and id(first) in known:
                self._drop(known.pop(id(first)))
                self._add(entries[-1])
                self.first = entries[0]
                return
        current = {id(e): e for e in entries}
        for key in [k for k in known if k not in current]:
            self._drop(known.pop(key))
        for key in [k for k in inline if k not in current]:
            del inline[key]
        for key, entry in current.items():
            if key not in known and key not in inline:
                self._add(entry)
        self.first = entries[0] if entries else None

    def _add(self, entry: Any) -> None:
        """A history entry the session has not had: a blob of its own, pickled once."""
        if not isinstance(entry, dict):
            self.inline[id(entry)] = entry
            return
        try:
            blob = dumps_data_blob(entry)
        except Exception:  # noqa: BLE001 - needs session objects, or fails: inline, where a failure names its root
            self.inline[id(entry)] = entry
            return
        i = self._slots.alloc(entry, ENTRY)
        self.entries[id(entry)] = i
        self._add_blob(i, blob)
