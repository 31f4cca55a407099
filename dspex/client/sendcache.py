"""What one session's worker already holds of this client's code and values (the sender's side).

A session sends a by-value function, class, module global or big closure value the first time a
request uses it and its key after that (:mod:`dspex.client.sessionpickle` writes the pickles, the
worker keeps them in its :class:`dspex.wire.codestore.CodeStore`). :class:`SendCache` is the
session's record of it, in two parts under its one lock:

- :class:`dspex.client.heldkeys.HeldKeys`: the key of each client object named to the worker,
  which keys the worker holds, and the client objects a call acts on by key;
- :class:`dspex.client.boundglobals.BoundGlobals`: for each module global the session's functions
  read, the client object bound there when it was last sent, and the binding versions;

and what the next encoding may skip: which source files went with the code
(``inspect.getsource`` on the worker), what a function's walk read, the client settings sent last.
It commits a request's record whole (:meth:`SendCache.commit`), takes its bindings and drops as
the worker's once a reply shows it loaded them (:meth:`SendCache.confirm`), and forgets on a miss.

Module globals that were sent are the module state of the session: they stay as long as the
binding does. Everything else (functions and classes not bound as globals, lambdas, big closure
values, code objects) is a cache of at most ``max_entries`` keys: past it the least recently used
are forgotten on both sides (the next request tells the worker) and sent again in full when used
again — a function or class sent again is a new object on the worker.

A worker that lacks a key (evicted, a re-pinned ``hint`` session, a restarted worker, a ``none``
pool) answers :class:`dspex.wire.errors.CodeCacheMiss` without running anything; :meth:`missed` then
forgets what was sent and the request goes again in full, once. A miss from a ``none`` pool
(``ephemeral``) turns the cache off for the session: every request is sent in full.
"""

from __future__ import annotations

import contextvars
import itertools
import secrets
import threading
import types
from typing import Any, Protocol

from dspex.client import processwide
from dspex.client.boundglobals import BoundGlobals
from dspex.client.config import DEFAULT_CODE_CACHE
from dspex.client.heldkeys import HeldKeys
from dspex.client.lmhistory import history_classes
from dspex.client.sentcells import CellSent

# what a committed request sent that the worker has it only once the request reaches it: its
# bindings ((namespace, name), key) and the keys it told the worker to drop (SendCache.confirm)
Receipt = tuple[tuple[tuple[tuple[str, str], str], ...], tuple[str, ...]]

# the client settings a request sent, by key only: (their (name, id, state) signature, the ext
# sent, the keys it refers to, the values: kept so their ids stay valid)
SettingsSent = tuple[tuple[tuple[str, int, Any], ...], Any, tuple[str, ...], dict[str, Any]]
# a client setting whose state a request sends (dspex.client.sendsettings): (the object, the key
# the request sends it under, the key the worker holds it under when the request sends a change
# made in place since, else None, its state)
Restated = tuple[Any, str, str | None, Any]


class Walk:
    """What :meth:`dspex.client.bindings.Bindings.walk` read for a root: kept per session to check the next request."""

    __slots__ = ("cells", "codes", "reached", "reads", "root", "sizes")

    def __init__(self, root: Any) -> None:
        self.root = root
        self.reads: list[tuple[dict[str, Any], str, tuple[str, str]]] = []  # (globals, name, (nsid, name))
        self.reached: dict[int, Any] = {}  # the functions, classes and modules it walked
        self.sizes: list[tuple[dict[str, Any], int]] = []  # (a user module's dict, its size)
        self.cells: list[tuple[types.CellType, Any]] = []  # (closure cell followed, its content)
        self.codes: list[tuple[types.FunctionType, types.CodeType]] = []  # (held function, its code)


class EncodedGlobals(Protocol):
    """The module globals a request bound (:class:`dspex.client.bindings.Bindings`)."""

    bindings: dict[tuple[str, str], tuple[Any, str]]
    walks: dict[int, Walk]
    cells_rebound: list[tuple[types.CellType, Any]]


