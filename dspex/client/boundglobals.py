"""The module globals of one session and their binding versions (a part of
:class:`dspex.client.sendcache.SendCache`).

It owns, for each module global the session's functions read ((namespace, name)):

- the client object bound there when it was last sent, and its key: an unchanged binding is not
  sent again, a rebound one (a new object) is;
- whether a reply has shown the worker loaded that binding yet (until then later requests send it
  again, by key: a request that never reached the worker would otherwise leave the global at its
  old value there);
- the binding *version* that set it, and the user modules whose globals the session's code uses.

Which worker runs a call is not known when it is encoded: a ``hint`` session's call runs on
another worker when its own is busy, and later ones on either. What the client took as held may
then hold on the other worker only (a global rebound by a call that ran there). Each change of a
binding gets the next number of the session's binding version; a request that relies on held
bindings says the version of the session's bindings it does not carry (:meth:`BoundGlobals.record`),
and the worker's store refuses it as a miss unless it holds every binding up to that version
(``dspex.wire.codestore.check_held``). The miss says the version the store holds; the request
goes again in full with every binding changed since (:meth:`BoundGlobals.changed_since`), which
brings the store up to date: a worker behind is refused once per change, whichever global its
call reads.

It has no lock of its own: its ``SendCache``'s lock guards every change, with the session's keys
(a binding pins its key in :class:`dspex.client.heldkeys.HeldKeys`).
"""

from __future__ import annotations

from typing import Any

from dspex.client.heldkeys import HeldKeys

Where = tuple[str, str]  # a module global: (namespace, name)


class BoundGlobals:
    """The module globals one session bound and their versions (see the module docstring)."""

    def __init__(self) -> None:
        self.bound: dict[Where, tuple[Any, str]] = {}  # -> (object, its key)
        self.unconfirmed: dict[Where, str] = {}  # bindings of requests no reply has shown loaded -> key
        # -> (object, key, the binding version that bound it): every binding of the session, kept
        # through a miss (one sent again unchanged keeps its number)
        self.set_at: dict[Where, tuple[Any, str, int]] = {}
        self.version = 0  # the number of the session's latest binding change
        self.modules: dict[str, None] = {}  # the user modules whose globals the session's code uses

    def record(self, carried: dict[Where, tuple[Any, str]], held: HeldKeys) -> tuple[int, int]:
        """A request carries the bindings ``carried`` ((object, key) each; their keys are pinned
        in ``held`` while bound). The binding version it relies on and the one it brings the
        worker to: the bindings of the session it does not carry all have a version up to the
        first; a store that holds every binding up to it holds every binding up to the second
        once it has loaded the request."""
        reaches = 0
        for where, (obj, key) in carried.items():
            changed = self.set_at.get(where)
            if changed is None or changed[1] != key:
                self.version += 1
                changed = self.set_at[where] = (obj, key, self.version)
            reaches = max(reaches, changed[2])
            if where[0].startswith("m:") and where[0][2:] not in self.modules:
                self.modules[where[0][2:]] = None
            old = self.bound.get(where)
            self.bound[where] = (obj, key)
            self.unconfirmed[where] = key
            held.pin(key)
            if old is not None:
                held.unpin(old[1])
        relies = self.version
        if carried:
            relies = max((n for where, (_, _, n) in self.set_at.items() if where not in carried), default=0)
        return relies, max(relies, reaches)

    def confirm(self, bindings: tuple[tuple[Where, str], ...]) -> None:
        """The worker loaded ``bindings``."""
        for where, key in bindings:
            if self.unconfirmed.get(where) == key:
                del self.unconfirmed[where]

    def changed_since(self, version: int) -> list[tuple[Where, Any]]:
        """The bindings set after binding ``version`` ((namespace, name), object): what a worker
        whose store holds every binding up to it lacks."""
        return [(where, obj) for where, (obj, _, n) in self.set_at.items() if n > version]

    def missed(self, ephemeral: bool, failed: tuple[tuple[Where, str], ...]) -> None:
        """The worker lacked something: it holds none of the bindings. Those of ``failed`` (a
        request it could not load) are not the session's; none are of a session its pool keeps
        nothing of (``ephemeral``)."""
        for where, key in failed:
            changed = self.set_at.get(where)
            if changed is not None and changed[1] == key:
                del self.set_at[where]
        self.bound.clear()
        self.unconfirmed.clear()
        if ephemeral:
            self.set_at.clear()
