"""The keys of one session: which client object each names, which the worker holds, and the
client objects a call acts on by key (a part of :class:`dspex.client.sendcache.SendCache`).

It owns:

- the key that names each client object to the worker, by identity (a strong reference keeps the
  id valid), and code objects by content hash;
- which keys the worker holds, least recently used first, and the pins that keep a key held past
  the cache's size: a module global's binding (as long as it is bound) and a module namespace
  (for the session's life); a value inside another's (an LM or DSPy module in a global's or a
  setting's value) is held as long as that one is;
- the keys forgotten here that the worker still holds: requests tell it to drop them;
- the client objects the worker holds under a key that a call acts on: DSPy LMs and modules (their
  history entries come back), ContextVars (their value goes with each call), a client setting's
  state (a change made in place goes again), the code a function was sent with;
- the closure cells of the functions the worker holds (:mod:`dspex.client.sentcells`).

Forgetting a key forgets it in all of these. It has no lock of its own: its ``SendCache``'s lock
guards every change, with the session's bindings, so a request's record is taken whole.
"""

from __future__ import annotations

import contextvars
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from dspex.client.sentcells import SentCells

_PINNED_FOREVER = 1 << 30  # namespaces: their key is their module state's identity


class HeldKeys:
    """The keys of one session's client objects and which of them its worker holds (see the
    module docstring)."""

    def __init__(self) -> None:
        self.keys: dict[int, tuple[Any, str]] = {}  # id(obj) -> (obj, key)
        self.key_ids: dict[str, int] = {}  # key -> id(obj)
        self.sent: OrderedDict[str, None] = OrderedDict()  # keys the worker holds, least recently used first
        self.pins: dict[str, int] = {}  # key -> bindings (or namespaces) that hold it: never evicted
        self.holders: dict[str, str] = {}  # key of a value inside another's -> the key of that value
        self.drops: list[str] = []  # keys forgotten here that the worker still holds
        self.codes: dict[str, types.CodeType] = {}  # key of a function sent -> the code it was sent with
        self.states: dict[str, Any] = {}  # key -> the state of a client setting the worker holds under it
        # key -> a DSPy LM or module of this client the worker holds: its history entries come back
        self.lms: dict[str, Any] = {}
        self.context_vars: dict[str, Any] = {}  # key -> a ContextVar of the user's code: its value goes per call
        self.cells = SentCells()  # the closure cells of the functions the worker holds

    def lookup(self, obj: Any) -> str | None:
        """The key the session's worker holds ``obj`` by (the client object's identity), if it does."""
        hit = self.keys.get(id(obj))
        return hit[1] if hit is not None and hit[0] is obj and hit[1] in self.sent else None

    def name(self, obj: Any, new_key: Callable[[], str]) -> str:
        """The key that names ``obj``: the one it has, else a new one."""
        oid = id(obj)
        hit = self.keys.get(oid)
        if hit is None or hit[0] is not obj:
            hit = self.keys[oid] = (obj, new_key())
            self.key_ids[hit[1]] = oid
        return hit[1]

    def record(self, new_keys: dict[int, tuple[Any, str]], defined: set[str], used: set[str],
               namespaces: set[str], lm_class: tuple[type, ...] | None, holders: dict[str, str]) -> None:
        """A request named ``new_keys``, defined the objects of ``defined`` on the worker, used
        those of ``used`` by key, bound the module namespaces of ``namespaces`` and sent the
        values of ``holders`` inside others'."""
        self.holders.update(holders)
        for oid, (obj, key) in new_keys.items():
            self.keys.setdefault(oid, (obj, key))
            self.key_ids.setdefault(key, oid)
            if lm_class is not None and key in defined and isinstance(obj, lm_class):
                self.lms[key] = obj
            elif key in defined and type(obj) is contextvars.ContextVar:
                self.context_vars[key] = obj
        for key in defined:
            self.sent[key] = None
            self.sent.move_to_end(key)
        for key in used:
            if key in self.sent:
                self.sent.move_to_end(key)
        for key in namespaces:
            self.pins[key] = _PINNED_FOREVER

    def pin(self, key: str) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        n = self.pins.get(key, 0) - 1
        if n > 0:
            self.pins[key] = n
            return
        self.pins.pop(key, None)
        if key in self.sent and not key.startswith(("c:", "ref:", "imp:", "mod:")):
            self._forget(key)  # a rebound global: the worker need not keep the old value

    def rekey(self, obj: Any, key: str, old: str) -> None:
        """A setting changed in place went to the worker under ``key``: its key from now on (the
        worker's object under ``old`` is that object, updated)."""
        prev = self.keys.get(id(obj))
        if prev is not None:
            self.key_ids.pop(prev[1], None)
        self.keys[id(obj)] = (obj, key)
        self.key_ids[key] = id(obj)
        self.states.pop(old, None)
        lm = self.lms.pop(old, None)
        if lm is not None:
            self.lms[key] = lm
        if old in self.sent and old not in self.pins:  # (a global's binding keeps its key)
            del self.sent[old]
            self.drops.append(old)

    def evict(self, max_entries: int) -> None:
        """Forget the least recently used keys past ``max_entries`` but those pinned and those
        inside a value the worker holds (its calls use them through it, unseen here: an LM inside
        a global whose history must come back)."""
        excess = len(self.sent) - max_entries
        if excess <= 0:
            return
        victims: list[str] = []
        for key in self.sent:
            if len(victims) >= excess:
                break
            if key not in self.pins and self.holders.get(key) not in self.sent:
                victims.append(key)
        for key in victims:
            self._forget(key)

    def confirm_drops(self, drops: tuple[str, ...]) -> None:
        """The worker dropped ``drops``."""
        if drops:
            done = set(drops)
            self.drops = [k for k in self.drops if k not in done]

    def missed(self, ephemeral: bool) -> None:
        """The worker lacked something: it holds none of these keys. The keys of bound globals
        stay named (a worker that does hold them keeps its module state when they come again),
        and so do those of requests still being encoded, which name their objects by them; none
        of a session its pool keeps nothing of (``ephemeral``)."""
        keep = {key for key, n in self.pins.items() if n > 0} if not ephemeral else set()
        self.keys = {oid: entry for oid, entry in self.keys.items()
                     if entry[1] in keep or (entry[1] not in self.sent and not ephemeral)}
        self.key_ids = {key: oid for oid, (_, key) in self.keys.items()}
        self.lms = {key: obj for key, obj in self.lms.items() if key in self.key_ids}
        self.holders = {key: holder for key, holder in self.holders.items() if key in self.key_ids}
        self.context_vars = {key: obj for key, obj in self.context_vars.items() if key in self.key_ids}
        self.sent.clear()
        self.pins = {key: n for key, n in self.pins.items() if n >= _PINNED_FOREVER}
        self.drops.clear()
        self.states.clear()
        self.cells.clear()

    def _forget(self, key: str) -> None:
        self.sent.pop(key, None)
        self.holders.pop(key, None)
        oid = self.key_ids.pop(key, None)
        if oid is not None:
            self.keys.pop(oid, None)
        self.lms.pop(key, None)
        self.codes.pop(key, None)
        self.context_vars.pop(key, None)
        self.states.pop(key, None)
        self.drops.append(key)
        self.cells.forget(key)