class Encoded(Protocol):
    """What a request's encoding (:class:`dspex.client.sessionpickle.Message`) sent, as
    :meth:`SendCache.commit` records it."""

    new_keys: dict[int, tuple[Any, str]]
    defined: set[str]
    used: set[str]
    namespaces: set[str]
    sources: dict[str, list[str]]
    settings_sent: SettingsSent | None
    restated: list[Restated]
    cells: dict[int, tuple[CellSent, ...]]
    holders: dict[str, str]

    @property
    def globals(self) -> EncodedGlobals: ...


class SendCache:
    """One session's record of what its worker holds (see the module docstring). Thread-safe:
    requests encode concurrently and commit under one lock, which guards its parts too."""

    def __init__(self, *, keep: bool = True, client_settings: bool = True,
                 max_entries: int | None = None) -> None:
        self.keep = keep  # False: the worker keeps nothing between calls; every request goes in full
        self.client_settings = client_settings  # send the client's DSPy settings with each request
        self.max_entries = max_entries if max_entries is not None else DEFAULT_CODE_CACHE
        self._prefix = secrets.token_hex(4)  # keys never collide with another client's on a shared session id
        self._serial = itertools.count(1)
        self._lock = threading.Lock()
        # a forked child's ancestors, nearest first: (key prefix, its binding version at the fork)
        self.lineage: list[tuple[str, int]] = []
        self.held = HeldKeys()
        self.globals = BoundGlobals()
        self.sources: dict[str, list[str]] = {}  # filename -> the linecache lines sent
        self.walks: dict[int, Walk] = {}  # id(root) -> what its last walk read: Bindings.walk's shortcut
        # (namespace, name) -> (object, why): a global only its module's walk sends that cannot be pickled
        self.left_out: dict[tuple[str, str], tuple[Any, str]] = {}
        self.last_settings: SettingsSent | None = None  # the client settings sent last, all by key
        processwide.register(self)

    def _after_fork(self) -> None:
        """In a forked child that shares the session with its parent: keys of its own from now on
        (one key for two processes' objects would run one's code for the other), and a lock no
        parent thread holds. Its binding versions count on from the parent's at the fork, as its
        own: the worker starts its count at the parent's (``lineage``), so the child's first call
        does not send again every global it inherited (each the parent's value at the fork, over
        the parent's later rebinding)."""
        self.lineage = [(self._prefix, self.globals.version), *self.lineage]
        self._prefix = secrets.token_hex(4)
        self._lock = threading.Lock()

    @property
    def prefix(self) -> str:
        """This client process's prefix of the session's keys: whose binding versions count up
        in one sequence (a forked child's, or another client's on the same session id, are another)."""
        return self._prefix

    @classmethod
    def transient(cls) -> SendCache:
        """For a request outside any session: everything in full, nothing remembered."""
        return cls(keep=False, client_settings=False)

    def new_key(self) -> str:
        return f"{self._prefix}.{next(self._serial)}"

    def key_of(self, obj: Any) -> str:
        """The key that names ``obj`` to the worker: one per client object for the session,
        whichever request encodes it first. Two requests that encode it at once (threads sharing
        the session) name it alike, so the worker keeps one object: under two keys, the later
        binding of a module global would replace the state the earlier call made."""
        if not self.keep:
            return self.new_key()
        with self._lock:
            return self.held.name(obj, self.new_key)

    def commit(self, msg: Encoded, drops_sent: list[str]) -> tuple[Receipt, int, int] | None:
        """``msg`` was encoded in full (and is about to be sent): remember what it sent. Its
        bindings and drops count as the worker's only once :meth:`confirm` says the worker loaded
        the request (the :class:`Receipt` returned): a request that never reaches the worker
        (cancelled or timed out while queued, its send failed) would otherwise leave a rebound
        global at its old value there, while later requests, trusting the binding, send nothing
        of it. Until then later requests send those bindings again, by key.

        Also (the receipt, the binding version the request relies on, the version it brings the
        worker to: :meth:`BoundGlobals.record`)."""
        if not self.keep:
            return None
        lm_class = history_classes() if msg.new_keys else None
        carried = msg.globals.bindings
        with self._lock:
            self.held.record(msg.new_keys, msg.defined, msg.used, msg.namespaces, lm_class, msg.holders)
            relies, reaches = self.globals.record(carried, self.held)
            self.sources.update(msg.sources)
            if len(self.walks) + len(msg.globals.walks) > self.max_entries:
                self.walks.clear()
            self.walks.update(msg.globals.walks)
            if msg.settings_sent is not None:
                self.last_settings = msg.settings_sent
            if msg.cells:
                self.held.cells.hold(msg.cells)
            for cell, value in msg.globals.cells_rebound:
                self.held.cells.resent(cell, value)
            for obj, key, was, state in msg.restated:
                self.held.states[key] = state
                if was is not None:
                    self.held.rekey(obj, key, was)
            self.held.evict(self.max_entries)
        receipt = tuple((where, key) for where, (_, key) in carried.items()), tuple(drops_sent)
        return receipt, relies, reaches

    def confirm(self, receipt: Receipt) -> None:
        """The worker loaded the request of ``receipt``: its bindings are the session's there,
        and its drops were done (until then every request sends them again: dropping is idempotent,
        and a dropped key is never used again)."""
        bindings, drops = receipt
        with self._lock:
            self.globals.confirm(bindings)
            self.held.confirm_drops(drops)

    def changed_since(self, version: int) -> list[tuple[tuple[str, str], Any]]:
        """The session's bindings set after binding ``version``: :meth:`BoundGlobals.changed_since`."""
        with self._lock:
            return self.globals.changed_since(version)

    def pending_drops(self) -> list[str]:
        if not self.held.drops:
            return []
        with self._lock:
            return list(self.held.drops)

    def missed(self, ephemeral: bool, failed: Receipt | None = None) -> None:
        """The worker lacked something: assume it holds nothing of this session. The keys of
        bound globals stay (a worker that does hold them keeps its module state when they come
        again), and so do those of requests still being encoded, which name their objects by
        them (key_of). ``failed``: the receipt of a request the worker could not load (a package
        it lacks): its bindings are not the session's, no worker is sent them to catch up (each
        call would fail alike); a call that reads them sends them again."""
        with self._lock:
            self.globals.missed(ephemeral, failed[0] if failed is not None else ())
            self.held.missed(ephemeral)
            self.sources.clear()
            self.walks.clear()
            self.last_settings = None
            if ephemeral:
                self.keep = False

    def close(self) -> None:
        """The session ended: let go of everything (the worker dropped its side)."""
        with self._lock:
            self.held, self.globals = HeldKeys(), BoundGlobals()
            self.sources.clear()
            self.walks.clear()
            self.last_settings = None

    def _snapshot(self, held: dict[str, Any]) -> list[tuple[str, Any]]:
        """The items of ``held`` (:attr:`HeldKeys.lms`, :attr:`HeldKeys.context_vars`) as they are
        now: another thread's request of the session commits new ones while this one is encoded."""
        if not held:
            return []
        with self._lock:
            return list(held.items())

    def context_values(self, msg: Encoded) -> dict[str, tuple[Any, Any]]:
        """{key: (variable, value)} of the user's ContextVars the worker holds once ``msg`` is
        sent, for those set in the calling thread's or task's context: the call runs with them set."""
        held = self.held
        if not held.context_vars and not msg.new_keys:  # (every call of code that sets none)
            return {}
        # all it names, held or not: another thread's miss since ``msg`` was encoded empties
        # ``held.sent`` though the worker may hold them (it ignores a key it does not hold)
        found = dict(self._snapshot(held.context_vars))
        found.update((key, obj) for obj, key in msg.new_keys.values()
                     if key in msg.defined and type(obj) is contextvars.ContextVar)
        values = {key: (var, var.get(_MISSING)) for key, var in found.items()}
        return {key: item for key, item in values.items() if item[1] is not _MISSING}

    def held_lms(self, msg: Encoded) -> dict[str, Any]:
        """{key: LM or module} of this client's DSPy LMs and modules that the worker holds once
        ``msg`` is sent: whose history entries the call sends back."""
        held = self.held
        lms = dict(self._snapshot(held.lms))  # (all it names: as context_values)
        lm_class = history_classes() if msg.new_keys else None
        if lm_class is not None:
            lms.update((key, obj) for obj, key in msg.new_keys.values()
                       if key in msg.defined and isinstance(obj, lm_class))
        return lms


_MISSING = object()
